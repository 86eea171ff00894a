"""LaTen against the distillation baselines, question by question (paper Section 5.3, Tables 7-8).

The LaTen chapter's record keeps every injected student's per-question correctness on the test
split; :func:`laten_runs` reads them (only from a record of the same pair), :func:`laten_choices`
picks the settings to compare (the chapter's representative one and the best one),
:func:`paired_vs_laten` sets each distilled student of :func:`pktlib.experiments.distillation.run_grid`
against them on the same questions, and :func:`laten_claim` checks the paper's claim
"LaTen >= distillation at <= 100 examples" on that table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from pktlib.analysis.stats import correctness_string
from pktlib.errors import PktError
from pktlib.experiments.laten_sweep import final_runs
from pktlib.experiments.scoring import family_task
from pktlib.experiments.verdict import Comparison, compare_runs
from pktlib.models import weights_hash
from pktlib.records import read_json

__all__ = ["LATEN_VERDICTS", "INSIDE_THE_NOISE", "LatenRuns", "LATEN_COLUMNS", "laten_runs", "laten_choices",
           "paired_vs_laten", "LATEN_TABLE_COLUMNS", "CLAIM", "laten_claim"]


#: How :func:`paired_vs_laten` names a comparison's outcome (LaTen minus the distilled student).
LATEN_VERDICTS = {"better": "LaTen better", "worse": "LaTen worse"}
INSIDE_THE_NOISE = "inside the noise"


@dataclass
class LatenRuns:
    """The LaTen chapter's injected students, question by question, from its record.

    ``runs``: one row per (family, setting, seed) with columns family, setting (e.g. ``"paper lr,
    rate 0.1, step 4"`` or ``"lr 0.003, penalty 0, rate 0.1, step 2"``), representative (True for
    the chapter's own setting: the paper lr at its ``main_rate`` and the Table 5 step), seed, score
    (0-100), n (questions) and correct (a :func:`correctness_string`). Empty unless the record
    exists and was run on the same pair.
    """

    found: bool  # the record exists
    same_pair: bool  # its teacher and student have the same weights' sha256 as this run's
    runs: pd.DataFrame
    student_correct: dict[str, str] = field(default_factory=dict)  # family -> the plain student's, in that record
    pair: dict[str, tuple[Any, str]] = field(default_factory=dict)  # role -> (record's weights_sha256, this run's)
    dtype: tuple[str | None, str | None] = (None, None)  # the scoring dtype: (the record's, this run's); None: unknown

    @property
    def same_scoring(self) -> bool:
        """False when both scoring dtypes are known and differ: the same model answers some questions
        differently in float32 and bfloat16, so the two runs' answers cannot be paired."""
        theirs, ours = self.dtype
        return theirs is None or ours is None or theirs == ours

    def note(self, record: str | Path) -> str | None:
        """Markdown saying why no LaTen comparison is shown, or None when it is."""
        if not self.found:
            return f"No LaTen record at `{record}`: execute the LaTen chapter first to fill this section."
        if not self.same_pair:
            return (f"The LaTen record at `{record}` was run on another pair (other teacher or student weights); "
                    "its runs are not set beside these.")
        if not self.same_scoring:
            return (f"The LaTen record at `{record}` scored its students in {self.dtype[0]}, this run in "
                    f"{self.dtype[1]}: the same model answers some questions differently in the two, so its runs "
                    f"are not set beside these (score this run with dtype={self.dtype[0]!r} to pair them).")
        return None


LATEN_COLUMNS = ["family", "setting", "representative", "seed", "score", "n", "correct"]


def _laten_setting_rows(metrics: Mapping[str, Any], main_rate: float | None) -> list[dict[str, Any]]:
    # The chapter's grid at each task's Table 5 step, and its learning-rate sweep (every step it scored).
    rows = []
    grid = pd.DataFrame(metrics.get("laten_runs") or [])
    if len(grid):
        for r in final_runs(grid).itertuples():
            rows.append({"task": r.task, "setting": f"{r.config}, rate {r.transfer_rate:g}, step {int(r.step)}",
                         "representative": r.config == "paper lr" and r.transfer_rate == main_rate,
                         "seed": int(r.seed), "score": r.score, "n": r.n, "correct": getattr(r, "correct", None)})
    for r in metrics.get("lr_sweep_runs") or []:
        if r.get("model") == "laten":
            rows.append({"task": r["task"], "setting": f"lr {r['lr']:g}, penalty {r['penalty']:g}, "
                                                        f"rate {r['transfer_rate']:g}, step {int(r['step'])}",
                         "representative": False, "seed": r["seed"], "score": r["score"], "n": r["n"],
                         "correct": r.get("correct")})
    return rows


def laten_runs(record: str | Path, *, teacher: str | Path, student: str | Path,
               families: Sequence[str], dtype: str | None = None) -> LatenRuns:
    """Read the LaTen chapter's injected students of ``families`` from its ``record``, per question.

    The runs are the chapter's grid (``metrics.laten_runs``) at each task's Table 5 step and its
    learning-rate sweep (``metrics.lr_sweep_runs``); the plain student's correctness comes from the
    grid's student rows. They count only if the record's ``models.teacher``/``models.student``
    ``weights_sha256`` equal :func:`pktlib.models.weights_hash` of ``teacher``/``student`` (model
    folders). ``dtype``: this run's scoring dtype (vLLM's ``dtype``; None for a backend without
    one), set beside the record's (its ``dtype`` parameter, else ``metrics.scored_dtype``) in
    :attr:`LatenRuns.dtype`. A missing record gives ``found=False``; raises PktError if it holds
    malformed JSON.
    """
    path = Path(record)
    laten = read_json(path) if path.is_file() else None
    pair = {r: (((laten or {}).get("models") or {}).get(r, {}).get("weights_sha256"), weights_hash(p))
            for r, p in (("teacher", teacher), ("student", student))}
    same = bool(laten) and all(theirs == ours for theirs, ours in pair.values())
    runs, student_correct = [], {}
    if same:
        metrics = laten.get("metrics") or {}
        main_rate = (laten.get("parameters") or {}).get("main_rate")
        for row in _laten_setting_rows(metrics, main_rate):
            fam = row.pop("task").removeprefix("pocket-")
            if fam in families:
                runs.append({"family": fam, **row})
        for row in metrics.get("laten_runs") or []:
            fam = row.get("task", "").removeprefix("pocket-")
            if row.get("model") == "student" and fam in families and row.get("correct"):
                student_correct[fam] = row["correct"]
    theirs = ((laten or {}).get("parameters") or {}).get("dtype") or ((laten or {}).get("metrics") or {}).get(
        "scored_dtype")
    return LatenRuns(bool(laten), same, pd.DataFrame(runs, columns=LATEN_COLUMNS), student_correct, pair,
                     (theirs, dtype))


def laten_choices(runs: pd.DataFrame) -> dict[str, str]:
    """The LaTen settings of one family's :attr:`LatenRuns.runs` to compare with: role -> setting.

    ``"representative"``: the chapter's own setting; ``"best"``: the setting with the highest mean
    score over its seeds (chosen after the fact, so it favours LaTen). When they are the same
    setting (ties go to the representative) the one role is ``"representative = best"``; without a
    representative setting in the runs, only ``"best"``.
    """
    means = runs.groupby("setting", sort=True).score.mean()
    rep = sorted(set(runs.setting[runs.representative.astype(bool)]))
    order = rep + [s for s in means.index if s not in rep]  # ties: the first in this order
    best = max(order, key=lambda s: (means[s], -order.index(s)))
    if not rep:
        return {"best": best}
    return {"representative = best": rep[0]} if best == rep[0] else {"representative": rep[0], "best": best}


def _same_questions(fam: str, laten: pd.DataFrame, distilled: pd.DataFrame, laten_student: str | None,
                    student: str | None) -> None:
    n_laten, n_distilled = sorted(set(laten.n.astype(int))), sorted(set(distilled.n.astype(int)))
    if n_laten != n_distilled or len(n_laten) != 1:
        raise PktError(f"{family_task(fam)}: the LaTen record scored {n_laten} test questions and the distillation "
                       f"runs {n_distilled}: they were not scored on the same questions (run both with the same limit)")
    missing = laten.correct.isna() | (laten.correct.astype(str).str.len() != n_laten[0])
    if missing.any():
        raise PktError(f"{family_task(fam)}: the LaTen record keeps no per-question correctness for "
                       f"{sorted(set(laten.setting[missing]))}: execute the LaTen chapter again")
    if laten_student and student and laten_student != student:
        differ = sum(x != y for x, y in zip(laten_student, student))
        raise PktError(f"{family_task(fam)}: the plain student's answers differ on {differ} of {n_laten[0]} questions "
                       "between the LaTen record and this run: they were not scored on the same questions with the "
                       "same settings")


def _laten_minus_distilled(laten: pd.DataFrame, distilled: pd.DataFrame, alpha: float) -> Comparison:
    # compare_runs: the gap, its interval over seeds and the per-question test (which counts each
    # question once whatever the pairing of seeds below).
    a, b = laten[["seed", "score", "correct"]], distilled[["seed", "score", "correct"]]
    if len(b) == 1:  # one distilled student: the fixed reference of every LaTen seed
        return compare_runs(a, b.assign(seed=None), alpha=alpha)
    if len(a) == 1:
        return compare_runs(b, a.assign(seed=None), alpha=alpha).swapped()
    if len(a) != len(b):
        raise PktError(f"pairing LaTen's {len(a)} seeds with distillation's {len(b)} needs as many seeds on both "
                       "sides, or one seed on either")
    # A LaTen seed (translator init, align batches) and a distillation seed (LoRA init, data order)
    # share nothing, so pairing them in seed order is as good as any other pairing.
    k = range(len(a))
    return compare_runs(a.sort_values("seed").assign(seed=list(k)), b.sort_values("seed").assign(seed=list(k)),
                        alpha=alpha)


def paired_vs_laten(results: pd.DataFrame, laten: LatenRuns, student_correct: Mapping[str, Sequence[bool]], *,
                    alpha: float = 0.05) -> pd.DataFrame:
    """Each (family, budget, method) of :func:`pktlib.experiments.distillation.run_grid` against LaTen's settings of
    :func:`laten_choices`, question by question on the same test questions.

    Effect = LaTen's mean score minus the distilled students' (points), with its 95% interval over
    seeds from :func:`pktlib.experiments.verdict.compare_runs` (one distillation seed: LaTen's
    spread alone; equal numbers of seeds: paired in order; NaN with one seed a side). The questions'
    side is the same comparison's per-question test
    (:func:`pktlib.analysis.stats.paired_runs_test` on LaTen's runs against the distilled runs):
    the exact McNemar test when each side has one run, its exact sign-flip generalisation on the
    per-question mean over seeds otherwise, so that LaTen's seeds (identical ones included) do
    not count a question more than once. Columns: family, budget, examples (training examples),
    method, role, LaTen setting, LaTen, distilled (mean scores), effect, ci seeds, ci questions
    (95%, points), LaTen ahead, distilled ahead (questions where that side's mean correctness is
    higher), p, LaTen seeds, distilled seeds, verdict: ``"LaTen better"`` / ``"LaTen worse"`` when
    the gap is beyond the seeds' noise (:func:`pktlib.experiments.verdict.beyond_seed_noise`) and
    p < ``alpha``, else ``"inside the noise"``. Families without LaTen runs are left out.

    ``student_correct``: this run's plain student per family (:class:`pktlib.experiments.distillation.References`). Raises
    PktError when the record was run on another pair or scored in another dtype, when LaTen and
    the distilled students were scored on different numbers of questions, when the record lacks per-question correctness, when
    the two records' plain students answer differently (other questions or scoring settings), or
    when the seeds cannot be paired.
    """
    if not laten.same_pair:
        raise PktError("the LaTen record was run on another pair: " + ", ".join(
            f"{role} {theirs} there, {ours} here" for role, (theirs, ours) in laten.pair.items() if theirs != ours))
    if not laten.same_scoring:
        raise PktError(f"the LaTen record scored in {laten.dtype[0]} and these runs in {laten.dtype[1]}: "
                       "their answers cannot be paired")
    rows = []
    for fam, fam_runs in laten.runs.groupby("family", sort=True):
        distilled = results[results.family == fam]
        if distilled.empty:
            continue
        ours = student_correct.get(fam)
        _same_questions(fam, fam_runs, distilled, laten.student_correct.get(fam),
                        None if ours is None else correctness_string(ours))
        for role, setting in laten_choices(fam_runs).items():
            lat = fam_runs[fam_runs.setting == setting]
            for (budget, method), g in distilled.groupby(["budget", "method"], sort=True):
                c = _laten_minus_distilled(lat, g, alpha)
                rows.append({"family": fam, "budget": budget, "examples": int(g.examples.iloc[0]), "method": method,
                             "role": role, "LaTen setting": setting, "LaTen": round(float(lat.score.mean()), 1),
                             "distilled": round(float(g.score.mean()), 1), "effect": round(c.gap, 1),
                             "ci seeds": [round(c.lo, 1), round(c.hi, 1)], "ci questions": [round(c.q_lo, 1),
                                                                                            round(c.q_hi, 1)],
                             "LaTen ahead": c.a_only, "distilled ahead": c.b_only, "p": c.p_value,
                             "LaTen seeds": len(lat), "distilled seeds": len(g),
                             "verdict": (LATEN_VERDICTS["better" if c.gap > 0 else "worse"] if c.real
                                         else INSIDE_THE_NOISE)})
    return pd.DataFrame(rows, columns=LATEN_TABLE_COLUMNS)


LATEN_TABLE_COLUMNS = ["family", "budget", "examples", "method", "role", "LaTen setting", "LaTen", "distilled",
                       "effect", "ci seeds", "ci questions", "LaTen ahead", "distilled ahead", "p", "LaTen seeds",
                       "distilled seeds", "verdict"]

CLAIM = "LaTen ≥ distillation at ≤ 100 examples"


def laten_claim(table: pd.DataFrame, *, max_examples: int = 100, subject: str = "the pocket pair") -> str:
    """The paper's claim (:data:`CLAIM`, Section 5.3, Tables 7-8) checked on :func:`paired_vs_laten`
    (a Markdown paragraph).

    It is decided on LaTen's representative setting at every budget of at most ``max_examples``
    training examples: ``subject`` (the pair) agrees when no distillation method beats LaTen by the paired
    test (a verdict ``"LaTen worse"``), and disagrees otherwise, naming where. The best setting's
    verdicts follow as a count.
    """
    small = table[table.examples <= max_examples]
    rep = small[small.role.str.startswith("representative")]
    head = f"**The paper's claim, \"{CLAIM}\"**: "
    if rep.empty:
        return head + ("not decided here: no LaTen runs of this pair beside a distillation budget of at most "
                       f"{max_examples} examples.")
    counts = {v: int((rep.verdict == v).sum()) for v in (*LATEN_VERDICTS.values(), INSIDE_THE_NOISE)}
    lost = rep[rep.verdict == LATEN_VERDICTS["worse"]]
    if lost.empty:
        verdict = (f"{subject} agrees: no distillation method trained on at most "
                   f"{max_examples} examples beats LaTen by the paired test")
        if counts[INSIDE_THE_NOISE] == len(rep):
            verdict += " (every comparison is inside the noise: LaTen is not below distillation, nor above it)"
    else:
        verdict = f"{subject} does not agree: " + "; ".join(
            f"{r.method} on {family_task(r.family)} ({r.examples} examples) beats LaTen by {-r.effect:.1f} points "
            f"(paired p = {r.p:.2g})" for r in lost.itertuples())
    settings = "; ".join(f"{family_task(f)}: {st}" for f, st in sorted(set(zip(rep.family, rep["LaTen setting"]))))
    text = (f"{head}{verdict}. Decided by the paired test on the same test questions: each distilled student "
            f"against LaTen's representative setting ({settings}), exact McNemar test on the questions the two "
            f"answer differently (with several seeds a side, its exact sign-flip form on the per-question mean over "
            f"seeds), p < 0.05, and the gap beyond 2 s.e. over seeds; {len(rep)} comparisons: "
            + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
    best = small[small.role == "best"]
    if len(best):
        text += (" LaTen's best setting per family, chosen after the fact (which favours LaTen): "
                 + ", ".join(f"{int((best.verdict == v).sum())} {v}" for v in counts) + f" of {len(best)}.")
    return text
