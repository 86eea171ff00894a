"""The distillation chapter's experiment code: cached scores, tables, paired tests, LaTen rows, summary, cost."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from conftest import make_model
from pktlib.distill import budget_examples
from pktlib.errors import PktError
from pktlib.evaluation import evaluate
from pktlib.experiments import distillation as dx
from pktlib.experiments import laten_vs_distill as lvd
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


def test_paired_vs_student_counts_each_question_once_and_gives_the_verdicts():
    t = dx.paired_vs_student(_results(), REFS, {"math": STUDENT}).set_index("method")
    assert list(t.index) == ["gkd", "kd", "seqkd"]  # sorted by family, budget, method
    # two identical seeds count each question once: 10 questions gained, p = 2 * 0.5 ** 10 (pooling
    # the seeds counted 20, p = 2 * 0.5 ** 20)
    assert (t.loc["kd", "gap"], t.loc["kd", "only distilled"], t.loc["kd", "only student"]) == (50.0, 10, 0)
    assert t.loc["kd", "p"] == 2 * 0.5 ** 10 and t.loc["kd", "verdict"] == "better"
    # 8 questions lost, p = 2 * 0.5 ** 8 (pooled: 16, p = 2 * 0.5 ** 16)
    assert (t.loc["gkd", "gap"], t.loc["gkd", "only distilled"], t.loc["gkd", "only student"]) == (-40.0, 0, 8)
    assert t.loc["gkd", "p"] == 2 * 0.5 ** 8 and t.loc["gkd", "verdict"] == "worse"
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


# ------------------------------------------------------------------------------ against LaTen, paired
REP, BEST = "paper lr, rate 0.1, step 4", "lr 0.003, penalty 0, rate 0.1, step 4"
ALL_RIGHT, NONE_RIGHT = [True] * 20, [False] * 20


def _laten(*settings, student=STUDENT, same_pair=True):
    """LatenRuns of pocket-math from (setting, representative, [correctness per seed]) triples."""
    runs = pd.DataFrame([{"family": "math", "setting": name, "representative": rep, "seed": seed,
                          "score": 100 * sum(c) / len(c), "n": len(c), "correct": correctness_string(c)}
                         for name, rep, per_seed in settings for seed, c in enumerate(per_seed)],
                        columns=lvd.LATEN_COLUMNS)
    pair = {"teacher": ("t" * 16, "t" * 16), "student": ("s" * 16 if same_pair else "0" * 16, "s" * 16)}
    return lvd.LatenRuns(True, same_pair, runs, {"math": correctness_string(student)}, pair)


def test_paired_vs_laten_effect_mcnemar_and_verdicts_on_hand_made_answers():
    swap = [i < 9 or i == 10 for i in range(20)]  # the student's answers with question 9 traded for 10
    res = pd.DataFrame([_row("kd", "laten", 0, ALL_RIGHT, examples=84),  # 10 more than LaTen
                        _row("gkd", "laten", 0, swap, examples=84),  # one each way
                        _row("seqkd", "laten", 0, NONE_RIGHT, examples=84),  # 10 fewer
                        _row("kd", "1000", 0, ALL_RIGHT, examples=1000)])
    t = lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT])), {"math": STUDENT})
    assert list(t.columns) == lvd.LATEN_TABLE_COLUMNS
    t = t.set_index(["budget", "method"])
    kd = t.loc[("laten", "kd")]
    assert (kd.effect, kd["LaTen ahead"], kd["distilled ahead"], kd["LaTen seeds"], kd["distilled seeds"]) == (
        -50.0, 0, 10, 1, 1)
    assert kd.p == 0.001953125  # exact McNemar: 2 * 0.5 ** 10
    assert (kd.verdict, kd.role, kd["LaTen setting"], kd.LaTen, kd.distilled) == (
        "LaTen worse", "representative = best", REP, 50.0, 100.0)
    assert kd["ci questions"][1] < 0  # the paired difference's interval excludes 0
    gkd = t.loc[("laten", "gkd")]
    assert (gkd.effect, gkd["LaTen ahead"], gkd["distilled ahead"], gkd.p, gkd.verdict) == (
        0.0, 1, 1, 1.0, "inside the noise")
    seqkd = t.loc[("laten", "seqkd")]
    assert (seqkd.effect, seqkd["LaTen ahead"], seqkd.p, seqkd.verdict) == (50.0, 10, 0.001953125, "LaTen better")
    assert t.loc[("1000", "kd"), "examples"] == 1000

    claim = lvd.laten_claim(t.reset_index())
    assert "the pocket pair does not agree: kd on pocket-math (84 examples) beats LaTen by 50.0 points " \
           "(paired p = 0.002)" in claim
    assert "3 comparisons: 1 LaTen better, 1 LaTen worse, 1 inside the noise" in claim  # N=1000 is not in the claim
    agrees = lvd.laten_claim(t.drop(index=("laten", "kd")).reset_index())
    assert "the pocket pair agrees: no distillation method trained on at most 100 examples beats LaTen" in agrees
    assert "exact McNemar test" in agrees and "2 comparisons: 1 LaTen better, 0 LaTen worse, 1 inside the noise" in agrees
    assert "not decided here" in lvd.laten_claim(t.reset_index().assign(examples=1000))


def test_paired_vs_laten_counts_each_question_once_whatever_the_seeds():
    twelve = [i < 12 for i in range(20)]
    res = pd.DataFrame([_row("kd", "laten", 0, ALL_RIGHT, examples=84)])
    # three identical LaTen seeds are one LaTen: the same p as one seed (pooling would give 2 * 0.5 ** 30)
    same = lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT] * 3)), {"math": STUDENT}).iloc[0]
    assert (same.p, same["LaTen ahead"], same["distilled ahead"], same["LaTen seeds"]) == (0.001953125, 0, 10, 3)
    t = lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT, STUDENT, twelve])), {"math": STUDENT}).iloc[0]
    assert (t["LaTen ahead"], t["distilled ahead"], t["LaTen seeds"], t["distilled seeds"]) == (0, 10, 3, 1)
    # 3 x per-question differences: -2 on questions 10-11, -3 on 12-19; only the all-negative and
    # all-positive sign patterns of the 10 reach |sum| = 28
    assert t.p == 2 / 2 ** 10
    mean = (50 + 50 + 60) / 3
    half = 4.302653 * pd.Series([50.0, 50.0, 60.0]).std(ddof=1) / 3 ** 0.5  # t(2) x s.e. over LaTen's seeds
    assert t.effect == round(mean - 100, 1) == -46.7
    assert t["ci seeds"] == [round(mean - 100 - half, 1), round(mean - 100 + half, 1)]
    assert t.verdict == "LaTen worse"


def test_paired_vs_laten_one_laten_seed_against_several_distilled_keeps_the_direction():
    res = pd.DataFrame([_row("kd", "laten", 0, ALL_RIGHT, examples=84), _row("kd", "laten", 1, ALL_RIGHT, examples=84)])
    t = lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT])), {"math": STUDENT}).iloc[0]
    assert (t.effect, t["LaTen ahead"], t["distilled ahead"], t["distilled seeds"], t["ci seeds"]) == (
        -50.0, 0, 10, 2, [-50.0, -50.0])
    assert t.p == 0.001953125 and t.verdict == "LaTen worse"
    assert t["ci questions"][0] < t["ci questions"][1] < 0
    with pytest.raises(PktError, match="LaTen's 3 seeds with distillation's 2"):
        lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT] * 3)), {"math": STUDENT})


def test_representative_and_best_laten_settings():
    twelve = [i < 12 for i in range(20)]
    laten = _laten((REP, True, [STUDENT, STUDENT]), (BEST, False, [twelve, STUDENT]), ("other", False, [NONE_RIGHT] * 2))
    assert lvd.laten_choices(laten.runs) == {"representative": REP, "best": BEST}
    tie = _laten((BEST, False, [STUDENT]), (REP, True, [STUDENT]))
    assert lvd.laten_choices(tie.runs) == {"representative = best": REP}  # ties go to the representative
    assert lvd.laten_choices(_laten((BEST, False, [STUDENT])).runs) == {"best": BEST}
    res = pd.DataFrame([_row("kd", "laten", s, STUDENT, examples=84) for s in (0, 1)])
    t = lvd.paired_vs_laten(res, laten, {"math": STUDENT}).set_index("role")
    assert list(t.index) == ["representative", "best"]
    assert (t.loc["best", "effect"], t.loc["best", "LaTen ahead"], t.loc["best", "p"]) == (5.0, 2, 0.5)


def test_paired_vs_laten_refuses_other_questions_or_another_pair():
    res = pd.DataFrame([_row("kd", "laten", 0, ALL_RIGHT, examples=84)])
    with pytest.raises(PktError, match=r"pocket-math: the LaTen record scored \[30\] test questions and the "
                                       r"distillation runs \[20\]: they were not scored on the same questions"):
        lvd.paired_vs_laten(res, _laten((REP, True, [[True] * 30])), {"math": STUDENT})
    moved = [i < 10 or i == 15 for i in range(20)]
    with pytest.raises(PktError, match="the plain student's answers differ on 1 of 20 questions"):
        lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT]), student=moved), {"math": STUDENT})
    with pytest.raises(PktError, match="another pair: student 0000000000000000 there, ssssssssssssssss here"):
        lvd.paired_vs_laten(res, _laten((REP, True, [STUDENT]), same_pair=False), {"math": STUDENT})
    no_answers = _laten((REP, True, [STUDENT]))
    no_answers.runs["correct"] = None
    with pytest.raises(PktError, match="keeps no per-question correctness"):
        lvd.paired_vs_laten(res, no_answers, {"math": STUDENT})
    # a family LaTen did not run is left out, not an error
    assert lvd.paired_vs_laten(res.assign(family="code"), _laten((REP, True, [STUDENT])), {"code": STUDENT}).empty


def _laten_record(path, teacher_sha, student_sha, dtype=None):
    def row(model, seed=None, step=None, correct=STUDENT, **extra):
        return {"task": "pocket-math", "model": model, "score": 100 * sum(correct) / 20, "n": 20, "seed": seed,
                "step": step, "transfer_rate": None if model != "laten" else 0.1, "config": "paper lr", "lr": 3e-5,
                "correct": correctness_string(correct), **extra}
    grid = [row("student"), row("teacher", correct=ALL_RIGHT),
            row("laten", 0, 4), row("laten", 1, 4, correct=NONE_RIGHT),
            row("laten", 0, 2, correct=ALL_RIGHT),  # not the Table 5 step (4 for math): left out
            row("laten", 0, 4, transfer_rate=0.2), row("laten", 0, 4, config="scale-matched lr", lr=6e-4),
            {**row("laten", 0, 2), "task": "pocket-code"}]  # a family not run here
    sweep = [{**row("laten", 0, 2), "lr": 0.003, "penalty": 0.0}, {**row("student"), "lr": 0.003, "penalty": 0.0}]
    path.write_text(json.dumps({"models": {"teacher": {"weights_sha256": teacher_sha},
                                           "student": {"weights_sha256": student_sha}},
                                "parameters": {"main_rate": 0.1, **({"dtype": dtype} if dtype else {})},
                                "metrics": {"laten_runs": grid, "lr_sweep_runs": sweep}}))


def test_laten_runs_read_per_question_from_a_record_of_the_same_pair(tmp_path, tiny_dir):
    student = tmp_path / "student"
    make_model("llama", seed=1).save_pretrained(student)
    rec = tmp_path / "laten.record.json"
    missing = lvd.laten_runs(rec, teacher=tiny_dir, student=student, families=["math"])
    assert (missing.found, missing.same_pair, len(missing.runs)) == (False, False, 0)
    assert "No LaTen record" in missing.note(rec)

    _laten_record(rec, weights_hash(tiny_dir), weights_hash(student))
    same = lvd.laten_runs(rec, teacher=tiny_dir, student=student, families=["math"])
    assert (same.found, same.same_pair) == (True, True) and same.note(rec) is None
    got = same.runs.sort_values(["setting", "seed"])
    assert list(zip(got.setting, got.representative, got.seed, got.score)) == [
        ("lr 0.003, penalty 0, rate 0.1, step 2", False, 0, 50.0),
        ("paper lr, rate 0.1, step 4", True, 0, 50.0), ("paper lr, rate 0.1, step 4", True, 1, 0.0),
        ("paper lr, rate 0.2, step 4", False, 0, 50.0), ("scale-matched lr, rate 0.1, step 4", False, 0, 50.0)]
    assert set(got.family) == {"math"} and (got.correct.str.len() == 20).all()
    assert same.student_correct == {"math": correctness_string(STUDENT)}

    _laten_record(rec, weights_hash(tiny_dir), "0" * 16)
    other = lvd.laten_runs(rec, teacher=tiny_dir, student=student, families=["math"])
    assert (other.found, other.same_pair, len(other.runs)) == (True, False, 0)
    assert "another pair" in other.note(rec)
    assert other.pair["student"] == ("0" * 16, weights_hash(student))


def test_laten_runs_scored_in_another_dtype_are_not_paired(tmp_path, tiny_dir):
    """The real-pair LaTen chapter scores in float32: a distillation run scored in bfloat16 is told so up
    front (a note, and paired_vs_laten refuses), not after its training by the plain students' answers."""
    student = tmp_path / "student"
    make_model("llama", seed=1).save_pretrained(student)
    rec = tmp_path / "laten.record.json"
    _laten_record(rec, weights_hash(tiny_dir), weights_hash(student), dtype="float32")
    kw = dict(teacher=tiny_dir, student=student, families=["math"])
    other = lvd.laten_runs(rec, dtype="bfloat16", **kw)
    assert other.dtype == ("float32", "bfloat16") and not other.same_scoring and other.same_pair
    assert "scored its students in float32, this run in bfloat16" in other.note(rec) and "dtype='float32'" in other.note(rec)
    with pytest.raises(PktError, match="scored in float32 and these runs in bfloat16"):
        lvd.paired_vs_laten(_results(), other, {"math": STUDENT})
    for dtype in ("float32", None):  # the same dtype, or a backend without one (the pocket chapters)
        same = lvd.laten_runs(rec, dtype=dtype, **kw)
        assert same.same_scoring and same.note(rec) is None


# ------------------------------------------------------------------------------ summary and cost
def test_summary_lines_and_conclusion():
    tests = dx.paired_vs_student(_results(), REFS, {"math": STUDENT})
    lines, text = dx.summary(tests, None, REFS, families=["math"], budgets=["laten"],
                             methods=["kd", "gkd", "seqkd"])
    assert lines == ["- **pocket-math, matched budget** (teacher +20.0 over the student): "
                     "kd +50.0 (p = 0.002, better); gkd -40.0 (p = 0.0078, worse); seqkd +0.0 (p = 1, no difference)"]
    assert text == ("Against the student, 1 of 3 method/budget/family runs score higher and 1 lower by the paired "
                    "test (p < 0.05); the others do not differ from it.")
    versus = pd.DataFrame({"role": ["representative", "best", "representative = best", "representative"],
                           "verdict": ["LaTen better", "LaTen worse", "inside the noise", "LaTen worse"]})
    _, text = dx.summary(tests, versus, REFS, families=["math"], budgets=["laten"], methods=["kd"])
    assert text.endswith(" Against LaTen's representative setting on the same questions (paired): 1 of 3 comparisons "
                         "favour LaTen, 1 favour distillation and 1 are inside the noise.")
    assert dx.summary(tests, None, REFS, families=["math"], budgets=["laten"], methods=["kd"])[1] == (
        dx.summary(tests, pd.DataFrame(), REFS, families=["math"], budgets=["laten"], methods=["kd"])[1])
    _, text = dx.summary(tests, versus, {"math": {"student": 50.0, "teacher": 50.0}}, families=["math"],
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


def test_grid_runs_give_laten_budget_and_larger_budgets_their_own_seeds():
    from pktlib.experiments.distillation import grid_runs

    runs = grid_runs(["math"], ["laten", "1000"], ["seqkd"], seeds=[0, 1, 2], large_seeds=[0])
    assert runs == [("math", "laten", "seqkd", 0), ("math", "laten", "seqkd", 1), ("math", "laten", "seqkd", 2),
                    ("math", "1000", "seqkd", 0)]
    assert grid_runs(["math"], ["laten", "8"], ["gkd"], seeds=[3, 4]) == [
        ("math", "laten", "gkd", 3), ("math", "laten", "gkd", 4), ("math", "8", "gkd", 3), ("math", "8", "gkd", 4)]


# ------------------------------------------------------------------------------ a real pair's task
def test_run_grid_on_a_paper_task_trains_in_the_chat_format_and_scores_through_the_pair_scorer(tmp_path, tokenizer):
    """The real pair's chapter: family "gsm8k" is the paper task itself, the training prompts use
    the pair's chat template, and each distilled student is scored by the pair's scorer from its
    folder, on the same seeded questions as the student and the teacher."""
    import copy

    from pktlib.experiments import real_pair as rp
    from pktlib.models import load_model

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    root = tmp_path / "pair"
    for role, kw in (("teacher-chat", dict(hidden_size=96, n_heads=6, seed=1)), ("student-chat", dict(seed=2))):
        # room for SeqKD's teacher answers (1.5x the longest reference answer) after a GSM8K prompt
        make_model("qwen2", tokenizer=chat, max_position_embeddings=2048, **kw).save_pretrained(root / role)
        chat.save_pretrained(root / role)
    teacher, student = load_model(root / "teacher-chat"), load_model(root / "student-chat")
    settings = rp.ScoreSettings(backend="hf", max_new_tokens=4, batch_size=4)
    scorer = rp.SavedScorer.for_pair(str(root), {"gsm8k": 2}, {"teacher": teacher[0], "student": student[0]},
                                     teacher[1], settings=settings, root=tmp_path / "scores", work=tmp_path / "work",
                                     progress=False)
    refs = dx.reference_scores(student, teacher, paths={}, root=tmp_path, families=["gsm8k"], scorer=scorer)
    idx = rp.subset_indices("gsm8k", 2)
    own = rp.score_model(root / "student-chat", "gsm8k", idx, settings=settings, root=tmp_path / "scores")
    assert refs.student_correct["gsm8k"] == [r.correct for r in own.records]

    runs = dx.run_grid(student, teacher, root=tmp_path / "runs", families=["gsm8k"], budgets=["4"],
                       methods=["supervised-kd"], seeds=[0], epochs=1, batch_size=4, micro_batch=2, lr=1e-2,
                       scorer=scorer, template="auto", max_length=256, progress=False)
    row = runs.results.iloc[0]
    run = tmp_path / "runs" / "gsm8k-4-supervised-kd-s0-e1-b4"
    cfg = json.loads((run / "distill_config.json").read_text())
    assert (cfg["task"], cfg["template"], cfg["budget"], cfg["micro_batch"]) == ("gsm8k", "auto", "train:4", 2)
    assert (row.family, row.examples, row.n) == ("gsm8k", 4, 2)
    direct = rp.score_model(run / "student", "gsm8k", idx, settings=settings, root=tmp_path / "fresh-scores")
    assert row.correct == correctness_string(r.correct for r in direct.records) and row.score == direct.score
    assert not (tmp_path / "work" / "transferred").exists()  # scored from its folder: nothing saved again
    rows = dx.scorecard_rows(runs.results, pair="tiny", families=["gsm8k"], budgets=["4"], methods=["supervised-kd"],
                             n_test={"gsm8k": 2})
    assert rows[0]["task"] == "gsm8k"
    bars = dx.bar_values(runs.results, refs.scores, families=["gsm8k"], budgets=["4"], methods=["supervised-kd"])
    assert list(bars["values"]) == ["gsm8k"]
    with pytest.raises(PktError, match="gen_tokens"):
        dx.run_grid(student, teacher, root=tmp_path / "runs", families=["gsm8k"], budgets=["4"],
                    methods=["supervised-kd"], seeds=[0], epochs=1, batch_size=4, lr=1e-2, progress=False)

    # SeqKD's teacher answers from the scorer's backend serving the teacher's checkpoint: the
    # answers the teacher is scored with (chat template, stop strings), freed after
    from pktlib.data import format_prompt, load_examples
    from pktlib.distill import budget_examples
    from pktlib.evaluation import stop_strings

    dx.run_grid(student, teacher, root=tmp_path / "runs", families=["gsm8k"], budgets=["4"], methods=["seqkd"],
                seeds=[0], epochs=1, batch_size=4, micro_batch=2, lr=1e-2, scorer=scorer, template="auto",
                max_length=256, teacher_generator=scorer.opener(teacher[0], dtype="float32"), progress=False)
    saved = load_examples(tmp_path / "runs" / "gsm8k-4-seqkd-s0-e1-b4" / "teacher_answers.jsonl")
    assert {e.meta["teacher_backend"] for e in saved} == {"hf-float32"}  # the opener's settings, named
    assert scorer.opener(teacher[0], dtype="bfloat16").label == "hf-bfloat16" and scorer.settings.dtype == "float32"
    examples, _ = budget_examples("gsm8k", "4")
    max_new = json.loads((tmp_path / "runs" / "gsm8k-4-seqkd-s0-e1-b4" / "distill_config.json").read_text())
    with scorer.generator(root / "teacher-chat") as gen:
        direct = gen.generate([format_prompt(e.messages, tokenizer=teacher[1], template="auto") for e in examples],
                              max_new["max_new_tokens"], stop_strings(teacher[1]))
    assert [e.answer for e in saved] == [d.strip() for d in direct]
    with pytest.raises(PktError, match="neither one of the pair's models"):
        with scorer.generator(copy.deepcopy(teacher[0])):
            pass
