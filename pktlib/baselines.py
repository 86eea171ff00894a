"""Unaligned Pre-Align baselines (paper Section 3, Figure 2, Appendix B; DESIGN.md 4.4).

The teacher's parameters are cut down to the student's shapes and *added* to the student
(``theta_S + delta``) with no training at all. Three independent choices make the grid:

* **layers** -- which ``L_S`` teacher layers feed the student's ``L_S`` layers (the j-th
  chosen teacher layer, ascending, serves student layer j): ``top`` (largest total Seeking
  sensitivity on the extract examples; *not* logit-lens attribution), ``bottom`` (the first
  ``L_S``), ``random`` (seeded);
* **hidden** -- a linear map ``P`` (d_T, d_S) applied along every weight's hidden-size axis:
  ``pca`` (top-d_S principal directions of the teacher's centred token embeddings),
  ``whitening`` (BERT-whitening, Su et al. 2021: ``W = U diag(1/sqrt(S))`` of the embedding
  covariance, first d_S columns) and ``embedding`` (``T = argmin ||E_T T - E_S||_F =
  pinv(E_T) E_S`` on the shared vocabulary);
* **neurons** -- which ``N_S`` of the teacher's ``N_T`` neurons are kept along the other
  axis: ``random`` (seeded) or ``importance`` (largest mean |w| over the neuron's weights in
  the transferred modules), kept in ascending index order.

Conventions (the paper gives no more detail; these are ours): each neuron's weight vector
in the hidden space is mapped like a token embedding, ``v -> v @ P``, so an input-side weight
``W`` (N, d_T) becomes ``W @ P`` and an output-side weight (d_T, N) becomes ``P^T @ W``. The
embedding mean is *not* subtracted from weights (a weight is a linear map; the mean is a
translation of activations). Neuron groups share one selection: FFN neurons (rows of
up/gate, columns of down); attention neurons (rows of q, columns of o); key/value rows
(rows of k, v) join the attention group when neither model uses grouped-query attention,
and are chosen on their own otherwise.

``seeking_transfer`` is the paper's "Seeking without training": Seeking's extraction
(:mod:`pktlib.seeking`), as a rank-r product ``B A`` by default, added to the student.

Variants are string values dispatched through the registries :data:`LAYER_CHOICES`,
:data:`HIDDEN_REDUCTIONS` and :data:`NEURON_REDUCTIONS`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from pktlib.errors import PktError
from pktlib.injection import apply_deltas
from pktlib.models import MODULES, TRANSFERRED_MODULES, ModelSpec, check_pair, resolve_model
from pktlib.records import atomic_dir, to_jsonable, write_json
from pktlib.seeking import Sensitivity, as_examples, seeking_extract, sensitivity, svd_factors

__all__ = [
    "LAYER_CHOICES",
    "HIDDEN_REDUCTIONS",
    "NEURON_REDUCTIONS",
    "TransferRecord",
    "pca_map",
    "whitening_map",
    "embedding_map",
    "neuron_importance",
    "unaligned_transfer",
    "seeking_transfer",
    "grid",
    "save_model",
]

# A module's neuron group is what its neuron axis counts (``pktlib.models.MODULES[m].axis_kind``:
# ffn, attn or kv); "kv" merges into "attn" without grouped-query attention (module docstring).


# ------------------------------------------------------------------------------ registries
def _register(registry: dict[str, Callable], name: str):
    def deco(fn):
        registry[name] = fn
        return fn

    return deco


def _get(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise PktError(f"unknown {kind} {name!r}; expected one of {', '.join(sorted(registry))}")
    return registry[name]


LAYER_CHOICES: dict[str, Callable[..., list[int]]] = {}
HIDDEN_REDUCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
NEURON_REDUCTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {}


# ----------------------------------------------------------------------- hidden-size maps
def _fix_signs(P: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-magnitude entry positive: SVD signs are arbitrary."""
    idx = P.abs().argmax(dim=0)
    signs = torch.sign(P[idx, torch.arange(P.shape[1])])
    signs[signs == 0] = 1
    return P * signs


def _centred(E: torch.Tensor) -> torch.Tensor:
    E = E.detach().to(torch.float64)
    return E - E.mean(dim=0, keepdim=True)  # (V, d)


@_register(HIDDEN_REDUCTIONS, "pca")
def pca_map(E_T: torch.Tensor, E_S: torch.Tensor) -> torch.Tensor:
    """PCA: the top-d_S principal directions of the teacher's token embeddings, (d_T, d_S).

    ``E_T`` (V, d_T) teacher embedding rows; only ``E_S.shape[1]`` (= d_S) is used from ``E_S``.
    """
    d_S = E_S.shape[1]
    _, _, Vh = torch.linalg.svd(_centred(E_T), full_matrices=False)  # Vh (min(V,d_T), d_T)
    if Vh.shape[0] < d_S:
        raise PktError(f"PCA needs at least d_S={d_S} embedding rows, got {E_T.shape[0]}")
    return _fix_signs(Vh[:d_S].T).to(torch.float32)  # (d_T, d_S), orthonormal columns


@_register(HIDDEN_REDUCTIONS, "whitening")
def whitening_map(E_T: torch.Tensor, E_S: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """BERT-whitening: ``W = U diag(1/sqrt(S))`` of the teacher embeddings' covariance, first d_S columns.

    ``(x - mu) @ W`` has identity covariance; keeping d_S columns keeps the top directions.
    """
    d_S = E_S.shape[1]
    X = _centred(E_T)  # (V, d_T)
    cov = X.T @ X / X.shape[0]  # (d_T, d_T)
    U, S, _ = torch.linalg.svd(cov)
    W = U / torch.sqrt(S.clamp_min(eps))  # (d_T, d_T): column i scaled by 1/sqrt(S_i)
    return _fix_signs(W[:, :d_S]).to(torch.float32)  # (d_T, d_S)


@_register(HIDDEN_REDUCTIONS, "embedding")
def embedding_map(E_T: torch.Tensor, E_S: torch.Tensor) -> torch.Tensor:
    """Embedding transform ``T = argmin_T ||E_T T - E_S||_F = pinv(E_T) E_S``, (d_T, d_S).

    ``E_T`` (V, d_T) and ``E_S`` (V, d_S) are the two models' embedding rows of the same
    (shared) vocabulary.
    """
    if E_T.shape[0] != E_S.shape[0]:
        raise PktError(f"embedding transform needs the same vocabulary rows: {E_T.shape[0]} vs {E_S.shape[0]}")
    T = torch.linalg.pinv(E_T.detach().to(torch.float64)) @ E_S.detach().to(torch.float64)
    return T.to(torch.float32)


# --------------------------------------------------------------------- neuron reductions
def neuron_importance(weights: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Mean |w| per neuron over several weights: ``(weight, neuron_axis)`` pairs -> (N,).

    Neuron ``i`` is row ``i`` (axis 0) or column ``i`` (axis 1) of each weight.
    """
    total, count = None, 0
    for w, axis in weights:
        a = w.detach().abs().to(torch.float64)
        s = a.sum(dim=1 - axis)  # (N,)
        total = s if total is None else total + s
        count += a.shape[1 - axis]
    if total is None:
        raise PktError("neuron importance needs at least one weight")
    return total / count


@_register(NEURON_REDUCTIONS, "random")
def _random_neurons(importance: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(importance.numel(), generator=gen)[:n].sort().values


@_register(NEURON_REDUCTIONS, "importance")
def _important_neurons(importance: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    order = torch.sort(importance, descending=True, stable=True).indices  # ties: lower index
    return order[:n].sort().values


# --------------------------------------------------------------------------- layer choice
@dataclass
class _Pair:
    """Everything a layer choice may need."""

    teacher: nn.Module
    tokenizer: Any
    ts: ModelSpec
    ss: ModelSpec
    extract: list | Sensitivity | None
    gen: torch.Generator
    progress: bool
    info: dict[str, Any] = field(default_factory=dict)


@_register(LAYER_CHOICES, "top")
def _top_layers(p: _Pair) -> list[int]:
    """Top-L_S teacher layers by total Seeking sensitivity on the extract examples."""
    if isinstance(p.extract, Sensitivity):  # computed once by the caller, reused across cells
        sens = p.extract
        if sens.layer_totals.numel() != p.ts.n_layers:
            raise PktError(f"the given sensitivity covers {sens.layer_totals.numel()} layers; the teacher has "
                           f"{p.ts.n_layers}")
        p.info["layer_totals"] = [float(v) for v in sens.layer_totals]
        p.info["layer_ranking"] = "Seeking sensitivity |theta * dL/dtheta| summed over the extract examples"
        return sens.top_layers(p.ss.n_layers)
    if not p.extract:
        raise PktError("layers='top' ranks teacher layers by Seeking sensitivity: pass extract examples")
    if p.tokenizer is None:
        raise PktError("layers='top' needs the teacher's tokenizer: pass (model, tokenizer) or a model directory")
    sens = sensitivity(p.teacher, p.tokenizer, p.extract, modules=(), progress=p.progress)
    p.info["layer_totals"] = [float(v) for v in sens.layer_totals]
    p.info["layer_ranking"] = "Seeking sensitivity |theta * dL/dtheta| summed over the extract examples"
    return sens.top_layers(p.ss.n_layers)


@_register(LAYER_CHOICES, "bottom")
def _bottom_layers(p: _Pair) -> list[int]:
    return list(range(p.ss.n_layers))


@_register(LAYER_CHOICES, "random")
def _random_layers(p: _Pair) -> list[int]:
    return sorted(int(i) for i in torch.randperm(p.ts.n_layers, generator=p.gen)[: p.ss.n_layers])


# ------------------------------------------------------------------------------- helpers
# The sizes in which the teacher must be at least the student (these baselines only reduce).
_LARGER = ("n_layers", "hidden_size", "intermediate_size", "attn_size", "kv_size")


def _check_pair(teacher: nn.Module, student: nn.Module, t_tok: Any, s_tok: Any) -> tuple[ModelSpec, ModelSpec]:
    return check_pair(teacher, student, method="the unaligned baselines", larger=_LARGER, same=("vocab_size",),
                      tokenizers=(t_tok, s_tok))


def _group(module: str, ts: ModelSpec, ss: ModelSpec) -> str:
    g = MODULES[module].axis_kind
    if g == "kv" and ts.n_kv_heads == ts.n_heads and ss.n_kv_heads == ss.n_heads:
        return "attn"
    return g


def map_weight(w: torch.Tensor, module: str, neurons: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Teacher weight (out, in) -> student shape: keep ``neurons`` and map the hidden axis by ``P``.

    Input-side modules (hidden = in): ``W[neurons] @ P`` (N_S, d_S); output-side (hidden = out):
    ``P^T @ W[:, neurons]`` (d_S, N_S).
    """
    w = w.detach().to(torch.float32)
    if MODULES[module].hidden_axis == 1:
        return w.index_select(0, neurons) @ P  # (N_S, d_T) @ (d_T, d_S)
    return P.T @ w.index_select(1, neurons)  # (d_S, d_T) @ (d_T, N_S)


# -------------------------------------------------------------------------------- records
@dataclass
class TransferRecord:
    """What a baseline changed: which student layers/modules, from which teacher layers, how."""

    method: str
    layers: str | None
    hidden: str | None
    neurons: str | None
    seed: int
    teacher_layers: list[int]
    student_layers: list[int]
    modules: list[str]
    changed: list[str]  # state_dict keys of the student that were modified
    delta_norms: dict[str, float]  # key -> ||delta||_F
    weight_norms: dict[str, float]  # key -> ||theta_S||_F (before)
    teacher: str = ""
    student: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.method == "seeking":
            return "seeking"
        return f"{self.layers}/{self.hidden}/{self.neurons}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **to_jsonable(self)}


def _apply(student: nn.Module, ss: ModelSpec, deltas: dict[tuple[int, str], torch.Tensor]
           ) -> tuple[nn.Module, list[str], dict[str, float], dict[str, float]]:
    """``(student + deltas, changed keys, ||delta|| per key, ||theta_S|| per key before)``."""
    model = apply_deltas(student, deltas)
    keys = {ss.param_name(l, m): (l, m) for l, m in deltas}
    return (model, list(keys), {k: float(deltas[lm].float().norm()) for k, lm in keys.items()},
            {k: float(ss.weight(student, *lm).detach().float().norm()) for k, lm in keys.items()})


# ------------------------------------------------------------------------------- methods
def unaligned_transfer(teacher: Any, student: Any, *, layers: str = "top", hidden: str = "pca",
                       neurons: str = "importance", extract: Any = None, seed: int = 0,
                       modules: Sequence[str] = TRANSFERRED_MODULES, progress: bool = True,
                       hidden_maps: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, TransferRecord]:
    """One cell of the unaligned Pre-Align grid: ``(student + delta, record)``, no training.

    ``teacher``/``student``: models, ``(model, tokenizer)`` pairs or model paths (the student
    is copied, never modified). ``layers``: "top" | "bottom" | "random"; ``hidden``: "pca" |
    "whitening" | "embedding"; ``neurons``: "random" | "importance" (see the module
    docstring). ``extract`` (examples, (prompt, answer) pairs, a task name, or a
    precomputed teacher :class:`~pktlib.seeking.Sensitivity` to reuse across cells) is
    needed by ``layers="top"``. ``seed`` drives the random choices. ``hidden_maps``: a dict,
    hidden-size reduction -> its (d_T, d_S) map, in which the map is looked up and stored, so that
    the cells of a grid over one teacher/student pair compute each map once (it depends on the two
    embeddings only; at a 152k vocabulary the SVD or pseudo-inverse behind one takes ~40 s on 2
    cores, most of a cell's cost). Give the same dict only to cells of the same two models.
    """
    choose_layers_fn = _get(LAYER_CHOICES, "layer choice", layers)
    hidden_fn = _get(HIDDEN_REDUCTIONS, "hidden-size reduction", hidden)
    neuron_fn = _get(NEURON_REDUCTIONS, "neuron reduction", neurons)
    bad = [m for m in modules if m not in MODULES]
    if bad:
        raise PktError(f"unknown modules {bad}; expected some of {sorted(MODULES)}")
    t_model, t_tok, t_src = resolve_model(teacher)
    s_model, s_tok, s_src = resolve_model(student)
    ts, ss = _check_pair(t_model, s_model, t_tok, s_tok)
    gen = torch.Generator().manual_seed(int(seed))
    pair = _Pair(t_model, t_tok or s_tok, ts, ss, as_examples(extract), gen, progress)
    t_layers = choose_layers_fn(pair)

    # Statistics on the token-embedding rows (the shared vocabulary).
    E_T = ts.embedding(t_model).weight.detach()  # (V, d_T)
    E_S = ss.embedding(s_model).weight.detach()  # (V, d_S)
    P = hidden_maps.get(hidden) if hidden_maps is not None else None
    if P is None:
        P = hidden_fn(E_T, E_S)  # (d_T, d_S)
        if hidden_maps is not None:
            hidden_maps[hidden] = P
    assert P.shape == (ts.hidden_size, ss.hidden_size), f"hidden map has shape {tuple(P.shape)}"

    deltas: dict[tuple[int, str], torch.Tensor] = {}
    chosen: dict[str, list[list[int]]] = {}
    for j, lt in enumerate(t_layers):
        groups: dict[str, list[str]] = {}
        for m in modules:
            groups.setdefault(_group(m, ts, ss), []).append(m)
        for g, ms in groups.items():
            imp = neuron_importance([(ts.weight(t_model, lt, m), MODULES[m].neuron_axis) for m in ms])  # (N_T,)
            idx = neuron_fn(imp, ss.n_neurons(g), gen)  # (N_S,) ascending
            chosen.setdefault(g, []).append(idx.tolist())
            for m in ms:
                deltas[(j, m)] = map_weight(ts.weight(t_model, lt, m), m, idx, P)
    model, changed, dn, wn = _apply(s_model, ss, deltas)
    rec = TransferRecord("unaligned", layers, hidden, neurons, int(seed), list(t_layers),
                         list(range(len(t_layers))), list(modules), changed, dn, wn, t_src, s_src,
                         {**pair.info, "hidden_map_norm": float(P.norm()),
                          "neurons_kept": {g: len(vs[0]) for g, vs in chosen.items()}})
    return model, rec


def seeking_transfer(teacher: Any, student: Any, pairs: Any, *, rank: int | None = 16,
                     modules: Sequence[str] = TRANSFERRED_MODULES, max_length: int | None = None,
                     progress: bool = True) -> tuple[nn.Module, TransferRecord]:
    """Seeking without training: the extracted teacher matrices added to the student.

    Sensitivity on ``pairs`` (examples, (prompt, answer) pairs, a task name for its extract
    split, or a precomputed teacher :class:`~pktlib.seeking.Sensitivity`), the top-L_S teacher layers, the best sub-matrix per module (DESIGN.md 4.5). As in
    the original code the extracted matrix enters as the rank-``rank`` product ``B A`` of its
    SVD (LoRA scale alpha/r = 1); ``rank=None`` adds the full sub-matrix.
    """
    t_model, t_tok, t_src = resolve_model(teacher)
    s_model, s_tok, s_src = resolve_model(student)
    ts, ss = _check_pair(t_model, s_model, t_tok, s_tok)
    tok = t_tok or s_tok
    if tok is None and not isinstance(pairs, Sensitivity):
        raise PktError("Seeking needs the teacher's tokenizer: pass (model, tokenizer) or a model directory")
    examples = as_examples(pairs)
    if isinstance(examples, Sensitivity):  # precomputed on this teacher
        sens = examples
    elif not examples:
        raise PktError("Seeking needs extract examples (pairs)")
    else:
        sens = sensitivity(t_model, tok, examples, modules=tuple(modules), max_length=max_length, progress=progress)
    ex = seeking_extract(t_model, sens, s_model, modules=modules, progress=progress)
    deltas = {}
    for key, mat in ex.matrices.items():
        if rank is None:
            deltas[key] = mat
        else:
            B, A = svd_factors(mat, rank)
            deltas[key] = B @ A
    model, changed, dn, wn = _apply(s_model, ss, deltas)
    rec = TransferRecord("seeking", "top", "seeking", "seeking", 0, list(ex.teacher_layers),
                         list(range(len(ex.teacher_layers))), list(modules), changed, dn, wn, t_src, s_src,
                         {**ex.to_record(), "rank": rank, "n_examples": sens.n_examples,
                          "layer_ranking": "Seeking sensitivity |theta * dL/dtheta| summed over the extract examples"})
    return model, rec


def grid(layers: Iterable[str] = ("top", "bottom", "random"), hidden: Iterable[str] = ("pca", "whitening", "embedding"),
         neurons: Iterable[str] = ("random", "importance")) -> list[dict[str, str]]:
    """Every cell of the baseline grid as keyword dicts for :func:`unaligned_transfer`."""
    return [{"layers": l, "hidden": h, "neurons": n} for l in layers for h in hidden for n in neurons]


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, record: dict[str, Any] | None = None) -> None:
    """Save a model (Hugging Face format, safetensors), its tokenizer and ``record.json``.

    Written through a temporary folder and a rename: ``out_dir`` is complete or absent.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json(tmp / "record.json", record)
