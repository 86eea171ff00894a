"""The evaluation protocols, dispatched in one place (:func:`get_protocol`): the project's
``pkt`` and the paper's ``open-instruct`` (see :mod:`pktlib.evaluation` for both)."""
from __future__ import annotations

import hashlib
import re
import string
from collections import OrderedDict
from typing import Any, Callable, Sequence

from pktlib.data import LETTERS, Example, TaskInfo, format_prompt
from pktlib.errors import PktError
from pktlib.evaluation.sandbox import ExecResult, run_many
from pktlib.evaluation.scoring import (ExampleRecord, DEFAULT_MAX_NEW_TOKENS, extract_code, build_program, test_asserts, stop_strings,
                                       gold_text, SCORERS)

__all__ = ["OI_GSM_PREFIX", "OI_CODE_INSTRUCTION", "OI_HUMANEVAL_PREFILL", "OI_MBPP_PREFILL", "OI_HUMANEVAL_STOPS", "OI_MBPP_STOPS",
           "OI_MAX_NEW_TOKENS", "oi_chat_prompt", "oi_last_number", "oi_exact_match", "EvalProtocol", "PROTOCOLS",
           "get_protocol", "run_programs", "score_completions"]


OI_GSM_PREFIX = "Answer the following question.\n\n"
OI_CODE_INSTRUCTION = "Complete the following python function.\n\n\n"
# HumanEval: open-instruct's HumanEvalPack answer, an opened code block and the problem's own prompt
# (signature and docstring), so the model continues the function's body and closes the block, which
# stops it; its fallback answer without the block lets a chat model write prose after the code
# (module docstring of pktlib.evaluation). MBPP's opens a code block too.
OI_HUMANEVAL_PREFILL = "Here is the function:\n\n```python\n"
OI_MBPP_PREFILL = "Here is the completed function:\n\n\n```python\n"
OI_HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")  # the Codex paper's + the block's end
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
    pred, gold = oi_last_number(completion), gold_text(ex)
    return pred, gold, oi_exact_match(pred, gold)


def _oi_letter(predicted: str, ex: Example) -> tuple[str | None, str, bool]:
    gold = gold_text(ex)
    return predicted, gold, predicted == gold


def _oi_program(completion: str, meta: dict[str, Any]) -> str:
    """The program open-instruct executes: HumanEval prompt + completion + test + check; MBPP
    completion + tests (here the original asserts, after the problem's imports)."""
    if "test" in meta and "entry_point" in meta and "code_prompt" in meta:
        return f"{meta['code_prompt']}{completion}\n{meta['test']}\ncheck({meta['entry_point']})\n"
    if "tests" in meta:
        return f"{completion}\n{meta.get('setup') or ''}\n" + "\n".join(test_asserts(meta)) + "\n"
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
        return OI_CODE_INSTRUCTION + prompt, OI_HUMANEVAL_PREFILL + prompt
    if task == "mbpp":
        text, code = _need(ex, "text", "reference")
        return OI_CODE_INSTRUCTION + text + code.split(":")[0], OI_MBPP_PREFILL
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


# Verdicts of programs already run in this process, by (program hash, timeout): a chapter scores dozens
# of variants of one student on the same questions, and most of their programs repeat the student's
# (an injected student that answers as the student writes the same code). Bounded, oldest dropped.
_VERDICTS: OrderedDict[tuple[str, float], ExecResult] = OrderedDict()
_VERDICTS_MAX = 20000


def run_programs(programs: Sequence[str], *, workers: int = 2, timeout: float = 10.0,
                 progress: bool = False) -> list[ExecResult]:
    """Sandbox verdicts of ``programs`` (:func:`pktlib.evaluation.sandbox.run_many`), each distinct
    program run once per process: a program seen before (same text, same timeout) gets its earlier
    verdict back, so identical completions always score alike, timeouts included (a program that
    hit the limit under load is not retried). Results in order."""
    keys = [(hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest(), float(timeout)) for p in programs]
    todo = {k: p for k, p in zip(keys, programs) if k not in _VERDICTS}
    if todo:
        for k, r in zip(todo, run_many(list(todo.values()), workers=workers, timeout=timeout, progress=progress,
                                       desc="running tests")):
            _VERDICTS[k] = r
    out = []
    for k in keys:
        _VERDICTS.move_to_end(k)
        out.append(_VERDICTS[k])
    while len(_VERDICTS) > _VERDICTS_MAX:
        _VERDICTS.popitem(last=False)
    return out


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
        results = run_programs(programs, workers=workers, timeout=timeout, progress=progress)
        for ex, p, c, prog, r in zip(examples, prompts, completions, programs, results):
            gold = "\n".join(test_asserts(ex.meta)) if "tests" in ex.meta else f"check({ex.meta.get('entry_point')})"
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
