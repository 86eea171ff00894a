"""Ethological similarity (paper Section 5, Figure 3): layer-by-layer CKA of teacher and student.

:func:`module_cka` computes, per module type, the linear CKA of every teacher layer with every
student layer and of the teacher with itself (the sanity check: its diagonal is 1), and
summarises each grid in one row (:func:`summary_row`); :func:`reading` turns the summary into
the chapter's paragraph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pktlib.errors import PktError
from pktlib.analysis.cka import cka_grid, module_representations

__all__ = ["aligned_teacher_layer", "summary_row", "ModuleCKA", "module_cka", "reading"]


def aligned_teacher_layer(j: int, n_teacher: int, n_student: int) -> int:
    """The teacher layer at the same relative depth as student layer ``j`` (layer centres matched)."""
    if not 0 <= j < n_student:
        raise PktError(f"student layer {j} out of range for {n_student} layers")
    return min(n_teacher - 1, int(round((j + 0.5) * n_teacher / n_student - 0.5)))


def summary_row(teacher_student: Tensor, teacher_teacher: Tensor) -> dict[str, float]:
    """One module's CKA grids in numbers: (L_T, L_S) teacher-student and (L_T, L_T) teacher-teacher.

    Same relative depth uses :func:`aligned_teacher_layer`; halves split the student's layers at
    ``L_S // 2`` (a one-layer student's lower half is its only layer).
    """
    n_t, n_s = teacher_student.shape
    aligned = [float(teacher_student[aligned_teacher_layer(j, n_t, n_s), j]) for j in range(n_s)]
    off = teacher_teacher[~torch.eye(n_t, dtype=torch.bool)]
    return {
        "teacher-student mean": float(teacher_student.mean()),
        "same relative depth (mean)": float(np.mean(aligned)),
        "same depth, lower half": float(np.mean(aligned[: max(1, n_s // 2)])),
        "same depth, upper half": float(np.mean(aligned[n_s // 2:])),
        "best teacher match (mean over student layers)": float(teacher_student.max(0).values.mean()),
        "teacher-teacher diagonal (min)": float(torch.diagonal(teacher_teacher).min()),
        "teacher-teacher off-diagonal (mean)": float(off.mean()) if off.numel() else float("nan"),
    }


@dataclass
class ModuleCKA:
    teacher_student: dict[str, Tensor]  # module -> (L_T, L_S)
    teacher_teacher: dict[str, Tensor]  # module -> (L_T, L_T)
    summary: pd.DataFrame  # one row per module (:func:`summary_row`)


def module_cka(teacher: tuple, student: tuple, texts: Sequence[str], modules: Sequence[str], *,
               batch_size: int = 16, unbiased: bool = False) -> ModuleCKA:
    """Linear CKA grids of ``(model, tokenizer)`` teacher and student for each module type."""
    ts_grids, tt_grids, rows = {}, {}, []
    reps_t = module_representations(*teacher, texts, modules, batch_size=batch_size)  # module -> (L_T, n, d)
    reps_s = module_representations(*student, texts, modules, batch_size=batch_size)  # module -> (L_S, n, d)
    for m in modules:
        rt, rs = reps_t[m], reps_s[m]
        ts_grids[m] = cka_grid(list(rt), list(rs), unbiased=unbiased)  # (L_T, L_S)
        tt_grids[m] = cka_grid(list(rt), list(rt), unbiased=unbiased)  # (L_T, L_T)
        rows.append({"module": m, **summary_row(ts_grids[m], tt_grids[m])})
    return ModuleCKA(ts_grids, tt_grids, pd.DataFrame(rows).set_index("module"))


def reading(summary: pd.DataFrame) -> str:
    """The summary as Markdown: per module the same-depth and best-match CKA, then the extremes."""
    lines = []
    for m in summary.index:
        r = summary.loc[m]
        lines.append(
            f"* **{m}**: at the same relative depth the teacher and student reach a mean CKA of "
            f"{r['same relative depth (mean)']:.2f} ({r['same depth, lower half']:.2f} in the student's lower half, "
            f"{r['same depth, upper half']:.2f} in its upper half); the best-matching teacher layer gives "
            f"{r['best teacher match (mean over student layers)']:.2f} on average, against "
            f"{r['teacher-teacher off-diagonal (mean)']:.2f} between *different* layers of the teacher itself.")
    same = summary["same relative depth (mean)"]
    lines.append(f"\nThe least similar module type is **{same.idxmin()}**, the most similar **{same.idxmax()}**. "
                 f"The sanity diagonal is {summary['teacher-teacher diagonal (min)'].min():.6f} at its lowest "
                 "(exactly 1 up to rounding).")
    return "\n".join(lines)
