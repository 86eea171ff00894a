"""Ranges of delta parameters (DESIGN.md 4.6, paper Figures 7-9).

Quantiles, extremes and the share of values inside +-0.002 and +-0.005 (:func:`delta_stats`,
:func:`delta_histogram`) of SFT deltas (chat - base, :func:`sft_deltas`) and of the parameters
Seeking extracts and adds (:func:`seeking_deltas`). To add deltas to a model:
:func:`pktlib.injection.apply_deltas`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pktlib.errors import PktError
from pktlib.models import TRANSFERRED_MODULES, spec

__all__ = ["DEFAULT_QUANTILES", "DeltaStats", "delta_stats", "delta_histogram", "sft_deltas", "seeking_deltas"]


DEFAULT_QUANTILES: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 0.9999)


@dataclass
class DeltaStats:
    """Summary of a set of delta parameters (all values pooled)."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    abs_mean: float
    share_within_0_002: float  # share of values with |v| <= 0.002
    share_within_0_005: float  # share of values with |v| <= 0.005
    quantiles: dict[str, float] = field(default_factory=dict)  # "q0.5" -> value
    quantiles_exact: bool = True  # False when computed on a uniform subsample (see delta_stats)

    def as_row(self) -> dict[str, float]:
        """Flat dict (for one row of a table)."""
        row = {k: v for k, v in self.__dict__.items() if k != "quantiles"}
        row.update(self.quantiles)
        return row


def _flat_tensors(deltas) -> list[Tensor]:
    if isinstance(deltas, Tensor):
        return [deltas.detach().reshape(-1)]
    if isinstance(deltas, Mapping):
        deltas = deltas.values()
    out = [torch.as_tensor(d).detach().reshape(-1) for d in deltas]
    if not out:
        raise PktError("no delta tensors given")
    return out


def delta_stats(deltas: Tensor | Iterable[Tensor] | Mapping[object, Tensor], *,
                quantiles: Sequence[float] = DEFAULT_QUANTILES, max_samples: int = 4_000_000,
                seed: int = 0) -> DeltaStats:
    """Pooled statistics of delta tensors (a tensor, a list, or a dict of them).

    Count, mean, std, extremes and the shares inside +-0.002 / +-0.005 are exact (streamed
    tensor by tensor). Quantiles are exact when the total is at most ``max_samples``; above
    that (billions of values for a 13B model) they come from a seeded uniform subsample of
    ``max_samples`` values, and ``quantiles_exact`` is False.
    """
    flats = _flat_tensors(deltas)
    n = sum(f.numel() for f in flats)
    if n == 0:
        raise PktError("delta tensors are empty")
    total = total_sq = total_abs = 0.0
    lo, hi = math.inf, -math.inf
    in2 = in5 = 0
    for f in flats:
        f64 = f.to(torch.float64)
        total += float(f64.sum())
        total_sq += float((f64 * f64).sum())
        total_abs += float(f64.abs().sum())
        lo, hi = min(lo, float(f64.min())), max(hi, float(f64.max()))
        # Compare in the tensor's own dtype: a float32 0.002 is 0.0020000000949 in float64.
        a = f.abs() if f.is_floating_point() else f64.abs()
        in2 += int((a <= torch.tensor(0.002, dtype=a.dtype)).sum())
        in5 += int((a <= torch.tensor(0.005, dtype=a.dtype)).sum())
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * (n / (n - 1) if n > 1 else 1.0)
    exact = n <= max_samples
    if exact:
        pool = torch.cat([f.to(torch.float64) for f in flats])
    else:
        g = torch.Generator().manual_seed(seed)
        pool = torch.cat([f[torch.randint(0, f.numel(), (max(1, round(max_samples * f.numel() / n)),),
                                          generator=g)].to(torch.float64) for f in flats])
    qs = np.quantile(pool.numpy(), list(quantiles))  # torch.quantile refuses inputs above 16M elements
    return DeltaStats(n=n, mean=mean, std=math.sqrt(var), min=lo, max=hi, abs_mean=total_abs / n,
                      share_within_0_002=in2 / n, share_within_0_005=in5 / n,
                      quantiles={f"q{q:g}": float(v) for q, v in zip(quantiles, qs)},
                      quantiles_exact=exact)


def delta_histogram(deltas, *, bins: int = 101, range: tuple[float, float] | None = None,
                    ) -> tuple[Tensor, Tensor]:
    """Histogram of pooled delta values, streamed: (counts (bins,), edges (bins + 1,)).

    ``range`` defaults to the pooled min/max. Values outside ``range`` are not counted.
    """
    flats = _flat_tensors(deltas)
    if range is None:
        range = (min(float(f.min()) for f in flats), max(float(f.max()) for f in flats))
    lo, hi = range
    if not hi > lo:
        hi = lo + 1e-12
    counts = torch.zeros(bins, dtype=torch.float64)
    for f in flats:
        counts += torch.histc(f.to(torch.float64), bins=bins, min=lo, max=hi)
    return counts, torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


def sft_deltas(base: nn.Module, chat: nn.Module, modules: Sequence[str] = TRANSFERRED_MODULES,
               ) -> dict[tuple[int, str], Tensor]:
    """Supervised fine-tuning deltas ``chat - base`` per (layer, module): {(l, name): (out, in)}."""
    sb, sc = spec(base), spec(chat)
    if sb.to_dict() != sc.to_dict():
        raise PktError(f"base and chat models differ in shape: {sb} vs {sc}")
    out = {}
    with torch.no_grad():
        for l in range(sb.n_layers):
            for name in modules:
                out[(l, name)] = (sc.weight(chat, l, name).detach().float()
                                  - sb.weight(base, l, name).detach().float()).cpu()
    return out


def seeking_deltas(extracted: Mapping[object, Tensor], modules: Sequence[str] = TRANSFERRED_MODULES,
                   ) -> dict[object, Tensor]:
    """The deltas Seeking adds to the student: the extracted teacher sub-matrices themselves.

    Accepts the mapping produced by Seeking extraction (keys (layer, module) or module-path
    strings -> tensors) and keeps the entries of ``modules``; Seeking without training adds
    these to the student's weights, so their range is what Figures 7-9 compare with SFT deltas.
    """
    def mod_of(key) -> str | None:
        name = key[-1] if isinstance(key, tuple) else str(key)
        return next((m for m in modules if m in str(name)), None)

    extracted = getattr(extracted, "matrices", extracted)  # a pktlib.seeking.SeekingExtract too
    out = {k: torch.as_tensor(v).detach().float().cpu() for k, v in extracted.items() if mod_of(k)}
    if not out:
        raise PktError(f"no extracted tensors for modules {list(modules)}; keys: {list(extracted)[:6]}")
    return out
