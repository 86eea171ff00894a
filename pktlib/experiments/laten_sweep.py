"""The LaTen chapter's sweeps and tables (paper Tables 1, 3 and 5 on the pocket pair).

:func:`run_sweeps` runs :func:`pktlib.laten.sweep` per learning-rate configuration and task and
returns one tidy table of evaluations (the student, the teacher, and LaTen per transfer rate,
seed and alignment step). The functions below reduce it to the chapter's tables and readings;
spreads are over seeds (greedy evaluation is deterministic).

:func:`run_lr_sweep` takes LaTen out of its inert regime: learning rate x penalty weight x
alignment step, every injected student paired with the plain student question by question
(:func:`lr_sweep_table`, :func:`lr_sweep_summary`, :func:`lr_sweep_lines`).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from pktlib.analysis.stats import correctness_from_string, paired_test
from pktlib.experiments.verdict import compare_runs, compare_table, comparison_text, scorecard_fields
from pktlib.laten import default_steps, memory_estimate, read_log, scale_matched_lr, sweep
from pktlib.models import ModelSpec, reference_config, spec
from pktlib.original_code import cast_visibility
from pktlib.records import cpu_seconds

__all__ = ["lr_configs", "run_sweeps", "comparisons", "config_comparisons", "comparison_lines", "mean_std", "memory_tables", "baselines", "student_scores", "final_runs", "main_curve",
           "table1", "scorecard_rows", "score_vs_step", "score_vs_rate", "train_logs", "train_log_summary",
           "injected_delta_rms", "instability_lines", "weight_rms", "regime_lines", "run_lr_sweep", "lr_sweep_table",
           "lr_sweep_summary", "lr_sweep_lines", "lr_sweep_claim", "READINGS", "task_label", "delta_size_table", "seed_bars",
           "evaluator_visibility"]


def lr_configs(lr: float, d_teacher: int, *, scale_matched: bool = True) -> dict[str, float]:
    """``{"paper lr": lr}`` plus ``"scale-matched lr"`` (:func:`pktlib.laten.scale_matched_lr`)."""
    configs = {"paper lr": lr}
    if scale_matched:
        configs["scale-matched lr"] = scale_matched_lr(lr, d_teacher)
    return configs


def run_sweeps(teacher: Any, student: Any, *, tasks: Sequence[str], configs: Mapping[str, float],
               seeds: Sequence[int], transfer_rates: Sequence[float], main_rate: float, limit: int,
               run_root: str | Path, align_batch: int, max_length: int, eval_kwargs: Mapping[str, Any],
               budgets: Mapping[str, int] | None = None, sweep_kwargs: Mapping[str, Any] | None = None,
               final_step_only: bool = False) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One :func:`pktlib.laten.sweep` per (configuration, task): (table, its rows as logged).

    Each row is a :class:`pktlib.laten.SweepRow` with its configuration's ``config`` name and ``lr``.
    ``budgets`` (task -> new tokens, :func:`pktlib.experiments.scoring.generation_budget`), when
    given, sets each task's ``max_new_tokens`` over ``eval_kwargs``'.

    The paper lr runs every transfer rate and scores the baselines; other configurations run
    ``main_rate`` only. Each configuration's runs live in ``run_root/lr<lr>`` and resume.
    ``sweep_kwargs`` go to every sweep (a real pair's ``scorer``, ``template``, ``modules``,
    ``cache_dir`` shared by the configurations, ...). ``final_step_only``: score each translator at
    its task's Table 5 step only (every step otherwise), where scoring dominates the cost. The
    first sweep that attributes also attributes the later tasks' examples (``attribute_with`` of
    :func:`pktlib.laten.sweep`): one pass of the value vectors per model for every task.
    """
    rows = []
    for name, lr_value in configs.items():
        rates = transfer_rates if name == "paper lr" else [main_rate]
        for j, task in enumerate(tasks):
            out = sweep(teacher, student, task, seeds=seeds, transfer_rates=rates, main_rate=main_rate, limit=limit,
                        run_root=Path(run_root) / f"lr{lr_value:g}", lr=lr_value, align_batch=align_batch,
                        max_length=max_length, eval_kwargs=_eval_kwargs(eval_kwargs, budgets, task),
                        baselines=(name == "paper lr"),
                        attribute_with={t: default_steps(t) for t in tasks[j + 1:]},  # one value-vector pass
                        eval_steps=[default_steps(task)] if final_step_only else None, **(sweep_kwargs or {}))
            rows += [{**asdict(r), "config": name, "lr": lr_value} for r in out]
    return pd.DataFrame(rows), rows


def _eval_kwargs(eval_kwargs: Mapping[str, Any], budgets: Mapping[str, int] | None, task: str) -> dict[str, Any]:
    return {**eval_kwargs, "max_new_tokens": budgets[task]} if budgets else dict(eval_kwargs)


def comparisons(runs: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """LaTen at the Table 5 step against the student, per task, configuration and transfer rate
    (:func:`pktlib.experiments.verdict.compare_table`; each question once, the student a fixed reference)."""
    student = baselines(runs)
    student = student[student.model == "student"].drop_duplicates("task")[["task", "score", "correct"]]
    return compare_table(final_runs(runs), student, by=["task", "config", "transfer_rate"], on=["task"], alpha=alpha)


def config_comparisons(runs: pd.DataFrame, *, main_rate: float, reference: str = "paper lr",
                       alpha: float = 0.05) -> pd.DataFrame:
    """Each other configuration against ``reference`` at ``main_rate`` and the Table 5 step, per
    task, seed paired with seed (:func:`pktlib.experiments.verdict.compare_table`)."""
    final = final_runs(runs)
    final = final[final.transfer_rate == main_rate]
    ref = final[final.config == reference]
    return compare_table(final[final.config != reference], ref, by=["task", "config"], on=["task"], alpha=alpha)


def comparison_lines(table: pd.DataFrame, against: str = "the student") -> list[str]:
    """Markdown list items, one per row of a comparison table: its keys, then
    :func:`pktlib.experiments.verdict.comparison_text` and the verdict."""
    keys = [c for c in table.columns if c in ("task", "config", "transfer_rate")]
    return [f"- **{', '.join(f'rate {r[k]:g}' if k == 'transfer_rate' else str(r[k]) for k in keys)}** vs "
            f"{against}: {comparison_text(r)}; **{r['verdict']}**" for r in table.to_dict("records")]


def mean_std(x: pd.Series) -> pd.Series:
    """mean, std over runs (ddof 1; NaN for one run) and the number of runs."""
    return pd.Series({"mean": x.mean(), "std": x.std(ddof=1) if len(x) > 1 else float("nan"), "runs": len(x)})


def memory_tables(ts: ModelSpec, ss: ModelSpec, *, preset: str, align_batch: int, max_length: int,
                  transfer_rate: float) -> tuple[pd.DataFrame, Any, Any]:
    """(table of one alignment step's memory: Llama-2 13B -> 7B in GiB and the pocket pair in MiB,
    the Llama-2 estimate, the pocket estimate) (:func:`pktlib.laten.memory_estimate`)."""
    llama = memory_estimate(reference_config("Llama-2-13b-chat"), reference_config("Llama-2-7b-chat"), dtype="bf16",
                            batch=align_batch, seq_len=512, transfer_rate=transfer_rate)
    pocket = memory_estimate(ts, ss, dtype="fp32", batch=align_batch, seq_len=max_length, transfer_rate=transfer_rate)
    table = pd.DataFrame({f"Llama-2 13B -> 7B, bf16, P={align_batch} x 512 tokens (GiB)": dict(llama.table()),
                          f"pocket pair ({preset}), fp32, P={align_batch} x {max_length} tokens (MiB)":
                              {k: v * 1024 for k, v in pocket.table()}})
    return table, llama, pocket


def baselines(runs: pd.DataFrame) -> pd.DataFrame:
    """The student's and the teacher's rows."""
    return runs[runs.model.isin(["student", "teacher"])]


def student_scores(runs: pd.DataFrame) -> dict[str, float]:
    """task -> the student's score."""
    b = baselines(runs)
    return b[b.model == "student"].set_index("task").score.to_dict()


def _base_scores(runs: pd.DataFrame, task: str) -> pd.Series:
    b = baselines(runs)
    return b[b.task == task].set_index("model").score


def main_curve(runs: pd.DataFrame, main_rate: float) -> pd.DataFrame:
    """LaTen at ``main_rate``: every checkpoint step of every seed and configuration."""
    return runs[(runs.model == "laten") & (runs.transfer_rate == main_rate)]


def final_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """LaTen rows at the task's Table 5 step (the last checkpoint)."""
    laten = runs[runs.model == "laten"]
    return laten[laten.step == laten.task.map(default_steps)]


def table1(runs: pd.DataFrame, *, tasks: Sequence[str], configs: Sequence[str], main_rate: float
           ) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """(display table, its dict): per family the student, the teacher and "LaTen (<config>)" as
    "mean ± std" at ``main_rate`` and the Table 5 step; the dict also holds ``_laten_<config>_mean``."""
    final = final_runs(runs)
    final = final[final.transfer_rate == main_rate]
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        fam = task_label(task)
        b = _base_scores(runs, task)
        out[fam] = {"student": b["student"], "teacher": b["teacher"]}
        for name in configs:
            s = mean_std(final[(final.task == task) & (final.config == name)].score)
            out[fam][f"LaTen ({name})"] = f"{s['mean']:.1f} ± {s['std']:.1f}"
            out[fam][f"_laten_{name}_mean"] = s["mean"]
    t1 = pd.DataFrame(out)
    return t1.loc[[i for i in t1.index if not i.startswith("_")]], out


def scorecard_rows(table: Mapping[str, Mapping[str, Any]], compared: pd.DataFrame, *, tasks: Sequence[str],
                   pair: str, main_rate: float, protocol: str | None = None) -> list[dict[str, Any]]:
    """Scorecard rows of the student, the teacher and LaTen (paper lr, ``main_rate``) per task; the
    LaTen row carries its comparison with the student from ``compared`` (:func:`comparisons`):
    ``effect``, ``ci`` (over seeds, or over questions with one seed), ``p``, ``seeds``.
    ``protocol``: the scores' evaluation protocol when not the project's own (a real pair's)."""
    c = compared[(compared.config == "paper lr") & (compared.transfer_rate == main_rate)].set_index("task")
    extra = {"protocol": protocol} if protocol else {}
    rows = []
    for task in tasks:
        t, fam = c.loc[task], task_label(task)
        n = int(t.n)
        rows += [{"method": "student", "task": task, "score": float(table[fam]["student"]), "n": n, "pair": pair,
                  **extra},
                 {"method": "teacher", "task": task, "score": float(table[fam]["teacher"]), "n": n, "pair": pair,
                  **extra},
                 {"method": "laten", "task": task, "score": float(table[fam]["_laten_paper lr_mean"]), "pair": pair,
                  **scorecard_fields(t), **extra}]
    return rows


def task_label(task: str) -> str:
    """A table column for ``task``: a pocket task's family ("pocket-math" -> "math"), else the task name."""
    return task.split("-", 1)[1] if task.startswith("pocket-") else task


def score_vs_step(curve: pd.DataFrame) -> pd.DataFrame:
    """mean/std/runs of the score per configuration, task and alignment step."""
    return curve.groupby(["config", "task", "step"]).score.apply(mean_std).unstack().reset_index()


def score_vs_rate(runs: pd.DataFrame) -> pd.DataFrame:
    """mean/std/runs of the last checkpoint's score per task and transfer rate, paper lr."""
    last = final_runs(runs)
    last = last[last.config == "paper lr"]
    return last.groupby(["task", "transfer_rate"]).score.apply(mean_std).unstack().reset_index()


_LOG_FIELDS = ("step", "lr", "lm_loss", "lm_loss_after", "student_lm_loss", "mse", "wall_s")


def train_logs(runs: pd.DataFrame, main_rate: float) -> pd.DataFrame:
    """Each ``main_rate`` run's ``log.jsonl`` rows, with ``lm_gain_vs_student`` (student loss minus
    the injected loss after the step)."""
    logs = []
    for _, run in main_curve(runs, main_rate).drop_duplicates("run_dir").iterrows():
        for r in read_log(run.run_dir):
            logs.append({"config": run.config, "task": run.task, "seed": run.seed,
                         **{k: r.get(k, float("nan")) for k in _LOG_FIELDS}})  # diagnostics may be off
    logs = pd.DataFrame(logs, columns=["config", "task", "seed", *_LOG_FIELDS])
    logs["lm_gain_vs_student"] = logs.student_lm_loss - logs.lm_loss_after
    return logs


def train_log_summary(logs: pd.DataFrame) -> list[dict[str, Any]]:
    """mean/min/max of the loss gain, the penalty and the step time per configuration and task."""
    return logs.groupby(["config", "task"])[["lm_gain_vs_student", "mse", "wall_s"]].agg(
        ["mean", "min", "max"]).reset_index().to_dict("records")


def injected_delta_rms(runs: pd.DataFrame) -> pd.DataFrame:
    """min and max RMS of the injected deltas per configuration and task."""
    return runs[runs.model == "laten"].groupby(["config", "task"]).translated_rms.agg(["min", "max"])


def seed_bars(runs: pd.DataFrame, *, tasks: Sequence[str], main_rate: float) -> dict[str, Any]:
    """Arguments of :func:`pktlib.plots.grouped_bars`: per task a panel, per configuration a group,
    per seed a bar (LaTen's score at ``main_rate`` and the Table 5 step); the student's and the
    teacher's scores as reference lines."""
    final = final_runs(runs)
    final = final[final.transfer_rate == main_rate]
    values = {t: {c: {f"seed {int(r.seed)}": float(r.score) for r in g.sort_values("seed").itertuples()}
                  for c, g in final[final.task == t].groupby("config", sort=False)} for t in tasks}
    references = {t: {m: float(v) for m, v in _base_scores(runs, t).items()} for t in tasks}
    return {"values": values, "references": references}


def delta_size_table(runs: pd.DataFrame, *, weight_rms: float) -> pd.DataFrame:
    """Per configuration and task: the injected deltas' RMS (mean, min, max over the injected
    students) and its ratio to the student's weights' RMS (:func:`weight_rms`), with the number of
    rows/columns that received a delta (paper Tables 1, 3, 8 set the transferred parameters beside
    the model's; here the size of what LaTen adds)."""
    laten = runs[runs.model == "laten"]
    out = laten.groupby(["config", "task"]).agg(delta_rms=("translated_rms", "mean"),
                                                delta_rms_min=("translated_rms", "min"),
                                                delta_rms_max=("translated_rms", "max"),
                                                changed_vectors=("changed_entries", "mean"), runs=("score", "size"))
    out["ratio_to_weights"] = out.delta_rms / weight_rms
    out["weight_rms"] = weight_rms
    return out


def instability_lines(runs: pd.DataFrame, *, configs: Sequence[str], tasks: Sequence[str],
                      main_rate: float) -> list[str]:
    """Per configuration and task: LaTen's range against the student, its spread over seeds, the
    teacher-student gap and the size of the injected deltas (Markdown list items)."""
    curve = main_curve(runs, main_rate)
    lines = []
    for name in configs:
        for task in tasks:
            b = _base_scores(runs, task)
            d = curve[(curve.config == name) & (curve.task == task)]
            diff = d.score - b["student"]
            per_step_std = d.groupby("step").score.std(ddof=1)
            lines.append(
                f"- **{task}, {name}**: over {len(d)} (seed, step) injections LaTen scored "
                f"{diff.min():+.1f} to {diff.max():+.1f} points against the student "
                f"({(diff > 0).sum()} above, {(diff == 0).sum()} equal, {(diff < 0).sum()} below); "
                f"the spread across seeds at one step reaches {per_step_std.max():.1f} points (std); "
                f"the teacher-student gap is {b['teacher'] - b['student']:+.1f}; injected deltas have an RMS of "
                f"{d.translated_rms.min():.1e} to {d.translated_rms.max():.1e}.")
    return lines


def weight_rms(model: nn.Module) -> float:
    """Root mean square of a model's matrix (2-D) parameters."""
    mats = [p.detach() for p in model.parameters() if p.dim() == 2]
    return float(sum(p.pow(2).sum() for p in mats) / sum(p.numel() for p in mats)) ** 0.5


def evaluator_visibility(model: nn.Module, sizes: pd.DataFrame, *, modules: Sequence[str],
                         dtypes: Sequence[str] = ("bfloat16", "float16", "float32"), layer: int | None = None,
                         seed: int = 0) -> pd.DataFrame:
    """What an evaluator running the injected model in each of ``dtypes`` sees of deltas of the
    sizes in ``sizes`` (:func:`delta_size_table`: one row per configuration and task, ``delta_rms``).

    A model of the deltas, not the deltas themselves: Gaussian noise of each row's RMS added to the
    weights of ``modules`` in one layer of ``model`` (``layer``, default the middle one), measured
    with :func:`pktlib.original_code.cast_visibility`. One row per configuration, task, dtype and
    module: the share of entries whose cast value changes, the correlation of the change with the
    delta and the rounding noise's RMS over the delta's RMS.
    """
    ms = spec(model)
    layer = ms.n_layers // 2 if layer is None else layer
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (config, task), size in sizes.delta_rms.items():
        for name in modules:
            w = ms.weight(model, layer, name).detach()
            delta = float(size) * torch.randn(w.shape, generator=g, dtype=torch.float32)
            for dtype in dtypes:
                v = cast_visibility(w, delta, dtype)
                rows.append({"config": config, "task": task, "dtype": dtype, "module": name, "layer": layer,
                             "delta_rms": v.delta_rms, "weight_rms": v.weight_rms,
                             "share_changed": v.share_changed, "correlation": v.correlation,
                             "noise_over_delta": v.error_rms / v.delta_rms if v.delta_rms else float("nan")})
    return pd.DataFrame(rows)


def _range_words(gaps: pd.Series) -> str:
    """The largest gain and loss of ``gaps`` (points) in words, without a 'loss' that is a gain."""
    up = f"the largest gain is {gaps.max():+.1f} points" if gaps.max() > 0 else "none scores above it"
    down = f"the largest loss {gaps.min():+.1f} points" if gaps.min() < 0 else "none scores below it"
    return f"{up} and {down}"


def regime_lines(runs: pd.DataFrame, *, configs: Sequence[str], main_rate: float, student_rms: float) -> list[str]:
    """Per configuration: the share of injected students scoring exactly the student's score, the
    largest gain and loss, and the injected deltas' RMS against the student's weights'."""
    curve = main_curve(runs, main_rate)
    student = baselines(runs)
    student = student[student.model == "student"][["task", "score"]]
    out = []
    for name in configs:
        d = curve[curve.config == name].merge(student, on="task", suffixes=("", "_student"))
        same = (d.score == d.score_student).mean()
        gaps = d.score - d.score_student
        out.append(f"- **{name}**: {100 * same:.0f}% of the injected students score exactly the student's score; "
                   f"{_range_words(gaps)}; "
                   f"injected deltas have an RMS between {d.translated_rms.min():.1e} and {d.translated_rms.max():.1e} "
                   f"(the student's weights have an RMS of {student_rms:.1e}).")
    return out


# ======================================================================== beyond the inert regime


def run_lr_sweep(teacher: Any, student: Any, *, tasks: Sequence[str], lrs: Sequence[float], steps: Sequence[int],
                 penalties: Sequence[float], seeds: Sequence[int], transfer_rate: float, limit: int | None,
                 run_root: str | Path, align_batch: int, max_length: int, eval_kwargs: Mapping[str, Any],
                 budgets: Mapping[str, int] | None = None, progress: bool = False,
                 sweep_kwargs: Mapping[str, Any] | None = None
                 ) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, float]]:
    """LaTen over learning rate x penalty weight x alignment step x seed (table, its rows, cost).

    One :func:`pktlib.laten.sweep` per (penalty, lr, task) at ``transfer_rate``: each seed trains
    one translator for ``max(steps)`` steps and its checkpoints at ``steps`` are injected and scored
    (a checkpoint at step s is what a run of s steps gives: the one-cycle schedule spans the extract
    set either way, :func:`pktlib.laten.train`). ``penalties`` are values of ``mse_weight`` (the
    paper's 1000; 0 leaves the LM loss alone). The student and the teacher are scored once per task.
    Rows carry ``lr`` and ``penalty``; runs live in ``run_root/lr<lr>-penalty<w>`` and resume; the
    attributions (the same for every setting) are computed once, in ``run_root/attributions``,
    for every task in the first sweep that attributes.
    ``budgets``: as :func:`run_sweeps`. ``sweep_kwargs`` go to every sweep, over this function's
    ``progress`` and attribution folder (a real pair's ``scorer``, ``template``, ``modules``, or a
    ``cache_dir`` shared with other runs of the same pair). The cost is this call's wall and CPU
    seconds (:func:`pktlib.records.cpu_seconds`; a resumed call only pays for what was missing).
    """
    kwargs = {"progress": progress, "cache_dir": Path(run_root) / "attributions", **(sweep_kwargs or {})}
    t0, c0 = time.perf_counter(), cpu_seconds()
    rows: list[dict[str, Any]] = []
    scored: set[str] = set()
    for penalty in penalties:
        for lr in lrs:
            for j, task in enumerate(tasks):
                out = sweep(teacher, student, task, seeds=seeds, transfer_rates=[transfer_rate],
                            attribute_with={t: max(steps) for t in tasks[j + 1:]},
                            main_rate=transfer_rate, steps=max(steps), eval_steps=steps, limit=limit,
                            run_root=Path(run_root) / f"lr{lr:g}-penalty{penalty:g}", lr=lr, mse_weight=penalty,
                            align_batch=align_batch, max_length=max_length,
                            eval_kwargs=_eval_kwargs(eval_kwargs, budgets, task), baselines=task not in scored,
                            **kwargs)
                scored.add(task)
                rows += [{**asdict(r), "lr": lr, "penalty": penalty} for r in out]
    cost = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}
    return pd.DataFrame(rows), rows, cost


def lr_sweep_table(runs: pd.DataFrame, *, weight_rms: float, alpha: float = 0.05) -> pd.DataFrame:
    """One row per injected student of :func:`run_lr_sweep`, paired with the plain student.

    Columns: task, penalty, lr, step, seed, delta_rms (RMS of the injected deltas), ratio
    (delta_rms / ``weight_rms``, the student's weights' RMS: :func:`weight_rms`), score, student
    (the student's score), gap (points), laten_only / student_only (questions only that model got
    right), p_value (exact McNemar, :func:`pktlib.analysis.stats.paired_test`) and outcome:
    "same answers" (no discordant question), "better" / "worse" (p < ``alpha``) or "n.s.".
    Raises PktError (from the test) if a row was scored on other questions than the student.
    """
    student = runs[runs.model == "student"].drop_duplicates("task").set_index("task")
    out = []
    for _, r in runs[runs.model == "laten"].iterrows():
        base = student.loc[r.task]
        test = paired_test(correctness_from_string(r.correct), correctness_from_string(base.correct))
        diff = test.a_only - test.b_only
        outcome = ("same answers" if test.a_only + test.b_only == 0 else
                   "n.s." if test.p_value >= alpha else "better" if diff > 0 else "worse")
        out.append({"task": r.task, "penalty": r.penalty, "lr": r.lr, "step": int(r.step), "seed": int(r.seed),
                    "delta_rms": r.translated_rms, "ratio": r.translated_rms / weight_rms, "score": r.score,
                    "student": base.score, "gap": r.score - base.score, "laten_only": test.a_only,
                    "student_only": test.b_only, "n": test.n, "p_value": test.p_value, "outcome": outcome,
                    "correct": r.correct, "student_correct": base.correct})
    cols = ["task", "penalty", "lr", "step", "seed", "delta_rms", "ratio", "score", "student", "gap", "laten_only",
            "student_only", "n", "p_value", "outcome", "correct", "student_correct"]
    return pd.DataFrame(out, columns=cols).sort_values(["task", "penalty", "lr", "step", "seed"], ignore_index=True)


# What a setting does to the student, decided from its seeds (lr_sweep_summary).
READINGS = {
    "inert": "every seed's injected student answers every question as the student does",
    "helps": "the mean gain beats twice its standard error over seeds and the per-question paired p < alpha",
    "hurts": "the mean loss beats twice its standard error over seeds and the per-question paired p < alpha",
    "unstable": "seeds differ significantly from the student in both directions (McNemar p < alpha each)",
    "no clear effect": "answers change, but neither the seeds' spread nor the paired test is beaten",
}


def lr_sweep_summary(table: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Per (task, penalty, lr, step) of :func:`lr_sweep_table`: median ratio, mean and std of the
    gap over seeds, the number of seeds significantly better / worse (each seed's own McNemar
    test), the comparison of :func:`pktlib.experiments.verdict.compare_runs` (gap, its s.e. over
    seeds, p_value: the per-question test, each question once) and the reading (:data:`READINGS`)."""
    out = []
    for key, g in table.groupby(["task", "penalty", "lr", "step"], sort=True):
        laten = g[["seed", "score", "correct"]]
        student = pd.DataFrame({"seed": g.seed, "score": g.student, "correct": g.student_correct})
        cmp = compare_runs(laten, student, alpha=alpha)
        better, worse = cmp.seeds_better, cmp.seeds_worse
        if (g.outcome == "same answers").all():
            reading = "inert"
        elif better and worse:
            reading = "unstable"
        elif cmp.real:
            reading = "helps" if cmp.gap > 0 else "hurts"
        else:
            reading = "no clear effect"
        out.append({**dict(zip(["task", "penalty", "lr", "step"], key)), "ratio": float(g.ratio.median()),
                    "gap": cmp.gap, "gap_std": float(g.gap.std(ddof=1)) if len(g) > 1 else float("nan"),
                    "se": cmp.se, "p_value": cmp.p_value, "seeds": len(g), "seeds_better": better,
                    "seeds_worse": worse, "reading": reading})
    return pd.DataFrame(out)


def lr_sweep_lines(summary: pd.DataFrame, *, band: tuple[float, float] = (0.01, 0.1)) -> list[str]:
    """Markdown list items: per task, the learning rates whose deltas reach the ``band`` of the
    weights' RMS, and the settings in each reading (penalty, lr, step)."""
    lines = []
    for task, g in summary.groupby("task"):
        in_band = g[(g.ratio >= band[0]) & (g.ratio <= band[1])]
        reach = ", ".join(f"lr {lr:g} (penalty {p:g})" for p, lr in
                          sorted(set(zip(in_band.penalty, in_band.lr)))) or "none of the settings"
        lines.append(f"- **{task}**: deltas at {100 * band[0]:g}-{100 * band[1]:g}% of the weights' RMS "
                     f"(median over seeds, some step) at {reach}; largest ratio {g.ratio.max():.1e}.")
        for reading in READINGS:
            d = g[g.reading == reading]
            if len(d):
                where = "; ".join(f"penalty {r.penalty:g}, lr {r.lr:g}, step {r.step}: {r.gap:+.1f} points "
                                  f"(p {r.p_value:.2g}, {r.seeds_better}/{r.seeds} seeds better, "
                                  f"{r.seeds_worse} worse)" for r in d.itertuples())
                lines.append(f"  - {reading} ({len(d)} of {len(g)} settings): {where}.")
    return lines


def lr_sweep_claim(summary: pd.DataFrame, *, subject: str = "the pocket pair") -> str:
    """The paper's claim "LaTen improves the student, unstably" checked against the readings of
    :func:`lr_sweep_summary` (a Markdown paragraph): it agrees when some setting helps and some
    setting is unstable or hurts. ``subject`` names the pair the paragraph speaks of."""
    counts = {r: int((summary.reading == r).sum()) for r in READINGS}
    helps, bad = counts["helps"], counts["unstable"] + counts["hurts"]
    if helps and bad:
        verdict = f"{subject} agrees: some settings improve the student, others are unstable or harm it"
    elif helps:
        verdict = (f"{subject} agrees that LaTen can improve the student, but no setting is unstable or harmful "
                   "by this test")
    elif bad:
        verdict = (f"{subject} does not show an improvement: where LaTen changes the student beyond the noise, "
                   "it is unstable or harmful")
    elif counts["inert"] == len(summary):
        verdict = f"{subject} cannot test it: LaTen leaves every answer unchanged in every setting"
    else:
        verdict = (f"{subject} does not show an improvement: LaTen changes answers, but no setting moves the "
                   "score beyond the noise")
    shown = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
    return (f"\n**The paper's claim, \"LaTen improves the student, unstably\"**: {verdict} ({len(summary)} settings: "
            f"{shown}; each decided by the spread over seeds and the exact per-question paired test, each question "
            f"once, p < 0.05).")
