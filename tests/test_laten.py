"""LaTen: neuron slicing, translator, injection, alignment training (resume), impossible pairs."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_model
from pktlib.attribution import Selection
from pktlib.errors import PktError
from pktlib.data.examples import Example, write_examples
from pktlib.extraction import slice_neurons
from pktlib.hypernet import Translator, TranslatorConfig, load_translator, save_translator
from pktlib.injection import add_delta, forward_injected, inject_, pair_deltas
from pktlib.laten import (FAMILY_STEPS, TABLE5_STEPS, apply, check_pair, default_steps, laten_loss, memory_estimate,
                          read_log, train)
from pktlib.laten.sweeps import _task_folder
from pktlib.models import TRANSFERRED_MODULES, spec


# Teacher deeper and wider than the student, same head_dim (16) and tokenizer.
def _pair(arch: str, tokenizer):
    kv = {"llama": {}, "qwen2": {"num_key_value_heads": 2}}[arch]
    teacher = make_model(arch, tokenizer=tokenizer, hidden_size=128, intermediate_size=192, n_layers=4, n_heads=8,
                         seed=1, **kv)
    student = make_model(arch, tokenizer=tokenizer, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=4,
                         seed=2, **kv)
    return teacher, student


def _selection(n_layers_model: int, layers: list[int], n_ffn: int, n_attn: int, k_ffn: int, k_attn: int,
               seed: int) -> Selection:
    """Random ranked neurons in ``layers`` (FFN) and in as many of the last layers (attention)."""
    g = torch.Generator().manual_seed(seed)
    return Selection(
        ffn_layers=layers, attn_layers=list(range(n_layers_model - len(layers), n_layers_model)),
        ffn_neurons=torch.stack([torch.randperm(n_ffn, generator=g)[:k_ffn] for _ in layers]),
        attn_neurons=torch.stack([torch.randperm(n_attn, generator=g)[:k_attn] for _ in layers]),
    )


def _loud_translator(ts, ss, seed=0) -> Translator:
    """A translator whose outputs are large enough to change float32 weights visibly."""
    t = Translator(TranslatorConfig(ts.hidden_size, ss.hidden_size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + p.numel()))
    return t


EXAMPLES = [
    Example([{"role": "user", "content": f"What is {a} + {b}?"},
             {"role": "assistant", "content": f"{a} + {b} = {a + b}. So the answer is {a + b}."}], {"id": f"ex{a}-{b}"})
    for a, b in [(3, 4), (12, 5), (7, 7), (1, 2), (9, 3), (4, 4), (2, 8), (6, 1), (5, 5), (8, 2)]
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tokenizer):
    return _pair(request.param, tokenizer)


# ----------------------------------------------------------------------------------- extraction
def test_slice_shapes_and_values(pair):
    teacher, _ = pair
    ts = spec(teacher)
    sel = _selection(ts.n_layers, [0, 2, 3], ts.intermediate_size, ts.attn_size, 9, 6, seed=0)
    sl = slice_neurons(teacher, sel)
    d = ts.hidden_size
    assert sl.shapes() == {"up_proj": (3, 9, d), "down_proj": (3, d, 9), "v_proj": (3, 6, d), "o_proj": (3, d, 6)}
    for j, l in enumerate(sel.ffn_layers):
        for i, n in enumerate(sel.ffn_neurons[j].tolist()):
            assert torch.equal(sl.weights["up_proj"][j, i], ts.weight(teacher, l, "up_proj")[n])
            assert torch.equal(sl.weights["down_proj"][j, :, i], ts.weight(teacher, l, "down_proj")[:, n])
    for j, l in enumerate(sel.attn_layers):
        for i, n in enumerate(sel.attn_neurons[j].tolist()):
            h, k = divmod(n, ts.head_dim)
            row = (h // (ts.n_heads // ts.n_kv_heads)) * ts.head_dim + k  # DESIGN.md 4.1, written out
            assert torch.equal(sl.weights["v_proj"][j, i], ts.weight(teacher, l, "v_proj")[row])
            assert torch.equal(sl.weights["o_proj"][j, :, i], ts.weight(teacher, l, "o_proj")[:, n])


def test_slice_rejects_bad_selection(pair):
    teacher, _ = pair
    ts = spec(teacher)
    sel = _selection(ts.n_layers, [0, 1], ts.intermediate_size, ts.attn_size, 4, 4, seed=0)
    sel.ffn_neurons[1, 0] = ts.intermediate_size  # one past the end
    with pytest.raises(PktError, match="ffn neuron indices span"):
        slice_neurons(teacher, sel)


# ----------------------------------------------------------------------------------- translator
def test_translator_shapes_init_and_roundtrip(tmp_path):
    t = Translator(TranslatorConfig(128, 64), generator=torch.Generator().manual_seed(0))
    assert all(p.std().item() == pytest.approx(1e-5, rel=0.05) for p in t.parameters())
    assert not any(n.endswith("bias") for n, _ in t.named_parameters())
    x = {"up_proj": torch.randn(3, 9, 128), "down_proj": torch.randn(3, 128, 9),
         "v_proj": torch.randn(2, 6, 128), "o_proj": torch.randn(2, 128, 6)}
    y = t(x)
    assert {m: tuple(v.shape) for m, v in y.items()} == {"up_proj": (3, 9, 64), "down_proj": (3, 64, 9),
                                                         "v_proj": (2, 6, 64), "o_proj": (2, 64, 6)}
    # Column modules are translated column by column: the MLP sees each neuron's d_T vector.
    mlp = t.mlps["down_proj"]
    assert torch.allclose(y["down_proj"][1, :, 4], mlp(x["down_proj"][1, :, 4]))
    save_translator(t, tmp_path / "tr")
    t2 = load_translator(tmp_path / "tr")
    assert json.loads((tmp_path / "tr" / "translator.json").read_text())["d_student"] == 64
    for (n1, p1), (n2, p2) in zip(t.state_dict().items(), t2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(PktError, match="teacher hidden size 128"):
        t({"up_proj": torch.randn(1, 2, 64)})


# ----------------------------------------------------------------------------------- injection
def _located(teacher, student, seed=0, k_ffn=10, k_attn=8):
    ts, ss = spec(teacher), spec(student)
    n = min(ts.n_layers, ss.n_layers)
    t_sel = _selection(ts.n_layers, [0, 2, 3][:n], ts.intermediate_size, ts.attn_size, k_ffn, k_attn, seed)
    s_sel = _selection(ss.n_layers, [0, 1, 2][:n], ss.intermediate_size, ss.attn_size, k_ffn, k_attn, seed + 1)
    return slice_neurons(teacher, t_sel, dtype=torch.float32), s_sel


def test_injected_student_differs_only_at_recorded_entries(pair):
    teacher, student = pair
    ts, ss = spec(teacher), spec(student)
    sl, s_sel = _located(teacher, student, k_attn=16)  # 16 of 64 attention neurons: GQA rows collide in qwen2
    tr = _loud_translator(ts, ss)
    with torch.no_grad():
        translated = tr(sl.weights)
    injected = copy.deepcopy(student)
    record = inject_(injected, pair_deltas(translated, s_sel))
    masks = record.masks(injected)
    before, after = student.state_dict(), injected.state_dict()
    changed_params = set()
    for name, w in before.items():
        diff = after[name] != w
        if name in masks:
            assert not (diff & ~masks[name]).any(), f"{name} changed outside the recorded entries"
            changed_params.add(name)
            # every recorded row/column really received a (non-zero) delta
            dim = 1 if ("up_proj" in name or "v_proj" in name) else 0  # rows vs columns
            assert torch.equal(diff.any(dim=dim), masks[name].any(dim=dim)), name
        else:
            assert not diff.any(), f"{name} changed but is not in the record"
    assert changed_params == {ss.param_name(l, m) for m in TRANSFERRED_MODULES
                              for l in (s_sel.ffn_layers if m in ("up_proj", "down_proj") else s_sel.attn_layers)}
    # the record is JSON-serialisable and names layer/module/indices
    e = json.loads(json.dumps(record.to_dict()))["entries"][0]
    assert {"layer", "module", "param", "axis", "indices", "neurons"} <= set(e)


def test_gqa_shared_value_rows_sum_or_mean(tokenizer):
    _, student = _pair("qwen2", tokenizer)
    ss = spec(student)
    assert ss.group_size == 2
    # Neurons 3 and 19 are position 3 of heads 0 and 1, which share kv head 0: value row 3.
    from pktlib.injection import NeuronDelta

    value = torch.randn(2, ss.hidden_size)
    d = NeuronDelta(0, "v_proj", torch.tensor([3, 19]), value)
    w = ss.weight(student, 0, "v_proj").detach()
    summed = add_delta(w, d, ss, "sum")
    assert torch.allclose(summed[3], w[3] + value[0] + value[1])
    meaned = add_delta(w, d, ss, "mean")
    assert torch.allclose(meaned[3], w[3] + (value[0] + value[1]) / 2)
    untouched = torch.ones(w.shape[0], dtype=torch.bool)
    untouched[3] = False
    assert torch.equal(summed[untouched], w[untouched]) and torch.equal(meaned[untouched], w[untouched])


def test_zero_translator_leaves_student_and_loss_unchanged(pair, tokenizer):
    teacher, student = pair
    ts, ss = spec(teacher), spec(student)
    sl, s_sel = _located(teacher, student)
    tr = Translator(TranslatorConfig(ts.hidden_size, ss.hidden_size))
    with torch.no_grad():
        for p in tr.parameters():
            p.zero_()
    ids = torch.tensor([tokenizer("The answer is: Paris. 3 + 4 = 7")["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        plain = student(**inputs).loss
        loss, lm, mse = laten_loss(tr, sl, student, s_sel, inputs)
    assert torch.equal(lm, plain.float()) and float(mse) == 0.0 and torch.equal(loss, lm)
    injected = copy.deepcopy(student)
    with torch.no_grad():
        inject_(injected, pair_deltas(tr(sl.weights), s_sel))
    for (n, a), b in zip(student.state_dict().items(), injected.state_dict().values()):
        assert torch.equal(a, b), n


def test_functional_injection_equals_permanent(pair, tokenizer):
    teacher, student = pair
    sl, s_sel = _located(teacher, student)
    tr = _loud_translator(spec(teacher), spec(student), seed=3)
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a + b")["input_ids"]])
    with torch.no_grad():
        deltas = pair_deltas(tr(sl.weights), s_sel)
        functional = forward_injected(student, deltas, input_ids=ids).logits
        plain = student(input_ids=ids).logits
        injected = copy.deepcopy(student)
        inject_(injected, deltas)
        permanent = injected(input_ids=ids).logits
    assert not torch.allclose(functional, plain, atol=1e-3)  # the deltas matter ...
    assert torch.allclose(functional, permanent, atol=1e-5)  # ... and both routes agree
    assert torch.equal(student(input_ids=ids).logits, plain)  # functional_call left the student alone


def test_gradients_reach_translator_not_student(pair, tokenizer):
    teacher, student = pair
    sl, s_sel = _located(teacher, student)
    tr = _loud_translator(spec(teacher), spec(student), seed=5)
    student.requires_grad_(False)
    ids = torch.tensor([tokenizer("Tom has 12 apples and gives 5 away")["input_ids"]])
    loss, _, _ = laten_loss(tr, sl, student, s_sel, {"input_ids": ids, "labels": ids})
    loss.backward()
    for m, mlp in tr.mlps.items():
        for p in mlp.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, m
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------- pairs
def test_impossible_pairs_are_clear_errors(tokenizer):
    teacher, student = _pair("llama", tokenizer)
    with pytest.raises(PktError, match="teacher is smaller than the student"):
        check_pair(student, teacher)
    broken = copy.deepcopy(teacher)
    del broken.model.layers[0].mlp.up_proj
    with pytest.raises(PktError, match="no module 'up_proj'"):
        check_pair(broken, student)
    check_pair(teacher, student)  # the real pair is fine


def test_default_steps_by_name_alias_and_family():
    assert default_steps("gsm") == default_steps("gsm8k")  # aliases resolve to their task
    # a pocket family takes the steps of its paper counterpart (code: HumanEval's)
    for fam, counterpart in (("knowledge", "mmlu"), ("math", "gsm8k"), ("code", "humaneval")):
        assert default_steps(f"pocket-{fam}") == FAMILY_STEPS[fam] == TABLE5_STEPS[counterpart]
    with pytest.raises(PktError, match="no default step count"):
        default_steps("my_task.jsonl")


def test_memory_estimate_llama2_13b_to_7b():
    from transformers import LlamaConfig

    t = LlamaConfig(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                    num_key_value_heads=40, vocab_size=32000)
    s = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000)
    est = memory_estimate(t, s, dtype="bf16", batch=16, seq_len=512)
    # Published parameter counts: 13,015,864,320 and 6,738,415,616.
    assert est.detail["teacher_params"] == 13_015_864_320
    assert est.detail["student_params"] == 6_738_415_616
    assert est.teacher_weights == 2 * 13_015_864_320
    assert est.detail["k_ffn"] == 1100 and est.detail["k_attn"] == 409 and est.detail["n_layers_selected"] == 32
    assert est.translator == 4 * 4 * (5120 * 5120 + 5120 * 4096) and est.optimizer_state == 2 * est.translator
    assert est.total > est.teacher_weights + est.student_weights


# ----------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def llama_pair(tokenizer):
    return _pair("llama", tokenizer)


def _train(pair, tokenizer, out, **kw):
    teacher, student = pair
    return train((teacher, tokenizer), (student, tokenizer), "gsm8k", steps=kw.pop("steps", 2), out_dir=out,
                 extract=EXAMPLES[:3], align=EXAMPLES[3:], align_batch=4, transfer_rate=0.25, progress=False,
                 lr=kw.pop("lr", 1e-2), **kw)


def test_train_writes_log_and_checkpoints_and_resumes(llama_pair, tokenizer, tmp_path):
    flags = [p.requires_grad for p in llama_pair[1].parameters()]
    full = _train(llama_pair, tokenizer, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert [p.name for p in full.checkpoints] == ["checkpoint_1", "checkpoint_2"]
    log = read_log(tmp_path / "a")
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert {"lm_loss", "mse", "loss", "loss_after", "wall_s", "student_lm_loss"} <= set(r)
        assert r["loss"] == pytest.approx(r["lm_loss"] + 1000 * r["mse"], rel=1e-5)
    # the translator moved, and it is the only thing that did
    t0 = Translator(TranslatorConfig(128, 64), generator=torch.Generator().manual_seed(42))
    t2 = load_translator(full.final)
    assert not torch.equal(t0.mlps["up_proj"][0].weight, t2.mlps["up_proj"][0].weight)
    assert all(p.grad is None for p in llama_pair[1].parameters())
    assert [p.requires_grad for p in llama_pair[1].parameters()] == flags  # restored after training

    # Interrupted run: remove the last checkpoint (and leave its log row, as a crash would) and resume.
    part = _train(llama_pair, tokenizer, tmp_path / "b", cache_dir=tmp_path / "cache")
    shutil.rmtree(tmp_path / "b" / "checkpoint_2")
    resumed = _train(llama_pair, tokenizer, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert resumed.resumed_from == 1 and part.resumed_from == 0
    a, b = load_translator(full.final), load_translator(resumed.final)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    log_b = read_log(tmp_path / "b")
    assert [r["step"] for r in log_b] == [1, 2]
    assert [r["loss_after"] for r in log_b] == [r["loss_after"] for r in log]
    # Other settings in the same folder: refused with the difference named.
    with pytest.raises(PktError, match="transfer_rate|lr"):
        _train(llama_pair, tokenizer, tmp_path / "b", lr=1e-3)


def test_apply_saves_injected_student_and_record(llama_pair, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student = llama_pair
    ts, ss = spec(teacher), spec(student)
    tr_dir = save_translator(_loud_translator(ts, ss, seed=7), tmp_path / "translator")
    res = apply((teacher, tokenizer), (student, tokenizer), tr_dir, task="gsm8k", example=EXAMPLES[9],
                transfer_rate=0.25, out_dir=tmp_path / "injected", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "injected")
    changes = json.loads((tmp_path / "injected" / "changes.json").read_text())
    assert changes["meta"]["transfer_rate"] == 0.25 and len(changes["entries"]) == 4 * ss.n_layers
    masks = res.record.masks(reloaded)
    n_changed = 0
    for name, w in student.state_dict().items():
        diff = reloaded.state_dict()[name] != w
        n_changed += int(diff.sum())
        if name in masks:
            assert not (diff & ~masks[name]).any(), name
        else:
            assert not diff.any(), name
    assert n_changed > 0
    # the caller's student was copied, not modified
    assert (tmp_path / "injected" / "tokenizer.json").is_file()
    assert all(e["max_abs_delta"] > 0 for e in changes["entries"])


def test_cli_train_then_apply(llama_pair, tokenizer, tmp_path, pkt):
    teacher, student = llama_pair
    for name, m in (("teacher", teacher), ("student", student)):
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    task = tmp_path / "task.jsonl"
    write_examples(task, EXAMPLES)
    common = ["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--task", str(task),
              "--transfer-rate", "0.25"]
    r = pkt("laten", "train", *common, "--out", tmp_path / "run", "--steps", "1", "--align-batch", "3",
            "--max-length", "128")
    assert r.code == 0, r.err
    assert (tmp_path / "run" / "checkpoint_1" / "translator.safetensors").is_file()
    r = pkt("laten", "apply", *common, "--translator", tmp_path / "run", "--split", "test", "--example-index", "9",
            "--out", tmp_path / "inj")
    assert r.code == 0, r.err
    changes = json.loads((tmp_path / "inj" / "changes.json").read_text())
    assert changes["meta"]["example_id"] == "ex8-2" and changes["meta"]["translator"].endswith("checkpoint_1")
    assert (tmp_path / "inj" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sweep_rows_and_rerun_reuses_results(llama_pair, tokenizer, tmp_path):
    from pktlib.laten import sweep

    teacher, student = llama_pair
    task = str(tmp_path / "task.jsonl")
    write_examples(task, [Example(e.messages, {**e.meta, "answer": e.answer}) for e in EXAMPLES])
    kw = dict(seeds=[0, 1], transfer_rates=[0.25, 0.5], main_rate=0.25, steps=2, limit=1, run_root=tmp_path / "sw",
              progress=False, align_batch=2, max_length=64, eval_kwargs={"max_new_tokens": 2})
    rows = sweep((teacher, tokenizer), (student, tokenizer), task, **kw)
    got = sorted((r.model, r.transfer_rate or 0, r.seed or 0, r.step or 0) for r in rows)
    assert got == sorted([("student", 0, 0, 0), ("teacher", 0, 0, 0)]
                         + [("laten", 0.25, s, st) for s in (0, 1) for st in (1, 2)]  # every step at main_rate
                         + [("laten", 0.5, s, 2) for s in (0, 1)])  # the last step elsewhere
    laten = [r for r in rows if r.model == "laten"]
    assert all(r.n == 1 and r.changed_entries > 0 and r.translated_rms > 0 for r in laten)
    assert {r.example_id for r in laten} == {"ex3-4", "ex12-5"}  # seed s injects on example s
    assert all((Path(r.run_dir) / "log.jsonl").is_file() for r in laten)
    ck = next((tmp_path / "sw").glob("pair-*")) / _task_folder(task) / "rate0.25" / "seed1" / "checkpoint_2" / "translator.safetensors"
    stamp = ck.stat().st_mtime_ns
    again = sweep((teacher, tokenizer), (student, tokenizer), task, **kw)
    assert [r.score for r in again] == [r.score for r in rows] and ck.stat().st_mtime_ns == stamp


def test_sweep_attributes_a_later_tasks_examples_in_its_own_call(llama_pair, tokenizer, tmp_path, monkeypatch):
    """``attribute_with``: one attribute() call per model covers both tasks; the later sweep computes none."""
    from pktlib import attribution
    from pktlib.data import load_task
    from pktlib.laten import sweep

    teacher, student = llama_pair
    tasks = []
    for name, exs in (("first", EXAMPLES), ("second", EXAMPLES[::-1])):
        tasks.append(str(tmp_path / f"{name}.jsonl"))
        write_examples(tasks[-1], [Example(e.messages, {**e.meta, "answer": e.answer}) for e in exs])
    calls = []
    real_attribute = attribution.attribute
    monkeypatch.setattr("pktlib.laten.attributions.attribute",
                        lambda m, tok, pairs, **k: calls.append(len(pairs)) or real_attribute(m, tok, pairs, **k))
    kw = dict(seeds=[0, 1], transfer_rates=[0.25], main_rate=0.25, steps=1, limit=1, run_root=tmp_path / "sw",
              progress=False, align_batch=2, max_length=64, eval_kwargs={"max_new_tokens": 2},
              cache_dir=tmp_path / "attributions")
    sweep((teacher, tokenizer), (student, tokenizer), tasks[0], attribute_with={tasks[1]: 1}, **kw)
    located = [{json.dumps(e.messages) for e in load_task(t, "extract")[:1] + load_task(t, "train")[:2]} for t in tasks]
    alone, both = len(located[0]), len(located[0] | located[1])  # distinct texts: each is attributed once
    assert calls == [both, both] and both > alone  # teacher, student: each one call over both tasks' examples
    monkeypatch.setattr("pktlib.laten.attributions.attribute", lambda *a, **k: pytest.fail("attributed again"))
    rows = sweep((teacher, tokenizer), (student, tokenizer), tasks[1], **kw)
    assert sum(r.model == "laten" for r in rows) == 2


# ----------------------------------------------------------------------------------- settings travel with the translator
def test_checkpoint_stores_settings_and_apply_uses_them(llama_pair, tokenizer, tmp_path):
    from pktlib.laten import SETTINGS_NAME, read_settings

    teacher, student = llama_pair
    run = _train(llama_pair, tokenizer, tmp_path / "run", steps=1, gqa_rule="mean", normaliser="original",
                 cache_dir=tmp_path / "cache")
    stored = read_settings(run.final)
    assert (run.final / SETTINGS_NAME).is_file()
    assert stored["transfer_rate"] == 0.25 and stored["gqa_rule"] == "mean" and stored["normaliser"] == "original"
    assert stored["attn_coefficient"] == "summed" and stored["train_on_inputs"] is False  # gsm8k: a math task
    assert (stored["n_layers"], stored["k_ffn"], stored["k_attn"]) == (3, 24, 16)
    # apply without settings: the stored ones (transfer rate 0.25, not the 0.1 default)
    res = apply((teacher, tokenizer), (student, tokenizer), run.final, task="gsm8k", example=EXAMPLES[9],
                out_dir=None, progress=False, cache_dir=tmp_path / "cache")
    meta = res.record.meta
    assert (meta["transfer_rate"], meta["gqa_rule"], meta["normaliser"]) == (0.25, "mean", "original")
    assert all(len(e["indices"]) in (24, 16) for e in res.record.entries)
    # the same values given explicitly are fine; a different one is a clear error naming both
    apply((teacher, tokenizer), (student, tokenizer), run.final, task="gsm8k", example=EXAMPLES[9], out_dir=None,
          progress=False, transfer_rate=0.25, gqa_rule="mean", cache_dir=tmp_path / "cache")
    with pytest.raises(PktError, match=r"transfer_rate=0.1 but the translator was trained with transfer_rate=0.25"):
        apply((teacher, tokenizer), (student, tokenizer), run.final, task="gsm8k", example=EXAMPLES[9],
              out_dir=None, progress=False, transfer_rate=0.1)
    with pytest.raises(PktError, match=r"gqa_rule='sum' but the translator was trained with gqa_rule='mean'"):
        apply((teacher, tokenizer), (student, tokenizer), tmp_path / "run", task="gsm8k", example=EXAMPLES[9],
              out_dir=None, progress=False, gqa_rule="sum")


def test_train_on_inputs_defaults_per_family():
    from pktlib.laten import default_train_on_inputs

    assert default_train_on_inputs("mmlu") and default_train_on_inputs("pocket-knowledge")
    assert not default_train_on_inputs("gsm8k") and not default_train_on_inputs("pocket-code")


def test_training_works_inside_no_grad_but_not_inference_mode(llama_pair, tokenizer, tmp_path):
    with torch.no_grad():
        res = _train(llama_pair, tokenizer, tmp_path / "ng", steps=1, cache_dir=tmp_path / "cache")
    assert res.log[0]["lm_loss_after"] != res.log[0]["lm_loss"]  # a real step was taken
    with torch.inference_mode(), pytest.raises(PktError, match="inference_mode"):
        _train(llama_pair, tokenizer, tmp_path / "im", steps=1, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------ penalty weight and learning-rate sweep
def test_penalty_weight_is_a_training_setting(llama_pair, tokenizer, tmp_path):
    run = _train(llama_pair, tokenizer, tmp_path / "free", steps=1, mse_weight=0.0, cache_dir=tmp_path / "cache")
    assert run.config.mse_weight == 0.0
    assert json.loads((tmp_path / "free" / "laten_config.json").read_text())["config"]["mse_weight"] == 0.0
    r = read_log(tmp_path / "free")[0]
    assert r["mse"] > 0 and r["loss"] == pytest.approx(r["lm_loss"], rel=1e-7)  # the penalty left out of the loss
    heavy = _train(llama_pair, tokenizer, tmp_path / "heavy", steps=1, mse_weight=5e6, cache_dir=tmp_path / "cache")
    h = read_log(heavy.out_dir)[0]
    assert h["loss"] == pytest.approx(h["lm_loss"] + 5e6 * h["mse"], rel=1e-5)
    with pytest.raises(PktError, match="mse_weight"):
        _train(llama_pair, tokenizer, tmp_path / "bad", steps=1, mse_weight=-1.0)
    with pytest.raises(PktError):  # a run folder keeps its penalty: resuming it with another is refused
        _train(llama_pair, tokenizer, tmp_path / "free", steps=1, mse_weight=1000.0)


@pytest.mark.slow
def test_lr_sweep_delta_grows_with_learning_rate(llama_pair, tokenizer, tmp_path):
    import pandas as pd

    from pktlib.experiments import laten_sweep

    teacher, student = llama_pair
    task = str(tmp_path / "task.jsonl")
    write_examples(task, [Example(e.messages, {**e.meta, "answer": e.answer}) for e in EXAMPLES])
    lrs = [3e-5, 3e-3, 3e-1]
    runs, rows, cost = laten_sweep.run_lr_sweep(
        (teacher, tokenizer), (student, tokenizer), tasks=[task], lrs=lrs, steps=[1, 2], penalties=[1000.0, 0.0],
        seeds=[0], transfer_rate=0.25, limit=2, run_root=tmp_path / "sw", align_batch=2, max_length=64,
        eval_kwargs={"max_new_tokens": 2})
    assert (runs.model == "student").sum() == 1 and (runs.model == "teacher").sum() == 1  # scored once per task
    # Costs are rounded (to 0.1 s, rows to 0.01 s): on a fast machine a tiny model's scoring rounds
    # to 0.0, so only their presence and the total are asserted, not a lower bound per row.
    assert cost["cpu_s"] >= 0 and cost["wall_s"] > 0
    assert runs.cpu_s.notna().all() and (runs.cpu_s >= 0).all() and runs.cpu_s.sum() > 0  # each computed row's cost
    table = laten_sweep.lr_sweep_table(runs, weight_rms=laten_sweep.weight_rms(student))
    assert len(table) == len(lrs) * 2 * 2 and set(table.n) == {2}
    for (penalty, step), g in table.groupby(["penalty", "step"]):
        ratios = list(g.sort_values("lr").ratio)
        assert ratios == sorted(ratios) and ratios[-1] > 100 * ratios[0], (penalty, step, ratios)
    configs = {json.loads(p.read_text())["config"]["mse_weight"] for p in (tmp_path / "sw").rglob("laten_config.json")}
    assert configs == {1000.0, 0.0}
    assert any((tmp_path / "sw" / "attributions").iterdir())  # one attribution cache for every setting
    assert not list((tmp_path / "sw").glob("lr*/pair-*/attributions"))
    again, _, _ = laten_sweep.run_lr_sweep(
        (teacher, tokenizer), (student, tokenizer), tasks=[task], lrs=lrs, steps=[1, 2], penalties=[1000.0, 0.0],
        seeds=[0], transfer_rate=0.25, limit=2, run_root=tmp_path / "sw", align_batch=2, max_length=64,
        eval_kwargs={"max_new_tokens": 2})
    # resumed from the results files: the same injections, the same answers
    pd.testing.assert_frame_equal(again, runs)


def test_attribute_examples_equals_single_calls_and_caches(pair, tokenizer, tmp_path):
    from pktlib.attribution import attribute
    from pktlib.data import prompt_answer_pairs
    from pktlib.laten import attribute_examples, cached_attribution
    model = pair[0]
    texts = prompt_answer_pairs(EXAMPLES[:3]) + prompt_answer_pairs(EXAMPLES[:1])  # a duplicate too
    got = attribute_examples(model, tokenizer, texts, model_id="m", cache_dir=tmp_path)
    assert len(got) == 4 and len(list(tmp_path.iterdir())) == 3
    for text, a in zip(texts, got):
        one = attribute(model, tokenizer, [text])
        assert a.n_examples == 1 and torch.equal(a.targets, one.targets)
        for kind in ("ffn", "attn"):
            torch.testing.assert_close(a.scores(kind), one.scores(kind), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(a.layer_scores(kind), one.layer_scores(kind), atol=1e-4, rtol=1e-4)
    # what the batched call cached is what a single-pair lookup reads; nothing is computed again
    with torch.no_grad():
        broken = copy.deepcopy(model)
        for p in broken.parameters():
            p.zero_()
    again = cached_attribution(broken, tokenizer, texts[1], model_id="m", cache_dir=tmp_path)
    assert torch.equal(again.ffn, got[1].ffn)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_teacher_with_other_head_size_trains_and_applies(arch, tokenizer, tmp_path):
    """Head sizes may differ (Qwen2.5-Coder 1.5B -> 0.5B: 128 -> 64): attention neurons pair by rank."""
    kv = {"llama": {}, "qwen2": {"num_key_value_heads": 2}}[arch]
    teacher = make_model(arch, tokenizer=tokenizer, hidden_size=128, intermediate_size=192, n_layers=4, n_heads=4,
                         seed=1, **kv)  # head_dim 32
    student = _pair(arch, tokenizer)[1]  # head_dim 16
    ts, ss = check_pair(teacher, student)
    assert (ts.head_dim, ss.head_dim) == (32, 16)
    before = copy.deepcopy(student.state_dict())
    run = _train((teacher, student), tokenizer, tmp_path / "run", cache_dir=tmp_path / "cache", steps=1, lr=1.0)
    out = apply((teacher, tokenizer), (student, tokenizer), run.final, task="gsm8k", example=EXAMPLES[5],
                out_dir=None, cache_dir=tmp_path / "cache", progress=False)
    changed = {n for n, w in out.model.state_dict().items() if not torch.equal(w, before[n])}
    assert any("o_proj" in n for n in changed) and any("v_proj" in n for n in changed)
    assert all(torch.equal(w, before[n]) for n, w in student.state_dict().items())  # the student given is untouched
