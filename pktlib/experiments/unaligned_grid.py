"""The unaligned Pre-Align grid (paper Section 3, Figure 2, Appendix B), and Seeking without training.

For each task family every cell of :func:`pktlib.baselines.grid` (layer choice x hidden-size
reduction x neuron choice) adds mapped teacher weights to a copy of the student
(:func:`pktlib.baselines.unaligned_transfer`), and Seeking adds its rank-``r`` extracted
sub-matrices (:func:`pktlib.baselines.seeking_transfer`); every model is scored on the same
test questions. :func:`run_grid` returns the tidy table; the other functions summarise it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pktlib.baselines import TransferRecord, grid, seeking_transfer, unaligned_transfer
from pktlib.data import load_task
from pktlib.experiments.scoring import NO_TEACHER_GAP, BudgetedScorer, families_with_teacher_gap
from pktlib.extraction import sensitivity

__all__ = ["UnalignedRuns", "run_grid", "summary_table", "scorecard_rows", "relative_delta", "grid_matrices",
           "UnalignedVerdict", "verdict", "GRID_ROWS", "GRID_COLUMNS"]

GRID_ROWS = ("top", "bottom", "random")  # layer choices
GRID_COLUMNS = tuple((h, n) for h in ("pca", "whitening", "embedding") for n in ("random", "importance"))


def _relative_delta(rec: TransferRecord) -> float:
    """Mean over the changed weights of ||delta||_F / ||theta_S||_F."""
    return float(np.mean([rec.delta_norms[k] / rec.weight_norms[k] for k in rec.changed]))


@dataclass
class UnalignedRuns:
    """Every transferred model of the grid, scored."""

    results: pd.DataFrame  # one row per (family, cell): layers, hidden, neurons, score, ci95, ...
    refs: dict[str, dict[str, tuple[float, list[float]]]]  # family -> role -> (score, 95% interval)
    layer_totals: dict[str, list[float]]  # family -> the teacher's per-layer Seeking sensitivity
    rows: list[dict[str, Any]]

    def metrics(self) -> dict[str, Any]:
        return {"reference_scores": self.refs, "unaligned_grid": self.rows, "layer_totals": self.layer_totals}


def run_grid(teacher: tuple[Any, Any], student: tuple[Any, Any], *, scorer: BudgetedScorer,
             families: Sequence[str], seed: int = 0, extract_limit: int = 32, seeking_rank: int | None = 16,
             progress: bool = True) -> UnalignedRuns:
    """Score the student, the teacher, every grid cell and Seeking without training, per family.

    One Seeking sensitivity pass on the family's first ``extract_limit`` extract examples serves
    the "top" layer choice and Seeking. ``seeking_rank`` None (or 0) adds the full sub-matrices.
    """
    t_model, t_tok = teacher

    def score(model, task) -> tuple[float, list[float]]:
        res = scorer(model, task)
        return res.score, list(res.ci95)

    t0 = time.perf_counter()
    rows, refs, layer_totals = [], {}, {}
    for fam in families:
        task = f"pocket-{fam}"
        refs[fam] = {"student": score(student[0], task), "teacher": score(t_model, task)}
        sens = sensitivity(t_model, t_tok, load_task(task, "extract", limit=extract_limit), progress=False)
        layer_totals[fam] = [float(v) for v in sens.layer_totals]
        for cell in grid():
            model, rec = unaligned_transfer(teacher, student, extract=sens, seed=seed, progress=False, **cell)
            s, ci = score(model, task)
            rows.append({"family": fam, **cell, "score": s, "ci95": ci, "teacher_layers": rec.teacher_layers,
                         "rel_delta": _relative_delta(rec)})
        model, rec = seeking_transfer(teacher, student, sens, rank=seeking_rank or None, progress=False)
        s, ci = score(model, task)
        rows.append({"family": fam, "layers": "top", "hidden": "seeking", "neurons": "seeking", "score": s,
                     "ci95": ci, "teacher_layers": rec.teacher_layers, "rel_delta": _relative_delta(rec)})
        if progress:
            print(f"{task}: {len(grid()) + 1} transferred models scored ({time.perf_counter() - t0:.0f} s so far)")
    return UnalignedRuns(pd.DataFrame(rows), refs, layer_totals, rows)


def _grid_only(results: pd.DataFrame) -> pd.DataFrame:
    return results[results.hidden != "seeking"]


def summary_table(runs: UnalignedRuns, families: Sequence[str]) -> pd.DataFrame:
    """Per family: student, teacher, Seeking without training, best and median grid cell (scores)."""
    res = runs.results
    seek, cells = res[res.hidden == "seeking"], _grid_only(res)
    return pd.DataFrame({f: {"student": runs.refs[f]["student"][0], "teacher": runs.refs[f]["teacher"][0],
                             "Seeking (no training)": float(seek[seek.family == f].score.iloc[0]),
                             "best grid cell": float(cells[cells.family == f].score.max()),
                             "median grid cell": float(cells[cells.family == f].score.median())}
                         for f in families}).round(1)


def scorecard_rows(runs: UnalignedRuns, summary: pd.DataFrame, *, pair: str, families: Sequence[str],
                   n: int) -> list[dict[str, Any]]:
    """Scorecard rows: Seeking without training, and the best and worst grid cell per family."""
    cells = _grid_only(runs.results)
    return [{"method": m, "task": f"pocket-{f}", "pair": pair, "score": float(v), "n": n}
            for f in families for m, v in (
                ("seeking-unaligned", summary.loc["Seeking (no training)", f]),
                ("unaligned-best", cells[cells.family == f].score.max()),
                ("unaligned-worst", cells[cells.family == f].score.min()))]


def relative_delta(runs: UnalignedRuns) -> pd.DataFrame:
    """Mean ||delta|| / ||theta_S|| per family (rows) and hidden-size reduction (columns)."""
    return runs.results.groupby(["family", "hidden"]).rel_delta.mean().unstack("hidden")


def grid_matrices(runs: UnalignedRuns, families: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Per family the grid's scores as a matrix: rows the layer choice, columns ``"<hidden>\\n<neurons>"``
    and a last column ``"Seeking\\n(top)"`` (Seeking in the "top" row, NaN elsewhere)."""
    out = {}
    for fam in families:
        sub = runs.results[runs.results.family == fam]
        mat = np.full((len(GRID_ROWS), len(GRID_COLUMNS) + 1), np.nan)
        for i, l in enumerate(GRID_ROWS):
            for j, (h, n) in enumerate(GRID_COLUMNS):
                mat[i, j] = sub[(sub.layers == l) & (sub.hidden == h) & (sub.neurons == n)].score.iloc[0]
        mat[0, -1] = sub[sub.hidden == "seeking"].score.iloc[0]
        out[fam] = pd.DataFrame(mat, index=list(GRID_ROWS),
                                columns=[f"{h}\n{n}" for h, n in GRID_COLUMNS] + ["Seeking\n(top)"])
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


def verdict(runs: UnalignedRuns, families: Sequence[str]) -> UnalignedVerdict:
    """Count the grid cells above the student, and those whose 95% interval lies above the student's."""
    per_family, lines = {}, []
    for fam in families:
        base, lo_hi = runs.refs[fam]["student"]
        res = runs.results
        sub = _grid_only(res[res.family == fam])
        above = sub[sub.score > base]
        clearly = sub[sub.ci95.map(lambda c: c[0]) > lo_hi[1]]
        seek = res[(res.family == fam) & (res.hidden == "seeking")].iloc[0]
        best = sub.loc[sub.score.idxmax()]
        per_family[fam] = {"student": base, "cells": len(sub), "cells_above_student": len(above),
                           "cells_clearly_above_student": len(clearly),
                           "best_cell": f"{best.layers}/{best.hidden}/{best.neurons}",
                           "best_score": float(best.score), "seeking": float(seek.score)}
        lines.append(f"- **pocket-{fam}**: student {base:.1f}; {len(above)} of {len(sub)} cells score above it "
                     f"({len(clearly)} with non-overlapping 95% intervals); best cell {best.layers}/{best.hidden}/"
                     f"{best.neurons} at {best.score:.1f}; Seeking without training {seek.score:.1f}.")
    n_clear = sum(v["cells_clearly_above_student"] for v in per_family.values())
    conclusion = ("No cell of the grid clearly improves on the student in any family: adding teacher weights "
                  "without alignment does not transfer knowledge here, as in the paper."
                  if n_clear == 0 else
                  f"{n_clear} cell(s) clearly improve on the student in this run: unlike the paper, some unaligned "
                  "transfer helps here; see which ones above.")
    gap = families_with_teacher_gap({f: runs.refs[f]["student"][0] for f in families},
                                    {f: runs.refs[f]["teacher"][0] for f in families})
    return UnalignedVerdict(per_family, lines, conclusion if gap else NO_TEACHER_GAP, gap)
