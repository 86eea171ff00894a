"""Parametric structural similarity (paper Figure 4): how a LoRA init's ``B A`` relates to its weight.

:func:`pktlib.similarity.structural_similarity` gives, per layer and module of one LoRA model,
the cosine of ``B A`` with the original weight and with the residual base weight; this module
compares initialisations (PiSSA, Seeking) with those tables.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd
from torch import nn

from pktlib import similarity

__all__ = ["COSINES", "structural_table", "structural_summary", "reading"]

COSINES = {"cos_ba_w": "cos(BA, W)", "cos_ba_residual": "cos(BA, W - BA)"}


def structural_table(models: Mapping[str, nn.Module]) -> pd.DataFrame:
    """The :func:`~pktlib.similarity.structural_similarity` rows of every LoRA model, with an ``init`` column."""
    return pd.concat([similarity.structural_similarity(m).assign(init=name) for name, m in models.items()],
                     ignore_index=True)


def structural_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean cosines per module (rows) and (cosine, init) (columns)."""
    return table.groupby(["init", "module"])[list(COSINES)].mean().unstack("init")


def reading(table: pd.DataFrame, inits: tuple[str, str] = ("PiSSA", "Seeking")) -> str:
    """The cosines averaged over layers and modules, for two initialisations (Markdown)."""
    mean = table.groupby("init")[list(COSINES)].mean()
    a, b = inits
    return (f"Averaged over layers and modules, {a}'s product has cosine {mean.loc[a, 'cos_ba_w']:.3f} with the "
            f"original weight and {mean.loc[a, 'cos_ba_residual']:.1e} with the residual; {b}'s has "
            f"{mean.loc[b, 'cos_ba_w']:.3f} with the original weight and {mean.loc[b, 'cos_ba_residual']:.3f} "
            "with the residual.")
