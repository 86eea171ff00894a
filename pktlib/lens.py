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

from pktlib.errors import PktError
from pktlib.models import ModelSpec, spec

__all__ = ["LogitLens", "lens_scores", "U_DTYPES"]

# dtypes of the product U = E diag(g) W (the lens's logits and every log-sum-exp stay float32).
U_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)
_SAFE_EXP2 = 100.0  # largest |a U| (base 2) evaluated without a max shift: 2^100 << float32 max 2^128


def check_u_dtype(u_dtype: str) -> torch.dtype:
    """The torch dtype named ``u_dtype``; raises PktError naming the known ones."""
    if u_dtype not in U_DTYPES:
        raise PktError(f"u_dtype must be one of {list(U_DTYPES)}, got {u_dtype!r}")
    return U_DTYPES[u_dtype]


@dataclass
class LogitLens:
    """``z(v) = E (g * v) / rho + bias`` with the final norm's weight ``g`` and unembedding ``E``.

    ``u_dtype``: the dtype in which :meth:`directions` multiplies ``E`` by ``diag(g) W``.
    ``"bfloat16"`` rounds both factors and the product to bfloat16 (8 significant bits: a relative
    error of ~3e-3 on each entry of ``U``, accumulated in float32). It is *not* fit for neuron
    selection at a real vocabulary: a neuron's score is about ``a (U[t, i] - E_p U[:, i])``, a
    difference of two nearly equal numbers for most neurons, and the rounding swamps it.
    ``benchmarks/attribution_u_dtype.py`` on Qwen2.5-Coder-1.5B (2 layers, 2 GSM8K examples, 2
    cores): ``U`` 2.6x faster, the whole scoring 1.4x, but only 32% of float32's top-486 FFN
    neurons kept (rank correlation 0.31; attention neurons: 96%). Attribution stays float32.
    """

    E: Tensor  # (V, d) float32
    g: Tensor  # (d,) float32
    bias: Tensor | None = None  # (V,)
    u_dtype: str = "float32"

    def __post_init__(self) -> None:
        dt = check_u_dtype(self.u_dtype)
        self._E_u = self.E if dt == self.E.dtype else self.E.to(dt)  # E in U's dtype (a copy unless float32)

    @classmethod
    def of(cls, model: nn.Module, s: ModelSpec | None = None, device: torch.device | None = None, *,
           u_dtype: str = "float32") -> "LogitLens":
        s = s or spec(model)
        head = s.unembedding(model)
        dev = device or head.weight.device
        bias = getattr(head, "bias", None)
        return cls(E=head.weight.detach().to(dev, torch.float32),
                   g=s.final_norm(model).weight.detach().to(dev, torch.float32),
                   bias=None if bias is None else bias.detach().to(dev, torch.float32), u_dtype=u_dtype)

    def logits(self, v: Tensor, rho: Tensor) -> Tensor:
        """(B, d), (B,) -> (B, V)."""
        z = (v * self.g / rho[:, None]) @ self.E.T
        return z if self.bias is None else z + self.bias

    def logprob(self, v: Tensor, rho: Tensor, target: Tensor) -> Tensor:
        """log p(t | v) for each row: (B, d), (B,), (B,) -> (B,)."""
        z = self.logits(v, rho)
        return z.gather(1, target[:, None])[:, 0] - torch.logsumexp(z, -1)

    def directions(self, W: Tensor) -> Tensor:
        """``U = E diag(g) W``: the vocabulary direction of each column of ``W`` (d, C) -> (V, C), float32."""
        return (self._E_u @ (self.g[:, None] * W.to(torch.float32)).to(self._E_u.dtype)).float()

    def directions_t(self, W: Tensor, *, out: Tensor | None = None) -> Tensor:
        """``U.T``, computed in that layout: (d, C) -> (C, V), contiguous, float32.

        ``out``: a (C, V) float32 tensor to write into (float32 ``u_dtype`` only), so that a loop
        over chunks does not allocate, and page-fault, a fresh (C, V) block each time."""
        gW = (W.T.to(torch.float32) * self.g).to(self._E_u.dtype)
        if out is not None and self._E_u.dtype == torch.float32:
            return torch.mm(gW, self._E_u.T, out=out)
        return (gW @ self._E_u.T).float()


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
    V = lens.E.shape[0]
    ubuf = torch.empty(min(N, chunk_size) * V, dtype=torch.float32, device=base.device)  # reused by every chunk
    for s in range(0, N, chunk_size):
        e = min(N, s + chunk_size)
        C = e - s
        UT2 = lens.directions_t(W[:, s:e], out=ubuf[:C * V].view(C, V)).mul_(_LOG2E)  # (C, V) base 2, vocab last
        a_c = a[:, s:e]  # (B, C)
        target_gain = a_c * UT2[:, target].T * _LN2  # (B, C): the target logit moves by a * U[t]
        # |a U| <= bound: 2^(z) can neither overflow nor leave only underflowed terms below 2^100
        # max |U| per neuron from two reductions: UT2.abs() would allocate (and page-fault) a
        # (C, V) copy, which took half of the log-sum-exp phase at a 152k vocabulary
        u_max = torch.maximum(UT2.amax(-1), UT2.amin(-1).neg_())  # (C,)
        unsafe = a_c.abs() * u_max > _SAFE_EXP2  # (B, C)
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
    del buf, ubuf
    return out
