"""The pocket pair: tokenizer, deterministic training, cards, presets, CLI."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pktlib import zoo
from pktlib.data import format_prompt
from pktlib.errors import PktError
from pktlib.hooks import hooked
from pktlib.training import RunDir
from pktlib.zoo import config as zoo_config
from pktlib.zoo.build import _stage_config

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
    with pytest.raises(PktError, match="unknown pocket-pair preset"):
        zoo.pocket_pair(preset="huge")
    with pytest.raises(PktError, match="variant"):
        zoo.pocket_pair("instruct", preset="tiny")


def test_cli_zoo_path(cache, pkt):
    res = pkt("zoo", "path", "--preset", "tiny", "--seed", "2")
    assert res.code == 0, res.err
    assert str(zoo.pair_dir("tiny", 2) / "teacher-chat") in res.out
    assert "not built" in res.out


def test_chat_stage_needs_its_base(cache, tmp_path):
    with pytest.raises(PktError, match="needs student-base"):
        zoo.build_pair("micro", config=MICRO, root=tmp_path / "p", progress=False, only=["student-chat"])
    with pytest.raises(PktError, match="unknown checkpoints"):
        zoo.build_pair("micro", config=MICRO, root=tmp_path / "p", progress=False, only=["teacher-instruct"])


def test_width_scaled_learning_rate():
    cfg = zoo.TrainConfig(epochs=1, batch_size=4, lr=1e-3, lr_width=256)
    assert cfg.lr_for(256) == pytest.approx(1e-3) and cfg.lr_for(128) == pytest.approx(2e-3)
    assert zoo.TrainConfig(epochs=1, batch_size=4, lr=1e-3).lr_for(128) == 1e-3
    pair = replace(MICRO, base=replace(MICRO.base, lr_width=128))
    assert _stage_config(pair, "student", "base").lr == pytest.approx(MICRO.base.lr * 128 / MICRO.student.hidden_size)
    assert _stage_config(pair, "teacher", "base").lr == pytest.approx(MICRO.base.lr * 128 / MICRO.teacher.hidden_size)


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
            zoo.train_stage(model, batches, cfg, seed=0, autocast=dtype)
        assert seen == [torch.bfloat16 if dtype else torch.float32] * 2, (dtype, seen)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        after[dtype] = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    # both trained, to nearby but not identical weights
    assert not torch.equal(after[None], after["bfloat16"])
    assert torch.allclose(after[None], after["bfloat16"], atol=5e-2)
    with pytest.raises(PktError, match="bfloat17"):
        zoo.train_stage(zoo.build_model(MICRO.student, tok, seed=0), batches,
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


def test_interrupted_stage_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    tok = zoo.train_tokenizer(["hello world, the answer is: 42."] * 20, 300)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(7):
        x = torch.randint(3, len(tok), (2, 16), generator=g)
        batches.append({"input_ids": x, "labels": x.clone()})
    cfg = zoo.TrainConfig(epochs=1, batch_size=2, lr=1e-2, log_every=2)

    def stage(**kw):
        model = zoo.build_model(MICRO.teacher, tok, seed=0)  # fresh weights each time, as after a killed kernel
        return model, zoo.train_stage(model, batches, cfg, seed=0, autocast=MICRO.teacher.autocast, **kw)

    full, log_full = stage()
    real_save = RunDir.save

    def crash_after_first_save(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        stage(run_dir=tmp_path / "run", save_every=3)
    monkeypatch.setattr(RunDir, "save", real_save)
    tokens = []
    resumed, log_res = stage(run_dir=tmp_path / "run", save_every=3, progress=tokens.append)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert log_res.loss_curve == log_full.loss_curve and log_res.steps == log_full.steps == 7
    assert sum(tokens) == log_full.tokens  # the progress bar also counts the restored steps


def test_training_steps_work_inside_no_grad():
    tok = zoo.train_tokenizer(["hello world, the answer is: 42."] * 20, 300)
    x = torch.randint(3, len(tok), (2, 16))
    batches = [{"input_ids": x, "labels": x.clone()}] * 2
    model = zoo.build_model(MICRO.student, tok, seed=0)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        log = zoo.train_stage(model, batches, zoo.TrainConfig(epochs=1, batch_size=2, lr=1e-2), seed=0)
    assert log.steps == 2 and not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


def test_bf16_autocast_only_where_the_cpu_has_it(monkeypatch):
    """Without native bf16 the preset trains in float32, under its own key (weights differ)."""
    recipe = zoo.PRESETS["default"]
    assert recipe.teacher.autocast == "bfloat16"
    monkeypatch.setattr(zoo_config, "native_bf16", lambda: True)
    assert zoo.get_preset("default") == recipe
    native_dir = zoo.pair_dir("default", 0)
    monkeypatch.setattr(zoo_config, "native_bf16", lambda: False)
    cfg = zoo.get_preset("default")
    assert cfg.teacher.autocast is None and cfg.student == recipe.student
    assert cfg.key() != recipe.key() and zoo.pair_dir("default", 0) != native_dir
    assert zoo.pair_is_current(zoo.pair_dir("default", 0)) is True
