"""Specialist teachers (pktlib.zoo.specialist) and the stronger-source experiment (pktlib.experiments.specialist)."""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pktlib import plots, zoo
from pktlib.data import load_task
from pktlib.errors import PktError
from pktlib.experiments import specialist as sx
from pktlib.models import load_model
from pktlib.zoo.build import chat_batches
from pktlib.data.suite import fresh_examples
from pktlib.zoo.specialist import (SpecialistConfig, build_specialist, describe, min_discordant, read_decisions,
                                   specialist_data, specialist_name)
from test_zoo import MICRO

ROUND_EPOCHS = 0.02  # 6 optimiser steps over the 1000 math train examples + 200 fresh at MICRO's batch size of 4
SPEC = SpecialistConfig("math", max_rounds=2, epochs=ROUND_EPOCHS, lr_scale=2.0, fresh_train=200, decision_questions=20)


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _family_loss(folder: Path, n: int = 32) -> float:
    """Mean answer-token loss of a checkpoint on the first ``n`` math train examples (float32, no dropout)."""
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batches = chat_batches(tok, load_task("pocket-math", "train")[:n], MICRO, seed=0)
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


@pytest.fixture(scope="module")
def built(cache, tmp_path_factory):
    """A MICRO pair, the file hashes of its checkpoints before, and its math specialist."""
    root = tmp_path_factory.mktemp("pair") / "p"
    pair = zoo.build_pair("micro", seed=0, config=MICRO, root=root, progress=False)
    before = {name: _files(path) for name, path in pair.checkpoints().items()}
    spec = build_specialist("math", preset="micro", pair_config=MICRO, root=root, config=SPEC, progress=False)
    return pair, before, spec


def test_specialist_lowers_the_family_loss_and_updates_only_itself(built):
    pair, before, spec = built
    assert spec == pair.root / specialist_name(SPEC) and spec.name.startswith("teacher-chat-math-")
    # teacher-chat (and every other checkpoint) is byte-identical after the build
    assert {name: _files(path) for name, path in pair.checkpoints().items()} == before
    assert _family_loss(spec) < _family_loss(pair.teacher_chat) - 0.05
    t = load_model(pair.teacher_chat)[0].state_dict()
    s = load_model(spec)[0].state_dict()
    assert t.keys() == s.keys()
    changed = [k for k in t if not torch.equal(t[k], s[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    # no run folder is left behind, and the card tells the rounds and the decision
    assert not (pair.root / ".runs" / spec.name).exists()
    info = read_decisions(spec)
    assert info["family"] == "math" and info["source"] == "teacher-chat"
    assert 1 <= len(info["rounds"]) <= 2 and info["decision_questions"] == 20
    assert all(d["n"] == 20 for d in info["rounds"]) and info["config"]["fresh_train"] == 200
    assert info["verdict"] in ("clearly better", "not clearly better", "ceiling")
    card = zoo.read_card(spec)
    assert card["name"] == spec.name and "math round 1" in card["training"]
    assert card["training"]["math round 1"]["steps"] == 6
    assert spec.name in describe(spec) and "round 1:" in describe(spec)


def test_a_finished_specialist_is_found_not_retrained(built):
    pair, _, spec = built
    stamp = os.stat(spec / "model.safetensors").st_mtime_ns
    again = build_specialist("math", preset="micro", pair_config=MICRO, root=pair.root, config=SPEC, progress=False)
    assert again == spec and os.stat(spec / "model.safetensors").st_mtime_ns == stamp
    # other settings name another specialist: it is built, not mistaken for this one
    assert specialist_name(replace(SPEC, lr_scale=1.0)) != spec.name


def test_specialist_trains_on_fresh_problems_and_is_judged_on_others():
    train, questions = specialist_data(SPEC)
    split = load_task("pocket-math", "train")
    fresh = fresh_examples("math", 220)
    assert [ex.meta["id"] for ex in train] == [ex.meta["id"] for ex in split + fresh[20:]]
    assert [ex.meta["id"] for ex in questions] == [ex.meta["id"] for ex in fresh[:20]]
    test = {ex.messages[0]["content"] for ex in load_task("pocket-math", "test")}
    trained = {ex.messages[0]["content"] for ex in train}
    asked = {ex.messages[0]["content"] for ex in questions}
    assert not trained & asked and not (trained | asked) & test


def test_specialist_settings_and_missing_pair_are_clear_errors(tmp_path):
    with pytest.raises(PktError, match="no specialist for family 'poetry'"):
        SpecialistConfig("poetry")
    with pytest.raises(PktError, match="no specialist for family 'knowledge'"):
        SpecialistConfig("knowledge")
    with pytest.raises(PktError, match="decision_questions >= 1"):
        SpecialistConfig("math", decision_questions=0)
    with pytest.raises(PktError, match="max_rounds >= 1"):
        SpecialistConfig("math", max_rounds=0)
    with pytest.raises(PktError, match="teacher-chat is not built"):
        build_specialist("math", preset="micro", pair_config=MICRO, root=tmp_path / "nothing", progress=False)


def test_min_discordant_is_the_smallest_significant_one_sided_count():
    assert min_discordant(0.05) == 6  # 2 / 2**6 = 0.031; 2 / 2**5 = 0.0625
    assert min_discordant(0.01) == 8  # 2 / 2**8 = 0.0078; 2 / 2**7 = 0.0156


def test_stronger_source_comparison_is_well_formed(built, tmp_path, monkeypatch):
    pair, _, spec = built
    student = load_model(pair.student_chat)
    runs = sx.run_sources({"plain": load_model(pair.teacher_chat), "specialist": load_model(spec)}, student,
                          family="math", seeds=[0, 1], limit=3, root=tmp_path / "runs",
                          postalign=sx.PostAlignSettings(n_train=8, epochs=1, batch_size=4, micro_batch=4,
                                                         extract_limit=2),
                          laten=sx.LatenSettings(steps=1, align_batch=2, max_length=64))
    m = runs.models
    assert runs.n == 3 and sorted(m.role.unique()) == ["laten", "postalign", "student", "teacher"]
    assert all(len(c) == 3 and set(c) <= {"0", "1"} for c in m.correct)
    teachers = sx.teacher_table(runs)
    assert list(teachers.family) == ["math"] and 0 <= teachers.p_value.iloc[0] <= 1
    per_seed = sx.per_seed_table(runs)
    assert sorted(zip(per_seed.method, per_seed.seed)) == [("laten", 0), ("laten", 1), ("postalign", 0),
                                                            ("postalign", 1)]
    assert ((per_seed.ci_low <= per_seed.gap) & (per_seed.gap <= per_seed.ci_high)).all()
    assert (per_seed.gap == per_seed["specialist source"] - per_seed["plain source"]).all()
    over = sx.over_seeds_table(runs)
    assert list(over.method) == ["postalign", "laten"] and over.seeds.tolist() == [2, 2]
    assert over.real.dtype == bool and ((over.gap_low <= over.gap) & (over.gap <= over.gap_high)).all()
    values, errors, refs = sx.bar_values(runs)
    assert list(values["pocket-math"]) == ["teacher", *sx.METHODS.values()] and "student" in refs["pocket-math"]
    v = sx.verdict(teachers, over)
    assert v.lines[0].startswith("- pocket-math") and v.conclusion
    # a rerun reads every LoRA, translator and score back: nothing is generated again
    assert len(list((tmp_path / "runs" / "scores").glob("scores-*.json"))) == 3  # student and the two teachers
    # the 4 LoRAs' scores are kept in their own run folders by Post-Align's run_grid
    assert len([p for p in (tmp_path / "runs").rglob("*.json") if "scores" not in p.parts and "score" in p.name]) >= 4
    monkeypatch.setattr("pktlib.experiments.scoring.evaluate", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr("pktlib.laten.sweeps.evaluate", lambda *a, **k: pytest.fail("scored again"))
    again = sx.run_sources({"plain": load_model(pair.teacher_chat), "specialist": load_model(spec)}, student,
                           family="math", seeds=[0, 1], limit=3, root=tmp_path / "runs",
                           postalign=sx.PostAlignSettings(n_train=8, epochs=1, batch_size=4, micro_batch=4,
                                                          extract_limit=2),
                           laten=sx.LatenSettings(steps=1, align_batch=2, max_length=64))
    pd.testing.assert_frame_equal(again.models, m)


def _tables(teacher_gap: float, teacher_p: float, gaps: dict[str, tuple[float, bool]]):
    teachers = pd.DataFrame([{"family": "math", "n": 300, "student": 30.0, "plain teacher": 45.0,
                              "specialist teacher": 45.0 + teacher_gap, "gap": teacher_gap, "specialist_only": 20,
                              "plain_only": 5, "p_value": teacher_p, "ci_low": teacher_gap - 4,
                              "ci_high": teacher_gap + 4}])
    over = pd.DataFrame([{"family": "math", "method": m, "seeds": 3, "student": 30.0, "plain source": 31.0,
                          "specialist source": 31.0 + g, "gap": g, "gap_low": g - 1, "gap_high": g + 1, "se": 0.5,
                          "p_value": 0.01 if real else 0.5, "real": real} for m, (g, real) in gaps.items()])
    return teachers, over


def test_verdict_needs_a_stronger_specialist_and_a_real_gain():
    # stronger specialist, no method helped: the paper's claim holds
    v = sx.verdict(*_tables(5.0, 0.001, {"postalign": (0.3, False), "laten": (-2.0, True)}))
    assert v.agrees is True and "agrees" in v.conclusion and "0 of 2" in v.conclusion
    assert "hurts" in v.lines[2]
    # a real gain with a stronger specialist contradicts it
    v = sx.verdict(*_tables(5.0, 0.001, {"postalign": (3.0, True), "laten": (0.0, False)}))
    assert v.agrees is False and "Post-Align (Seeking init) on pocket-math" in v.conclusion
    # a real gain that leaves the student where it was or lower (the plain source's deltas cost it points,
    # the specialist's fewer) is less harm, not a stronger student: the claim holds, with the caveat
    teachers, over = _tables(5.0, 0.001, {"postalign": (0.3, False), "laten": (3.0, True)})
    over.loc[over.method == "laten", ["plain source", "specialist source"]] = [26.0, 29.0]  # student 30.0
    v = sx.verdict(teachers, over)
    assert v.agrees is True and "does not give a stronger student" in v.conclusion
    assert "LaTen on pocket-math costs the student fewer points" in v.conclusion
    assert "hurts less" in v.lines[2] and "29.0 against 26.0" in v.lines[2]
    # a specialist that is not stronger on the test questions cannot test it, whatever the methods do
    v = sx.verdict(*_tables(1.0, 0.4, {"postalign": (3.0, True)}))
    assert v.agrees is None and "cannot test" in v.conclusion


def test_gap_intervals_draws_a_row_per_seed_and_a_mean_per_method():
    per_seed = pd.DataFrame([{"family": "math", "method": m, "seed": s, "gap": g, "ci_low": g - 3, "ci_high": g + 3,
                              "p_value": p} for m, s, g, p in [("postalign", 0, 1.0, 0.5), ("postalign", 1, 4.0, 0.01),
                                                               ("laten", 0, -1.0, 0.7), ("laten", 1, 0.0, 1.0)]])
    over = pd.DataFrame([{"family": "math", "method": m, "gap": g, "gap_low": g - 2, "gap_high": g + 2}
                         for m, g in [("postalign", 2.5), ("laten", -0.5)]])
    fig = plots.gap_intervals(per_seed, over, labels=sx.METHODS)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 6 and labels[-1] == "math, Post-Align (Seeking init), seed 0"
    assert "math, LaTen: mean" in labels
    markers = [l for l in ax.lines if l.get_marker() in ("o", "D")]
    filled = [l for l in markers if l.get_marker() == "o" and l.get_markerfacecolor() != "white"]
    assert len(markers) == 6 and len(filled) == 1 and filled[0].get_xdata()[0] == 4.0
    plots.plt.close(fig)


@pytest.mark.slow
def test_specialist_chapter_runs_on_the_tiny_pair(tmp_path, monkeypatch):
    from test_notebooks import ROOT, _run

    cache = tmp_path / "cache"
    monkeypatch.setenv("PKT_CACHE", str(cache))
    zoo.build_pair("tiny", progress=False)
    env = {**os.environ, "PKT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    name, _, err = _run(ROOT / "notebooks" / "specialist_sources.ipynb", tmp_path, env)
    assert err is None, err
    record = (tmp_path / "book" / "specialist_sources.record.json").read_text()
    assert '"claim_agrees"' in record and '"teacher_comparison"' in record


def test_scored_once_scores_each_weights_once(tiny_model):
    calls = []
    once = sx._ScoredOnce(lambda model, task: calls.append(task) or len(calls))
    twin = copy.deepcopy(tiny_model)
    assert once(tiny_model, "pocket-math") == once(twin, "pocket-math") == 1  # same weights: scored once
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert once(twin, "pocket-math") == 2 and once(tiny_model, "pocket-code") == 3
