"""The original LaTen code path, checked on tiny models (pktlib.original_code).

1. Attribute-style injection (knowledge_injection + inference_LaTen.py's save_pretrained): the
   deltas act in the process that set them, but a saved-and-reloaded model is the un-injected
   student, weight for weight and logit for logit.
2. The float16 cast of translator outputs: what it leaves at the delta sizes seen in the book
   (RMS 5e-10 .. 3e-5), against the Gaussian probabilities of the fp16 thresholds.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_model
from pktlib.errors import PktError
from pktlib.injection import NeuronDelta, inject_
from pktlib.models import spec
from pktlib.original_code import (
    DELTA_ATTRIBUTE,
    FP16_SMALLEST_NORMAL,
    FP16_SMALLEST_SUBNORMAL,
    attach_delta_attributes,
    attribute_deltas_active,
    fp16_rounding,
    cast_visibility,
)


def _deltas(model, scale: float = 0.5) -> list[NeuronDelta]:
    s = spec(model)
    g = torch.Generator().manual_seed(0)
    out = []
    for layer in range(s.n_layers):
        for module, n_total, d in (("up_proj", s.intermediate_size, s.hidden_size),
                                   ("down_proj", s.intermediate_size, s.hidden_size),
                                   ("v_proj", s.attn_size, s.hidden_size), ("o_proj", s.attn_size, s.hidden_size)):
            neurons = torch.randperm(n_total, generator=g)[:5]
            shape = (5, d) if module in ("up_proj", "v_proj") else (d, 5)
            out.append(NeuronDelta(layer, module, neurons, scale * torch.randn(shape, generator=g)))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attribute_injection_does_not_survive_save_pretrained(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(arch, tokenizer=tokenizer)
    plain = copy.deepcopy(model)
    deltas = _deltas(model)
    ids = tokenizer(["<|user|>\nWhat is 3 + 4?\n\n<|assistant|>\nSo the answer is 7."], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = plain(ids).logits
        merged = copy.deepcopy(plain)
        inject_(merged, deltas)
        merged_logits = merged(ids).logits

    paths = attach_delta_attributes(model, deltas)
    assert len(paths) == 4 * spec(model).n_layers
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for p in paths:
        module = model.get_submodule(p)
        assert isinstance(getattr(module, DELTA_ATTRIBUTE), torch.Tensor)
        assert f"{p}.{DELTA_ATTRIBUTE}" not in params and f"{p}.{DELTA_ATTRIBUTE}" not in buffers
    assert not any(k.endswith(f".{DELTA_ATTRIBUTE}") for k in model.state_dict())
    with torch.no_grad():
        # as the original modelling code reads the attribute: the deltas act in this process ...
        with attribute_deltas_active(model) as active:
            assert len(active) == len(paths)
            live = model(ids).logits
        assert torch.allclose(live, merged_logits, atol=1e-4)
        assert (live - base_logits).abs().max() > 1e-2
        # ... while stock transformers ignores the attribute
        assert torch.equal(model(ids).logits, base_logits)

    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert not any(isinstance(getattr(m, DELTA_ATTRIBUTE, None), torch.Tensor) for m in reloaded.modules())
    a, b = reloaded.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, base_logits)
        with attribute_deltas_active(reloaded) as active:  # nothing left to act
            assert active == []


def test_fp16_thresholds():
    half = lambda v: float(torch.tensor(v, dtype=torch.float32).to(torch.float16))  # noqa: E731
    assert half(FP16_SMALLEST_SUBNORMAL) == FP16_SMALLEST_SUBNORMAL
    assert half(2.0 ** -25) == 0.0  # the tie rounds to even: zero
    assert half(1.01 * 2.0 ** -25) == FP16_SMALLEST_SUBNORMAL
    assert half(1e-8) == 0.0 and half(5e-10) == 0.0
    assert half(FP16_SMALLEST_NORMAL) == FP16_SMALLEST_NORMAL


def _gauss_share_below(threshold: float, rms: float) -> float:
    return math.erf(threshold / (rms * math.sqrt(2)))


@pytest.mark.parametrize("rms", [5e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 3e-5])
def test_fp16_rounding_of_deltas_at_the_sizes_seen(rms):
    x = rms * torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = fp16_rounding(x)
    assert r.n == x.numel() and r.rms == pytest.approx(rms, rel=0.01)
    # zero: |x| <= 2^-25; subnormal: up to 2^-14 (Gaussian probabilities, 200k samples)
    p_zero = _gauss_share_below(2.0 ** -25, rms)
    p_sub = _gauss_share_below(FP16_SMALLEST_NORMAL, rms) - p_zero
    assert r.share_zero == pytest.approx(p_zero, abs=0.005)
    assert r.share_subnormal == pytest.approx(p_sub, abs=0.005)
    assert r.share_zero + r.share_subnormal + r.share_normal == pytest.approx(1.0)
    if rms <= 1e-8:
        assert r.share_zero > 0.99 and r.rms_after < 0.5 * rms
    if rms >= 1e-5:
        assert r.share_zero < 0.003 and r.median_rel_error < 0.01


def test_fp16_rounding_ignores_zeros_and_handles_empty():
    r = fp16_rounding(torch.tensor([0.0, 0.0, 1.0, 1e-9]))
    assert r.n == 2 and r.share_zero == 0.5 and r.share_normal == 0.5
    assert fp16_rounding(torch.zeros(3)).n == 0


def test_cast_visibility_a_bf16_evaluator_turns_a_tiny_delta_into_rounding_noise():
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(512, 512, generator=g)
    tiny = cast_visibility(w, 1e-6 * torch.randn(512, 512, generator=g), "bfloat16")
    # bfloat16's spacing near 0.02 is 2^-13 ~ 1.2e-4: a 1e-6 delta flips ~1% of entries by a spacing
    assert 0.002 < tiny.share_changed < 0.05
    assert tiny.error_rms > 3 * tiny.delta_rms and tiny.correlation < 0.3
    big = cast_visibility(w, 1e-3 * torch.randn(512, 512, generator=g), "bfloat16")
    assert big.share_changed > 0.95 and big.correlation > 0.99 and big.seen_rms == pytest.approx(1e-3, rel=0.05)
    exact = cast_visibility(w, 1e-6 * torch.randn(512, 512, generator=g), "float32")
    assert exact.share_changed > 0.99 and exact.correlation > 0.99


def test_cast_visibility_rejects_bad_input():
    with pytest.raises(PktError, match="differ in shape"):
        cast_visibility(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(PktError, match="unknown dtype 'bf17'"):
        cast_visibility(torch.zeros(2), torch.zeros(2), "bf17")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_evaluator_visibility_per_configuration_dtype_and_module(arch):
    import pandas as pd

    from pktlib.experiments.laten_sweep import evaluator_visibility

    model = make_model(arch)
    with torch.no_grad():  # weights of the real pair's size (RMS ~0.02), where bf16's spacing is ~1.2e-4
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    sizes = pd.DataFrame({"config": ["paper lr", "big lr"], "task": ["gsm8k", "gsm8k"], "delta_rms": [1e-6, 1e-3]})
    sizes = sizes.set_index(["config", "task"])
    t = evaluator_visibility(model, sizes, modules=["up_proj", "o_proj"], dtypes=("bfloat16", "float32"))
    assert len(t) == 2 * 2 * 2 and set(t.layer) == {1}
    tiny = t[(t.config == "paper lr") & (t.dtype == "bfloat16")]
    assert (tiny.correlation < 0.5).all() and (tiny.noise_over_delta > 2).all() and (tiny.share_changed < 0.1).all()
    exact = t[(t.config == "paper lr") & (t.dtype == "float32")]
    assert (exact.correlation > 0.99).all()
    big = t[(t.config == "big lr") & (t.dtype == "bfloat16")]
    assert (big.correlation > 0.99).all() and (big.share_changed > 0.9).all()
