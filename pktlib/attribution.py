"""Logit-lens neuron attribution (FFN and attention), layer/neuron selection, neuron inspection.

Definitions (DESIGN.md 4.1-4.2; Yu and Ananiadou 2024, "Neuron-level knowledge attribution in
large language models", as used by Tan et al. 2025, "Neural Incompatibility"):

For one ``(prompt, answer)`` pair the scored text is ``prompt + answer`` with the trailing
characters ``. " ) , ] space newline`` stripped from the answer, tokenised with
``tokenizer(text)`` defaults. The target ``t`` is its last token; the model runs once on the
text without ``t`` and everything is read at the last position (the one predicting ``t``).

* ``h_L``: the last hidden state before the final norm; ``rho = sqrt(mean(h_L^2) + eps)`` (the
  final RMSNorm's denominator) is held *fixed*, so the logit lens of a vector ``v``,
  ``p(. | v) = softmax(lm_head(g * v / rho))`` with ``g`` the final norm's weight, is a softmax
  of a linear function of ``v``.
* Layer ``l``: ``x_l`` its input, ``r_l = x_l + attn_out_l``.
* FFN neuron ``i`` (column ``w_i`` of ``down_proj``, coefficient ``c_i`` = entry ``i`` of
  ``down_proj``'s input): ``log p(t | r_l + c_i w_i) - log p(t | r_l)``.
* Attention neuron ``j`` (column ``o_j`` of ``o_proj``, coefficient = entry ``j`` of ``o_proj``'s
  input): ``log p(t | x_l + c_j o_j) - log p(t | x_l)``.
* Layer scores: ``log p(t | r_l + ffn_out_l) - log p(t | r_l)`` (FFN) and
  ``log p(t | x_l + attn_out_l) - log p(t | x_l)`` (attention).

Scores are summed over the pairs (and optionally kept per example).

How it is computed (DESIGN.md 4.2 "Cost"). With ``E`` the unembedding and ``W`` a layer's
``down_proj`` (or ``o_proj``) weight, ``z(b + c_i w_i) = z(b) + (c_i / rho) U[:, i]`` where
``U = E diag(g) W`` (vocab x N) does not depend on the example. So one pass over the model per
batch records only the vectors at the predicting positions (forward hooks, no modelling code is
forked), and then, per layer and per chunk of ``chunk_size`` neurons, ``U`` is computed *once*
and shared by every example of a group; only the log-sum-exp over the vocabulary is per neuron
and example. The group is all examples whose recorded vectors fit in ``_GROUP_BYTES`` (every
example on small models), so ``U`` is computed once per layer in a typical call. The
log-sum-exp runs in base 2 relative to each example's largest base logit, which needs three
passes over a (examples x neurons x vocab) block instead of six; the rare neurons that move a
logit by more than ``_SAFE_EXP2`` bits are redone with an exact max shift. Memory is bounded by
the chunking: a few (vocab x chunk_size) float32 blocks.

``normaliser="original"`` reproduces the original code (Trae1ounG/Neural_Incompatibility,
``knowledge_neurons``): it takes ``s = sqrt(var(h_L) + 1e-5)`` (a standard deviation, population
variance, so the mean is subtracted unlike RMSNorm) and then multiplies vectors by
``rsqrt(s + 1e-6)``, i.e. divides by the *square root of a standard deviation*. It is kept only
to compare with the paper's numbers. (The original also casts to float16 before the
unembedding and, for attention neurons, overwrites rather than sums the scores of earlier
examples; neither is reproduced: everything here is float32 and summed.)

``attn_coefficient="original"`` reproduces the original code's attention-neuron coefficient.
The definition (DESIGN.md 4.1, ``"summed"``) takes entry ``j`` of ``o_proj``'s input at the
predicting position ``T``: head ``h``'s attention-weighted value ``sum_s a[h, T, s] v_s``,
summed over every source position ``s``. The original code (its modified ``modeling_llama.py``
returns ``attn_weights[:, :, -1, :] * value_states`` per source position, and
``knowledge_neurons.get_top_attribute_neurons_attn`` reads the entry of the *last* source
position) uses only the self term ``a[h, T, T] v_T``: what the predicting token takes from its
own value vector. Attention-layer scores use the full attention output in both. The variant
needs the attention weights, so its forward pass runs with eager attention.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from pktlib.errors import PktError
from pktlib.hooks import hooked
from pktlib.models import ModelSpec, spec

__all__ = [
    "Attribution",
    "Selection",
    "NORMALISERS",
    "ATTN_COEFFICIENTS",
    "STRIP_CHARS",
    "attribute",
    "scored_text",
    "LogitLens",
    "lens_scores",
    "top_layers",
    "top_neurons",
    "select",
    "layer_budget",
    "top_tokens",
    "carriers",
    "carrier_table",
    "save_attribution",
    "load_attribution",
]

# Trailing answer characters dropped before choosing the target token (the original code's list).
STRIP_CHARS = '."), ]\n'
KINDS = ("ffn", "attn")

_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)
_SAFE_EXP2 = 100.0  # largest |a U| (base 2) evaluated without a max shift: 2^100 << float32 max 2^128

# Recorded vectors of one group of examples share each U chunk; this bounds their memory.
_GROUP_BYTES = 512 * 2**20


# ======================================================================== normalisers


def _rms(h: Tensor, eps: float) -> Tensor:
    """The definition: the final RMSNorm's denominator. ``h`` (B, d) -> (B,)."""
    return torch.sqrt(h.pow(2).mean(-1) + eps)


def _original(h: Tensor, eps: float) -> Tensor:
    """The original code's variant: sqrt of (a standard deviation + 1e-6). ``h`` (B, d) -> (B,)."""
    std = torch.sqrt(h.var(-1, unbiased=False) + 1e-5)
    return torch.sqrt(std + 1e-6)


NORMALISERS: dict[str, Callable[[Tensor, float], Tensor]] = {"rms": _rms, "original": _original}


def _normaliser(name: str) -> Callable[[Tensor, float], Tensor]:
    if name not in NORMALISERS:
        raise PktError(f"unknown normaliser {name!r}; expected one of {sorted(NORMALISERS)}")
    return NORMALISERS[name]


# The attention-neuron coefficient (see the module docstring): the definition's o_proj input, or
# the original code's self term of the predicting position.
ATTN_COEFFICIENTS = ("summed", "original")


def _check_attn_coefficient(name: str) -> None:
    if name not in ATTN_COEFFICIENTS:
        raise PktError(f"unknown attn_coefficient {name!r}; expected one of {list(ATTN_COEFFICIENTS)}")


# ======================================================================== result types


@dataclass
class Attribution:
    """Attribution scores summed over the pairs (float32, on the CPU).

    ``*_per_example`` are filled only with ``per_example=True``; their first axis follows the
    order of the pairs given.
    """

    ffn: Tensor  # (L, N) FFN neuron scores
    attn: Tensor  # (L, A) attention neuron scores, A = n_heads * head_dim
    ffn_layers: Tensor  # (L,) FFN layer scores
    attn_layers: Tensor  # (L,) attention layer scores
    targets: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (E,) target ids
    ffn_per_example: Tensor | None = None  # (E, L, N)
    attn_per_example: Tensor | None = None  # (E, L, A)
    ffn_layers_per_example: Tensor | None = None  # (E, L)
    attn_layers_per_example: Tensor | None = None  # (E, L)
    normaliser: str = "rms"
    attn_coefficient: str = "summed"

    @property
    def n_examples(self) -> int:
        return int(self.targets.numel())

    @property
    def n_layers(self) -> int:
        return int(self.ffn.shape[0])

    def scores(self, kind: str, *, example: int | None = None) -> Tensor:
        """Neuron scores of ``kind`` ("ffn"/"attn"): summed (L, N), or of one example."""
        _check_kind(kind)
        if example is None:
            return self.ffn if kind == "ffn" else self.attn
        return _one_example(self.ffn_per_example if kind == "ffn" else self.attn_per_example, example)

    def layer_scores(self, kind: str, *, example: int | None = None) -> Tensor:
        """Layer scores of ``kind``: summed (L,), or of one example."""
        _check_kind(kind)
        if example is None:
            return self.ffn_layers if kind == "ffn" else self.attn_layers
        return _one_example(self.ffn_layers_per_example if kind == "ffn" else self.attn_layers_per_example, example)

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty tensors by field name (what :func:`save_attribution` writes)."""
        return {f.name: getattr(self, f.name).contiguous() for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}


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


def _one_example(per: Tensor | None, example: int) -> Tensor:
    """Row ``example`` of a per-example tensor, with clear errors when absent or out of range."""
    if per is None:
        raise PktError("this Attribution has no per-example scores; run attribute(..., per_example=True)")
    if not -per.shape[0] <= example < per.shape[0]:
        raise PktError(f"example {example} out of range for {per.shape[0]} examples")
    return per[example]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PktError(f"unknown neuron kind {kind!r}; expected 'ffn' or 'attn'")


# ======================================================================== the logit lens


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


# ======================================================================== text and targets


def scored_text(prompt: str, answer: str) -> str:
    """``prompt + answer`` with the trailing ``. " ) , ] space newline`` stripped from the answer."""
    return prompt + answer.rstrip(STRIP_CHARS)


def _encode(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    from pktlib.data import tokenize_example

    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise PktError(f"pair {i} is not a (prompt_text, answer_text) tuple of strings: {pair!r:.80}")
        prompt, answer = pair
        if not answer.rstrip(STRIP_CHARS):
            raise PktError(f"pair {i}: the answer {answer!r:.40} is empty once trailing punctuation is stripped")
        # The one tokenisation of (prompt, answer) (pktlib.data): the scored text as one string.
        ids = tokenize_example(tokenizer, (prompt, answer.rstrip(STRIP_CHARS)), add_eos=False)["input_ids"]
        if len(ids) < 2:
            raise PktError(f"pair {i}: the scored text has {len(ids)} token(s); need a context and a target")
        out.append(ids)
    return out


# ======================================================================== recording the vectors


@dataclass
class _Recorded:
    """Vectors at the predicting positions of a group of examples (float32)."""

    x: Tensor  # (B, L, d) layer inputs
    attn_out: Tensor  # (B, L, d) o_proj outputs
    attn_coef: Tensor  # (B, L, A) o_proj inputs
    ffn_coef: Tensor  # (B, L, N) down_proj inputs
    ffn_out: Tensor  # (B, L, d) down_proj outputs
    h_final: Tensor  # (B, d) last hidden state before the final norm
    target: Tensor  # (B,) long

    @staticmethod
    def cat(parts: list["_Recorded"]) -> "_Recorded":
        return _Recorded(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(_Recorded)))


@contextmanager
def _eager_attention(model: nn.Module, on: bool):
    """Eager attention while inside (so attention modules return their weights); restored after."""
    if not on:
        yield
        return
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError) as e:
        raise PktError(f"attn_coefficient='original' needs eager attention, which this model refuses: {e}") from e
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _bytes_per_example(s: ModelSpec) -> int:
    return 4 * (s.n_layers * (3 * s.hidden_size + s.attn_size + s.intermediate_size) + s.hidden_size)


@torch.no_grad()
def _record(model: nn.Module, s: ModelSpec, seqs: list[list[int]], pad_id: int, device,
            attn_coefficient: str = "summed") -> _Recorded:
    """One forward pass over right-padded ``seqs`` (each without its target token).

    Right padding with an attention mask leaves every position up to an example's own last
    token exactly as in an unpadded run (causal attention never looks right), so the vectors
    gathered at each example's last real position do not depend on the batch.
    ``attn_coefficient="original"`` records the self term ``a[h, T, T] v_T`` instead of
    ``o_proj``'s input (module docstring).
    """
    B = len(seqs)
    T = max(len(q) for q in seqs) - 1
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, q in enumerate(seqs):
        ids[b, : len(q) - 1] = torch.tensor(q[:-1])
        mask[b, : len(q) - 1] = 1
    pos = torch.tensor([len(q) - 2 for q in seqs], device=device)  # (B,) predicting positions
    rows = torch.arange(B, device=device)
    L = s.n_layers
    slots: dict[str, list[Tensor | None]] = {k: [None] * L for k in ("x", "attn_out", "attn_coef", "ffn_coef", "ffn_out")}
    final: list[Tensor] = []

    def take(t: Tensor) -> Tensor:  # (B, T, n) -> (B, n) at the predicting positions
        return t[rows, pos].detach().to(torch.float32)

    def pre(key: str, l: int):
        def fn(module, args):
            slots[key][l] = take(args[0])
        return fn

    def post(key: str, l: int):
        def fn(module, args, output):
            slots[key][l] = take(output[0] if isinstance(output, tuple) else output)
        return fn

    self_weight: list[Tensor | None] = [None] * L  # (B, H) a[h, T, T], for the original coefficient
    values: list[Tensor | None] = [None] * L  # (B, n_kv * head_dim) v_T

    def attn_weights(l: int):
        def fn(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is None:
                raise PktError(f"layer {l}'s attention returned no weights; attn_coefficient='original' needs them")
            self_weight[l] = w[rows, :, pos, pos].detach().to(torch.float32)  # (B, H)
        return fn

    def value(l: int):
        def fn(module, args, output):
            values[l] = take(output)
        return fn

    original = attn_coefficient == "original"
    pre_hooks: dict[nn.Module, list] = {}
    post_hooks: dict[nn.Module, list] = {}
    for l in range(L):
        pre_hooks.setdefault(s.input_norm(model, l), []).append(pre("x", l))
        o, down = s.module(model, l, "o_proj"), s.module(model, l, "down_proj")
        if original:
            slots["attn_coef"][l] = torch.empty(0)  # filled from the weights and values below
            post_hooks.setdefault(s.attn(model, l), []).append(attn_weights(l))
            post_hooks.setdefault(s.module(model, l, "v_proj"), []).append(value(l))
        else:
            pre_hooks.setdefault(o, []).append(pre("attn_coef", l))
        post_hooks.setdefault(o, []).append(post("attn_out", l))
        pre_hooks.setdefault(down, []).append(pre("ffn_coef", l))
        post_hooks.setdefault(down, []).append(post("ffn_out", l))
    pre_hooks.setdefault(s.final_norm(model), []).append(lambda m, args: final.append(take(args[0])))

    # Only the predicting positions' logits are needed: skip the rest of the unembedding.
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    with hooked(pre_hooks, pre=True), hooked(post_hooks), _eager_attention(model, original):
        try:
            model(**inputs, logits_to_keep=torch.unique(pos))
        except TypeError:  # a model class without logits_to_keep: compute them all
            for k, v in slots.items():
                if not (original and k == "attn_coef"):
                    v[:] = [None] * L
            final.clear()
            model(**inputs)
    if original:
        for l in range(L):
            if self_weight[l] is None or values[l] is None:
                raise PktError(f"attribution hooks did not fire for layer {l}'s attention weights or values")
            v = values[l].view(B, s.n_kv_heads, s.head_dim).repeat_interleave(s.group_size, dim=1)  # (B, H, hd)
            slots["attn_coef"][l] = (self_weight[l][:, :, None] * v).reshape(B, s.attn_size)  # (B, A)
    missing = [k for k, v in slots.items() if any(t is None for t in v)] + ([] if final else ["final norm"])
    if missing:
        raise PktError(f"attribution hooks did not fire for {missing} on a {s.arch} model; "
                       "check the module paths in pktlib.models.ARCHITECTURES")
    st = {k: torch.stack(v, 1) for k, v in slots.items()}  # (B, L, n)
    target = torch.tensor([q[-1] for q in seqs], device=device)
    return _Recorded(st["x"], st["attn_out"], st["attn_coef"], st["ffn_coef"], st["ffn_out"], final[-1], target)


# ======================================================================== attribution


def _score_group(model: nn.Module, s: ModelSpec, lens: LogitLens, rec: _Recorded, rho: Tensor,
                 chunk_size: int, bar) -> dict[str, Tensor]:
    """Per-example scores of one recorded group: ffn (B, L, N), attn (B, L, A), layers (B, L)."""
    B, L = rec.x.shape[:2]
    ffn = torch.empty(B, L, s.intermediate_size)
    attn = torch.empty(B, L, s.attn_size)
    ffn_l = torch.empty(B, L)
    attn_l = torch.empty(B, L)
    t = rec.target
    for l in range(L):
        x, r = rec.x[:, l], rec.x[:, l] + rec.attn_out[:, l]  # (B, d)
        W_o = s.weight(model, l, "o_proj").detach()  # (d, A)
        W_down = s.weight(model, l, "down_proj").detach()  # (d, N)
        attn[:, l] = lens_scores(lens, x, rec.attn_coef[:, l], W_o, rho, t, chunk_size=chunk_size).cpu()
        ffn[:, l] = lens_scores(lens, r, rec.ffn_coef[:, l], W_down, rho, t, chunk_size=chunk_size).cpu()
        lp_x, lp_r = lens.logprob(x, rho, t), lens.logprob(r, rho, t)
        attn_l[:, l] = (lp_r - lp_x).cpu()
        ffn_l[:, l] = (lens.logprob(r + rec.ffn_out[:, l], rho, t) - lp_r).cpu()
        if bar is not None:
            bar.update(B / L)
    return {"ffn": ffn, "attn": attn, "ffn_layers": ffn_l, "attn_layers": attn_l}


@torch.no_grad()
def attribute(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, normaliser: str = "rms",
              attn_coefficient: str = "summed", per_example: bool = False, batch_size: int = 8,
              chunk_size: int = 4096, progress: bool = False) -> Attribution:
    """Neuron and layer attribution scores of ``model`` for ``pairs``, summed over the pairs.

    ``pairs`` are ``(prompt_text, answer_text)`` (see :func:`pktlib.data.prompt_answer_pairs`).
    ``normaliser`` is ``"rms"`` (the definition) or ``"original"`` (the original code's
    sqrt-of-std, see the module docstring); ``attn_coefficient`` is ``"summed"`` (the
    definition: ``o_proj``'s input) or ``"original"`` (the original code's self term of the
    predicting position, module docstring). ``batch_size`` examples share a forward pass
    (right padding; scores do not depend on it); ``chunk_size`` neurons share a (vocab x chunk)
    block of the unembedded value vectors. Returns float32 CPU tensors.
    """
    rho_fn = _normaliser(normaliser)
    _check_attn_coefficient(attn_coefficient)
    if batch_size < 1 or chunk_size < 1:
        raise PktError(f"batch_size ({batch_size}) and chunk_size ({chunk_size}) must be >= 1")
    if len(pairs) == 0:
        raise PktError("attribute() needs at least one (prompt, answer) pair")
    s = spec(model)
    device = next(model.parameters()).device
    lens = LogitLens.of(model, s, device)
    seqs = _encode(tokenizer, pairs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Sort by length so batches carry little padding; results are put back in the given order.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    group = max(batch_size, _GROUP_BYTES // _bytes_per_example(s))
    was_training = model.training
    model.eval()
    per: dict[str, list[Tensor]] = {"ffn": [], "attn": [], "ffn_layers": [], "attn_layers": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # each example counts twice: once for its forward pass, once for its scoring
        bar = tqdm(total=2 * len(seqs), desc="attribution (forward + scoring)", unit="step")
    try:
        for g0 in range(0, len(order), group):
            idx = order[g0:g0 + group]
            parts = []
            for b0 in range(0, len(idx), batch_size):
                parts.append(_record(model, s, [seqs[i] for i in idx[b0:b0 + batch_size]], pad_id, device,
                                     attn_coefficient))
                if bar is not None:
                    bar.update(len(parts[-1].target))
            rec = _Recorded.cat(parts)
            rho = rho_fn(rec.h_final, s.norm_eps)  # (B,) fixed normaliser
            for k, v in _score_group(model, s, lens, rec, rho, chunk_size, bar).items():
                per[k].append(v if per_example else v.sum(0, keepdim=True))  # keep only sums unless asked
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    targets = torch.tensor([q[-1] for q in seqs])
    if not per_example:
        sums = {k: torch.cat(v).sum(0) for k, v in per.items()}
        return Attribution(ffn=sums["ffn"], attn=sums["attn"], ffn_layers=sums["ffn_layers"],
                           attn_layers=sums["attn_layers"], targets=targets, normaliser=normaliser,
                           attn_coefficient=attn_coefficient)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    full = {k: torch.cat(v)[inv] for k, v in per.items()}  # back to the given order
    return Attribution(
        ffn=full["ffn"].sum(0), attn=full["attn"].sum(0),
        ffn_layers=full["ffn_layers"].sum(0), attn_layers=full["attn_layers"].sum(0),
        targets=targets, normaliser=normaliser, attn_coefficient=attn_coefficient,
        ffn_per_example=full["ffn"], attn_per_example=full["attn"],
        ffn_layers_per_example=full["ffn_layers"], attn_layers_per_example=full["attn_layers"],
    )


# ======================================================================== selection


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


def select(attribution: Attribution, *, n_layers: int, k_ffn: int, k_attn: int) -> Selection:
    """Top ``n_layers`` layers (ascending; by FFN and attention layer scores respectively) and the
    top neurons within each of them (DESIGN.md 4.2)."""
    ffn_layers = top_layers(attribution.ffn_layers, n_layers)
    attn_layers = top_layers(attribution.attn_layers, n_layers)
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


# ======================================================================== inspection


@torch.no_grad()
def top_tokens(model: nn.Module, tokenizer, layer: int, kind: str, index: int | Sequence[int], k: int = 10,
               ) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
    """Tokens a neuron's value vector promotes through the logit lens (paper Figure 5).

    The value vector is column ``index`` of ``down_proj`` (``kind="ffn"``) or of ``o_proj``
    (``kind="attn"``), scaled by the final norm's weight and unembedded: ``E (g * w)``. Returns
    ``[(token, logit), ...]`` by descending logit, or one such list per index if ``index`` is a
    sequence.
    """
    _check_kind(kind)
    s = spec(model)
    n = s.n_neurons(kind)
    idx = [index] if isinstance(index, int) else list(index)
    bad = [i for i in idx if not 0 <= int(i) < n]
    if bad:
        raise PktError(f"{kind} neuron index {bad[:5]} out of range: layer {layer} has {n} {kind} neurons")
    lens = LogitLens.of(model, s)
    W = s.weight(model, layer, "down_proj" if kind == "ffn" else "o_proj").detach()  # (d, N)
    U = lens.directions(W[:, torch.tensor(idx, dtype=torch.long, device=W.device)])  # (V, n_idx)
    k = min(k, U.shape[0])
    vals, ids = U.topk(k, dim=0)  # (k, n_idx)
    out = [[(tokenizer.decode([int(ids[r, c])]), float(vals[r, c])) for r in range(k)] for c in range(len(idx))]
    return out[0] if isinstance(index, int) else out


def carriers(attribution: Attribution, example: int | None = None, *, kind: str = "ffn", k: int = 10,
             layers: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """Which neurons carried an answer: the ``k`` best ``(layer, neuron, score)`` over all layers
    (or ``layers``), for one example's scores (``per_example=True``) or the summed scores."""
    S = attribution.scores(kind, example=example)  # (L, N)
    ls = list(range(S.shape[0])) if layers is None else [int(l) for l in layers]
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


# ======================================================================== files


def save_attribution(attribution: Attribution, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``attribution`` as safetensors, atomically (temporary file, then ``os.replace``)."""
    from safetensors.torch import save_file

    from pktlib.records import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"normaliser": attribution.normaliser, "attn_coefficient": attribution.attn_coefficient,
            **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(attribution.tensors(), str(tmp), metadata=meta)
    return path


def load_attribution(path: str | os.PathLike) -> Attribution:
    """Read a file written by :func:`save_attribution` (or ``pkt attribute``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PktError(f"attribution file not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata() or {}
    missing = {"ffn", "attn", "ffn_layers", "attn_layers"} - set(tensors)
    if missing:
        raise PktError(f"{path} is not an attribution file: missing {sorted(missing)}")
    return Attribution(**tensors, normaliser=meta.get("normaliser", "rms"),
                       attn_coefficient=meta.get("attn_coefficient", "summed"))
