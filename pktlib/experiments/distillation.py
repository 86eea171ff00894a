"""The distillation baselines beside LaTen (paper Section 5.3, Tables 7 and 8).

For each task family, data budget (``"laten"``: the examples LaTen is given; ``N``: the first N
train examples; :func:`pktlib.distill.budget_examples`), method (supervised KD, SeqKD, GKD;
:data:`pktlib.distill.METHODS`) and seed, the student is distilled from the teacher
(:func:`pktlib.distill.distill`, resumable from its run folder) and scored once on the test
questions (:func:`pktlib.experiments.scoring.cached_score`). :func:`run_grid` returns the runs as
a tidy table; the functions below it turn that table into the chapter's Table 7/8 analogue, its
scorecard rows, the paired tests against the student, the paired tests against the LaTen
chapter's injected students on the same questions (read from its record, which keeps every
run's per-question correctness) with the paper's claim checked on them, the summary and the cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from pktlib.data import load_task
from pktlib.distill import budget_examples, distill
from pktlib.analysis.stats import correctness_from_string, correctness_string, paired_runs_test
from pktlib.errors import PktError
from pktlib.experiments.scoring import cached_score, families_with_teacher_gap, generation_budget, score_path
from pktlib.experiments.laten_sweep import final_runs
from pktlib.experiments.verdict import Comparison, beyond_seed_noise, compare_runs
from pktlib.models import weights_hash
from pktlib.records import read_json

__all__ = ["NOTHING_TO_DISTIL", "budget_label", "budget_id", "run_root", "DistillSetup", "setup", "References",
           "reference_scores", "DistillRuns", "run_grid", "score_table", "scorecard_rows", "bar_values",
           "curve_panels", "paired_vs_student", "LATEN_VERDICTS", "INSIDE_THE_NOISE", "LatenRuns", "laten_runs",
           "laten_choices", "paired_vs_laten", "LATEN_TABLE_COLUMNS", "CLAIM", "laten_claim", "summary",
           "cost_from_nothing", "cost_text"]

NOTHING_TO_DISTIL = ("The teacher does not outscore the student on any family in this run (as with the barely "
                     "trained `tiny` preset): there is nothing to distil, and this run tests the code, not the "
                     "question.")

Pair = tuple[Any, Any]  # (model, tokenizer)


def budget_label(budget: str) -> str:
    """How figures name a budget: ``"matched"`` for ``"laten"``, else ``"N=<budget>"``."""
    return "matched" if budget == "laten" else f"N={budget}"


def budget_id(budget: str) -> str:
    """How scorecard methods name a budget: ``"matched"`` for ``"laten"``, else ``"n<budget>"``."""
    return "matched" if budget == "laten" else f"n{budget}"


def run_root(base: str | Path, preset: str, student: str | Path, teacher: str | Path) -> Path:
    """``base/<preset>-<student hash>-<teacher hash>``: one folder of runs per pair build (8 hex digits each)."""
    return Path(base) / f"{preset}-{weights_hash(student)[:8]}-{weights_hash(teacher)[:8]}"


@dataclass
class DistillSetup:
    """Per family: training examples per budget, test questions scored, new tokens per answer."""

    sizes: dict[str, dict[str, int]]  # family -> budget -> training examples
    n_test: dict[str, int]  # family -> test questions scored
    gen_tokens: dict[str, int]  # family -> generation budget (new tokens)

    def table(self) -> pd.DataFrame:
        """Columns: families; rows: ``training examples (<budget>)``, ``test questions``, ``new tokens per answer``."""
        return pd.DataFrame({f: {**{f"training examples ({b})": n for b, n in self.sizes[f].items()},
                                 "test questions": self.n_test[f], "new tokens per answer": self.gen_tokens[f]}
                             for f in self.sizes})


def setup(tokenizer: Any, *, families: Sequence[str], budgets: Sequence[str], limit: int | None,
          margin: float) -> DistillSetup:
    """The budgets' sizes and each family's generation budget
    (:func:`pktlib.experiments.scoring.generation_budget` on the first ``limit`` test questions).

    Raises PktError (from :func:`pktlib.distill.budget_examples`) for an unknown budget.
    """
    return DistillSetup(
        sizes={f: {b: len(budget_examples(f"pocket-{f}", b)[0]) for b in budgets} for f in families},
        n_test={f: len(load_task(f"pocket-{f}", "test", limit=limit)) for f in families},
        gen_tokens={f: generation_budget(tokenizer, f"pocket-{f}", limit=limit, margin=margin) for f in families})


@dataclass
class References:
    """The student's and the teacher's scores without training, per family."""

    scores: dict[str, dict[str, float]]  # family -> {"student", "teacher"} -> score (0-100)
    student_correct: dict[str, list[bool]]  # family -> the student's per-question correctness
    cpu: dict[tuple[str, str], float]  # (family, who) -> CPU seconds of the scoring when it ran
    seconds: float = 0.0  # wall seconds of this call

    def table(self) -> pd.DataFrame:
        """Columns: families; rows: student, teacher (scores rounded to 0.1)."""
        return pd.DataFrame(self.scores).round(1)

    def metrics(self) -> dict[str, Any]:
        """The record entries ``reference_scores``, ``reference_seconds``, ``reference_cpu_seconds``."""
        return {"reference_scores": self.scores, "reference_seconds": round(self.seconds, 1),
                "reference_cpu_seconds": {f"{f}|{w}": c for (f, w), c in self.cpu.items()}}


def reference_scores(student: Pair, teacher: Pair, *, paths: Mapping[str, str | Path], root: str | Path,
                     families: Sequence[str], gen_tokens: Mapping[str, int], limit: int | None,
                     batch_size: int) -> References:
    """Score the student and the teacher on each family once, kept in ``root`` (:func:`cached_score`).

    ``student``/``teacher``: ``(model, tokenizer)``, both scored with the teacher's tokenizer (the
    pair shares it); ``paths``: ``{"student": folder, "teacher": folder}``, whose weights name the
    cached files ``scores-<who>-<hash>-<family>-n<limit>-t<tokens>.json``.
    """
    t0 = time.perf_counter()
    tok = teacher[1]
    models = {"student": student[0], "teacher": teacher[0]}
    scores: dict[str, dict[str, float]] = {}
    correct, cpu = {}, {}
    for fam in families:
        for who in ("student", "teacher"):
            path = score_path(root, paths[who], limit=limit, max_new_tokens=gen_tokens[fam], who=who, family=fam)
            sc = cached_score(path, (models[who], tok), f"pocket-{fam}", limit=limit,
                              max_new_tokens=gen_tokens[fam], batch_size=batch_size)
            scores.setdefault(fam, {})[who] = sc.score
            cpu[(fam, who)] = sc.cpu_s
            if who == "student":
                correct[fam] = sc.answers
    return References(scores, correct, cpu, time.perf_counter() - t0)


@dataclass
class DistillRuns:
    """Every distillation run of the grid, scored."""

    results: pd.DataFrame  # one row per (family, budget, method, seed): score, n, ..., correct
    curves: dict[tuple[str, str], dict[str, list[tuple[int, float]]]]  # (budget, family) -> label -> loss per step
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def n_from_record(self) -> int:
        """Trainings read back from finished run folders."""
        return int(self.results.from_record.sum()) if len(self.results) else 0

    def metrics(self) -> dict[str, Any]:
        """The record entries ``distill_runs``, ``runs_seconds``, ``training_curves``."""
        return {"distill_runs": self.rows, "runs_seconds": round(self.seconds, 1),
                "training_curves": {f"{b}|{f}|{label}": c for (b, f), d in self.curves.items()
                                    for label, c in d.items()}}


def run_grid(student: Pair, teacher: Pair, *, root: str | Path, families: Sequence[str], budgets: Sequence[str],
             methods: Sequence[str], seeds: Sequence[int], epochs: float, batch_size: int, lr: float | None,
             gen_tokens: Mapping[str, int], limit: int | None, eval_batch: int,
             progress: bool = True) -> DistillRuns:
    """Distil and score every (family, budget, method, seed); runs resume from their folders.

    Run folders are ``root/<family>-<budget>-<method>-s<seed>-e<epochs>-b<batch_size>``; each
    distilled student is scored with the teacher's tokenizer and kept as
    ``scores-<hash>-n<limit>-t<tokens>.json`` in its run folder, loaded only when not scored yet.
    Columns of ``results``: family, budget, method, seed, score (0-100), n, examples, steps, lr,
    final_loss, train_cpu_s, eval_cpu_s (CPU seconds when they ran), from_record, correct.
    """
    tok = teacher[1]
    runs = [(f, b, m, sd) for f in families for b in budgets for m in methods for sd in seeds]
    rows, curves = [], {}
    t0 = time.perf_counter()
    for fam, budget, method, sd in tqdm(runs, desc="distillation runs", disable=not progress):
        task = f"pocket-{fam}"
        res_dir = Path(root) / f"{fam}-{budget}-{method}-s{sd}-e{epochs:g}-b{batch_size}"
        res = distill(student, teacher, task, method=method, budget=budget, lr=lr, epochs=epochs,
                      batch_size=batch_size, micro_batch=batch_size, seed=sd, progress=False, out_dir=res_dir)
        path = score_path(res_dir, res.student_dir, limit=limit, max_new_tokens=gen_tokens[fam])
        sc = cached_score(path, lambda res=res: (res.load_student()[0], tok), task, limit=limit,
                          max_new_tokens=gen_tokens[fam], batch_size=eval_batch)
        rows.append({"family": fam, "budget": budget, "method": method, "seed": sd, "score": sc.score, "n": sc.n,
                     "examples": res.config.n_examples, "steps": res.steps, "lr": res.config.lr,
                     "final_loss": res.final_loss, "train_cpu_s": res.cpu_s, "eval_cpu_s": sc.cpu_s,
                     "from_record": res.from_record, "correct": sc.correct})
        curves.setdefault((budget, fam), {})[f"{method} (seed {sd})"] = res.curve()
    return DistillRuns(pd.DataFrame(rows), curves, time.perf_counter() - t0, rows)


def _agg(results: pd.DataFrame) -> pd.DataFrame:
    return results.groupby(["method", "budget", "family"]).score.agg(["mean", "std"])


def score_table(results: pd.DataFrame, refs: Mapping[str, Mapping[str, float]], *, families: Sequence[str],
                budgets: Sequence[str], methods: Sequence[str]) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """(the Table 7/8 analogue for display, the same as numbers).

    Display: columns families; rows ``student``, ``teacher``, then ``<method> (<budget>)`` as the
    mean over seeds, ``"mean ± std"`` when there are several seeds. Numbers:
    ``{"<method>|<budget>|<family>": [mean, std]}`` (std over seeds, ddof 1; NaN with one seed).
    """
    agg = _agg(results)
    several = results.seed.nunique() > 1
    table = pd.DataFrame({f: {"student": f"{refs[f]['student']:.1f}", "teacher": f"{refs[f]['teacher']:.1f}",
                              **{f"{m} ({b})": f"{agg.loc[(m, b, f), 'mean']:.1f}"
                                 + (f" ± {agg.loc[(m, b, f), 'std']:.1f}" if several else "")
                                 for b in budgets for m in methods}} for f in families})
    numbers = {f"{m}|{b}|{f}": [float(agg.loc[(m, b, f), "mean"]), float(agg.loc[(m, b, f), "std"])]
               for m in methods for b in budgets for f in families}
    return table, numbers


def scorecard_rows(results: pd.DataFrame, *, pair: str, families: Sequence[str], budgets: Sequence[str],
                   methods: Sequence[str], n_test: Mapping[str, int]) -> list[dict[str, Any]]:
    """Scorecard rows ``distill-<method>-<budget id>`` (:func:`budget_id`; mean over seeds) per family."""
    agg = _agg(results)
    return [{"method": f"distill-{m}-{budget_id(b)}", "task": f"pocket-{f}", "pair": pair,
             "score": float(agg.loc[(m, b, f), "mean"]), "n": n_test[f]}
            for m in methods for b in budgets for f in families]


def bar_values(results: pd.DataFrame, refs: Mapping[str, Mapping[str, float]], *, families: Sequence[str],
               budgets: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """Keyword arguments of :func:`pktlib.plots.grouped_bars`: panels ``pocket-<family>``, groups
    :func:`budget_label`, bars methods (mean over seeds, std as error), student and teacher as lines."""
    agg = _agg(results)
    return {"values": {f"pocket-{f}": {budget_label(b): {m: agg.loc[(m, b, f), "mean"] for m in methods}
                                       for b in budgets} for f in families},
            "errors": {f"pocket-{f}": {budget_label(b): {m: agg.loc[(m, b, f), "std"] for m in methods}
                                       for b in budgets} for f in families},
            "references": {f"pocket-{f}": {"student": refs[f]["student"], "teacher": refs[f]["teacher"]}
                           for f in families}}


def curve_panels(runs: DistillRuns, *, families: Sequence[str],
                 budgets: Sequence[str]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """Training curves keyed ``(budget label, "pocket-<family>")`` for :func:`pktlib.plots.curve_grid`."""
    return {(budget_label(b), f"pocket-{f}"): runs.curves[(b, f)] for b in budgets for f in families}


def paired_vs_student(results: pd.DataFrame, refs: Mapping[str, Mapping[str, float]],
                      student_correct: Mapping[str, Sequence[bool]], *, alpha: float = 0.05) -> pd.DataFrame:
    """Each (family, budget, method) against the student: :func:`pktlib.experiments.verdict.compare_runs`
    with the student as the fixed reference.

    Each seed's run is paired with the one student and the seeds pooled. Columns: family, budget,
    method, gap (mean score minus the student's, points, 1 decimal), ci seeds (95% interval of the
    gap over seeds, points; NaN with one seed), only distilled, only student (discordant
    questions), p (pooled exact McNemar), verdict (``"better"``/``"worse"`` by the sign of the gap
    when p < ``alpha``, else ``"no difference"``). Rows sorted by family, budget, method. Raises
    PktError (from :func:`pktlib.evaluation.paired_test`) when a run scored other questions than
    the student.
    """
    rows = []
    for (fam, budget, method), g in results.groupby(["family", "budget", "method"]):
        student = pd.DataFrame({"score": [refs[fam]["student"]],
                                "correct": [correctness_string(student_correct[fam])]})
        c = compare_runs(g, student, alpha=alpha)
        rows.append({"family": fam, "budget": budget, "method": method, "gap": round(c.gap, 1),
                     "ci seeds": [round(c.lo, 1), round(c.hi, 1)], "only distilled": c.a_only,
                     "only student": c.b_only, "p": c.p_value,
                     "verdict": ("better" if c.gap > 0 else "worse") if c.p_value < alpha else "no difference"})
    return pd.DataFrame(rows, columns=["family", "budget", "method", "gap", "ci seeds", "only distilled",
                                       "only student", "p", "verdict"])


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

    def note(self, record: str | Path) -> str | None:
        """Markdown saying why no LaTen comparison is shown, or None when it is."""
        if not self.found:
            return f"No LaTen record at `{record}`: execute the LaTen chapter first to fill this section."
        if not self.same_pair:
            return (f"The LaTen record at `{record}` was run on another pocket pair; its runs are not set "
                    "beside these.")
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
               families: Sequence[str]) -> LatenRuns:
    """Read the LaTen chapter's injected students of ``families`` from its ``record``, per question.

    The runs are the chapter's grid (``metrics.laten_runs``) at each task's Table 5 step and its
    learning-rate sweep (``metrics.lr_sweep_runs``); the plain student's correctness comes from the
    grid's student rows. They count only if the record's ``models.teacher``/``models.student``
    ``weights_sha256`` equal :func:`pktlib.models.weights_hash` of ``teacher``/``student`` (model
    folders). A missing record gives ``found=False``; raises PktError if it holds malformed JSON.
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
    return LatenRuns(bool(laten), same, pd.DataFrame(runs, columns=LATEN_COLUMNS), student_correct, pair)


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
        raise PktError(f"pocket-{fam}: the LaTen record scored {n_laten} test questions and the distillation runs "
                       f"{n_distilled}: they were not scored on the same questions (run both with the same limit)")
    missing = laten.correct.isna() | (laten.correct.astype(str).str.len() != n_laten[0])
    if missing.any():
        raise PktError(f"pocket-{fam}: the LaTen record keeps no per-question correctness for "
                       f"{sorted(set(laten.setting[missing]))}: execute the LaTen chapter again")
    if laten_student and student and laten_student != student:
        differ = sum(x != y for x, y in zip(laten_student, student))
        raise PktError(f"pocket-{fam}: the plain student's answers differ on {differ} of {n_laten[0]} questions "
                       "between the LaTen record and this run: they were not scored on the same questions with the "
                       "same settings")


def _laten_minus_distilled(laten: pd.DataFrame, distilled: pd.DataFrame, alpha: float) -> Comparison:
    # The gap and its interval over seeds (compare_runs); the questions' side is decided separately.
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
    """Each (family, budget, method) of :func:`run_grid` against LaTen's settings of
    :func:`laten_choices`, question by question on the same test questions.

    Effect = LaTen's mean score minus the distilled students' (points), with its 95% interval over
    seeds from :func:`pktlib.experiments.verdict.compare_runs` (one distillation seed: LaTen's
    spread alone; equal numbers of seeds: paired in order; NaN with one seed a side). The questions'
    side is :func:`pktlib.analysis.stats.paired_runs_test` on LaTen's runs against the distilled
    runs: the exact McNemar test when each side has one run, its exact sign-flip generalisation on
    the per-question mean over seeds otherwise, so that LaTen's seeds (identical ones included) do
    not count a question more than once. Columns: family, budget, examples (training examples),
    method, role, LaTen setting, LaTen, distilled (mean scores), effect, ci seeds, ci questions
    (95%, points), LaTen ahead, distilled ahead (questions where that side's mean correctness is
    higher), p, LaTen seeds, distilled seeds, verdict: ``"LaTen better"`` / ``"LaTen worse"`` when
    the gap is beyond the seeds' noise (:func:`pktlib.experiments.verdict.beyond_seed_noise`) and
    p < ``alpha``, else ``"inside the noise"``. Families without LaTen runs are left out.

    ``student_correct``: this run's plain student per family (:class:`References`). Raises
    PktError when the record was run on another pair, when LaTen and the distilled students were
    scored on different numbers of questions, when the record lacks per-question correctness, when
    the two records' plain students answer differently (other questions or scoring settings), or
    when the seeds cannot be paired.
    """
    if not laten.same_pair:
        raise PktError("the LaTen record was run on another pair: " + ", ".join(
            f"{role} {theirs} there, {ours} here" for role, (theirs, ours) in laten.pair.items() if theirs != ours))
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
                q = paired_runs_test([correctness_from_string(x) for x in lat.correct],
                                     [correctness_from_string(x) for x in g.correct])
                real = beyond_seed_noise(c.gap, c.se) and q.p_value < alpha
                rows.append({"family": fam, "budget": budget, "examples": int(g.examples.iloc[0]), "method": method,
                             "role": role, "LaTen setting": setting, "LaTen": round(float(lat.score.mean()), 1),
                             "distilled": round(float(g.score.mean()), 1), "effect": round(c.gap, 1),
                             "ci seeds": [round(c.lo, 1), round(c.hi, 1)], "ci questions": [round(q.lo, 1),
                                                                                            round(q.hi, 1)],
                             "LaTen ahead": q.a_ahead, "distilled ahead": q.b_ahead, "p": q.p_value,
                             "LaTen seeds": len(lat), "distilled seeds": len(g),
                             "verdict": (LATEN_VERDICTS["better" if c.gap > 0 else "worse"] if real
                                         else INSIDE_THE_NOISE)})
    return pd.DataFrame(rows, columns=LATEN_TABLE_COLUMNS)


LATEN_TABLE_COLUMNS = ["family", "budget", "examples", "method", "role", "LaTen setting", "LaTen", "distilled",
                       "effect", "ci seeds", "ci questions", "LaTen ahead", "distilled ahead", "p", "LaTen seeds",
                       "distilled seeds", "verdict"]

CLAIM = "LaTen ≥ distillation at ≤ 100 examples"


def laten_claim(table: pd.DataFrame, *, max_examples: int = 100) -> str:
    """The paper's claim (:data:`CLAIM`, Section 5.3, Tables 7-8) checked on :func:`paired_vs_laten`
    (a Markdown paragraph).

    It is decided on LaTen's representative setting at every budget of at most ``max_examples``
    training examples: the pocket pair agrees when no distillation method beats LaTen by the paired
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
        verdict = ("the pocket pair agrees: no distillation method trained on at most "
                   f"{max_examples} examples beats LaTen by the paired test")
        if counts[INSIDE_THE_NOISE] == len(rep):
            verdict += " (every comparison is inside the noise: LaTen is not below distillation, nor above it)"
    else:
        verdict = "the pocket pair does not agree: " + "; ".join(
            f"{r.method} on pocket-{r.family} ({r.examples} examples) beats LaTen by {-r.effect:.1f} points "
            f"(McNemar p = {r.p:.2g})" for r in lost.itertuples())
    settings = "; ".join(f"pocket-{f}: {st}" for f, st in sorted(set(zip(rep.family, rep["LaTen setting"]))))
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


def summary(tests: pd.DataFrame, versus_laten: pd.DataFrame | None, refs: Mapping[str, Mapping[str, float]], *,
            families: Sequence[str], budgets: Sequence[str], methods: Sequence[str]) -> tuple[list[str], str]:
    """(one markdown line per family and budget, the conclusion) from :func:`paired_vs_student`
    and :func:`paired_vs_laten` (its representative rows; None or empty without LaTen); :data:`NOTHING_TO_DISTIL`
    when the teacher outscores the student on no family."""
    lines = []
    for fam in families:
        for budget in budgets:
            t = tests[(tests.family == fam) & (tests.budget == budget)].set_index("method")
            name = "matched budget" if budget == "laten" else f"N = {budget}"
            parts = [f"{m} {t.loc[m, 'gap']:+.1f} (p = {t.loc[m, 'p']:.2g}, {t.loc[m, 'verdict']})" for m in methods]
            lines.append(f"- **pocket-{fam}, {name}** (teacher {refs[fam]['teacher'] - refs[fam]['student']:+.1f} "
                         f"over the student): " + "; ".join(parts))
    helped, hurt = (tests.verdict == "better").sum(), (tests.verdict == "worse").sum()
    text = (f"Against the student, {helped} of {len(tests)} method/budget/family runs score higher and {hurt} "
            f"lower by the paired test (p < 0.05); the others do not differ from it.")
    rep = (versus_laten[versus_laten.role.str.startswith("representative")] if versus_laten is not None
           and len(versus_laten) else None)
    if rep is not None and len(rep):
        text += (f" Against LaTen's representative setting on the same questions (paired): "
                 f"{(rep.verdict == LATEN_VERDICTS['better']).sum()} of {len(rep)} comparisons favour LaTen, "
                 f"{(rep.verdict == LATEN_VERDICTS['worse']).sum()} favour distillation and "
                 f"{(rep.verdict == INSIDE_THE_NOISE).sum()} are inside the noise.")
    if not families_with_teacher_gap({f: refs[f]["student"] for f in families},
                                     {f: refs[f]["teacher"] for f in families}):
        text = NOTHING_TO_DISTIL
    return lines, text


def cost_from_nothing(runs: DistillRuns, refs: References) -> dict[str, float]:
    """CPU seconds of the chapter from nothing, as stored when each step ran (a rerun reads them back).

    Keys: ``training``, ``scoring`` (the distilled students), ``student and teacher``.
    """
    return {"training": float(runs.results.train_cpu_s.sum()), "scoring": float(runs.results.eval_cpu_s.sum()),
            "student and teacher": float(sum(refs.cpu.values()))}


def cost_text(cost: Mapping[str, float], *, threads: int, chapter_s: float, cpu_s: float, n_from_record: int,
              n_runs: int) -> str:
    """The chapter's cost sentence: from nothing (:func:`cost_from_nothing`) and this execution, in minutes."""
    return (f"Cost from nothing: {sum(cost.values()) / 60:.1f} CPU-minutes (training "
            f"{cost['training'] / 60:.1f}, scoring the distilled students {cost['scoring'] / 60:.1f}, "
            f"the student and teacher {cost['student and teacher'] / 60:.1f}), torch on "
            f"{threads} threads. This execution: {chapter_s / 60:.1f} minutes, "
            f"{cpu_s / 60:.1f} CPU-minutes ({n_from_record} of {n_runs} trainings read back from finished runs).")
