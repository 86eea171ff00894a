"""When is one method better than another? The comparison every pocket chapter reports.

Two methods (or a method and a fixed reference such as the plain student), scored on the same
questions, are compared by :func:`compare_runs`, the one place the book's comparisons are made.
It reports the **effect** (gap of the mean scores, points), two 95% intervals and the paired test:

* **training noise**: the interval over seeds, ``gap +- t(k - 1) * se`` with the standard error
  ``sqrt(var_a / k + var_b / k)`` over the ``k`` seeds (a reference without seeds has no variance);
  with one seed there is no spread to measure and the interval is NaN;
* **question sampling**: each question counted once. Its difference ``d_i`` is a's correctness
  averaged over a's seeds minus b's averaged over b's (the reference's one run); the p-value is
  the exact sign-flip test of the ``d_i`` and the interval the normal 95% interval of their mean
  over the questions, both by :func:`pktlib.analysis.stats.paired_runs_test`. With one run a side
  (or a side whose seeds all answer alike) this is the exact McNemar test and the Agresti-Min
  interval.
  The test holds the trained models fixed and asks whether the gap could come from the sampling
  of the questions: it is exact when a question's ``d_i`` is as likely to be ``+v`` as ``-v``
  under the null, and an asymptotically valid randomisation test of "no mean difference"
  otherwise. The seeds' own noise is the other half of the rule.
  It does *not* pool the seeds' per-question pairs into one McNemar table: a question's answers
  are correlated across seeds, so pooling counts a question up to ``k`` times and its p-value can
  be far too small (``k`` identical seeds would look like ``k`` times the evidence). Each seed's
  own exact McNemar test is tallied too (``seeds_better`` / ``seeds_worse``).

A difference is *real* only if both noises are beaten: ``|gap| > 2 se`` (any non-zero gap with
one seed) and the per-question p < ``alpha``. :func:`compare_table` applies it group by group,
:func:`comparison_text` writes one comparison for a chapter's prose.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd

from pktlib.errors import PktError
from pktlib.analysis.stats import (correctness_from_string, correctness_string, paired_runs_test, paired_test,
                                   t_quantile)

__all__ = ["Comparison", "beyond_seed_noise", "compare_runs", "compare_table", "comparison_text", "scorecard_fields", "COMPARISON_COLUMNS",
           "correctness_string"]


class Comparison(NamedTuple):
    """``a`` minus ``b`` (module docstring). Scores and intervals in points (0-100 scale)."""

    gap: float  # mean score of a minus mean score of b
    se: float  # standard error of the gap over seeds (NaN with one seed)
    p_value: float  # exact sign-flip test over the questions (paired_runs_test), two-sided
    real: bool  # both noises beaten (module docstring)
    lo: float = math.nan  # 95% interval of the gap over seeds (NaN with one seed)
    hi: float = math.nan
    q_lo: float = math.nan  # 95% interval over the questions of the mean per-question difference
    q_hi: float = math.nan
    seeds: int = 0  # runs of a (= pairs)
    n: int = 0  # questions per run
    # Questions on which a's correctness averaged over its seeds is above b's (each question once;
    # with one seed a side: the questions only a got right; against a fixed reference: the
    # questions the reference missed and some seed of a got right).
    a_only: int = 0
    b_only: int = 0  # ... below b's
    seeds_better: int = 0  # seeds whose own McNemar test gives p < alpha with a ahead
    seeds_worse: int = 0  # ... with b ahead

    @property
    def verdict(self) -> str:
        """``"better"`` / ``"worse"`` when real, ``"same answers"`` when no question's averaged
        correctness differs (one seed a side or a fixed reference: every run answers every question
        as its partner does), else ``"n.s."``."""
        if self.a_only + self.b_only == 0:
            return "same answers"
        return ("better" if self.gap > 0 else "worse") if self.real else "n.s."

    def swapped(self) -> "Comparison":
        """The same comparison read as ``b`` minus ``a``: gap, intervals, counts and seed tallies
        mirrored (used when the side with a single run must be the fixed reference)."""
        return self._replace(gap=-self.gap, lo=-self.hi, hi=-self.lo, q_lo=-self.q_hi, q_hi=-self.q_lo,
                             a_only=self.b_only, b_only=self.a_only, seeds_better=self.seeds_worse,
                             seeds_worse=self.seeds_better)

    def row(self) -> dict[str, Any]:
        """The fields and the verdict as a plain dict (JSON-ready for a record)."""
        return {**self._asdict(), "verdict": self.verdict}


COMPARISON_COLUMNS = list(Comparison._fields) + ["verdict"]


def _fixed_reference(b: pd.DataFrame) -> bool:
    return len(b) == 1 and ("seed" not in b or pd.isna(b.seed.iloc[0]))


def beyond_seed_noise(gap: float, se: float) -> bool:
    """The training-noise half of the rule (module docstring): ``|gap| > 2 se``, or any non-zero
    gap when there is no spread over seeds (one seed, or identical scores: ``se`` NaN or 0)."""
    return bool(abs(gap) > 2 * se) if se == se and se > 0 else bool(gap != 0)


def compare_runs(a: pd.DataFrame, b: pd.DataFrame, *, alpha: float = 0.05) -> Comparison:
    """Compare two methods' runs, or a method's runs with a fixed reference (module docstring).

    ``a``, ``b``: one row per seed with columns ``seed``, ``score`` (0-100) and ``correct`` (a
    :func:`correctness_string` over the same questions in the same order). ``b`` may instead be a
    single row without a seed (``seed`` missing or null): a reference such as the plain student,
    paired with every run of ``a`` by each seed's own test and counted once by the question test.
    Raises PktError if the two methods were not run with the same seeds, and (from the paired
    tests) if runs were scored on different questions.
    """
    x = a.sort_values("seed")
    if _fixed_reference(b):
        y = pd.DataFrame({"seed": list(x.seed), "score": [float(b.score.iloc[0])] * len(x),
                          "correct": [b.correct.iloc[0]] * len(x)})
        var_b = 0.0
    else:
        y = b.sort_values("seed")
        if list(x.seed) != list(y.seed):
            raise PktError(f"compare_runs pairs runs by seed, but the seeds differ: {list(x.seed)} and {list(y.seed)}")
        var_b = y.score.var(ddof=1) if len(y) > 1 else math.nan
    k = len(x)
    gap = float(x.score.mean() - y.score.mean())
    se = float(np.sqrt(x.score.var(ddof=1) / k + var_b / k)) if k > 1 else math.nan
    beyond_seeds = beyond_seed_noise(gap, se)
    half = t_quantile(k - 1) * se if k > 1 else math.nan
    per_seed = [paired_test(correctness_from_string(ca), correctness_from_string(cb))
                for ca, cb in zip(x.correct, y.correct)]
    # The question side counts each question once: a's runs against b's own runs (the fixed
    # reference once, not once per seed of a).
    runs_b = [b.correct.iloc[0]] if _fixed_reference(b) else list(y.correct)
    q = paired_runs_test([correctness_from_string(c) for c in x.correct],
                         [correctness_from_string(c) for c in runs_b])
    return Comparison(gap, se, q.p_value, beyond_seeds and q.p_value < alpha, gap - half, gap + half,
                      q.lo, q.hi, k, q.n, q.a_ahead, q.b_ahead,
                      sum(t.p_value < alpha and t.a_only > t.b_only for t in per_seed),
                      sum(t.p_value < alpha and t.b_only > t.a_only for t in per_seed))


def compare_table(runs: pd.DataFrame, reference: pd.DataFrame, *, by: Sequence[str], on: Sequence[str] = (),
                  alpha: float = 0.05) -> pd.DataFrame:
    """Each group of ``runs`` (grouped by the columns ``by``) against its reference, by :func:`compare_runs`.

    The reference of a group is the rows of ``reference`` that share its values of ``on`` (a subset
    of ``by``; e.g. ``on=["task"]`` compares every LaTen setting of a task with that task's
    student): one row without a seed (a fixed reference) or one row per seed of the group.
    Returns one row per group: the ``by`` columns, then :data:`COMPARISON_COLUMNS`. Raises
    PktError if a group has no reference rows.
    """
    out = []
    for key, g in runs.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        where = dict(zip(by, key))
        ref = reference
        for col in on:
            ref = ref[ref[col] == where[col]]
        if ref.empty:
            raise PktError(f"compare_table: no reference rows for {', '.join(f'{c}={where[c]!r}' for c in on)}")
        out.append({**where, **compare_runs(g, ref, alpha=alpha).row()})
    return pd.DataFrame(out, columns=[*by, *COMPARISON_COLUMNS])


def comparison_text(c: Any) -> str:
    """One comparison (a :class:`Comparison` or a row of :func:`compare_table`) as prose: effect,
    the intervals over seeds and over questions, the per-question p and the number of seeds."""
    get = (lambda f: getattr(c, f)) if isinstance(c, Comparison) else (lambda f: c[f])
    seeds = int(get("seeds"))
    over_seeds = (f"95% CI over seeds [{get('lo'):+.1f}, {get('hi'):+.1f}], " if seeds > 1 else "")
    return (f"{get('gap'):+.1f} points ({over_seeds}over questions [{get('q_lo'):+.1f}, {get('q_hi'):+.1f}]; "
            f"paired p = {get('p_value'):.2g}; {seeds} seed{'s' if seeds != 1 else ''} x {int(get('n'))} questions)")


def scorecard_fields(c: Any) -> dict[str, Any]:
    """A comparison with the student as the extra fields of a scorecard row (:mod:`pktlib.scorecard`):
    ``effect`` (points), ``ci`` (95% over seeds, or over questions with one seed), ``p`` (per-question test),
    ``seeds``, ``n`` (questions per run) and ``verdict`` (:attr:`Comparison.verdict`). ``c``: a
    :class:`Comparison` or a :func:`compare_table` row."""
    get = (lambda f: getattr(c, f)) if isinstance(c, Comparison) else (lambda f: c[f])
    seeds = int(get("seeds"))
    ci = (get("lo"), get("hi")) if seeds > 1 else (get("q_lo"), get("q_hi"))
    return {"effect": float(get("gap")), "ci": [float(v) for v in ci], "p": float(get("p_value")), "seeds": seeds,
            "n": int(get("n")), "verdict": str(get("verdict"))}
