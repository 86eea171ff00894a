"""Unaligned Pre-Align baselines: the grid, the hidden-size maps, Seeking without training."""
from __future__ import annotations

import pytest
import torch

from conftest import PAIRS, make_model, make_tokenizer
from pktlib.baselines import (HIDDEN_REDUCTIONS, LAYER_CHOICES, NEURON_REDUCTIONS, embedding_map, grid, map_weight,
                              neuron_importance, pca_map, seeking_transfer, unaligned_transfer, whitening_map)
from pktlib.errors import PktError
from pktlib.models import spec
from pktlib.seeking import sensitivity




@pytest.fixture(scope="module")
def pair(tokenizer):
    teacher = make_model("qwen2", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=4,
                         n_heads=6, num_key_value_heads=3, seed=1)
    student = make_model("qwen2", tokenizer=tokenizer, hidden_size=64, intermediate_size=96, n_layers=2,
                         n_heads=4, num_key_value_heads=2, seed=2)
    return teacher, student


def _diff_keys(a, b) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def test_every_grid_cell_changes_only_recorded_modules(pair, tokenizer):
    teacher, student = pair
    before = {k: v.clone() for k, v in student.state_dict().items()}
    sens = sensitivity(teacher, tokenizer, PAIRS, modules=(), progress=False)
    cells = grid()
    # every registered combination, once
    assert {tuple(sorted(c.items())) for c in cells} == {
        (("hidden", h), ("layers", l), ("neurons", n)) for l in LAYER_CHOICES for h in HIDDEN_REDUCTIONS
        for n in NEURON_REDUCTIONS} and len(cells) == len({tuple(sorted(c.items())) for c in cells})
    seen_layers = {}
    for cell in cells:
        model, rec = unaligned_transfer((teacher, tokenizer), (student, tokenizer), extract=sens, seed=3,
                                        progress=False, **cell)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in student.state_dict().items()}
        changed = _diff_keys(model, student)
        assert changed == set(rec.changed), cell
        ss = spec(student)
        assert set(rec.changed) == {ss.param_name(l, m) for l in range(2) for m in ("up_proj", "down_proj", "v_proj", "o_proj")}
        assert len(rec.teacher_layers) == 2 and rec.teacher_layers == sorted(rec.teacher_layers)
        assert rec.name == f"{cell['layers']}/{cell['hidden']}/{cell['neurons']}"
        # The change is exactly the recorded delta norm.
        for k in rec.changed:
            d = (model.state_dict()[k] - student.state_dict()[k]).norm()
            assert abs(float(d) - rec.delta_norms[k]) <= 1e-3 * max(1.0, rec.delta_norms[k])
        seen_layers[cell["layers"]] = rec.teacher_layers
    assert seen_layers["bottom"] == [0, 1]
    assert seen_layers["top"] == sens.top_layers(2)
    # The student itself was never modified.
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_hidden_maps_are_computed_once_per_reduction_and_change_nothing(pair, tokenizer, monkeypatch):
    import pktlib.baselines as bl

    teacher, student = pair
    cells = [c for c in grid(layers=("bottom", "random")) if c["hidden"] in ("pca", "embedding")]
    alone = [unaligned_transfer((teacher, tokenizer), (student, tokenizer), seed=3, progress=False, **c)[0]
             for c in cells]
    calls = []
    for name, fn in list(bl.HIDDEN_REDUCTIONS.items()):
        monkeypatch.setitem(bl.HIDDEN_REDUCTIONS, name, lambda E_T, E_S, fn=fn, name=name: calls.append(name) or fn(E_T, E_S))
    maps = {}
    shared = [unaligned_transfer((teacher, tokenizer), (student, tokenizer), seed=3, progress=False, hidden_maps=maps,
                                 **c)[0] for c in cells]
    assert sorted(calls) == ["embedding", "pca"] and len(cells) == 8 and set(maps) == {"embedding", "pca"}
    for a, b in zip(alone, shared):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_layer_top_needs_extract_and_modules_subset(pair, tokenizer):
    teacher, student = pair
    with pytest.raises(PktError, match="extract"):
        unaligned_transfer(teacher, student, layers="top", progress=False)
    model, rec = unaligned_transfer((teacher, tokenizer), student, layers="top", extract=PAIRS,
                                    modules=("up_proj", "gate_proj"), progress=False)
    assert _diff_keys(model, student) == set(rec.changed)
    assert all(k.endswith(("up_proj.weight", "gate_proj.weight")) for k in rec.changed)
    assert len(rec.info["layer_totals"]) == 4


def test_unknown_variants_and_bad_pairs(pair, tokenizer):
    teacher, student = pair
    with pytest.raises(PktError, match="unknown hidden-size reduction 'svd'"):
        unaligned_transfer(teacher, student, layers="bottom", hidden="svd")
    with pytest.raises(PktError, match="unknown layer choice"):
        unaligned_transfer(teacher, student, layers="middle")
    with pytest.raises(PktError, match="teacher is smaller"):
        unaligned_transfer(student, teacher, layers="bottom", progress=False)
    other = make_model("qwen2", tokenizer=make_tokenizer(300), hidden_size=64, intermediate_size=96, n_layers=2,
                       num_key_value_heads=2)
    with pytest.raises(PktError, match=r"teacher vocab_size \d+ != student vocab_size \d+"):
        unaligned_transfer(teacher, other, layers="bottom", progress=False)
    with pytest.raises(PktError, match="vocabular"):
        seeking_transfer((teacher, tokenizer), other, PAIRS, progress=False)


def test_embedding_transform_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    E_T, E_S = torch.randn(300, 24, generator=g), torch.randn(300, 16, generator=g)
    T = embedding_map(E_T, E_S)
    want = torch.linalg.lstsq(E_T.double(), E_S.double()).solution.float()
    assert T.shape == (24, 16)
    torch.testing.assert_close(T, want, rtol=1e-4, atol=1e-5)
    # ... and it is the minimiser: perturbing it increases the residual.
    r0 = (E_T @ T - E_S).norm()
    assert (E_T @ (T + 1e-3 * torch.randn(24, 16, generator=g)) - E_S).norm() > r0


def test_pca_and_whitening_maps():
    g = torch.Generator().manual_seed(1)
    E_T = torch.randn(500, 12, generator=g) * torch.linspace(3, 0.1, 12)  # decreasing variances
    E_S = torch.zeros(500, 5)
    P = pca_map(E_T, E_S)
    assert P.shape == (12, 5)
    torch.testing.assert_close(P.T @ P, torch.eye(5), atol=1e-5, rtol=0)
    # Same subspace as the top-5 eigenvectors of the sample covariance.
    X = (E_T - E_T.mean(0)).double()
    evals, evecs = torch.linalg.eigh(X.T @ X)  # ascending
    top = evecs[:, -5:].float()
    torch.testing.assert_close(P @ P.T, top @ top.T, atol=1e-4, rtol=0)
    W = whitening_map(E_T, E_S)
    X = E_T - E_T.mean(0)
    Z = X @ W  # whitened coordinates: identity covariance
    torch.testing.assert_close(Z.T @ Z / X.shape[0], torch.eye(5), atol=1e-3, rtol=0)


def test_map_weight_and_importance():
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(10, 6, generator=g), torch.randn(6, 10, generator=g)
    up[3] *= 10  # neuron 3 is the most important
    imp = neuron_importance([(up, 0), (down, 1)])
    want = (up.abs().sum(1) + down.abs().sum(0)) / 12
    torch.testing.assert_close(imp.float(), want)
    assert int(imp.argmax()) == 3
    P = torch.randn(6, 4, generator=g)
    idx = torch.tensor([1, 3, 7])
    torch.testing.assert_close(map_weight(up, "up_proj", idx, P), up[idx] @ P)
    torch.testing.assert_close(map_weight(down, "down_proj", idx, P), P.T @ down[:, idx])


def test_seeking_transfer_full_and_low_rank(pair, tokenizer):
    teacher, student = pair
    sens = sensitivity(teacher, tokenizer, PAIRS, progress=False)
    full, rec = seeking_transfer((teacher, tokenizer), student, sens, rank=None, progress=False)
    assert _diff_keys(full, student) == set(rec.changed)
    ts, ss = spec(teacher), spec(student)
    for j, lt in enumerate(rec.teacher_layers):
        win = rec.info["windows"][f"{j}.up_proj"]
        r, c = win["row"], win["col"]
        w_s = ss.weight(student, j, "up_proj")
        sub = ts.weight(teacher, lt, "up_proj")[r:r + w_s.shape[0], c:c + w_s.shape[1]]
        torch.testing.assert_close(ss.weight(full, j, "up_proj") - w_s, sub.detach())
    low, rec2 = seeking_transfer((teacher, tokenizer), student, sens, rank=4, progress=False)
    d = ss.weight(low, 0, "up_proj") - ss.weight(student, 0, "up_proj")
    assert torch.linalg.matrix_rank(d.double(), atol=1e-4) == 4
    assert rec2.teacher_layers == rec.teacher_layers == sens.top_layers(2)


def test_cli_unaligned_and_seeking(tmp_path, pair, tokenizer, pkt):
    import json

    from pktlib.models import load_model

    teacher, student = pair
    t_dir, s_dir = tmp_path / "teacher", tmp_path / "student"
    for m, d in ((teacher, t_dir), (student, s_dir)):
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
                            + "\n" for p, a in PAIRS))

    r = pkt("baseline", "unaligned", "--teacher", t_dir, "--student", s_dir, "--layers", "top", "--hidden", "whitening",
            "--neurons", "random", "--task", task, "--out", tmp_path / "u")
    assert r.code == 0, r.err
    rec = json.loads((tmp_path / "u" / "record.json").read_text())
    assert rec["name"] == "top/whitening/random" and len(rec["changed"]) == 8
    out, _ = load_model(tmp_path / "u")
    assert _diff_keys(out, student) == set(rec["changed"])
    r = pkt("baseline", "seeking", "--teacher", t_dir, "--student", s_dir, "--task", task, "--rank", "4",
            "--out", tmp_path / "s")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "s" / "record.json").read_text())["info"]["rank"] == 4
    r = pkt("baseline", "unaligned", "--teacher", s_dir, "--student", t_dir, "--layers", "bottom", "--out", tmp_path / "x")
    assert r.code == 1 and "teacher is smaller" in r.err
