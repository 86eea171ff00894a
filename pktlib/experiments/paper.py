"""The paper's numbers as the chapters show them, read from :data:`pktlib.scorecard.PAPER` (one source)."""
from __future__ import annotations

from typing import Hashable, Mapping

import pandas as pd

from pktlib.errors import PktError
from pktlib.scorecard import PAPER

__all__ = ["TABLE1", "TASK_LABELS", "paper_table", "paper_gap"]

TABLE1 = "Llama-2-13b-chat -> Llama-2-7b-chat (Table 1)"
TASK_LABELS = {"mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval", "mbpp": "MBPP"}


def _reference(reference: str) -> dict[str, dict[str, float]]:
    if reference not in PAPER:
        raise PktError(f"unknown paper reference {reference!r}; known: {', '.join(PAPER)}")
    return PAPER[reference]


def paper_table(columns: Mapping[Hashable, str], reference: str = TABLE1) -> pd.DataFrame:
    """The paper's scores of the methods ``columns`` maps to (column label -> scorecard method id).

    Rows are the reference's tasks by their paper names (MMLU, GSM8K, ...). Raises PktError for a
    method the reference does not report.
    """
    ref = _reference(reference)
    missing = [m for m in columns.values() if m not in ref]
    if missing:
        raise PktError(f"{reference} has no scores for {missing}; it reports {', '.join(ref)}")
    tasks = list(ref["student"])
    return pd.DataFrame({col: [ref[m][t] for t in tasks] for col, m in columns.items()},
                        index=[TASK_LABELS.get(t, t) for t in tasks])


def paper_gap(reference: str = TABLE1) -> dict[str, float]:
    """Teacher minus student per task (points, 2 decimals): the gap a transfer could close."""
    ref = _reference(reference)
    return {TASK_LABELS.get(t, t): round(ref["teacher"][t] - ref["student"][t], 2) for t in ref["student"]}
