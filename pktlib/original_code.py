"""Two mechanisms of the original LaTen code, reproduced so their effect can be measured.

Read in Trae1ounG/Neural_Incompatibility (commit bba32ea):

* **Attribute-style injection.** ``knowledge_neurons/knowledge_neurons.py``,
  ``knowledge_injection`` (lines 331-401), builds for each touched projection a dense ``delta``
  of the weight's shape and stores it with ``setattr(module, "delta", delta)``: a plain Python
  attribute, neither an ``nn.Parameter`` nor a registered buffer. The repository's own
  ``modeling_llama.py`` reads it in the decoder layer's forward (``getattr(self.mlp.up_proj,
  'delta', None)`` etc., lines 806-810) and adds ``F.linear(input, delta)`` to the
  projection's output (lines 272-281, 402-405, 465-467). ``inference_LaTen.py`` then calls
  ``student_model.save_pretrained(output_path)`` (line 245), which writes the state dict.
  :func:`attach_delta_attributes` stores the deltas the same way and
  :func:`attribute_deltas_active` makes them act as that modelling code does (a forward hook
  per projection), so a test can compare a saved-and-reloaded model with both.
* **fp16 translator outputs.** ``knowledge_translator.py`` (lines 47 and 51) casts the
  translator's float32 output with ``.to(torch.float16)``, and ``knowledge_injection`` casts the
  translated weights to float16 again (lines 356, 384). :func:`fp16_rounding` says what that
  cast leaves of a tensor of deltas. IEEE half precision: the smallest subnormal is
  2^-24 (5.96e-8), values of magnitude at most 2^-25 (2.98e-8) round to zero, and below the
  smallest normal 2^-14 (6.10e-5) the spacing stays 2^-24, so the relative precision falls
  from 2^-11 with the magnitude.

An evaluator that runs the injected model in 16 bits (vLLM in bfloat16, as the paper's
open-instruct evaluation of Qwen2.5 does) rounds ``theta_S + delta``, not the delta: a delta
much smaller than the spacing of 16-bit numbers at the weights' size moves a weight only where
it crosses a rounding boundary. :func:`cast_visibility` measures what such an evaluator sees.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pktlib.errors import PktError
from pktlib.hooks import hooked
from pktlib.injection import NeuronDelta, add_delta
from pktlib.models import spec

__all__ = ["DELTA_ATTRIBUTE", "attach_delta_attributes", "attribute_deltas_active", "Fp16Rounding", "fp16_rounding",
           "CastVisibility", "cast_visibility",
           "FP16_SMALLEST_SUBNORMAL", "FP16_SMALLEST_NORMAL"]

DELTA_ATTRIBUTE = "delta"  # the attribute name the original code sets
FP16_SMALLEST_SUBNORMAL = 2.0 ** -24
FP16_SMALLEST_NORMAL = 2.0 ** -14


@torch.no_grad()
def attach_delta_attributes(model: nn.Module, deltas: list[NeuronDelta], gqa_rule: str = "sum") -> list[str]:
    """Store each touched projection's dense delta as the plain attribute ``module.delta``.

    As ``knowledge_injection`` does: a zero tensor of the weight's shape with the neuron deltas
    added (rows for up/v, columns for down/o; :func:`pktlib.injection.add_delta`). The weights
    are not changed and the attribute is not part of ``state_dict()``. Returns the dotted
    paths of the modules that received one.
    """
    s = spec(model)
    dense: dict[tuple[int, str], torch.Tensor] = {}
    for d in deltas:
        key = (d.layer, d.module)
        base = dense.get(key)
        if base is None:
            base = torch.zeros_like(s.weight(model, d.layer, d.module))
        dense[key] = add_delta(base, d, s, gqa_rule)
    paths = []
    for (layer, name), value in dense.items():
        setattr(s.module(model, layer, name), DELTA_ATTRIBUTE, value)
        paths.append(s.module_path(layer, name))
    return paths


@contextmanager
def attribute_deltas_active(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, every module with a ``delta`` attribute outputs ``W x + delta x``.

    That is what the original ``modeling_llama.py`` computes for up/down/v/o; a stock
    transformers model ignores the attribute. Yields the modules concerned.
    """
    modules = [m for m in model.modules() if isinstance(getattr(m, DELTA_ATTRIBUTE, None), torch.Tensor)]

    def add(module, args, output):
        return output + F.linear(args[0], getattr(module, DELTA_ATTRIBUTE).to(output.dtype))

    with hooked({m: add for m in modules}):
        yield modules


@dataclass
class Fp16Rounding:
    """What a float32 -> float16 cast leaves of a tensor's values (nonzero inputs only).

    Shares are fractions (0-1) of the nonzero inputs; relative errors ``|fp16(x) - x| / |x|``
    are over the inputs that do not become zero.
    """

    n: int  # nonzero inputs
    rms: float  # root mean square of the inputs
    rms_after: float  # of the cast values (same count)
    share_zero: float  # became exactly 0
    share_subnormal: float  # nonzero after the cast but below 2^-14: fewer than 11 significant bits
    share_normal: float  # kept at full half precision (relative error <= 2^-11)
    median_rel_error: float
    max_rel_error: float


def fp16_rounding(values: torch.Tensor) -> Fp16Rounding:
    """Measure the float16 cast of ``values`` (any shape; zeros are ignored).

    Example: Gaussian deltas of RMS 1e-8 mostly become 0; of RMS 3e-5 most survive, as subnormals.
    """
    x = values.detach().to(torch.float64).flatten()
    x = x[x != 0]
    n = int(x.numel())
    if n == 0:
        return Fp16Rounding(0, 0.0, 0.0, 0.0, 0.0, 0.0, float("nan"), float("nan"))
    h = x.to(torch.float32).to(torch.float16).to(torch.float64)  # the original casts float32 outputs
    zero = h == 0
    normal = h.abs() >= FP16_SMALLEST_NORMAL
    rel = ((h - x).abs() / x.abs())[~zero]
    return Fp16Rounding(
        n=n, rms=float(x.pow(2).mean().sqrt()), rms_after=float(h.pow(2).mean().sqrt()),
        share_zero=float(zero.double().mean()), share_subnormal=float((~zero & ~normal).double().mean()),
        share_normal=float(normal.double().mean()),
        median_rel_error=float(rel.median()) if rel.numel() else float("nan"),
        max_rel_error=float(rel.max()) if rel.numel() else float("nan"),
    )


@dataclass
class CastVisibility:
    """What a model evaluated in ``dtype`` sees of ``weights + delta``: the change
    ``cast(weights + delta) - cast(weights)`` set against ``delta`` (all entries)."""

    dtype: str
    weight_rms: float
    delta_rms: float
    share_changed: float  # fraction (0-1) of entries whose cast value changes
    seen_rms: float  # RMS of the change the evaluator sees
    error_rms: float  # RMS of (seen change - delta): the rounding noise
    correlation: float  # Pearson correlation of the seen change with the delta (1: faithful)


def cast_visibility(weights: torch.Tensor, delta: torch.Tensor, dtype: str = "bfloat16") -> CastVisibility:
    """Cast ``weights`` and ``weights + delta`` (same shape, float32 sums as the injected model
    holds them) to ``dtype`` and compare the difference with ``delta``.

    Deltas far below the dtype's spacing at the weights' size (bfloat16 keeps 8 significant bits:
    about 1.2e-4 at a weight of 0.02) change few entries, each by a whole spacing, so the change
    the evaluator sees is mostly rounding noise (``correlation`` near 0, ``error_rms`` above
    ``delta_rms``); large deltas survive (``correlation`` near 1). Raises PktError for shapes that
    differ or an unknown dtype.
    """
    if weights.shape != delta.shape:
        raise PktError(f"weights {tuple(weights.shape)} and delta {tuple(delta.shape)} differ in shape")
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype):
        raise PktError(f"unknown dtype {dtype!r} (e.g. 'bfloat16', 'float16', 'float32')")
    w = weights.detach().to(torch.float32)
    d = delta.detach().to(torch.float32)
    seen = ((w + d).to(target).to(torch.float64) - w.to(target).to(torch.float64)).flatten()
    d64 = d.to(torch.float64).flatten()
    corr = torch.corrcoef(torch.stack([seen, d64]))[0, 1] if seen.std() > 0 and d64.std() > 0 else torch.tensor(0.0)
    return CastVisibility(dtype=dtype, weight_rms=float(w.pow(2).mean().sqrt()), delta_rms=float(d64.pow(2).mean().sqrt()),
                          share_changed=float((seen != 0).double().mean()), seen_rms=float(seen.pow(2).mean().sqrt()),
                          error_rms=float((seen - d64).pow(2).mean().sqrt()), correlation=float(corr))
