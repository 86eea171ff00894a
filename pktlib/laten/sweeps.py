"""LaTen sweeps: translators trained and applied over seeds x transfer rates, scored beside the
plain student and teacher (the LaTen chapter's tables), resumable from their results file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from pktlib.analysis.stats import correctness_string
from pktlib.data import load_task, prompt_answer_pairs
from pktlib.errors import PktError
from pktlib.evaluation import EvalResult, evaluate
from pktlib.laten.attributions import attribute_examples
from pktlib.laten.method import default_steps, default_train_on_inputs, train
from pktlib.laten.transfer import apply
from pktlib.models import reference_spec, resolve_model, weights_hash
from pktlib.records import atomic_write_text, cpu_seconds

__all__ = ["scale_matched_lr", "SweepRow", "sweep"]


def scale_matched_lr(lr: float, d_teacher: int, reference_d_teacher: int | None = None) -> float:
    """``lr`` rescaled so the translator's output after a few steps has a comparable size at d_T.

    Why: the weights start at N(0, 1e-5^2), so after ``s`` AdamW steps each has moved by at most
    about ``a = s * lr`` (Adam's step is ~lr whatever the gradient's scale). Along coherent update
    directions the two-layer output can then grow like ``a^2 * d_T^2 * |w|`` (an upper bound), so
    the same lr allows far larger deltas at d_T = 5120 (Llama-2-13B) than at a pocket-pair width.
    Keeping ``lr * d_T`` fixed keeps that bound's ``a * d_T`` fixed. A heuristic for comparing
    scales, not part of the paper's method. ``reference_d_teacher`` defaults to Llama-2-13B's width.
    """
    if reference_d_teacher is None:
        reference_d_teacher = reference_spec("Llama-2-13b-chat").hidden_size
    return lr * reference_d_teacher / d_teacher


@dataclass
class SweepRow:
    """One evaluated model of a sweep: the student, the teacher, or LaTen at (rate, seed, step)."""

    task: str
    model: str  # "student", "teacher" or "laten"
    score: float
    n: int
    transfer_rate: float | None = None
    seed: int | None = None
    step: int | None = None
    example_id: str | None = None
    translated_rms: float | None = None  # root mean square of the injected deltas (all modules)
    changed_entries: int | None = None  # rows/columns that received a delta
    run_dir: str | None = None  # the translator's run folder (log.jsonl, checkpoints)
    correct: str | None = None  # per-question correctness, "1"/"0" in test order (paired tests)
    cpu_s: float | None = None  # CPU seconds this row cost (pktlib.records.cpu_seconds; LaTen: the first
    # row scored after a translator's training also carries that training), so a sum over rows is the
    # cost of the sweep from nothing, however often it was resumed


def _task_folder(task: str) -> str:
    """A folder name for ``task``: its name, or for a file path its stem plus a short hash."""
    if "/" in task or os.sep in task or task.endswith(".jsonl"):
        return f"{Path(task).stem}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"
    return task.replace(":", "_")


def _attribute_up_front(teacher: tuple, student: tuple, ids: tuple[str, str], steps: Mapping[str, int],
                        seeds: Sequence[int], apply_split: str, cache: Path, train_kwargs: dict[str, Any],
                        progress: bool) -> None:
    """Attribute, in one call per model, every example :func:`train` and :func:`apply` will locate
    in the runs of each task of ``steps`` (task -> its step count; the first is the sweep's own).
    A ``train_kwargs["extract"]`` replaces the sweep's own extract split, and then only its task is
    attributed: the other tasks' sweeps would be given their own examples."""
    extract = train_kwargs.get("extract")
    if extract is not None:
        steps = dict(list(steps.items())[:1])
    examples = []
    for i, (task, n_steps) in enumerate(steps.items()):
        ex = list(extract) if i == 0 and extract is not None else load_task(task, "extract")
        apply_examples = load_task(task, apply_split)
        examples += ex[:n_steps] + [apply_examples[s % len(apply_examples)] for s in seeds]
    texts = prompt_answer_pairs(examples, tokenizer=teacher[1], template=train_kwargs.get("template", "default"))
    how = {"normaliser": train_kwargs.get("normaliser", "rms"),
           "attn_coefficient": train_kwargs.get("attn_coefficient", "summed")}
    for (model, tok), model_id in zip((teacher, student), ids):
        attribute_examples(model, tok, texts, model_id=model_id, cache_dir=cache, progress=progress, **how)


def _key(row: dict[str, Any]) -> tuple:
    return (row["task"], row["model"], row.get("transfer_rate"), row.get("seed"), row.get("step"))


def sweep(teacher: Any, student: Any, task: str, *, seeds: Sequence[int] = (0, 1, 2),
          transfer_rates: Sequence[float] = (0.1,), main_rate: float = 0.1, steps: int | None = None,
          limit: int | None = 100, run_root: str | os.PathLike, split: str = "test", apply_split: str = "train",
          eval_kwargs: dict[str, Any] | None = None, baselines: bool = True, progress: bool = True,
          eval_steps: Sequence[int] | None = None, cache_dir: str | os.PathLike | None = None,
          scorer: Callable[[Any, str], EvalResult] | None = None, attribute_with: Mapping[str, int] | None = None,
          **train_kwargs) -> list[SweepRow]:
    """Train and evaluate LaTen over seeds x transfer rates (every checkpoint step at ``main_rate``,
    the last step at the other rates), next to the plain student and teacher.

    Each (rate, seed) trains its own translator in ``run_root/pair-<hashes>/<task>/rate<r>/seed<s>`` (a task given
    as a file path gets ``<stem>-<hash>`` as its folder) and applies it
    on the unseen example ``load_task(task, apply_split)[seed]``. Attributions are cached in
    ``run_root/attributions``. ``baselines=False`` skips scoring the student and the teacher.
    ``eval_steps`` restricts the checkpoints scored at ``main_rate`` (default: every step up to
    ``steps``; a step beyond ``steps`` is an error). Every row keeps its per-question
    correctness (``correct``) for paired tests; a stored row without it is scored again.
    ``cache_dir`` overrides the attributions' folder (they depend on the models and the example
    only, so sweeps with other training settings can share them). Every example the sweep will
    attribute (the first ``steps`` extract examples and each seed's apply example) is attributed
    up front in one call per model (:func:`pktlib.laten.attribute_examples`: the unembedded value
    vectors are computed once for all of them). ``attribute_with`` (task -> step count) adds other
    tasks' examples to that call, for sweeps of those tasks that follow with the same ``seeds``,
    ``apply_split`` and ``cache_dir`` (ignored when ``extract`` is given): at a real vocabulary the
    value vectors' pass costs minutes per model, so attributing two tasks at once saves one pass
    (they then find theirs cached).
    ``scorer(model, task) -> EvalResult`` replaces
    :func:`pktlib.evaluation.evaluate` (then ``limit``, ``split`` and ``eval_kwargs`` are the
    scorer's business: e.g. :class:`pktlib.experiments.real_pair.SavedScorer`, which caches by
    weights). ``train_kwargs`` go to :func:`pktlib.laten.train` (``template``, ``modules``,
    ``micro_batch``, ...). Rows are appended to ``run_root/<task>/results.jsonl`` as they come,
    and a rerun with the same settings skips rows already there (delete the folder to start over).
    """
    root = Path(run_root)
    t_model, t_tok, t_src = resolve_model(teacher, need_tokenizer=True)
    s_model, s_tok, s_src = resolve_model(student, need_tokenizer=True)
    ids = (weights_hash(t_model), weights_hash(s_model))
    train_settings = {k: str(v) for k, v in train_kwargs.items()}
    inputs = train_kwargs.get("train_on_inputs")
    inputs = default_train_on_inputs(task) if inputs is None else bool(inputs)
    if inputs:  # named only when on, so results of runs without it (the earlier default) stay valid
        train_settings["train_on_inputs"] = "True"
    settings = {"teacher": ids[0], "student": ids[1], "limit": limit, "split": split, "apply_split": apply_split,
                "steps": steps, "train": train_settings,
                "eval": {k: str(v) for k, v in (eval_kwargs or {}).items() if k not in ("progress", "batch_size")}}
    if scorer is not None:  # named only when given, so the results of evaluate() runs stay valid
        settings["scorer"] = str(getattr(scorer, "settings", type(scorer).__name__))
    # Runs of different model pairs never share a folder (a rebuilt pair gets new folders).
    root = root / f"pair-{ids[0][:8]}-{ids[1][:8]}"
    res_path = root / _task_folder(task) / "results.jsonl"
    done: dict[tuple, dict] = {}
    if res_path.is_file():
        for line in res_path.read_text().splitlines():
            r = json.loads(line)
            if r.pop("settings", None) == settings:
                done[_key(r)] = r
    attributions = Path(cache_dir) if cache_dir is not None else root / "attributions"
    rows: list[SweepRow] = []
    ev = {"limit": limit, "progress": False, **(eval_kwargs or {})}

    def score(model: Any, tok: Any) -> EvalResult:
        return scorer(model, task) if scorer is not None else evaluate((model, tok), task, split, **ev)

    def record(row: SweepRow) -> SweepRow:
        rows.append(row)
        if done.get(_key(asdict(row)), {}).get("correct") is None:
            done[_key(asdict(row))] = asdict(row)
            lines = [json.dumps({**r, "settings": settings}) for r in done.values()]
            atomic_write_text(res_path, "\n".join(lines) + "\n")
        return row

    def cached(**key) -> SweepRow | None:
        r = done.get(_key({"task": task, **key}))
        # rows stored before per-question results were kept cannot be paired: score them again
        return SweepRow(**r) if r and r.get("correct") is not None else None

    n_steps = steps or default_steps(task)
    main_steps = sorted(set(eval_steps)) if eval_steps is not None else list(range(1, n_steps + 1))
    if not main_steps or main_steps[0] < 1 or main_steps[-1] > n_steps:
        raise PktError(f"eval_steps must be steps 1..{n_steps} of the run, got {list(eval_steps or [])}")
    plan = [(rate, seed) for rate in transfer_rates for seed in seeds]
    bar = tqdm(total=len(plan) + 2 * baselines, desc=f"LaTen sweep {task}", unit="run") if progress else None
    for name, (m, tok) in (("student", (s_model, s_tok)), ("teacher", (t_model, t_tok))) if baselines else ():
        row = cached(model=name)
        if row is None:
            c0 = cpu_seconds()
            r = score(m, tok)
            row = SweepRow(task, name, r.score, r.n, correct=correctness_string(x.correct for x in r.records),
                           cpu_s=round(cpu_seconds() - c0, 2))
        record(row)
        if bar is not None:
            bar.update(1)
    apply_examples = load_task(task, apply_split)
    if any(cached(model="laten", transfer_rate=rate, seed=seed, step=st) is None for rate, seed in plan
           for st in (main_steps if math.isclose(rate, main_rate) else [n_steps])):
        _attribute_up_front((t_model, t_tok), (s_model, s_tok), ids, {task: n_steps, **(attribute_with or {})},
                            seeds, apply_split, attributions, train_kwargs, progress)
    for rate, seed in plan:
        run_dir = root / _task_folder(task) / f"rate{rate:g}" / (f"seed{seed}" + ("-inputs" if inputs else ""))
        for_steps = main_steps if math.isclose(rate, main_rate) else [n_steps]
        todo = [st for st in for_steps if cached(model="laten", transfer_rate=rate, seed=seed, step=st) is None]
        c0 = cpu_seconds()
        if todo:
            train((t_model, t_tok), (s_model, s_tok), task, transfer_rate=rate, steps=n_steps, seed=seed,
                        out_dir=run_dir, cache_dir=attributions, progress=False, **train_kwargs)
        for st in for_steps:
            row = cached(model="laten", transfer_rate=rate, seed=seed, step=st)
            if row is None:
                ex = apply_examples[seed % len(apply_examples)]  # c0: since the training, or the last row
                applied = apply((t_model, t_tok), (s_model, s_tok), run_dir, step=st, task=task, example=ex,
                                out_dir=None, cache_dir=attributions, progress=False)
                r = score(applied.model, applied.tokenizer)
                ms = applied.record.meta["translated_rms"]
                row = SweepRow(task, "laten", r.score, r.n, rate, seed, st, ex.id,
                               float(math.sqrt(sum(v ** 2 for v in ms.values()) / max(1, len(ms)))),
                               sum(len(e["indices"]) for e in applied.record.entries), str(run_dir),
                               correctness_string(x.correct for x in r.records), round(cpu_seconds() - c0, 2))
                del applied
                c0 = cpu_seconds()
            record(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows
