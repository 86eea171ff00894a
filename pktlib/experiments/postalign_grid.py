"""The Post-Align grid (paper Tables 1 and 2): LoRA initialisations x training sets x seeds.

For each task family, training set (the first ``n_train`` training examples, or the small align
split) and LoRA initialisation (random, PiSSA, Seeking; :func:`pktlib.postalign.lora_model`), a
copy of the student is fine-tuned once per seed (:func:`pktlib.postalign.finetune`, resumable
from its run folder) and scored on the same test questions. :func:`run_grid` returns the runs
as a tidy table; the functions below it turn that table into the chapter's score table, its
scorecard rows, the comparisons with the student and the verdict, all by
:func:`pktlib.experiments.verdict.compare_runs` (effect, intervals over seeds and questions,
paired p counting each question once). Each fine-tuned model's score is kept in its run folder
(:func:`pktlib.experiments.scoring.score_once`), so a rerun neither trains nor scores again.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pktlib.data import load_task
from pktlib.evaluation import EvalResult
from pktlib.experiments.scoring import NO_TEACHER_GAP, BudgetedScorer, families_with_teacher_gap, score_once
from pktlib.experiments.verdict import (Comparison, compare_runs, compare_table, comparison_text,
                                       scorecard_fields)
from pktlib.seeking import SeekingExtract, seeking_extract, sensitivity
from pktlib.postalign import finetune, finetune_defaults, lora_model, merged_copy
from pktlib.models import TRANSFERRED_MODULES

__all__ = ["grid_settings", "setting_ids", "family_table", "PostAlignRuns", "run_grid", "vs_student", "score_table",
           "scorecard_rows", "curve_bands", "PostAlignVerdict", "seeking_verdict"]

Settings = Mapping[str, tuple[str, "int | None"]]  # name -> (split, first n examples or None: all)


def grid_settings(n_train: int) -> dict[str, tuple[str, int | None]]:
    """The paper's two training sets: ``"N=<n_train>"`` (train split) and ``"align"`` (N < 100)."""
    return {f"N={n_train}": ("train", n_train), "align": ("align", None)}


def setting_ids(settings: Settings) -> dict[str, str]:
    """Scorecard names of the settings: ``small`` (align split), ``n1000`` (the paper's N) or ``n<N>``."""
    return {s: ("small" if split == "align" else ("n1000" if n == 1000 else f"n{n}"))
            for s, (split, n) in settings.items()}


def family_table(families: Sequence[str], task_format: str = "pocket-{}",
                 splits: Sequence[str] = ("train", "align")) -> pd.DataFrame:
    """Per family: the paper's Table 4 learning rate and epochs, and the sizes of ``splits``."""
    tasks = {f: task_format.format(f) for f in families}
    return pd.DataFrame({f: {"Table 4 lr": finetune_defaults(t)[0], "Table 4 epochs": finetune_defaults(t)[1],
                             **{f"{s} examples": len(load_task(t, s)) for s in splits}} for f, t in tasks.items()})


@dataclass
class PostAlignRuns:
    """Every fine-tuning run of the grid, scored."""

    results: pd.DataFrame  # one row per (family, setting, init, seed): score, steps, ..., correct
    curves: dict[tuple[str, str, str, int], list[tuple[int, float]]]  # training loss per step
    refs: dict[str, dict[str, float]]  # family -> {"student", "teacher"} score without LoRA
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    ref_correct: dict[str, dict[str, str]] = field(default_factory=dict)  # family -> who -> "1"/"0" per question
    tasks: dict[str, str] = field(default_factory=dict)  # family -> task name (default "pocket-<family>")
    # family -> the Seeking extract the Seeking runs started from (kept for analyses, not logged)
    extracts: dict[str, SeekingExtract] = field(default_factory=dict, repr=False)

    def task(self, family: str) -> str:
        return self.tasks.get(family, f"pocket-{family}")

    def metrics(self) -> dict[str, Any]:
        """The record entries: reference scores, the runs, and the training curves."""
        return {"reference_scores": self.refs, "reference_correct": self.ref_correct, "postalign_runs": self.rows,
                "grid_seconds": round(self.seconds, 1), "tasks": self.tasks,
                "training_curves": {"|".join(map(str, k)): v for k, v in self.curves.items()}}


def run_grid(teacher: tuple[Any, Any], student: tuple[Any, Any], *, scorer: Callable[[Any, str], EvalResult] | BudgetedScorer,
             root: str | Path, families: Sequence[str], settings: Settings, inits: Sequence[str], seeds: Sequence[int],
             r: int = 16, alpha: int = 16, dropout: float = 0.05, epochs: int | None = None, batch_size: int = 64,
             micro_batch: int = 8, lr: float | None = None, extract_limit: int = 32,
             task_format: str = "pocket-{}", extract: Mapping[str, Sequence[Any]] | None = None,
             modules: Sequence[str] = TRANSFERRED_MODULES, template: str = "default",
             progress: bool = True) -> PostAlignRuns:
    """Fine-tune and score every (family, setting, init, seed) of the grid.

    ``teacher``/``student``: ``(model, tokenizer)``; the student is deep-copied for every run.
    One Seeking sensitivity pass per family (on ``extract[family]``, default its first
    ``extract_limit`` extract examples) gives one Seeking extract that serves all Seeking runs;
    the sensitivity matrices are dropped once it is made. Run folders are ``root/<family>-
    <setting>-<init>-s<seed>-e<epochs>-b<batch_size>-x<extract_limit>``, so an interrupted grid
    resumes. ``task_format`` names a family's task (``"pocket-{}"``, or ``"{}"`` for the paper's
    task names); ``modules`` are the LoRA targets (a pair's :attr:`pktlib.pairs.Pair.modules`);
    ``template`` the training prompts' format (:func:`pktlib.postalign.finetune`).

    ``scorer``: a :class:`~pktlib.experiments.scoring.BudgetedScorer` (each fine-tuned model's
    score is kept in its run folder, :func:`pktlib.experiments.scoring.score_path`, the student's
    and teacher's in ``root``; rows carry ``eval_cpu_s``, the scoring's CPU seconds when it ran,
    and ``scored_now``) or any ``scorer(model, task) -> EvalResult`` that caches by itself
    (:class:`pktlib.experiments.real_pair.SavedScorer`; ``eval_cpu_s`` is then the generation's
    wall seconds when the answers were made, and ``scored_now`` is null). Rows carry
    ``train_wall_s`` (the training's wall seconds as logged when it ran: the last step's
    ``time_s``, which counts only the last part of a run resumed midway).
    """
    t_model, t_tok = teacher
    s_model, s_tok = student
    root = Path(root)
    t0 = time.perf_counter()
    tasks = {f: task_format.format(f) for f in families}
    refs, ref_correct = {}, {}
    for f in families:
        for who, m in (("student", s_model), ("teacher", t_model)):
            sc = score_once(scorer, root, m, tasks[f], who=who)
            refs.setdefault(f, {})[who] = sc.score
            ref_correct.setdefault(f, {})[who] = sc.correct
    extracts = {}
    if "seeking" in inits:
        for f in families:
            examples = extract[f] if extract is not None else load_task(tasks[f], "extract", limit=extract_limit)
            sens = sensitivity(t_model, t_tok, examples, modules=tuple(modules), progress=False)
            extracts[f] = seeking_extract(t_model, sens, s_model, modules=modules, progress=False)
            del sens
    runs = [(f, s, i, sd) for f in families for s in settings for i in inits for sd in seeds]
    rows, curves = [], {}
    for fam, setting, init, sd in tqdm(runs, desc="LoRA runs", disable=not progress):
        task = tasks[fam]
        split, n = settings[setting]
        pm = lora_model((copy.deepcopy(s_model), s_tok), init=init, pairs=extracts.get(fam), r=r, alpha=alpha,
                        dropout=dropout, modules=modules, seed=sd, progress=False)
        out = root / f"{fam}-{setting}-{init}-s{sd}-e{epochs}-b{batch_size}-x{extract_limit}"
        res = finetune(pm, task, split=split, n=n, lr=lr, epochs=epochs, batch_size=batch_size,
                       micro_batch=micro_batch, seed=sd, out_dir=out, tokenizer=s_tok, template=template,
                       progress=False)
        merged = merged_copy(pm).eval()
        del pm  # one copy of the student at a time beside the scorer's
        sc = score_once(scorer, out, merged, task)
        del merged
        rows.append({"family": fam, "setting": setting, "init": init, "seed": sd, "score": sc.score,
                     "steps": res.steps, "lr": res.lr, "epochs": res.epochs, "n_examples": res.n_examples,
                     "final_loss": res.final_loss, "train_wall_s": max((e.get("time_s", 0.0) for e in res.log), default=0.0), "eval_cpu_s": sc.cpu_s,
                     "scored_now": None if sc.from_cache is None else not sc.from_cache,
                     "correct": sc.correct})
        curves[(fam, setting, init, sd)] = [(e["step"], e["loss"]) for e in res.log]
    return PostAlignRuns(pd.DataFrame(rows), curves, refs, time.perf_counter() - t0, rows, ref_correct, tasks, extracts)


def vs_student(runs: PostAlignRuns) -> pd.DataFrame:
    """Every (family, setting, init) against the student without LoRA, each question once
    (:func:`pktlib.experiments.verdict.compare_table`, the student a fixed reference)."""
    student = pd.DataFrame([{"family": f, "score": runs.refs[f]["student"], "correct": runs.ref_correct[f]["student"]}
                            for f in runs.refs])
    return compare_table(runs.results, student, by=["family", "setting", "init"], on=["family"])


def score_table(runs: PostAlignRuns, *, families: Sequence[str], settings: Settings,
                inits: Sequence[str]) -> tuple[pd.DataFrame, dict[str, dict[str, list[float]]]]:
    """(display table "mean ± std" (the mean alone with one seed) with the student and teacher rows on top,
    the same as numbers).

    The numbers are ``{init: {"family|setting": [mean, std]}}`` (std over seeds, ddof 1).
    """
    agg = runs.results.groupby(["init", "family", "setting"]).score.agg(["mean", "std"])
    def cell(m: float, sd: float) -> str:  # one seed has no std
        return f"{m:.1f}" if sd != sd else f"{m:.1f} ± {sd:.1f}"

    table = pd.DataFrame({(f, s): {i: cell(agg.loc[(i, f, s), "mean"], agg.loc[(i, f, s), "std"]) for i in inits}
                          for f in families for s in settings})
    top = pd.DataFrame({(f, s): {"student (no LoRA)": f"{runs.refs[f]['student']:.1f}",
                                 "teacher": f"{runs.refs[f]['teacher']:.1f}"} for f in families for s in settings})
    numbers = {i: {f"{f}|{s}": [float(agg.loc[(i, f, s), "mean"]), float(agg.loc[(i, f, s), "std"])]
                   for f in families for s in settings} for i in inits}
    return pd.concat([top, table]), numbers


def scorecard_rows(runs: PostAlignRuns, *, pair: str, families: Sequence[str], settings: Settings,
                   inits: Sequence[str], n: int, compared: pd.DataFrame | None = None,
                   protocol: str | None = None, references: bool = True) -> list[dict[str, Any]]:
    """Scorecard rows ``postalign-<init>-<setting id>`` (mean over seeds) plus, with ``references``,
    the student and the teacher (leave them out where another chapter reports them on the same questions).

    With ``compared`` (:func:`vs_student`) each Post-Align row carries its comparison with the
    student (:func:`pktlib.experiments.verdict.scorecard_fields`: effect, ci, p, seeds, n).
    ``protocol``: the evaluation protocol of the scores when not the project's own ("pkt").
    """
    extra = {"protocol": protocol} if protocol else {}
    agg = runs.results.groupby(["init", "family", "setting"]).score.mean()
    ids = setting_ids(settings)
    c = compared.set_index(["family", "setting", "init"]) if compared is not None else None
    return ([{"method": f"postalign-{i}-{ids[s]}", "task": runs.task(f), "pair": pair,
              "score": float(agg.loc[(i, f, s)]), "n": n, **(scorecard_fields(c.loc[(f, s, i)]) if c is not None else {}),
              **extra}
             for i in inits for f in families for s in settings]
            + [{"method": who, "task": runs.task(f), "pair": pair, "score": float(runs.refs[f][who]), "n": n, **extra}
               for f in families for who in ("student", "teacher") if references])


def curve_bands(runs: PostAlignRuns) -> pd.DataFrame:
    """Training loss per step, mean and std (ddof 0) over seeds, per (family, setting, init).

    Columns: family, setting, init, step, mean, std. Every seed of a cell must log the same steps.
    """
    groups: dict[tuple[str, str, str], list[list[tuple[int, float]]]] = {}
    for (fam, setting, init, _), c in runs.curves.items():
        groups.setdefault((fam, setting, init), []).append(c)
    rows = []
    for (fam, setting, init), cs in groups.items():
        steps = [s for s, _ in cs[0]]
        losses = np.array([[l for _, l in c] for c in cs])  # (seeds, steps)
        for step, m, sd in zip(steps, losses.mean(0), losses.std(0)):
            rows.append({"family": fam, "setting": setting, "init": init, "step": step, "mean": m, "std": sd})
    return pd.DataFrame(rows, columns=["family", "setting", "init", "step", "mean", "std"])


@dataclass
class PostAlignVerdict:
    """Seeking against random and PiSSA initialisation, per family and setting."""

    comparisons: dict[str, dict[str, Comparison]]  # "family|setting" -> other init -> Comparison

    def rows(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The comparisons as plain dicts (for the record)."""
        return {k: {o: c.row() for o, c in v.items()} for k, v in self.comparisons.items()}
    lines: list[str]
    conclusion: str
    families_with_teacher_gap: list[str]

    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n\n**" + self.conclusion + "**"


def seeking_verdict(runs: PostAlignRuns, *, families: Sequence[str], settings: Settings,
                    inits: Sequence[str]) -> PostAlignVerdict:
    """Compare Seeking with random and PiSSA initialisation (:func:`compare_runs`) and conclude."""
    res = runs.results

    def cell(init: str, fam: str, setting: str) -> pd.DataFrame:
        return res[(res.init == init) & (res.family == fam) & (res.setting == setting)]

    lines, comparisons = [], {}
    for fam in families:
        for setting in settings:
            v = {other: compare_runs(cell("seeking", fam, setting), cell(other, fam, setting))
                 for other in ("random", "pissa") if "seeking" in inits and other in inits}
            comparisons[f"{fam}|{setting}"] = v
            parts = [f"vs {o} {comparison_text(c)}: {'real' if c.real else 'noise'}" for o, c in v.items()]
            lines.append(f"- {runs.task(fam)}, {setting}: Seeking {'; '.join(parts)}")
    vs_random = [v["random"] for v in comparisons.values() if "random" in v]
    wins = sum(1 for c in vs_random if c.real and c.gap > 0)
    losses = sum(1 for c in vs_random if c.real and c.gap < 0)
    if wins == 0:
        concl = (f"The teacher's parameters do not help: in none of the {len(vs_random)} family/training-set "
                 f"combinations does Seeking beat random LoRA initialisation by more than the noise of training "
                 f"and of the questions" + (f" (it is clearly worse in {losses})." if losses else "."))
    else:
        concl = (f"Seeking beats random LoRA initialisation beyond the noise in {wins} of {len(vs_random)} "
                 f"family/training-set combinations (and is clearly worse in {losses}); whether that is the "
                 "teacher's knowledge or only a better-conditioned starting point is what the PiSSA comparison, "
                 "which uses no teacher, tells.")
    gap = families_with_teacher_gap({f: runs.refs[f]["student"] for f in families},
                                    {f: runs.refs[f]["teacher"] for f in families})
    return PostAlignVerdict(comparisons, lines, concl if gap else NO_TEACHER_GAP, gap)
