"""Statistics for comparing methods: proportions with intervals, paired tests over the same questions.

Scores are proportions of questions answered correctly; :func:`wilson_interval` gives their 95%
interval. Two systems scored on the same questions are compared by :func:`paired_test` (exact
McNemar), which counts the sampling of the questions that an interval over seeds misses; two
methods with several runs (seeds) each by :func:`paired_runs_test`, which counts each question once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from pktlib.errors import PktError

__all__ = ["wilson_interval", "PairedTest", "paired_test", "paired_difference_interval", "RunsTest",
           "paired_runs_test", "correctness_string", "t_quantile",
           "correctness_from_string"]


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n, in percent (0-100); (0, 100) when n == 0."""
    if n == 0:
        return 0.0, 100.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of two systems scored on the same questions."""

    n: int  # paired questions
    a_only: int  # questions only system a got right
    b_only: int  # questions only system b got right
    p_value: float  # two-sided


def paired_test(a: Sequence[bool], b: Sequence[bool]) -> PairedTest:
    """Whether ``a`` and ``b`` (per-question correctness, same questions in the same order) differ.

    Exact McNemar: under "no difference" each discordant question is equally likely to favour
    either system, so ``a_only`` is Binomial(a_only + b_only, 1/2); two-sided p-value, doubled
    lower tail, capped at 1. Unlike the spread of scores over seeds, it counts the sampling of
    the questions, which dominates when both systems are scored on ~100 of them.
    """
    if len(a) != len(b):
        raise PktError(f"paired_test needs the same questions for both systems: got {len(a)} and {len(b)} results")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    d = a_only + b_only
    tail = sum(math.comb(d, k) for k in range(min(a_only, b_only) + 1)) / 2 ** d
    return PairedTest(len(a), a_only, b_only, min(1.0, 2 * tail))


def paired_difference_interval(a: Sequence[bool], b: Sequence[bool], z: float = 1.959964) -> tuple[float, float]:
    """95% interval of the difference of accuracies ``a - b`` on the same questions, in points.

    Agresti and Min (2005), the adjusted Wald interval for paired proportions: half a question
    is added to each cell of the 2x2 table (both right, a only, b only, both wrong) before the
    Wald interval of the paired difference is taken; unlike the plain Wald interval it keeps
    close to its nominal coverage at the ~20-100 questions a CPU run scores, and its width
    reflects the discordant questions only. Clipped to [-100, 100]. Raises PktError when the
    two lists differ in length or are empty.
    """
    if len(a) != len(b):
        raise PktError(f"paired_difference_interval needs the same questions for both systems: got {len(a)} "
                       f"and {len(b)} results")
    if not a:
        raise PktError("paired_difference_interval needs at least one question")
    a_only = sum(1 for x, y in zip(a, b) if x and not y) + 0.5
    b_only = sum(1 for x, y in zip(a, b) if y and not x) + 0.5
    n = len(a) + 2.0
    diff = (a_only - b_only) / n
    var = ((a_only + b_only) - (a_only - b_only) ** 2 / n) / n ** 2
    half = z * math.sqrt(max(var, 0.0))
    return 100 * max(-1.0, diff - half), 100 * min(1.0, diff + half)


@dataclass(frozen=True)
class RunsTest:
    """Two methods, each with one or more runs, compared question by question (:func:`paired_runs_test`)."""

    n: int  # questions
    a_ahead: int  # questions where a's mean correctness over its runs is higher than b's
    b_ahead: int  # ... lower
    diff: float  # mean over questions of (a's mean over runs - b's), points
    lo: float  # 95% interval of diff over the questions, points
    hi: float
    p_value: float  # exact sign-flip test, two-sided


def paired_runs_test(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], z: float = 1.959964) -> RunsTest:
    """Whether two methods differ on the same questions, each given as runs (e.g. seeds) of
    per-question correctness, without counting a question more than once.

    Each question gives one difference, ``d_i`` = a's mean correctness over its runs minus b's.
    Under "no difference" each ``d_i`` is as likely to have either sign; the two-sided p-value is
    the exact probability, over the ``2^m`` sign flips of the ``m`` non-zero ``d_i``, of a sum at
    least as far from 0 as the observed one (computed exactly by counting sums; the ``d_i`` are
    multiples of ``1 / (runs_a * runs_b)``): a sign-flip (Fisher-Pitman) permutation test over the
    sampling of the questions, the runs held fixed. It is exact when, under the null, a question's
    ``d_i`` is as likely to be ``+v`` as ``-v`` for every ``v`` (with one run a side that is
    McNemar's null, P(only a right) = P(only b right)); for the weaker null "mean ``d_i`` = 0"
    it is asymptotically valid (the flips' variance ``sum d_i^2`` estimates that of the sum).
    With one run a side this *is* the exact McNemar test (:func:`paired_test`): ``d_i`` is +1/-1
    on the discordant questions. Pooling the runs' pairs
    into one McNemar table instead counts each question once per pair, which shrinks p as if there
    were more questions (k identical runs against one reference look like k times the evidence).
    Interval: :func:`paired_difference_interval` with one run a side (a side whose runs are all
    identical counts as one run), else the normal interval of the mean ``d_i`` (``z`` x its
    standard error over questions). Raises PktError when a side has
    no runs or the runs differ in length.
    """
    if not a or not b:
        raise PktError(f"paired_runs_test needs at least one run a side: got {len(a)} and {len(b)}")
    lengths = {len(r) for r in (*a, *b)}
    if len(lengths) != 1:
        raise PktError(f"paired_runs_test needs the same questions in every run: got lengths {sorted(lengths)}")
    # A side whose runs all answer alike is that one run (its mean over runs is that run).
    a, b = ([runs[0]] if all(list(r) == list(runs[0]) for r in runs) else runs for runs in (a, b))
    n, ka, kb = lengths.pop(), len(a), len(b)
    # k_a * k_b * d_i, an integer
    x = [kb * sum(r[i] for r in a) - ka * sum(r[i] for r in b) for i in range(n)]
    observed = abs(sum(x))
    counts = {0: 1}  # sum of the flipped |x_i| -> number of sign patterns giving it
    for v in (abs(v) for v in x if v):
        nxt: dict[int, int] = {}
        for total, c in counts.items():
            for t in (total + v, total - v):
                nxt[t] = nxt.get(t, 0) + c
        counts = nxt
    m = sum(1 for v in x if v)
    p = sum(c for total, c in counts.items() if abs(total) >= observed) / 2 ** m
    d = [v / (ka * kb) for v in x]
    diff = sum(d) / n if n else 0.0
    if ka == kb == 1:
        lo, hi = paired_difference_interval(a[0], b[0], z)
    else:
        sd = math.sqrt(sum((v - diff) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
        lo, hi = 100 * (diff - z * sd / math.sqrt(n)), 100 * (diff + z * sd / math.sqrt(n))
    return RunsTest(n, sum(v > 0 for v in x), sum(v < 0 for v in x), 100 * diff, lo, hi, min(1.0, p))


def correctness_string(correct: Sequence[bool]) -> str:
    """Per-question correctness as ``"1"``/``"0"`` characters (how runs store it in records)."""
    return "".join("1" if c else "0" for c in correct)


def correctness_from_string(text: str) -> list[bool]:
    """The inverse of :func:`correctness_string`: ``"1"``/``"0"`` characters back to booleans."""
    return [c == "1" for c in text]


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df`` >= 1: the finite series of Abramowitz
    and Stegun 26.7.3 (odd df) and 26.7.4 (even df), in theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):  # terms (1.3...(2j-1)) / (2.4...2j) cos^(2j)
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = math.cos(theta), math.cos(theta)
    for j in range(1, (df - 1) // 2):  # terms (2.4...2j) / (3.5...(2j+1)) cos^(2j+1)
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` critical value of Student's t with ``df`` degrees of freedom (4.303 for
    df 2 at 95%): the t with P(|T| <= t) = ``level``, found by bisection to 1e-10 on the exact CDF
    (Abramowitz and Stegun 26.7.3-4). Raises PktError for ``df`` < 1 or ``level`` outside (0, 1)."""
    if int(df) != df or df < 1:
        raise PktError(f"t_quantile needs an integer df >= 1, got {df}")
    if not 0 < level < 1:
        raise PktError(f"t_quantile needs a level in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, int(df)) < level:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, int(df)) < level else (lo, mid)
    return (lo + hi) / 2

