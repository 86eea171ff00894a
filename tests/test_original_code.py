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
from pktlib.injection import NeuronDelta, inject_
from pktlib.models import spec
from pktlib.original_code import (
    DELTA_ATTRIBUTE,
    FP16_SMALLEST_NORMAL,
    FP16_SMALLEST_SUBNORMAL,
    attach_delta_attributes,
    attribute_deltas_active,
    fp16_rounding,
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
