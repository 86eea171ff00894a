"""Seeking: best sub-matrix search, sensitivity, layer choice and extraction."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import PAIRS, make_model
from pktlib.errors import PktError
from pktlib.extraction import (best_submatrix, choose_layers, seeking_extract, sensitivity,
                               window_sums)
from pktlib.models import spec


def brute_force(scores: torch.Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    """Every window summed directly; first strict maximum in row-major order wins."""
    h, w = shape
    best, arg = None, None
    for r, c in itertools.product(range(scores.shape[0] - h + 1), range(scores.shape[1] - w + 1)):
        v = float(scores[r:r + h, c:c + w].double().sum())
        if best is None or v > best:
            best, arg = v, (r, c)
    return arg


@pytest.mark.parametrize("R,C,h,w", [(7, 9, 3, 4), (12, 5, 12, 2), (6, 11, 1, 11), (5, 5, 5, 5),
                                     (10, 13, 1, 1), (16, 8, 9, 7), (3, 40, 2, 17)])
def test_best_submatrix_matches_brute_force(R, C, h, w):
    g = torch.Generator().manual_seed(R * 100 + C)
    for trial in range(3):
        scores = torch.rand(R, C, generator=g)
        assert best_submatrix(scores, (h, w)) == brute_force(scores, (h, w))
        sums = window_sums(scores, (h, w))
        assert sums.shape == (R - h + 1, C - w + 1) and sums.dtype == torch.float64
        r, c = R - h, C - w  # the last window, summed directly
        assert torch.isclose(sums[r, c], scores[r:, c:].double().sum(), rtol=1e-6)


@pytest.mark.parametrize("R,C,h,w", [(8, 8, 3, 3), (9, 12, 4, 5), (6, 6, 2, 6)])
def test_best_submatrix_ties_go_to_smallest_row_major(R, C, h, w):
    g = torch.Generator().manual_seed(1)
    # Small integers make many exactly tied windows (exact in float64).
    scores = torch.randint(0, 2, (R, C), generator=g).float()
    assert best_submatrix(scores, (h, w)) == brute_force(scores, (h, w))
    assert best_submatrix(torch.zeros(R, C), (h, w)) == (0, 0)
    ones = torch.ones(R, C)  # every window ties
    assert best_submatrix(ones, (h, w)) == (0, 0)
    # Two separated equal blocks: the upper one wins; on one row, the left one.
    blocks = torch.zeros(12, 12)
    blocks[7:9, 1:3] = 1
    blocks[2:4, 8:10] = 1
    assert best_submatrix(blocks, (2, 2)) == (2, 8) == brute_force(blocks, (2, 2))
    row = torch.zeros(4, 12)
    row[1, 9:11] = 1
    row[1, 2:4] = 1
    assert best_submatrix(row, (1, 2)) == (1, 2)


def test_best_submatrix_full_size_and_errors():
    scores = torch.randn(5, 7)
    assert best_submatrix(scores, (5, 7)) == (0, 0)
    assert torch.isclose(window_sums(scores, (5, 7))[0, 0], scores.double().sum())
    with pytest.raises(PktError, match="cannot fit"):
        best_submatrix(scores, (6, 7))
    with pytest.raises(PktError, match="cannot fit"):
        best_submatrix(scores, (0, 3))


def test_best_submatrix_negative_and_large_offsets():
    # A large constant offset would cancel in a float32 table; float64 keeps the order.
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(40, 30, generator=g) - 0.5
    assert best_submatrix(scores, (13, 9)) == brute_force(scores, (13, 9))
    assert best_submatrix(scores + 1e4, (13, 9)) == brute_force(scores + 1e4, (13, 9))


def test_choose_layers():
    assert choose_layers(torch.tensor([1.0, 5.0, 3.0, 4.0]), 2) == [1, 3]
    assert choose_layers(torch.tensor([2.0, 2.0, 2.0]), 2) == [0, 1]  # ties: lower index
    assert choose_layers(torch.tensor([1.0, 2.0]), 5) == [0, 1]





def test_sensitivity_equals_direct_theta_times_grad(tokenizer):
    from pktlib.data import collate, tokenize_example

    model = make_model("qwen2", tokenizer=tokenizer, n_layers=2)
    s = spec(model)
    sens = sensitivity(model, tokenizer, PAIRS, progress=False)
    assert sens.n_examples == 2
    # Direct: per example, full backward, |theta * grad|, summed.
    direct = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for pair in PAIRS:
        model.zero_grad()
        batch = collate([tokenize_example(tokenizer, pair)], tokenizer.pad_token_id)
        model(**batch.model_inputs()).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                direct[n] += (p.detach().double() * p.grad.double()).abs()
    model.zero_grad(set_to_none=True)
    for l in range(s.n_layers):
        for m in ("up_proj", "down_proj", "v_proj", "o_proj"):
            got = sens.matrix(l, m)
            want = direct[s.param_name(l, m)].float()
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        layer_prefix = s.module_path(l, "up_proj").rsplit(".", 2)[0] + "."  # "<layers>.<l>."
        total = sum(float(v.sum()) for n, v in direct.items() if n.startswith(layer_prefix))
        assert total > 0 and abs(float(sens.layer_totals[l]) - total) <= 1e-5 * total
    # The model is left as found: no grads, flags restored.
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_sensitivity_restores_flags_and_rejects_empty(tokenizer):
    model = make_model("llama", tokenizer=tokenizer, n_layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    sensitivity(model, tokenizer, PAIRS[:1], progress=False)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(PktError, match="at least one example"):
        sensitivity(model, tokenizer, [], progress=False)


def test_seeking_extract_cuts_student_shapes(tokenizer):
    teacher = make_model("llama", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=4, seed=1)
    student = make_model("llama", tokenizer=tokenizer, hidden_size=64, intermediate_size=96, n_layers=2)
    sens = sensitivity(teacher, tokenizer, PAIRS, progress=False)
    ex = seeking_extract(teacher, sens, student, progress=False)
    ts, ss = spec(teacher), spec(student)
    assert ex.teacher_layers == choose_layers(sens.layer_totals, 2)
    for (j, m), mat in ex.matrices.items():
        assert mat.shape == ss.weight(student, j, m).shape
        r, c = ex.windows[(j, m)]
        lt = ex.teacher_layers[j]
        assert (r, c) == best_submatrix(sens.matrix(lt, m), tuple(mat.shape))
        torch.testing.assert_close(mat, ts.weight(teacher, lt, m)[r:r + mat.shape[0], c:c + mat.shape[1]])
    assert len(ex.matrices) == 2 * 4
    with pytest.raises(PktError, match="fewer than the student"):
        seeking_extract(student, sensitivity(student, tokenizer, PAIRS, progress=False), teacher, progress=False)


def test_sensitivity_inside_no_grad_equals_outside(tokenizer):
    model = make_model("llama", tokenizer=tokenizer, n_layers=2)
    outside = sensitivity(model, tokenizer, PAIRS, progress=False)
    with torch.no_grad():
        inside = sensitivity(model, tokenizer, PAIRS, progress=False)
    torch.testing.assert_close(inside.layer_totals, outside.layer_totals)
    assert float(inside.layer_totals.sum()) > 0
    with torch.inference_mode(), pytest.raises(PktError, match="inference_mode"):
        sensitivity(model, tokenizer, PAIRS, progress=False)
