"""pktlib.analysis: CKA, parametric structural similarity, delta statistics, the paired test."""
from __future__ import annotations

import math

import pytest
import torch

from pktlib.analysis.cka import cka_grid, cka_matrix, hsic, layer_representations, linear_cka, rbf_cka
from pktlib.analysis.deltas import delta_histogram, delta_stats, seeking_deltas, sft_deltas
from pktlib.analysis.stats import paired_difference_interval, paired_test, wilson_interval
from pktlib.analysis.structure import structural_cosines, structural_similarity
from pktlib.errors import PktError
from pktlib.injection import apply_deltas
from pktlib.models import spec
from conftest import make_model, make_tokenizer


def _rand(n=40, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _closed_form_cka(x, y):
    """Textbook definition: HSIC = tr(K H L H) / (n-1)^2 with K = X X^T, L = Y Y^T."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x @ x.T, y @ y.T
    hs = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2
    return float(hs(k, l) / torch.sqrt(hs(k, k) * hs(l, l)))


def _unbiased_hsic_loop(k, l):
    """Song et al. 2012, eq. 5, written term by term with explicit sums."""
    n = k.shape[0]
    kt, lt = k.clone(), l.clone()
    for i in range(n):
        kt[i, i] = 0
        lt[i, i] = 0
    one = torch.ones(n, 1, dtype=torch.float64)
    t1 = torch.trace(kt @ lt)
    t2 = (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    return float((t1 + t2 - t3) / (n * (n - 3)))


def test_linear_cka_identical_is_one():
    x = _rand()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, unbiased=True) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_invariances():
    x, y = _rand(seed=0), _rand(d=7, seed=1) + 0.3 * _rand(d=7, seed=2)
    y = torch.cat([y, x[:, :5]], 1)  # share some signal so CKA is not ~0
    base = linear_cka(x, y)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x @ q, y, unbiased=True) == pytest.approx(linear_cka(x, y, unbiased=True), rel=1e-10)
    # Not invariant to a general (non-orthogonal) linear map: the check is meaningful.
    a = torch.diag(torch.linspace(0.1, 10, 12, dtype=torch.float64))
    assert abs(linear_cka(x @ a, y) - base) > 1e-3


def test_linear_cka_matches_closed_form_hsic():
    for seed in range(3):
        x, y = _rand(n=30, d=8, seed=seed), _rand(n=30, d=20, seed=seed + 10)
        y[:, :8] += x  # correlated
        assert linear_cka(x, y) == pytest.approx(_closed_form_cka(x, y), rel=1e-10)
        # float32 input is promoted to float64
        assert linear_cka(x.float(), y.float()) == pytest.approx(_closed_form_cka(x, y), rel=1e-5)


def test_unbiased_hsic_matches_formula():
    x, y = _rand(n=25, d=6, seed=3), _rand(n=25, d=9, seed=4)
    k, l = x @ x.T, y @ y.T
    assert float(hsic(k, l, unbiased=True)) == pytest.approx(_unbiased_hsic_loop(k, l), rel=1e-10)
    expected = _unbiased_hsic_loop(k, l) / math.sqrt(_unbiased_hsic_loop(k, k) * _unbiased_hsic_loop(l, l))
    assert linear_cka(x, y, unbiased=True) == pytest.approx(expected, rel=1e-10)


def test_unbiased_removes_bias_of_independent_wide_features():
    # Independent representations with d >> n: biased CKA is far from 0, unbiased is near 0.
    x, y = _rand(n=30, d=500, seed=5), _rand(n=30, d=500, seed=6)
    assert linear_cka(x, y) > 0.5
    assert abs(linear_cka(x, y, unbiased=True)) < 0.1


def test_rbf_cka():
    x = _rand()
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    y = _rand(seed=9)
    assert 0 < rbf_cka(x, y) < rbf_cka(x, x @ torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0])
    # Large bandwidth: RBF CKA approaches linear CKA (Kornblith et al. 2019, section 4).
    xl, yl = _rand(seed=11), _rand(seed=12) + _rand(seed=11)
    assert rbf_cka(xl, yl, sigma=1e3) == pytest.approx(linear_cka(xl, yl), abs=1e-3)


def test_cka_grid_and_bad_input():
    reps = [_rand(seed=s) for s in range(3)]
    g = cka_grid(reps, reps)
    assert g.shape == (3, 3)
    assert torch.allclose(torch.diagonal(g), torch.ones(3, dtype=torch.float64))
    assert g[0, 1] == pytest.approx(linear_cka(reps[0], reps[1]), rel=1e-10)
    with pytest.raises(PktError, match="same inputs"):
        linear_cka(_rand(n=10), _rand(n=11))
    with pytest.raises(PktError, match="n >= 4"):
        linear_cka(_rand(n=3), _rand(n=3), unbiased=True)
    with pytest.raises(PktError, match="2-D"):
        linear_cka(torch.zeros(3), torch.zeros(3))
    with pytest.raises(PktError, match="unknown kernel"):
        cka_grid(reps, reps, kernel="poly")


TEXTS = [
    "The capital of France is Paris.",
    "Tom has 12 apples and gives 5 away.",
    "def add(a, b):\n    return a + b",
    "The answer is: B",
    "Question: 3 + 4 = ? So the answer is 7.",
    "A. one\nB. two\nC. three\nD. four",
    "What is the capital of France?",
    "assert add(1, 2) == 3",
]


def test_cka_matrix_across_widths_and_tokenizers():
    tok_a, tok_b = make_tokenizer(384), make_tokenizer(300)
    assert len(tok_a) != len(tok_b)
    a = make_model("llama", tokenizer=tok_a, hidden_size=64, intermediate_size=96, n_layers=3)
    b = make_model("qwen2", tokenizer=tok_b, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4)
    for module, (da, db) in {"up_proj": (96, 48), "v_proj": (64, 16), "residual": (64, 32)}.items():
        m = cka_matrix(a, tok_a, b, tok_b, TEXTS, module=module, batch_size=3)
        assert m.shape == (3, 2), module
        assert torch.isfinite(m).all() and (m > -1e-9).all() and (m < 1 + 1e-9).all(), m
        ra = layer_representations(a, tok_a, TEXTS, module=module, batch_size=3)
        assert ra.shape == (3, len(TEXTS), da)
        assert layer_representations(b, tok_b, TEXTS, module=module).shape == (2, len(TEXTS), db)
    # Self-comparison: the diagonal is exactly 1.
    self_m = cka_matrix(a, tok_a, a, tok_a, TEXTS, module="down_proj", batch_size=4)
    assert torch.allclose(torch.diagonal(self_m), torch.ones(3, dtype=torch.float64))


def test_representations_are_token_means_independent_of_batching():
    tok = make_tokenizer()
    m = make_model("mistral", tokenizer=tok)
    r1 = layer_representations(m, tok, TEXTS, module="o_proj", batch_size=1)
    r8 = layer_representations(m, tok, TEXTS, module="o_proj", batch_size=8)  # padded batch
    assert torch.allclose(r1, r8, atol=1e-5)
    # Direct computation for one text and one layer.
    ids = torch.tensor([tok(TEXTS[2])["input_ids"]])
    out = {}
    h = spec(m).module(m, 1, "o_proj").register_forward_hook(lambda mod, a, o: out.setdefault("o", o))
    try:
        with torch.no_grad():
            m(input_ids=ids)
    finally:
        h.remove()
    assert torch.allclose(r1[1, 2], out["o"][0].mean(0).double(), atol=1e-5)
    with pytest.raises(PktError, match="unknown module"):
        layer_representations(m, tok, TEXTS, module="gate")


def _pissa_model(r=4):
    from peft import LoraConfig, get_peft_model

    tok = make_tokenizer()
    base = make_model("llama", tokenizer=tok)
    orig = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, init_lora_weights="pissa",
                     target_modules=["up_proj", "down_proj", "v_proj", "o_proj"])
    return get_peft_model(base, cfg), orig


def test_structural_similarity_of_pissa_matches_direct_computation():
    r = 4
    pm, orig = _pissa_model(r)
    table = structural_similarity(pm)
    assert len(table) == 3 * 4
    assert set(table["module"]) == {"up_proj", "down_proj", "v_proj", "o_proj"}
    for row in table.itertuples():
        w = orig[spec(pm.get_base_model()).param_name(row.layer, row.module)].double()
        s = torch.linalg.svdvals(w)
        # PiSSA's B A is the rank-r principal part of W: cos(BA, W) = ||S_r|| / ||S|| and the
        # residual is orthogonal to it.
        assert row.cos_ba_w == pytest.approx(float(s[:r].norm() / s.norm()), rel=1e-4)
        assert abs(row.cos_ba_residual) < 1e-4
        assert row.norm_w == pytest.approx(float(w.norm()), rel=1e-4)


def test_structural_cosines_pure():
    d, res = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    c_w, c_r = structural_cosines(d, res)
    assert c_w == pytest.approx(1 / math.sqrt(5)) and c_r == pytest.approx(0.0)
    with pytest.raises(PktError, match="shape"):
        structural_cosines(torch.zeros(2, 2), torch.zeros(2, 3))


def test_delta_stats_known_values():
    v = torch.tensor([-0.01, -0.004, -0.001, 0.0, 0.001, 0.002, 0.003, 0.006])
    st = delta_stats({"a": v[:3].reshape(3, 1), "b": v[3:]})
    assert st.n == 8 and st.min == pytest.approx(-0.01) and st.max == pytest.approx(0.006)
    assert st.share_within_0_002 == pytest.approx(4 / 8)  # -0.001, 0, 0.001, 0.002
    assert st.share_within_0_005 == pytest.approx(6 / 8)  # + -0.004, 0.003
    assert st.mean == pytest.approx(float(v.double().mean()))
    assert st.std == pytest.approx(float(v.double().std()))
    assert st.quantiles["q0.5"] == pytest.approx(0.0005)
    assert st.quantiles_exact
    row = st.as_row()
    assert row["q0.5"] == st.quantiles["q0.5"] and "quantiles" not in row


def test_delta_stats_subsampled_quantiles():
    x = torch.linspace(-1, 1, 200_001)
    st = delta_stats([x], max_samples=50_000)
    assert not st.quantiles_exact and st.n == 200_001
    assert st.quantiles["q0.5"] == pytest.approx(0.0, abs=0.02)
    assert st.quantiles["q0.05"] == pytest.approx(-0.9, abs=0.02)
    assert st.share_within_0_005 == pytest.approx(0.005, rel=0.01)  # exact, not subsampled


def test_delta_histogram_and_deltas():
    counts, edges = delta_histogram([torch.tensor([0.0, 0.5, 1.0, 1.0])], bins=2)
    assert counts.tolist() == [1.0, 3.0] and edges.tolist() == [0.0, 0.5, 1.0]
    tok = make_tokenizer()
    base, chat = make_model("llama", tokenizer=tok, seed=0), make_model("llama", tokenizer=tok, seed=1)
    d = sft_deltas(base, chat)
    assert set(d) == {(l, m) for l in range(3) for m in ("up_proj", "down_proj", "v_proj", "o_proj")}
    s = spec(base)
    assert torch.equal(d[(1, "up_proj")], s.weight(chat, 1, "up_proj") - s.weight(base, 1, "up_proj"))
    with pytest.raises(PktError, match="differ in shape"):
        sft_deltas(base, make_model("llama", tokenizer=tok, hidden_size=32))
    sk = seeking_deltas({(0, "up_proj"): torch.ones(2, 2), (0, "gate_proj"): torch.ones(2, 2)})
    assert list(sk) == [(0, "up_proj")]
    with pytest.raises(PktError, match="no extracted"):
        seeking_deltas({(0, "q_proj"): torch.ones(1)})
    # whole-matrix deltas go through pktlib.injection.apply_deltas: a copy with W += scale * delta
    both = apply_deltas(chat, {k: -v for k, v in d.items()}, scale=1.0)
    assert torch.equal(s.weight(both, 1, "up_proj"), s.weight(chat, 1, "up_proj") - d[(1, "up_proj")])
    assert torch.equal(s.weight(both, 1, "q_proj"), s.weight(chat, 1, "q_proj"))  # only the deltas' weights move
    half = apply_deltas(base, d, scale=0.5)
    torch.testing.assert_close(s.weight(half, 2, "o_proj"), s.weight(base, 2, "o_proj") + 0.5 * d[(2, "o_proj")])
    with pytest.raises(PktError, match="has shape"):
        apply_deltas(base, {(0, "up_proj"): torch.ones(2, 2)})


def test_unbiased_cka_is_translation_invariant_in_practice():
    """Identical representations with a common offset of 3e3: CKA 1 (0.866 before centring)."""
    x = _rand(n=40, d=12, seed=3)
    for unbiased in (False, True):
        assert linear_cka(x + 3e3, x + 3e3, unbiased=unbiased) == pytest.approx(1.0, abs=1e-9)
        assert linear_cka(x, x + 3e3, unbiased=unbiased) == pytest.approx(1.0, abs=1e-9)
        assert linear_cka(x + 3e3, _rand(n=40, d=7, seed=4) - 5e3, unbiased=unbiased) == pytest.approx(
            linear_cka(x, _rand(n=40, d=7, seed=4), unbiased=unbiased), abs=1e-9)
        grid = cka_grid([x + 3e3, x], [x - 7e3], unbiased=unbiased)
        assert torch.allclose(grid, torch.ones(2, 1, dtype=torch.float64), atol=1e-9)


# ---------------------------------------------------------------------------- statistics
def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 40.38) < 0.02 and abs(hi - 59.62) < 0.02
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and abs(hi - 27.75) < 0.02
    assert wilson_interval(0, 0) == (0.0, 100.0)


def test_paired_test_is_exact_mcnemar():
    # 7 questions only a gets right, 3 only b, 90 both or neither: p = 2 P(Bin(10, 1/2) <= 3) = 352/1024
    a = [True] * 7 + [False] * 3 + [True] * 40 + [False] * 50
    b = [False] * 7 + [True] * 3 + [True] * 40 + [False] * 50
    t = paired_test(a, b)
    assert (t.n, t.a_only, t.b_only) == (100, 7, 3)
    assert t.p_value == pytest.approx(352 / 1024)
    assert paired_test(b, a).p_value == pytest.approx(352 / 1024)  # symmetric
    assert paired_test([True] * 10, [False] * 10).p_value == pytest.approx(2 / 2 ** 10)
    assert paired_test([True] * 5, [False] * 5).p_value == pytest.approx(2 / 32)  # 5 vs 0 is not significant
    assert paired_test([True, False], [True, False]).p_value == 1.0  # no discordant question
    assert paired_test([True, False], [False, True]).p_value == 1.0  # capped, not 1.5
    with pytest.raises(PktError, match="same questions"):
        paired_test([True], [True, False])


def test_paired_difference_interval_is_agresti_min():
    # 3 questions only a got right, 1 only b, 6 agreed: half a question added to each cell, n + 2
    a = [True] * 3 + [False] + [True] * 3 + [False] * 3
    b = [False] * 3 + [True] + [True] * 3 + [False] * 3
    lo, hi = paired_difference_interval(a, b)
    diff, var = 2 / 12, (5 - 4 / 12) / 144
    assert (lo, hi) == (pytest.approx(100 * (diff - 1.959964 * var ** 0.5)),
                        pytest.approx(100 * (diff + 1.959964 * var ** 0.5)))
    assert lo < 20 < hi  # the raw difference, 2 of 10 questions
    assert paired_difference_interval(b, a) == (pytest.approx(-hi), pytest.approx(-lo))
    lo4, hi4 = paired_difference_interval(a * 4, b * 4)  # the same proportions on 4x the questions: narrower
    assert hi4 - lo4 < (hi - lo) * 0.6 and lo4 > 0
    # agreement everywhere: an interval around 0 that does not collapse; all discordant: clipped to 100
    lo0, hi0 = paired_difference_interval([True, False] * 10, [True, False] * 10)
    assert lo0 < 0 < hi0 and hi0 == pytest.approx(-lo0)
    assert paired_difference_interval([True] * 50, [False] * 50)[1] <= 100
    with pytest.raises(PktError, match="same questions for both systems: got 2 and 1"):
        paired_difference_interval([True, False], [True])
    with pytest.raises(PktError, match="at least one question"):
        paired_difference_interval([], [])


def test_several_module_types_in_one_pass_equal_one_pass_each():
    from pktlib.analysis.cka import module_representations

    tok = make_tokenizer()
    m = make_model("qwen2", tokenizer=tok)
    modules = ["up_proj", "o_proj", "residual", "v_proj"]
    together = module_representations(m, tok, TEXTS, modules, batch_size=3)
    assert list(together) == modules
    for mod in modules:
        torch.testing.assert_close(together[mod], layer_representations(m, tok, TEXTS, module=mod, batch_size=3))
    with pytest.raises(PktError, match="no module types"):
        module_representations(m, tok, TEXTS, [])
