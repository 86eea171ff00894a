"""The transfer chapters' experiments: budgets, the verdict rule, the Post-Align, unaligned and LaTen tables."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from conftest import make_model
from pktlib.baselines import grid
from pktlib.data import load_task
from pktlib.errors import PktError
from pktlib.experiments import laten_sweep, postalign_grid, unaligned_grid
from pktlib.experiments.scoring import NO_TEACHER_GAP, BudgetedScorer, families_with_teacher_gap, generation_budget
from pktlib.experiments.verdict import compare_runs, correctness_string
from pktlib.models import spec


def _words(text: str) -> dict:
    """A word-level stand-in tokenizer: one token per whitespace-separated word."""
    return {"input_ids": list(range(len(text.split())))}


# ------------------------------------------------------------------------------ scoring
def test_generation_budget_is_margin_times_the_longest_scored_answer():
    answers = [ex.answer for ex in load_task("pocket-math", "test", limit=5)]
    longest = max(len(a.split()) for a in answers)
    assert generation_budget(_words, "pocket-math", limit=5, margin=1.5) == math.ceil(1.5 * longest) + 2
    assert generation_budget(_words, "pocket-math", limit=5, margin=1.0) == longest + 2
    # only the scored examples count: more examples can only raise the budget
    assert generation_budget(_words, "pocket-math", limit=50, margin=1.0) >= longest + 2
    with pytest.raises(PktError, match="margin"):
        generation_budget(_words, "pocket-math", limit=5, margin=0)


def test_budgeted_scorer_scores_limit_examples_within_the_budget(tokenizer):
    model = make_model("llama", tokenizer=tokenizer, n_layers=1)
    scorer = BudgetedScorer.for_tasks(tokenizer, ["pocket-math"], limit=3, margin=0.05)
    res = scorer(model, "pocket-math")
    assert res.n == 3 and res.max_new_tokens == scorer.budgets["pocket-math"]
    with pytest.raises(PktError, match="no generation budget for task 'pocket-code'"):
        scorer(model, "pocket-code")


def test_families_with_teacher_gap():
    assert families_with_teacher_gap({"math": 10, "code": 50}, {"math": 20, "code": 50}) == ["math"]


# ------------------------------------------------------------------------------ verdict
def _runs(scores, n_right):
    return pd.DataFrame({"seed": range(len(scores)), "score": scores,
                         "correct": [correctness_string([i < k for i in range(100)]) for k in n_right]})


def test_compare_runs_real_gap_beats_both_noises():
    a, b = _runs([60, 62, 61], [60, 62, 61]), _runs([40, 41, 39], [40, 41, 39])
    c = compare_runs(a, b)
    assert c.gap == pytest.approx(21.0)
    assert c.se == pytest.approx(math.sqrt(1 / 3 + 1 / 3))
    assert c.p_value < 1e-6 and c.real
    assert compare_runs(b, a).gap == pytest.approx(-21.0) and compare_runs(b, a).real


def test_compare_runs_gap_within_seed_noise_or_question_noise_is_not_real():
    # spread over seeds larger than the gap
    assert not compare_runs(_runs([70, 30, 50], [70, 30, 50]), _runs([45, 48, 42], [45, 48, 42])).real
    # consistent over seeds, but the same one discordant question in every seed: counted once,
    # p = 2 * 0.5 ** 1 = 1 (pooling the 3 seeds' pairs gave 3 vs 0, p = 0.25; with 6 seeds 0.03)
    c = compare_runs(_runs([41, 41, 41], [41, 41, 41]), _runs([40, 40, 40], [40, 40, 40]))
    assert c.se == 0 and c.p_value == 1.0 and (c.a_only, c.b_only) == (1, 0) and not c.real


def test_compare_runs_one_seed_and_mismatched_seeds():
    c = compare_runs(_runs([80], [80]), _runs([20], [20]))
    assert math.isnan(c.se) and c.real  # no spread to measure: the paired test decides
    with pytest.raises(PktError, match="seeds differ"):
        compare_runs(_runs([1, 2], [1, 2]), _runs([1], [1]))


# ------------------------------------------------------------------------------ Post-Align
def _postalign_runs(seeking_shift: float, teacher: float = 50.0) -> postalign_grid.PostAlignRuns:
    rows, curves = [], {}
    for setting in ("N=16", "align"):
        for init, base in (("random", 40.0), ("pissa", 40.0), ("seeking", 40.0 + seeking_shift)):
            for sd in (0, 1, 2):
                score = base + sd  # the same spread over seeds for every init
                k = int(score)
                rows.append({"family": "math", "setting": setting, "init": init, "seed": sd, "score": score,
                             "correct": correctness_string([i < k for i in range(100)])})
                curves[("math", setting, init, sd)] = [(1, 2.0 + sd), (2, 1.0 + sd)]
    return postalign_grid.PostAlignRuns(pd.DataFrame(rows), curves, {"math": {"student": 30.0, "teacher": teacher}},
                                        ref_correct={"math": {"student": correctness_string([i < 30 for i in range(100)]),
                                                              "teacher": correctness_string([True] * 100)}})


def test_postalign_settings_and_ids():
    settings = postalign_grid.grid_settings(1000)
    assert settings == {"N=1000": ("train", 1000), "align": ("align", None)}
    assert postalign_grid.setting_ids(settings) == {"N=1000": "n1000", "align": "small"}
    assert postalign_grid.setting_ids(postalign_grid.grid_settings(16))["N=16"] == "n16"


def test_postalign_tables_from_runs():
    runs = _postalign_runs(10.0)
    settings = postalign_grid.grid_settings(16)
    table, numbers = postalign_grid.score_table(runs, families=["math"], settings=settings, inits=["random", "seeking"])
    assert numbers["seeking"]["math|N=16"] == [51.0, 1.0] and numbers["random"]["math|align"] == [41.0, 1.0]
    assert table.loc["seeking", ("math", "N=16")] == "51.0 ± 1.0"
    assert table.loc["student (no LoRA)", ("math", "align")] == "30.0"
    compared = postalign_grid.vs_student(runs)
    assert len(compared) == 6 and set(compared.verdict) == {"better"}  # 10 to 22 questions more, every seed
    c = compared.set_index(["setting", "init"]).loc[("N=16", "seeking")]
    # a_only: questions 30-51, where some Seeking seed (50, 51, 52 right) beats the student (30):
    # each question once (the pooled count was 20 + 21 + 22 = 63)
    assert (c.gap, c.se, c.a_only, c.b_only, c.seeds) == (21.0, pytest.approx(1 / math.sqrt(3)), 22, 0, 3)
    rows = postalign_grid.scorecard_rows(runs, pair="p", families=["math"], settings=settings, inits=["seeking"], n=100,
                                         compared=compared)
    assert {(r["method"], r["score"]) for r in rows} == {("postalign-seeking-n16", 51.0), ("postalign-seeking-small", 51.0),
                                                         ("student", 30.0), ("teacher", 50.0)}
    assert rows[0]["effect"] == 21.0 and rows[0]["ci"] == pytest.approx([c.lo, c.hi]) and rows[0]["seeds"] == 3
    bands = postalign_grid.curve_bands(runs)
    first = bands[(bands.setting == "N=16") & (bands.init == "random")]
    assert list(first["mean"]) == [3.0, 2.0] and first["std"].iloc[0] == pytest.approx(math.sqrt(2 / 3))


def test_postalign_verdict_counts_real_wins_and_needs_a_teacher_gap():
    settings = postalign_grid.grid_settings(16)
    inits = ["random", "pissa", "seeking"]
    win = postalign_grid.seeking_verdict(_postalign_runs(10.0), families=["math"], settings=settings, inits=inits)
    assert set(win.comparisons) == {"math|N=16", "math|align"}
    assert all(c.real and c.gap == pytest.approx(10.0) for v in win.comparisons.values() for c in v.values())
    assert win.conclusion.startswith("Seeking beats random LoRA initialisation beyond the noise in 2 of 2")
    assert "real" in win.lines[0] and win.markdown().endswith("**")
    tie = postalign_grid.seeking_verdict(_postalign_runs(0.0), families=["math"], settings=settings, inits=inits)
    assert tie.conclusion.startswith("The teacher's parameters do not help: in none of the 2")
    no_gap = postalign_grid.seeking_verdict(_postalign_runs(10.0, teacher=20.0), families=["math"],
                                            settings=settings, inits=inits)
    assert no_gap.conclusion == NO_TEACHER_GAP and no_gap.families_with_teacher_gap == []


def test_postalign_run_grid_on_a_tiny_pair(tmp_path, tokenizer):
    teacher = make_model("llama", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3, seed=5)
    student = make_model("llama", tokenizer=tokenizer, n_layers=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    scorer = BudgetedScorer(tokenizer, 2, {"pocket-math": 4})
    kw = dict(scorer=scorer, root=tmp_path, families=["math"], settings={"N=4": ("train", 4)},
              inits=["random", "seeking"], seeds=[0], r=4, alpha=4, epochs=1, batch_size=4, micro_batch=4,
              extract_limit=2, progress=False)
    runs = postalign_grid.run_grid((teacher, tokenizer), (student, tokenizer), **kw)
    assert list(runs.results.init) == ["random", "seeking"]
    assert (runs.results.steps == 1).all() and (runs.results.n_examples == 4).all()
    assert runs.results.correct.str.len().eq(2).all()
    assert set(runs.metrics()) == {"reference_scores", "reference_correct", "postalign_runs", "training_curves",
                                   "grid_seconds", "tasks"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["math-N=4-random-s0-e1-b4-x2",
                                                                       "math-N=4-seeking-s0-e1-b4-x2"]
    # each score is kept: in the run folder, the student's and teacher's beside them
    assert all(len(list(p.glob("scores-*-n2-t4.json"))) == 1 for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("scores-*-math-n2-t4.json")) == ["student", "teacher"]
    assert runs.results.scored_now.all() and len(postalign_grid.vs_student(runs)) == 2
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # each run trains a copy
    # a rerun resumes from the run folders: the same results
    again = postalign_grid.run_grid((teacher, tokenizer), (student, tokenizer), **kw)
    assert not again.results.scored_now.any()  # read back, not scored again
    pd.testing.assert_frame_equal(again.results.drop(columns="scored_now"), runs.results.drop(columns="scored_now"))


# ------------------------------------------------------------------------------ unaligned grid
def _right(k: int, n: int = 20) -> str:
    return correctness_string([i < k for i in range(n)])


def _unaligned_runs() -> unaligned_grid.UnalignedRuns:
    # 20 questions; the student gets the first 4. Every cell answers as the student does, except
    # random/embedding/importance (all 20 right in both seeds) and top/pca/random (none right).
    k_of = {("random", "embedding", "importance"): 20, ("top", "pca", "random"): 0}
    rows = []
    for cell in grid():
        k = k_of.get((cell["layers"], cell["hidden"], cell["neurons"]), 4)
        for sd in ((0, 1) if unaligned_grid.random_cell(cell) else (None,)):
            rows.append({"family": "math", **cell, "seed": sd, "score": 5.0 * k, "ci95": [0.0, 100.0],
                         "teacher_layers": [0, 1], "rel_delta": 1.0 + (cell["hidden"] == "whitening"),
                         "correct": _right(k)})
    rows.append({"family": "math", "layers": "top", "hidden": "seeking", "neurons": "seeking", "seed": None,
                 "score": 10.0, "ci95": [0.0, 30.0], "teacher_layers": [2, 3], "rel_delta": 0.5, "correct": _right(2)})
    return unaligned_grid.UnalignedRuns(pd.DataFrame(rows), {"math": {"student": (20.0, [8.0, 42.0]),
                                                                     "teacher": (60.0, [39.0, 78.0])}}, {}, rows,
                                        {"math": {"student": _right(4), "teacher": _right(12)}})


def test_unaligned_comparisons_tables_and_verdict():
    runs = _unaligned_runs()
    assert len(runs.results) == 6 + 12 * 2 + 1  # cells without a random choice run once
    table = unaligned_grid.comparisons(runs)
    assert len(table) == 19 and table.set_index(["layers", "hidden", "neurons"]).verdict.value_counts().to_dict() == {
        "same answers": 16, "better": 1, "n.s.": 2}
    t = table.set_index(["layers", "hidden", "neurons"])
    best = t.loc[("random", "embedding", "importance")]
    # two identical seeds, 16 questions more than the student, counted once: p = 2 / 2**16
    assert (best.gap, best.seeds, best.a_only, best.lo, best.hi) == (80.0, 2, 16, 80.0, 80.0)
    assert best.p_value == 2 / 2 ** 16 and best.verdict == "better"
    worst = t.loc[("top", "pca", "random")]
    # two identical seeds that lose the student's 4 questions: 4 questions, p = 2 / 2**4 = 0.125, not
    # significant (pooling the seeds counted 8 lost questions, p = 2 / 2**8, "worse")
    assert (worst.gap, worst.b_only, worst.p_value, worst.verdict) == (-20.0, 4, 0.125, "n.s.")
    seek = t.loc[("top", "seeking", "seeking")]
    assert (seek.gap, seek.seeds, seek.p_value, seek.verdict) == (-10.0, 1, 0.5, "n.s.")
    summary = unaligned_grid.summary_table(runs, ["math"])
    assert summary["math"].to_dict() == {"student": 20.0, "teacher": 60.0, "Seeking (no training)": 10.0,
                                         "best grid cell": 100.0, "median grid cell": 20.0}
    card = unaligned_grid.scorecard_rows(runs, summary, table, pair="p", families=["math"])
    assert [(r["method"], r["score"], r["effect"], r["seeds"], r["n"]) for r in card] == [
        ("seeking-unaligned", 10.0, -10.0, 1, 20), ("unaligned-best", 100.0, 80.0, 2, 20),
        ("unaligned-worst", 0.0, -20.0, 2, 20)]
    assert card[0]["ci"] == pytest.approx([seek.q_lo, seek.q_hi]) and card[1]["ci"] == [80.0, 80.0]
    assert unaligned_grid.relative_delta(runs).loc["math"].to_dict() == {"embedding": 1.0, "pca": 1.0, "seeking": 0.5,
                                                                         "whitening": 2.0}
    mat = unaligned_grid.grid_matrices(runs, ["math"])["math"]
    assert mat.shape == (3, 7) and mat.loc["top", "pca\nrandom"] == 0.0
    assert mat.loc["random", "embedding\nimportance"] == 100.0
    assert mat.loc["top", "Seeking\n(top)"] == 10.0 and mat["Seeking\n(top)"].isna().sum() == 2
    v = unaligned_grid.verdict(runs, table, ["math"])
    assert (v.per_family["math"]["cells_above_student"], v.per_family["math"]["cells_better"],
            v.per_family["math"]["cells_worse"]) == (1, 1, 0)  # top/pca/random: n.s. (above)
    assert v.per_family["math"]["best_cell"] == "random/embedding/importance"
    assert v.conclusion.startswith("1 cell(s) improve") and "+80.0 points" in v.lines[0]


def test_unaligned_run_grid_on_a_tiny_pair(tokenizer):
    teacher = make_model("llama", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3, seed=1)
    student = make_model("llama", tokenizer=tokenizer, n_layers=2, seed=2)
    scorer = BudgetedScorer(tokenizer, 2, {"pocket-knowledge": 3})
    runs = unaligned_grid.run_grid((teacher, tokenizer), (student, tokenizer), scorer=scorer, families=["knowledge"],
                                   seeds=[0, 1], extract_limit=2, progress=False)
    res = runs.results
    assert len(res) == 6 + 12 * 2 + 1 and res.rel_delta.gt(0).all()
    assert res.seed.isna().sum() == 7 and sorted(res.seed.dropna().unique()) == [0, 1]
    rand = res[(res.neurons == "random") & (res.layers == "top")]
    # the seed drives the random neuron choice: the same cell's two seeds add different weights
    assert rand.groupby("hidden").rel_delta.nunique().eq(2).all()
    assert len(runs.layer_totals["knowledge"]) == 3
    assert set(runs.refs["knowledge"]) == {"student", "teacher"}
    assert len(unaligned_grid.comparisons(runs)) == 19
    assert res.scored_now.eq(True).all() and runs.scoring_costs()["scored_now"] == 31 + 2
    json.dumps(runs.metrics())  # the record entries are plain JSON


def test_unaligned_run_grid_keeps_each_score_under_its_root(tokenizer, tmp_path, monkeypatch):
    """A second run with the same root scores nothing and returns the same results; another seed,
    cell or task gets its own file."""
    from pktlib.experiments import scoring

    teacher = make_model("llama", tokenizer=tokenizer, hidden_size=96, intermediate_size=160, n_layers=3, seed=1)
    student = make_model("llama", tokenizer=tokenizer, n_layers=2, seed=2)
    # the same budget on both tasks: only the folder tells a model's score on one task from the other
    scorer = BudgetedScorer(tokenizer, 2, {"pocket-knowledge": 3, "pocket-math": 3})
    cells = [{"layers": "bottom", "hidden": "pca", "neurons": "random"},
             {"layers": "top", "hidden": "embedding", "neurons": "importance"}]
    kw = dict(scorer=scorer, families=["knowledge", "math"], extract_limit=2, cells=cells, progress=False)
    pair = ((teacher, tokenizer), (student, tokenizer))
    direct = unaligned_grid.run_grid(*pair, seeds=[0, 1], **kw)
    first = unaligned_grid.run_grid(*pair, seeds=[0, 1], root=tmp_path, **kw)
    files = {t: sorted(p.name for p in (tmp_path / t).iterdir()) for t in ("pocket-knowledge", "pocket-math")}
    # per task: student, teacher, bottom/pca/random x 2 seeds, top/embedding/importance, Seeking
    assert {t: len(f) for t, f in files.items()} == {"pocket-knowledge": 6, "pocket-math": 6}
    assert sum(f.startswith("scores-student-") and f.endswith("-knowledge-n2-t3.json")
               for f in files["pocket-knowledge"]) == 1
    # bottom layers and random neurons ignore the task (and the top layers may agree): the same models,
    # one file per task
    assert len(set(files["pocket-knowledge"]) & set(files["pocket-math"])) >= 2
    assert first.results.scored_now.eq(True).all() and direct.results.scored_now.eq(True).all()
    cost = first.scoring_costs()
    assert (cost["models"], cost["scored_now"], cost["read_back"]) == (12, 12, 0)
    same = ["family", "layers", "hidden", "neurons", "seed", "score", "ci95", "correct"]
    assert first.results[same].equals(direct.results[same]) and first.refs == direct.refs

    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: pytest.fail("scored again"))
    again = unaligned_grid.run_grid(*pair, seeds=[0, 1], root=tmp_path, **kw)
    assert again.results.scored_now.eq(False).all()
    assert again.results.drop(columns="scored_now").equals(first.results.drop(columns="scored_now"))
    assert (again.refs, again.ref_correct) == (first.refs, first.ref_correct)
    assert again.scoring_costs() == {**cost, "scored_now": 0, "read_back": 12}
    with pytest.raises(pytest.fail.Exception, match="scored again"):  # a new seed is a new model
        unaligned_grid.run_grid(*pair, seeds=[2], root=tmp_path, **{**kw, "families": ["math"]})

    monkeypatch.undo()
    new = unaligned_grid.run_grid(*pair, seeds=[0, 2], root=tmp_path, **{**kw, "families": ["math"], "cells": cells[:1]})
    assert list(new.results.scored_now) == [False, True, False]  # seed 0, seed 2, Seeking
    assert len(list((tmp_path / "pocket-math").iterdir())) == 7


# ------------------------------------------------------------------------------ LaTen tables
def _laten_runs() -> pd.DataFrame:
    # 100 questions: a score of k means the first k right
    rows = [{"task": "pocket-math", "model": "student", "score": 10.0, "config": "paper lr", "correct": _right(10, 100)},
            {"task": "pocket-math", "model": "teacher", "score": 30.0, "config": "paper lr", "correct": _right(30, 100)}]
    for config in ("paper lr", "scale-matched lr"):
        for rate in ((0.1, 0.2) if config == "paper lr" else (0.1,)):
            for seed in (0, 1):
                steps = (1, 2, 3, 4) if rate == 0.1 else (4,)  # pocket-math: 4 steps (Table 5)
                for st in steps:
                    score = 10 + seed * st * (config != "paper lr")
                    rows.append({"task": "pocket-math", "model": "laten", "score": float(score),
                                 "correct": _right(score, 100), "config": config, "transfer_rate": rate, "seed": seed,
                                 "step": st,
                                 "translated_rms": 1e-5 * (1 + seed), "run_dir": f"/runs/{config}/{rate}/{seed}"})
    return pd.DataFrame(rows)


def test_laten_tables():
    runs = _laten_runs()
    t1, table = laten_sweep.table1(runs, tasks=["pocket-math"], configs=["paper lr", "scale-matched lr"], main_rate=0.1)
    assert table["math"]["student"] == 10.0 and table["math"]["_laten_scale-matched lr_mean"] == 12.0
    assert t1.loc["LaTen (scale-matched lr)", "math"] == "12.0 ± 2.8"
    assert not any(i.startswith("_") for i in t1.index)
    compared = laten_sweep.comparisons(runs)
    assert list(zip(compared.config, compared.transfer_rate, compared.verdict)) == [
        ("paper lr", 0.1, "same answers"), ("paper lr", 0.2, "same answers"), ("scale-matched lr", 0.1, "n.s.")]
    sm = compared.iloc[2]  # step 4: seed 0 scores 10, seed 1 scores 14 against the student's 10
    assert (sm.gap, sm.se, sm.a_only, sm.b_only, sm.seeds, sm.n) == (2.0, 2.0, 4, 0, 2, 100)
    assert sm.p_value == pytest.approx(0.125) and sm.hi == pytest.approx(2 + 12.7062 * 2, abs=1e-3)
    between = laten_sweep.config_comparisons(runs, main_rate=0.1)
    assert list(between.config) == ["scale-matched lr"] and between.gap.iloc[0] == 2.0
    lines = laten_sweep.comparison_lines(compared)
    assert lines[2].startswith("- **pocket-math, scale-matched lr, rate 0.1** vs the student: +2.0 points (95% CI")
    assert lines[2].endswith("2 seeds x 100 questions); **n.s.**")
    rows = laten_sweep.scorecard_rows(table, compared, tasks=["pocket-math"], pair="p", main_rate=0.1)
    assert [(r["method"], r["score"], r["n"]) for r in rows] == [("student", 10.0, 100), ("teacher", 30.0, 100),
                                                                 ("laten", 10.0, 100)]
    assert {k: rows[2][k] for k in ("effect", "ci", "p", "seeds")} == {"effect": 0.0, "ci": [0.0, 0.0], "p": 1.0,
                                                                       "seeds": 2}
    steps = laten_sweep.score_vs_step(laten_sweep.main_curve(runs, 0.1))
    assert len(steps) == 8 and set(steps.columns) >= {"mean", "std", "runs"}
    rates = laten_sweep.score_vs_rate(runs)
    assert list(rates.transfer_rate) == [0.1, 0.2] and list(rates.runs) == [2, 2]
    assert laten_sweep.student_scores(runs) == {"pocket-math": 10.0}
    lines = laten_sweep.instability_lines(runs, configs=["scale-matched lr"], tasks=["pocket-math"], main_rate=0.1)
    assert "over 8 (seed, step) injections LaTen scored +0.0 to +4.0 points" in lines[0]
    assert "(4 above, 4 equal, 0 below)" in lines[0]
    reading = laten_sweep.regime_lines(runs, configs=["paper lr"], main_rate=0.1, student_rms=0.5)
    assert reading[0].startswith("- **paper lr**: 100% of the injected students score exactly the student's score; "
                                 "none scores above it and none scores below it;")
    reading = laten_sweep.regime_lines(runs, configs=["scale-matched lr"], main_rate=0.1, student_rms=0.5)
    assert "the largest gain is +4.0 points and none scores below it;" in reading[0]


def test_laten_train_logs_read_each_main_rate_run(tmp_path):
    runs = _laten_runs()
    runs["run_dir"] = runs.run_dir.map(lambda d: str(tmp_path / d.strip("/")) if isinstance(d, str) else d)
    for d in runs[runs.model == "laten"].run_dir.unique():
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "log.jsonl").write_text("".join(json.dumps(
            {"step": s, "lr": 1e-5, "lm_loss": 3.0, "lm_loss_after": 2.5, "student_lm_loss": 2.0 + s, "mse": 0.1,
             "wall_s": 1.0}) + "\n" for s in (1, 2)))
    logs = laten_sweep.train_logs(runs, 0.1)
    assert len(logs) == 2 * 2 * 2  # runs at rate 0.1: 2 configs x 2 seeds, 2 logged steps each
    assert list(logs.lm_gain_vs_student.unique()) == [0.5, 1.5]
    summary = laten_sweep.train_log_summary(logs)
    assert len(summary) == 2
    rms = laten_sweep.injected_delta_rms(runs)
    assert rms.loc[("paper lr", "pocket-math"), "max"] == pytest.approx(2e-5)


def test_laten_configs_memory_and_weight_rms(tokenizer):
    assert laten_sweep.lr_configs(3e-5, 5120) == {"paper lr": 3e-5, "scale-matched lr": pytest.approx(3e-5)}
    assert list(laten_sweep.lr_configs(3e-5, 256, scale_matched=False)) == ["paper lr"]
    model = make_model("llama", tokenizer=tokenizer, n_layers=1)
    table, llama, pocket = laten_sweep.memory_tables(spec(model), spec(model), preset="tiny", align_batch=16,
                                                     max_length=64, transfer_rate=0.1)
    assert table.shape == (len(llama.table()), 2) and llama.total > 1000 * pocket.total
    lin = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    assert laten_sweep.weight_rms(lin) == pytest.approx(math.sqrt(25 / 4))


# ------------------------------------------------------------------------------ LaTen beyond the inert regime
STUDENT = "111111000000"  # 12 questions, 50%
# lr -> (delta RMS, per-seed correctness): chosen so each lr lands in one reading
SWEEP = {3e-5: (1e-9, [STUDENT, STUDENT]),  # inert
         3e-4: (1e-6, ["111110100000"] * 2),  # changes answers, no effect
         3e-3: (1e-4, ["111111111111", "111111111110"]),  # helps
         3e-2: (5e-3, ["111111111111", "000000000000"]),  # unstable
         1e-1: (2e-2, ["000000000000", "000000000001"])}  # hurts


def _sweep_runs() -> pd.DataFrame:
    score = lambda c: 100 * c.count("1") / len(c)  # noqa: E731
    rows = [{"task": "pocket-math", "model": "student", "score": score(STUDENT), "correct": STUDENT, "lr": 3e-5,
             "penalty": 1000.0},
            {"task": "pocket-math", "model": "teacher", "score": 90.0, "correct": "1" * 11 + "0", "lr": 3e-5,
             "penalty": 1000.0}]
    for lr, (rms, corrects) in SWEEP.items():
        for seed, c in enumerate(corrects):
            rows.append({"task": "pocket-math", "model": "laten", "score": score(c), "correct": c, "lr": lr,
                         "penalty": 1000.0, "step": 2, "seed": seed, "translated_rms": rms})
    return pd.DataFrame(rows)


def test_lr_sweep_table_pairs_each_injection_with_the_student():
    table = laten_sweep.lr_sweep_table(_sweep_runs(), weight_rms=0.1)
    assert list(table.columns[:15]) == ["task", "penalty", "lr", "step", "seed", "delta_rms", "ratio", "score",
                                        "student", "gap", "laten_only", "student_only", "n", "p_value", "outcome"]
    assert len(table) == 10 and set(table.n) == {12} and set(table.student) == {50.0}
    row = table[(table.lr == 3e-3) & (table.seed == 0)].iloc[0]
    # 6 questions only LaTen got right, none only the student: exact McNemar p = 2 / 2^6
    assert (row.laten_only, row.student_only, row.gap) == (6, 0, 50.0)
    assert row.p_value == pytest.approx(2 / 64) and row.outcome == "better" and row.ratio == pytest.approx(1e-3)
    row = table[(table.lr == 1e-1) & (table.seed == 1)].iloc[0]  # 1 vs 6 discordant: p = 2 * 8 / 128
    assert (row.laten_only, row.student_only, row.outcome) == (1, 6, "n.s.") and row.p_value == pytest.approx(0.125)
    assert list(table[table.lr == 3e-5].outcome) == ["same answers"] * 2
    assert list(table[table.lr == 3e-2].outcome) == ["better", "worse"]


def test_lr_sweep_summary_reads_each_setting():
    summary = laten_sweep.lr_sweep_summary(laten_sweep.lr_sweep_table(_sweep_runs(), weight_rms=0.1))
    reading = summary.set_index("lr").reading.to_dict()
    assert reading == {3e-5: "inert", 3e-4: "no clear effect", 3e-3: "helps", 3e-2: "unstable", 1e-1: "hurts"}
    helps = summary[summary.lr == 3e-3].iloc[0]
    assert helps.gap == pytest.approx((50 + 100 * 11 / 12 - 50) / 2)
    # each question once: both seeds right on questions 6-10 (2 x d = 2), one on 11 (1), the student
    # on none of them; only the all-plus and all-minus of the 2^6 sign patterns reach |11|:
    # p = 2 / 2**6 (pooling the seeds' pairs counted 11 questions, p = 2 / 2**11)
    assert helps.p_value == 2 / 2 ** 6
    hurts = summary[summary.lr == 1e-1].iloc[0]
    # 2 x d = -2 on questions 0-5 (both seeds lose them), +1 on 11: |sum| >= 11 for 4 of the 2^7
    # sign patterns (all six 2s with the sum's sign, the 1 either way)
    assert hurts.p_value == 4 / 2 ** 7 and (hurts.seeds_better, hurts.seeds_worse) == (0, 1)
    assert (helps.seeds, helps.seeds_better, helps.seeds_worse) == (2, 1, 0)
    assert summary.set_index("lr").ratio[3e-2] == pytest.approx(0.05)
    lines = laten_sweep.lr_sweep_lines(summary)
    assert lines[0].startswith("- **pocket-math**: deltas at 1-10% of the weights' RMS")
    assert "at lr 0.03 (penalty 1000)" in lines[0] and "largest ratio 2.0e-01" in lines[0]
    assert any(l.startswith("  - helps (1 of 5 settings): penalty 1000, lr 0.003, step 2: +45.8 points") for l in lines)
    assert set(laten_sweep.READINGS) == set(summary.reading)
    claim = laten_sweep.lr_sweep_claim(summary)
    assert "the pocket pair agrees: some settings improve the student" in claim
    assert "5 settings: 1 inert, 1 helps, 1 hurts, 1 unstable, 1 no clear effect" in claim
    inert = laten_sweep.lr_sweep_claim(summary[summary.reading == "inert"])
    assert "LaTen leaves every answer unchanged" in inert
    assert "**: the real pair cannot test it" in laten_sweep.lr_sweep_claim(summary[summary.reading == "inert"],
                                                                           subject="the real pair")
    harmful = laten_sweep.lr_sweep_claim(summary[summary.reading.isin(["hurts", "no clear effect"])])
    assert "does not show an improvement: where LaTen changes the student beyond the noise" in harmful


def test_lr_sweep_table_refuses_other_questions():
    runs = _sweep_runs()
    runs.loc[runs.model == "laten", "correct"] = "1" * 11
    with pytest.raises(PktError, match="same questions"):
        laten_sweep.lr_sweep_table(runs, weight_rms=0.1)


def test_laten_tables_on_paper_task_names():
    """A real pair's sweep names tasks as the paper (gsm8k): tables keyed by the task, protocol on every row."""
    runs = _laten_runs()
    runs["task"] = "gsm8k"
    runs["changed_entries"] = 30.0
    t1, table = laten_sweep.table1(runs, tasks=["gsm8k"], configs=["paper lr"], main_rate=0.1)
    assert list(t1.columns) == ["gsm8k"] and table["gsm8k"]["student"] == 10.0
    assert laten_sweep.task_label("pocket-math") == "math" and laten_sweep.task_label("gsm8k") == "gsm8k"
    rows = laten_sweep.scorecard_rows(table, laten_sweep.comparisons(runs), tasks=["gsm8k"], pair="p", main_rate=0.1,
                                      protocol="open-instruct")
    assert [(r["method"], r["task"], r["protocol"]) for r in rows] == [
        ("student", "gsm8k", "open-instruct"), ("teacher", "gsm8k", "open-instruct"), ("laten", "gsm8k", "open-instruct")]
    bars = laten_sweep.seed_bars(runs, tasks=["gsm8k"], main_rate=0.1)
    # gsm8k's Table 5 step is 4: seed 1 of the scale-matched lr scores 10 + 1 * 4
    assert bars["values"]["gsm8k"] == {"paper lr": {"seed 0": 10.0, "seed 1": 10.0},
                                       "scale-matched lr": {"seed 0": 10.0, "seed 1": 14.0}}
    assert bars["references"]["gsm8k"] == {"student": 10.0, "teacher": 30.0}
    sizes = laten_sweep.delta_size_table(runs, weight_rms=1e-3)
    row = sizes.loc[("scale-matched lr", "gsm8k")]
    assert row.runs == 8 and row.delta_rms == pytest.approx(1.5e-5) and row.delta_rms_max == pytest.approx(2e-5)
    assert row.ratio_to_weights == pytest.approx(1.5e-2) and row.changed_vectors == 30
