"""Adding weight deltas to a model: neuron-level ones functionally (training) or permanently
(inference), and whole matrices (:func:`apply_deltas`).

LaTen (DESIGN.md 4.3) adds the translated teacher weights of the ``i``-th ranked teacher neuron
of the ``j``-th selected teacher layer to the ``i``-th ranked student neuron of the ``j``-th
selected student layer. A delta is therefore "these values, added to these rows (up_proj,
v_proj) or columns (down_proj, o_proj) of this layer's weight".

* Training: :func:`forward_injected` runs the model through ``torch.func.functional_call``
  with ``W + delta`` in place of the affected weights. The model's own parameters are never
  written to, so gradients flow only into whatever produced the delta values (the translator);
  no modelling code is forked. Cost: each touched weight is materialised once more for the
  forward/backward (see :func:`pktlib.laten.memory_estimate`).
* Inference: :func:`inject_` adds the deltas in place (under ``no_grad``) and returns a
  :class:`ChangeRecord` naming exactly which (layer, module, row/column) entries changed.

Grouped-query attention. With ``n_kv_heads < n_heads`` several attention neurons (columns of
o_proj) share one value row of v_proj (:meth:`pktlib.models.ModelSpec.v_row`). If two of the
selected student neurons share a value row, their v_proj deltas meet in that row. The rule is
one argument, ``gqa_rule``:

* ``"sum"`` (default): the deltas accumulate, as ``index_add`` does: exactly what adding each
  neuron's delta in turn gives, so the result does not depend on the order of the neurons;
* ``"mean"``: the shared row gets the average of its neurons' deltas, which keeps its
  magnitude at that of a single neuron's delta.

(The original code writes ``delta[rows] += value`` with advanced indexing, where a repeated
row keeps only one of the values; neither rule above reproduces that arbitrary choice.)

Whole matrices: the unaligned baselines, Seeking without training and the delta analyses add a
full ``(out, in)`` delta to a weight; :func:`apply_deltas` does that on a copy of the model.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from pktlib.errors import PktError
from pktlib.extraction import weight_index
from pktlib.models import MODULES, ModelSpec, spec

__all__ = ["GQA_RULES", "NeuronDelta", "ChangeRecord", "pair_deltas", "add_delta", "injected_weights",
           "forward_injected", "inject_", "apply_deltas"]

GQA_RULES = ("sum", "mean")


@dataclass
class NeuronDelta:
    """Values to add to neurons of one module in one layer.

    ``value`` is ``(k, d)`` for row modules (up_proj, v_proj) and ``(d, k)`` for column modules
    (down_proj, o_proj); ``neurons`` ``(k,)`` are neuron ids (for v_proj: attention neurons,
    mapped to value rows by the grouped-query rule).
    """

    layer: int
    module: str
    neurons: torch.Tensor  # (k,) long
    value: torch.Tensor  # (k, d) or (d, k)

    @property
    def axis(self) -> int:
        return MODULES[self.module].neuron_axis


def pair_deltas(translated: Mapping[str, torch.Tensor], student_selection: Any) -> list[NeuronDelta]:
    """Pair translated teacher weights with the student's selected layers and ranked neurons.

    ``translated[m]`` is ``(L_sel, k, d_S)`` (rows) or ``(L_sel, d_S, k)`` (columns); its
    ``j``-th layer goes to ``student_selection``'s ``j``-th layer of the same kind, its ``i``-th
    neuron to the ``i``-th ranked student neuron there.
    """
    out = []
    for m, t in translated.items():
        kind = MODULES[m].neuron
        layers = list(student_selection.ffn_layers if kind == "ffn" else student_selection.attn_layers)
        neurons = torch.as_tensor(student_selection.ffn_neurons if kind == "ffn" else student_selection.attn_neurons,
                                  dtype=torch.long)
        k_axis = 1 if MODULES[m].neuron_axis == 0 else 2
        if t.shape[0] != len(layers) or (len(layers) and t.shape[k_axis] != neurons.shape[1]):
            raise PktError(f"{m}: translated weights {tuple(t.shape)} do not pair with the student's "
                           f"{len(layers)} selected {kind} layers x {tuple(neurons.shape)[1:]} neurons")
        for j, l in enumerate(layers):
            out.append(NeuronDelta(int(l), m, neurons[j], t[j]))
    return out


def add_delta(weight: torch.Tensor, delta: NeuronDelta, s: ModelSpec, gqa_rule: str = "sum") -> torch.Tensor:
    """``weight + delta`` out of place (differentiable in ``delta.value``). ``weight``: (out, in)."""
    if gqa_rule not in GQA_RULES:
        raise PktError(f"unknown gqa_rule {gqa_rule!r}; expected one of {GQA_RULES}")
    axis = delta.axis
    idx = weight_index(s, delta.module, delta.neurons).to(weight.device)  # (k,)
    value = delta.value.to(device=weight.device, dtype=weight.dtype)
    d_expected = weight.shape[1 - axis]
    if value.shape != ((len(idx), d_expected) if axis == 0 else (d_expected, len(idx))):
        raise PktError(f"layer {delta.layer} {delta.module}: delta of shape {tuple(value.shape)} does not fit "
                       f"{len(idx)} neurons of a weight of shape {tuple(weight.shape)}")
    if gqa_rule == "mean":
        count = torch.bincount(idx, minlength=weight.shape[axis]).to(weight.dtype)  # neurons per row/column
        scale = 1.0 / count[idx]  # (k,)
        value = value * (scale[:, None] if axis == 0 else scale[None, :])
    return weight.index_add(axis, idx, value)


def injected_weights(model: nn.Module, deltas: list[NeuronDelta], gqa_rule: str = "sum") -> dict[str, torch.Tensor]:
    """``{parameter name: W + its deltas}`` for every weight a delta touches."""
    s = spec(model)
    new: dict[str, torch.Tensor] = {}
    for d in deltas:
        name = s.param_name(d.layer, d.module)
        base = new[name] if name in new else s.weight(model, d.layer, d.module)
        new[name] = add_delta(base, d, s, gqa_rule)
    return new


def forward_injected(model: nn.Module, deltas: list[NeuronDelta], *, gqa_rule: str = "sum", **inputs):
    """``model(**inputs)`` with the deltas added functionally; the model's parameters are untouched."""
    return torch.func.functional_call(model, injected_weights(model, deltas, gqa_rule), args=(), kwargs=inputs,
                                      strict=False)


@dataclass
class ChangeRecord:
    """Which entries of which weights a permanent injection changed.

    Each entry: ``layer``, ``module``, ``param`` (state-dict key), ``axis`` ("row" or
    "column"), ``indices`` (sorted distinct rows/columns of that weight that received a delta),
    ``neurons`` (the ranked neuron ids, before the GQA mapping), ``max_abs_delta``.
    """

    gqa_rule: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChangeRecord":
        return cls(d["gqa_rule"], list(d.get("entries", [])), dict(d.get("meta", {})))

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{param name: bool mask}`` of the entries this record allows to differ."""
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            w = params[e["param"]]
            m = out.setdefault(e["param"], torch.zeros(w.shape, dtype=torch.bool))
            idx = torch.tensor(e["indices"], dtype=torch.long)
            if e["axis"] == "row":
                m[idx, :] = True
            else:
                m[:, idx] = True
        return out

    @property
    def n_entries(self) -> int:
        return len(self.entries)


@torch.no_grad()
def inject_(model: nn.Module, deltas: list[NeuronDelta], *, gqa_rule: str = "sum") -> ChangeRecord:
    """Add the deltas to ``model``'s weights in place; return the record of what changed."""
    s = spec(model)
    record = ChangeRecord(gqa_rule)
    for d in deltas:
        w = s.weight(model, d.layer, d.module)
        w.copy_(add_delta(w, d, s, gqa_rule))
        idx = weight_index(s, d.module, d.neurons)
        record.entries.append({
            "layer": d.layer, "module": d.module, "param": s.param_name(d.layer, d.module),
            "axis": "row" if d.axis == 0 else "column",
            "indices": sorted(set(int(i) for i in idx.tolist())),
            "neurons": [int(i) for i in d.neurons.tolist()],
            "max_abs_delta": float(d.value.detach().abs().max()) if d.value.numel() else 0.0,
        })
    return record


def apply_deltas(model: nn.Module, deltas: Mapping[tuple[int, str], torch.Tensor], *, scale: float = 1.0) -> nn.Module:
    """A copy of ``model`` with whole-matrix deltas added: ``W[(l, m)] += scale * delta`` (out, in).

    ``model`` is not modified. Each delta must have its weight's shape; it is cast to the
    weight's dtype and device first.
    """
    s = spec(model)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (l, name), d in deltas.items():
            w = s.weight(out, l, name)
            if tuple(d.shape) != tuple(w.shape):
                raise PktError(f"delta for layer {l} {name} has shape {tuple(d.shape)}; the weight is {tuple(w.shape)}")
            w.add_(d.to(device=w.device, dtype=w.dtype), alpha=scale)
    return out
