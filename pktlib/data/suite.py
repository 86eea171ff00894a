"""The pocket suite: the synthetic tasks the pocket pair is trained and scored on (DESIGN.md 3).

Three task kinds mirror the paper's:

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
no prompt is shared between splits. The suite depends on its own seed (``SuiteConfig.seed``,
default 0, what :func:`pktlib.data.load_task` reads) and not on a pair's training seed, so
pairs trained with different seeds are scored on the same test questions. It is generated on
first use into the cache (:func:`suite_file`), with the base corpus the pair pre-trains on.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pktlib.cache import cache_dir, locked
from pktlib.errors import PktError
from pktlib.data.examples import Example, load_examples, write_examples
from pktlib.data.prompts import code_user_prompt, gsm_user_prompt, mmlu_user_prompt
from pktlib.records import atomic_write_text

__all__ = [
    "FAMILIES",
    "SPLIT_SIZES",
    "SUITE_VERSION",
    "SuiteConfig",
    "generate_suite",
    "fresh_examples",
    "suite_dir",
    "suite_file",
    "base_corpus",
    "chat_examples",
]

FAMILIES = ("knowledge", "math", "code")
SPLIT_SIZES = {"extract": 32, "align": 80, "train": 1000, "test": 300}
SUITE_VERSION = 7  # bump when the generators change: the cache keys of suites and pairs include it


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


def _knowledge_splits(cfg: SuiteConfig, fresh_n: int = 0) -> tuple[dict[str, list[Example]], list[str]]:
    """Splits of questions over disjoint facts, and the base corpus's knowledge documents."""
    if fresh_n:
        raise PktError("pocket-knowledge has no fresh questions: its questions are about the suite's fixed fact "
                       "base, and every fact is already in a split (math and code problems can be drawn afresh)")
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


def _math_example(q: str, sol: str, ans: int, example_id: str) -> Example:
    return Example([{"role": "user", "content": gsm_user_prompt(q)}, {"role": "assistant", "content": sol}],
                   {"id": example_id, "task": "pocket-math", "answer": str(ans)})


def _math_splits(cfg: SuiteConfig, fresh_n: int = 0) -> tuple[dict[str, list[Example]], list[str]]:
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
            rows.append(_math_example(*fresh(), f"pocket-math_{split}_{i}"))
        splits[split] = rows
    docs = [f"{ex.messages[0]['content']}\nAnswer: {ex.answer}" for s in ("extract", "align", "train") for ex in splits[s]]
    for _ in range(cfg.math_corpus):
        q, sol, _ = fresh()
        docs.append(f"{gsm_user_prompt(q)}\nAnswer: {sol}")
    # drawn after everything else, so the suite's own splits and corpus do not depend on fresh_n
    splits["fresh"] = [_math_example(*fresh(), f"pocket-math_fresh_{i}") for i in range(fresh_n)]
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


def _code_splits(cfg: SuiteConfig, fresh_n: int = 0) -> tuple[dict[str, list[Example]], list[str]]:
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

    def example(split: str, i: int) -> Example:
        # The test asks about every kind equally (as the knowledge test asks about every person,
        # famous or not), and so do fresh problems (they stand in for more test-like questions);
        # the other splits and the corpus follow the kinds' weights.
        signature, ref, tests, name, kind = fresh(uniform=split in ("test", "fresh"))
        return Example([{"role": "user", "content": code_user_prompt(signature)},
                        {"role": "assistant", "content": f"```python\n{ref}```"}],
                       {"id": f"pocket-code_{split}_{i}", "task": "pocket-code", "tests": tests,
                        "entry_point": name, "reference": ref, "kind": kind,
                        "kind_frequency": round(weight[kind], 5)})

    splits = {split: [example(split, i) for i in range(SPLIT_SIZES[split])]
              for split in ("test", "extract", "align", "train")}
    docs = [f"{ex.messages[0]['content']}\n{ex.answer}" for s in ("extract", "align", "train") for ex in splits[s]]
    for _ in range(cfg.code_corpus):
        signature, ref, _, _, _ = fresh()
        docs.append(f"{code_user_prompt(signature)}\n```python\n{ref}```")
    # drawn after everything else, so the suite's own splits and corpus do not depend on fresh_n
    splits["fresh"] = [example("fresh", i) for i in range(fresh_n)]
    return splits, docs


_GENERATORS = {"knowledge": _knowledge_splits, "math": _math_splits, "code": _code_splits}


def generate_suite(cfg: SuiteConfig = SuiteConfig()) -> tuple[dict[str, dict[str, list[Example]]], list[str]]:
    """All splits ``{family: {split: examples}}`` and the base corpus documents (in family order).

    Pure and deterministic in ``cfg``; takes about a second.
    """
    splits, docs = {}, []
    for fam, gen in _GENERATORS.items():
        splits[fam], d = gen(cfg)
        splits[fam].pop("fresh", None)
        docs += d
    return splits, docs


def fresh_examples(family: str, n: int, *, suite: SuiteConfig = SuiteConfig()) -> list[Example]:
    """``n`` new problems of ``family`` ("math" or "code") that are in no split and not in the base corpus.

    They continue the suite's own generator after its corpus (so they are deterministic in
    ``suite``, and the first ``k`` of ``n`` are the ``k`` of a shorter call), drawn like the test
    split (code: every kind equally). Ids are ``pocket-<family>_fresh_<i>``. A specialist teacher
    trains and is judged on them (:mod:`pktlib.zoo.specialist`): more data of the test's kind,
    never the test itself. Raises PktError for ``knowledge`` (a fixed fact base) or ``n`` < 0.
    """
    if family not in _GENERATORS:
        raise PktError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if n < 0:
        raise PktError(f"fresh_examples needs n >= 0, got {n}")
    return _GENERATORS[family](suite, n)[0]["fresh"]


def suite_dir(cfg: SuiteConfig = SuiteConfig()) -> Path:
    key = hashlib.sha256((json.dumps(asdict(cfg), sort_keys=True) + f"|v{SUITE_VERSION}").encode()).hexdigest()[:10]
    return cache_dir() / f"suite-s{cfg.seed}-{key}"


def _ensure_suite(cfg: SuiteConfig) -> Path:
    d = suite_dir(cfg)
    if (d / "DONE").is_file():
        return d
    with locked(cache_dir() / ".suite.lock"):
        if not (d / "DONE").is_file():
            splits, docs = generate_suite(cfg)
            for fam, by_split in splits.items():
                for split, rows in by_split.items():
                    write_examples(d / f"pocket-{fam}" / f"{split}.jsonl", rows)
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
    """Every family's examples of ``split`` (the chat stage's data: ``train``), family after family."""
    return [ex for fam in FAMILIES for ex in load_examples(suite_file(f"pocket-{fam}", split, suite=suite))]
