"""The pocket pair's configuration and its place on disk: presets, cache keys, checkpoint folders.

Everything that determines a pair's weights is a :class:`PairConfig`; its hash (with the suite
and build versions) names the pair's folder (:func:`pair_dir`), so a changed configuration gets a
new folder and an old one is recognisably stale (:func:`pair_is_current`).

Sizing (DESIGN.md 3): the whole budget is ~15 CPU minutes for four checkpoints, so models
are under-trained by design; the gap between the two models comes from what each can learn
from the *same* tokens: the teacher has more layers (dependent arithmetic steps, composition)
and more width (faster memorisation of the fact base, further into its long tail). Both see
identical data in identical order, in pre-training each at the learning rate of its width
(``TrainConfig.lr_width``); the chat stage replays base-corpus batches
(``TrainConfig.replay``) so that fine-tuning on the answer format does not erase the facts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pktlib.cache import cache_dir
from pktlib.errors import PktError
from pktlib.data.suite import SUITE_VERSION, SuiteConfig

__all__ = ["BUILD_VERSION", "CHECKPOINTS", "ModelConfig", "TrainConfig", "PairConfig", "PRESETS", "native_bf16",
           "for_this_machine", "get_preset", "PocketPair", "pair_dir", "pair_is_current"]

CHECKPOINTS = ("teacher-base", "student-base", "teacher-chat", "student-chat")
BUILD_VERSION = 4  # bump when tokenizer or training code changes: pair cache keys include it


@dataclass(frozen=True)
class ModelConfig:
    """A Llama decoder's shape; ``head_dim`` is fixed at 64 so vLLM can serve it."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    head_dim: int = 64
    # Mixed precision while training this model: matmuls under torch.autocast in this dtype
    # ("bfloat16"); weights, optimiser state and saved checkpoints stay float32. A per-model
    # choice because the gain grows with the matrices: on this machine's CPU (AVX512-BF16) a
    # default-teacher step is 1.3x faster, a student step 1.05-1.15x
    # (benchmarks/pocket_autocast.py). None trains in float32 throughout.
    autocast: str | None = None

    def __post_init__(self):
        if self.hidden_size % self.head_dim:
            raise PktError(f"`hidden_size`={self.hidden_size} is not a multiple of `head_dim`={self.head_dim}")

    @property
    def n_heads(self) -> int:
        return self.hidden_size // self.head_dim


@dataclass(frozen=True)
class TrainConfig:
    """One training stage (base pre-training or chat fine-tuning)."""

    epochs: float  # passes over the stage's data (fractions allowed)
    batch_size: int
    lr: float
    warmup: float = 0.05  # share of steps with linear warm-up, then cosine to 10% of lr
    weight_decay: float = 0.1
    log_every: int = 5  # steps between loss records in the card
    # If set, ``lr`` is the rate of a model of this hidden size and a model of hidden size d
    # trains at lr * lr_width / d (the muP-style rule: wider models take smaller Adam steps).
    # One rate for both would be too high for the teacher or too low for the student.
    lr_width: int | None = None
    # Chat stage only: base-corpus batches interleaved per chat batch (1.0: every other step),
    # so fine-tuning on the chat format does not erase memorised facts (catastrophic forgetting).
    replay: float = 0.0

    def lr_for(self, hidden_size: int) -> float:
        return self.lr if self.lr_width is None else self.lr * self.lr_width / hidden_size


@dataclass(frozen=True)
class PairConfig:
    """Everything that determines a pocket pair's weights (its hash keys the cache folder)."""

    teacher: ModelConfig
    student: ModelConfig
    base: TrainConfig
    chat: TrainConfig
    vocab_size: int = 1024
    seq_len: int = 128  # packed base-corpus blocks; chat examples stay below it
    corpus_share: float = 1.0  # share of the base corpus used (the tiny preset takes a slice)
    suite: SuiteConfig = field(default_factory=SuiteConfig)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + f"|v{SUITE_VERSION}|b{BUILD_VERSION}"
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


PRESETS: dict[str, PairConfig] = {
    # The book's pair. Layer/hidden/FFN ratios teacher/student: 3 / 2 / 2 (Llama-2-13B/7B: 1.25 each);
    # a wider ratio than Llama-2's, because at this scale a 1.25x model barely differs in what it learns.
    "default": PairConfig(
        # Depth carries the dependent arithmetic steps: a 5-layer teacher scored 35% on math where
        # this one scores 46-49% (the student 33%), with knowledge and code unchanged.
        # The teacher trains with bf16 matmuls, the student in float32: the teacher's stages are
        # 85% of the training time and bf16 makes them ~1.35x faster (252 + 341 s instead of
        # 344 + 457 s). The student would save ~10 s; it stays float32 because the bf16 student
        # scored 83.0 on code where the float32 one scores 78.3, less than 10 points behind the teacher.
        # Training takes 11.8 minutes, the whole `pkt zoo build` with scoring 12.7. All-float32
        # trained in 14.7-15.1 minutes (16.1-16.4 with scoring); all-bf16 left a code gap of 7.7.
        # A CPU without bf16 matmul units (AVX2 only) trains the teacher in float32 instead, under
        # its own key: `get_preset` applies `for_this_machine`.
        teacher=ModelConfig(n_layers=6, hidden_size=256, intermediate_size=688, autocast="bfloat16"),
        student=ModelConfig(n_layers=2, hidden_size=128, intermediate_size=344),
        base=TrainConfig(epochs=2.0, batch_size=16, lr=1e-3, lr_width=256),
        # One chat rate for both: with the width rule here the student learned rare code kinds
        # faster than the teacher (code 94 vs 90); replay 1.0 keeps both models' facts. Fewer chat
        # steps (2.5 epochs, replay 0.75) cut the teacher's math from 49% to 32% (student 33 -> 28).
        chat=TrainConfig(epochs=3.0, batch_size=16, lr=8e-4, replay=1.0),
    ),
    # For tests and early integration: same suite, very small models, a slice of the corpus.
    "tiny": PairConfig(
        teacher=ModelConfig(n_layers=2, hidden_size=128, intermediate_size=256),
        student=ModelConfig(n_layers=1, hidden_size=64, intermediate_size=128),
        base=TrainConfig(epochs=1.0, batch_size=8, lr=3e-3, log_every=2),
        chat=TrainConfig(epochs=0.02, batch_size=8, lr=1e-3, log_every=2),
        vocab_size=512,
        corpus_share=0.005,
    ),
}


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls in hardware (oneDNN's own test: AVX-512 or Arm BF16).

    Without it, ``torch.autocast("cpu", dtype=torch.bfloat16)`` falls back to a reference
    kernel: on an AVX2-only EPYC a default-teacher matmul with its backward took 5.7-7.3 s in
    bf16 against 0.18-0.21 s in float32, which would stretch the 12-minute build to many hours.
    """
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def for_this_machine(cfg: PairConfig) -> PairConfig:
    """``cfg`` with bf16 autocast dropped from a model where the CPU has no bf16 matmul units.

    The precision a model trains in changes its weights, so the result has its own key and
    cache folder: a machine without bf16 builds (and names) the float32 variant of the preset,
    and the cards and records say which was built. Where bf16 is native, ``cfg`` is returned
    unchanged (same key as before this rule existed).
    """
    if native_bf16():
        return cfg
    return replace(cfg, **{role: replace(getattr(cfg, role), autocast=None)
                           for role in ("teacher", "student") if getattr(cfg, role).autocast == "bfloat16"})


def get_preset(name: str) -> PairConfig:
    """The preset ``name`` as this machine trains it (:func:`for_this_machine`).

    Raises:
        PktError: unknown preset.
    """
    if name not in PRESETS:
        raise PktError(f"unknown pocket-pair preset {name!r}; known: {', '.join(PRESETS)}")
    return for_this_machine(PRESETS[name])


@dataclass(frozen=True)
class PocketPair:
    """Paths of the four checkpoints; ``teacher``/``student`` are those of the requested variant."""

    variant: str
    teacher_base: Path
    teacher_chat: Path
    student_base: Path
    student_chat: Path
    root: Path

    @property
    def teacher(self) -> Path:
        return self.teacher_chat if self.variant == "chat" else self.teacher_base

    @property
    def student(self) -> Path:
        return self.student_chat if self.variant == "chat" else self.student_base

    @classmethod
    def at(cls, root: Path, variant: str = "chat") -> "PocketPair":
        """The checkpoint folders of the pair in folder ``root``."""
        return cls(variant, root / "teacher-base", root / "teacher-chat", root / "student-base", root / "student-chat",
                   root)

    def checkpoints(self) -> dict[str, Path]:
        return {"teacher-base": self.teacher_base, "teacher-chat": self.teacher_chat,
                "student-base": self.student_base, "student-chat": self.student_chat}


def pair_dir(preset: str = "default", seed: int = 0) -> Path:
    """The cache folder of ``preset``'s pair trained with ``seed``: ``pair-<preset>-s<seed>-<config key>``."""
    cfg = get_preset(preset)
    return cache_dir() / f"pair-{preset}-s{seed}-{cfg.key()}"


_PAIR_NAME = re.compile(r"pair-(?P<preset>.+)-s(?P<seed>\d+)-[0-9a-f]{10}")  # as `pair_dir` writes it


def pair_is_current(path: str | os.PathLike) -> bool | None:
    """Whether ``path`` (a pair folder or a checkpoint in one) is what its preset builds today.

    None if ``path`` is not in a pocket-pair folder; False if the preset's configuration or the
    suite/build version changed since (the folder name holds the key it was built with), or the
    preset is gone. Records of notebooks name their models, so a chapter run on an older pair
    can be found stale (:mod:`pktlib.book`).
    """
    p = Path(path)
    for folder in (p, p.parent):
        m = _PAIR_NAME.fullmatch(folder.name)
        if m:  # `pair_dir` names the folder the current code would build
            return m["preset"] in PRESETS and folder.name == pair_dir(m["preset"], int(m["seed"])).name
    return None
