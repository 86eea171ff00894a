"""Analyses of neural incompatibility: representation similarity (CKA), parametric structural
similarity of LoRA initialisations, and ranges of delta parameters (DESIGN.md 4.6).

CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited",
https://arxiv.org/abs/1905.00414). For representations ``X`` (n, d1) and ``Y`` (n, d2) of the
same n inputs, with Gram matrices ``K = k(X, X)``, ``L = l(Y, Y)`` and the centring matrix
``H = I - 11^T / n``::

    HSIC(K, L) = tr(K H L H) / (n - 1)^2
    CKA(K, L)  = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

With linear kernels ``HSIC = ||Y_c^T X_c||_F^2 / (n - 1)^2`` (``X_c`` column-centred), which is
what :func:`linear_cka` computes without forming n x n matrices. ``unbiased=True`` uses the
unbiased HSIC estimator of Song et al. 2012 ("Feature Selection via Dependence Maximization",
JMLR 13, eq. 5), which removes the positive bias of the plain estimator when n is not much
larger than the widths (the usual case when comparing 200 texts with 4096-wide layers).

Ethological similarity (:func:`cka_matrix`): every layer's output of one module type (or the
residual stream), averaged over each text's non-pad tokens, so two models with different
tokenizers and widths give one (n, d) matrix per layer over the *same texts*.

Parametric structural similarity (:func:`structural_similarity`): for each LoRA module, the
cosine between the flattened product ``scale * B A`` and the original weight ``W`` (= base +
``scale * B A`` for initialisations that keep the model unchanged), and between ``B A`` and
the residual base weight ``W - B A``.

Delta ranges (:func:`delta_stats`): quantiles, extremes and the share of values inside
+-0.002 and +-0.005 of SFT deltas (chat - base, :func:`sft_deltas`) and of parameters
extracted by Seeking (:func:`seeking_deltas`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from pktlib.errors import PktError
from pktlib.hooks import capture
from pktlib.models import ModelSpec, spec

__all__ = [
    "hsic",
    "gram_linear",
    "gram_rbf",
    "cka_from_grams",
    "linear_cka",
    "centre",
    "rbf_cka",
    "cka_grid",
    "REPRESENTATION_SITES",
    "layer_representations",
    "cka_matrix",
    "structural_cosines",
    "structural_similarity",
    "DeltaStats",
    "delta_stats",
    "delta_histogram",
    "sft_deltas",
    "seeking_deltas",
    "apply_deltas",
    "analysis_texts",
    "DELTA_MODULES",
]

REFERENCE_URL = "https://arxiv.org/abs/1905.00414"

# ============================================================================ CKA core


def _as_2d_f64(x: Tensor | Sequence, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise PktError(f"{name} must be 2-D (n, d); got shape {tuple(x.shape)}")
    return x


def _check_pair(x: Tensor, y: Tensor, *, unbiased: bool) -> None:
    if x.shape[0] != y.shape[0]:
        raise PktError(f"x and y must describe the same inputs: got n={x.shape[0]} and n={y.shape[0]}")
    if unbiased and x.shape[0] < 4:
        raise PktError(f"the unbiased HSIC estimator needs n >= 4 inputs; got n={x.shape[0]}")
    if x.shape[0] < 2:
        raise PktError(f"CKA needs at least 2 inputs; got n={x.shape[0]}")


def gram_linear(x: Tensor) -> Tensor:
    """Linear kernel ``X X^T`` (n, n) of x (n, d).

    CKA is translation invariant, but Gram matrices of uncentred features are not numerically
    so: a common offset ``c`` adds ``~ d c^2`` to every entry and the estimators then subtract
    large, nearly equal numbers (the unbiased one gave 0.866 for identical representations
    offset by 3e3). :func:`linear_cka` and :func:`cka_grid` therefore centre the features
    (:func:`centre`) before forming it.
    """
    return x @ x.T


def centre(x: Tensor) -> Tensor:
    """``x`` (n, d) minus its column means: the features every CKA kernel here sees."""
    return x - x.mean(0, keepdim=True)


def gram_rbf(x: Tensor, sigma: float | None = None) -> Tensor:
    """RBF kernel ``exp(-||x_i - x_j||^2 / (2 sigma^2))`` (n, n).

    ``sigma=None``: the median heuristic, sigma = sqrt(median of the off-diagonal squared
    distances) (Kornblith et al. 2019, section 4 use a multiple of the median distance).
    """
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)  # (n, n) squared distances
    if sigma is None:
        n = x.shape[0]
        off = d2[~torch.eye(n, dtype=torch.bool)]
        med = off.median().item()
        # Identical rows everywhere: any bandwidth gives the all-ones kernel; avoid 0 / 0.
        sigma = math.sqrt(med) if med > 0 else 1.0
    if sigma <= 0:
        raise PktError(f"rbf sigma must be positive; got {sigma}")
    return torch.exp(-d2 / (2 * sigma**2))


def hsic(k: Tensor, l: Tensor, *, unbiased: bool = False) -> Tensor:
    """HSIC of two (n, n) Gram matrices (float64 scalar).

    biased: ``tr(K H L H) / (n-1)^2``. unbiased (Song et al. 2012): with ``K~``, ``L~`` the
    Gram matrices with zeroed diagonals,
    ``[tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))``.
    """
    n = k.shape[0]
    if not unbiased:
        kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()  # H K H
        return (kc * l).sum() / (n - 1) ** 2  # tr(HKH L) = tr(K H L H)
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    ones_k, ones_l = k.sum(0), l.sum(0)  # (n,) column sums: 1^T K~ and 1^T L~
    term1 = (k * l).sum()  # tr(K~ L~) (both symmetric)
    term2 = k.sum() * l.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones_k @ ones_l)  # 1^T K~ L~ 1
    return (term1 + term2 - term3) / (n * (n - 3))


def cka_from_grams(k: Tensor, l: Tensor, *, unbiased: bool = False) -> float:
    """CKA from Gram matrices: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

    Linear Gram matrices should come from centred features (:func:`centre`, see :func:`gram_linear`).
    """
    num = hsic(k, l, unbiased=unbiased)
    den = torch.sqrt(hsic(k, k, unbiased=unbiased) * hsic(l, l, unbiased=unbiased))
    # A constant representation has no variance to compare: CKA is undefined, report NaN.
    return float(num / den) if den > 0 else float("nan")


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA of x (n, d1) and y (n, d2), computed in float64.

    The biased form works in feature space (``||Y_c^T X_c||_F^2``), never forming an n x n
    matrix; the unbiased form needs the Gram matrices (Song et al. 2012).
    """
    x, y = _as_2d_f64(x, "x"), _as_2d_f64(y, "y")
    _check_pair(x, y, unbiased=unbiased)
    xc, yc = centre(x), centre(y)  # (n, d1), (n, d2); CKA does not change, its rounding does
    if unbiased:
        return cka_from_grams(gram_linear(xc), gram_linear(yc), unbiased=True)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(num / den) if den > 0 else float("nan")


def rbf_cka(x: Tensor, y: Tensor, sigma: float | None = None, *, unbiased: bool = False) -> float:
    """CKA with RBF kernels on x (n, d1) and y (n, d2); ``sigma=None`` is the median heuristic
    (chosen separately for each representation)."""
    x, y = _as_2d_f64(x, "x"), _as_2d_f64(y, "y")
    _check_pair(x, y, unbiased=unbiased)
    return cka_from_grams(gram_rbf(x, sigma), gram_rbf(y, sigma), unbiased=unbiased)


KERNELS: dict[str, Callable[..., Tensor]] = {"linear": gram_linear, "rbf": gram_rbf}


def cka_grid(reps_a: Sequence[Tensor], reps_b: Sequence[Tensor], *, kernel: str = "linear",
             unbiased: bool = False) -> Tensor:
    """CKA of every pair of layers: reps_a[i] (n, d_a), reps_b[j] (n, d_b) -> (len_a, len_b).

    Each Gram matrix (n x n) is computed once and reused for the whole row/column.
    """
    if kernel not in KERNELS:
        raise PktError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    # Centred features (translation invariance, see gram_linear); the RBF kernel is already invariant.
    ga = [KERNELS[kernel](centre(_as_2d_f64(r, f"reps_a[{i}]"))) for i, r in enumerate(reps_a)]
    gb = [KERNELS[kernel](centre(_as_2d_f64(r, f"reps_b[{j}]"))) for j, r in enumerate(reps_b)]
    if ga and gb:
        _check_pair(ga[0], gb[0], unbiased=unbiased)
    self_a = [hsic(g, g, unbiased=unbiased) for g in ga]
    self_b = [hsic(g, g, unbiased=unbiased) for g in gb]
    out = torch.full((len(ga), len(gb)), float("nan"), dtype=torch.float64)
    for i, ki in enumerate(ga):
        for j, lj in enumerate(gb):
            den = torch.sqrt(self_a[i] * self_b[j])
            if den > 0:
                out[i, j] = hsic(ki, lj, unbiased=unbiased) / den
    return out


# ============================================================================ representations

# Where a representation is read, per layer: a module output of the paper's four transferred
# modules, or the residual stream after the whole decoder layer.
REPRESENTATION_SITES: dict[str, Callable[[ModelSpec, nn.Module, int], nn.Module]] = {
    "up_proj": lambda s, m, l: s.module(m, l, "up_proj"),
    "down_proj": lambda s, m, l: s.module(m, l, "down_proj"),
    "v_proj": lambda s, m, l: s.module(m, l, "v_proj"),
    "o_proj": lambda s, m, l: s.module(m, l, "o_proj"),
    "residual": lambda s, m, l: s.layer(m, l),
}


def _site(module: str) -> Callable[[ModelSpec, nn.Module, int], nn.Module]:
    if module not in REPRESENTATION_SITES:
        raise PktError(f"unknown module {module!r}; expected one of {sorted(REPRESENTATION_SITES)}")
    return REPRESENTATION_SITES[module]


def _masked_mean(t: Tensor, mask: Tensor) -> Tensor:
    """Mean over the non-pad tokens: t (B, T, d), mask (B, T) -> (B, d) float64."""
    m = mask.to(t.device, torch.float64).unsqueeze(-1)  # (B, T, 1)
    return (t.to(torch.float64) * m).sum(1) / m.sum(1).clamp_min(1)


def _batches(tok, texts: Sequence[str], batch_size: int, max_length: int | None):
    """Right-padded batches (input_ids, attention_mask); right padding keeps every real
    token's causal context identical to the unpadded text."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = [tok(t, truncation=max_length is not None, max_length=max_length)["input_ids"] for t in chunk]
        if any(len(e) == 0 for e in enc):
            bad = [chunk[i] for i, e in enumerate(enc) if len(e) == 0]
            raise PktError(f"texts tokenise to nothing: {bad[:3]!r}")
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        yield ids, mask


@torch.no_grad()
def layer_representations(model: nn.Module, tok, texts: Sequence[str], *, module: str = "residual",
                          batch_size: int = 16, max_length: int | None = 512,
                          progress: bool = False) -> Tensor:
    """Per-layer representations of ``texts``: (layers, n, d) float64.

    Each layer's ``module`` output is averaged over each text's non-pad tokens inside the hook
    (``capture(reduce=...)``), so memory is bounded by one batch of activations plus (n, d)
    per layer.
    """
    if len(texts) == 0:
        raise PktError("no texts given")
    s = spec(model)
    site = _site(module)
    modules = {str(l): site(s, model, l) for l in range(s.n_layers)}
    device = next(model.parameters()).device
    per_layer: list[list[Tensor]] = [[] for _ in range(s.n_layers)]
    batches = _batches(tok, list(texts), batch_size, max_length)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(texts) / batch_size), desc=f"{module} representations")
    # Only hidden states are needed: skip the (T x vocab) logits where the model allows it.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for ids, mask in batches:
        mask_d = mask.to(device)
        with capture(model, modules, reduce=lambda t: _masked_mean(t, mask_d).cpu()) as acts:
            model(input_ids=ids.to(device), attention_mask=mask_d, use_cache=False, **extra)
        for l in range(s.n_layers):
            per_layer[l].append(acts[str(l)])  # (B, d)
    return torch.stack([torch.cat(chunks) for chunks in per_layer])  # (L, n, d)


def cka_matrix(model_a: nn.Module, tok_a, model_b: nn.Module, tok_b, texts: Sequence[str], *,
               module: str = "up_proj", batch_size: int = 16, kernel: str = "linear",
               unbiased: bool = False, max_length: int | None = 512, progress: bool = False) -> Tensor:
    """Layer-by-layer CKA between two models on the same texts: (layers_a, layers_b).

    Each model reads the texts with its own tokenizer; representations are token means, so
    models of different widths and vocabularies compare (ethological similarity, paper Fig. 3).
    """
    ra = layer_representations(model_a, tok_a, texts, module=module, batch_size=batch_size,
                               max_length=max_length, progress=progress)
    rb = layer_representations(model_b, tok_b, texts, module=module, batch_size=batch_size,
                               max_length=max_length, progress=progress)
    return cka_grid(list(ra), list(rb), kernel=kernel, unbiased=unbiased)


# ============================================================================ structural similarity


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
    import pandas as pd
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    s = spec(base)
    rows = []
    for l in range(s.n_layers):
        for name in DELTA_MODULES_ALL:
            mod = s.module(base, l, name)
            if not isinstance(mod, LoraLayer):
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


# ============================================================================ delta ranges

DELTA_MODULES: tuple[str, ...] = ("up_proj", "down_proj", "v_proj", "o_proj")  # the paper's transferred modules
DELTA_MODULES_ALL: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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
    import numpy as np  # torch.quantile refuses inputs above 16M elements

    qs = np.quantile(pool.numpy(), list(quantiles))
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


def apply_deltas(model: nn.Module, deltas: Mapping[tuple[int, str], Tensor], *, scale: float = 1.0) -> nn.Module:
    """A copy of ``model`` with whole-matrix deltas added: W[(l, m)] += scale * delta (out, in).

    (Neuron-level deltas go through :mod:`pktlib.injection`; this adds full matrices, as SFT
    deltas and Seeking's extracted sub-matrices are.)
    """
    import copy

    s = spec(model)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (l, name), d in deltas.items():
            w = s.weight(out, l, name)
            if tuple(d.shape) != tuple(w.shape):
                raise PktError(f"delta for layer {l} {name} has shape {tuple(d.shape)}; the weight is {tuple(w.shape)}")
            w.add_(d.to(w.dtype).to(w.device), alpha=scale)
    return out


def analysis_texts(task: str = "all", n: int = 200, *, split: str = "test", seed: int = 0) -> list[str]:
    """``n`` texts (prompt + reference answer) for representation analyses.

    ``task="all"`` interleaves the pocket suite's three families (knowledge, math, code) so
    every kind of input is represented; a comma-separated list (``"mmlu,gsm8k,humaneval,mbpp"``)
    interleaves those tasks; any other value is one :func:`pktlib.data.load_task` name.
    Texts are taken in split order (the splits are already shuffled by their generators).
    """
    from pktlib.data import load_task, prompt_answer_pairs

    if n < 2:
        raise PktError(f"need at least 2 texts for CKA; got n={n}")
    tasks = (["pocket-knowledge", "pocket-math", "pocket-code"] if task == "all"
             else [t.strip() for t in task.split(",") if t.strip()])
    per = [[p + a for p, a in prompt_answer_pairs(load_task(t, split, limit=n))] for t in tasks]
    out = [x for group in zip(*per) for x in group] if len(per) > 1 else per[0]
    if len(out) < n:  # unequal families: top up from the longest lists in order
        seen = set(out)
        out += [x for group in per for x in group if x not in seen]
    if len(out) < n:
        raise PktError(f"task {task!r} split {split!r} has only {len(out)} texts; asked for {n}")
    return out[:n]


def sft_deltas(base: nn.Module, chat: nn.Module, modules: Sequence[str] = DELTA_MODULES,
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


def seeking_deltas(extracted: Mapping[object, Tensor], modules: Sequence[str] = DELTA_MODULES,
                   ) -> dict[object, Tensor]:
    """The deltas Seeking adds to the student: the extracted teacher sub-matrices themselves.

    Accepts the mapping produced by Seeking extraction (keys (layer, module) or module-path
    strings -> tensors) and keeps the entries of ``modules``; Seeking without training adds
    these to the student's weights, so their range is what Figures 7-9 compare with SFT deltas.
    """
    def mod_of(key) -> str | None:
        name = key[-1] if isinstance(key, tuple) else str(key)
        return next((m for m in modules if m in str(name)), None)

    extracted = getattr(extracted, "matrices", extracted)  # a pktlib.extraction.SeekingExtract too
    out = {k: torch.as_tensor(v).detach().float().cpu() for k, v in extracted.items() if mod_of(k)}
    if not out:
        raise PktError(f"no extracted tensors for modules {list(modules)}; keys: {list(extracted)[:6]}")
    return out
