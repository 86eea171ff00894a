"""The distillation baselines beside LaTen (paper Section 5.3, Tables 7 and 8).

For each task family, data budget (``"laten"``: the examples LaTen is given; ``N``: the first N
train examples; :func:`pktlib.distill.budget_examples`), method (supervised KD, SeqKD, GKD;
:data:`pktlib.distill.METHODS`) and seed, the student is distilled from the teacher
(:func:`pktlib.distill.distill`, resumable from its run folder) and scored once on the test
questions (:func:`pktlib.experiments.scoring.cached_score`). :func:`run_grid` returns the runs as
a tidy table; the functions below it turn that table into the chapter's Table 7/8 analogue, its
scorecard rows, the paired tests against the student, the summary and the cost. The paired tests
against the LaTen chapter's injected students are :mod:`pktlib.experiments.laten_vs_distill`.

The grid's ``families`` name pocket-pair families ("math": the task ``pocket-math``) or paper
tasks ("gsm8k": itself, :func:`family_task`). By default a distilled student is scored with the
project's evaluator on the task's first test questions; a ``scorer`` (the real pair's
:class:`pktlib.experiments.real_pair.SavedScorer`: vLLM, the paper's protocol, a seeded subset)
scores it instead, from its saved folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from pktlib.data import load_task
from pktlib.distill import budget_examples, distill
from pktlib.analysis.stats import correctness_string
from pktlib.errors import PktError
from pktlib.evaluation import Generator
from pktlib.experiments.scoring import (CachedScore, cached_score, families_with_teacher_gap, family_task,
                                        generation_budget, run_root, score_once, score_path)
from pktlib.experiments.laten_vs_distill import INSIDE_THE_NOISE, LATEN_VERDICTS
from pktlib.experiments.verdict import compare_runs

__all__ = ["NOTHING_TO_DISTIL", "budget_label", "budget_id", "budget_sizes", "run_root", "DistillSetup", "setup",
           "References", "reference_scores", "DistillRuns", "grid_runs", "run_grid", "score_table", "scorecard_rows", "bar_values",
           "curve_panels", "paired_vs_student", "summary",
           "cost_from_nothing", "cost_text"]

NOTHING_TO_DISTIL = ("The teacher does not outscore the student on any family in this run (as with the barely "
                     "trained `tiny` preset): there is nothing to distil, and this run tests the code, not the "
                     "question.")

Pair = tuple[Any, Any]  # (model, tokenizer)
Scorer = Callable[[Any, str], Any]  # scorer(model or checkpoint folder, task) -> EvalResult (real_pair.SavedScorer)


def budget_label(budget: str) -> str:
    """How figures name a budget: ``"matched"`` for ``"laten"``, else ``"N=<budget>"``."""
    return "matched" if budget == "laten" else f"N={budget}"


def budget_id(budget: str) -> str:
    """How scorecard methods name a budget: ``"matched"`` for ``"laten"``, else ``"n<budget>"``."""
    return "matched" if budget == "laten" else f"n{budget}"


def budget_sizes(families: Sequence[str], budgets: Sequence[str]) -> dict[str, dict[str, int]]:
    """family -> budget -> training examples (:func:`pktlib.distill.budget_examples` on
    :func:`family_task`). Raises PktError for an unknown budget."""
    return {f: {b: len(budget_examples(family_task(f), b)[0]) for b in budgets} for f in families}


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
        sizes=budget_sizes(families, budgets),
        n_test={f: len(load_task(family_task(f), "test", limit=limit)) for f in families},
        gen_tokens={f: generation_budget(tokenizer, family_task(f), limit=limit, margin=margin) for f in families})


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
                     families: Sequence[str], gen_tokens: Mapping[str, int] | None = None, limit: int | None = None,
                     batch_size: int = 100, scorer: Scorer | None = None) -> References:
    """Score the student and the teacher on each family once, kept in ``root`` (:func:`cached_score`).

    ``student``/``teacher``: ``(model, tokenizer)``, both scored with the teacher's tokenizer (the
    pair shares it); ``paths``: ``{"student": folder, "teacher": folder}``, whose weights name the
    cached files ``scores-<who>-<hash>-<family>-n<limit>-t<tokens>.json``. With a ``scorer``
    (:func:`run_grid`), the models are scored by it instead (it keeps its own cache; ``paths``,
    ``root``, ``gen_tokens``, ``limit`` and ``batch_size`` are then unused) and ``cpu`` holds its
    generation's wall seconds.
    """
    t0 = time.perf_counter()
    tok = teacher[1]
    models = {"student": student[0], "teacher": teacher[0]}
    scores: dict[str, dict[str, float]] = {}
    correct, cpu = {}, {}
    for fam in families:
        for who in ("student", "teacher"):
            if scorer is not None:
                sc = score_once(scorer, None, models[who], family_task(fam))
            else:
                path = score_path(root, paths[who], limit=limit, max_new_tokens=gen_tokens[fam], who=who, family=fam)
                sc = cached_score(path, (models[who], tok), family_task(fam), limit=limit,
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


def grid_runs(families: Sequence[str], budgets: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              large_seeds: Sequence[int] | None = None) -> list[tuple[str, str, str, int]]:
    """The grid's (family, budget, method, seed) runs: ``seeds`` at LaTen's budget (``"laten"``, the
    claim's budget: <= 100 examples, cheap), ``large_seeds`` (default: ``seeds``) at a number of
    train examples (N = 1000 costs ~15x as much CPU per seed)."""
    return [(f, b, m, sd) for f in families for b in budgets for m in methods
            for sd in (seeds if b == "laten" or large_seeds is None else large_seeds)]


def _score_distilled(res: Any, task: str, tok: Any, *, scorer: Scorer | None, gen_tokens: int | None,
                     limit: int | None, eval_batch: int) -> CachedScore:
    if scorer is not None:  # it caches by the saved student's weights itself
        return score_once(scorer, None, res.student_dir, task)
    path = score_path(res.out_dir, res.student_dir, limit=limit, max_new_tokens=gen_tokens)
    return cached_score(path, lambda: (res.load_student()[0], tok), task, limit=limit, max_new_tokens=gen_tokens,
                        batch_size=eval_batch)


def run_grid(student: Pair, teacher: Pair, *, root: str | Path, families: Sequence[str], budgets: Sequence[str],
             methods: Sequence[str], seeds: Sequence[int], epochs: float, batch_size: int, lr: float | None,
             gen_tokens: Mapping[str, int] | None = None, limit: int | None = None, eval_batch: int = 100,
             large_seeds: Sequence[int] | None = None, scorer: Scorer | None = None, micro_batch: int | None = None,
             template: str = "default", max_length: int = 512,
             teacher_generator: Callable[[], ContextManager[Generator]] | None = None,
             progress: bool = True) -> DistillRuns:
    """Distil and score every (family, budget, method, seed) of :func:`grid_runs`; runs resume
    from their folders.

    Run folders are ``root/<family>-<budget>-<method>-s<seed>-e<epochs>-b<batch_size>``; each
    distilled student is scored with the teacher's tokenizer and kept as
    ``scores-<hash>-n<limit>-t<tokens>.json`` in its run folder, loaded only when not scored yet.
    With a ``scorer`` (e.g. :class:`pktlib.experiments.real_pair.SavedScorer`), each distilled
    student is scored by it from its folder instead (``gen_tokens``, ``limit`` and ``eval_batch``
    unused; ``eval_cpu_s`` then holds the generation's wall seconds). ``micro_batch``: examples
    per forward pass (default ``batch_size``); ``template`` and ``max_length``: the training
    sequences' prompt format and length, ``teacher_generator`` the backend of SeqKD's teacher
    answers (:func:`pktlib.distill.distill`).
    Columns of ``results``: family, budget, method, seed, score (0-100), n, examples, steps, lr,
    final_loss, train_cpu_s, eval_cpu_s (CPU seconds when they ran), from_record, correct.
    Raises PktError without ``gen_tokens`` for a family when no ``scorer`` is given.
    """
    if scorer is None and (gen_tokens is None or set(families) - set(gen_tokens)):
        raise PktError(f"run_grid without a scorer needs `gen_tokens` for every family; got {gen_tokens} "
                       f"for {list(families)}")
    tok = teacher[1]
    runs = grid_runs(families, budgets, methods, seeds, large_seeds)
    rows, curves = [], {}
    t0 = time.perf_counter()
    for fam, budget, method, sd in tqdm(runs, desc="distillation runs", disable=not progress):
        task = family_task(fam)
        res_dir = Path(root) / f"{fam}-{budget}-{method}-s{sd}-e{epochs:g}-b{batch_size}"
        res = distill(student, teacher, task, method=method, budget=budget, lr=lr, epochs=epochs,
                      batch_size=batch_size, micro_batch=micro_batch or batch_size, template=template,
                      max_length=max_length, seed=sd, teacher_generator=teacher_generator, progress=False,
                      out_dir=res_dir)
        sc = _score_distilled(res, task, tok, scorer=scorer, gen_tokens=(gen_tokens or {}).get(fam), limit=limit,
                              eval_batch=eval_batch)
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
    return [{"method": f"distill-{m}-{budget_id(b)}", "task": family_task(f), "pair": pair,
             "score": float(agg.loc[(m, b, f), "mean"]), "n": n_test[f]}
            for m in methods for b in budgets for f in families]


def bar_values(results: pd.DataFrame, refs: Mapping[str, Mapping[str, float]], *, families: Sequence[str],
               budgets: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """Keyword arguments of :func:`pktlib.plots.grouped_bars`: panels :func:`family_task`, groups
    :func:`budget_label`, bars methods (mean over seeds, std as error), student and teacher as lines."""
    agg = _agg(results)
    return {"values": {family_task(f): {budget_label(b): {m: agg.loc[(m, b, f), "mean"] for m in methods}
                                       for b in budgets} for f in families},
            "errors": {family_task(f): {budget_label(b): {m: agg.loc[(m, b, f), "std"] for m in methods}
                                       for b in budgets} for f in families},
            "references": {family_task(f): {"student": refs[f]["student"], "teacher": refs[f]["teacher"]}
                           for f in families}}


def curve_panels(runs: DistillRuns, *, families: Sequence[str],
                 budgets: Sequence[str]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """Training curves keyed ``(budget label, family_task(family))`` for :func:`pktlib.plots.curve_grid`."""
    return {(budget_label(b), family_task(f)): runs.curves[(b, f)] for b in budgets for f in families}


def paired_vs_student(results: pd.DataFrame, refs: Mapping[str, Mapping[str, float]],
                      student_correct: Mapping[str, Sequence[bool]], *, alpha: float = 0.05) -> pd.DataFrame:
    """Each (family, budget, method) against the student: :func:`pktlib.experiments.verdict.compare_runs`
    with the student as the fixed reference.

    Each question counts once: the distilled students' correctness averaged over the seeds against
    the student's. Columns: family, budget, method, gap (mean score minus the student's, points,
    1 decimal), ci seeds (95% interval of the gap over seeds, points; NaN with one seed), only
    distilled, only student (questions the student missed and some seed got right / the student
    got right and some seed missed), p (the exact per-question sign-flip test of
    :func:`pktlib.analysis.stats.paired_runs_test`; exact McNemar with one seed), verdict
    (``"better"``/``"worse"`` by the sign of the gap when p < ``alpha``, else ``"no difference"``).
    Rows sorted by family, budget, method. Raises PktError (from the paired tests) when a run
    scored other questions than the student.
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


def summary(tests: pd.DataFrame, versus_laten: pd.DataFrame | None, refs: Mapping[str, Mapping[str, float]], *,
            families: Sequence[str], budgets: Sequence[str], methods: Sequence[str]) -> tuple[list[str], str]:
    """(one markdown line per family and budget, the conclusion) from :func:`paired_vs_student`
    and :func:`pktlib.experiments.laten_vs_distill.paired_vs_laten` (its representative rows; None or empty without LaTen); :data:`NOTHING_TO_DISTIL`
    when the teacher outscores the student on no family."""
    lines = []
    for fam in families:
        for budget in budgets:
            t = tests[(tests.family == fam) & (tests.budget == budget)].set_index("method")
            name = "matched budget" if budget == "laten" else f"N = {budget}"
            parts = [f"{m} {t.loc[m, 'gap']:+.1f} (p = {t.loc[m, 'p']:.2g}, {t.loc[m, 'verdict']})" for m in methods]
            gap = refs[fam]["teacher"] - refs[fam]["student"]
            lines.append(f"- **{family_task(fam)}, {name}** (teacher {gap:+.1f} "
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
