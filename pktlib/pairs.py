"""Teacher -> student pairs by name: the one registry every chapter and command resolves.

=============================  ===========================================  ==========================
name                           teacher -> student                           where the weights come from
=============================  ===========================================  ==========================
``pocket``                     pocket teacher -> pocket student (chat)      built here (:mod:`pktlib.zoo`)
``qwen2.5-coder-1.5b-0.5b``    Qwen2.5-Coder-1.5B-Instruct -> 0.5B          ``make real-pair`` (:mod:`pktlib.fetch`)
``llama-2-13b-7b-chat``        meta-llama/Llama-2-13b-chat-hf -> 7b-chat    the Hugging Face hub (GPU)
``qwen2.5-3b-1.5b-instruct``   Qwen/Qwen2.5-3B-Instruct -> 1.5B-Instruct    the Hugging Face hub (GPU)
=============================  ===========================================  ==========================

A :class:`Pair` holds sources (local folders or hub ids) that :func:`pktlib.models.load_model`
takes, the base checkpoints where the pair has them (the delta chapter), the names of public
configurations for planning without weights (:data:`pktlib.models.REFERENCE_CONFIGS`), and the
set of modules LaTen transfers (:data:`TRANSFER_SETS`, chosen by one argument, ``transfer``).

Transferred modules. The paper's method and the authors' Llama script transfer FFN up/down
and attention v/o (DESIGN.md 4.3): ``transfer="llama"``, the default for every pair. The
authors' Qwen2.5 script (``rebuttal/LaTen_qwen/train_LaTen_qwen_single.py`` in their
repository, used for the Qwen2.5 3B -> 1.5B rows, paper Table 8) extracts only ``down_proj``,
``up_proj`` and ``o_proj``: with grouped-query attention several attention neurons share one
``v_proj`` row (:meth:`pktlib.models.ModelSpec.v_row`), so it leaves v out. ``transfer="qwen"``
reproduces that choice. Each chapter states which one it uses.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import AutoConfig

from pktlib.errors import PktError
from pktlib.fetch import FETCH_SETS, converted_dir
from pktlib.models import TRANSFERRED_MODULES, load_model, reference_spec, spec
from pktlib.placement import plan_placement
from pktlib.zoo import pair_dir, pocket_pair

__all__ = [
    "TRANSFER_SETS",
    "Pair",
    "LoadedPair",
    "PAIRS",
    "pair_names",
    "get_pair",
    "load_pair",
    "plan_pair",
]

TRANSFER_SETS: dict[str, tuple[str, ...]] = {
    "llama": tuple(TRANSFERRED_MODULES),  # up, down, v, o: the paper (DESIGN.md 4.3) and the authors' Llama script
    "qwen": tuple(m for m in TRANSFERRED_MODULES if m != "v_proj"),  # up, down, o: the authors' Qwen2.5 script (GQA)
}

_KINDS = ("pocket", "fetched", "hub")


@dataclass(frozen=True)
class Pair:
    """A resolved teacher -> student pair.

    ``teacher``/``student`` (and the optional ``*_base`` checkpoints) are local folders or hub
    ids. ``kind``: "pocket" (built by :mod:`pktlib.zoo`), "fetched" (converted by
    :mod:`pktlib.fetch`; ``fetch_hint`` says how to get it) or "hub" (downloaded by transformers
    on first use, for GPU machines). ``reference``: names in
    :data:`pktlib.models.REFERENCE_CONFIGS` of the teacher's and student's public
    configurations. ``transfer`` names the module set of :data:`TRANSFER_SETS`.
    """

    name: str
    kind: str
    teacher: str
    student: str
    teacher_base: str | None = None
    student_base: str | None = None
    reference: tuple[str, str] | None = None
    transfer: str = "llama"
    licence: str = ""
    description: str = ""
    fetch_hint: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise PktError(f"pair {self.name!r}: unknown kind {self.kind!r}; expected one of {_KINDS}")
        if self.transfer not in TRANSFER_SETS:
            raise PktError(f"unknown transfer set {self.transfer!r}; expected one of {sorted(TRANSFER_SETS)} "
                           "(llama: up, down, v, o; qwen: up, down, o)")

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules LaTen transfers for this pair (``pktlib.laten.train(modules=...)``)."""
        return TRANSFER_SETS[self.transfer]

    def with_transfer(self, transfer: str) -> "Pair":
        """The same pair with another transferred-module set ("llama" or "qwen")."""
        return dataclasses.replace(self, transfer=transfer)

    def checkpoints(self) -> dict[str, str]:
        """Role -> source, for every checkpoint the pair has."""
        out = {"teacher": self.teacher, "student": self.student}
        if self.teacher_base:
            out["teacher_base"] = self.teacher_base
        if self.student_base:
            out["student_base"] = self.student_base
        return out

    def missing(self) -> list[str]:
        """Local checkpoints of the pair that are not there (hub pairs: none)."""
        if self.kind == "hub":
            return []
        return [src for src in self.checkpoints().values() if not (Path(src) / "config.json").is_file()]

    def require(self) -> "Pair":
        """The pair itself if its local checkpoints exist; else a one-line :class:`PktError` saying how to get them."""
        missing = self.missing()
        if missing:
            hint = self.fetch_hint or "build it"
            raise PktError(f"pair {self.name!r} is not available here ({missing[0]} is missing); {hint}")
        return self

    def specs(self) -> dict[str, Any]:
        """``{"teacher": ModelSpec, "student": ModelSpec}`` without loading weights.

        Read from the local checkpoints' ``config.json`` where present, else from the public
        configurations named by ``reference`` (no download).
        """
        out = {}
        for i, role in enumerate(("teacher", "student")):
            src = getattr(self, role)
            if (Path(src) / "config.json").is_file():
                out[role] = spec(AutoConfig.from_pretrained(src))
            elif self.reference is not None:
                out[role] = reference_spec(self.reference[i])
            else:
                self.require()
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules"] = list(self.modules)
        return d


@dataclass
class LoadedPair:
    """A pair with both models loaded: ``teacher``/``student`` are ``(model, tokenizer)``."""

    pair: Pair
    teacher: tuple[Any, Any]
    student: tuple[Any, Any]


# ----------------------------------------------------------------------------------------
# The registry: name -> builder(preset, seed) -> Pair


def _pocket(preset: str, seed: int) -> Pair:
    root = pair_dir(preset, seed)
    return Pair(
        name="pocket", kind="pocket", teacher=str(root / "teacher-chat"), student=str(root / "student-chat"),
        teacher_base=str(root / "teacher-base"), student_base=str(root / "student-base"),
        licence="MIT (trained here)", description=f"the pocket pair, preset {preset!r}, seed {seed}",
        fetch_hint=f"build it with `make pocket` or `pkt zoo build --preset {preset} --seed {seed}`",
    )


def _qwen_coder(preset: str, seed: int) -> Pair:
    teacher, student = FETCH_SETS["qwen2.5-coder"]
    return Pair(
        name="qwen2.5-coder-1.5b-0.5b", kind="fetched", teacher=str(converted_dir(teacher)),
        student=str(converted_dir(student)),
        reference=("Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-0.5B-Instruct"), licence="Apache-2.0",
        description="Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct, Q4_K_M GGUF dequantised to float32",
        fetch_hint="fetch it with `make real-pair` (or `pkt zoo fetch qwen2.5-coder`)",
    )


def _llama2(preset: str, seed: int) -> Pair:
    return Pair(
        name="llama-2-13b-7b-chat", kind="hub", teacher="meta-llama/Llama-2-13b-chat-hf",
        student="meta-llama/Llama-2-7b-chat-hf", teacher_base="meta-llama/Llama-2-13b-hf",
        student_base="meta-llama/Llama-2-7b-hf", reference=("Llama-2-13b-chat", "Llama-2-7b-chat"),
        licence="Llama 2 Community License (gated on the hub)", description="the paper's main pair (Table 1)",
    )


def _qwen25(preset: str, seed: int) -> Pair:
    return Pair(
        name="qwen2.5-3b-1.5b-instruct", kind="hub", teacher="Qwen/Qwen2.5-3B-Instruct",
        student="Qwen/Qwen2.5-1.5B-Instruct", teacher_base="Qwen/Qwen2.5-3B", student_base="Qwen/Qwen2.5-1.5B",
        reference=("Qwen2.5-3B-Instruct", "Qwen2.5-1.5B-Instruct"),
        licence="Qwen Research License (3B), Apache-2.0 (1.5B)", description="the paper's Qwen2.5 pair (Table 8)",
    )


PAIRS: dict[str, Callable[[str, int], Pair]] = {
    "pocket": _pocket,
    "qwen2.5-coder-1.5b-0.5b": _qwen_coder,
    "llama-2-13b-7b-chat": _llama2,
    "qwen2.5-3b-1.5b-instruct": _qwen25,
}


def pair_names() -> list[str]:
    return list(PAIRS)


def _is_pair_folder(name: str) -> bool:
    return all((Path(name) / role / "config.json").is_file() for role in ("teacher-chat", "student-chat"))


def _folder_pair(root: Path) -> Pair:
    """A pair laid out as the pocket pair is (``teacher-chat/``, ``student-chat/`` and optional
    ``*-base/`` checkpoints in one folder), e.g. ``zoo.pair_dir("tiny", 0)``."""
    base = {f"{role}_base": str(root / f"{role}-base") for role in ("teacher", "student")
            if (root / f"{role}-base" / "config.json").is_file()}
    return Pair(name=root.name, kind="pocket", teacher=str(root / "teacher-chat"), student=str(root / "student-chat"),
                description=f"the pair in {root}", fetch_hint="the folder lacks a checkpoint", **base)


def get_pair(name: str | Pair, *, transfer: str | None = None, preset: str = "default", seed: int = 0,
             build: bool = False, require: bool = False) -> Pair:
    """The :class:`Pair` called ``name`` (a :class:`Pair` passes through).

    ``transfer`` overrides the transferred-module set ("llama" or "qwen"). ``preset``/``seed``
    choose the pocket pair. Resolving never downloads anything; ``build`` builds (or reuses)
    the pocket pair through :func:`pktlib.zoo.pocket_pair`, and ``require`` checks that a local
    pair's checkpoints exist (:meth:`Pair.require`: the fetched pair says to run
    ``make real-pair``). ``name`` may also be a folder laid out as the pocket pair's
    (``teacher-chat/``, ``student-chat/``, optional ``teacher-base/``, ``student-base/``).
    Raises :class:`PktError` for an unknown name, listing the known ones.
    """
    if isinstance(name, Pair):
        pair = name
    else:
        if name in PAIRS:
            pair = PAIRS[name](preset, seed)
        elif _is_pair_folder(name):
            pair = _folder_pair(Path(name))
        else:
            raise PktError(f"unknown pair {name!r}; known: {', '.join(PAIRS)} (or a folder holding "
                           "teacher-chat/ and student-chat/ checkpoints)")
    if transfer is not None:
        pair = pair.with_transfer(transfer)
    if build and pair.kind == "pocket" and pair.missing():
        pocket_pair("chat", seed=seed, preset=preset)
    if require:
        pair.require()
    return pair


def load_pair(pair: str | Pair, *, dtype: str | None = None, device: str = "cpu",
              placement: dict | None = None, **resolve: Any) -> LoadedPair:
    """Load both models of ``pair`` (a name or a :class:`Pair`): a :class:`LoadedPair`.

    Local pairs must exist (:meth:`Pair.require`). ``placement``: ``{"teacher": Placement,
    "student": Placement}`` from :func:`plan_pair`, whose load arguments (device map, memory
    budgets, offload folder, dtype) replace ``dtype``/``device``. ``resolve``: arguments of
    :func:`get_pair` (``transfer``, ``preset``, ``seed``, ``build``).
    """
    p = get_pair(pair, **resolve).require()
    loaded = {}
    for role in ("teacher", "student"):
        kw = placement[role].load_kwargs() if placement and role in placement else {"dtype": dtype, "device": device}
        loaded[role] = load_model(getattr(p, role), **kw)
    return LoadedPair(p, loaded["teacher"], loaded["student"])


def plan_pair(pair: str | Pair, *, dtype: str = "bfloat16", memory: dict | None = None, reserve: float = 0.1,
              kv_tokens: int = 16384, offload_folder: str | os.PathLike | None = None, **resolve: Any) -> dict:
    """Where to put the teacher and the student, and vLLM's ``tensor_parallel_size`` for each.

    :func:`pktlib.placement.plan_placement` over the pair's shapes (:meth:`Pair.specs`: no weights
    are loaded or downloaded). The student is placed first, on the fastest device, because
    LaTen and Post-Align edit and differentiate through it; the teacher takes what is left,
    offloaded to the CPU or disk if it must be. ``memory`` defaults to what this machine has
    free. Returns ``{"student": Placement, "teacher": Placement}``.
    """
    p = get_pair(pair, **resolve)
    s = p.specs()
    return plan_placement({"student": s["student"], "teacher": s["teacher"]}, dtype=dtype, memory=memory,
                          reserve=reserve, kv_tokens=kv_tokens, offload_folder=offload_folder)
