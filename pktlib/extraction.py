"""Extracting teacher parameters: slicing weights by neurons, Seeking sensitivity, importance.

Two families of extraction live here (DESIGN.md 4.3-4.5):

* neuron slicing for LaTen: a model's up/down/v/o weights restricted to selected layers and
  neurons (the grouped-query rule for v_proj rows comes from ``ModelSpec.v_row``);
* Seeking (Zhong et al. 2023): parameter sensitivity |theta * dL/dtheta|, layer choice by total
  sensitivity, and the best contiguous sub-matrix of a target shape (summed-area table).
"""
from __future__ import annotations

# ======================================================================== neuron slicing (LaTen)
# Imports of this section live here so the two sections can be edited independently.
from dataclasses import dataclass as _dataclass, field as _field  # noqa: E402
from typing import Any as _Any  # noqa: E402

import torch as _torch  # noqa: E402

from pktlib.errors import PktError as _PktError  # noqa: E402
from pktlib.hooks import with_grad as _with_grad  # noqa: E402
from pktlib.models import ModelSpec as _ModelSpec, spec as _spec  # noqa: E402

# The modules the paper transfers (DESIGN.md 4.3), in its vocabulary.
LATEN_MODULES: tuple[str, ...] = ("up_proj", "down_proj", "v_proj", "o_proj")
# Which kind of neuron indexes a module, and along which axis of its (out, in) weight:
# up/v hold a neuron in a row, down/o in a column.
NEURON_KIND: dict[str, str] = {"up_proj": "ffn", "gate_proj": "ffn", "down_proj": "ffn",
                               "v_proj": "attn", "o_proj": "attn"}
NEURON_AXIS: dict[str, int] = {"up_proj": 0, "gate_proj": 0, "down_proj": 1, "v_proj": 0, "o_proj": 1}


@_dataclass
class NeuronSlice:
    """Weights of selected neurons in selected layers, one stacked tensor per module.

    ``weights[m]`` is ``[L_sel, k, d]`` for row modules (up_proj, v_proj) and ``[L_sel, d, k]``
    for column modules (down_proj, o_proj), ``d`` the model's hidden size. Neuron ``i`` of
    layer ``j`` is the ``i``-th ranked neuron of the ``j``-th selected layer (layers ascending).
    """

    weights: dict[str, _torch.Tensor]
    ffn_layers: list[int]
    attn_layers: list[int]
    ffn_neurons: _torch.Tensor  # (L_sel, k_ffn) long
    attn_neurons: _torch.Tensor  # (L_sel, k_attn) long
    hidden_size: int
    meta: dict[str, _Any] = _field(default_factory=dict)

    def layers(self, module: str) -> list[int]:
        return self.ffn_layers if NEURON_KIND[module] == "ffn" else self.attn_layers

    def neurons(self, module: str) -> _torch.Tensor:
        return self.ffn_neurons if NEURON_KIND[module] == "ffn" else self.attn_neurons

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(w.shape) for m, w in self.weights.items()}


def weight_index(spec: _ModelSpec, module: str, neurons: _torch.Tensor) -> _torch.Tensor:
    """Indices along the neuron axis of ``module``'s weight for ``neurons`` (same shape).

    Only v_proj differs from the identity: with grouped-query attention attention neuron ``j``
    reads value row ``spec.v_row(j)``, so several neurons may map to one row (DESIGN.md 4.1).
    """
    if module not in NEURON_AXIS:
        raise _PktError(f"module {module!r} has no neuron axis; expected one of {sorted(NEURON_AXIS)}")
    return spec.v_row(neurons) if module == "v_proj" else neurons


def _check_selection(spec: _ModelSpec, sel: _Any) -> None:
    for kind, layers, neurons in (("ffn", sel.ffn_layers, sel.ffn_neurons), ("attn", sel.attn_layers, sel.attn_neurons)):
        if neurons.dim() != 2 or neurons.shape[0] != len(layers):
            raise _PktError(f"selection: {kind}_neurons has shape {tuple(neurons.shape)}; "
                            f"expected ({len(layers)}, k) for {kind}_layers={list(layers)}")
        bad = [l for l in layers if not 0 <= l < spec.n_layers]
        if bad:
            raise _PktError(f"selection: {kind} layers {bad} out of range for a {spec.n_layers}-layer model")
        n = spec.n_neurons(kind)
        if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= n):
            raise _PktError(f"selection: {kind} neuron indices span [{int(neurons.min())}, {int(neurons.max())}]; "
                            f"the model has {n} {kind} neurons per layer")


def slice_neurons(model: _torch.nn.Module, selection: _Any, *, modules: tuple[str, ...] = LATEN_MODULES,
                  dtype: _torch.dtype | None = None) -> NeuronSlice:
    """Slice ``model``'s weights by a selection (``pktlib.attribution.Selection`` or alike).

    ``selection`` has ``ffn_layers``/``attn_layers`` (lists, ascending) and ``ffn_neurons``
    ``(L_sel, k_ffn)`` / ``attn_neurons`` ``(L_sel, k_attn)`` (ranked neuron ids per layer).
    Returns detached copies (the teacher is never trained), cast to ``dtype`` if given.
    """
    s = _spec(model)
    _check_selection(s, selection)
    ffn_neurons = _torch.as_tensor(selection.ffn_neurons, dtype=_torch.long)
    attn_neurons = _torch.as_tensor(selection.attn_neurons, dtype=_torch.long)
    out: dict[str, _torch.Tensor] = {}
    for m in modules:
        kind = NEURON_KIND.get(m)
        if kind is None:
            raise _PktError(f"cannot slice module {m!r} by neurons; expected some of {sorted(NEURON_AXIS)}")
        layers = list(selection.ffn_layers if kind == "ffn" else selection.attn_layers)
        neurons = ffn_neurons if kind == "ffn" else attn_neurons
        axis = NEURON_AXIS[m]
        parts = []
        for j, l in enumerate(layers):
            w = s.weight(model, l, m).detach()  # (out, in)
            idx = weight_index(s, m, neurons[j]).to(w.device)
            parts.append(w.index_select(axis, idx))  # (k, d) for rows, (d, k) for columns
        if parts:
            t = _torch.stack(parts)
        else:  # no selected layer: keep the rank so shapes still say which axis is which
            t = _torch.empty((0, 0, s.hidden_size) if axis == 0 else (0, s.hidden_size, 0))
        out[m] = t.to(dtype) if dtype is not None else t.clone()
    return NeuronSlice(out, list(selection.ffn_layers), list(selection.attn_layers), ffn_neurons.cpu(),
                       attn_neurons.cpu(), s.hidden_size)


# ======================================================================== Seeking
# Zhong et al. 2023, "Seeking Neural Nuggets" (https://arxiv.org/abs/2310.11451), as the
# paper uses it (DESIGN.md 4.5). Imports of this section live here so the sections stay
# independent.
from contextlib import contextmanager as _contextmanager  # noqa: E402
from typing import Iterable as _Iterable, Iterator as _Iterator, Sequence as _Sequence  # noqa: E402

# Modules whose full sensitivity matrices are kept by default: the ones the paper transfers.
SEEKING_MODULES: tuple[str, ...] = ("up_proj", "down_proj", "v_proj", "o_proj")


@_dataclass
class Sensitivity:
    """Parameter sensitivity |theta * dL/dtheta| summed over examples (DESIGN.md 4.5).

    ``layer_totals[l]`` sums the sensitivity of *every* parameter of decoder layer ``l``
    (attention, FFN and norms), as the original code does for its layer choice. Full
    matrices are kept only for ``modules`` (``matrices[(l, name)]``, the weight's
    ``(out, in)`` shape, float32), which bounds memory to one copy of those weights.
    """

    layer_totals: _torch.Tensor  # (L,) float64
    matrices: dict[tuple[int, str], _torch.Tensor]
    n_examples: int
    modules: tuple[str, ...] = SEEKING_MODULES

    def matrix(self, layer: int, module: str) -> _torch.Tensor:
        key = (layer, module)
        if key not in self.matrices:
            kept = sorted({m for _, m in self.matrices})
            raise _PktError(f"no sensitivity matrix for layer {layer} {module}; kept modules: {kept}")
        return self.matrices[key]

    def top_layers(self, n: int) -> list[int]:
        return choose_layers(self.layer_totals, n)


def choose_layers(totals: _torch.Tensor, n: int) -> list[int]:
    """The ``n`` layers with the largest totals, in original (ascending) order.

    Ties go to the lower layer index (stable sort); ``n`` larger than the number of layers
    keeps them all.
    """
    totals = _torch.as_tensor(totals)
    if totals.dim() != 1:
        raise _PktError(f"layer totals must be 1-D, got shape {tuple(totals.shape)}")
    if n < 0:
        raise _PktError(f"cannot choose {n} layers")
    order = _torch.sort(totals, descending=True, stable=True).indices[: min(n, totals.numel())]
    return sorted(int(i) for i in order)


@_contextmanager
def _grad_sinks(params: dict[int, tuple[_torch.nn.Parameter, int, str | None]], totals: _torch.Tensor,
                sums: dict[tuple[int, str], _torch.Tensor]) -> _Iterator[None]:
    """Fold each parameter's gradient into the running sums as soon as it is accumulated.

    A ``post_accumulate_grad`` hook adds |theta * grad| to the sums and drops ``.grad`` at
    once, so at most the gradients autograd is still producing (about one layer's worth)
    exist beside the running sums: never the whole model's gradients.
    """

    def make(layer: int, key: tuple[int, str] | None):
        def fold(p: _torch.Tensor) -> None:
            with _torch.no_grad():
                s = (p.detach() * p.grad).abs_()
                totals[layer] += s.sum(dtype=_torch.float64).cpu()
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


@_with_grad
def sensitivity(model: _torch.nn.Module, tokenizer, examples: _Iterable, *,
                modules: _Sequence[str] = SEEKING_MODULES, max_length: int | None = None,
                progress: bool = True, **prompt_kwargs) -> Sensitivity:
    """Seeking sensitivity of ``model`` summed over ``examples`` (DESIGN.md 4.5).

    ``examples`` are :class:`pktlib.data.Example` or ``(prompt, answer)`` pairs. Per example,
    one forward/backward of the LM loss on the answer tokens (prompt labels masked, mean over
    answer tokens, as the model's own loss) gives dL/dtheta; |theta * dL/dtheta| is added to
    the running sums (absolute value per example, then summed). Only decoder-layer
    parameters take gradients; the model's ``requires_grad`` flags and mode are restored.
    Works inside ``torch.no_grad()`` (:func:`pktlib.hooks.with_grad`).
    """
    from pktlib.data import collate, tokenize_example

    s = _spec(model)
    bad = [m for m in modules if m not in NEURON_AXIS and m not in ("q_proj", "k_proj")]
    if bad:
        raise _PktError(f"unknown modules {bad} for sensitivity; expected names like {list(SEEKING_MODULES)}")
    examples = list(examples)
    if not examples:
        raise _PktError("sensitivity needs at least one example")
    # id(param) -> (param, layer, kept module name or None)
    params: dict[int, tuple[_torch.nn.Parameter, int, str | None]] = {}
    for l in range(s.n_layers):
        for p in s.layer(model, l).parameters():
            params[id(p)] = (p, l, None)
        for m in modules:
            w = s.weight(model, l, m)
            params[id(w)] = (w, l, m)
    dev = next(model.parameters()).device
    totals = _torch.zeros(s.n_layers, dtype=_torch.float64)
    sums = {(l, m): _torch.zeros(p.shape, dtype=_torch.float32, device=dev)
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
            it = examples
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(examples, desc="Seeking sensitivity", unit="ex", leave=False)
            for ex in it:
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
        raise _PktError(f"none of the {len(examples)} examples has an answer token to compute a loss on")
    return Sensitivity(totals, {k: v.cpu() for k, v in sums.items()}, n_used, tuple(modules))


def _sums(x: _torch.Tensor, dim: int) -> _torch.Tensor:
    """``x.sum(dim)`` as float64. Summed in the input's dtype: PyTorch's CPU reductions are
    cascaded (pairwise-blocked), so a float32 sum of 11008 elements is within about 2e-7 of the
    float64 one, at a quarter of the cost of converting every element first."""
    return x.sum(dim).to(_torch.float64)


def _window_offsets(x: _torch.Tensor, h: int, w: int) -> _torch.Tensor:
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
    f64 = _torch.float64
    G = _torch.zeros(a + 1, dtype=f64, device=x.device)
    _torch.cumsum(_sums(x[h:, :w], 1) - _sums(x[:a, :w], 1), 0, out=G[1:])  # (a+1,)
    H = _torch.zeros(b + 1, dtype=f64, device=x.device)
    _torch.cumsum(_sums(x[:h, w:], 0) - _sums(x[:h, :b], 0), 0, out=H[1:])  # (b+1,)
    Z = _torch.zeros(a + 1, b + 1, dtype=f64, device=x.device)
    if a and b:
        # Differences are taken in the input's dtype: each is rounded relative to itself.
        Y = (x[h:, w:] - x[h:, :b]) - (x[:a, w:] - x[:a, :b])  # (a, b)
        _torch.cumsum(Y, 1, dtype=f64, out=Z[1:, 1:])  # prefix over columns
        Z.cumsum_(0)  # prefix over rows, in place (out-of-place is twice as slow on a CPU)
    Z += G[:, None]
    Z += H[None, :]
    return Z


def _check_window(scores: _torch.Tensor, shape: tuple[int, int]) -> tuple[_torch.Tensor, int, int]:
    if scores.dim() != 2:
        raise _PktError(f"scores must be a matrix, got shape {tuple(scores.shape)}")
    R, C = scores.shape
    h, w = int(shape[0]), int(shape[1])
    if not (0 < h <= R and 0 < w <= C):
        raise _PktError(f"cannot fit a {h}x{w} sub-matrix in a {R}x{C} matrix (only reduction is supported)")
    if scores.dtype not in (_torch.float32, _torch.float64):
        scores = scores.to(_torch.float32)  # half-precision block sums would lose the ordering
    return scores, h, w


def window_sums(scores: _torch.Tensor, shape: tuple[int, int]) -> _torch.Tensor:
    """Sum of every contiguous ``shape`` sub-matrix of ``scores``: ``(R-h+1, C-w+1)`` float64.

    Entry ``[r, c]`` is ``scores[r:r+h, c:c+w].sum()``: the first window's sum plus
    :func:`_window_offsets` (a summed-area table over the parts that differ between windows;
    no Python loop over windows, accumulation in float64).
    """
    scores, h, w = _check_window(scores, shape)
    first = _sums(_sums(scores[:h, :w], 1), 0)  # the first window's sum, ()
    return _window_offsets(scores, h, w) + first


def best_submatrix(scores: _torch.Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the contiguous ``shape`` sub-matrix with the largest sum.

    All windows are compared at once; the sum every window shares (the first window's) is
    left out, since it cannot change which is largest. Ties go to the smallest ``(row, col)``
    in row-major order (``argmax`` returns the first maximum of the row-major flattening), as
    the original nested loop's strict ``>`` did.
    """
    scores, h, w = _check_window(scores, shape)
    offsets = _window_offsets(scores, h, w)  # (R-h+1, C-w+1), contiguous
    return divmod(int(_torch.argmax(offsets)), offsets.shape[1])


def svd_factors(mat: _torch.Tensor, r: int | None) -> tuple[_torch.Tensor, _torch.Tensor]:
    """Seeking's LoRA factors of ``mat`` (out, in): ``B = U_r S_r`` (out, r), ``A = V_r^T`` (r, in).

    ``B @ A`` is the best rank-``r`` approximation of ``mat``; ``r=None`` (or ``r`` at least
    the full rank) keeps every singular value. Computed in float64 for stability.
    """
    U, S, Vh = _torch.linalg.svd(mat.detach().to(_torch.float64), full_matrices=False)
    k = S.numel() if r is None else min(int(r), S.numel())
    if k <= 0:
        raise _PktError(f"rank must be positive, got {r}")
    B = (U[:, :k] * S[:k]).to(_torch.float32)  # (out, r)
    A = Vh[:k].to(_torch.float32)  # (r, in)
    return B, A


@_dataclass
class SeekingExtract:
    """Teacher matrices cut to the student's shapes, for each student layer and module.

    ``matrices[(j, m)]`` comes from teacher layer ``teacher_layers[j]`` (the j-th chosen
    layer, ascending); ``windows[(j, m)]`` is its top-left corner in the teacher's weight.
    """

    teacher_layers: list[int]
    matrices: dict[tuple[int, str], _torch.Tensor]
    windows: dict[tuple[int, str], tuple[int, int]]
    layer_totals: list[float]

    def to_record(self) -> dict[str, _Any]:
        return {
            "teacher_layers": list(self.teacher_layers),
            "layer_totals": list(self.layer_totals),
            "windows": {f"{j}.{m}": {"teacher_layer": self.teacher_layers[j], "row": r, "col": c,
                                     "shape": list(self.matrices[(j, m)].shape)}
                        for (j, m), (r, c) in self.windows.items()},
        }


def seeking_extract(teacher: _torch.nn.Module, sens: Sensitivity, student: _torch.nn.Module, *,
                    modules: _Sequence[str] | None = None, progress: bool = True) -> SeekingExtract:
    """Seeking extraction: the teacher's top-L_S layers, each module cut to the student's shape.

    ``L_S`` is the student's layer count; the j-th chosen teacher layer (ascending) serves
    student layer j. In each, the sub-matrix of the student weight's shape with the largest
    summed sensitivity is copied out of the teacher (detached, float32).
    """
    ts, ss = _spec(teacher), _spec(student)
    modules = tuple(modules or sens.modules)
    if ts.n_layers < ss.n_layers:
        raise _PktError(f"the teacher has {ts.n_layers} layers, fewer than the student's {ss.n_layers}: "
                        "Seeking only reduces")
    if sens.layer_totals.numel() != ts.n_layers:
        raise _PktError(f"sensitivity covers {sens.layer_totals.numel()} layers; the teacher has {ts.n_layers}")
    layers = choose_layers(sens.layer_totals, ss.n_layers)
    matrices, windows = {}, {}
    pairs = [(j, lt, m) for j, lt in enumerate(layers) for m in modules]
    it = pairs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc="Seeking extraction", unit="matrix", leave=False)
    for j, lt, m in it:
        target = tuple(ss.weight(student, j, m).shape)
        w_t = ts.weight(teacher, lt, m).detach()
        if target[0] > w_t.shape[0] or target[1] > w_t.shape[1]:
            raise _PktError(f"student {m} of layer {j} has shape {target}, larger than the teacher's "
                            f"{tuple(w_t.shape)} in layer {lt}: Seeking only reduces")
        r, c = best_submatrix(sens.matrix(lt, m), target)
        matrices[(j, m)] = w_t[r:r + target[0], c:c + target[1]].to(_torch.float32).cpu().clone()
        windows[(j, m)] = (r, c)
    return SeekingExtract(layers, matrices, windows, [float(v) for v in sens.layer_totals])
