"""Seeking (Zhong et al. 2023, "Seeking Neural Nuggets", https://arxiv.org/abs/2310.11451), as the
paper uses it (DESIGN.md 4.5): parameter sensitivity |theta * dL/dtheta|, the choice of teacher
layers by total sensitivity, and the best contiguous sub-matrix of a target shape (summed-area
table), cut out of the teacher for each student layer and module.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from pktlib.selection import top_layers
from pktlib.data import collate, load_task, tokenize_example
from pktlib.errors import PktError
from pktlib.hooks import with_grad
from pktlib.models import MODULES, TRANSFERRED_MODULES, spec

__all__ = ["Sensitivity", "as_examples", "sensitivity", "window_sums", "best_submatrix", "svd_factors", "SeekingExtract",
           "seeking_extract"]


@dataclass
class Sensitivity:
    """Parameter sensitivity |theta * dL/dtheta| summed over examples (DESIGN.md 4.5).

    ``layer_totals[l]`` sums the sensitivity of *every* parameter of decoder layer ``l``
    (attention, FFN and norms), as the original code does for its layer choice. Full
    matrices are kept only for ``modules`` (``matrices[(l, name)]``, the weight's
    ``(out, in)`` shape, float32), which bounds memory to one copy of those weights.
    """

    layer_totals: torch.Tensor  # (L,) float64
    matrices: dict[tuple[int, str], torch.Tensor]
    n_examples: int
    modules: tuple[str, ...] = TRANSFERRED_MODULES

    def matrix(self, layer: int, module: str) -> torch.Tensor:
        key = (layer, module)
        if key not in self.matrices:
            kept = sorted({m for _, m in self.matrices})
            raise PktError(f"no sensitivity matrix for layer {layer} {module}; kept modules: {kept}")
        return self.matrices[key]

    def top_layers(self, n: int) -> list[int]:
        return top_layers(self.layer_totals, n)


def as_examples(extract: Any) -> list | Sensitivity | None:
    """Extract examples from a task name (its ``extract`` split), Examples or (prompt, answer) pairs;
    a precomputed :class:`Sensitivity` (or None) is passed through, for callers that accept either."""
    if extract is None or isinstance(extract, Sensitivity):
        return extract
    if isinstance(extract, str):
        return load_task(extract, "extract")
    return list(extract)


@contextmanager
def _grad_sinks(params: dict[int, tuple[torch.nn.Parameter, int, str | None]], totals: torch.Tensor,
                sums: dict[tuple[int, str], torch.Tensor]) -> Iterator[None]:
    """Fold each parameter's gradient into the running sums as soon as it is accumulated.

    A ``post_accumulate_grad`` hook adds |theta * grad| to the sums and drops ``.grad`` at
    once, so at most the gradients autograd is still producing (about one layer's worth)
    exist beside the running sums: never the whole model's gradients.
    """

    def make(layer: int, key: tuple[int, str] | None):
        def fold(p: torch.Tensor) -> None:
            with torch.no_grad():
                s = (p.detach() * p.grad).abs_()
                totals[layer] += s.sum(dtype=torch.float64).cpu()
                if key is not None:
                    sums[key] += s.to(sums[key].dtype).to(sums[key].device)
            p.grad = None

        return fold

    handles = []
    try:
        for p, layer, name in params.values():
            handles.append(p.register_post_accumulate_grad_hook(make(layer, (layer, name) if name else None)))
        yield
    finally:
        for h in handles:
            h.remove()


@with_grad
def sensitivity(model: torch.nn.Module, tokenizer, examples: Iterable, *,
                modules: Sequence[str] = TRANSFERRED_MODULES, max_length: int | None = None,
                progress: bool = True, **prompt_kwargs) -> Sensitivity:
    """Seeking sensitivity of ``model`` summed over ``examples`` (DESIGN.md 4.5).

    ``examples`` are :class:`pktlib.data.Example` or ``(prompt, answer)`` pairs. Per example,
    one forward/backward of the LM loss on the answer tokens (prompt labels masked, mean over
    answer tokens, as the model's own loss) gives dL/dtheta; |theta * dL/dtheta| is added to
    the running sums (absolute value per example, then summed). Only decoder-layer
    parameters take gradients; the model's ``requires_grad`` flags and mode are restored.
    Works inside ``torch.no_grad()`` (:func:`pktlib.hooks.with_grad`).
    """
    s = spec(model)
    bad = [m for m in modules if m not in MODULES]
    if bad:
        raise PktError(f"unknown modules {bad} for sensitivity; expected some of {sorted(MODULES)}")
    examples = list(examples)
    if not examples:
        raise PktError("sensitivity needs at least one example")
    # id(param) -> (param, layer, kept module name or None)
    params: dict[int, tuple[torch.nn.Parameter, int, str | None]] = {}
    for l in range(s.n_layers):
        for p in s.layer(model, l).parameters():
            params[id(p)] = (p, l, None)
        for m in modules:
            w = s.weight(model, l, m)
            params[id(w)] = (w, l, m)
    dev = next(model.parameters()).device
    totals = torch.zeros(s.n_layers, dtype=torch.float64)
    sums = {(l, m): torch.zeros(p.shape, dtype=torch.float32, device=dev)
            for p, l, m in params.values() if m is not None}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_used = 0
    try:
        model.eval()  # no dropout: the sensitivity is a property of the weights
        for p in model.parameters():
            p.requires_grad_(id(p) in params)
        with _grad_sinks(params, totals, sums):
            for ex in tqdm(examples, desc="Seeking sensitivity", unit="ex", leave=False, disable=not progress):
                item = tokenize_example(tokenizer, ex, max_length=max_length, **prompt_kwargs)
                if not any(t != -100 for t in item["labels"]):
                    continue  # no answer token left (e.g. truncated away): no loss to differentiate
                batch = collate([item], pad).to(dev)
                loss = model(**batch.model_inputs()).loss
                loss.backward()
                n_used += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    if n_used == 0:
        raise PktError(f"none of the {len(examples)} examples has an answer token to compute a loss on")
    return Sensitivity(totals, {k: v.cpu() for k, v in sums.items()}, n_used, tuple(modules))


def _sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` as float64. Summed in the input's dtype: PyTorch's CPU reductions are
    cascaded (pairwise-blocked), so a float32 sum of 11008 elements is within about 2e-7 of the
    float64 one, at a quarter of the cost of converting every element first."""
    return x.sum(dim).to(torch.float64)


def _window_offsets(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Every ``h x w`` window's sum minus the first window's: ``(R-h+1, C-w+1)`` float64.

    Moving the window from (0, 0) to (r, c) enters rows h..h+r-1 and leaves rows 0..r-1 (over
    the first w columns): ``G[r]``; enters columns w..w+c-1 and leaves columns 0..c-1 (over the
    first h rows): ``H[c]``; and the four corner blocks both moves touch are counted by the 2-D
    prefix sum ``Z[r, c]`` of ``(x[h+k, w+l] - x[h+k, l]) - (x[k, w+l] - x[k, l])``. So
    ``sum(r, c) - sum(0, 0) = G[r] + H[c] + Z[r, c]``. Only the elements outside the block that
    every window shares are read, and the only 2-D prefix sum is over the (R-h) x (C-w) corner
    difference, small when the windows are large (Seeking's case: 2816 x 1024 of 13824 x 5120).
    """
    R, C = x.shape
    a, b = R - h, C - w  # window positions beyond the first, down and right
    f64 = torch.float64
    G = torch.zeros(a + 1, dtype=f64, device=x.device)
    torch.cumsum(_sums(x[h:, :w], 1) - _sums(x[:a, :w], 1), 0, out=G[1:])  # (a+1,)
    H = torch.zeros(b + 1, dtype=f64, device=x.device)
    torch.cumsum(_sums(x[:h, w:], 0) - _sums(x[:h, :b], 0), 0, out=H[1:])  # (b+1,)
    Z = torch.zeros(a + 1, b + 1, dtype=f64, device=x.device)
    if a and b:
        # Differences are taken in the input's dtype: each is rounded relative to itself.
        Y = (x[h:, w:] - x[h:, :b]) - (x[:a, w:] - x[:a, :b])  # (a, b)
        torch.cumsum(Y, 1, dtype=f64, out=Z[1:, 1:])  # prefix over columns
        Z.cumsum_(0)  # prefix over rows, in place (out-of-place is twice as slow on a CPU)
    Z += G[:, None]
    Z += H[None, :]
    return Z


def _check_window(scores: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    if scores.dim() != 2:
        raise PktError(f"scores must be a matrix, got shape {tuple(scores.shape)}")
    R, C = scores.shape
    h, w = int(shape[0]), int(shape[1])
    if not (0 < h <= R and 0 < w <= C):
        raise PktError(f"cannot fit a {h}x{w} sub-matrix in a {R}x{C} matrix (only reduction is supported)")
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.to(torch.float32)  # half-precision block sums would lose the ordering
    return scores, h, w


def window_sums(scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sum of every contiguous ``shape`` sub-matrix of ``scores``: ``(R-h+1, C-w+1)`` float64.

    Entry ``[r, c]`` is ``scores[r:r+h, c:c+w].sum()``: the first window's sum plus
    :func:`_window_offsets` (a summed-area table over the parts that differ between windows;
    no Python loop over windows, accumulation in float64).
    """
    scores, h, w = _check_window(scores, shape)
    first = _sums(_sums(scores[:h, :w], 1), 0)  # the first window's sum, ()
    return _window_offsets(scores, h, w) + first


def best_submatrix(scores: torch.Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the contiguous ``shape`` sub-matrix with the largest sum.

    All windows are compared at once; the sum every window shares (the first window's) is
    left out, since it cannot change which is largest. Ties go to the smallest ``(row, col)``
    in row-major order (``argmax`` returns the first maximum of the row-major flattening), as
    the original nested loop's strict ``>`` did.
    """
    scores, h, w = _check_window(scores, shape)
    offsets = _window_offsets(scores, h, w)  # (R-h+1, C-w+1), contiguous
    return divmod(int(torch.argmax(offsets)), offsets.shape[1])


def svd_factors(mat: torch.Tensor, r: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeking's LoRA factors of ``mat`` (out, in): ``B = U_r S_r`` (out, r), ``A = V_r^T`` (r, in).

    ``B @ A`` is the best rank-``r`` approximation of ``mat``; ``r=None`` (or ``r`` at least
    the full rank) keeps every singular value. Computed in float64 for stability.
    """
    U, S, Vh = torch.linalg.svd(mat.detach().to(torch.float64), full_matrices=False)
    k = S.numel() if r is None else min(int(r), S.numel())
    if k <= 0:
        raise PktError(f"rank must be positive, got {r}")
    B = (U[:, :k] * S[:k]).to(torch.float32)  # (out, r)
    A = Vh[:k].to(torch.float32)  # (r, in)
    return B, A


@dataclass
class SeekingExtract:
    """Teacher matrices cut to the student's shapes, for each student layer and module.

    ``matrices[(j, m)]`` comes from teacher layer ``teacher_layers[j]`` (the j-th chosen
    layer, ascending); ``windows[(j, m)]`` is its top-left corner in the teacher's weight.
    """

    teacher_layers: list[int]
    matrices: dict[tuple[int, str], torch.Tensor]
    windows: dict[tuple[int, str], tuple[int, int]]
    layer_totals: list[float]

    def to_record(self) -> dict[str, Any]:
        return {
            "teacher_layers": list(self.teacher_layers),
            "layer_totals": list(self.layer_totals),
            "windows": {f"{j}.{m}": {"teacher_layer": self.teacher_layers[j], "row": r, "col": c,
                                     "shape": list(self.matrices[(j, m)].shape)}
                        for (j, m), (r, c) in self.windows.items()},
        }


def seeking_extract(teacher: torch.nn.Module, sens: Sensitivity, student: torch.nn.Module, *,
                    modules: Sequence[str] | None = None, progress: bool = True) -> SeekingExtract:
    """Seeking extraction: the teacher's top-L_S layers, each module cut to the student's shape.

    ``L_S`` is the student's layer count; the j-th chosen teacher layer (ascending) serves
    student layer j. In each, the sub-matrix of the student weight's shape with the largest
    summed sensitivity is copied out of the teacher (detached, float32).
    """
    ts, ss = spec(teacher), spec(student)
    modules = tuple(modules or sens.modules)
    if ts.n_layers < ss.n_layers:
        raise PktError(f"the teacher has {ts.n_layers} layers, fewer than the student's {ss.n_layers}: "
                        "Seeking only reduces")
    if sens.layer_totals.numel() != ts.n_layers:
        raise PktError(f"sensitivity covers {sens.layer_totals.numel()} layers; the teacher has {ts.n_layers}")
    layers = top_layers(sens.layer_totals, ss.n_layers)
    matrices, windows = {}, {}
    pairs = [(j, lt, m) for j, lt in enumerate(layers) for m in modules]
    for j, lt, m in tqdm(pairs, desc="Seeking extraction", unit="matrix", leave=False, disable=not progress):
        target = tuple(ss.weight(student, j, m).shape)
        w_t = ts.weight(teacher, lt, m).detach()
        if target[0] > w_t.shape[0] or target[1] > w_t.shape[1]:
            raise PktError(f"student {m} of layer {j} has shape {target}, larger than the teacher's "
                            f"{tuple(w_t.shape)} in layer {lt}: Seeking only reduces")
        r, c = best_submatrix(sens.matrix(lt, m), target)
        matrices[(j, m)] = w_t[r:r + target[0], c:c + target[1]].to(torch.float32).cpu().clone()
        windows[(j, m)] = (r, c)
    return SeekingExtract(layers, matrices, windows, [float(v) for v in sens.layer_totals])
