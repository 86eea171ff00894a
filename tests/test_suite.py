"""The pocket suite: splits, disjointness, correct references, determinism, the fact base."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pktlib.data import suite
from pktlib.data import load_task
from pktlib.errors import PktError

FAMILIES = suite.FAMILIES
SPLITS = tuple(suite.SPLIT_SIZES)


@pytest.fixture(scope="module")
def suite_splits(cache):
    return {fam: {s: load_task(f"pocket-{fam}", s) for s in SPLITS} for fam in FAMILIES}


def test_suite_lives_in_cache(cache):
    path = suite.suite_file("pocket-math", "test")
    assert path.is_file() and cache in path.parents, path
    with pytest.raises(PktError, match="no split"):
        suite.suite_file("pocket-math", "dev")
    with pytest.raises(PktError, match="unknown pocket task"):
        suite.suite_file("pocket-poetry", "test")


def test_split_sizes_and_meta(suite_splits):
    for fam in FAMILIES:
        for split in SPLITS:
            rows = suite_splits[fam][split]
            assert len(rows) == suite.SPLIT_SIZES[split], (fam, split, len(rows))
            ids = {ex.meta["id"] for ex in rows}
            assert len(ids) == len(rows), f"duplicate ids in {fam}/{split}"
            for ex in rows:
                assert ex.meta["task"] == f"pocket-{fam}"
                assert [m["role"] for m in ex.messages] == ["user", "assistant"]
    for ex in suite_splits["knowledge"]["test"]:
        assert ex.answer == f"The answer is: {ex.meta['value']}"
        assert ex.meta["answer"] in ("A", "B", "C", "D")
        # the gold letter names the stored value among the four choices
        assert re.search(rf"^{ex.meta['answer']}\. {re.escape(ex.meta['value'])}$", ex.messages[0]["content"], re.M)
    for ex in suite_splits["code"]["test"]:
        assert ex.answer.startswith("```python\n") and ex.answer.endswith("```")
        assert f"def {ex.meta['entry_point']}(" in ex.meta["reference"]
        assert len(ex.meta["tests"]) == 3 and all(t.startswith("assert ") for t in ex.meta["tests"])


def test_splits_are_disjoint(suite_splits):
    for fam in FAMILIES:
        seen: dict[str, str] = {}
        for split in SPLITS:
            for ex in suite_splits[fam][split]:
                prompt = ex.messages[0]["content"]
                assert prompt not in seen, f"{fam}: prompt in both {seen[prompt]} and {split}: {prompt[:80]!r}"
                seen[prompt] = split
    # Knowledge test questions are about facts no other split (or corpus quiz) asks about.
    kn = suite_splits["knowledge"]
    test_facts = {(ex.meta["entity"], ex.meta["attribute"]) for ex in kn["test"]}
    other = {(ex.meta["entity"], ex.meta["attribute"]) for s in ("extract", "align", "train") for ex in kn[s]}
    assert not test_facts & other


def test_test_prompts_not_in_corpus(suite_splits):
    corpus = "\n".join(suite.base_corpus())
    for fam in FAMILIES:
        for ex in suite_splits[fam]["test"][:100]:
            assert ex.messages[0]["content"] not in corpus, (fam, ex.meta["id"])
    # ...but the facts the knowledge test asks about are stated there
    for ex in suite_splits["knowledge"]["test"][:20]:
        assert ex.meta["entity"] in corpus and ex.meta["value"] in corpus


def test_math_solutions_are_correct_and_multistep(suite_splits):
    step = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
    for split in SPLITS:
        for ex in suite_splits["math"][split]:
            steps = step.findall(ex.answer)
            assert len(steps) >= 2, ex.answer
            for a, op, b, c in steps:
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op] == int(c), ex.answer
            # each step uses the previous step's result: the steps form one chain
            assert ex.answer.endswith(f"So the answer is {ex.meta['answer']}.")
            assert steps[-1][3] == ex.meta["answer"]


def _run_all(programs: list[str]) -> list[bool]:
    """Run each program in its own namespace inside one subprocess; True where it raised nothing."""
    driver = (
        "import json, sys\nprogs = json.load(sys.stdin)\nout = []\n"
        "for p in progs:\n    try:\n        exec(p, {})\n        out.append(True)\n"
        "    except Exception:\n        out.append(False)\nprint(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", driver], input=json.dumps(programs), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_code_references_pass_their_asserts(suite_splits):
    rows = [ex for s in SPLITS for ex in suite_splits["code"][s]]
    ok = _run_all([ex.meta["reference"] + "\n" + "\n".join(ex.meta["tests"]) for ex in rows])
    bad = [ex.meta["id"] for ex, k in zip(rows, ok) if not k]
    assert not bad, f"{len(bad)} reference solutions fail their asserts: {bad[:5]}"
    # The asserts discriminate: another problem's solution (renamed) fails most of them.
    wrong = []
    for a, b in zip(rows[:200], rows[1:201]):
        code = b.meta["reference"].replace(f"def {b.meta['entry_point']}(", f"def {a.meta['entry_point']}(")
        if code != a.meta["reference"]:
            wrong.append(code + "\n" + "\n".join(a.meta["tests"]))
    passed = sum(_run_all(wrong))
    assert passed < 0.2 * len(wrong), f"{passed} of {len(wrong)} wrong solutions pass the asserts"


def test_suite_is_deterministic():
    a_splits, a_docs = suite.generate_suite(suite.SuiteConfig(seed=3))
    b_splits, b_docs = suite.generate_suite(suite.SuiteConfig(seed=3))
    c_splits, _ = suite.generate_suite(suite.SuiteConfig(seed=4))
    assert a_docs == b_docs
    for fam in FAMILIES:
        assert [e.messages for e in a_splits[fam]["test"]] == [e.messages for e in b_splits[fam]["test"]]
        assert [e.messages for e in a_splits[fam]["test"]] != [e.messages for e in c_splits[fam]["test"]]


def test_fresh_problems_are_new_deterministic_and_leave_the_suite_unchanged():
    cfg = suite.SuiteConfig(seed=3)
    splits, docs = suite.generate_suite(cfg)
    prompts = {ex.messages[0]["content"] for by in splits.values() for rows in by.values() for ex in rows}
    for fam in ("math", "code"):
        fresh = suite.fresh_examples(fam, 60, suite=cfg)
        assert len(fresh) == 60 and [ex.meta["id"] for ex in fresh[:2]] == [f"pocket-{fam}_fresh_0",
                                                                            f"pocket-{fam}_fresh_1"]
        texts = [ex.messages[0]["content"] for ex in fresh]
        assert len(set(texts)) == 60 and not set(texts) & prompts
        # not in the base corpus either (its documents start with the problem's prompt)
        assert not any(doc.startswith(t) for doc in docs for t in texts)
        # a longer call starts with the shorter one: a specialist's decision questions stay put
        assert [ex.messages for ex in suite.fresh_examples(fam, 80, suite=cfg)[:60]] == [ex.messages for ex in fresh]
        # the same kind of question as the split's: gold answers and tests in the same form
        assert set(fresh[0].meta) == set(splits[fam]["test"][0].meta) - {"id"} | {"id"}
    # drawing fresh problems changes nothing in the suite itself
    again, again_docs = suite.generate_suite(cfg)
    assert again_docs == docs and all([e.messages for e in again[f][s]] == [e.messages for e in splits[f][s]]
                                      for f in splits for s in splits[f])
    code = suite.fresh_examples("code", 200, suite=cfg)
    assert len({ex.meta["kind"] for ex in code}) > 40  # every kind equally, like the test split
    with pytest.raises(PktError, match="no fresh questions"):
        suite.fresh_examples("knowledge", 1, suite=cfg)
    with pytest.raises(PktError, match="n >= 0"):
        suite.fresh_examples("math", -1, suite=cfg)


def test_popularity_spans_its_range_and_sets_bio_counts(suite_splits):
    lo, hi = suite.SuiteConfig().bio_repeats
    pops = [ex.meta["popularity"] for ex in suite_splits["knowledge"]["test"]]
    assert min(pops) >= lo and max(pops) <= hi and len(set(pops)) > 10, sorted(set(pops))
    # an entity's popularity is how many biographies state its facts in the corpus
    docs = suite.base_corpus()
    ex = max(suite_splits["knowledge"]["test"], key=lambda e: e.meta["popularity"])
    bios = [d for d in docs if d.count(ex.meta["entity"]) >= 5 and "The answer is" not in d]
    assert len(bios) == ex.meta["popularity"], (ex.meta["entity"], len(bios), ex.meta["popularity"])
    with pytest.raises(PktError, match="bio_repeats"):
        suite.generate_suite(suite.SuiteConfig(bio_repeats=(5, 2)))


def test_code_kinds_use_distinct_rules_within_their_moduli():
    cfg = suite.SuiteConfig(code_kinds=12, code_moduli=(3, 5))  # 3 + 4 + 5 = 12 rules: all of them
    kinds = suite._code_kinds(cfg)
    assert sorted((m, r) for _, m, r, _ in kinds) == [(m, r) for m in (3, 4, 5) for r in range(m)]
    assert len({name for name, *_ in kinds}) == 12
    with pytest.raises(PktError, match=r"`code_kinds`=13 exceeds the 12 rules"):
        suite._code_kinds(suite.SuiteConfig(code_kinds=13, code_moduli=(3, 5)))
