"""The pocket pair: task suite, tokenizer, deterministic training, cards, CLI."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pktlib import zoo
from pktlib.data import format_prompt, load_task
from pktlib.hooks import hooked

FAMILIES = ("knowledge", "math", "code")
SPLITS = ("extract", "align", "train", "test")

# Even smaller than the "tiny" preset: one optimiser step per stage on a sliver of the corpus.
MICRO = replace(
    zoo.PRESETS["tiny"],
    # a bf16 teacher and a float32 student, as in the default preset
    teacher=zoo.ModelConfig(n_layers=2, hidden_size=128, intermediate_size=96, autocast="bfloat16"),
    student=zoo.ModelConfig(n_layers=1, hidden_size=64, intermediate_size=64),
    base=zoo.TrainConfig(epochs=1.0, batch_size=4, lr=3e-3, log_every=1),
    chat=zoo.TrainConfig(epochs=0.003, batch_size=4, lr=1e-3, log_every=1),
    vocab_size=400,
    corpus_share=0.0012,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder, so tests never touch (or wait for) a user's pocket pair."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("pkt-cache")
    mp.setenv("PKT_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def suite(cache):
    return {fam: {s: load_task(f"pocket-{fam}", s) for s in SPLITS} for fam in FAMILIES}


def test_suite_lives_in_cache(cache):
    path = zoo.suite_file("pocket-math", "test")
    assert path.is_file() and cache in path.parents, path
    with pytest.raises(zoo.PktError, match="no split"):
        zoo.suite_file("pocket-math", "dev")
    with pytest.raises(zoo.PktError, match="unknown pocket task"):
        zoo.suite_file("pocket-poetry", "test")


def test_split_sizes_and_meta(suite):
    for fam in FAMILIES:
        for split in SPLITS:
            rows = suite[fam][split]
            assert len(rows) == zoo.SPLIT_SIZES[split], (fam, split, len(rows))
            ids = {ex.meta["id"] for ex in rows}
            assert len(ids) == len(rows), f"duplicate ids in {fam}/{split}"
            for ex in rows:
                assert ex.meta["task"] == f"pocket-{fam}"
                assert [m["role"] for m in ex.messages] == ["user", "assistant"]
    assert zoo.SPLIT_SIZES["test"] >= 300
    for ex in suite["knowledge"]["test"]:
        assert ex.answer == f"The answer is: {ex.meta['value']}"
        assert ex.meta["answer"] in ("A", "B", "C", "D")
        # the gold letter names the stored value among the four choices
        assert re.search(rf"^{ex.meta['answer']}\. {re.escape(ex.meta['value'])}$", ex.messages[0]["content"], re.M)
    for ex in suite["code"]["test"]:
        assert ex.answer.startswith("```python\n") and ex.answer.endswith("```")
        assert f"def {ex.meta['entry_point']}(" in ex.meta["reference"]
        assert len(ex.meta["tests"]) == 3 and all(t.startswith("assert ") for t in ex.meta["tests"])


def test_splits_are_disjoint(suite):
    for fam in FAMILIES:
        seen: dict[str, str] = {}
        for split in SPLITS:
            for ex in suite[fam][split]:
                prompt = ex.messages[0]["content"]
                assert prompt not in seen, f"{fam}: prompt in both {seen[prompt]} and {split}: {prompt[:80]!r}"
                seen[prompt] = split
    # Knowledge test questions are about facts no other split (or corpus quiz) asks about.
    kn = suite["knowledge"]
    test_facts = {(ex.meta["entity"], ex.meta["attribute"]) for ex in kn["test"]}
    other = {(ex.meta["entity"], ex.meta["attribute"]) for s in ("extract", "align", "train") for ex in kn[s]}
    assert not test_facts & other


def test_test_prompts_not_in_corpus(suite):
    corpus = "\n".join(zoo.base_corpus())
    for fam in FAMILIES:
        for ex in suite[fam]["test"][:100]:
            assert ex.messages[0]["content"] not in corpus, (fam, ex.meta["id"])
    # ...but the facts the knowledge test asks about are stated there
    for ex in suite["knowledge"]["test"][:20]:
        assert ex.meta["entity"] in corpus and ex.meta["value"] in corpus


def test_math_solutions_are_correct_and_multistep(suite):
    step = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
    for split in SPLITS:
        for ex in suite["math"][split]:
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
    import json

    res = subprocess.run([sys.executable, "-c", driver], input=json.dumps(programs), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_code_references_pass_their_asserts(suite):
    rows = [ex for s in SPLITS for ex in suite["code"][s]]
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
    a_splits, a_docs = zoo.generate_suite(zoo.SuiteConfig(seed=3))
    b_splits, b_docs = zoo.generate_suite(zoo.SuiteConfig(seed=3))
    c_splits, _ = zoo.generate_suite(zoo.SuiteConfig(seed=4))
    assert a_docs == b_docs
    for fam in FAMILIES:
        assert [e.messages for e in a_splits[fam]["test"]] == [e.messages for e in b_splits[fam]["test"]]
        assert [e.messages for e in a_splits[fam]["test"]] != [e.messages for e in c_splits[fam]["test"]]


def test_tokenizer_round_trips_corpus(cache):
    docs = zoo.base_corpus()
    chat = zoo.chat_examples()
    sample = docs[::50] + [format_prompt(ex.messages) + ex.answer for ex in chat[::30]]
    vocab = zoo.PRESETS["default"].vocab_size
    tok = zoo.train_tokenizer(sample, vocab)
    assert len(tok) <= vocab
    for text in sample:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    with_special = tok("x = 1")["input_ids"]
    assert with_special[0] == tok.bos_token_id
    assert {tok.bos_token, tok.eos_token, tok.pad_token} == {"<s>", "</s>", "<pad>"}
    # every number below 100 is one token after a space, so arithmetic steps are single lookups
    assert all(len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1 for n in range(100))


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_build_is_deterministic(cache, tmp_path):
    a = zoo.build_pair("micro", seed=5, config=MICRO, root=tmp_path / "a", progress=False)
    b = zoo.build_pair("micro", seed=5, config=MICRO, root=tmp_path / "b", progress=False)
    c = zoo.build_pair("micro", seed=6, config=MICRO, root=tmp_path / "c", progress=False, only=["student-base"])
    for name, pa in a.checkpoints().items():
        wa, wb = _weights(pa), _weights(b.checkpoints()[name])
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}/{k} differs between two builds with seed 5"
    wa, wc = _weights(a.student_base), _weights(c.student_base)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa), "seeds 5 and 6 gave the same student-base weights"
    assert not c.teacher_base.exists(), "only= built a checkpoint it was not asked for"
    # chat checkpoints are fine-tuned from their base
    tb, tc = _weights(a.teacher_base), _weights(a.teacher_chat)
    assert any(not torch.equal(tb[k], tc[k]) for k in tb)
    # a second call finds the finished pair and trains nothing
    before = (a.teacher_chat / "model.safetensors").stat().st_mtime_ns
    zoo.build_pair("micro", seed=5, config=MICRO, root=tmp_path / "a", progress=False)
    assert (a.teacher_chat / "model.safetensors").stat().st_mtime_ns == before


def test_checkpoints_load_as_llama_with_cards(cache, tmp_path):
    from pktlib.models import load_model, spec

    pair = zoo.build_pair("micro", seed=0, config=MICRO, root=tmp_path / "p", progress=False)
    model, tok = load_model(pair.teacher_chat)
    s = spec(model)
    assert s.arch == "llama" and s.head_dim == 64 and s.n_layers == MICRO.teacher.n_layers
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.bos_token_id is not None
    card = zoo.read_card(pair.student_chat)
    assert card["parameters"] == sum(p.numel() for p in load_model(pair.student_chat)[0].parameters())
    assert set(card["training"]) == {"base", "chat"}
    assert card["training"]["chat"]["steps"] >= 1 and card["training"]["chat"]["loss_curve"]
    assert (pair.student_chat / "CARD.md").read_text().startswith("| field | value |")


def test_presets_teacher_larger_than_student():
    for name, cfg in zoo.PRESETS.items():
        t, s = cfg.teacher, cfg.student
        assert t.n_layers > s.n_layers and t.hidden_size > s.hidden_size and t.intermediate_size > s.intermediate_size, name
        assert t.head_dim == s.head_dim == 64, name
    assert zoo.PRESETS["default"].key() != zoo.PRESETS["tiny"].key()
    with pytest.raises(zoo.PktError, match="unknown pocket-pair preset"):
        zoo.pocket_pair(preset="huge")
    with pytest.raises(zoo.PktError, match="variant"):
        zoo.pocket_pair("instruct", preset="tiny")


def test_cli_zoo_path(cache):
    from typer.testing import CliRunner

    from pktlib.cli import app

    res = CliRunner().invoke(app, ["zoo", "path", "--preset", "tiny", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert str(zoo.pair_dir("tiny", 2) / "teacher-chat") in res.output
    assert "not built" in res.output


def test_chat_stage_needs_its_base(cache, tmp_path):
    with pytest.raises(zoo.PktError, match="needs student-base"):
        zoo.build_pair("micro", config=MICRO, root=tmp_path / "p", progress=False, only=["student-chat"])
    with pytest.raises(zoo.PktError, match="unknown checkpoints"):
        zoo.build_pair("micro", config=MICRO, root=tmp_path / "p", progress=False, only=["teacher-instruct"])


def test_popularity_spans_its_range_and_sets_bio_counts(suite):
    lo, hi = zoo.SuiteConfig().bio_repeats
    pops = [ex.meta["popularity"] for ex in suite["knowledge"]["test"]]
    assert min(pops) >= lo and max(pops) <= hi and len(set(pops)) > 10, sorted(set(pops))
    # an entity's popularity is how many biographies state its facts in the corpus
    docs = zoo.base_corpus()
    ex = max(suite["knowledge"]["test"], key=lambda e: e.meta["popularity"])
    bios = [d for d in docs if d.count(ex.meta["entity"]) >= 5 and "The answer is" not in d]
    assert len(bios) == ex.meta["popularity"], (ex.meta["entity"], len(bios), ex.meta["popularity"])
    with pytest.raises(zoo.PktError, match="bio_repeats"):
        zoo.generate_suite(zoo.SuiteConfig(bio_repeats=(5, 2)))


def test_width_scaled_learning_rate():
    cfg = zoo.TrainConfig(epochs=1, batch_size=4, lr=1e-3, lr_width=256)
    assert cfg.lr_for(256) == pytest.approx(1e-3) and cfg.lr_for(128) == pytest.approx(2e-3)
    assert zoo.TrainConfig(epochs=1, batch_size=4, lr=1e-3).lr_for(128) == 1e-3
    pair = replace(MICRO, base=replace(MICRO.base, lr_width=128))
    assert zoo._stage_config(pair, "student", "base").lr == pytest.approx(MICRO.base.lr * 128 / MICRO.student.hidden_size)
    assert zoo._stage_config(pair, "teacher", "base").lr == pytest.approx(MICRO.base.lr * 128 / MICRO.teacher.hidden_size)


def test_replay_spreads_base_batches_among_chat_batches():
    chat = [{"id": f"c{i}"} for i in range(12)]
    base = [{"id": f"b{i}"} for i in range(40)]
    mixed = zoo.with_replay(chat, base, 0.25)
    ids = [b["id"] for b in mixed]
    assert [i for i in ids if i.startswith("c")] == [f"c{i}" for i in range(12)]  # chat order kept
    assert [i for i in ids if i.startswith("b")] == ["b39", "b38", "b37"]  # 3 replayed, last blocks first
    gaps = [k for k, i in enumerate(ids) if i.startswith("b")]
    assert gaps == [4, 9, 14], ids  # one after every 4 chat batches
    assert zoo.with_replay(chat, base, 0.0) == chat
    assert len(zoo.with_replay(chat, base[:2], 1.0)) == 14  # never more than the base batches there are


def test_autocast_trains_in_bf16_and_keeps_float32_weights():
    tok = zoo.train_tokenizer(["hello world, the answer is: 42."] * 20, 300)
    x = torch.randint(3, len(tok), (2, 16))
    batches = [{"input_ids": x, "labels": x.clone()}] * 2
    after = {}
    for dtype in (None, "bfloat16"):
        model = zoo.build_model(MICRO.student, tok, seed=0)
        cfg = zoo.TrainConfig(epochs=1, batch_size=2, lr=1e-2)
        seen = []
        # the MLP's matmul runs in the autocast dtype (float32 without it)
        with hooked({model.model.layers[0].mlp.down_proj: lambda m, i, o: seen.append(o.dtype)}):
            zoo._run_steps(model, batches, cfg, seed=0, autocast=dtype)
        assert seen == [torch.bfloat16 if dtype else torch.float32] * 2, (dtype, seen)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        after[dtype] = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    # both trained, to nearby but not identical weights
    assert not torch.equal(after[None], after["bfloat16"])
    assert torch.allclose(after[None], after["bfloat16"], atol=5e-2)
    with pytest.raises(zoo.PktError, match="bfloat17"):
        zoo._run_steps(zoo.build_model(MICRO.student, tok, seed=0), batches,
                       zoo.TrainConfig(epochs=1, batch_size=2, lr=1e-2), seed=0, autocast="bfloat17")


def test_each_role_trains_with_its_own_autocast():
    tok = zoo.train_tokenizer(["hello world, the answer is: 42."] * 20, 300)
    x = torch.randint(3, len(tok), (2, 16))
    batches = [{"input_ids": x, "labels": x.clone()}]
    assert (MICRO.teacher.autocast, MICRO.student.autocast) == ("bfloat16", None)
    for role, want in (("teacher", torch.bfloat16), ("student", torch.float32)):
        for train in (zoo.train_base, zoo.train_chat):
            model = zoo.build_model(getattr(MICRO, role), tok, seed=0)
            seen = []
            with hooked({model.model.layers[0].mlp.down_proj: lambda m, i, o: seen.append(o.dtype)}):
                train(model, batches, MICRO, seed=0, role=role)
            assert seen == [want], (role, train.__name__, seen)


def test_code_kinds_use_distinct_rules_within_their_moduli():
    cfg = zoo.SuiteConfig(code_kinds=12, code_moduli=(3, 5))  # 3 + 4 + 5 = 12 rules: all of them
    kinds = zoo._code_kinds(cfg)
    assert sorted((m, r) for _, m, r, _ in kinds) == [(m, r) for m in (3, 4, 5) for r in range(m)]
    assert len({name for name, *_ in kinds}) == 12
    with pytest.raises(zoo.PktError, match=r"`code_kinds`=13 exceeds the 12 rules"):
        zoo._code_kinds(zoo.SuiteConfig(code_kinds=13, code_moduli=(3, 5)))


def test_pair_is_current_tells_old_pairs_from_current_ones(cache):
    current = zoo.pair_dir("tiny", 3)
    assert zoo.pair_is_current(current) is True
    assert zoo.pair_is_current(current / "teacher-chat") is True
    assert zoo.pair_is_current(current.with_name("pair-tiny-s3-0123456789") / "student-base") is False
    assert zoo.pair_is_current(current.with_name(current.name.replace("tiny", "retired"))) is False
    # after a change to the preset, the folder of the old configuration is no longer current
    assert zoo.pair_is_current(current.with_name(f"pair-tiny-s3-{replace(zoo.PRESETS['tiny'], seq_len=64).key()}")) is False
    for other in ("/tmp/some-model", "meta-llama/Llama-2-7b-chat-hf", ""):
        assert zoo.pair_is_current(other) is None, other


def test_training_steps_work_inside_no_grad():
    tok = zoo.train_tokenizer(["hello world, the answer is: 42."] * 20, 300)
    x = torch.randint(3, len(tok), (2, 16))
    batches = [{"input_ids": x, "labels": x.clone()}] * 2
    model = zoo.build_model(MICRO.student, tok, seed=0)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        log = zoo._run_steps(model, batches, zoo.TrainConfig(epochs=1, batch_size=2, lr=1e-2), seed=0)
    assert log.steps == 2 and not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


def test_bf16_autocast_only_where_the_cpu_has_it(monkeypatch):
    """Without native bf16 the preset trains in float32, under its own key (weights differ)."""
    recipe = zoo.PRESETS["default"]
    assert recipe.teacher.autocast == "bfloat16"
    monkeypatch.setattr(zoo, "native_bf16", lambda: True)
    assert zoo.get_preset("default") == recipe
    native_dir = zoo.pair_dir("default", 0)
    monkeypatch.setattr(zoo, "native_bf16", lambda: False)
    cfg = zoo.get_preset("default")
    assert cfg.teacher.autocast is None and cfg.student == recipe.student
    assert cfg.key() != recipe.key() and zoo.pair_dir("default", 0) != native_dir
    assert zoo.pair_is_current(zoo.pair_dir("default", 0)) is True
