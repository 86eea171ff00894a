"""The one comparison every pocket chapter reports: effect, intervals over seeds and questions, paired p."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from pktlib.analysis.stats import paired_difference_interval, paired_runs_test, paired_test, t_quantile
from pktlib.errors import PktError
from pktlib.evaluation import protocols
from pktlib.experiments.verdict import COMPARISON_COLUMNS, compare_runs, compare_table, comparison_text
from pktlib.analysis.stats import correctness_string


def test_t_quantile_matches_the_t_table():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(df) == pytest.approx(t, abs=1e-3)
    assert t_quantile(2, 0.90) == pytest.approx(2.920, abs=1e-3)
    assert t_quantile(1000) == pytest.approx(1.962, abs=1e-3)  # tends to the normal 1.960
    with pytest.raises(PktError, match="df"):
        t_quantile(0)
    with pytest.raises(PktError, match="level"):
        t_quantile(3, 1.0)


def _right(k, n=100):
    return correctness_string([i < k for i in range(n)])


def _runs(ks, seeds=None):
    seeds = list(range(len(ks))) if seeds is None else seeds
    return pd.DataFrame({"seed": seeds, "score": [float(k) for k in ks], "correct": [_right(k) for k in ks]})


STUDENT = pd.DataFrame({"score": [40.0], "correct": [_right(40)]})  # a fixed reference: no seed


def test_compare_runs_against_a_fixed_reference():
    c = compare_runs(_runs([50, 52, 54]), STUDENT)
    assert c.gap == pytest.approx(12.0) and c.seeds == 3 and c.n == 100
    se = 2 / math.sqrt(3)  # sd of 50, 52, 54 is 2; the reference has no variance
    assert c.se == pytest.approx(se)
    assert (c.lo, c.hi) == pytest.approx((12 - 4.3027 * se, 12 + 4.3027 * se), abs=1e-3)
    # Each question once: a's mean over its 3 seeds minus the student's. Questions 40-49: all three
    # seeds right (3 x d = 3), 50-51: two of them (2), 52-53: one (1); the student misses them all.
    # Sum 36 is the largest of the 2^14 sign patterns (only it and its negative reach |36|):
    # p = 2 / 2^14. (Pooling the 3 seeds' pairs into one McNemar table gave 36 vs 0 discordant
    # pairs, p = 2 / 2^36, as if there were 36 independent questions.)
    assert c.p_value == 2 / 2 ** 14 == 0.0001220703125
    d = [1.0] * 10 + [2 / 3] * 2 + [1 / 3] * 2 + [0.0] * 86
    sd = math.sqrt(sum((v - 0.12) ** 2 for v in d) / 99)
    assert (c.q_lo, c.q_hi) == pytest.approx((12 - 1.959964 * 100 * sd / 10, 12 + 1.959964 * 100 * sd / 10))
    assert (c.a_only, c.b_only) == (14, 0) and c.real and c.verdict == "better"
    # each seed's own test: 10, 12, 14 questions only a got right -> p < 0.05 each
    assert (c.seeds_better, c.seeds_worse) == (3, 0)
    # a seed column holding null also marks a fixed reference (the LaTen sweep's student row)
    assert compare_runs(_runs([50, 52, 54]), STUDENT.assign(seed=[None])).gap == pytest.approx(12.0)


def test_compare_runs_verdicts_and_one_seed():
    same = compare_runs(_runs([40, 40]), STUDENT)
    assert same.verdict == "same answers" and same.p_value == 1.0 and (same.lo, same.hi) == (0.0, 0.0)
    noisy = compare_runs(_runs([30, 50, 60]), STUDENT)  # mean +6.7 within its spread over seeds
    assert not noisy.real and noisy.verdict == "n.s." and noisy.lo < 0 < noisy.hi
    assert (noisy.seeds_better, noisy.seeds_worse) == (2, 1)  # significant in both directions: unstable
    one = compare_runs(_runs([41]), STUDENT)
    assert math.isnan(one.lo) and math.isnan(one.se) and one.p_value == 1.0 and not one.real
    assert compare_runs(_runs([30]), STUDENT).verdict == "worse"  # 10 questions lost, p = 0.002
    with pytest.raises(PktError, match="same questions"):
        compare_runs(_runs([40]), pd.DataFrame({"score": [40.0], "correct": [_right(40, n=50)]}))


def test_compare_runs_counts_each_question_once_whatever_the_seeds():
    a, b = [True] * 10 + [False] * 10, [True] * 20  # b alone right on 10 questions
    one = pd.DataFrame({"seed": [0], "score": [50.0], "correct": [correctness_string(a)]})
    ref = pd.DataFrame({"score": [100.0], "correct": [correctness_string(b)]})
    # identical seeds add no evidence: the single run's exact McNemar p, 2 * 0.5 ** 10
    # (pooling 3 identical seeds gave 30 vs 0 discordant pairs, p = 2 * 0.5 ** 30)
    for k in (1, 3, 5):
        c = compare_runs(pd.concat([one] * k).assign(seed=range(k)), ref)
        assert (c.p_value, c.a_only, c.b_only, c.seeds) == (0.001953125, 0, 10, k)
        assert (c.q_lo, c.q_hi) == paired_difference_interval(a, b)
        assert c.verdict == "worse" and (c.seeds_better, c.seeds_worse) == (0, k)
    # the same with b's seeds paired seed by seed instead of a fixed reference
    three = compare_runs(pd.concat([one] * 3).assign(seed=range(3)),
                         pd.concat([ref] * 3).assign(seed=range(3)))
    assert (three.p_value, three.b_only) == (0.001953125, 10)


def test_compare_runs_two_seeds_a_side_by_hand():
    # 6 questions, 2 seeds a side, paired by seed
    a = pd.DataFrame({"seed": [0, 1], "score": [50.0, 50.0], "correct": ["111000", "110100"]})
    b = pd.DataFrame({"seed": [0, 1], "score": [100 / 6, 100 / 6], "correct": ["000010", "001000"]})
    c = compare_runs(a, b)
    # means over seeds: a 1, 1, .5, .5, 0, 0 and b 0, 0, .5, 0, .5, 0, so d = 1, 1, 0, .5, -.5, 0
    # (4 x d = 4, 4, 0, 2, -2, 0; sum 8). Of the 16 sign patterns of (4, 4, 2, 2), |sum| >= 8 for
    # +-(4+4+2+2) and +-(4+4+2-2), +-(4+4-2+2): 6 of 16.
    assert c.p_value == 6 / 16
    # (pooling the two seeds' pairs: 6 vs 2 discordant, McNemar p = 2 * 37 / 256 = 0.289)
    assert paired_test([ch == "1" for ch in "111000110100"], [ch == "1" for ch in "000010001000"]).p_value \
        == pytest.approx(74 / 256)
    assert (c.a_only, c.b_only, c.n, c.seeds) == (3, 1, 6, 2) and c.gap == pytest.approx(100 / 3)
    d = [1, 1, 0, 0.5, -0.5, 0]
    half = 1.959964 * math.sqrt(sum((v - 1 / 3) ** 2 for v in d) / 5) / math.sqrt(6)
    assert (c.q_lo, c.q_hi) == pytest.approx((100 * (1 / 3 - half), 100 * (1 / 3 + half)))
    assert c.se == 0 and c.real is False and c.verdict == "n.s."  # no spread over seeds, but p = 0.375
    # the other way round: the same p, the interval and counts mirrored
    r = compare_runs(b, a)
    assert (r.p_value, r.a_only, r.b_only) == (6 / 16, 1, 3) and (r.q_lo, r.q_hi) == pytest.approx((-c.q_hi, -c.q_lo))


def test_compare_runs_with_one_seed_a_side_is_exact_mcnemar_and_agresti_min():
    import random

    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(1, 60)
        x, y = [rng.random() < 0.5 for _ in range(n)], [rng.random() < 0.6 for _ in range(n)]
        frame = lambda v, seed: pd.DataFrame({"seed": [seed], "score": [100 * sum(v) / n],  # noqa: E731
                                              "correct": [correctness_string(v)]})
        t = paired_test(x, y)
        for c in (compare_runs(frame(x, 0), frame(y, 0)), compare_runs(frame(x, 0), frame(y, None))):
            assert (c.p_value, c.a_only, c.b_only, c.n) == (pytest.approx(t.p_value, abs=1e-12), t.a_only, t.b_only, n)
            assert (c.q_lo, c.q_hi) == paired_difference_interval(x, y)


def test_compare_table_finds_each_groups_reference():
    runs = pd.concat([_runs([50, 52, 54]).assign(task="a", method="x"),
                      _runs([40, 40, 40]).assign(task="b", method="x"),
                      _runs([30, 30, 30]).assign(task="b", method="y")])
    ref = pd.concat([STUDENT.assign(task="a"), STUDENT.assign(task="b")])
    t = compare_table(runs, ref, by=["task", "method"], on=["task"])
    assert list(t.columns) == ["task", "method", *COMPARISON_COLUMNS]
    assert list(zip(t.task, t.method, t.verdict)) == [("a", "x", "better"), ("b", "x", "same answers"),
                                                      ("b", "y", "worse")]
    assert t.gap.tolist() == pytest.approx([12.0, 0.0, -10.0])
    # per-seed pairing: a reference run per seed
    paired = compare_table(_runs([50, 52]).assign(m="x"), _runs([40, 41]), by=["m"])
    assert paired.gap.iloc[0] == pytest.approx(10.5) and paired.se.iloc[0] == pytest.approx(math.sqrt(2 / 2 + 0.5 / 2))
    with pytest.raises(PktError, match="no reference rows for task='c'"):
        compare_table(runs.assign(task="c"), ref, by=["task"], on=["task"])


def test_comparison_text_states_effect_intervals_p_and_size():
    c = compare_runs(_runs([50, 52, 54]), STUDENT)
    text = comparison_text(c)
    assert text.startswith(f"+12.0 points (95% CI over seeds [{c.lo:+.1f}, {c.hi:+.1f}], over questions "
                           f"[{c.q_lo:+.1f}, {c.q_hi:+.1f}]; paired p = 0.00012; ")
    assert text.endswith("; 3 seeds x 100 questions)")
    assert comparison_text(c.row()) == text  # a table row reads the same
    assert "over seeds" not in comparison_text(compare_runs(_runs([41]), STUDENT))


def test_run_programs_runs_each_distinct_program_once(monkeypatch):
    ran = []

    def counting(programs, **kw):
        ran.extend(programs)
        return real(programs, **kw)

    real = protocols.run_many
    monkeypatch.setattr(protocols, "run_many", counting)
    monkeypatch.setattr(protocols, "_VERDICTS", protocols.OrderedDict())
    ok, bad = "assert 1 + 1 == 2\n", "assert 1 + 1 == 3\n"
    first = protocols.run_programs([ok, bad, ok])
    assert [r.status for r in first] == ["passed", "failed", "passed"] and ran == [ok, bad]
    again = protocols.run_programs([bad, ok, "assert True\n"])
    assert [r.status for r in again] == ["failed", "passed", "passed"] and ran == [ok, bad, "assert True\n"]
    protocols.run_programs([ok], timeout=5.0)  # another limit: run again
    assert ran[-1] == ok and len(ran) == 4


def test_paired_runs_test_is_mcnemar_with_one_run_a_side_and_counts_each_question_once():
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        a, b = [rng.random() < 0.5 for _ in range(n)], [rng.random() < 0.6 for _ in range(n)]
        r, t = paired_runs_test([a], [b]), paired_test(a, b)
        assert (r.p_value, r.a_ahead, r.b_ahead) == (pytest.approx(t.p_value, abs=1e-12), t.a_only, t.b_only)
        assert (r.lo, r.hi) == paired_difference_interval(a, b)
    a, b = [True] * 10 + [False] * 10, [True] * 20
    assert paired_runs_test([a], [b]).p_value == 0.001953125  # 10 vs 0 discordant: 2 * 0.5 ** 10
    three = paired_runs_test([a, a, a], [b])  # identical runs add no evidence
    assert (three.p_value, three.a_ahead, three.b_ahead, three.diff) == (0.001953125, 0, 10, -50.0)
    assert (three.lo, three.hi) == paired_difference_interval(a, b)
    # a's mean over runs: 2/3 on question 0, 0 on 1, 1 on 2, against b's 0, 0, 0:
    # 3 x differences 2, 0, 3, sum 5; of the 4 sign patterns of (2, 3) only +2+3 and -2-3 reach |5|
    r = paired_runs_test([[1, 0, 1], [1, 0, 1], [0, 0, 1]], [[0, 0, 0]])
    assert (r.p_value, r.a_ahead, r.b_ahead) == (0.5, 2, 0) and r.diff == pytest.approx(100 * 5 / 9)
    assert paired_runs_test([a], [a]).p_value == 1.0
    with pytest.raises(PktError, match=r"the same questions in every run: got lengths \[2, 20\]"):
        paired_runs_test([a], [b, [True, False]])
    with pytest.raises(PktError, match="at least one run a side"):
        paired_runs_test([], [b])
