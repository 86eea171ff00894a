"""What logit-lens attribution locates (the attribution chapter): depth, sparsity, stability.

Every function takes :class:`pktlib.attribution.Attribution` results (``per_example=True`` where
per-example scores are needed) and returns plain numbers or tables:

* :func:`layer_profiles` and :func:`layer_summary`: where along the depth the answer is built;
* :func:`top_share`: how concentrated the neuron scores are;
* :func:`stability`: how much the top-k neurons of a layer change from one example to the next
  (LaTen locates on *one* example), against chance;
* :func:`normaliser_agreement`: the definition's normaliser against the original code's;
* :func:`explore` and :func:`explorer`: which neurons carried one example's answer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pktlib import attribution as A
from pktlib.errors import PktError

__all__ = ["KIND_LABELS", "attribute_families", "layer_profiles", "depth_share", "layer_summary", "upper_half_reading", "top_share",
           "Stability", "stability", "stability_metrics", "stability_table", "target_tokens",
           "normaliser_agreement"]

KIND_LABELS = {"ffn": "FFN", "attn": "attention"}
Attributions = Mapping[tuple[str, str], A.Attribution]  # (family, role) -> attribution


def attribute_families(models: Mapping[str, tuple[Any, Any]], pairs: Mapping[str, Sequence[tuple[str, str]]], *,
                       n_layers: int | None = None, seconds: dict[str, float] | None = None,
                       ) -> dict[tuple[str, str], A.Attribution]:
    """Per-example attribution of every (family, role): ``models`` role -> (model, tokenizer),
    ``pairs`` family -> (prompt, answer) pairs.

    ``n_layers``: neuron scores only in that many best FFN layers per (family, role)
    (:func:`pktlib.attribution.locate_layers`; what a 152k vocabulary affords on a CPU), layer
    scores everywhere. ``seconds``, if given, receives each ``"family/role"``'s wall time.
    """
    out = {}
    for fam in pairs:
        for role, (model, tok) in models.items():
            t0 = time.perf_counter()
            if n_layers is None:
                out[fam, role] = A.attribute(model, tok, pairs[fam], per_example=True, progress=False)
            else:
                out[fam, role] = A.locate_layers(model, tok, pairs[fam], n_layers, per_example=True, progress=False)
            if seconds is not None:
                seconds[f"{fam}/{role}"] = time.perf_counter() - t0
    return out


def layer_profiles(attr: Attributions) -> dict[str, dict[str, list[float]]]:
    """``{"family/role": {"ffn": [...], "attn": [...]}}``: layer scores per example (summed / E)."""
    return {f"{fam}/{role}": {"ffn": (a.ffn_layers / a.n_examples).tolist(),
                              "attn": (a.attn_layers / a.n_examples).tolist()} for (fam, role), a in attr.items()}


def depth_share(layer_scores: Tensor) -> float:
    """Share of the positive layer-score mass in the upper half of the layers (``L // 2`` onwards).

    NaN for a one-layer model (it has no upper half) or when no layer scores above zero.
    """
    s = layer_scores.clamp_min(0)
    L = len(s)
    if L < 2 or s.sum() <= 0:
        return float("nan")
    return float(s[L // 2:].sum() / s.sum())


def layer_summary(attr: Attributions) -> list[dict[str, Any]]:
    """Per (family, model): best layers, upper-half mass of FFN and attention, FFN / attention total."""
    return [{"family": fam, "model": role,
             "best FFN layer": int(a.ffn_layers.argmax()), "best attention layer": int(a.attn_layers.argmax()),
             "FFN mass in upper half": depth_share(a.ffn_layers),
             "attention mass in upper half": depth_share(a.attn_layers),
             "FFN total / attention total": float(a.ffn_layers.sum() / a.attn_layers.sum().abs().clamp_min(1e-9))}
            for (fam, role), a in attr.items()]


def upper_half_reading(summary: pd.DataFrame, roles: Sequence[str]) -> str:
    """One sentence per model: its mean (over families) FFN upper-half share against the paper."""
    parts = []
    for role in roles:
        share = summary[summary.model == role]["FFN mass in upper half"].mean()
        if np.isfinite(share):
            verdict = ("concentrated in the upper half, as in the paper" if share > 0.5
                       else "not concentrated in the upper half, unlike the paper")
            parts.append(f"{share:.0%} of the {role}'s positive FFN layer score lies in the upper half of its "
                         f"layers ({verdict})")
        else:
            parts.append(f"the {role} has a single layer, so it has no upper half")
    return "Averaged over the families, " + "; ".join(parts) + "."


def top_share(scores: Tensor, frac: float = 0.01) -> float:
    """Share of the positive score mass held by the top ``frac`` of neurons (all layers pooled).

    At least one neuron is counted; NaN when no neuron scores above zero.
    """
    s = scores.flatten().clamp_min(0)
    n = max(1, int(frac * s.numel()))
    return float(s.topk(n).values.sum() / s.sum()) if s.sum() > 0 else float("nan")


@dataclass
class Stability:
    """Per layer: mean top-k Jaccard over pairs of examples, and recall of the summed top-k."""

    jaccard: Tensor  # (L,)
    recall_of_summed_topk: Tensor  # (L,) share of an example's top-k in the summed scores' top-k
    chance: float  # expected Jaccard of two random k-subsets of N neurons, k / (2N - k)
    k: int  # the k used (min(k, N))


def stability(a: A.Attribution, kind: str, k: int) -> Stability:
    """How stable each layer's top-``k`` neurons are across the examples of ``a``.

    For every layer, each example's top-k set; the Jaccard index averaged over all pairs of
    examples, and the share of each example's top-k found in the top-k of the summed scores.
    Needs per-example scores and at least two examples.
    """
    per = a.ffn_per_example if kind == "ffn" else a.attn_per_example  # (E, L, N)
    if per is None:
        raise PktError("stability needs per-example scores: attribute(..., per_example=True)")
    E, L, N = per.shape
    if E < 2:
        raise PktError(f"stability compares pairs of examples; the attribution has {E}")
    kk = min(k, N)
    top = A.top_neurons(per.reshape(E * L, N), kk).reshape(E, L, kk)
    summed = A.top_neurons(per.sum(0), kk)  # (L, k)
    onehot = torch.zeros(E, L, N, dtype=torch.bool).scatter_(2, top, True)
    inter = (onehot[:, None] & onehot[None]).sum(-1).float()  # (E, E, L)
    jac = inter / (2 * kk - inter)
    iu = torch.triu_indices(E, E, 1)
    pair_mean = jac[iu[0], iu[1]].mean(0)  # (L,)
    ref = torch.zeros(L, N, dtype=torch.bool).scatter_(1, summed, True)
    recall = (onehot & ref[None]).sum(-1).float().mean(0) / kk  # (L,)
    return Stability(pair_mean, recall, kk / (2 * N - kk), kk)


def stability_metrics(attr: Mapping[str, A.Attribution], k: int) -> dict[str, dict[str, Any]]:
    """``{"role/kind": {"jaccard": [...], "recall_of_summed_topk": [...], "chance": c}}`` per role."""
    out = {}
    for role, a in attr.items():
        for kind in KIND_LABELS:
            s = stability(a, kind, k)
            out[f"{role}/{kind}"] = {"jaccard": s.jaccard.tolist(), "recall_of_summed_topk": s.recall_of_summed_topk.tolist(),
                                     "chance": s.chance}
    return out


def stability_table(stab: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Means over layers of :func:`stability_metrics`, chance, and the Jaccard as a multiple of chance."""
    return pd.DataFrame({key: {"mean Jaccard": np.mean(v["jaccard"]), "chance": v["chance"],
                               "mean overlap with summed top-k": np.mean(v["recall_of_summed_topk"]),
                               "x chance": np.mean(v["jaccard"]) / v["chance"]}
                         for key, v in stab.items()}).T


def target_tokens(attr: Mapping[str, A.Attribution], tokenizer, n: int = 5) -> dict[str, dict[str, int]]:
    """Per family, the ``n`` most frequent attributed target tokens and their counts."""
    return {fam: pd.Series([tokenizer.decode([int(i)]) for i in a.targets]).value_counts().head(n).to_dict()
            for fam, a in attr.items()}


def normaliser_agreement(reference: A.Attribution, original: A.Attribution, *, k: int,
                         n_layers: int) -> dict[str, Any]:
    """Top-``k`` Jaccard per layer between two attributions of one model (FFN and attention), and
    whether they select the same ``n_layers`` FFN layers."""
    agree: dict[str, Any] = {}
    for kind in KIND_LABELS:
        a_top, b_top = A.top_neurons(reference.scores(kind), k), A.top_neurons(original.scores(kind), k)
        agree[kind] = [len(set(x.tolist()) & set(y.tolist())) / len(set(x.tolist()) | set(y.tolist()))
                       for x, y in zip(a_top, b_top)]
    agree["same_top_layers"] = (A.top_layers(reference.ffn_layers, n_layers)
                                == A.top_layers(original.ffn_layers, n_layers))
    return agree
