"""Offload through accelerate: a model placed partly on disk (or CPU) computes the same logits."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from gguf_writer import write_qwen2_gguf
from pktlib.models import dtype_bytes, load_model, plan_placement, spec


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp(f"offload-{request.param}")
    model = make_model(request.param, tokenizer=tokenizer, n_layers=4)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d, model


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 81, 64, 12]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_disk_offload_planned_for_a_small_budget_gives_equal_logits(saved, tmp_path):
    d, reference = saved
    s = spec(reference)
    weights = s.n_parameters * dtype_bytes("float32")
    # room for about 40% of the weights: the planner must spill the rest to disk
    mem = int(0.4 * weights / 0.9)
    plan = plan_placement({"m": s}, dtype="float32", memory={"cpu": mem}, offload_folder=tmp_path / "offload")
    p = plan["m"]
    assert p.kind == "disk offload" and p.max_memory == {"cpu": int(mem * 0.9)}
    model, _ = load_model(d, **p.load_kwargs())
    places = set(model.hf_device_map.values())
    assert places == {"cpu", "disk"}, model.hf_device_map
    assert torch.equal(_logits(model), _logits(reference))
    # greedy generation goes through the offload hooks too
    plain, _ = load_model(d)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS, **kw), plain.generate(IDS, **kw))


def test_max_memory_alone_implies_auto_and_safetensors_offload_in_place(saved):
    d, reference = saved
    model, _ = load_model(d, max_memory={"cpu": 10_000})  # no offload_folder: read from model.safetensors
    assert model.hf_device_map and "disk" in set(model.hf_device_map.values())
    assert torch.equal(_logits(model), _logits(reference))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU offload from a GPU needs a GPU")
def test_cpu_offload_from_gpu_gives_equal_logits(saved):
    d, reference = saved
    s = spec(reference)
    weights = s.n_parameters * 4
    plan = plan_placement({"m": s}, dtype="float32", memory={0: int(0.5 * weights / 0.9), "cpu": 10 * weights})
    p = plan["m"]
    assert p.kind == "CPU offload"
    model, _ = load_model(d, **p.load_kwargs())
    assert set(model.hf_device_map.values()) == {0, "cpu"}
    with torch.no_grad():
        got = model(IDS.to("cuda:0")).logits.cpu()
    torch.testing.assert_close(got, _logits(reference), rtol=1e-4, atol=1e-4)  # GPU kernels round differently


def test_gguf_file_offloads_to_disk_with_equal_logits(tmp_path, tokenizer):
    model = make_model("qwen2", tokenizer=tokenizer, n_layers=4)
    write_qwen2_gguf(tmp_path / "m.gguf", model, tokenizer)
    plain, _ = load_model(tmp_path / "m.gguf")
    off, _ = load_model(tmp_path / "m.gguf", max_memory={"cpu": 10_000}, offload_folder=tmp_path / "off")
    assert set(off.hf_device_map.values()) == {"disk"} and any((tmp_path / "off").iterdir())
    assert torch.equal(_logits(off), _logits(plain))
