"""Gains over the student (the scorecard chapter): the comparison that transfers across scales.

The paper's claim is about changes relative to the student, so each method's score is set
against the student's on the same task, for the project's records and the paper's Table 1.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from pktlib.experiments.paper import TABLE1
from pktlib.scorecard import FAMILY_OF_TASK, PAPER, ScoreRow

__all__ = ["PROJECT", "PAPER_SOURCE", "gains_over_student"]

PROJECT = "project (pocket pair)"
PAPER_SOURCE = "paper (Llama-2 13B→7B)"


def gains_over_student(rows: Sequence[ScoreRow], reference: str = TABLE1) -> pd.DataFrame:
    """Mean gain (points) of each method over the student, per source and family.

    Project rows are compared with the mean student score on the same task (tasks without a
    student score are left out); paper rows with the reference's student. Columns: source,
    family, method, gain.
    """
    gains = []
    proj = pd.DataFrame([{"method": r.method, "task": r.task, "score": r.score} for r in rows],
                        columns=["method", "task", "score"])
    for task, g in proj.groupby("task"):
        base = g[g.method == "student"].score
        if len(base):
            gains += [{"source": PROJECT, "family": FAMILY_OF_TASK.get(task, task), "method": r.method,
                       "gain": r.score - base.mean()} for _, r in g.iterrows()]
    paper = PAPER[reference]
    gains += [{"source": PAPER_SOURCE, "family": FAMILY_OF_TASK[task], "method": m,
               "gain": s - paper["student"][task]} for m, scores in paper.items() for task, s in scores.items()]
    return pd.DataFrame(gains).groupby(["source", "family", "method"], as_index=False).gain.mean()
