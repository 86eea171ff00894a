"""Recording the vectors logit-lens attribution reads (:mod:`pktlib.attribution`, DESIGN.md 4.2).

One forward pass over a batch of texts, with forward hooks (:func:`pktlib.hooks.hooked`; no
modelling code is forked), keeps only what the scores need at each example's predicting
position: every layer's input, attention output, ``o_proj`` and ``down_proj`` inputs (the
neurons' coefficients), ``down_proj`` output, and the last hidden state before the final norm.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from pktlib.errors import PktError
from pktlib.hooks import hooked
from pktlib.models import ModelSpec

__all__ = ["Recorded", "eager_attention", "bytes_per_example", "record"]



@dataclass
class Recorded:
    """Vectors at the predicting positions of a group of examples (float32)."""

    x: Tensor  # (B, L, d) layer inputs
    attn_out: Tensor  # (B, L, d) o_proj outputs
    attn_coef: Tensor  # (B, L, A) o_proj inputs
    ffn_coef: Tensor  # (B, L, N) down_proj inputs
    ffn_out: Tensor  # (B, L, d) down_proj outputs
    h_final: Tensor  # (B, d) last hidden state before the final norm
    target: Tensor  # (B,) long

    @staticmethod
    def cat(parts: list["Recorded"]) -> "Recorded":
        return Recorded(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Recorded)))


@contextmanager
def eager_attention(model: nn.Module, on: bool):
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


def bytes_per_example(s: ModelSpec) -> int:
    return 4 * (s.n_layers * (3 * s.hidden_size + s.attn_size + s.intermediate_size) + s.hidden_size)


@torch.no_grad()
def record(model: nn.Module, s: ModelSpec, seqs: list[list[int]], pad_id: int, device,
            attn_coefficient: str = "summed") -> Recorded:
    """One forward pass over right-padded ``seqs`` (each without its target token).

    Right padding with an attention mask leaves every position up to an example's own last
    token exactly as in an unpadded run (causal attention never looks right), so the vectors
    gathered at each example's last real position do not depend on the batch.
    ``attn_coefficient="original"`` records the self term ``a[h, T, T] v_T`` instead of
    ``o_proj``'s input (:mod:`pktlib.attribution`).
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
    with hooked(pre_hooks, pre=True), hooked(post_hooks), eager_attention(model, original):
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
    return Recorded(st["x"], st["attn_out"], st["attn_coef"], st["ffn_coef"], st["ffn_out"], final[-1], target)
