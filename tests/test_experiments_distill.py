"""The distillation chapter's experiment code: cached scores, tables, paired tests, LaTen rows, summary, cost."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from conftest import make_model
from pktlib.distill import budget_examples
from pktlib.evaluation import evaluate
from pktlib.experiments import distillation as dx
from pktlib.experiments.scoring import cached_score, generation_budget, score_path
from pktlib.experiments.verdict import correctness_string
from pktlib.models import weights_hash


# ------------------------------------------------------------------------------ cached scores
def test_cached_score_round_trip_reads_back_without_evaluating(tmp_path, tokenizer):
    model = make_model("llama", tokenizer=tokenizer, n_layers=1)
    path = score_path(tmp_path / "run", model, limit=3, max_new_tokens=4, who="student", family="math")
    assert path.name == f"scores-student-{weights_hash(model)[:8]}-math-n3-t4.json"
    assert score_path(tmp_path, model, limit=None, max_new_tokens=9).name == f"scores-{weights_hash(model)[:8]}-nall-t9.json"

    loads = []

    def load():
        loads.append(1)
        return model, tokenizer

    first = cached_score(path, load, "pocket-math", limit=3, max_new_tokens=4, batch_size=3)
    direct = evaluate((model, tokenizer), "pocket-math", limit=3, max_new_tokens=4, batch_size=3, progress=False)
    assert loads == [1] and not first.from_cache
    assert (first.score, first.n) == (direct.score, 3)
    assert first.correct == correctness_string(r.correct for r in direct.records)
    assert first.answers == [r.correct for r in direct.records]
    assert json.loads(path.read_text())["correct"] == first.correct

    def must_not_load():
        raise AssertionError("a cached score was evaluated again")

    again = cached_score(path, must_not_load, "pocket-math", limit=3, max_new_tokens=4, batch_size=3)
    assert again.from_cache and (again.score, again.n, again.cpu_s, again.correct) == (
        first.score, first.n, first.cpu_s, first.correct)
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left beside it


def test_setup_uses_the_shared_generation_budget_and_the_budgets_sizes(tokenizer):
    s = dx.setup(tokenizer, families=["math"], budgets=["laten", "8"], limit=4, margin=1.5)
    assert s.gen_tokens == {"math": generation_budget(tokenizer, "pocket-math", limit=4, margin=1.5)}
    assert s.sizes == {"math": {"laten": len(budget_examples("pocket-math", "laten")[0]), "8": 8}}
    assert s.n_test == {"math": 4}
    t = s.table()
    assert t.loc["training examples (8)", "math"] == 8 and t.loc["test questions", "math"] == 4


def test_run_root_names_the_pair_by_its_weights(tmp_path, tiny_dir):
    other = tmp_path / "other"
    make_model("llama", seed=1).save_pretrained(other)
    root = dx.run_root(tmp_path / "runs", "tiny", tiny_dir, other)
    assert root == tmp_path / "runs" / f"tiny-{weights_hash(tiny_dir)[:8]}-{weights_hash(other)[:8]}"


def test_budget_names():
    assert [dx.budget_label(b) for b in ("laten", "1000")] == ["matched", "N=1000"]
    assert [dx.budget_id(b) for b in ("laten", "1000")] == ["matched", "n1000"]


# ------------------------------------------------------------------------------ tables
STUDENT = [i < 10 for i in range(20)]  # the student gets the first 10 of 20 questions right
REFS = {"math": {"student": 50.0, "teacher": 70.0}}


def _row(method, budget, seed, correct, **extra):
    return {"family": "math", "budget": budget, "method": method, "seed": seed, "score": 100 * sum(correct) / len(correct),
            "n": len(correct), "correct": correctness_string(correct), "train_cpu_s": 10.0, "eval_cpu_s": 2.0,
            "from_record": seed == 0, **extra}


def _results():
    better = [True] * 20  # 10 more than the student in each seed
    worse = [i < 2 for i in range(20)]  # 8 fewer
    return pd.DataFrame([_row("kd", "laten", 0, better), _row("kd", "laten", 1, better),
                         _row("gkd", "laten", 0, worse), _row("gkd", "laten", 1, worse),
                         _row("seqkd", "laten", 0, STUDENT), _row("seqkd", "laten", 1, STUDENT)])


def test_paired_vs_student_pools_seeds_and_gives_the_verdicts():
    t = dx.paired_vs_student(_results(), REFS, {"math": STUDENT}).set_index("method")
    assert list(t.index) == ["gkd", "kd", "seqkd"]  # sorted by family, budget, method
    assert (t.loc["kd", "gap"], t.loc["kd", "only distilled"], t.loc["kd", "only student"]) == (50.0, 20, 0)
    assert t.loc["kd", "p"] == pytest.approx(2 * 0.5 ** 20) and t.loc["kd", "verdict"] == "better"
    assert (t.loc["gkd", "gap"], t.loc["gkd", "only distilled"], t.loc["gkd", "only student"]) == (-40.0, 0, 16)
    assert t.loc["gkd", "p"] == pytest.approx(2 * 0.5 ** 16) and t.loc["gkd", "verdict"] == "worse"
    assert (t.loc["seqkd", "p"], t.loc["seqkd", "verdict"]) == (1.0, "no difference")


def test_paired_vs_student_small_gap_is_no_difference():
    one_more = [i < 11 for i in range(20)]
    t = dx.paired_vs_student(pd.DataFrame([_row("kd", "8", 0, one_more)]), REFS, {"math": STUDENT})
    assert t.loc[0, "gap"] == 5.0 and t.loc[0, "p"] == 1.0 and t.loc[0, "verdict"] == "no difference"


def test_score_table_scorecard_and_bars():
    res = _results()
    table, numbers = dx.score_table(res, REFS, families=["math"], budgets=["laten"], methods=["kd", "gkd"])
    assert list(table.index) == ["student", "teacher", "kd (laten)", "gkd (laten)"]
    assert table.loc["gkd (laten)", "math"] == "10.0 ± 0.0" and table.loc["student", "math"] == "50.0"
    assert numbers == {"kd|laten|math": [100.0, 0.0], "gkd|laten|math": [10.0, 0.0]}
    one_seed = res[res.seed == 0]
    table1, numbers1 = dx.score_table(one_seed, REFS, families=["math"], budgets=["laten"], methods=["kd"])
    assert table1.loc["kd (laten)", "math"] == "100.0" and math.isnan(numbers1["kd|laten|math"][1])
    rows = dx.scorecard_rows(res, pair="p", families=["math"], budgets=["laten"], methods=["kd"], n_test={"math": 20})
    assert rows == [{"method": "distill-kd-matched", "task": "pocket-math", "pair": "p", "score": 100.0, "n": 20}]
    bars = dx.bar_values(res, REFS, families=["math"], budgets=["laten"], methods=["kd", "gkd"])
    assert bars["values"] == {"pocket-math": {"matched": {"kd": 100.0, "gkd": 10.0}}}
    assert bars["references"] == {"pocket-math": {"student": 50.0, "teacher": 70.0}}


# ------------------------------------------------------------------------------ LaTen rows
def _record(path, teacher_sha, student_sha):
    rows = [{"method": "laten", "task": "pocket-math", "score": 40.0, "n": 30},
            {"method": "laten-lr3e-4", "task": "pocket-math", "score": 45.0, "n": 30},
            {"method": "student", "task": "pocket-math", "score": 50.0, "n": 30},  # not a LaTen row
            {"method": "laten", "task": "pocket-code", "score": 5.0, "n": 30}]  # a family not run here
    path.write_text(json.dumps({"models": {"teacher": {"weights_sha256": teacher_sha},
                                           "student": {"weights_sha256": student_sha}},
                                "metrics": {"scorecard": rows}}))


def test_laten_rows_only_from_a_record_of_the_same_pair(tmp_path, tiny_dir):
    student = tmp_path / "student"
    make_model("llama", seed=1).save_pretrained(student)
    rec = tmp_path / "laten.record.json"
    missing = dx.laten_rows(rec, teacher=tiny_dir, student=student, families=["math"])
    assert (missing.found, missing.same_pair, missing.rows) == (False, False, {})
    assert "No LaTen record" in missing.note(rec)

    _record(rec, weights_hash(tiny_dir), weights_hash(student))
    same = dx.laten_rows(rec, teacher=tiny_dir, student=student, families=["math"])
    assert (same.found, same.same_pair) == (True, True) and same.note(rec) is None
    assert same.rows == {"math": {"laten": (40.0, 30), "laten-lr3e-4": (45.0, 30)}}

    _record(rec, weights_hash(tiny_dir), "0" * 16)
    other = dx.laten_rows(rec, teacher=tiny_dir, student=student, families=["math"])
    assert (other.found, other.same_pair, other.rows) == (True, False, {})
    assert "another pocket pair" in other.note(rec)


def test_compare_with_laten_by_wilson_intervals():
    res = pd.DataFrame([_row("kd", "laten", 0, [i < 10 for i in range(100)]),  # 10/100
                        _row("gkd", "laten", 0, [i < 52 for i in range(100)]),  # 52/100
                        _row("seqkd", "laten", 0, [i < 90 for i in range(100)])])  # 90/100
    laten = dx.LatenRows(True, True, {"math": {"laten": (50.0, 100)}})
    c = dx.compare_with_laten(res, laten, methods=["kd", "gkd", "seqkd"]).set_index("method (matched)")
    assert dict(c.verdict) == {"kd": "LaTen higher", "gkd": "overlap", "seqkd": "distillation higher"}
    assert c.loc["kd", "LaTen 95%"] == "[40.4, 59.6]" and c.loc["kd", "distilled 95%"] == "[5.5, 17.4]"
    # no matched-budget runs (or no LaTen rows): nothing to compare
    assert dx.compare_with_laten(res.assign(budget="8"), laten, methods=["kd"]).empty
    assert dx.compare_with_laten(res, dx.LatenRows(False, False, {}), methods=["kd"]).empty


# ------------------------------------------------------------------------------ summary and cost
def test_summary_lines_and_conclusion():
    tests = dx.paired_vs_student(_results(), REFS, {"math": STUDENT})
    lines, text = dx.summary(tests, pd.DataFrame(), REFS, families=["math"], budgets=["laten"],
                             methods=["kd", "gkd", "seqkd"])
    assert lines == ["- **pocket-math, matched budget** (teacher +20.0 over the student): "
                     "kd +50.0 (p = 1.9e-06, better); gkd -40.0 (p = 3.1e-05, worse); seqkd +0.0 (p = 1, no difference)"]
    assert text == ("Against the student, 1 of 3 method/budget/family runs score higher and 1 lower by the paired "
                    "test (p < 0.05); the others do not differ from it.")
    compare = pd.DataFrame({"verdict": ["LaTen higher", "overlap", "overlap"]})
    _, text = dx.summary(tests, compare, REFS, families=["math"], budgets=["laten"], methods=["kd"])
    assert text.endswith(" Beside the LaTen rows of the LaTen chapter, at the matched budget: 1 comparisons favour "
                         "LaTen, 0 favour distillation and 2 overlap.")
    _, text = dx.summary(tests, compare, {"math": {"student": 50.0, "teacher": 50.0}}, families=["math"],
                         budgets=["laten"], methods=["kd"])
    assert text == dx.NOTHING_TO_DISTIL


def test_cost_from_nothing_and_its_sentence():
    res = _results()
    runs = dx.DistillRuns(res, {}, 1.0, [])
    refs = dx.References(REFS, {"math": STUDENT}, {("math", "student"): 30.0, ("math", "teacher"): 60.0})
    cost = dx.cost_from_nothing(runs, refs)
    assert cost == {"training": 60.0, "scoring": 12.0, "student and teacher": 90.0}
    assert runs.n_from_record == 3
    assert dx.cost_text(cost, threads=2, chapter_s=120.0, cpu_s=30.0, n_from_record=3, n_runs=6) == (
        "Cost from nothing: 2.7 CPU-minutes (training 1.0, scoring the distilled students 0.2, the student and "
        "teacher 1.5), torch on 2 threads. This execution: 2.0 minutes, 0.5 CPU-minutes (3 of 6 trainings read "
        "back from finished runs).")
    assert refs.metrics()["reference_cpu_seconds"] == {"math|student": 30.0, "math|teacher": 60.0}
