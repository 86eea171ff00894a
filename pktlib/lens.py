"""The logit lens: reading a hidden-state vector as next-token log-probabilities (DESIGN.md 4.2).

``z(v) = E (g * v) / rho + bias`` with the final norm's weight ``g``, the unembedding ``E`` and a
normaliser ``rho`` held fixed, so that ``z`` is linear in ``v``. :func:`lens_scores` evaluates,
for every neuron at once, how much adding its value vector changes the log-probability of a
target token: the core of :mod:`pktlib.attribution`; :mod:`pktlib.analysis.inspection` reads the
tokens a neuron promotes with the same lens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pktlib.models import ModelSpec, spec

__all__ = ["LogitLens", "lens_scores"]

_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)
_SAFE_EXP2 = 100.0  # largest |a U| (base 2) evaluated without a max shift: 2^100 << float32 max 2^128


@dataclass
class LogitLens:
    """``z(v) = E (g * v) / rho + bias`` with the final norm's weight ``g`` and unembedding ``E``."""

    E: Tensor  # (V, d) float32
    g: Tensor  # (d,) float32
    bias: Tensor | None = None  # (V,)

    @classmethod
    def of(cls, model: nn.Module, s: ModelSpec | None = None, device: torch.device | None = None) -> "LogitLens":
        s = s or spec(model)
        head = s.unembedding(model)
        dev = device or head.weight.device
        bias = getattr(head, "bias", None)
        return cls(E=head.weight.detach().to(dev, torch.float32),
                   g=s.final_norm(model).weight.detach().to(dev, torch.float32),
                   bias=None if bias is None else bias.detach().to(dev, torch.float32))

    def logits(self, v: Tensor, rho: Tensor) -> Tensor:
        """(B, d), (B,) -> (B, V)."""
        z = (v * self.g / rho[:, None]) @ self.E.T
        return z if self.bias is None else z + self.bias

    def logprob(self, v: Tensor, rho: Tensor, target: Tensor) -> Tensor:
        """log p(t | v) for each row: (B, d), (B,), (B,) -> (B,)."""
        z = self.logits(v, rho)
        return z.gather(1, target[:, None])[:, 0] - torch.logsumexp(z, -1)

    def directions(self, W: Tensor) -> Tensor:
        """``U = E diag(g) W``: the vocabulary direction of each column of ``W`` (d, C) -> (V, C)."""
        return self.E @ (self.g[:, None] * W.to(self.E.dtype))

    def directions_t(self, W: Tensor) -> Tensor:
        """``U.T``, computed in that layout: (d, C) -> (C, V), contiguous."""
        return (W.T.to(self.E.dtype) * self.g) @ self.E.T


def lens_scores(lens: LogitLens, base: Tensor, coeffs: Tensor, W: Tensor, rho: Tensor, target: Tensor,
                *, chunk_size: int = 4096) -> Tensor:
    """Score of every neuron: ``log p(t | base + c_i W[:, i]) - log p(t | base)``.

    ``base`` (B, d), ``coeffs`` (B, N), ``W`` (d, N), ``rho`` (B,), ``target`` (B,) -> (B, N).
    Exact, with no loop over neurons: ``U = E diag(g) W`` is computed once per chunk of
    ``chunk_size`` columns and shared by the B examples; only the log-sum-exp of
    ``z0 + (c_i / rho) U[:, i]`` over the vocabulary is per neuron and example, evaluated in
    blocks of at most ``chunk_size`` x vocab elements.
    """
    B, d = base.shape
    N = W.shape[1]
    assert coeffs.shape == (B, N), f"coeffs {tuple(coeffs.shape)} != (B, N) = {(B, N)}"
    assert W.shape[0] == d, f"W has {W.shape[0]} rows, base has d = {d}"
    z0 = lens.logits(base, rho)  # (B, V)
    m0 = z0.amax(-1)  # (B,)
    lse0 = torch.logsumexp(z0, -1)  # (B,)
    # Work in base 2 (exp2 is several times cheaper than exp on CPUs) and relative to each
    # example's largest base logit, so that z = z0 - m0 + a U needs no max pass of its own
    # unless a neuron moves some logit by a lot (the `unsafe` pairs below, redone exactly).
    z0s = (z0 - m0[:, None]).mul_(_LOG2E)  # (B, V), <= 0
    a = coeffs / rho[:, None]  # (B, N): the neuron's step along U[:, i] in logit space
    out = torch.empty(B, N, dtype=torch.float32, device=base.device)
    buf = torch.empty(0, dtype=torch.float32, device=base.device)
    for s in range(0, N, chunk_size):
        e = min(N, s + chunk_size)
        C = e - s
        UT2 = lens.directions_t(W[:, s:e]).mul_(_LOG2E)  # (C, V) in base 2, vocabulary last
        a_c = a[:, s:e]  # (B, C)
        target_gain = a_c * UT2[:, target].T * _LN2  # (B, C): the target logit moves by a * U[t]
        # |a U| <= bound: 2^(z) can neither overflow nor leave only underflowed terms below 2^100
        unsafe = a_c.abs() * UT2.abs().amax(-1) > _SAFE_EXP2  # (B, C)
        nb = max(1, chunk_size // C)  # examples per block: a block is <= chunk_size * V elements
        for b0 in range(0, B, nb):
            b1 = min(B, b0 + nb)
            n = (b1 - b0) * C * UT2.shape[1]
            if buf.numel() < n:
                buf = torch.empty(n, dtype=torch.float32, device=base.device)
            z = buf[:n].view(b1 - b0, C, -1)  # (nb, C, V), reused: no page faults per block
            torch.addcmul(z0s[b0:b1, None, :], a_c[b0:b1, :, None], UT2[None], out=z)
            lse = z.exp2_().sum(-1).log2_().mul_(_LN2).add_(m0[b0:b1, None])  # (nb, C)
            out[b0:b1, s:e] = target_gain[b0:b1] - lse + lse0[b0:b1, None]
        if unsafe.any():  # rare: redo those (example, neuron) pairs with an exact max shift
            bi, ci = unsafe.nonzero(as_tuple=True)
            for k0 in range(0, bi.numel(), max(1, chunk_size)):
                b_, c_ = bi[k0:k0 + chunk_size], ci[k0:k0 + chunk_size]
                zz = z0[b_] + (a_c[b_, c_, None] * UT2[c_]) * _LN2  # (K, V)
                out[b_, s + c_] = target_gain[b_, c_] - torch.logsumexp(zz, -1) + lse0[b_]
    del buf
    return out
