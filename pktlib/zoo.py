"""The pocket pair: a small teacher/student model organism trained here, on a CPU.

No weights can be downloaded on the machines this project runs on, so pktlib ships its own
cross-scale pair (DESIGN.md section 3): two Llama-architecture decoders, a deeper and wider
*teacher* and a *student*, each as a ``base`` checkpoint (trained on a plain corpus) and a
``chat`` checkpoint (the base fine-tuned on prompt/answer pairs), like Llama-2-13B/7B and
their chat versions. Everything is generated and trained from seeds: nothing is downloaded.

The task suite mirrors the paper's three task kinds:

* ``pocket-knowledge`` (MMLU-like): 4-choice questions about a generated fact base of people
  and their attributes (city, job, pet, instrument, colour). Facts are stated in the base
  corpus as short biographies, more for some people than others (popularity, log-uniform in
  ``SuiteConfig.bio_repeats``); the questions of the test split are never in any corpus, so a
  model must *extract* a memorised fact into the question format. Answer: "The answer is: X"
  with X the chosen value (not its letter: a deviation from MMLU, see ``_knowledge_question``).
* ``pocket-math`` (GSM8K-like): word problems whose answer needs several dependent arithmetic
  steps (each step uses the previous result), with a worked solution ending
  "So the answer is N.". All numbers stay below 100 so each is a single BPE token and every
  step is a lookup the model has to have memorised.
* ``pocket-code`` (HumanEval-like): write a Python function from a signature and docstring
  that composes a filter, a map and a reduction over a list; checked by running asserts. The
  filter keeps a *named* kind of number ("the glim numbers"), whose meaning is learned only
  from examples, some kinds common and some rare, like a library's functions.

Splits per family: ``extract`` (32), ``align`` (80), ``train`` (1000), ``test`` (300);
no prompt is shared between splits. The suite depends on its own seed (``suite_seed``,
default 0, what :func:`pktlib.data.load_task` reads) and not on the pair's training seed, so
pairs trained with different seeds are scored on the same test questions.

Sizing (DESIGN.md 3): the whole budget is ~15 CPU minutes for four checkpoints, so models
are under-trained by design; the gap between the two models comes from what each can learn
from the *same* tokens: the teacher has more layers (dependent arithmetic steps, composition)
and more width (faster memorisation of the fact base, further into its long tail). Both see
identical data in identical order, in pre-training each at the learning rate of its width
(``TrainConfig.lr_width``); the chat stage replays base-corpus batches
(``TrainConfig.replay``) so that fine-tuning on the answer format does not erase the facts.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from pktlib.data import (Example, code_user_prompt, collate, format_prompt, gsm_user_prompt, load_examples,
                         mmlu_user_prompt, tokenize_example, write_examples)
from pktlib.errors import PktError
from pktlib.hooks import with_grad

__all__ = [
    "FAMILIES",
    "SPLIT_SIZES",
    "SuiteConfig",
    "ModelConfig",
    "TrainConfig",
    "PairConfig",
    "PRESETS",
    "PocketPair",
    "cache_dir",
    "suite_dir",
    "suite_file",
    "generate_suite",
    "base_corpus",
    "train_tokenizer",
    "build_model",
    "train_base",
    "train_chat",
    "pair_dir",
    "pair_is_current",
    "build_pair",
    "pocket_pair",
    "score_pair",
    "read_card",
]

FAMILIES = ("knowledge", "math", "code")
SPLIT_SIZES = {"extract": 32, "align": 80, "train": 1000, "test": 300}
CHECKPOINTS = ("teacher-base", "student-base", "teacher-chat", "student-chat")
# Greedy decoding budget per family: the longest reference answer is ~8 (knowledge), ~50 (math)
# and ~45 (code) tokens; a tight budget keeps a rambling small model from costing minutes.
MAX_NEW_TOKENS = {"knowledge": 16, "math": 64, "code": 64}
SUITE_VERSION = 7  # bump when the generators change: the cache key includes it
BUILD_VERSION = 4  # bump when tokenizer or training code changes: pair cache keys include it


# ========================================================================================
# Configuration


@dataclass(frozen=True)
class SuiteConfig:
    """What the synthetic task suite looks like (the same for every preset)."""

    seed: int = 0
    n_entities: int = 300  # x 5 attributes = 1500 facts; >= sum(SPLIT_SIZES) questions need distinct facts
    # Biographies per entity in the base corpus (attribute order and wording vary), drawn per
    # entity log-uniformly from this range: some people are more famous than others, as with real
    # knowledge (accuracy then grades with popularity instead of jumping from chance to 100%).
    # The range is where model size matters. Measured on the default pair with (4, 48), on 412
    # questions: below 12 biographies neither chat model beats chance by much (teacher/student
    # 37/43%); from 12 to 35 the teacher answers 80% and the student 63%; above 35 both do (86/81).
    # A tail of facts nobody learns would only dilute the teacher's lead.
    bio_repeats: tuple[int, int] = (12, 32)
    math_corpus: int = 2000  # extra solved word problems in the base corpus (test prompts excluded)
    code_corpus: int = 500  # extra solved code problems in the base corpus (test prompts excluded)
    # Named kinds of number ("glim numbers": x % m == r, m in `code_moduli`, inclusive) the code
    # problems filter by. With 64 kinds both models pass ~100% on the commoner half of the test
    # kinds and the teacher's lead is all in the rarer half. A bf16 build with 120 kinds (m up to
    # 16) widened the code gap (teacher/student 76/45%) but its knowledge gap closed (67/61%).
    code_kinds: int = 64
    code_moduli: tuple[int, int] = (3, 12)
    code_kind_weights: tuple[float, float] = (1.0, 32.0)  # each kind's frequency, log-uniform in this range
    math_steps: tuple[int, int] = (2, 4)  # dependent steps per problem, inclusive range



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


# ========================================================================================
# Where things live


def cache_dir() -> Path:
    """``$PKT_CACHE`` if set, else ``~/.cache/pktlib``."""
    env = os.environ.get("PKT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pktlib"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock: two notebooks building the same folder wait for each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ========================================================================================
# The task suite

_SYL = ["ka", "lo", "mi", "ren", "tas", "vel", "dor", "bri", "sun", "zal", "pim", "qua", "ter", "nox", "fen",
        "gal", "hu", "jor", "kip", "lum", "mar", "nel", "os", "pra", "ril", "sol", "tum", "ud", "vin", "wex"]

# attribute: (MMLU-like subject, bio phrasings, question, values)
ATTRIBUTES: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "city": ("geography", ("{e} lives in {v}.", "The home of {e} is {v}."), "In which city does {e} live?",
             ("Amberg", "Brisa", "Corvel", "Dunmar", "Elsin", "Farrow", "Galen", "Hollis", "Istra", "Jorvik",
              "Kestin", "Lomar", "Mirren", "Norvik", "Ostra", "Pellan")),
    "job": ("occupations", ("{e} works as a {v}.", "By trade, {e} is a {v}."), "What is the job of {e}?",
            ("baker", "pilot", "tailor", "farmer", "nurse", "judge", "miner", "poet", "chemist", "sailor",
             "carpenter", "dentist", "painter", "plumber", "teacher", "welder")),
    "pet": ("zoology", ("{e} keeps a {v} as a pet.", "The pet of {e} is a {v}."), "Which animal is the pet of {e}?",
            ("heron", "ferret", "gecko", "parrot", "rabbit", "tortoise", "hamster", "goat", "owl", "lizard",
             "pony", "goose", "beagle", "canary", "frog", "cat")),
    "instrument": ("music", ("{e} plays the {v}.", "The instrument of {e} is the {v}."),
                   "Which instrument does {e} play?",
                   ("lute", "harp", "cello", "oboe", "flute", "drum", "violin", "banjo", "tuba", "horn", "piano",
                    "sitar", "organ", "bugle", "fiddle", "zither")),
    "colour": ("preferences", ("The favourite colour of {e} is {v}.", "{e} likes the colour {v} best."),
               "What is the favourite colour of {e}?",
               ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown",
                "teal", "gold", "silver", "navy", "olive")),
}


def _entities(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    out = []
    while len(out) < n:
        first = "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
        name = f"{first} {last}"
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _fact_base(cfg: SuiteConfig) -> tuple[list[str], dict[str, dict[str, str]], dict[str, int]]:
    """Entities, their attribute values and their popularity (biographies in the corpus)."""
    rng = random.Random(f"facts-{cfg.seed}")
    ents = _entities(rng, cfg.n_entities)
    facts = {e: {a: rng.choice(vals) for a, (_, _, _, vals) in ATTRIBUTES.items()} for e in ents}
    lo, hi = cfg.bio_repeats
    if not 1 <= lo <= hi:
        raise PktError(f"`bio_repeats`={cfg.bio_repeats} must be a range (lo, hi) with 1 <= lo <= hi")
    popularity = {e: int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) for e in ents}
    return ents, facts, popularity


def _bio(rng: random.Random, e: str, attrs: dict[str, str]) -> str:
    order = list(attrs)
    rng.shuffle(order)
    return " ".join(rng.choice(ATTRIBUTES[a][1]).format(e=e, v=attrs[a]) for a in order)


def _knowledge_question(rng: random.Random, e: str, attr: str, value: str) -> tuple[str, str, str, list[str]]:
    """(user prompt, gold letter, answer text, choices) of one 4-choice question about a fact."""
    subject, _, question, values = ATTRIBUTES[attr]
    choices = [value] + rng.sample([v for v in values if v != value], 3)
    rng.shuffle(choices)
    letter = "ABCD"[choices.index(value)]
    # The answer names the choice by its text, not its letter: models of this size do not learn
    # to look up a letter in the budget (measured: letters no better than chance even when the
    # model states the right value first), and the recalled value is the knowledge being tested.
    answer = f"The answer is: {value}"
    return mmlu_user_prompt(subject, question.format(e=e), choices), letter, answer, choices


def _knowledge_splits(cfg: SuiteConfig) -> tuple[dict[str, list[Example]], list[str]]:
    """Splits of questions over disjoint facts, and the base corpus's knowledge documents."""
    n_q = sum(SPLIT_SIZES.values())
    if cfg.n_entities * len(ATTRIBUTES) < n_q:
        raise PktError(f"`n_entities`={cfg.n_entities} gives {cfg.n_entities * len(ATTRIBUTES)} facts; "
                       f"the knowledge splits need {n_q} distinct facts")
    ents, facts, popularity = _fact_base(cfg)
    rng = random.Random(f"knowledge-{cfg.seed}")
    pairs = [(e, a) for e in ents for a in ATTRIBUTES]
    rng.shuffle(pairs)
    splits: dict[str, list[Example]] = {}
    start = 0
    for split in ("test", "extract", "align", "train"):
        rows = []
        for i, (e, a) in enumerate(pairs[start:start + SPLIT_SIZES[split]]):
            prompt, letter, answer, choices = _knowledge_question(rng, e, a, facts[e][a])
            rows.append(Example([{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": answer}],
                                {"id": f"pocket-knowledge_{split}_{i}", "task": "pocket-knowledge", "answer": letter,
                                 "entity": e, "attribute": a, "value": facts[e][a], "choices": choices,
                                 "popularity": popularity[e]}))
        splits[split] = rows
        start += SPLIT_SIZES[split]
    # Corpus: every fact in several biographies; quizzes on every non-test fact ("mixed training":
    # seeing questions about some people teaches the model to extract facts about the others).
    test_facts = {(ex.meta["entity"], ex.meta["attribute"]) for ex in splits["test"]}
    docs = [_bio(rng, e, facts[e]) for e in ents for _ in range(popularity[e])]
    for e, a in pairs:
        if (e, a) not in test_facts:
            prompt, _, answer, _ = _knowledge_question(rng, e, a, facts[e][a])
            docs.append(f"{prompt} {answer}")
    return splits, docs


_NAMES = ["Ada", "Ben", "Cora", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jana", "Kai", "Lena", "Milo", "Nia",
          "Omar", "Pia", "Rosa", "Sami", "Tess", "Vik"]
_ITEMS = ["apples", "marbles", "stamps", "coins", "shells", "pencils", "cards", "beads", "stickers", "eggs"]


def _math_problem(rng: random.Random, steps_range: tuple[int, int]) -> tuple[str, str, int]:
    """A word problem with dependent steps on one running quantity; every number is in 1..59.

    Small numbers keep the addition and multiplication tables a model must memorise small enough
    to be seen many times in the corpus."""
    while True:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        x = rng.randint(2, 20)
        sentences = [f"{name} has {x} {item}."]
        work = []
        for _ in range(rng.randint(*steps_range)):
            op = rng.choice(["add", "sub", "mul", "div", "add_twice"])
            if op == "add":
                b = rng.randint(2, 15)
                y = x + b
                sentences.append(f"Then {name} gets {b} more.")
                work.append(f"{x} + {b} = {y}.")
            elif op == "sub" and x > 3:
                b = rng.randint(1, x - 1)
                y = x - b
                sentences.append(f"Then {name} gives away {b}.")
                work.append(f"{x} - {b} = {y}.")
            elif op == "mul" and x <= 29:
                b = rng.choice([2, 3]) if x <= 19 else 2
                y = x * b
                sentences.append(f"Then the number of {item} is multiplied by {b}.")
                work.append(f"{x} * {b} = {y}.")
            elif op == "div" and x % 2 == 0:
                y = x // 2
                sentences.append(f"Then {name} gives half of them to a friend.")
                work.append(f"{x} / 2 = {y}.")
            elif op == "add_twice" and x <= 19:
                y = 3 * x
                sentences.append(f"Then {name} finds twice as many as {name} has.")
                work.append(f"{x} * 2 = {2 * x}. {x} + {2 * x} = {y}.")
            else:
                continue
            x = y
            if x >= 60:
                break
        if x < 60 and len(work) >= steps_range[0]:
            question = " ".join(sentences) + f" How many {item} does {name} have now?"
            return question, " ".join(work) + f" So the answer is {x}.", x


def _math_splits(cfg: SuiteConfig) -> tuple[dict[str, list[Example]], list[str]]:
    rng = random.Random(f"math-{cfg.seed}")
    seen: set[str] = set()

    def fresh() -> tuple[str, str, int]:
        while True:
            q, sol, ans = _math_problem(rng, cfg.math_steps)
            if q not in seen:
                seen.add(q)
                return q, sol, ans

    splits = {}
    for split in ("test", "extract", "align", "train"):
        rows = []
        for i in range(SPLIT_SIZES[split]):
            q, sol, ans = fresh()
            rows.append(Example([{"role": "user", "content": gsm_user_prompt(q)},
                                 {"role": "assistant", "content": sol}],
                                {"id": f"pocket-math_{split}_{i}", "task": "pocket-math", "answer": str(ans)}))
        splits[split] = rows
    docs = [f"{ex.messages[0]['content']}\nAnswer: {ex.answer}" for s in ("extract", "align", "train") for ex in splits[s]]
    for _ in range(cfg.math_corpus):
        q, sol, _ = fresh()
        docs.append(f"{gsm_user_prompt(q)}\nAnswer: {sol}")
    return splits, docs


# Code problems: reduce(map(filter(xs))). The filter is a *named* kind of number ("the glim
# numbers in xs", meaning for example x % 7 == 3), one of `n_kinds` whose meanings are never
# defined in words: each is learned from the solved problems that use it, and some kinds are
# used far more often than others (like a library's common and rare functions). A model must
# store the meanings; how far into the tail it knows them measures how fast it memorises (the
# chapter "The pocket pair" plots pass rates by kind frequency). The map takes up to two
# parameters. Parts are (docstring phrase, code, python function).
def _code_kinds(cfg: "SuiteConfig") -> list[tuple[str, int, int, float]]:
    """(name, modulus, remainder, weight) of each kind: "x % modulus == remainder"."""
    rng = random.Random(f"code-kinds-{cfg.seed}")
    names: list[str] = []
    while len(names) < cfg.code_kinds:
        w = "".join(rng.choice(_SYL) for _ in range(2))
        if w not in names:
            names.append(w)
    lo_m, hi_m = cfg.code_moduli
    rules = [(m, r) for m in range(max(2, lo_m), hi_m + 1) for r in range(m)]
    if cfg.code_kinds > len(rules):
        raise PktError(f"`code_kinds`={cfg.code_kinds} exceeds the {len(rules)} rules x % m == r with m in "
                       f"`code_moduli`={cfg.code_moduli}")
    rules = rng.sample(rules, cfg.code_kinds)
    lo, hi = cfg.code_kind_weights
    return [(n, m, r, math.exp(rng.uniform(math.log(lo), math.log(hi)))) for n, (m, r) in zip(names, rules)]


_MAPS: list[tuple[str, str, Callable[[int, int, int], int]]] = [
    # (phrase with {k}/{j}, expression, function of x, k, j)
    ("", "x", lambda x, k, j: x),
    ("the squares of ", "x * x", lambda x, k, j: x * x),
    ("{k} times ", "x * {k}", lambda x, k, j: x * k),
    ("{k} plus ", "x + {k}", lambda x, k, j: x + k),
    ("the negatives of ", "-x", lambda x, k, j: -x),
    ("{k} minus ", "{k} - x", lambda x, k, j: k - x),
    ("the remainders modulo {k} of ", "x % {k}", lambda x, k, j: x % k),
    ("{j} plus {k} times ", "x * {k} + {j}", lambda x, k, j: x * k + j),
]
_REDUCES: list[tuple[str, str, Callable[[list[int]], Any]]] = [
    ("Return the sum of", "sum({gen})", lambda v: sum(v)),
    ("Return the largest of", "max([{body}], default=0)", lambda v: max(v, default=0)),
    ("Return the smallest of", "min([{body}], default=0)", lambda v: min(v, default=0)),
    ("Return a list of", "[{body}]", lambda v: list(v)),
    ("Return how many there are of", "len([{body}])", lambda v: len(v)),
]
_FN_NAMES = ["solve", "compute", "tally", "gather", "pick", "score", "measure", "collect", "combine", "process",
             "reduce_list", "transform", "summarize", "evaluate", "select", "count_up", "scan", "digest", "fold", "sift"]


def _code_problem(rng: random.Random, kinds: list[tuple[str, int, int, float]], *, uniform: bool = False
                  ) -> tuple[str, str, list[str], str, str]:
    """One problem; its kind drawn by the kinds' weights, or uniformly (the test split)."""
    kind, mod, rem, _ = rng.choice(kinds) if uniform else rng.choices(kinds, weights=[k[3] for k in kinds])[0]
    mdesc, mexpr, mfun = rng.choice(_MAPS)
    rdesc, rcode, rfun = rng.choice(_REDUCES)
    k2, j2 = rng.randint(2, 9), rng.randint(1, 9)
    name = rng.choice(_FN_NAMES)
    doc = f"{rdesc} {mdesc.format(k=k2, j=j2)}the {kind} numbers in xs."
    body = f"{mexpr.format(k=k2, j=j2)} for x in xs if x % {mod} == {rem}"
    ret = rcode.format(gen=body, body=body)
    signature = f"def {name}(xs):\n    \"\"\"{doc}\"\"\"\n"
    reference = f"def {name}(xs):\n    return {ret}\n"

    def truth(xs: list[int]) -> Any:
        return rfun([mfun(x, k2, j2) for x in xs if x % mod == rem])

    tests = []
    for _ in range(3):
        # half the inputs are of the kind, so the filter matters in every assert
        xs = [rng.randint(0, 4) * mod + rem if rng.random() < 0.5 else rng.randint(0, 30)
              for _ in range(rng.randint(3, 6))]
        tests.append(f"assert {name}({xs!r}) == {truth(xs)!r}")
    return signature, reference, tests, name, kind


def _code_splits(cfg: SuiteConfig) -> tuple[dict[str, list[Example]], list[str]]:
    rng = random.Random(f"code-{cfg.seed}")
    kinds = _code_kinds(cfg)
    total = sum(k[3] for k in kinds)
    weight = {k[0]: k[3] / total for k in kinds}
    seen: set[str] = set()

    def fresh(uniform: bool = False) -> tuple[str, str, list[str], str, str]:
        while True:
            p = _code_problem(rng, kinds, uniform=uniform)
            if p[0] not in seen:
                seen.add(p[0])
                return p

    splits = {}
    for split in ("test", "extract", "align", "train"):
        rows = []
        for i in range(SPLIT_SIZES[split]):
            # The test asks about every kind equally (as the knowledge test asks about every
            # person, famous or not); the other splits and the corpus follow the kinds' weights.
            signature, ref, tests, name, kind = fresh(uniform=split == "test")
            rows.append(Example([{"role": "user", "content": code_user_prompt(signature)},
                                 {"role": "assistant", "content": f"```python\n{ref}```"}],
                                {"id": f"pocket-code_{split}_{i}", "task": "pocket-code", "tests": tests,
                                 "entry_point": name, "reference": ref, "kind": kind,
                                 "kind_frequency": round(weight[kind], 5)}))
        splits[split] = rows
    docs = [f"{ex.messages[0]['content']}\n{ex.answer}" for s in ("extract", "align", "train") for ex in splits[s]]
    for _ in range(cfg.code_corpus):
        signature, ref, _, _, _ = fresh()
        docs.append(f"{code_user_prompt(signature)}\n```python\n{ref}```")
    return splits, docs


_GENERATORS = {"knowledge": _knowledge_splits, "math": _math_splits, "code": _code_splits}


def generate_suite(cfg: SuiteConfig = SuiteConfig()) -> tuple[dict[str, dict[str, list[Example]]], list[str]]:
    """All splits ``{family: {split: examples}}`` and the base corpus documents (in family order).

    Pure and deterministic in ``cfg``; takes about a second.
    """
    splits, docs = {}, []
    for fam, gen in _GENERATORS.items():
        splits[fam], d = gen(cfg)
        docs += d
    return splits, docs


def suite_dir(cfg: SuiteConfig = SuiteConfig()) -> Path:
    key = hashlib.sha256((json.dumps(asdict(cfg), sort_keys=True) + f"|v{SUITE_VERSION}").encode()).hexdigest()[:10]
    return cache_dir() / f"suite-s{cfg.seed}-{key}"


def _ensure_suite(cfg: SuiteConfig) -> Path:
    d = suite_dir(cfg)
    if (d / "DONE").is_file():
        return d
    with _locked(cache_dir() / ".suite.lock"):
        if not (d / "DONE").is_file():
            splits, docs = generate_suite(cfg)
            for fam, by_split in splits.items():
                for split, rows in by_split.items():
                    write_examples(d / f"pocket-{fam}" / f"{split}.jsonl", rows)
            from pktlib.records import atomic_write_text

            atomic_write_text(d / "corpus.jsonl", "\n".join(json.dumps(t) for t in docs) + "\n")
            atomic_write_text(d / "DONE", json.dumps(asdict(cfg)) + "\n")
    return d


def suite_file(name: str, split: str, *, suite: SuiteConfig = SuiteConfig()) -> Path:
    """Path of the jsonl of task ``name`` ("pocket-math", ...) and ``split``, generated on first use."""
    fam = name.removeprefix("pocket-")
    if fam not in FAMILIES:
        raise PktError(f"unknown pocket task {name!r}; expected one of {', '.join('pocket-' + f for f in FAMILIES)}")
    if split not in SPLIT_SIZES:
        raise PktError(f"pocket task {name!r} has no split {split!r}; splits: {', '.join(SPLIT_SIZES)}")
    return _ensure_suite(suite) / f"pocket-{fam}" / f"{split}.jsonl"


def base_corpus(suite: SuiteConfig = SuiteConfig()) -> list[str]:
    """The plain-text documents of the base corpus (facts, solved problems, code)."""
    path = _ensure_suite(suite) / "corpus.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def chat_examples(suite: SuiteConfig = SuiteConfig(), split: str = "train") -> list[Example]:
    return [ex for fam in FAMILIES for ex in load_examples(suite_file(f"pocket-{fam}", split, suite=suite))]


# ========================================================================================
# Tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (bos ``<s>``, eos ``</s>``, pad ``<pad>``).

    Byte-level, so it round-trips any text; trained deterministically on ``texts``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Every number 0..99 as one token (a leading space, as in the corpus): arithmetic then works on
    # whole numbers, so each step of a math problem is one lookup rather than digit-by-digit carries.
    numbers = [" ".join(str(i) for i in range(100))] * 100
    tok.train_from_iterator(list(texts) + numbers, trainer)
    from tokenizers.processors import TemplateProcessing

    bos = tok.token_to_id("<s>")
    # Prepend <s> when add_special_tokens=True, as Llama tokenizers do.
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=512)
    return fast


# ========================================================================================
# Models and training


def build_model(cfg: ModelConfig, tokenizer, *, seed: int, max_positions: int = 512):
    """A freshly initialised ``LlamaForCausalLM`` (float32) of shape ``cfg``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainLog:
    """What a training stage did: the card's training section."""

    steps: int = 0
    tokens: int = 0  # tokens in the batches (answer tokens for chat are counted in `loss_tokens`)
    loss_tokens: int = 0
    seconds: float = 0.0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last record)


def _autocast(dtype: str | None) -> contextlib.AbstractContextManager:
    """Autocast on the CPU, where the pocket pair trains; a null context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise PktError(f"ModelConfig.autocast={dtype!r} is not a torch dtype (e.g. 'bfloat16')")
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


@with_grad
def _run_steps(model, batches: list[dict[str, torch.Tensor]], cfg: TrainConfig, *, seed: int,
               autocast: str | None = None, progress: Callable[[int], None] | None = None) -> TrainLog:
    """AdamW over ``batches`` in the given order, with warm-up + cosine decay and grad clipping.

    ``autocast``: the dtype of the forward's matmuls (:attr:`ModelConfig.autocast`), or None.
    """
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    log = TrainLog()
    t0 = time.perf_counter()
    acc, acc_n = 0.0, 0
    total = len(batches)
    amp = _autocast(autocast)  # checked once; the context is re-entered every step
    for step, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, cfg)
        with amp:
            out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=b["labels"])
        loss = out.loss.float()
        if not torch.isfinite(loss):
            raise PktError(f"training diverged: loss {loss.item()} at step {step} (lr {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.steps += 1
        log.tokens += int(b["input_ids"].numel())
        log.loss_tokens += int((b["labels"][:, 1:] != -100).sum())
        acc, acc_n = acc + loss.item(), acc_n + 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            log.loss_curve.append((step + 1, round(acc / acc_n, 5)))
            acc, acc_n = 0.0, 0
        if progress:
            progress(int(b["input_ids"].numel()))
    log.seconds = time.perf_counter() - t0
    model.eval()
    return log


def base_batches(tokenizer, docs: Sequence[str], cfg: PairConfig, *, seed: int) -> list[dict[str, torch.Tensor]]:
    """The base corpus shuffled (by ``seed``), packed into ``seq_len`` blocks: ``<s> doc </s> <s> doc ...``."""
    rng = random.Random(f"order-{seed}")
    docs = list(docs)
    rng.shuffle(docs)
    docs = docs[: max(1, int(len(docs) * cfg.corpus_share))]
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
    stream = [t for seq in ids for t in (*seq, tokenizer.eos_token_id)]
    n_blocks = len(stream) // cfg.seq_len
    blocks = torch.tensor(stream[: n_blocks * cfg.seq_len]).view(n_blocks, cfg.seq_len)  # (N, T)
    n_batches = max(1, int(n_blocks * cfg.base.epochs) // cfg.base.batch_size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(n_batches):
        idx = order[torch.arange(i * cfg.base.batch_size, (i + 1) * cfg.base.batch_size) % n_blocks]
        x = blocks[idx]  # (B, T)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def chat_batches(tokenizer, examples: Sequence[Example], cfg: PairConfig, *, seed: int) -> list[dict[str, torch.Tensor]]:
    """Prompt/answer pairs in the default chat format, loss on the answers, shuffled by ``seed``.

    Epoch after epoch of fresh permutations; only the examples used are tokenised (the tiny
    preset uses a few dozen of the 3,000).
    """
    n = len(examples)
    n_batches = max(1, int(n * cfg.chat.epochs) // cfg.chat.batch_size)
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(cfg.chat.epochs) + 1)]).tolist()
    cache: dict[int, dict[str, Any] | None] = {}

    def item(j: int) -> dict[str, Any] | None:
        if j not in cache:
            it = tokenize_example(tokenizer, examples[j], max_length=cfg.seq_len)
            # An example truncated before its answer has no loss tokens (a batch of those has a NaN loss).
            cache[j] = it if any(l != -100 for l in it["labels"][1:]) else None
        return cache[j]

    items = []
    for j in order:
        if len(items) == n_batches * cfg.chat.batch_size:
            break
        if item(j) is not None:
            items.append(item(j))
    if not items:
        raise PktError(f"every chat example is truncated before its answer at seq_len={cfg.seq_len}")
    # Length buckets: within windows of 8 batches, sort by length before cutting batches, then
    # shuffle the batches; padding (a third of the tokens otherwise) drops, the order stays random.
    bs = cfg.chat.batch_size
    groups = []
    for w in range(0, len(items) - bs + 1, 8 * bs):
        window = sorted(items[w:w + 8 * bs], key=lambda it: len(it["input_ids"]))
        groups += [window[i:i + bs] for i in range(0, len(window) - bs + 1, bs)]
    perm = torch.randperm(len(groups), generator=g).tolist()
    out = []
    for i in perm:
        b = collate(groups[i], tokenizer.pad_token_id)
        out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels})
    return out


def with_replay(chat: list[dict[str, torch.Tensor]], base: list[dict[str, torch.Tensor]], share: float
                ) -> list[dict[str, torch.Tensor]]:
    """``chat`` batches with ``round(share * len(chat))`` base batches spread evenly among them.

    The base batches are taken from the end of ``base`` backwards, the blocks seen last in
    pre-training, so replay costs no extra tokenisation and is deterministic.
    """
    n = min(len(base), round(share * len(chat)))
    if n <= 0:
        return list(chat)
    out: list[dict[str, torch.Tensor]] = []
    r = 0  # replay batches placed so far
    for i, b in enumerate(chat):
        out.append(b)
        while r < (i + 1) * n // len(chat):  # spread evenly: r reaches n after the last chat batch
            out.append(base[len(base) - 1 - r])
            r += 1
    return out


def _role_model(cfg: PairConfig, role: str) -> ModelConfig:
    return cfg.teacher if role == "teacher" else cfg.student


def _stage_config(cfg: PairConfig, role: str, variant: str) -> TrainConfig:
    """The stage's training config with the learning rate of this model's width."""
    stage = cfg.base if variant == "base" else cfg.chat
    return replace(stage, lr=stage.lr_for(_role_model(cfg, role).hidden_size))


def _train(model, batches, cfg: PairConfig, variant: str, *, seed: int, role: str, progress=None) -> TrainLog:
    """One stage of ``role``'s training: the stage's config at this width, the model's autocast."""
    return _run_steps(model, batches, _stage_config(cfg, role, variant), seed=seed,
                      autocast=_role_model(cfg, role).autocast, progress=progress)


def train_base(model, batches, cfg: PairConfig, *, seed: int, role: str = "teacher", progress=None) -> TrainLog:
    return _train(model, batches, cfg, "base", seed=seed, role=role, progress=progress)


def train_chat(model, batches, cfg: PairConfig, *, seed: int, role: str = "teacher", progress=None) -> TrainLog:
    return _train(model, batches, cfg, "chat", seed=seed, role=role, progress=progress)


# ========================================================================================
# The pair


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

    def checkpoints(self) -> dict[str, Path]:
        return {"teacher-base": self.teacher_base, "teacher-chat": self.teacher_chat,
                "student-base": self.student_base, "student-chat": self.student_chat}


def pair_dir(preset: str = "default", seed: int = 0) -> Path:
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


def _pair(root: Path, variant: str) -> PocketPair:
    return PocketPair(variant, root / "teacher-base", root / "teacher-chat", root / "student-base",
                      root / "student-chat", root)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _save(model, tokenizer, out: Path, card: dict[str, Any]) -> None:
    """Save in Hugging Face format through a temporary folder, so a folder is complete or absent."""
    from pktlib.records import write_json

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "card.json", card)
    (tmp / "CARD.md").write_text(_card_markdown(card), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _card_markdown(card: dict[str, Any]) -> str:
    arch = card["architecture"]
    rows = [("checkpoint", card["name"]), ("preset / seed", f"{card['preset']} / {card['seed']}"),
            ("layers", arch["n_layers"]), ("hidden size", arch["hidden_size"]),
            ("FFN size", arch["intermediate_size"]), ("heads x head_dim", f"{arch['n_heads']} x {arch['head_dim']}"),
            ("vocabulary", arch["vocab_size"]), ("parameters", f"{card['parameters']:,}")]
    for stage, t in card["training"].items():
        rows.append((f"{stage}: steps / tokens / seconds", f"{t['steps']} / {t['tokens']:,} / {t['seconds']:.0f}"))
        if t["loss_curve"]:
            rows.append((f"{stage}: final loss", f"{t['loss_curve'][-1][1]:.3f}"))
    for task, s in (card.get("scores") or {}).items():
        rows.append((f"{task} (test)", f"{s:.1f}"))
    return "| field | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def read_card(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / "card.json"
    if not path.is_file():
        raise PktError(f"{checkpoint} has no card.json: not a pocket-pair checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def _stage_cost(cfg: PairConfig, n_base_tokens: int, n_chat_tokens: int) -> dict[str, float]:
    """Relative compute of each stage (tokens x non-embedding parameters), for the progress bar."""
    def p(m: ModelConfig) -> float:
        return m.n_layers * (4 * m.hidden_size ** 2 + 3 * m.hidden_size * m.intermediate_size) + 2 * cfg.vocab_size * m.hidden_size
    return {"teacher-base": n_base_tokens * p(cfg.teacher), "student-base": n_base_tokens * p(cfg.student),
            "teacher-chat": n_chat_tokens * p(cfg.teacher), "student-chat": n_chat_tokens * p(cfg.student)}


def build_pair(preset: str = "default", *, seed: int = 0, force: bool = False, progress: bool = True,
               config: PairConfig | None = None, root: Path | None = None,
               only: Sequence[str] | None = None) -> PocketPair:
    """Train (or find) the four checkpoints of ``preset`` with ``seed``. Resumable per checkpoint.

    Each checkpoint is trained under its own lock, so concurrent callers share the work instead
    of repeating it; ``only`` restricts this call to some checkpoints (a chat checkpoint needs
    its base). ``config``/``root`` override the preset (tests use an even smaller configuration).
    """
    from tqdm.auto import tqdm

    cfg = for_this_machine(config) if config else get_preset(preset)
    root = root or pair_dir(preset, seed)
    pair = _pair(root, "chat")
    paths = pair.checkpoints()
    names = [n for n in CHECKPOINTS if only is None or n in only]
    if only is not None and set(only) - set(CHECKPOINTS):
        raise PktError(f"unknown checkpoints {sorted(set(only) - set(CHECKPOINTS))}; expected some of {CHECKPOINTS}")

    def done(name: str) -> bool:
        return (paths[name] / "card.json").is_file()

    with _locked(root.with_name(root.name + ".lock")):
        if force:
            shutil.rmtree(root, ignore_errors=True)
        if all(done(n) for n in names):
            return pair
        root.mkdir(parents=True, exist_ok=True)
        docs = base_corpus(cfg.suite)
        tok_dir = root / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            chat = chat_examples(cfg.suite)
            texts = docs + [format_prompt(ex.messages) + ex.answer for ex in chat]
            # The tiny preset trains its tokenizer on a slice too (byte-level BPE round-trips any text).
            texts = random.Random(0).sample(texts, max(200, int(len(texts) * min(1.0, 10 * cfg.corpus_share))))
            train_tokenizer(texts, cfg.vocab_size).save_pretrained(tok_dir)
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from pktlib.models import spec

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    torch_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    bb = base_batches(tokenizer, docs, cfg, seed=seed)
    cb = with_replay(chat_batches(tokenizer, chat_examples(cfg.suite), cfg, seed=seed), bb, cfg.chat.replay)
    n_tok = {"base": sum(b["input_ids"].numel() for b in bb), "chat": sum(b["input_ids"].numel() for b in cb)}
    cost = {n: c for n, c in _stage_cost(cfg, n_tok["base"], n_tok["chat"]).items() if n in names}
    # The bar advances by compute (tokens x parameters), so its time-left estimate holds across
    # the four stages although they run at very different token rates.
    bar = tqdm(total=round(sum(cost.values()) / 1e9, 2), disable=not progress, desc=f"pocket pair {preset}",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left {postfix}")
    for name in names:
        role, variant = name.split("-")
        with _locked(root / f".{name}.lock"):
            if done(name):
                bar.update(round(cost[name] / 1e9, 2))
                continue
            if variant == "chat" and not done(f"{role}-base"):
                raise PktError(f"{name} needs {role}-base, which is not built in {root}")
            per_token = cost[name] / 1e9 / max(1, n_tok[variant])
            bar.set_postfix_str(name)
            if variant == "base":
                model = build_model(_role_model(cfg, role), tokenizer,
                                    seed=seed + (0 if role == "teacher" else 1))
                training = {}
            else:
                model = LlamaForCausalLM.from_pretrained(paths[f"{role}-base"], dtype=torch.float32)
                training = dict(read_card(paths[f"{role}-base"])["training"])
            log = _train(model, bb if variant == "base" else cb, cfg, variant, role=role,
                         seed=seed + (10 if variant == "chat" else 0), progress=lambda n: bar.update(n * per_token))
            training[variant] = asdict(log)
            card = {"name": name, "preset": preset, "seed": seed, "config_key": cfg.key(),
                    "architecture": spec(model.config).to_dict(), "parameters": _n_params(model),
                    "training": training, "torch_threads": torch_threads,
                    "matmul_precision": _role_model(cfg, role).autocast or "float32", "scores": None}
            _save(model, tokenizer, paths[name], card)
    bar.close()
    from pktlib.records import write_json

    write_json(root / f"build-{os.getpid()}.json", {"preset": preset, "seed": seed, "config": asdict(cfg),
                                                     "checkpoints": names, "wall_seconds": time.perf_counter() - t_start})
    return pair


def pocket_pair(variant: str = "chat", *, seed: int = 0, preset: str = "default", force: bool = False,
                progress: bool = True) -> PocketPair:
    """The pocket pair's checkpoints (building them on first use; ``force`` rebuilds).

    ``variant`` ("chat" or "base") picks what ``.teacher``/``.student`` point to.
    """
    if variant not in ("chat", "base"):
        raise PktError(f"unknown pocket-pair variant {variant!r}; expected 'chat' or 'base'")
    pair = build_pair(preset, seed=seed, force=force, progress=progress)
    return replace(pair, variant=variant)


def score_pair(pair: PocketPair, *, force: bool = False, limit: int | None = None,
               progress: bool = True) -> dict[str, dict[str, float]]:
    """Test scores (0-100) of every checkpoint on every family: ``{checkpoint: {task: score}}``.

    Uses :func:`pktlib.evaluation.evaluate` (greedy, Hugging Face backend, :data:`MAX_NEW_TOKENS`).
    Full-split scores are written into the cards (and read back from them unless ``force``);
    scores on the first ``limit`` test examples are returned but not stored.
    """
    try:
        from pktlib.evaluation import evaluate
    except ImportError as e:
        raise PktError("scoring the pocket pair needs pktlib.evaluation") from e
    from pktlib.records import write_json

    out = {}
    for name, path in pair.checkpoints().items():
        card = read_card(path)
        if card.get("scores") and not force and limit is None:
            out[name] = card["scores"]
            continue
        scores, seconds = {}, 0.0
        for fam in FAMILIES:
            res = evaluate(path, f"pocket-{fam}", split="test", backend="hf", limit=limit, batch_size=64,
                           max_new_tokens=MAX_NEW_TOKENS[fam], progress=progress)
            scores[f"pocket-{fam}"] = float(res.score)
            seconds += res.wall_s
        if limit is None:
            card["scores"], card["scoring_seconds"] = scores, round(seconds, 1)
            write_json(path / "card.json", card)
            (path / "CARD.md").write_text(_card_markdown(card), encoding="utf-8")
        out[name] = scores
    return out
