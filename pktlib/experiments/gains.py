"""Gains over the student (the scorecard chapter): the comparison that transfers across scales.

The paper's claim is about changes relative to the student, so each method's score is set
against the student's on the same task, for the project's records and the paper's Table 1.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from pktlib.dashboard import PAPER_SOURCES, POCKET, gains_from_rows
from pktlib.experiments.paper import TABLE1, _reference
from pktlib.scorecard import ScoreRow

__all__ = ["PROJECT", "PAPER_SOURCE", "gains_over_student"]

PROJECT = "project (pocket pair)"
PAPER_SOURCE = "paper (Llama-2 13B→7B)"


def gains_over_student(rows: Sequence[ScoreRow], reference: str = TABLE1) -> pd.DataFrame:
    """Mean gain (points) of each method over the student, per source and family.

    The gains are :func:`pktlib.dashboard.gains_from_rows`'s, for every method: a project row is
    compared with the student's score on the same task in the same record, else with the mean
    student score on that task for the same pair (tasks without a student score are left out);
    paper rows with the reference's student. The pocket pair's rows are ``PROJECT``, a real
    pair's keep its name. Columns: source, family, method, gain.
    """
    _reference(reference)  # an unknown reference is an error, not an empty comparison
    paper = PAPER_SOURCES.get(reference, reference)
    names = {paper: PAPER_SOURCE, POCKET: PROJECT}
    gains = [{"source": names.get(g.source, g.source), "family": g.family, "method": g.method, "gain": g.gain}
             for g in gains_from_rows(rows, only_paradigms=False)
             if g.source == paper or g.source not in PAPER_SOURCES.values()]
    return pd.DataFrame(gains, columns=["source", "family", "method", "gain"])
