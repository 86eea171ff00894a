"""Selecting layers and neurons from attribution scores (DESIGN.md 4.2): the top layers, the top
neurons within each, and the budget (how many of each) for a teacher/student pair.

Ties go to the lower index everywhere (stable sorts). :mod:`pktlib.attribution` re-exports these
names: attribute, then select.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pktlib.errors import PktError
from pktlib.models import ModelSpec

__all__ = ["Selection", "top_layers", "top_neurons", "select", "layer_budget"]


@dataclass
class Selection:
    """Selected layers (ascending) and, within each, neurons ordered by descending score."""

    ffn_layers: list[int]
    attn_layers: list[int]
    ffn_neurons: Tensor  # (n_sel, k_ffn) long; row j belongs to ffn_layers[j]
    attn_neurons: Tensor  # (n_sel, k_attn) long; row j belongs to attn_layers[j]

    def attn_v_rows(self, model_spec: ModelSpec) -> Tensor:
        """``v_proj`` rows of the selected attention neurons, (n_sel, k_attn) long.

        With grouped-query attention several neurons map to one shared row
        (:meth:`pktlib.models.ModelSpec.v_row`), so rows may repeat within a layer.
        """
        return model_spec.v_row(self.attn_neurons)


def top_layers(layer_scores: Tensor, n: int) -> list[int]:
    """The ``n`` best-scoring layers, returned in ascending layer order (n >= L: all layers).

    Ties go to the lower layer index (stable sort).
    """
    if layer_scores.dim() != 1:
        raise PktError(f"layer_scores must be 1-D (L,), got shape {tuple(layer_scores.shape)}")
    if n < 1:
        raise PktError(f"number of layers must be >= 1, got {n}")
    order = torch.argsort(layer_scores, descending=True, stable=True)
    return sorted(order[:n].tolist())


def top_neurons(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` best neurons, by descending score: (L, N) -> (L, k) or (N,) -> (k,).

    Ties go to the lower neuron index (stable sort).
    """
    if scores.dim() not in (1, 2):
        raise PktError(f"scores must be (N,) or (L, N), got shape {tuple(scores.shape)}")
    N = scores.shape[-1]
    if not 1 <= k <= N:
        raise PktError(f"k={k} neurons requested, but a layer has {N}; need 1 <= k <= {N}")
    return torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]


def select(attribution: Any, *, n_layers: int, k_ffn: int, k_attn: int) -> Selection:
    """Top ``n_layers`` layers (ascending; by FFN and attention layer scores respectively) and the
    top neurons within each of them (DESIGN.md 4.2), from an :class:`~pktlib.attribution.Attribution`."""
    ffn_layers = top_layers(attribution.ffn_layers, n_layers)
    attn_layers = top_layers(attribution.attn_layers, n_layers)
    for kind, chosen, S in (("ffn", ffn_layers, attribution.ffn), ("attn", attn_layers, attribution.attn)):
        unscored = [l for l in chosen if bool(S[l].isnan().any())]
        if unscored:  # attribute(layers=...) left them out: a selection there would rank NaNs
            raise PktError(f"the selection needs {kind} neuron scores in layers {unscored}, which this attribution "
                           f"did not compute (attribute(layers=...)); attribute those layers too")
    return Selection(
        ffn_layers=ffn_layers, attn_layers=attn_layers,
        ffn_neurons=top_neurons(attribution.ffn[ffn_layers], k_ffn),
        attn_neurons=top_neurons(attribution.attn[attn_layers], k_attn),
    )


def layer_budget(teacher_spec: ModelSpec, student_spec: ModelSpec, transfer_rate: float) -> tuple[int, int, int]:
    """``(n_layers, k_ffn, k_attn)`` for a teacher/student pair (DESIGN.md 4.2).

    ``n_layers`` = the student's layer count, or all teacher layers if it has fewer;
    ``k_ffn = floor(transfer_rate * student FFN size)`` and
    ``k_attn = floor(transfer_rate * student n_heads * head_dim)`` (floored like the original
    code's ``int(...)``, and at least 1).
    """
    if not 0 < transfer_rate <= 1:
        raise PktError(f"transfer_rate must be in (0, 1], got {transfer_rate}")
    n_layers = min(student_spec.n_layers, teacher_spec.n_layers)
    # The 1e-9 keeps e.g. 0.1 * 11008 = 1100.8000000000002 and 0.3 * 10 = 3.0000000000000004 exact.
    k_ffn = max(1, math.floor(transfer_rate * student_spec.intermediate_size + 1e-9))
    k_attn = max(1, math.floor(transfer_rate * student_spec.attn_size + 1e-9))
    if k_ffn > teacher_spec.intermediate_size or k_attn > teacher_spec.attn_size:
        raise PktError(f"transfer_rate {transfer_rate} asks for {k_ffn} FFN / {k_attn} attention neurons per layer, "
                       f"but the teacher has {teacher_spec.intermediate_size} / {teacher_spec.attn_size}")
    return n_layers, k_ffn, k_attn
