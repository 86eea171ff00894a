"""Parametric structural similarity of LoRA initialisations (DESIGN.md 4.6, paper Figure 6).

For each LoRA module, the cosine between the flattened product ``scale * B A`` and the original
weight ``W`` (= base + ``scale * B A`` for initialisations that keep the model unchanged), and
between ``B A`` and the residual base weight ``W - B A``.
"""
from __future__ import annotations

import pandas as pd
import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from pktlib.errors import PktError
from pktlib.models import MODULES, spec

__all__ = ["structural_cosines", "structural_similarity"]


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else float("nan")


def structural_cosines(delta: Tensor, residual: Tensor) -> tuple[float, float]:
    """(cos(BA, W), cos(BA, W - BA)) for delta = scale * B A (out, in) and the residual base
    weight ``W - BA`` (out, in); the original weight is ``W = residual + delta``."""
    if delta.shape != residual.shape:
        raise PktError(f"delta {tuple(delta.shape)} and residual {tuple(residual.shape)} differ in shape")
    return _cos(delta, residual + delta), _cos(delta, residual)


def structural_similarity(peft_model: nn.Module, adapter: str | None = None):
    """Per layer and LoRA module: cosine of ``scale * B A`` with the original weight and with
    the residual base weight. Returns a pandas DataFrame with columns
    layer, module, cos_ba_w, cos_ba_residual, norm_ba, norm_w, norm_residual.

    The original weight is taken as ``base + scale * B A`` (true for PiSSA and Seeking inits,
    which subtract the product from the base so the model is unchanged, and for random init,
    whose B is zero). ``adapter`` defaults to the active adapter.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    s = spec(base)
    rows = []
    for l in range(s.n_layers):
        # LoRA modules in the layer's own order (attention, then MLP), named as in pktlib.models.MODULES
        for path, mod in s.layer(base, l).named_modules():
            name = path.rsplit(".", 1)[-1]
            if name not in MODULES or not isinstance(mod, LoraLayer):
                continue
            ad = adapter or (mod.active_adapters[0] if mod.active_adapters else None)
            if ad not in mod.lora_A:
                continue
            with torch.no_grad():
                delta = mod.get_delta_weight(ad).detach().to(torch.float64)  # (out, in)
                residual = mod.get_base_layer().weight.detach().to(torch.float64)
                if getattr(mod, "fan_in_fan_out", False):
                    residual = residual.T
            c_w, c_res = structural_cosines(delta, residual)
            rows.append(dict(layer=l, module=name, cos_ba_w=c_w, cos_ba_residual=c_res,
                             norm_ba=float(delta.norm()), norm_w=float((residual + delta).norm()),
                             norm_residual=float(residual.norm())))
    if not rows:
        raise PktError("no LoRA modules found in the model (is it a peft LoRA model?)")
    return pd.DataFrame(rows)
