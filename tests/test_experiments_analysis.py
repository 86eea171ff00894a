"""The analysis chapters' experiments: locating, CKA, structural similarity, delta ranges, a real model."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import PAIRS, make_model
from pktlib import attribution as A
from pktlib.errors import PktError
from pktlib.experiments import cka, deltas, locating, real_model, structural
from pktlib.postalign import lora_model


# ------------------------------------------------------------------------------ locating
def _attr(per_ffn: torch.Tensor, per_attn: torch.Tensor | None = None) -> A.Attribution:
    """An Attribution from per-example FFN scores (E, L, N); attention scores default to the same."""
    per_attn = per_ffn if per_attn is None else per_attn
    return A.Attribution(ffn=per_ffn.sum(0), attn=per_attn.sum(0), ffn_layers=per_ffn.sum((0, 2)),
                         attn_layers=per_attn.sum((0, 2)), targets=torch.arange(per_ffn.shape[0]),
                         ffn_per_example=per_ffn, attn_per_example=per_attn)


def test_depth_share_and_top_share():
    assert locating.depth_share(torch.tensor([0.0, 1.0, 3.0])) == 1.0  # upper half: layers 1, 2
    assert locating.depth_share(torch.tensor([2.0, -1.0, 2.0, 0.0])) == 0.5  # negatives do not count
    assert math.isnan(locating.depth_share(torch.tensor([5.0])))  # one layer: no upper half
    assert math.isnan(locating.depth_share(torch.tensor([-1.0, -2.0])))
    scores = torch.zeros(2, 100)
    scores[0, 0], scores[1, 1:] = 99.0, 1.0 / 99  # one neuron holds 99 of 100
    assert locating.top_share(scores, 0.005) == pytest.approx(0.99)
    assert math.isnan(locating.top_share(-torch.ones(3, 3)))


def test_layer_profiles_and_summary():
    per = torch.zeros(2, 2, 3)
    per[:, 1, 0] = 2.0  # all the mass in layer 1
    attr = {("pocket-math", "teacher"): _attr(per)}
    assert locating.layer_profiles(attr) == {"pocket-math/teacher": {"ffn": [0.0, 2.0], "attn": [0.0, 2.0]}}
    (row,) = locating.layer_summary(attr)
    assert row["best FFN layer"] == 1 and row["FFN mass in upper half"] == 1.0
    assert row["FFN total / attention total"] == pytest.approx(1.0)
    text = locating.upper_half_reading(pd.DataFrame([row]), ["teacher"])
    assert "100% of the teacher's positive FFN layer score lies in the upper half" in text and "as in the paper" in text


def test_stability_identical_and_disjoint_examples():
    same = torch.zeros(3, 2, 10)
    same[:, :, :2] = 1.0  # every example: the same top-2 in every layer
    s = locating.stability(_attr(same), "ffn", 2)
    assert s.jaccard.tolist() == [1.0, 1.0] and s.recall_of_summed_topk.tolist() == [1.0, 1.0]
    assert s.chance == pytest.approx(2 / 18) and s.k == 2
    apart = torch.zeros(2, 1, 10)
    apart[0, 0, :2], apart[1, 0, 5:7] = 1.0, 1.0  # disjoint top-2 sets
    s = locating.stability(_attr(apart), "ffn", 2)
    assert s.jaccard.tolist() == [0.0]
    stab = locating.stability_metrics({"teacher": _attr(same)}, 2)
    assert set(stab) == {"teacher/ffn", "teacher/attn"}
    table = locating.stability_table(stab)
    assert table.loc["teacher/ffn", "x chance"] == pytest.approx(9.0)
    with pytest.raises(PktError, match="pairs of examples"):
        locating.stability(_attr(same[:1]), "ffn", 2)


def test_normaliser_agreement_and_target_tokens(tokenizer):
    per = torch.rand(2, 3, 8, generator=torch.Generator().manual_seed(0))
    a = _attr(per)
    agree = locating.normaliser_agreement(a, a, k=3, n_layers=2)
    assert agree["ffn"] == [1.0, 1.0, 1.0] and agree["same_top_layers"] is True
    flipped = _attr(-per)
    assert locating.normaliser_agreement(a, flipped, k=3, n_layers=2)["ffn"] != [1.0, 1.0, 1.0]
    ids = tokenizer("7 7 Paris")["input_ids"]
    b = A.Attribution(ffn=a.ffn, attn=a.attn, ffn_layers=a.ffn_layers, attn_layers=a.attn_layers,
                      targets=torch.tensor([ids[0], ids[0], ids[-1]]))
    tokens = locating.target_tokens({"pocket-math": b}, tokenizer)
    assert list(tokens["pocket-math"].values()) == [2, 1]


def test_attribute_families_on_a_tiny_model(tokenizer):
    model = make_model("llama", tokenizer=tokenizer, n_layers=2)
    small = make_model("llama", tokenizer=tokenizer, n_layers=1, seed=4)
    both = locating.attribute_families({"teacher": (model, tokenizer), "student": (small, tokenizer)},
                                       {"a": PAIRS, "b": PAIRS[:1]})
    assert list(both) == [("a", "teacher"), ("a", "student"), ("b", "teacher"), ("b", "student")]
    assert both["b", "student"].n_examples == 1 and both["a", "student"].n_layers == 1
    attr = both["a", "teacher"]
    assert torch.equal(attr.ffn, A.attribute(model, tokenizer, PAIRS, progress=False).ffn)


# ------------------------------------------------------------------------------ CKA
def test_aligned_teacher_layer_matches_relative_depth():
    assert [cka.aligned_teacher_layer(j, 6, 2) for j in range(2)] == [1, 4]
    assert [cka.aligned_teacher_layer(j, 4, 4) for j in range(4)] == [0, 1, 2, 3]
    with pytest.raises(PktError):
        cka.aligned_teacher_layer(2, 6, 2)


def test_summary_row_reads_the_grids():
    ts = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.1, 0.8]], dtype=torch.float64)  # (L_T=3, L_S=2)
    tt = torch.eye(3, dtype=torch.float64) * 0.5 + 0.5
    row = cka.summary_row(ts, tt)
    # student layer 0 -> teacher layer 0 (0.9), student layer 1 -> teacher layer 2 (0.8)
    assert row["same relative depth (mean)"] == pytest.approx(0.85)
    assert row["same depth, lower half"] == pytest.approx(0.9) and row["same depth, upper half"] == pytest.approx(0.8)
    assert row["best teacher match (mean over student layers)"] == pytest.approx(0.85)
    assert row["teacher-teacher diagonal (min)"] == 1.0 and row["teacher-teacher off-diagonal (mean)"] == 0.5


def test_module_cka_teacher_with_itself_and_reading(tokenizer):
    teacher = make_model("llama", tokenizer=tokenizer, n_layers=3, seed=1)
    student = make_model("llama", tokenizer=tokenizer, n_layers=2, hidden_size=32, intermediate_size=48, seed=2)
    texts = [p + a for p, a in PAIRS] + ["def f(x):\n    return x", "So the answer is 12."]
    res = cka.module_cka((teacher, tokenizer), (student, tokenizer), texts, ["up_proj", "o_proj"])
    assert res.teacher_student["up_proj"].shape == (3, 2) and res.teacher_teacher["o_proj"].shape == (3, 3)
    assert torch.allclose(torch.diagonal(res.teacher_teacher["up_proj"]), torch.ones(3, dtype=torch.float64))
    assert list(res.summary.index) == ["up_proj", "o_proj"]
    text = cka.reading(res.summary)
    assert text.count("* **") == 2 and "The sanity diagonal is 1.000000" in text


# ------------------------------------------------------------------------------ structural similarity
def test_structural_table_pissa_is_orthogonal_to_its_residual(tokenizer):
    student = make_model("llama", tokenizer=tokenizer, n_layers=2)
    models = {"PiSSA": lora_model((student, tokenizer), init="pissa", r=4, alpha=4, progress=False)}
    table = structural.structural_table(models)
    assert set(table.init) == {"PiSSA"} and len(table) == 2 * 4
    assert table.cos_ba_residual.abs().max() < 1e-6 and (table.cos_ba_w > 0).all()
    summary = structural.structural_summary(table)
    assert list(summary.columns) == [("cos_ba_w", "PiSSA"), ("cos_ba_residual", "PiSSA")]
    two = pd.concat([table, table.assign(init="Seeking", cos_ba_w=0.01, cos_ba_residual=-0.5)])
    assert "Seeking's has 0.010 with the original weight and -0.500 with the residual" in structural.reading(two)


# ------------------------------------------------------------------------------ delta ranges
def test_delta_stats_histograms_and_variants(tokenizer):
    base = make_model("llama", tokenizer=tokenizer, n_layers=2, seed=3)
    chat = make_model("llama", tokenizer=tokenizer, n_layers=2, seed=3)
    with torch.no_grad():
        for p in chat.parameters():
            p.add_(0.001 * torch.randn_like(p))
    from pktlib.analysis.deltas import delta_stats, sft_deltas

    sft = sft_deltas(base, chat)
    seek = {k: 0.2 * torch.randn_like(v) for k, v in sft.items()}
    sources = {deltas.SFT_TEACHER: sft, deltas.SFT_STUDENT: sft, deltas.SEEKING: seek}
    stats = deltas.stats_table(sources, ["up_proj", "o_proj"])
    assert len(stats) == 3 * 3 and set(deltas.STAT_COLUMNS) <= set(stats.columns)
    sft_all = stats[(stats.source == deltas.SFT_STUDENT) & (stats.module == "all")].iloc[0]
    assert sft_all["share_within_0_005"] > 0.99 and sft_all["n"] == sum(v.numel() for v in sft.values())
    lo, hi = deltas.common_range(sources)
    assert lo == min(float(v.min()) for v in seek.values()) and hi == max(float(v.max()) for v in seek.values())
    hists = deltas.histograms(sources, ["up_proj"], bins=11)
    counts, edges = hists["up_proj"][deltas.SEEKING]
    assert counts.shape == (11,) and float(edges[0]) == lo
    assert int(counts.sum()) == sum(v.numel() for k, v in seek.items() if k[1] == "up_proj")
    variants, scale = deltas.injection_variants((chat, tokenizer), (base, tokenizer), sources)
    assert scale == pytest.approx(delta_stats(sft).std / delta_stats(seek).std)
    assert list(variants)[:2] == ["student-chat", "student-base"]
    assert deltas.sft_roundtrip(variants["student-base + own SFT delta"][0], chat, sft) < 1e-6
    assert deltas.sft_roundtrip(base, chat, sft) > 1e-4
    scores = deltas.score_variants({"student-chat": (chat, tokenizer)}, "pocket-knowledge", limit=2)
    assert scores.loc[0, "n"] == 2 and 0 <= scores.loc[0, "ci95_low"] <= scores.loc[0, "score"] <= scores.loc[0, "ci95_high"]
    scores = pd.DataFrame({"model": ["student-chat", "student-chat + Seeking (unaligned)",
                                     "student-chat + Seeking rescaled to SFT std"], "score": [40.0, 5.0, 39.0]})
    text = deltas.reading(stats, scores, task="pocket-math", limit=60)
    assert "move the student from 40.0 to 5.0 on pocket-math (60 test examples)" in text


# ------------------------------------------------------------------------------ a real model
def test_smollm2_gguf_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(real_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PktError, match="SmolLM2 is not installed"):
        real_model.smollm2_gguf()


def test_real_model_tables_on_a_tiny_model(tokenizer):
    model = make_model("llama", tokenizer=tokenizer, n_layers=2)
    pairs = [("The capital of France is", " Paris"), ("3 + 4 =", " 7")]
    pred = real_model.next_token_table(model, tokenizer, pairs)
    with torch.no_grad():
        probs = model(**tokenizer(pairs[0][0], return_tensors="pt")).logits[0, -1].softmax(-1)
    target = tokenizer(pairs[0][0] + pairs[0][1])["input_ids"][-1]
    assert pred.loc[0, "p(answer token)"] == pytest.approx(float(probs[target]), rel=1e-5)
    assert pred.loc[0, "top-5 predictions"].count(",") == 4
    attr = A.attribute(model, tokenizer, pairs, per_example=True, progress=False)
    top = real_model.top_neuron_table(model, tokenizer, attr, pairs, per_prompt=2, n_tokens=3)
    assert list(top["rank"]) == [1, 2, 1, 2] and top["top tokens"].str.count("'").ge(6).all()
    assert list(top["answer token"]) == [tokenizer.decode([tokenizer(p + a)["input_ids"][-1]]) for p, a in pairs
                                          for _ in range(2)]
    for _, row in top.iterrows():  # the flag says whether the scored token is among the neuron's top tokens
        toks = [t.strip().lower() for t, _ in real_model.top_tokens(model, tokenizer, row.layer, "ffn", row.neuron, k=3)]
        assert row["promotes answer token"] == (row["answer token"].strip().lower() in toks)
    hits = real_model.answer_hits(top.assign(**{"promotes answer token": [True, False, False, True]}))
    assert list(hits.index) == [0, 3]
    signed = real_model.signed_neuron_table(model, tokenizer, pairs, top, n_tokens=3)
    assert len(signed) == 4 and signed["answer rank in c*w"].between(1, len(tokenizer)).all()
    # a neuron's coefficient times its column, unembedded, ranks the answer where the table says
    lens = A.LogitLens.of(model)
    r = signed.iloc[0]
    s = __import__("pktlib.models", fromlist=["spec"]).spec(model)
    u = lens.directions(s.weight(model, int(r["layer"]), "down_proj").detach()[:, [int(r["neuron"])]])[:, 0]
    u = u * r["coefficient"]
    ids = tokenizer(A.scored_text(*pairs[0]))["input_ids"]
    assert int((u > u[ids[-1]]).sum()) + 1 == r["answer rank in c*w"]
