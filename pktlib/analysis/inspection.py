"""Inspecting neurons: which tokens a neuron's value vector promotes, which neurons carried an answer
(paper Figure 5), read through the logit lens of :mod:`pktlib.lens` from a model and an
:class:`~pktlib.attribution.Attribution`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pktlib.attribution import Attribution, check_kind
from pktlib.errors import PktError
from pktlib.lens import LogitLens
from pktlib.models import VALUE_MODULES, spec

__all__ = ["top_tokens", "carriers", "carrier_table"]


@torch.no_grad()
def top_tokens(model: nn.Module, tokenizer, layer: int, kind: str, index: int | Sequence[int], k: int = 10,
               ) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
    """Tokens a neuron's value vector promotes through the logit lens (paper Figure 5).

    The value vector is column ``index`` of ``down_proj`` (``kind="ffn"``) or of ``o_proj``
    (``kind="attn"``), scaled by the final norm's weight and unembedded: ``E (g * w)``. Returns
    ``[(token, logit), ...]`` by descending logit, or one such list per index if ``index`` is a
    sequence.
    """
    check_kind(kind)
    s = spec(model)
    n = s.n_neurons(kind)
    idx = [index] if isinstance(index, int) else list(index)
    bad = [i for i in idx if not 0 <= int(i) < n]
    if bad:
        raise PktError(f"{kind} neuron index {bad[:5]} out of range: layer {layer} has {n} {kind} neurons")
    lens = LogitLens.of(model, s)
    W = s.weight(model, layer, VALUE_MODULES[kind]).detach()  # (d, N)
    U = lens.directions(W[:, torch.tensor(idx, dtype=torch.long, device=W.device)])  # (V, n_idx)
    k = min(k, U.shape[0])
    vals, ids = U.topk(k, dim=0)  # (k, n_idx)
    out = [[(tokenizer.decode([int(ids[r, c])]), float(vals[r, c])) for r in range(k)] for c in range(len(idx))]
    return out[0] if isinstance(index, int) else out


def carriers(attribution: Attribution, example: int | None = None, *, kind: str = "ffn", k: int = 10,
             layers: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """Which neurons carried an answer: the ``k`` best ``(layer, neuron, score)`` over the scored
    layers (or ``layers``), for one example's scores (``per_example=True``) or the summed scores.

    Raises :class:`PktError` for a layer whose neuron scores were not computed (``attribute(layers=...)``).
    """
    S = attribution.scores(kind, example=example)  # (L, N)
    scored = attribution.scored_layers(kind)
    ls = scored if layers is None else [int(l) for l in layers]
    missing = sorted(set(ls) - set(scored))
    if missing:
        raise PktError(f"no {kind} neuron scores in layers {missing}: this attribution scored layers {scored}")
    sub = S[ls]
    k = min(k, sub.numel())
    vals, flat = sub.flatten().topk(k)
    N = sub.shape[1]
    return [(ls[int(f) // N], int(f) % N, float(v)) for f, v in zip(flat, vals)]


def carrier_table(model: nn.Module, tokenizer, attribution: Attribution, example: int | None = None, *,
                  kind: str = "ffn", k: int = 10, n_tokens: int = 5,
                  layers: Sequence[int] | None = None) -> list[dict[str, object]]:
    """:func:`carriers` with each neuron's top tokens: rows of layer, neuron, score, tokens."""
    rows = []
    for l, j, sc in carriers(attribution, example, kind=kind, k=k, layers=layers):
        toks = top_tokens(model, tokenizer, l, kind, j, k=n_tokens)
        rows.append({"layer": l, "neuron": j, "score": sc, "tokens": " | ".join(repr(t)[1:-1] for t, _ in toks)})
    return rows
