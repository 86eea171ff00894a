"""Representation similarity (CKA) between the layers of two models (DESIGN.md 4.6, paper Figure 3).

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
tokenizers and widths give one (n, d) matrix per layer over the *same texts*
(:func:`analysis_texts`).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pktlib.data import load_task, prompt_answer_pairs
from pktlib.errors import PktError
from pktlib.hooks import capture
from pktlib.models import TRANSFERRED_MODULES, ModelSpec, spec

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
    "module_representations",
    "cka_matrix",
    "analysis_texts",
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
    **{name: (lambda s, m, l, name=name: s.module(m, l, name)) for name in TRANSFERRED_MODULES},
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
    per layer. :func:`module_representations` reads several module types in the same passes.
    """
    return module_representations(model, tok, texts, [module], batch_size=batch_size, max_length=max_length,
                                  progress=progress)[module]


def module_representations(model: nn.Module, tok, texts: Sequence[str], modules: Sequence[str], *,
                           batch_size: int = 16, max_length: int | None = 512,
                           progress: bool = False) -> dict[str, Tensor]:
    """:func:`layer_representations` of every module type in ``modules`` from one forward pass
    per batch (a 1.5B model's pass costs minutes of CPU per batch: one per module type would
    multiply it). Returns module -> (layers, n, d)."""
    if len(texts) == 0:
        raise PktError("no texts given")
    if len(modules) == 0:
        raise PktError("no module types given")
    s = spec(model)
    sites = {f"{m}/{l}": _site(m)(s, model, l) for m in modules for l in range(s.n_layers)}
    device = next(model.parameters()).device
    per: dict[str, list[Tensor]] = {k: [] for k in sites}
    batches = tqdm(_batches(tok, list(texts), batch_size, max_length), total=math.ceil(len(texts) / batch_size),
                   desc=f"{', '.join(modules)} representations", disable=not progress)
    # Only hidden states are needed: skip the (T x vocab) logits where the model allows it.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for ids, mask in batches:
        mask_d = mask.to(device)
        with capture(model, sites, reduce=lambda t: _masked_mean(t, mask_d).cpu()) as acts:
            model(input_ids=ids.to(device), attention_mask=mask_d, use_cache=False, **extra)
        for k in sites:
            per[k].append(acts[k])  # (B, d)
    return {m: torch.stack([torch.cat(per[f"{m}/{l}"]) for l in range(s.n_layers)]) for m in modules}  # (L, n, d)


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


def analysis_texts(task: str = "all", n: int = 200, *, split: str = "test", seed: int = 0) -> list[str]:
    """``n`` texts (prompt + reference answer) for representation analyses.

    ``task="all"`` interleaves the pocket suite's three families (knowledge, math, code) so
    every kind of input is represented; a comma-separated list (``"mmlu,gsm8k,humaneval,mbpp"``)
    interleaves those tasks; any other value is one :func:`pktlib.data.load_task` name.
    Texts are taken in split order (the splits are already shuffled by their generators).
    """
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
