"""Extracting teacher parameters for LaTen: a model's weights sliced by selected layers and neurons.

DESIGN.md 4.3: the up/down/v/o weights of the selected neurons (rows of up_proj/v_proj, columns
of down_proj/o_proj, per :data:`pktlib.models.MODULES`) of the selected layers, stacked; the
grouped-query rule for v_proj rows comes from ``ModelSpec.v_row``. Seeking's extraction (whole
sub-matrices chosen by sensitivity) is :mod:`pktlib.seeking`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pktlib.errors import PktError
from pktlib.models import MODULES, NEURON_MODULES, TRANSFERRED_MODULES, ModelSpec, spec

__all__ = ["NeuronSlice", "weight_index", "slice_neurons"]


@dataclass
class NeuronSlice:
    """Weights of selected neurons in selected layers, one stacked tensor per module.

    ``weights[m]`` is ``[L_sel, k, d]`` for row modules (up_proj, v_proj) and ``[L_sel, d, k]``
    for column modules (down_proj, o_proj), ``d`` the model's hidden size. Neuron ``i`` of
    layer ``j`` is the ``i``-th ranked neuron of the ``j``-th selected layer (layers ascending).
    """

    weights: dict[str, torch.Tensor]
    ffn_layers: list[int]
    attn_layers: list[int]
    ffn_neurons: torch.Tensor  # (L_sel, k_ffn) long
    attn_neurons: torch.Tensor  # (L_sel, k_attn) long
    hidden_size: int
    meta: dict[str, Any] = field(default_factory=dict)

    def layers(self, module: str) -> list[int]:
        return self.ffn_layers if MODULES[module].neuron == "ffn" else self.attn_layers

    def neurons(self, module: str) -> torch.Tensor:
        return self.ffn_neurons if MODULES[module].neuron == "ffn" else self.attn_neurons

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(w.shape) for m, w in self.weights.items()}


def weight_index(spec: ModelSpec, module: str, neurons: torch.Tensor) -> torch.Tensor:
    """Indices along the neuron axis of ``module``'s weight for ``neurons`` (same shape).

    Only v_proj differs from the identity: with grouped-query attention attention neuron ``j``
    reads value row ``spec.v_row(j)``, so several neurons may map to one row (DESIGN.md 4.1).
    """
    if module not in NEURON_MODULES:
        raise PktError(f"module {module!r} has no neurons to index; expected one of {sorted(NEURON_MODULES)}")
    return spec.v_row(neurons) if module == "v_proj" else neurons


def _check_selection(spec: ModelSpec, sel: Any) -> None:
    for kind, layers, neurons in (("ffn", sel.ffn_layers, sel.ffn_neurons), ("attn", sel.attn_layers, sel.attn_neurons)):
        if neurons.dim() != 2 or neurons.shape[0] != len(layers):
            raise PktError(f"selection: {kind}_neurons has shape {tuple(neurons.shape)}; "
                            f"expected ({len(layers)}, k) for {kind}_layers={list(layers)}")
        bad = [l for l in layers if not 0 <= l < spec.n_layers]
        if bad:
            raise PktError(f"selection: {kind} layers {bad} out of range for a {spec.n_layers}-layer model")
        n = spec.n_neurons(kind)
        if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= n):
            raise PktError(f"selection: {kind} neuron indices span [{int(neurons.min())}, {int(neurons.max())}]; "
                            f"the model has {n} {kind} neurons per layer")


def slice_neurons(model: torch.nn.Module, selection: Any, *, modules: tuple[str, ...] = TRANSFERRED_MODULES,
                  dtype: torch.dtype | None = None) -> NeuronSlice:
    """Slice ``model``'s weights by a selection (``pktlib.attribution.Selection`` or alike).

    ``selection`` has ``ffn_layers``/``attn_layers`` (lists, ascending) and ``ffn_neurons``
    ``(L_sel, k_ffn)`` / ``attn_neurons`` ``(L_sel, k_attn)`` (ranked neuron ids per layer).
    Returns detached copies (the teacher is never trained), cast to ``dtype`` if given.
    """
    s = spec(model)
    _check_selection(s, selection)
    ffn_neurons = torch.as_tensor(selection.ffn_neurons, dtype=torch.long)
    attn_neurons = torch.as_tensor(selection.attn_neurons, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        if m not in NEURON_MODULES:
            raise PktError(f"cannot slice module {m!r} by neurons; expected some of {sorted(NEURON_MODULES)}")
        kind, axis = MODULES[m].neuron, MODULES[m].neuron_axis
        layers = list(selection.ffn_layers if kind == "ffn" else selection.attn_layers)
        neurons = ffn_neurons if kind == "ffn" else attn_neurons
        parts = []
        for j, l in enumerate(layers):
            w = s.weight(model, l, m).detach()  # (out, in)
            idx = weight_index(s, m, neurons[j]).to(w.device)
            parts.append(w.index_select(axis, idx))  # (k, d) for rows, (d, k) for columns
        if parts:
            t = torch.stack(parts)
        else:  # no selected layer: keep the rank so shapes still say which axis is which
            t = torch.empty((0, 0, s.hidden_size) if axis == 0 else (0, s.hidden_size, 0))
        out[m] = t.to(dtype) if dtype is not None else t.clone()
    return NeuronSlice(out, list(selection.ffn_layers), list(selection.attn_layers), ffn_neurons.cpu(),
                       attn_neurons.cpu(), s.hidden_size)
