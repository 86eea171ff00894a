"""Model pairs and task data at a glance (the "Models and tasks" and pocket-pair chapters)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from pktlib import data
from pktlib.models import ModelSpec

__all__ = ["DIMENSIONS", "dimension_ratios", "pair_ratios", "split_sizes"]

DIMENSIONS = ("n_layers", "hidden_size", "intermediate_size")  # the three a cross-scale transfer must bridge


def dimension_ratios(teacher: ModelSpec, student: ModelSpec) -> dict[str, float]:
    """Teacher / student ratio of depth, hidden size and FFN size."""
    return {k: getattr(teacher, k) / getattr(student, k) for k in DIMENSIONS}


def pair_ratios(specs: dict[str, ModelSpec], pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """One row per ``(teacher, student)`` name pair of ``specs``: columns layers, hidden, ffn."""
    names = dict(zip(DIMENSIONS, ("layers", "hidden", "ffn")))
    return pd.DataFrame([{"pair": f"{t} -> {s}", **{names[k]: v for k, v in dimension_ratios(specs[t], specs[s]).items()}}
                         for t, s in pairs]).set_index("pair")


def split_sizes(tasks: Sequence[str], splits: Sequence[str]) -> pd.DataFrame:
    """Examples per task (rows) and split (columns)."""
    return pd.DataFrame({t: {s: len(data.load_task(t, s)) for s in splits} for t in tasks}).T[list(splits)]
