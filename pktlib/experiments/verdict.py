"""When is one method better than another? The two-test rule the Post-Align chapter applies.

Two methods, each run with the same seeds and scored on the same questions, differ *for real*
only if both sources of noise are beaten:

* **training noise**: the gap of the mean scores exceeds twice its standard error over the seeds,
  ``sqrt(var_a / n_a + var_b / n_b)`` (with one seed per method there is no spread to measure,
  and any non-zero gap passes this test);
* **question sampling**: an exact McNemar test (:func:`pktlib.evaluation.paired_test`) on the
  per-question correctness, each run of ``a`` paired with the same seed's run of ``b`` and the
  seeds pooled, gives p < ``alpha``. Pooling treats a question's pairs from different seeds as
  independent, which makes the test somewhat optimistic.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from pktlib.errors import PktError
from pktlib.analysis.stats import correctness_from_string, correctness_string
from pktlib.evaluation import paired_test

__all__ = ["Comparison", "compare_runs", "correctness_string"]


class Comparison(NamedTuple):
    """``a`` minus ``b``: gap of the mean scores (points), its s.e. over seeds, McNemar p, verdict."""

    gap: float
    se: float
    p_value: float
    real: bool


def compare_runs(a: pd.DataFrame, b: pd.DataFrame, *, alpha: float = 0.05) -> Comparison:
    """Compare two methods' runs (module docstring).

    ``a``, ``b``: one row per seed with columns ``seed``, ``score`` (0-100) and ``correct`` (a
    :func:`correctness_string` over the same questions in the same order). Raises PktError if the
    two methods were not run with the same seeds.
    """
    x, y = a.sort_values("seed"), b.sort_values("seed")
    if list(x.seed) != list(y.seed):
        raise PktError(f"compare_runs pairs runs by seed, but the seeds differ: {list(x.seed)} and {list(y.seed)}")
    gap = x.score.mean() - y.score.mean()
    se = np.sqrt(x.score.var(ddof=1) / len(x) + y.score.var(ddof=1) / len(y)) if len(x) > 1 else float("nan")
    beyond_seeds = bool(abs(gap) > 2 * se) if se == se and se > 0 else bool(gap != 0)
    paired = paired_test(correctness_from_string("".join(x.correct)), correctness_from_string("".join(y.correct)))
    return Comparison(float(gap), float(se), paired.p_value, beyond_seeds and paired.p_value < alpha)
