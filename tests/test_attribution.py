"""Tests of pktlib.attribution against a direct, slow implementation of DESIGN.md 4.2.

The reference below shares nothing with the library but the definition: it runs a float64
copy of the model on one example at a time (no padding), reads layer inputs from
``output_hidden_states``, attention/FFN outputs from the ``self_attn``/``mlp`` modules (not
``o_proj``/``down_proj`` outputs), rebuilds h_L from the residual stream, and scores one neuron
at a time with a full softmax over the vocabulary.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_model
from pktlib import attribution as A
from pktlib import lens as L
from pktlib.analysis import inspection
from pktlib.errors import PktError
from pktlib.hooks import capture
from pktlib.models import spec

PAIRS = [
    ("<|user|>\nWhat is the capital of France?\n\n<|assistant|>\n", "The answer is: Paris."),
    ("Answer the following question. Question: 3 + 4 = ?", " So the answer is 7.\n"),
    ("def add(a, b):", "\n    return a + b)\n"),
    ("Tom has 12 apples", " and gives 5 away, so he has 12 - 5 = 7 apples left. "),
    ("<|user|>\nThe following are multiple choice questions (with answers).\nA. one\nB. two\n\n<|assistant|>\n",
     'The answer is: B"]'),
]


# ------------------------------------------------------------------------ the slow reference


def reference(model, tokenizer, pairs, normaliser="rms", attn_coefficient="summed"):
    """Per-example scores by the definition: dict of (E, L, N), (E, L, A), (E, L), (E, L).

    ``attn_coefficient="original"``: the attention neuron's coefficient is the original code's
    self term, head h's attention weight from the last position to itself times that
    position's value vector (read from eager attention weights and v_proj's output).
    """
    m = copy.deepcopy(model).double()
    if attn_coefficient == "original":
        m.set_attn_implementation("eager")
    s = spec(m)
    L = s.n_layers
    E = m.lm_head.weight  # (V, d)
    g = m.model.norm.weight

    def logp(v, rho, t):  # full softmax, one vector at a time
        return torch.log_softmax(E @ (g * v / rho), -1)[t]

    out = {"ffn": [], "attn": [], "ffn_layers": [], "attn_layers": []}
    for prompt, answer in pairs:
        while answer and answer[-1] in ['.', '"', ' ', ')', '\n', ',', ']']:
            answer = answer[:-1]
        ids = tokenizer(prompt + answer)["input_ids"]
        t = ids[-1]
        inp = torch.tensor([ids[:-1]])
        attn_mods = {f"a{l}": getattr(m.model.layers[l], "self_attn") for l in range(L)}
        mlp_mods = {f"m{l}": getattr(m.model.layers[l], "mlp") for l in range(L)}
        o_mods = {f"o{l}": m.model.layers[l].self_attn.o_proj for l in range(L)}
        d_mods = {f"d{l}": m.model.layers[l].mlp.down_proj for l in range(L)}
        v_mods = {f"v{l}": m.model.layers[l].self_attn.v_proj for l in range(L)}
        with torch.no_grad(), capture(m, {**attn_mods, **mlp_mods, **v_mods}) as outs, \
                capture(m, {**o_mods, **d_mods}, what="input") as ins:
            res = m(inp, output_hidden_states=True, output_attentions=attn_coefficient == "original")
            hs = res.hidden_states
        x = [hs[l][0, -1] for l in range(L)]
        a_out = [outs[f"a{l}"][0, -1] for l in range(L)]
        f_out = [outs[f"m{l}"][0, -1] for l in range(L)]
        for l in range(L - 1):  # the residual stream the definition assumes
            torch.testing.assert_close(x[l] + a_out[l] + f_out[l], x[l + 1])
        h = x[-1] + a_out[-1] + f_out[-1]
        if normaliser == "rms":
            rho = torch.sqrt((h ** 2).mean() + s.norm_eps)
        else:  # the original code: divide by sqrt(std + 1e-6), std = sqrt(var + 1e-5)
            rho = torch.sqrt(torch.sqrt(h.var(unbiased=False) + 1e-5) + 1e-6)
        ffn = torch.zeros(L, s.intermediate_size, dtype=torch.float64)
        attn = torch.zeros(L, s.attn_size, dtype=torch.float64)
        ffn_l = torch.zeros(L, dtype=torch.float64)
        attn_l = torch.zeros(L, dtype=torch.float64)
        with torch.no_grad():
            for l in range(L):
                r = x[l] + a_out[l]
                c_f, c_a = ins[f"d{l}"][0, -1], ins[f"o{l}"][0, -1]
                if attn_coefficient == "original":
                    w = res.attentions[l][0, :, -1, -1]  # (H,) a[h, T, T]
                    v = outs[f"v{l}"][0, -1].view(s.n_kv_heads, s.head_dim)
                    c_a = (w[:, None] * v.repeat_interleave(s.n_heads // s.n_kv_heads, 0)).reshape(-1)
                W_d = m.model.layers[l].mlp.down_proj.weight
                W_o = m.model.layers[l].self_attn.o_proj.weight
                base_r, base_x = logp(r, rho, t), logp(x[l], rho, t)
                for i in range(s.intermediate_size):
                    ffn[l, i] = logp(r + c_f[i] * W_d[:, i], rho, t) - base_r
                for j in range(s.attn_size):
                    attn[l, j] = logp(x[l] + c_a[j] * W_o[:, j], rho, t) - base_x
                ffn_l[l] = logp(r + f_out[l], rho, t) - base_r
                attn_l[l] = base_r - base_x
        for k, v in zip(out, (ffn, attn, ffn_l, attn_l)):
            out[k].append(v)
    return {k: torch.stack(v).float() for k, v in out.items()}


def assert_rel(actual, expected, rel=1e-4, what=""):
    """Max abs error at most ``rel`` of the largest reference value, and element-wise close."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * max|ref| {scale:.3g}"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# ------------------------------------------------------------------------ attribution


@pytest.fixture(scope="module")
def models(tokenizer):
    return {arch: make_model(arch, tokenizer=tokenizer) for arch in ("llama", "qwen2", "mistral")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_matches_slow_reference(models, tokenizer, arch):
    model = models[arch]
    ref = reference(model, tokenizer, PAIRS)
    # small chunk_size: several U chunks and several example blocks per chunk
    got = A.attribute(model, tokenizer, PAIRS, per_example=True, batch_size=3, chunk_size=40)
    for k in ("ffn", "attn", "ffn_layers", "attn_layers"):
        assert_rel(getattr(got, k), ref[k].sum(0), what=f"{arch} summed {k}")
        assert_rel(getattr(got, f"{k}_per_example"), ref[k], what=f"{arch} per-example {k}")
    assert got.n_examples == len(PAIRS)
    # scores are not trivially zero: the comparison above means something
    assert got.ffn.abs().max() > 1e-2 and got.attn.abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_u_close_to_reference(models, tokenizer, arch, tmp_path):
    """u_dtype="bfloat16" rounds U = E diag(g) W to 8 significant bits: the scores stay within a
    few 1e-3 of the largest one, the best neurons are the same, layer scores are untouched, and
    the setting travels with the saved attribution."""
    model = models[arch]
    ref = reference(model, tokenizer, PAIRS)
    exact = A.attribute(model, tokenizer, PAIRS, chunk_size=40)
    low = A.attribute(model, tokenizer, PAIRS, chunk_size=40, u_dtype="bfloat16")
    assert low.u_dtype == "bfloat16" and exact.u_dtype == "float32"
    for k in ("ffn", "attn"):
        assert not torch.equal(getattr(low, k), getattr(exact, k)), f"{k}: bfloat16 U changed nothing"
        assert_rel(getattr(low, k), ref[k].sum(0), rel=2e-2, what=f"{arch} bfloat16 {k}")
        best_ref = set(ref[k].sum(0).flatten().topk(10).indices.tolist())
        assert len(best_ref & set(getattr(low, k).flatten().topk(10).indices.tolist())) >= 8
    for k in ("ffn_layers", "attn_layers"):  # no U in layer scores
        torch.testing.assert_close(getattr(low, k), getattr(exact, k))
    back = A.load_attribution(A.save_attribution(low, tmp_path / "a.safetensors"))
    assert back.u_dtype == "bfloat16" and A.load_attribution(
        A.save_attribution(exact, tmp_path / "b.safetensors")).u_dtype == "float32"
    with pytest.raises(PktError, match="u_dtype must be one of"):
        A.attribute(model, tokenizer, PAIRS, u_dtype="float16")


def test_original_normaliser_matches_reference(models, tokenizer):
    model = models["qwen2"]
    ref = reference(model, tokenizer, PAIRS[:2], normaliser="original")
    got = A.attribute(model, tokenizer, PAIRS[:2], normaliser="original")
    for k in ("ffn", "attn", "ffn_layers", "attn_layers"):
        assert_rel(getattr(got, k), ref[k].sum(0), what=f"original {k}")
    rms = A.attribute(model, tokenizer, PAIRS[:2])
    assert not torch.allclose(rms.ffn, got.ffn, rtol=1e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_original_attention_coefficient_matches_reference(models, tokenizer, arch):
    model = models[arch]
    before = model.config._attn_implementation
    ref = reference(model, tokenizer, PAIRS[:3], attn_coefficient="original")
    got = A.attribute(model, tokenizer, PAIRS[:3], per_example=True, batch_size=2, attn_coefficient="original")
    assert got.attn_coefficient == "original"
    for k in ("ffn", "attn", "ffn_layers", "attn_layers"):
        assert_rel(getattr(got, f"{k}_per_example"), ref[k], what=f"{arch} original-coefficient {k}")
    summed = A.attribute(model, tokenizer, PAIRS[:3], per_example=True)
    assert not torch.allclose(summed.attn, got.attn, rtol=1e-2)  # only the attention neurons change
    assert_rel(summed.ffn, got.ffn, rel=1e-4, what="ffn under either coefficient")
    assert model.config._attn_implementation == before  # the model's attention is restored
    with pytest.raises(PktError, match="unknown attn_coefficient 'last'"):
        A.attribute(model, tokenizer, PAIRS[:1], attn_coefficient="last")


def test_padding_invariance(models, tokenizer):
    model = models["qwen2"]
    batched = A.attribute(model, tokenizer, PAIRS, per_example=True, batch_size=8)
    for i, pair in enumerate(PAIRS):
        alone = A.attribute(model, tokenizer, [pair])
        for k in ("ffn", "attn", "ffn_layers", "attn_layers"):
            b = getattr(batched, f"{k}_per_example")[i]
            scale = b.abs().max().item()
            torch.testing.assert_close(b, getattr(alone, k), rtol=1e-5, atol=1e-5 * scale)
    # and the order of the pairs follows the input, whatever the internal length sorting
    rev = A.attribute(model, tokenizer, PAIRS[::-1], per_example=True, batch_size=2)
    torch.testing.assert_close(rev.ffn_per_example, batched.ffn_per_example.flip(0), rtol=1e-5, atol=1e-5)


def test_target_and_stripping(tokenizer):
    assert A.scored_text("Q: ", 'The answer is: B."]) \n') == "Q: The answer is: B"
    assert A.scored_text("P", "x. y.") == "Px. y"
    seqs = A._encode(tokenizer, [("Q: ", "Paris.")])
    assert seqs[0] == tokenizer("Q: Paris")["input_ids"]


def test_bad_input(models, tokenizer):
    m = models["llama"]
    with pytest.raises(PktError, match="normaliser"):
        A.attribute(m, tokenizer, PAIRS, normaliser="std")
    with pytest.raises(PktError, match="empty"):
        A.attribute(m, tokenizer, [("prompt", ' ."\n')])
    with pytest.raises(PktError, match="at least one"):
        A.attribute(m, tokenizer, [])
    with pytest.raises(PktError, match="pair 0"):
        A.attribute(m, tokenizer, ["just a string"])


def _lens_scores_direct(lens, base, coeffs, W, rho, t):
    """Float64, one neuron at a time, full log-softmax each time."""
    E, g = lens.E.double(), lens.g.double()
    out = torch.empty(coeffs.shape, dtype=torch.float64)
    for b in range(base.shape[0]):
        lp0 = torch.log_softmax(E @ (g * base[b].double() / rho[b].double()), -1)[t[b]]
        for i in range(W.shape[1]):
            v = base[b].double() + coeffs[b, i].double() * W[:, i].double()
            out[b, i] = torch.log_softmax(E @ (g * v / rho[b].double()), -1)[t[b]] - lp0
    return out


def test_lens_scores_large_steps_and_safe_path(monkeypatch):
    """Neurons that move logits by hundreds take the exact max-shift path; results still exact."""
    torch.manual_seed(1)
    V, d, N, B = 40, 6, 17, 3
    lens = L.LogitLens(E=torch.randn(V, d), g=torch.rand(d) + 0.5)
    base, W = torch.randn(B, d), torch.randn(d, N)
    coeffs = torch.randn(B, N) * torch.logspace(-2, 3, N)  # up to |a U| of several hundred
    rho, t = torch.rand(B) + 0.5, torch.randint(0, V, (B,))
    expect = _lens_scores_direct(lens, base, coeffs, W, rho, t).float()
    got = L.lens_scores(lens, base, coeffs, W, rho, t, chunk_size=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4 * expect.abs().max().item())
    monkeypatch.setattr(L, "_SAFE_EXP2", 0.0)  # every pair through the exact path
    torch.testing.assert_close(L.lens_scores(lens, base, coeffs, W, rho, t, chunk_size=8), got,
                               rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    monkeypatch.setattr(L, "_SAFE_EXP2", float("inf"))  # none: large steps would overflow 2^x
    assert not torch.isfinite(L.lens_scores(lens, base, coeffs, W, rho, t, chunk_size=8)).all()


def test_lens_scores_chunking_invariant():
    torch.manual_seed(0)
    V, d, N, B = 50, 8, 23, 4
    lens = L.LogitLens(E=torch.randn(V, d), g=torch.rand(d) + 0.5)
    base, coeffs, W = torch.randn(B, d), torch.randn(B, N) * 3, torch.randn(d, N)
    rho, t = torch.rand(B) + 0.5, torch.randint(0, V, (B,))
    full = L.lens_scores(lens, base, coeffs, W, rho, t, chunk_size=1000)
    for cs in (1, 5, 23):
        torch.testing.assert_close(L.lens_scores(lens, base, coeffs, W, rho, t, chunk_size=cs), full)
    # direct check of one entry
    z0 = (base[2] * lens.g / rho[2]) @ lens.E.T
    z1 = ((base[2] + coeffs[2, 7] * W[:, 7]) * lens.g / rho[2]) @ lens.E.T
    expect = torch.log_softmax(z1, -1)[t[2]] - torch.log_softmax(z0, -1)[t[2]]
    torch.testing.assert_close(full[2, 7], expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ selection


def test_top_layers_order_and_ties():
    s = torch.tensor([0.5, 2.0, -1.0, 2.0, 0.7])
    assert A.top_layers(s, 2) == [1, 3]
    assert A.top_layers(s, 3) == [1, 3, 4]  # ascending, not by score
    assert A.top_layers(s, 1) == [1]  # tie between 1 and 3: lower index wins
    assert A.top_layers(s, 5) == [0, 1, 2, 3, 4]
    assert A.top_layers(s, 99) == [0, 1, 2, 3, 4]
    with pytest.raises(PktError):
        A.top_layers(s, 0)


def test_top_neurons_order_and_ties():
    s = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 5.0, 1.0]])
    assert A.top_neurons(s, 3).tolist() == [[1, 2, 0], [2, 3, 0]]  # descending; ties by index
    assert A.top_neurons(s[1], 2).tolist() == [2, 3]
    assert A.top_neurons(s, 1).dtype == torch.long
    with pytest.raises(PktError, match="k=5"):
        A.top_neurons(s, 5)


def test_select_uses_each_kinds_layer_scores():
    L, N, M = 4, 6, 5
    attr = A.Attribution(
        ffn=torch.arange(L * N, dtype=torch.float32).reshape(L, N).flip(1),
        attn=torch.arange(L * M, dtype=torch.float32).reshape(L, M),
        ffn_layers=torch.tensor([3.0, 1.0, 2.0, 0.0]),
        attn_layers=torch.tensor([0.0, 1.0, 2.0, 3.0]),
    )
    sel = A.select(attr, n_layers=2, k_ffn=3, k_attn=2)
    assert sel.ffn_layers == [0, 2] and sel.attn_layers == [2, 3]
    assert sel.ffn_neurons.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert sel.attn_neurons.tolist() == [[4, 3], [4, 3]]
    assert sel.ffn_neurons.shape == (2, 3) and sel.attn_neurons.shape == (2, 2)


def test_selection_v_rows_gqa(models):
    s = spec(models["qwen2"])  # 4 query heads share 2 key/value heads, head_dim 16
    sel = A.Selection([0], [0], torch.zeros(1, 1, dtype=torch.long), torch.tensor([[0, 16, 33, 63]]))
    # head 0 -> kv 0, head 1 -> kv 0, head 2 -> kv 1, head 3 -> kv 1
    assert sel.attn_v_rows(s).tolist() == [[0, 0, 16 + 1, 16 + 15]]


def test_layer_budget(tokenizer):
    teacher = spec(make_model("llama", tokenizer=tokenizer, n_layers=4, hidden_size=64, intermediate_size=128))
    student = spec(make_model("qwen2", tokenizer=tokenizer, n_layers=3, hidden_size=32, intermediate_size=96,
                              n_heads=4, num_key_value_heads=2))
    assert A.layer_budget(teacher, student, 0.1) == (3, 9, 3)  # floor(9.6), floor(3.2)
    with pytest.raises(PktError, match="teacher has"):
        A.layer_budget(student, teacher, 1.0)
    shallow = spec(make_model("llama", tokenizer=tokenizer, n_layers=2, intermediate_size=128))
    assert A.layer_budget(shallow, student, 0.25)[0] == 2  # all teacher layers if fewer
    with pytest.raises(PktError, match="transfer_rate"):
        A.layer_budget(teacher, student, 0.0)


# ------------------------------------------------------------------------ inspection and files


def test_top_tokens(models, tokenizer):
    m = models["qwen2"]
    got = inspection.top_tokens(m, tokenizer, 1, "ffn", 5, k=4)
    v = m.lm_head.weight @ (m.model.norm.weight * m.model.layers[1].mlp.down_proj.weight[:, 5])
    vals, ids = v.topk(4)
    assert [t for t, _ in got] == [tokenizer.decode([int(i)]) for i in ids]
    assert [x for _, x in got] == pytest.approx(vals.tolist(), rel=1e-5)
    many = inspection.top_tokens(m, tokenizer, 2, "attn", [0, 17], k=3)
    w = m.lm_head.weight @ (m.model.norm.weight * m.model.layers[2].self_attn.o_proj.weight[:, 17])
    assert [x for _, x in many[1]] == pytest.approx(w.topk(3).values.tolist(), rel=1e-5)
    with pytest.raises(PktError, match="out of range"):
        inspection.top_tokens(m, tokenizer, 0, "attn", 64)
    with pytest.raises(PktError, match="kind"):
        inspection.top_tokens(m, tokenizer, 0, "mlp", 0)


def test_carriers(models, tokenizer):
    a = A.attribute(models["llama"], tokenizer, PAIRS[:3], per_example=True)
    top = inspection.carriers(a, 1, kind="attn", k=5)
    per = a.attn_per_example[1]
    assert [s for *_, s in top] == pytest.approx(per.flatten().topk(5).values.tolist())
    for l, j, sc in top:
        assert per[l, j].item() == pytest.approx(sc)
    only = inspection.carriers(a, kind="ffn", k=3, layers=[2])
    assert all(l == 2 for l, _, _ in only)
    summed_only = A.Attribution(a.ffn, a.attn, a.ffn_layers, a.attn_layers)
    with pytest.raises(PktError, match="per-example"):
        inspection.carriers(summed_only, 0)


def test_save_load_roundtrip(models, tokenizer, tmp_path):
    a = A.attribute(models["mistral"], tokenizer, PAIRS[:2], per_example=True)
    p = A.save_attribution(a, tmp_path / "s.safetensors", {"task": "x"})
    b = A.load_attribution(p)
    for k, v in a.tensors().items():
        torch.testing.assert_close(getattr(b, k), v)
    assert not list(tmp_path.glob(".*tmp"))


def test_cli_attribute(tiny_dir, tmp_path, pkt):
    task = tmp_path / "task.jsonl"
    rows = [{"messages": [{"role": "user", "content": p.strip()}, {"role": "assistant", "content": a}]}
            for p, a in PAIRS]
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "scores.safetensors"
    code, _, err = pkt("attribute", tiny_dir, "--task", task, "--limit", 3, "--out", out, "--per-example")
    assert code == 0, err
    a = A.load_attribution(out)
    assert a.ffn.shape == (3, 96) and a.attn.shape == (3, 64) and a.n_examples == 3
    assert a.ffn_per_example.shape == (3, 3, 96)
    torch.testing.assert_close(a.ffn, a.ffn_per_example.sum(0), rtol=1e-5, atol=1e-5)
    code, _, err = pkt("attribute", tiny_dir, "--task", task, "--normaliser", "x")
    assert code == 1 and "normaliser" in err


def test_bfloat16_model_runs_in_float32(models, tokenizer):
    """A bf16 model is read out in float32: scores finite and close to the float32 model's."""
    m32 = models["llama"]
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    a32 = A.attribute(m32, tokenizer, PAIRS[:2])
    a16 = A.attribute(m16, tokenizer, PAIRS[:2])
    assert a16.ffn.dtype == torch.float32 and torch.isfinite(a16.ffn).all()
    corr = torch.corrcoef(torch.stack([a32.ffn.flatten(), a16.ffn.flatten()]))[0, 1]
    assert corr > 0.9, f"bf16 and fp32 FFN scores correlate only {corr:.3f}"


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_layer_restricted_scores_equal_the_full_call(models, tokenizer, arch):
    model = models[arch]
    full = A.attribute(model, tokenizer, PAIRS, per_example=True, chunk_size=40)
    part = A.attribute(model, tokenizer, PAIRS, per_example=True, chunk_size=40, layers=[1])
    L = full.n_layers
    assert part.scored_layers("ffn") == part.scored_layers("attn") == [1]
    for k in ("ffn", "attn", "ffn_per_example", "attn_per_example"):
        got, ref = getattr(part, k), getattr(full, k)
        torch.testing.assert_close(got[..., 1, :], ref[..., 1, :])
        others = [l for l in range(L) if l != 1]
        assert got[..., others, :].isnan().all(), f"{k}: unscored layers must be NaN"
    for k in ("ffn_layers", "attn_layers", "ffn_layers_per_example", "attn_layers_per_example"):
        torch.testing.assert_close(getattr(part, k), getattr(full, k))  # layer scores: every layer
    # a selection or an inspection can not silently rank the NaNs of the layers left out
    with pytest.raises(PktError, match="did not compute"):
        A.select(part, n_layers=L, k_ffn=2, k_attn=2)
    with pytest.raises(PktError, match=r"layers \[0\]"):
        inspection.carriers(part, kind="ffn", layers=[0, 1])
    assert {l for l, _, _ in inspection.carriers(part, kind="ffn", k=4)} == {1}
    with pytest.raises(PktError, match="out of range"):
        A.attribute(model, tokenizer, PAIRS[:1], layers=[L])


def test_locate_layers_scores_the_best_layers_exactly(models, tokenizer):
    model = models["qwen2"]
    full = A.attribute(model, tokenizer, PAIRS, chunk_size=40)
    for kind in ("ffn", "attn"):
        got = A.locate_layers(model, tokenizer, PAIRS, 1, kind=kind, chunk_size=40)
        best = A.top_layers(full.layer_scores(kind), 1)
        assert got.scored_layers(kind) == best
        torch.testing.assert_close(got.scores(kind)[best], full.scores(kind)[best])
    with pytest.raises(PktError, match="picks the layers"):
        A.locate_layers(model, tokenizer, PAIRS, 1, layers=[0])
