"""The unaligned Pre-Align grid (paper Section 3, Figure 2, Appendix B), and Seeking without training.

For each task family every cell of :func:`pktlib.baselines.grid` (layer choice x hidden-size
reduction x neuron choice) adds mapped teacher weights to a copy of the student
(:func:`pktlib.baselines.unaligned_transfer`), and Seeking adds its rank-``r`` extracted
sub-matrices (:func:`pktlib.baselines.seeking_transfer`); every model is scored on the same
test questions. :func:`run_grid` returns the tidy table; the other functions summarise it. Given a
run folder, each model's score is kept there under its weights' hash
(:func:`pktlib.experiments.scoring.score_once`), so a rerun rebuilds the models but scores none again.

A cell with a random choice (random layers or random neurons) is run once per seed of the random
choices; a cell without one is the same model whatever the seed and is run once (``seed`` null).
Every model keeps its per-question correctness, and :func:`comparisons` sets each cell and
Seeking against the student with :func:`pktlib.experiments.verdict.compare_table` (effect,
intervals over seeds and questions, paired p counting each question once).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.std import tqdm

from pktlib.baselines import TransferRecord, grid, seeking_transfer, unaligned_transfer
from pktlib.data import load_task
from pktlib.evaluation import EvalResult
from pktlib.models import TRANSFERRED_MODULES
from pktlib.experiments.scoring import NO_TEACHER_GAP, BudgetedScorer, families_with_teacher_gap, score_once
from pktlib.experiments.verdict import compare_table, comparison_text, scorecard_fields
from pktlib.seeking import Sensitivity, sensitivity

__all__ = ["UnalignedRuns", "run_grid", "random_cell", "reference_runs", "comparisons", "summary_table", "scorecard_rows", "relative_delta", "grid_matrices",
           "UnalignedVerdict", "verdict", "GRID_ROWS", "GRID_COLUMNS"]

GRID_ROWS = ("top", "bottom", "random")  # layer choices
GRID_COLUMNS = tuple((h, n) for h in ("pca", "whitening", "embedding") for n in ("random", "importance"))


def _relative_delta(rec: TransferRecord) -> float:
    """Mean over the changed weights of ||delta||_F / ||theta_S||_F."""
    return float(np.mean([rec.delta_norms[k] / rec.weight_norms[k] for k in rec.changed]))


@dataclass
class UnalignedRuns:
    """Every transferred model of the grid, scored."""

    results: pd.DataFrame  # one row per (family, cell, seed): layers, hidden, neurons, seed, score, ci95, correct,
    # eval_cpu_s, scored_now, ...
    refs: dict[str, dict[str, tuple[float, list[float]]]]  # family -> role -> (score, 95% interval)
    layer_totals: dict[str, list[float]]  # family -> the teacher's per-layer Seeking sensitivity
    rows: list[dict[str, Any]]
    ref_correct: dict[str, dict[str, str]]  # family -> role -> per-question correctness ("1"/"0")
    seconds: float = 0.0  # wall seconds of run_grid
    tasks: dict[str, str] = field(default_factory=dict)  # family -> task name (default "pocket-<family>")
    # family -> role -> {"eval_cpu_s", "scored_now"} of the student's and teacher's scoring, as in the rows
    ref_costs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def task(self, family: str) -> str:
        return self.tasks.get(family, f"pocket-{family}")

    def metrics(self) -> dict[str, Any]:
        return {"reference_scores": self.refs, "reference_correct": self.ref_correct, "unaligned_grid": self.rows,
                "layer_totals": self.layer_totals, "grid_seconds": round(self.seconds, 1), "tasks": self.tasks,
                "reference_costs": self.ref_costs}

    def scoring_costs(self) -> dict[str, Any]:
        """Every scored model of the run (student, teacher, cells, Seeking): ``models``, how many were
        ``scored_now`` and ``read_back`` (both None for a scorer that caches by itself), and
        ``eval_cpu_s``, their scoring's seconds from nothing (CPU seconds when it ran; a
        self-caching scorer's generation wall seconds)."""
        costs = [{"eval_cpu_s": r["eval_cpu_s"], "scored_now": r["scored_now"]} for r in self.rows]
        costs += [c for by_role in self.ref_costs.values() for c in by_role.values()]
        known = all(c["scored_now"] is not None for c in costs)
        now = sum(bool(c["scored_now"]) for c in costs)
        return {"models": len(costs), "scored_now": now if known else None,
                "read_back": len(costs) - now if known else None,
                "eval_cpu_s": round(sum(c["eval_cpu_s"] for c in costs), 1)}


def random_cell(cell: dict[str, str]) -> bool:
    """Whether a grid cell makes a random choice (random layers or random neurons), so seeds differ."""
    return cell["layers"] == "random" or cell["neurons"] == "random"


def run_grid(teacher: tuple[Any, Any], student: tuple[Any, Any], *,
             scorer: Callable[[Any, str], EvalResult] | BudgetedScorer, families: Sequence[str],
             seeds: Sequence[int] = (0,), extract_limit: int = 32, seeking_rank: int | None = 16,
             progress: bool = True, task_format: str = "pocket-{}", extract: Mapping[str, Sequence[Any]] | None = None,
             cells: Sequence[dict[str, str]] | None = None, modules: Sequence[str] = TRANSFERRED_MODULES,
             root: str | Path | None = None) -> UnalignedRuns:
    """Score the student, the teacher, every grid cell and Seeking without training, per family.

    ``scorer(model, task) -> EvalResult`` scores an in-memory model on the task's test questions
    (the same questions for every model): a :class:`~pktlib.experiments.scoring.BudgetedScorer`
    on the pocket pair, a :class:`pktlib.experiments.real_pair.SavedScorer` on a fetched pair.
    ``task_format`` names a family's task (``"pocket-{}"``: family "math" is task
    "pocket-math"; ``"{}"``: the family is the task, e.g. "gsm8k"). ``extract``: family ->
    examples or (prompt, answer) pairs for the Seeking sensitivity (default: the task's first
    ``extract_limit`` extract examples). One sensitivity pass per family serves the "top"
    layer choice and Seeking. ``cells``: the grid cells to run (default every cell of
    :func:`pktlib.baselines.grid`). ``modules``: the transferred modules (a pair's
    :attr:`pktlib.pairs.Pair.modules`). ``seeking_rank`` None (or 0) adds the full
    sub-matrices. Cells with a random choice (:func:`random_cell`) run once per seed of
    ``seeds``, the others (and Seeking, which has no random choice) once, with a null ``seed``.
    ``progress``: a bar over the models of the run, with the time left.

    ``root``: with a :class:`~pktlib.experiments.scoring.BudgetedScorer`, every scored model's
    score is kept under ``root/<task>`` (:func:`pktlib.experiments.scoring.score_once`, named by the
    hash of the model's weights: the transfers are deterministic, so a rerun builds the same
    models and reads their scores back instead of generating). None keeps nothing. A scorer that
    caches by itself is called directly whatever ``root``. Rows carry ``eval_cpu_s`` (the scoring's
    CPU seconds when it ran; a self-caching scorer's generation wall seconds) and ``scored_now``
    (False: read back; None: unknown, for a self-caching scorer); the student's and teacher's are in
    ``ref_costs``. The sensitivity pass and the transfers run again on a rerun (seconds per family
    on the pocket pair), only the scoring is skipped.

    Memory: Seeking runs first and its sensitivity matrices (one float32 copy of the
    transferred teacher weights) are dropped before anything is scored; the grid cells need
    only the per-layer totals. At most one transferred student exists at a time.
    """
    t_model, t_tok = teacher
    cells = list(cells) if cells is not None else grid()
    tasks = {fam: task_format.format(fam) for fam in families}

    def score(model, task, who=None) -> dict[str, Any]:
        sc = score_once(scorer, None if root is None else Path(root) / task, model, task, who=who)
        bar.update(1)
        return {"score": sc.score, "ci95": list(sc.ci95), "correct": sc.correct, "eval_cpu_s": sc.cpu_s,
                "scored_now": None if sc.from_cache is None else not sc.from_cache}

    n_models = len(families) * (3 + sum(len(seeds) if random_cell(c) else 1 for c in cells))
    t0 = time.perf_counter()
    rows, refs, ref_correct, ref_costs, layer_totals = [], {}, {}, {}, {}
    hidden_maps: dict[str, Any] = {}  # one teacher/student pair: each hidden-size map computed once
    with tqdm(total=n_models, desc="unaligned Pre-Align: models", unit="model", disable=not progress,
              file=sys.stderr, mininterval=10, ncols=100) as bar:
        for fam, task in tasks.items():
            scored = {who: score(m, task, who) for who, m in (("student", student[0]), ("teacher", t_model))}
            refs[fam] = {who: (sc["score"], sc["ci95"]) for who, sc in scored.items()}
            ref_correct[fam] = {who: sc["correct"] for who, sc in scored.items()}
            ref_costs[fam] = {who: {k: sc[k] for k in ("eval_cpu_s", "scored_now")} for who, sc in scored.items()}
            examples = extract[fam] if extract is not None else load_task(task, "extract", limit=extract_limit)
            sens = sensitivity(t_model, t_tok, examples, modules=tuple(modules), progress=False)
            layer_totals[fam] = [float(v) for v in sens.layer_totals]
            model, rec = seeking_transfer(teacher, student, sens, rank=seeking_rank or None, modules=modules,
                                          progress=False)
            sens = Sensitivity(sens.layer_totals, {}, sens.n_examples, ())  # the cells need only the totals
            sc = score(model, task)
            del model
            seek_row = {"family": fam, "layers": "top", "hidden": "seeking", "neurons": "seeking", "seed": None,
                        "score": sc.pop("score"), "ci95": sc.pop("ci95"), "teacher_layers": rec.teacher_layers,
                        "rel_delta": _relative_delta(rec), **sc}
            for cell in cells:
                for sd in (seeds if random_cell(cell) else [None]):
                    model, rec = unaligned_transfer(teacher, student, extract=sens, modules=modules,
                                                    seed=seeds[0] if sd is None else sd, progress=False,
                                                    hidden_maps=hidden_maps, **cell)
                    sc = score(model, task)
                    del model
                    rows.append({"family": fam, **cell, "seed": sd, "score": sc.pop("score"), "ci95": sc.pop("ci95"),
                                 "teacher_layers": rec.teacher_layers, "rel_delta": _relative_delta(rec), **sc})
            rows.append(seek_row)
    return UnalignedRuns(pd.DataFrame(rows), refs, layer_totals, rows, ref_correct, time.perf_counter() - t0, tasks,
                         ref_costs)


def reference_runs(runs: UnalignedRuns, who: str = "student") -> pd.DataFrame:
    """The student's (or teacher's) run per family as a fixed reference: family, score, correct."""
    return pd.DataFrame([{"family": f, "score": runs.refs[f][who][0], "correct": runs.ref_correct[f][who]}
                         for f in runs.refs])


def comparisons(runs: UnalignedRuns) -> pd.DataFrame:
    """Every grid cell and Seeking against the student, per family
    (:func:`pktlib.experiments.verdict.compare_table`: one row per family and cell, each question once)."""
    return compare_table(runs.results, reference_runs(runs), by=["family", "layers", "hidden", "neurons"],
                         on=["family"])


def _grid_only(results: pd.DataFrame) -> pd.DataFrame:
    return results[results.hidden != "seeking"]


def _cell_means(results: pd.DataFrame) -> pd.DataFrame:
    """Mean score over seeds per (family, layers, hidden, neurons)."""
    return results.groupby(["family", "layers", "hidden", "neurons"], as_index=False).score.mean()


def summary_table(runs: UnalignedRuns, families: Sequence[str]) -> pd.DataFrame:
    """Per family: student, teacher, Seeking without training, best and median grid cell (scores; a
    cell's score is its mean over seeds)."""
    res = runs.results
    seek, cells = res[res.hidden == "seeking"], _grid_only(res)
    means = _cell_means(cells)
    return pd.DataFrame({f: {"student": runs.refs[f]["student"][0], "teacher": runs.refs[f]["teacher"][0],
                             "Seeking (no training)": float(seek[seek.family == f].score.iloc[0]),
                             "best grid cell": float(means[means.family == f].score.max()),
                             "median grid cell": float(means[means.family == f].score.median())}
                         for f in families}).round(1)


def scorecard_rows(runs: UnalignedRuns, summary: pd.DataFrame, table: pd.DataFrame, *, pair: str,
                   families: Sequence[str], protocol: str | None = None) -> list[dict[str, Any]]:
    """Scorecard rows: Seeking without training, and the best and worst grid cell (mean over seeds)
    per family, each with its comparison with the student from ``table`` (:func:`comparisons`):
    ``effect``, ``ci`` (over seeds, or over questions with one seed), ``p``, ``seeds``, ``n``.
    ``protocol``: the evaluation protocol of the scores, when not the project's own ("pkt"); the
    scorecard sets the paper's numbers only beside scores of the paper's protocol."""
    extra = {"protocol": protocol} if protocol else {}
    out = []
    for f in families:
        t = table[table.family == f]
        cells = t[t.hidden != "seeking"]
        for method, row in (("seeking-unaligned", t[t.hidden == "seeking"].iloc[0]),
                            ("unaligned-best", cells.loc[cells.gap.idxmax()]),
                            ("unaligned-worst", cells.loc[cells.gap.idxmin()])):
            out.append({"method": method, "task": runs.task(f), "pair": pair,
                        "score": float(runs.refs[f]["student"][0] + row.gap), **scorecard_fields(row), **extra})
    return out


def relative_delta(runs: UnalignedRuns) -> pd.DataFrame:
    """Mean ||delta|| / ||theta_S|| per family (rows) and hidden-size reduction (columns)."""
    return runs.results.groupby(["family", "hidden"]).rel_delta.mean().unstack("hidden")


def grid_matrices(runs: UnalignedRuns, families: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Per family the grid's scores (mean over seeds) as a matrix: rows the layer choice, columns ``"<hidden>\\n<neurons>"``
    and a last column ``"Seeking\\n(top)"`` (Seeking in the "top" row, NaN elsewhere). Rows and
    columns of cells the run left out (``run_grid(cells=...)``) are dropped."""
    out = {}
    for fam in families:
        sub = runs.results[runs.results.family == fam]
        mat = np.full((len(GRID_ROWS), len(GRID_COLUMNS) + 1), np.nan)
        for i, l in enumerate(GRID_ROWS):
            for j, (h, n) in enumerate(GRID_COLUMNS):
                mat[i, j] = sub[(sub.layers == l) & (sub.hidden == h) & (sub.neurons == n)].score.mean()
        mat[0, -1] = sub[sub.hidden == "seeking"].score.iloc[0]
        out[fam] = pd.DataFrame(mat, index=list(GRID_ROWS),
                                columns=[f"{h}\n{n}" for h, n in GRID_COLUMNS] + ["Seeking\n(top)"]
                                ).dropna(how="all").dropna(axis=1, how="all")
    return out


@dataclass
class UnalignedVerdict:
    """Does any grid cell improve on the student? Per family, and the conclusion."""

    per_family: dict[str, dict[str, Any]]
    lines: list[str]
    conclusion: str
    families_with_teacher_gap: list[str]

    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n\n" + self.conclusion


def verdict(runs: UnalignedRuns, table: pd.DataFrame, families: Sequence[str]) -> UnalignedVerdict:
    """Per family: the grid cells above the student, and those better or worse than it by the
    comparison of :func:`comparisons` (``table``: both noises beaten, paired p < 0.05)."""
    per_family, lines = {}, []
    for fam in families:
        base = runs.refs[fam]["student"][0]
        t = table[table.family == fam]
        cells, seek = t[t.hidden != "seeking"], t[t.hidden == "seeking"].iloc[0]
        best = cells.loc[cells.gap.idxmax()]
        better, worse = int((cells.verdict == "better").sum()), int((cells.verdict == "worse").sum())
        per_family[fam] = {"student": base, "cells": len(cells), "cells_above_student": int((cells.gap > 0).sum()),
                           "cells_better": better, "cells_worse": worse,
                           "best_cell": f"{best.layers}/{best.hidden}/{best.neurons}",
                           "best_effect": float(best.gap), "best_p": float(best.p_value),
                           "seeking_effect": float(seek.gap), "seeking_p": float(seek.p_value)}
        lines.append(f"- **{runs.task(fam)}**: student {base:.1f}; {int((cells.gap > 0).sum())} of {len(cells)} cells "
                     f"score above it on average, {better} better and {worse} worse by the paired test; best cell "
                     f"{best.layers}/{best.hidden}/{best.neurons}: {comparison_text(best)}; Seeking without "
                     f"training: {comparison_text(seek)}.")
    n_better = sum(v["cells_better"] for v in per_family.values())
    conclusion = ("No cell of the grid improves on the student in any family by the paired test: adding teacher "
                  "weights without alignment does not transfer knowledge here, as in the paper."
                  if n_better == 0 else
                  f"{n_better} cell(s) improve on the student beyond both noises in this run: unlike the paper, some "
                  "unaligned transfer helps here; see which ones above.")
    gap = families_with_teacher_gap({f: runs.refs[f]["student"][0] for f in families},
                                    {f: runs.refs[f]["teacher"][0] for f in families})
    return UnalignedVerdict(per_family, lines, conclusion if gap else NO_TEACHER_GAP, gap)
