"""The Evaluation chapter's experiment code: scorer checks, backend agreement, gaps, the protocol comparison."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from conftest import make_model  # noqa: E402
from pktlib import plots  # noqa: E402
from pktlib.data import Example  # noqa: E402
from pktlib.errors import PktError  # noqa: E402
from pktlib.evaluation import PROTOCOLS, EvalResult, ExampleRecord, evaluate  # noqa: E402
from pktlib.experiments import measurement as ms  # noqa: E402


def _ex(answer: str, gold: str, **meta) -> Example:
    return Example([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                   {"answer": gold, **meta})


def _result(task: str, correct: list[bool], completions: list[str], *, score: float | None = None,
            backend: str = "hf", ci=(10.0, 90.0), extracted=None, status="") -> EvalResult:
    recs = [ExampleRecord(str(i), "p", c, (extracted or [None] * len(correct))[i], "g", ok, status)
            for i, (ok, c) in enumerate(zip(correct, completions))]
    n = len(correct)
    return EvalResult(task, "test", "accuracy", 100 * sum(correct) / n if score is None else score, n, sum(correct),
                      ci, backend, "m", 8, examples_per_s=2.5, records=recs)


# ------------------------------------------------------------------------------ scorers on references
def test_shifted_answers_scores_references_full_and_shifted_by_chance():
    # Letters A, A, B, C: shifted, example 0 gets example 1's "A" (right), the others are wrong.
    exs = [_ex(f"The answer is: {g}", g) for g in "AABC"]
    assert ms.shifted_answers(exs, "knowledge") == {"reference_%": 100.0, "shifted_%": 25.0}
    nums = [_ex(f"The answer is {g}.", g) for g in ("3", "4", "5")]
    assert ms.shifted_answers(nums, "math") == {"reference_%": 100.0, "shifted_%": 0.0}
    # Two of three shifted answers right: 66.67 (2 decimals); a wrong reference shows below 100.
    same = [_ex("The answer is 7.", "7"), _ex("The answer is 7.", "7"), _ex("The answer is 2.", "7")]
    assert ms.shifted_answers(same, "math") == {"reference_%": 66.67, "shifted_%": 66.67}
    with pytest.raises(PktError, match="at least one example"):
        ms.shifted_answers([], "math")


def test_scorer_sanity_on_gsm8k_references():
    sanity = ms.scorer_sanity(["gsm8k"], limit=5)
    assert list(sanity) == ["gsm8k"]
    assert sanity["gsm8k"]["reference_%"] == 100.0 and sanity["gsm8k"]["shifted_%"] <= 20.0


# ------------------------------------------------------------------------------ the pair per backend
def _grid() -> dict:
    res = {}
    for backend, flip in (("hf", False), ("vllm", True)):
        res["teacher", backend, "t1"] = _result("t1", [True, True, False, True], ["a", "b", "c", "d"],
                                                backend=backend)
        # vLLM's student differs on two completions, one of which changes the verdict.
        comps = ["a", "x", "c", "y"] if flip else ["a", "b", "c", "d"]
        res["student", backend, "t1"] = _result("t1", [False, flip, False, False], comps, backend=backend)
    return res


def test_gaps_agreement_and_its_summary():
    res = _grid()
    assert ms.teacher_minus_student(res, ["t1"], "hf") == {"t1": 75.0}
    assert ms.teacher_minus_student(res, ["t1"], "vllm") == {"t1": 50.0}
    assert ms.gap_lines({"t1": 75.0, "t2": -1.234}, "hf") == ("t1: teacher - student = +75.00 points (hf backend)\n"
                                                              "t2: teacher - student = -1.23 points (hf backend)")
    rows = ms.backend_agreement(res, ["teacher", "student"], ["t1"], ["hf", "vllm"])
    assert rows == [
        {"model": "teacher", "task": "t1", "identical_completions_%": 100.0, "hf_correct": 3, "vllm_correct": 3,
         "same_verdict_%": 100.0},
        {"model": "student", "task": "t1", "identical_completions_%": 50.0, "hf_correct": 0, "vllm_correct": 1,
         "same_verdict_%": 75.0}]
    mean, text = ms.agreement_summary(rows, ["hf", "vllm"])
    assert mean == 75.0
    assert text == ("On average 75.0% of greedy completions are identical across hf and vllm; "
                    "the lowest is 50.0% (student, t1).")
    assert ms.backend_agreement(res, ["teacher"], ["t1"], ["hf"]) == []
    assert ms.agreement_summary([], ["hf"]) is None
    res["student", "vllm", "t1"].records.pop()
    with pytest.raises(PktError, match="student/t1: hf scored 4 questions and vllm 3"):
        ms.backend_agreement(res, ["student"], ["t1"], ["hf", "vllm"])


def test_score_rows_and_bar_values():
    res = {("teacher", "hf", "pocket-math"): _result("pocket-math", [True, False, True], ["a"] * 3,
                                                     ci=(20.777, 93.849)),
           ("student", "hf", "pocket-math"): _result("pocket-math", [False] * 3, ["a"] * 3, ci=(0.0, 56.15))}
    rows = ms.score_rows(res)
    assert rows[0] == {"model": "teacher", "backend": "hf", "task": "pocket-math", "family": "math",
                       "metric": "accuracy", "score": 66.67, "ci_low": 20.8, "ci_high": 93.8, "n": 3,
                       "examples_per_s": 2.5}
    kw = ms.bar_values(pd.DataFrame(rows), ["pocket-math"], title="T")
    assert kw["values"] == {"T": {"pocket-math": {"teacher/hf": 66.67, "student/hf": 0.0}}}
    below, above = kw["errors"]["T"]["pocket-math"]["teacher/hf"]
    assert below == pytest.approx(66.67 - 20.8) and above == pytest.approx(93.8 - 66.67)
    fig = plots.grouped_bars(**kw, ylabel="score (%)")
    ax = fig.axes[0]
    assert ax.get_title() == "T" and len(ax.patches) == 2
    assert [p.get_height() for p in ax.patches] == [66.67, 0.0]
    # the Wilson interval drawn asymmetric around the teacher's bar
    segs = [s for c in ax.containers if hasattr(c, "errorbar") and c.errorbar for s in c.errorbar.lines[2][0].get_segments()]
    assert np.allclose(segs[0][:, 1], [20.8, 93.8])
    plots.plt.close("all")


# ------------------------------------------------------------------------------ two protocols
def test_generation_cap():
    assert ms.generation_cap(512, 256) == 256
    assert ms.generation_cap(100, 256) == 100
    assert ms.generation_cap(512, None) == 512
    assert ms.generation_cap(0, 256) is None  # next-token scoring: no generation budget
    with pytest.raises(PktError, match="at least 1"):
        ms.generation_cap(512, 0)


def test_diagnostics_reading():
    d = {"gsm8k_pkt_no_number_read": 3, "gsm8k_pkt_says_answer_is": 1, "gsm8k_oi_last_number_is_gold": 2,
         "mmlu_pkt_no_letter_read": 4, "mmlu_pkt_letters": {None: 4}, "mmlu_oi_letters": {"A": 4},
         "code_status": {"humaneval/pkt": {"error": 4}}}
    text = ms.diagnostics_reading(d, 4).splitlines()
    assert text[0].startswith("* **GSM8K.** Under the project's protocol 1 of 4 completions say")
    assert "gold one 2 times" in text[0] and "letters read: {None: 4}" in text[1] and "pick one: {'A': 4}" in text[1]
    assert text[2] == "* **humaneval** (pkt): sandbox outcomes {'error': 4}"


def test_protocol_comparison_on_a_tiny_model(tokenizer):
    model = (make_model("llama", tokenizer=tokenizer, n_layers=1), tokenizer)
    real = ms.protocol_grid(model, limit=2, batch_size=2, max_new_tokens=4)
    assert sorted(real) == sorted((t, p) for t in ms.REAL_SPLITS for p in PROTOCOLS)
    assert real["mbpp", "pkt"].split == "sanitized-test"
    assert real["mmlu", "open-instruct"].max_new_tokens == 0 and real["gsm8k", "open-instruct"].max_new_tokens == 4
    direct = evaluate(model, "gsm8k", "test", protocol="pkt", limit=2, max_new_tokens=4, batch_size=2, progress=False)
    assert [r.completion for r in real["gsm8k", "pkt"].records] == [r.completion for r in direct.records]

    rows = ms.protocol_rows(real)
    assert len(rows) == 8 and {r["n"] for r in rows} == {2}
    assert rows[0]["task"] == "mmlu" and rows[0]["protocol"] == "pkt"
    paired = ms.protocol_paired_tests(real, list(ms.REAL_SPLITS))
    for p in paired:
        a = [r.correct for r in real[p["task"], "pkt"].records]
        b = [r.correct for r in real[p["task"], "open-instruct"].records]
        assert p["only pkt right"] == sum(x and not y for x, y in zip(a, b))
        assert p["only open-instruct right"] == sum(y and not x for x, y in zip(a, b))
        assert p["n"] == 2 and 0 <= p["p (exact McNemar)"] <= 1

    d = ms.protocol_diagnostics(real)
    assert sum(d["mmlu_oi_letters"].values()) == 2 and set(d["mmlu_oi_letters"]) <= set("ABCD")
    assert sum(d["mmlu_pkt_letters"].values()) == 2
    assert d["gsm8k_pkt_no_number_read"] == sum(r.extracted is None for r in real["gsm8k", "pkt"].records)
    assert sorted(d["code_status"]) == ["humaneval/open-instruct", "humaneval/pkt", "mbpp/open-instruct", "mbpp/pkt"]
    assert all(sum(s.values()) == 2 for s in d["code_status"].values())

    side = ms.side_by_side(real)
    assert list(side["task"]) == ["gsm8k", "gsm8k", "mmlu", "mmlu", "humaneval", "humaneval"]
    assert side.iloc[1]["output"] == real["gsm8k", "open-instruct"].records[0].completion[:240]


def test_evaluate_grid_scores_each_model_with_each_backend(tiny_dir):
    res = ms.evaluate_grid({"teacher": tiny_dir, "student": tiny_dir}, ["hf"], ["mmlu"], limit=2)
    assert sorted(res) == [("student", "hf", "mmlu"), ("teacher", "hf", "mmlu")]
    # the same weights give the same greedy completions
    assert ([r.completion for r in res["teacher", "hf", "mmlu"].records]
            == [r.completion for r in res["student", "hf", "mmlu"].records])
    assert ms.teacher_minus_student(res, ["mmlu"], "hf") == {"mmlu": 0.0}
