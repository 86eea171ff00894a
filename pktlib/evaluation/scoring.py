"""Scoring completions: answer extraction per family, the program a code answer runs as, and
the per-example records (the ``pkt`` protocol's rules; see :mod:`pktlib.evaluation`)."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pktlib.data import Example, extract_choice, extract_number, numbers_equal
from pktlib.errors import PktError

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "CHAT_STOPS", "PYTHON_FENCES", "extract_code", "build_program", "test_asserts",
           "truncate_at_stop", "stop_strings", "ExampleRecord", "EvalResult", "example_rows",
           "gold_text", "score_choice", "score_number", "score_exact", "SCORERS", "group_scores"]

# Long enough for each family's reference answers with room to spare; knowledge needs a letter.
DEFAULT_MAX_NEW_TOKENS = {"knowledge": 16, "math": 256, "code": 384, "custom": 256}
CHAT_STOPS = ("<|user|>", "\n\n<|")


# ----------------------------------------------------------------------------------------
# Scorers: small pure functions over strings. The number and letter rules live in pktlib.data,
# which reads the gold answers of reference solutions with the same rules.

_FENCE = re.compile(r"(`{3,}|~{3,})[ \t]*([^\n`~]*)\n(.*?)(?:\1|\Z)", re.DOTALL)
# Info strings of a fenced block that hold Python ("" : no language given).
PYTHON_FENCES = frozenset({"", "python", "python3", "py", "py3", "python2", "ipython", "ipython3"})


def extract_code(text: str) -> str:
    """The program in a completion: the first fenced block whose language is Python (or not
    given), else the first fenced block, else the raw text. Closed or not.

    Any fence of three or more backticks or tildes and any info string (``python3``,
    ``Python``, ``py title="x"``), so prose after the closing fence never becomes code.

    >>> extract_code("```python3\nprint(1)\n```\nThis prints 1.")
    'print(1)\n'
    """
    blocks = [(m.group(2).strip().split(" ")[0].lower(), m.group(3)) for m in _FENCE.finditer(text)]
    if not blocks:
        return text.rstrip() + "\n"
    code = next((c for lang, c in blocks if lang in PYTHON_FENCES), blocks[0][1])
    return code.rstrip() + "\n"


def build_program(code: str, meta: dict[str, Any]) -> str:
    """The program to execute for a code example: completion code plus the example's tests.

    HumanEval-style meta (``test`` defining ``check``, ``entry_point``, ``code_prompt``): the
    completion either restates the function (then the header goes first for its imports and
    helpers, and the completion's definition wins) or continues the header's body; then
    ``check(entry_point)``. MBPP-style meta: the code, ``setup``, then each assert of ``tests``.
    The setup goes *after* the code: the one MBPP test problem with setup code (task 367)
    builds trees from the ``Node`` class that the solution defines, so the usual setup-first
    order fails even the reference solution.
    """
    if "test" in meta and "entry_point" in meta:
        header = meta.get("code_prompt", "")
        ep = meta["entry_point"]
        continues = bool(code[:1].isspace()) and not re.search(rf"^def {re.escape(ep)}\b", code, re.MULTILINE)
        body = header + code if continues else f"{header}\n{code}"
        return f"{body}\n\n{meta['test']}\n\ncheck({ep})\n"
    if "tests" in meta:
        return f"{code}\n{meta.get('setup') or ''}\n\n" + "\n".join(test_asserts(meta)) + "\n"
    raise PktError(f"code example {meta.get('id', '?')!r} has neither 'tests' nor 'test'+'entry_point' in meta "
                   f"(keys: {sorted(meta)})")


def test_asserts(meta: dict[str, Any]) -> list[str]:
    tests = meta["tests"]
    return [tests] if isinstance(tests, str) else list(tests)


def _normalise(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").lower()


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def stop_strings(tokenizer) -> list[str]:
    """The chat format's stop strings: the next turn's header and the EOS token."""
    stops = list(CHAT_STOPS)
    if getattr(tokenizer, "eos_token", None):
        stops.append(tokenizer.eos_token)
    return stops


# ----------------------------------------------------------------------------------------
# Results


@dataclass
class ExampleRecord:
    """One scored output (a completion, or for next-token scoring the predicted letter)."""

    id: str
    prompt: str
    completion: str
    extracted: str | None  # the answer the scorer read (letter, number or program)
    gold: str | None
    correct: bool
    status: str = ""  # code: the sandbox status (passed/failed/error/timeout/memory/blocked)
    group: str = ""  # MMLU subject, for the macro average


@dataclass
class EvalResult:
    """Score of a model on a task split. ``score`` and the interval are percentages."""

    task: str
    split: str
    metric: str
    score: float
    n: int
    n_correct: int
    ci95: tuple[float, float]  # Wilson interval
    backend: str
    model: str
    max_new_tokens: int  # 0 when scored from next-token probabilities
    wall_s: float = 0.0
    generate_s: float = 0.0
    examples_per_s: float = 0.0  # generation throughput (examples / generate_s)
    macro: float | None = None  # mean of per-group scores (MMLU subjects), when groups exist
    by_group: dict[str, float] = field(default_factory=dict)
    protocol: str = "pkt"  # see PROTOCOLS
    records: list[ExampleRecord] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        lo, hi = self.ci95
        line = (f"{self.task}/{self.split} {self.metric} = {self.score:.2f} "
                f"[{lo:.1f}, {hi:.1f}] (n={self.n}, {self.protocol} protocol, {self.backend}, {self.model})")
        return line + (f"; macro {self.macro:.2f}" if self.macro is not None else "")


def example_rows(result: EvalResult, k: int = 3, width: int = 200) -> list[dict[str, Any]]:
    """Up to ``k`` correct then ``k`` wrong records of ``result`` as table rows (texts cut to ``width``)."""
    recs = [r for r in result.records if r.correct][:k] + [r for r in result.records if not r.correct][:k]
    return [{"id": r.id, "correct": r.correct, "status": r.status, "gold": (r.gold or "")[:80],
             "extracted": (r.extracted or "")[:80], "completion": r.completion[:width]} for r in recs]


def gold_text(ex: Example) -> str:
    if ex.meta.get("answer") is None:
        raise PktError(f"example {ex.id!r} has no meta['answer'] to score against (meta keys: {sorted(ex.meta)})")
    return str(ex.meta["answer"])


def score_choice(completion: str, ex: Example) -> tuple[str | None, str, bool]:
    """Knowledge: (letter read, gold letter, correct)."""
    pred, gold = extract_choice(completion, ex.meta.get("choices")), gold_text(ex)
    return pred, gold, pred is not None and pred == gold.strip().upper()


def score_number(completion: str, ex: Example) -> tuple[str | None, str, bool]:
    """Math: (number read, gold number, equal as numbers)."""
    pred, gold = extract_number(completion), gold_text(ex)
    return pred, gold, numbers_equal(pred, gold)


def score_exact(completion: str, ex: Example) -> tuple[str | None, str, bool]:
    """Custom tasks: whitespace/case-normalised exact match with meta["answer"], else the reference."""
    gold = str(ex.meta["answer"]) if ex.meta.get("answer") is not None else ex.answer
    return completion.strip(), gold, _normalise(completion) == _normalise(gold)


# One scorer per task family (code is scored in a batch through the sandbox, above).
SCORERS: dict[str, Callable[[str, Example], tuple[str | None, str, bool]]] = {
    "knowledge": score_choice, "math": score_number, "custom": score_exact,
}


def group_scores(records: Sequence[ExampleRecord]) -> dict[str, float]:
    """Score (0-100) per group (MMLU subject) of the records that have one; their mean is the macro average."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        if r.group:
            groups.setdefault(r.group, []).append(r.correct)
    return {g: 100 * sum(v) / len(v) for g, v in sorted(groups.items())}
