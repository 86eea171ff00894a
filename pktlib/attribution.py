"""Logit-lens neuron attribution (FFN and attention); layer/neuron selection is :mod:`pktlib.selection`.

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

At a real vocabulary ``U`` dominates: ``V x d x (N + A)`` multiply-adds per layer, about 50 s
per layer of Qwen2.5-Coder-1.5B on 2 CPU cores against 4 s of log-sum-exp per example
(``benchmarks/real_pair_attribution.py``). Layer scores need no ``U``, so ``layers=`` restricts
the neuron scores to some layers (the rest are NaN): :func:`locate_layers` scores every layer
first and then the neurons of the best ones only, which is exact for what it returns and
costs ``n_layers / L`` of a full call.

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

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pktlib.activations import Recorded, bytes_per_example, record
from pktlib.data import tokenize_example
from pktlib.errors import PktError
from pktlib.lens import LogitLens, lens_scores
from pktlib.models import VALUE_MODULES, ModelSpec, spec
from pktlib.records import atomic_path
from pktlib.selection import Selection, layer_budget, select, top_layers, top_neurons  # part of this API

__all__ = [
    "Attribution",
    "Selection",
    "NORMALISERS",
    "ATTN_COEFFICIENTS",
    "STRIP_CHARS",
    "attribute",
    "locate_layers",
    "scored_text",
    "top_layers",
    "top_neurons",
    "select",
    "layer_budget",
    "save_attribution",
    "load_attribution",
]

# Trailing answer characters dropped before choosing the target token (the original code's list).
STRIP_CHARS = '."), ]\n'
KINDS = ("ffn", "attn")

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
    u_dtype: str = "float32"  # the dtype U = E diag(g) W was multiplied in (pktlib.lens)

    @property
    def n_examples(self) -> int:
        return int(self.targets.numel())

    @property
    def n_layers(self) -> int:
        return int(self.ffn.shape[0])

    def scores(self, kind: str, *, example: int | None = None) -> Tensor:
        """Neuron scores of ``kind`` ("ffn"/"attn"): summed (L, N), or of one example."""
        check_kind(kind)
        if example is None:
            return self.ffn if kind == "ffn" else self.attn
        return _one_example(self.ffn_per_example if kind == "ffn" else self.attn_per_example, example)

    def scored_layers(self, kind: str = "ffn") -> list[int]:
        """Layers whose neuron scores of ``kind`` were computed (all unless ``attribute(layers=...)``)."""
        check_kind(kind)
        S = self.ffn if kind == "ffn" else self.attn
        return [l for l in range(S.shape[0]) if not bool(S[l].isnan().any())]

    def layer_scores(self, kind: str, *, example: int | None = None) -> Tensor:
        """Layer scores of ``kind``: summed (L,), or of one example."""
        check_kind(kind)
        if example is None:
            return self.ffn_layers if kind == "ffn" else self.attn_layers
        return _one_example(self.ffn_layers_per_example if kind == "ffn" else self.attn_layers_per_example, example)

    def example(self, example: int) -> "Attribution":
        """The attribution of pair ``example`` alone, as ``attribute(model, tok, [pair])`` returns it
        (its scores as the sums, no per-example fields). Needs ``per_example=True`` scores."""
        return Attribution(ffn=self.scores("ffn", example=example), attn=self.scores("attn", example=example),
                           ffn_layers=self.layer_scores("ffn", example=example),
                           attn_layers=self.layer_scores("attn", example=example),
                           targets=self.targets[example].reshape(1), normaliser=self.normaliser,
                           attn_coefficient=self.attn_coefficient, u_dtype=self.u_dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty tensors by field name (what :func:`save_attribution` writes)."""
        return {f.name: getattr(self, f.name).contiguous() for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}


def _one_example(per: Tensor | None, example: int) -> Tensor:
    """Row ``example`` of a per-example tensor, with clear errors when absent or out of range."""
    if per is None:
        raise PktError("this Attribution has no per-example scores; run attribute(..., per_example=True)")
    if not -per.shape[0] <= example < per.shape[0]:
        raise PktError(f"example {example} out of range for {per.shape[0]} examples")
    return per[example]


def check_kind(kind: str) -> None:
    """A clear error unless ``kind`` is a neuron kind of the attribution ("ffn" or "attn")."""
    if kind not in KINDS:
        raise PktError(f"unknown neuron kind {kind!r}; expected 'ffn' or 'attn'")


# ======================================================================== text and targets


def scored_text(prompt: str, answer: str) -> str:
    """``prompt + answer`` with the trailing ``. " ) , ] space newline`` stripped from the answer."""
    return prompt + answer.rstrip(STRIP_CHARS)


def _encode(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
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


# ======================================================================== attribution


def _score_group(model: nn.Module, s: ModelSpec, lens: LogitLens, rec: Recorded, rho: Tensor,
                 chunk_size: int, bar, layers: frozenset[int]) -> dict[str, Tensor]:
    """Per-example scores of one recorded group: ffn (B, L, N), attn (B, L, A), layers (B, L).

    Neuron scores only in ``layers`` (NaN elsewhere); layer scores in every layer.
    """
    B, L = rec.x.shape[:2]
    ffn = torch.full((B, L, s.intermediate_size), float("nan"))
    attn = torch.full((B, L, s.attn_size), float("nan"))
    ffn_l = torch.empty(B, L)
    attn_l = torch.empty(B, L)
    t = rec.target
    for l in range(L):
        x, r = rec.x[:, l], rec.x[:, l] + rec.attn_out[:, l]  # (B, d)
        if l in layers:
            W_o = s.weight(model, l, VALUE_MODULES["attn"]).detach()  # (d, A)
            W_down = s.weight(model, l, VALUE_MODULES["ffn"]).detach()  # (d, N)
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
              chunk_size: int = 4096, progress: bool = False, layers: Sequence[int] | None = None,
              u_dtype: str = "float32") -> Attribution:
    """Neuron and layer attribution scores of ``model`` for ``pairs``, summed over the pairs.

    ``pairs`` are ``(prompt_text, answer_text)`` (see :func:`pktlib.data.prompt_answer_pairs`).
    ``normaliser`` is ``"rms"`` (the definition) or ``"original"`` (the original code's
    sqrt-of-std, see the module docstring); ``attn_coefficient`` is ``"summed"`` (the
    definition: ``o_proj``'s input) or ``"original"`` (the original code's self term of the
    predicting position, module docstring). ``batch_size`` examples share a forward pass
    (right padding; scores do not depend on it); ``chunk_size`` neurons share a (vocab x chunk)
    block of the unembedded value vectors. ``layers``: compute neuron scores only in these
    layers (the others are NaN; layer scores are always computed for every layer), see
    :func:`locate_layers`. ``u_dtype``: the dtype of the product ``U = E diag(g) W``
    (:class:`pktlib.lens.LogitLens`): ``"float32"`` (exact up to float32 rounding) or
    ``"bfloat16"`` (measurements only: it changes which
    neurons are selected at a real vocabulary, see :class:`pktlib.lens.LogitLens`).
    Log-sum-exps and layer scores are float32 either way. Returns float32 CPU tensors.

    Raises :class:`PktError` for an unknown normaliser, coefficient or ``u_dtype``, sizes below 1,
    no pairs, or a layer index outside the model.
    """
    rho_fn = _normaliser(normaliser)
    _check_attn_coefficient(attn_coefficient)
    if batch_size < 1 or chunk_size < 1:
        raise PktError(f"batch_size ({batch_size}) and chunk_size ({chunk_size}) must be >= 1")
    if len(pairs) == 0:
        raise PktError("attribute() needs at least one (prompt, answer) pair")
    s = spec(model)
    scored = _check_layers(layers, s.n_layers)
    device = next(model.parameters()).device
    lens = LogitLens.of(model, s, device, u_dtype=u_dtype)
    seqs = _encode(tokenizer, pairs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Sort by length so batches carry little padding; results are put back in the given order.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    group = max(batch_size, _GROUP_BYTES // bytes_per_example(s))
    was_training = model.training
    model.eval()
    per: dict[str, list[Tensor]] = {"ffn": [], "attn": [], "ffn_layers": [], "attn_layers": []}
    # each example counts twice: once for its forward pass, once for its scoring
    bar = tqdm(total=2 * len(seqs), desc="attribution (forward + scoring)", unit="step") if progress else None
    try:
        for g0 in range(0, len(order), group):
            idx = order[g0:g0 + group]
            parts = []
            for b0 in range(0, len(idx), batch_size):
                parts.append(record(model, s, [seqs[i] for i in idx[b0:b0 + batch_size]], pad_id, device,
                                     attn_coefficient))
                if bar is not None:
                    bar.update(len(parts[-1].target))
            rec = Recorded.cat(parts)
            rho = rho_fn(rec.h_final, s.norm_eps)  # (B,) fixed normaliser
            for k, v in _score_group(model, s, lens, rec, rho, chunk_size, bar, scored).items():
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
                           attn_coefficient=attn_coefficient, u_dtype=u_dtype)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    full = {k: torch.cat(v)[inv] for k, v in per.items()}  # back to the given order
    return Attribution(
        ffn=full["ffn"].sum(0), attn=full["attn"].sum(0),
        ffn_layers=full["ffn_layers"].sum(0), attn_layers=full["attn_layers"].sum(0),
        targets=targets, normaliser=normaliser, attn_coefficient=attn_coefficient, u_dtype=u_dtype,
        ffn_per_example=full["ffn"], attn_per_example=full["attn"],
        ffn_layers_per_example=full["ffn_layers"], attn_layers_per_example=full["attn_layers"],
    )


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> frozenset[int]:
    if layers is None:
        return frozenset(range(n_layers))
    bad = [l for l in layers if not 0 <= int(l) < n_layers]
    if bad:
        raise PktError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return frozenset(int(l) for l in layers)


def locate_layers(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], n_layers: int, *,
                  kind: str = "ffn", **kwargs) -> Attribution:
    """Attribution with neuron scores in the ``n_layers`` best layers of ``kind`` only.

    Two passes: layer scores of every layer (a forward pass and one lens per layer; no ``U``),
    then :func:`attribute` with ``layers=`` the :func:`~pktlib.selection.top_layers` of the
    summed ``kind`` layer scores. Every score it returns equals the full call's; the other
    layers' neuron scores are NaN. ``kwargs`` go to :func:`attribute` (not ``layers``). Costs
    about ``n_layers / L`` of a full call at a large vocabulary.
    """
    check_kind(kind)
    if "layers" in kwargs:
        raise PktError("locate_layers() picks the layers itself; call attribute(layers=...) to give them")
    first = attribute(model, tokenizer, pairs, layers=[], **{k: v for k, v in kwargs.items() if k != "progress"})
    best = top_layers(first.layer_scores(kind), n_layers)
    return attribute(model, tokenizer, pairs, layers=best, **kwargs)


# ======================================================================== files


def save_attribution(attribution: Attribution, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``attribution`` as safetensors, atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"normaliser": attribution.normaliser, "attn_coefficient": attribution.attn_coefficient,
            "u_dtype": attribution.u_dtype, **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(attribution.tensors(), str(tmp), metadata=meta)
    return path


def load_attribution(path: str | os.PathLike) -> Attribution:
    """Read a file written by :func:`save_attribution` (or ``pkt attribute``)."""
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
                       attn_coefficient=meta.get("attn_coefficient", "summed"), u_dtype=meta.get("u_dtype", "float32"))
