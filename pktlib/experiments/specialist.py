"""Stronger sources (paper Tables 2, 3 and 6): does a specialist teacher transfer better?

The paper swaps the Llama-2 teacher for specialists (WizardCoder and CodeLlama for code,
WizardMath for math) and finds that Post-Align and LaTen do not get better with them. Here the
specialist is the pocket pair's teacher-chat trained further on one family
(:func:`pktlib.zoo.specialist.build_specialist`); for that family, the same student, the same
seeds and the same test questions:

* both teachers are scored (the specialist must actually be stronger on the test questions, or
  the run cannot test the claim);
* Post-Align with Seeking initialisation (:func:`pktlib.experiments.postalign_grid.run_grid`,
  ``inits=["seeking"]``) runs once per source;
* LaTen (:func:`pktlib.laten.sweep`) runs once per source, at one learning rate, transfer rate
  and step;
* each method's specialist-source runs are compared with its plain-source runs per seed (exact
  McNemar on the same questions, :func:`pktlib.analysis.stats.paired_test`, and the paired
  interval :func:`pktlib.analysis.stats.paired_difference_interval`) and over the seeds (mean gap,
  ± twice its standard error, and the two-test rule :func:`pktlib.experiments.verdict.compare_runs`,
  whose paired test counts each question once).

Run folders are named after the weights' hashes, so a rerun resumes and a rebuilt model gets new
ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from pktlib.analysis.stats import (correctness_from_string, correctness_string, paired_difference_interval,
                                   paired_test)
from pktlib.data import load_task
from pktlib.errors import PktError
from pktlib.experiments import postalign_grid
from pktlib.experiments.scoring import BudgetedScorer, cached_score, score_path
from pktlib.experiments.verdict import compare_runs
from pktlib.laten import sweep
from pktlib.models import weights_hash
from pktlib.records import cpu_seconds
from pktlib.zoo.specialist import read_decisions

__all__ = ["SOURCES", "METHODS", "PostAlignSettings", "LatenSettings", "SourceRuns", "decision_table", "decision_lines",
           "run_sources", "teacher_table", "per_seed_table", "over_seeds_table", "bar_values", "scorecard_rows",
           "cost_line", "SpecialistVerdict", "verdict"]

SOURCES = ("plain", "specialist")  # the teacher-chat, and teacher-chat trained further on the family
METHODS = {"postalign": "Post-Align (Seeking init)", "laten": "LaTen"}
Pair = tuple[Any, Any]  # (model, tokenizer)


@dataclass(frozen=True)
class PostAlignSettings:
    """Post-Align as the Post-Align chapter runs it (:func:`pktlib.experiments.postalign_grid.run_grid`)."""

    split: str = "train"  # "train" (its first n_train examples: "N=<n_train>") or "align" (N < 100)
    n_train: int = 1000
    epochs: int | None = 2
    batch_size: int = 16
    micro_batch: int = 16
    lr: float | None = None  # None: the paper's Table 4 rate
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    extract_limit: int = 32


@dataclass(frozen=True)
class LatenSettings:
    """One LaTen setting (:func:`pktlib.laten.sweep`): a translator per seed, injected at ``steps``."""

    lr: float = 3e-2
    steps: int = 2
    transfer_rate: float = 0.1
    mse_weight: float = 1000.0
    align_batch: int = 16
    max_length: int = 256


@dataclass
class SourceRuns:
    """Every scored model of one family: teachers, student and each method per source and seed."""

    family: str
    n: int  # test questions per model
    models: pd.DataFrame  # one row per scored model: role ("teacher"/"student"/method), source, seed, score, correct
    seconds: float = 0.0
    cpu_s: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def select(self, role: str, source: str | None = None) -> pd.DataFrame:
        m = self.models
        sel = m[(m.role == role) & ((m.source == source) if source is not None else True)]
        return sel.sort_values("seed") if "seed" in sel else sel


@dataclass(frozen=True)
class _Answer:
    correct: bool


@dataclass(frozen=True)
class _Scored:
    """What :func:`run_sources` reads of a score: ``score`` and ``records[i].correct``."""

    score: float
    records: list[_Answer]


@dataclass
class _ScoredOnce:
    """A scorer that scores each (weights, task) once (the student and the teachers of
    :func:`run_sources`; Post-Align's run_grid keeps its own scores beside its runs). Keyed by
    the weights' hash, so a new model that reuses a freed one's memory is never mistaken for it.
    With ``folder``, each score is also kept there (:func:`pktlib.experiments.scoring.cached_score`,
    named after the weights and the settings), so a rerun generates nothing it has scored before.
    """

    scorer: Any  # a BudgetedScorer, or any scorer(model, task) when there is no folder
    folder: Path | None = None
    seen: dict[tuple[str, str], Any] = field(default_factory=dict)

    def __call__(self, model, task: str):
        key = (weights_hash(model), task)
        if key in self.seen:
            return self.seen[key]
        if self.folder is None:
            self.seen[key] = self.scorer(model, task)
        else:
            budget, limit = self.scorer.budgets[task], self.scorer.limit
            cs = cached_score(score_path(self.folder, model, limit=limit, max_new_tokens=budget, family=task),
                              (model, self.scorer.tokenizer), task, limit=limit, max_new_tokens=budget,
                              batch_size=limit)
            self.seen[key] = _Scored(cs.score, [_Answer(c) for c in cs.answers])
        return self.seen[key]


def decision_table(specialists: Mapping[str, str | Path]) -> pd.DataFrame:
    """Per specialist checkpoint (``{family: folder}``) and round: the held-out decision of
    :func:`pktlib.zoo.specialist.build_specialist` (scores, McNemar counts and p, interval) and the verdict."""
    out = []
    for family, path in specialists.items():
        info = read_decisions(path)
        for d in info["rounds"]:
            out.append({"family": family, "specialist_name": Path(path).name, "round": d["round"],
                        "questions": d["n"], "plain teacher": d["teacher"],
                        "specialist": d["specialist"], "specialist_only": d["specialist_only"],
                        "plain_only": d["teacher_only"], "p_value": d["p_value"], "ci_low": d["interval"][0],
                        "ci_high": d["interval"][1], "verdict": info["verdict"],
                        "epochs_per_round": info["config"]["epochs"],
                        "fresh_train": info["config"].get("fresh_train", 0),
                        "max_rounds": info["config"]["max_rounds"], "build_seconds": info["seconds"]})
    return pd.DataFrame(out)


def decision_lines(decisions: pd.DataFrame) -> str:
    """Markdown: per specialist, its last round's decision on fresh questions and the build's verdict."""
    lines = []
    for family, g in decisions.groupby("family", sort=False):
        d = g.iloc[-1]
        what = {"clearly better": "clearly better than the plain teacher",
                "ceiling": "not testable: the plain teacher misses too few decision questions for any specialist "
                           "to clearly beat it",
                "not clearly better": f"not clearly better after the cap of {d.max_rounds} rounds"}[d.verdict]
        lines.append(f"- **{d.specialist_name}** after {d['round']} round(s) of {d.epochs_per_round:g} epoch(s) over "
                     f"the {family} train split and {d.fresh_train} fresh problems: "
                     f"{d.specialist:.1f} vs {d['plain teacher']:.1f} on {d.questions} fresh decision questions "
                     f"({d.specialist_only} only the specialist answers right, {d.plain_only} only the plain teacher; "
                     f"McNemar p = {d.p_value:.2g}, 95% CI {d.ci_low:+.1f} to {d.ci_high:+.1f} points): {what}.")
    return "\n".join(lines)


def run_sources(sources: Mapping[str, Pair], student: Pair, *, family: str, seeds: Sequence[int], limit: int | None,
                root: str | Path, margin: float = 1.5, postalign: PostAlignSettings = PostAlignSettings(),
                laten: LatenSettings = LatenSettings(), methods: Sequence[str] = tuple(METHODS),
                progress: bool = False) -> SourceRuns:
    """Score both teachers and the student, run each method from each source (module docstring).

    ``sources``: ``{"plain": (model, tok), "specialist": (model, tok)}``. ``limit``: the first
    test questions scored (None: the whole split); every model gets the same generation budget
    (:class:`~pktlib.experiments.scoring.BudgetedScorer`, ``margin`` times the longest reference).
    Runs live in ``root/postalign-<teacher hash>`` and ``root/laten``, scores in ``root/scores``; a rerun
    resumes and reads back every score it has.
    Raises PktError for a source other than :data:`SOURCES` or an unknown method.
    """
    if sorted(sources) != sorted(SOURCES):
        raise PktError(f"run_sources needs the sources {list(SOURCES)}, got {sorted(sources)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise PktError(f"unknown methods {bad}; expected some of {list(METHODS)}")
    root, task = Path(root), f"pocket-{family}"
    t0, c0 = time.perf_counter(), cpu_seconds()
    s_model, s_tok = student
    limit = limit or len(load_task(task, "test"))
    scorer = _ScoredOnce(BudgetedScorer.for_tasks(s_tok, [task], limit=limit, margin=margin), root / "scores")
    rows: list[dict[str, Any]] = []

    def add(role: str, source: str | None, seed: int | None, score: float, correct: str, **extra: Any) -> None:
        rows.append({"family": family, "role": role, "source": source, "seed": seed, "score": float(score),
                     "correct": correct, **extra})

    ev = scorer(s_model, task)
    add("student", None, None, ev.score, correctness_string(r.correct for r in ev.records))
    for source, (t_model, _) in sources.items():
        ev = scorer(t_model, task)
        add("teacher", source, None, ev.score, correctness_string(r.correct for r in ev.records))
    settings = {k: v for k, v in postalign_grid.grid_settings(postalign.n_train).items() if v[0] == postalign.split}
    if not settings:
        raise PktError(f"unknown Post-Align training split {postalign.split!r}; expected 'train' or 'align'")
    for source, teacher in sources.items():
        if "postalign" in methods:
            runs = postalign_grid.run_grid(
                teacher, student, scorer=scorer.scorer, root=root / f"postalign-{weights_hash(teacher[0])[:8]}",
                families=[family], settings=settings, inits=["seeking"],
                seeds=seeds, r=postalign.r, alpha=postalign.alpha, dropout=postalign.dropout, epochs=postalign.epochs,
                batch_size=postalign.batch_size, micro_batch=postalign.micro_batch, lr=postalign.lr,
                extract_limit=postalign.extract_limit, progress=progress)
            for r in runs.rows:
                add("postalign", source, int(r["seed"]), r["score"], r["correct"], final_loss=r["final_loss"])
        if "laten" in methods:
            out = sweep(teacher, student, task, seeds=seeds, transfer_rates=[laten.transfer_rate],
                        main_rate=laten.transfer_rate, steps=laten.steps, eval_steps=[laten.steps], limit=limit,
                        run_root=root / "laten", lr=laten.lr, mse_weight=laten.mse_weight,
                        align_batch=laten.align_batch, max_length=laten.max_length, baselines=False,
                        eval_kwargs={"batch_size": limit, "max_new_tokens": scorer.scorer.budgets[task]},
                        progress=progress)
            for r in out:
                add("laten", source, int(r.seed), r.score, r.correct, delta_rms=r.translated_rms)
    return SourceRuns(family, limit, pd.DataFrame(rows), time.perf_counter() - t0, cpu_seconds() - c0, rows)


def _paired(a: str, b: str) -> dict[str, Any]:
    """``a`` minus ``b`` on the same questions: gap, McNemar counts and p, paired 95% interval."""
    x, y = correctness_from_string(a), correctness_from_string(b)
    t = paired_test(x, y)
    lo, hi = paired_difference_interval(x, y)
    return {"gap": 100 * (sum(x) - sum(y)) / len(x), "specialist_only": t.a_only, "plain_only": t.b_only,
            "p_value": t.p_value, "ci_low": lo, "ci_high": hi}


def _each(runs: "SourceRuns | Sequence[SourceRuns]") -> list[SourceRuns]:
    return [runs] if isinstance(runs, SourceRuns) else list(runs)


def teacher_table(runs: SourceRuns | Sequence[SourceRuns]) -> pd.DataFrame:
    """Per family: the student and both teachers on the test questions, and specialist minus plain teacher."""
    out = []
    for r in _each(runs):
        plain, spec = r.select("teacher", "plain").iloc[0], r.select("teacher", "specialist").iloc[0]
        out.append({"family": r.family, "n": r.n, "student": r.select("student").score.iloc[0],
                    "plain teacher": plain.score, "specialist teacher": spec.score,
                    **_paired(spec.correct, plain.correct)})
    return pd.DataFrame(out)


def _method_pairs(runs: SourceRuns | Sequence[SourceRuns]) -> Iterator[tuple[SourceRuns, str, pd.DataFrame,
                                                                              pd.DataFrame]]:
    """(runs, method, plain-source rows, specialist-source rows) of every method that ran, rows by seed.
    Raises PktError if the two sources were run with other seeds."""
    for r in _each(runs):
        for method in METHODS:
            plain, spec = r.select(method, "plain"), r.select(method, "specialist")
            if plain.empty:
                continue
            if list(plain.seed) != list(spec.seed):
                raise PktError(f"{method}: the sources were run with other seeds ({list(plain.seed)} and "
                               f"{list(spec.seed)})")
            yield r, method, plain, spec


def per_seed_table(runs: SourceRuns | Sequence[SourceRuns]) -> pd.DataFrame:
    """Per family, method and seed: the student+method score with each source, their gap, McNemar p
    and paired interval. Raises PktError if the two sources were run with other seeds."""
    out = []
    for r, method, plain, spec in _method_pairs(runs):
        for (_, p), (_, s) in zip(plain.iterrows(), spec.iterrows()):
            out.append({"family": r.family, "method": method, "seed": int(p.seed), "plain source": p.score,
                        "specialist source": s.score, **_paired(s.correct, p.correct)})
    return pd.DataFrame(out)


def _frame(sel: pd.DataFrame) -> pd.DataFrame:
    return sel[["seed", "score", "correct"]].reset_index(drop=True)


def over_seeds_table(runs: SourceRuns | Sequence[SourceRuns], *, alpha: float = 0.05) -> pd.DataFrame:
    """Per family and method: mean scores over seeds with each source, the mean gap ± 2 s.e. over
    seeds, the per-question paired p (each question once) and whether the gap is real by
    :func:`~pktlib.experiments.verdict.compare_runs`."""
    out = []
    for r, method, plain, spec in _method_pairs(runs):
        c = compare_runs(_frame(spec), _frame(plain), alpha=alpha)
        half = 2 * c.se if c.se == c.se else float("nan")
        out.append({"family": r.family, "method": method, "seeds": len(plain),
                    "student": r.select("student").score.iloc[0], "plain source": plain.score.mean(),
                    "specialist source": spec.score.mean(), "gap": c.gap, "gap_low": c.gap - half,
                    "gap_high": c.gap + half, "se": c.se, "p_value": c.p_value, "real": c.real})
    return pd.DataFrame(out)


def bar_values(runs: SourceRuns | Sequence[SourceRuns]) -> tuple[dict, dict, dict]:
    """(values, errors, references) for :func:`pktlib.plots.grouped_bars`: one panel per family,
    groups "teacher" and each method, bars per source (mean over seeds; errors: one std over seeds,
    ddof 1); the student's score as the reference line."""
    values: dict[str, dict[str, dict[str, float]]] = {}
    errors: dict[str, dict[str, dict[str, float]]] = {}
    refs: dict[str, dict[str, float]] = {}
    for r in _each(runs):
        panel = f"pocket-{r.family}"
        values[panel] = {"teacher": {s: float(r.select("teacher", s).score.iloc[0]) for s in SOURCES}}
        errors[panel] = {}
        for method, label in METHODS.items():
            for source in SOURCES:
                sel = r.select(method, source)
                if not sel.empty:
                    values[panel].setdefault(label, {})[source] = float(sel.score.mean())
                    errors[panel].setdefault(label, {})[source] = float(sel.score.std(ddof=1)) if len(sel) > 1 else 0.0
        refs[panel] = {"student": float(r.select("student").score.iloc[0])}
    return values, errors, refs


def scorecard_rows(runs: SourceRuns | Sequence[SourceRuns], *, pair: str) -> list[dict[str, Any]]:
    """Scorecard rows: ``teacher-specialist`` and ``<method>-specialist-source`` (mean over seeds)."""
    rows = []
    for r in _each(runs):
        task = f"pocket-{r.family}"
        rows.append({"method": "teacher-specialist", "task": task, "pair": pair, "n": r.n,
                     "score": float(r.select("teacher", "specialist").score.iloc[0])})
        for method in METHODS:
            sel = r.select(method, "specialist")
            if not sel.empty:
                name = "postalign-seeking" if method == "postalign" else method
                rows.append({"method": f"{name}-specialist-source", "task": task, "pair": pair, "n": r.n,
                             "score": float(sel.score.mean())})
    return rows


def cost_line(runs: SourceRuns | Sequence[SourceRuns], decisions: pd.DataFrame, *, preset: str) -> str:
    """Markdown: what the chapter costs: each specialist's build (once, cached beside the pair) and
    this run's comparisons (wall and CPU time; a resumed run pays only for what was missing)."""
    rs = _each(runs)
    builds = decisions.drop_duplicates("family")
    built = ", ".join(f"{r.specialist_name} {r.build_seconds / 60:.1f} min" for r in builds.itertuples())
    n_models = sum(len(r.models) for r in rs)
    return (f"Cost on preset `{preset}`: the specialists are built once and kept beside the pair ({built}, wall "
            f"time of the call that built them); the comparisons scored {n_models} models on "
            f"{', '.join(str(r.n) for r in rs)} test questions in {sum(r.seconds for r in rs) / 60:.1f} minutes "
            f"({sum(r.cpu_s for r in rs) / 60:.1f} CPU-minutes) in this run.")


@dataclass
class SpecialistVerdict:
    """The paper's claim "a specialist source does not help", checked per family and method."""

    lines: list[str]
    conclusion: str
    agrees: bool | None  # None: no family where the specialist is stronger on the test questions

    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n\n**" + self.conclusion + "**"


def verdict(teachers: pd.DataFrame, over_seeds: pd.DataFrame, *, alpha: float = 0.05) -> SpecialistVerdict:
    """Decide the claim from :func:`teacher_table` and :func:`over_seeds_table` rows (any families).

    A family tests the claim only if the specialist teacher beats the plain one on the test
    questions (exact McNemar p < ``alpha``). There, each method's gap (specialist source minus
    plain source) is *real* when :func:`~pktlib.experiments.verdict.compare_runs` finds it beyond
    2 s.e. over seeds and per-question paired p < ``alpha``. A real positive gap:

    * *helps* when the specialist source's mean score is also above the student's: the stronger
      source gives a stronger student;
    * *hurts less* when it is not: both sources leave the student at or below its own score (at
      LaTen's acting learning rates the plain source's deltas cost the student points) and the
      specialist's cost fewer. No knowledge reaches the student either way, but the source is
      not irrelevant; the conclusion says so.

    The claim ("a specialist source does not help") holds when no tested (family, method) is
    helped; ``agrees`` is None when no family can test it.
    """
    lines, tested, helped, less_harm = [], 0, [], []
    for _, t in teachers.iterrows():
        stronger = t.gap > 0 and t.p_value < alpha
        lines.append(f"- pocket-{t.family}: specialist teacher {t['specialist teacher']:.1f} vs plain "
                     f"{t['plain teacher']:.1f} on {t.n} test questions "
                     f"({t.gap:+.1f} points, 95% CI {t.ci_low:+.1f} to {t.ci_high:+.1f}, McNemar p = {t.p_value:.2g}): "
                     + ("stronger" if stronger else "not clearly stronger, so this family cannot test the claim"))
        for _, r in over_seeds[over_seeds.family == t.family].iterrows():
            above = r["specialist source"] > r.student
            reading = ("no difference beyond the noise" if not r.real else "hurts" if r.gap < 0 else
                       "helps" if above else
                       f"hurts less: both sources leave the student at or below its {r.student:.1f}")
            lines.append(f"  - {METHODS[r.method]}: {r.gap:+.1f} points with the specialist source "
                         f"({r['specialist source']:.1f} against {r['plain source']:.1f}, mean of {r.seeds} seeds, "
                         f"± 2 s.e. "
                         f"{r.gap_low:+.1f} to {r.gap_high:+.1f}; paired p = {r.p_value:.2g}): {reading}")
            if stronger:
                tested += 1
                if r.real and r.gap > 0:
                    (helped if above else less_harm).append(f"{METHODS[r.method]} on pocket-{t.family}")
    rule = ("decided by the two-test rule: the mean gap beyond twice its standard error over seeds and the seeds' "
            f"exact per-question paired test (each question once, correctness averaged over seeds) p < {alpha:g}")
    if not tested:
        return SpecialistVerdict(lines, "No specialist here is stronger than the plain teacher on the test questions, "
                                 "so this run cannot test the paper's claim.", None)
    if helped:
        return SpecialistVerdict(lines, f"The pocket pair disagrees with the paper: a specialist source helps "
                                 f"{', '.join(helped)} ({rule}).", False)
    but = (f" The source is not irrelevant, though: with the specialist source, {', '.join(less_harm)} costs the "
           f"student fewer points than with the plain one (both at or below the student's score)." if less_harm else "")
    return SpecialistVerdict(lines, f"The pocket pair agrees with the paper: a specialist source does not give a "
                             f"stronger student (0 of {tested} method/family comparisons with a stronger specialist; "
                             f"{rule}).{but}", True)
