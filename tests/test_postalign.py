"""Post-Align: LoRA initialisations keep the student's outputs; fine-tuning logs and resumes."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import PAIRS, make_model
from pktlib.errors import PktError
from pktlib.models import spec
from pktlib.postalign import TABLE4, finetune, finetune_defaults, lora_model, merged_copy, seeking_lora_factors
from pktlib.seeking import seeking_extract, sensitivity
from pktlib.training import RunDir




def _logits(model, tokenizer):
    ids = tokenizer("<|user|>\nWhat is 12 - 5?\n\n<|assistant|>\nSo the answer is 7.", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("init", ["random", "pissa", "seeking"])
def test_every_init_keeps_logits(arch, init, tokenizer):
    kv = {"llama": 4, "qwen2": 2}[arch]
    student = make_model(arch, tokenizer=tokenizer, n_layers=2, num_key_value_heads=kv)
    teacher = make_model(arch, tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3,
                         n_heads=6, num_key_value_heads=6 if arch == "llama" else 3, seed=5)
    want = _logits(student, tokenizer)
    pm = lora_model(copy.deepcopy(student), init=init, teacher=(teacher, tokenizer), pairs=PAIRS, r=8,
                    alpha=16, progress=False)
    pm.eval()
    got = _logits(pm, tokenizer)
    assert (got - want).abs().max() <= 1e-4, float((got - want).abs().max())
    s = spec(student)
    layer = s.module(pm.get_base_model(), 1, "up_proj")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (8, s.hidden_size) and B.shape == (s.intermediate_size, 8)
    if init == "random":
        assert torch.count_nonzero(B) == 0
    else:  # the adapter carries a real product and the base weight compensates for it
        assert torch.count_nonzero(B) > 0
        base_w = layer.get_base_layer().weight
        torch.testing.assert_close(base_w + layer.scaling["default"] * (B @ A), s.weight(student, 1, "up_proj"),
                                   atol=1e-5, rtol=1e-4)
    n_lora = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)
    assert n_lora > 0 and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_seeking_init_is_the_svd_of_the_extracted_matrix(tokenizer):
    student = make_model("llama", tokenizer=tokenizer, n_layers=2)
    teacher = make_model("llama", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3, seed=5)
    sens = sensitivity(teacher, tokenizer, PAIRS, progress=False)
    ex = seeking_extract(teacher, sens, student, progress=False)
    pm = lora_model(copy.deepcopy(student), init="seeking", teacher=teacher, pairs=sens, r=4, alpha=8, progress=False)
    s = spec(student)
    for (j, m), mat in ex.matrices.items():
        layer = s.module(pm.get_base_model(), j, m)
        BA = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        U, S, Vh = torch.linalg.svd(mat.double())
        torch.testing.assert_close(BA.double(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
        assert layer.scaling["default"] == 2.0
    assert pm.pkt_init["seeking"]["teacher_layers"] == ex.teacher_layers
    # Seeking initialised from the extract examples inside torch.no_grad(): the same factors
    with torch.no_grad():
        again = lora_model(copy.deepcopy(student), init="seeking", teacher=(teacher, tokenizer), pairs=PAIRS, r=4,
                           alpha=8, progress=False)
    for (j, m) in ex.matrices:
        a, b = (s.module(x.get_base_model(), j, m).lora_A["default"].weight for x in (pm, again))
        torch.testing.assert_close(a, b)


def test_seeking_init_from_a_precomputed_extract_needs_no_teacher(tokenizer):
    student = make_model("qwen2", tokenizer=tokenizer, n_layers=2, num_key_value_heads=2)
    teacher = make_model("qwen2", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3, n_heads=6,
                         num_key_value_heads=3, seed=5)
    modules = ("up_proj", "down_proj", "o_proj")
    sens = sensitivity(teacher, tokenizer, PAIRS, modules=modules, progress=False)
    ex = seeking_extract(teacher, sens, student, modules=modules, progress=False)
    a = lora_model(copy.deepcopy(student), init="seeking", teacher=teacher, pairs=sens, modules=modules, r=4,
                   progress=False)
    b = lora_model(copy.deepcopy(student), init="seeking", pairs=ex, modules=modules, r=4, progress=False)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert b.pkt_init["seeking"]["teacher_layers"] == ex.teacher_layers
    with pytest.raises(PktError, match=r"no matrices for modules \['v_proj'\]"):
        lora_model(copy.deepcopy(student), init="seeking", pairs=ex, modules=modules + ("v_proj",), r=4,
                   progress=False)


def test_seeking_factors_pad_low_rank():
    mat = torch.randn(6, 1) @ torch.randn(1, 5)
    B, A = seeking_lora_factors(mat, 3)
    assert B.shape == (6, 3) and A.shape == (3, 5)
    torch.testing.assert_close(B @ A, mat, atol=1e-5, rtol=1e-5)


def test_bad_init_arguments(tokenizer):
    student = make_model("llama", tokenizer=tokenizer, n_layers=1)
    with pytest.raises(PktError, match="unknown LoRA init"):
        lora_model(student, init="olora")
    with pytest.raises(PktError, match="needs teacher"):
        lora_model(copy.deepcopy(student), init="seeking")


def test_table4_defaults_by_name_then_family():
    assert finetune_defaults("humaneval") == TABLE4["humaneval"]  # by name: HumanEval has its own row
    assert finetune_defaults("mbpp") == finetune_defaults("pocket-code") == TABLE4["code"]  # else by family
    assert finetune_defaults("gsm") == TABLE4["math"] and finetune_defaults("mmlu") == TABLE4["knowledge"]
    assert finetune_defaults("my_task.jsonl") == TABLE4["knowledge"]  # custom tasks: the common setting


def test_finetune_lowers_loss_logs_and_resumes(tmp_path, tokenizer, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"So the answer is {a + b}."}]}
            for a in range(4) for b in range(3)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = make_model("llama", tokenizer=tokenizer, n_layers=1)

    def run(out, epochs):
        pm = lora_model(copy.deepcopy(student), init="pissa", r=4, progress=False)
        return pm, finetune(pm, str(task), split="train", lr=1e-2, epochs=epochs, batch_size=8, micro_batch=3,
                            out_dir=out, tokenizer=tokenizer, progress=False)

    with torch.no_grad():  # fine-tuning enables gradients itself
        pm, full = run(tmp_path / "a", 2)
    assert full.steps == 2 * 2 and len(full.log) == 4
    assert full.log[-1]["loss"] < full.log[0]["loss"]
    lines = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, 5))

    # A crash right after the first checkpoint (end of epoch 1, step 2) ...
    real_save, calls = RunDir.save, []

    def crashing_save(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        calls.append(step)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 2)
    monkeypatch.setattr(RunDir, "save", real_save)
    assert calls == [2]
    # ... and a rerun continues from step 2 to the same weights as the uninterrupted run, bit for bit.
    pm2, resumed = run(tmp_path / "b", 2)
    assert resumed.resumed_from == 2 and [r["step"] for r in resumed.log] == list(range(1, 5))
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in full.log]
    for (n1, p1), (n2, p2) in zip(pm.named_parameters(), pm2.named_parameters()):
        if p1.requires_grad:
            assert torch.equal(p1, p2), n1
    assert [p.name for p in (tmp_path / "b").glob("checkpoint_*")] == ["checkpoint_4"]  # only the last is kept
    with pytest.raises(PktError, match="other settings"):
        run(tmp_path / "b", 3)  # the schedule changed: refuse rather than mix
    merged = merged_copy(pm)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, tokenizer), _logits(pm.eval(), tokenizer), atol=1e-4, rtol=1e-4)


def test_cli_postalign(tmp_path, tokenizer, pkt):
    teacher = make_model("llama", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3, seed=5)
    student = make_model("llama", tokenizer=tokenizer, n_layers=2)
    for m, d in ((teacher, tmp_path / "t"), (student, tmp_path / "s")):
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
                            + "\n" for p, a in PAIRS * 4))
    r = pkt("postalign", "--student", tmp_path / "s", "--teacher", tmp_path / "t", "--task", task, "--init", "seeking",
            "--epochs", "2", "--batch-size", "4", "--r", "4", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["init"]["init"] == "seeking" and res["steps"] == 4


def test_finetune_prompts_in_the_chosen_template(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                          {"role": "assistant", "content": f"So the answer is {a + 1}."}]} for a in range(4)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = make_model("llama", tokenizer=tokenizer, n_layers=1)
    tok = copy.deepcopy(tokenizer)

    def run(out, template):
        pm = lora_model(copy.deepcopy(student), init="pissa", r=4, progress=False)
        return finetune(pm, str(task), lr=1e-2, epochs=1, batch_size=4, out_dir=tmp_path / out, tokenizer=tok,
                        template=template, progress=False)

    with pytest.raises(PktError, match="template='chat' needs a tokenizer with a chat template"):
        run("no-template", "chat")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    default, chat = run("default", "default"), run("chat", "chat")
    assert json.loads((tmp_path / "chat" / "settings.json").read_text())["template"] == "chat"
    assert default.final_loss != chat.final_loss  # other prompts, another loss
    assert run("auto", "auto").final_loss == chat.final_loss  # "auto": the chat template when there is one
