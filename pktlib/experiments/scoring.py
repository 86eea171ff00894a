"""Scoring many in-memory variants of one student on the same test questions.

The transfer chapters (Post-Align, unaligned Pre-Align) score dozens of models built in memory
from one pair. They share two rules, kept here once:

* the **generation budget**: a damaged model fills any budget with garbage, so each task's
  new-token budget is ``margin`` times the longest reference answer among the scored examples
  (in tokens of the scoring tokenizer), plus 2;
* the **teacher gap**: a transfer can only be judged on a family where the teacher outscores the
  student; without such a family a run tests the code, not the question.

Models kept on disk (a chapter's student and teacher, each distilled student) are scored once:
:func:`cached_score` keeps the score beside the run as JSON, named by :func:`score_path` after
the weights' hash and the scoring settings, so a rerun reads it back without generating.
:func:`score_once` does the same for a grid's in-memory models (hashed over their tensors, so a
deterministic transfer or training finds its score again) when the scorer is a
:class:`BudgetedScorer`, and leaves any other scorer to its own cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pktlib.analysis.stats import correctness_from_string, correctness_string, wilson_interval
from pktlib.data import answer_token_budget, load_task
from pktlib.data.tasks import TASKS
from pktlib.errors import PktError
from pktlib.evaluation import EvalResult, evaluate
from pktlib.models import weights_hash
from pktlib.records import cpu_seconds, read_json, write_json

__all__ = ["family_task", "generation_budget", "BudgetedScorer", "families_with_teacher_gap", "NO_TEACHER_GAP",
           "CachedScore",
           "run_root", "score_path", "cached_score", "score_once"]

NO_TEACHER_GAP = ("The teacher does not outscore the student on any family in this run (as with the barely "
                  "trained `tiny` preset), so there is no teacher knowledge to transfer: this run tests the "
                  "code, not the question.")


def family_task(family: str) -> str:
    """The task a grid's family names: a paper task (``"gsm8k"``) is itself, a pocket family
    (``"math"``) names ``pocket-<family>``."""
    return family if family in TASKS else f"pocket-{family}"


def generation_budget(tokenizer, task: str, *, limit: int | None, margin: float, split: str = "test") -> int:
    """New tokens allowed on ``task``: :func:`pktlib.data.answer_token_budget` over the reference
    answers of the first ``limit`` examples of ``split`` (the ones scored). Raises PktError if the
    split is empty or ``margin <= 0``.
    """
    examples = load_task(task, split, limit=limit)
    if not examples:
        raise PktError(f"task {task!r} split {split!r} has no examples (limit={limit})")
    return answer_token_budget(tokenizer, [e.answer for e in examples], margin)


@dataclass
class BudgetedScorer:
    """Scores an in-memory model on a task's first ``limit`` test examples within its budget.

    One batch holds all ``limit`` prompts (the models are small); ``budgets`` maps each task to
    its :func:`generation_budget`. Call it as ``scorer(model, task) -> EvalResult``.
    """

    tokenizer: Any
    limit: int
    budgets: dict[str, int]

    @classmethod
    def for_tasks(cls, tokenizer, tasks: Sequence[str], *, limit: int, margin: float) -> "BudgetedScorer":
        return cls(tokenizer, limit, {t: generation_budget(tokenizer, t, limit=limit, margin=margin) for t in tasks})

    def budget(self, task: str) -> int:
        """``task``'s new-token budget. Raises PktError for a task without one."""
        if task not in self.budgets:
            raise PktError(f"no generation budget for task {task!r}; known: {', '.join(self.budgets)}")
        return self.budgets[task]

    def __call__(self, model, task: str) -> EvalResult:
        return evaluate((model, self.tokenizer), task, limit=self.limit, max_new_tokens=self.budget(task),
                        batch_size=self.limit, progress=False)


def families_with_teacher_gap(student: Mapping[str, float], teacher: Mapping[str, float]) -> list[str]:
    """The families (keys of ``student``, in order) on which the teacher scores higher."""
    return [f for f in student if teacher[f] > student[f]]


@dataclass(frozen=True)
class CachedScore:
    """A model's score on a task as kept beside its run (:func:`cached_score`).

    ``score``: percent correct (0-100) over ``n`` questions; ``cpu_s``: CPU seconds the scoring
    took when it ran (the cost from nothing, also when read back); ``correct``: per-question
    correctness as ``"1"``/``"0"`` characters in the task's order; ``from_cache``: read back
    rather than scored by this call (None: unknown, for a scorer that keeps its own cache).
    """

    score: float
    n: int
    cpu_s: float
    correct: str
    from_cache: bool | None = False

    @property
    def answers(self) -> list[bool]:
        """Per-question correctness as booleans (for :func:`pktlib.evaluation.paired_test`)."""
        return correctness_from_string(self.correct)

    @property
    def ci95(self) -> tuple[float, float]:
        """Wilson 95% interval of the score in percent, as :attr:`pktlib.evaluation.EvalResult.ci95`."""
        return wilson_interval(self.correct.count("1"), len(self.correct))


def run_root(base: str | os.PathLike, preset: str, student: str | os.PathLike, teacher: str | os.PathLike) -> Path:
    """``base/<preset>-<student hash>-<teacher hash>``: one folder of a chapter's runs per pair build
    (the first 8 hex digits of each model folder's :func:`pktlib.models.weights_hash`)."""
    return Path(base) / f"{preset}-{weights_hash(student)[:8]}-{weights_hash(teacher)[:8]}"


def score_path(folder: str | os.PathLike, weights: Any, *, limit: int | None, max_new_tokens: int,
               who: str | None = None, family: str | None = None) -> Path:
    """``folder/scores-[<who>-]<hash>[-<family>]-n<limit or "all">-t<max_new_tokens>.json``.

    ``weights``: a model folder (hashed over its safetensors files) or an ``nn.Module`` (over its
    tensors), as :func:`pktlib.models.weights_hash`; the name keeps the hash's first 8 hex digits. Another model, another number of questions or another budget gets
    another file, so a cached score never stands for different settings.
    """
    parts = ["scores", who, weights_hash(weights)[:8], family, f"n{limit or 'all'}", f"t{max_new_tokens}"]
    return Path(folder) / ("-".join(p for p in parts if p) + ".json")


def cached_score(path: str | os.PathLike, model: Any, task: str, *, limit: int | None, max_new_tokens: int,
                 batch_size: int) -> CachedScore:
    """Score ``model`` on ``task``'s first ``limit`` test questions once; later calls read ``path``.

    ``model``: ``(model, tokenizer)``, or a function of no argument returning it, called only
    when the score is not on disk (so a rerun loads no weights). Greedy generation of at most
    ``max_new_tokens`` new tokens, ``batch_size`` prompts per call
    (:func:`pktlib.evaluation.evaluate`). The JSON (``score``, ``n``, ``cpu_s``, ``correct``) is
    written atomically (:func:`pktlib.records.write_json`); the caller names the file after the
    settings (:func:`score_path`). Raises PktError if ``path`` holds malformed JSON.
    """
    path = Path(path)
    if path.is_file():
        sc = read_json(path)
        return CachedScore(float(sc["score"]), int(sc["n"]), float(sc["cpu_s"]), str(sc["correct"]), True)
    c0 = cpu_seconds()
    pair = model() if callable(model) else model
    ev = evaluate(pair, task, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    out = {"score": ev.score, "n": ev.n, "cpu_s": round(cpu_seconds() - c0, 1),
           "correct": correctness_string([r.correct for r in ev.records])}
    write_json(path, out)
    return CachedScore(float(out["score"]), int(out["n"]), float(out["cpu_s"]), out["correct"], False)


def score_once(scorer: Callable[[Any, str], EvalResult] | BudgetedScorer, folder: str | os.PathLike | None,
               model: Any, task: str, who: str | None = None) -> CachedScore:
    """``scorer``'s evaluation of the in-memory ``model`` on ``task``, scored at most once per folder.

    A :class:`BudgetedScorer`'s score is kept in ``folder`` (:func:`cached_score`, at
    :func:`score_path` named by the hash of ``model``'s tensors, the scorer's ``limit`` and the
    task's budget; with ``who``, e.g. "student", also by ``who`` and the task's family), so a
    later call with the same weights reads it back (``from_cache`` True). Any other
    ``scorer(model, task) -> EvalResult`` caches by itself
    (:class:`pktlib.experiments.real_pair.SavedScorer`) and is called directly: ``cpu_s`` is then
    its generation's wall seconds and ``from_cache`` None (unknown). ``folder`` None keeps nothing:
    the scorer is called directly (``from_cache`` False for a BudgetedScorer, which always
    generates). The file name carries no task without ``who``: give each task its own ``folder``
    when one model is scored on several tasks. Raises PktError if the BudgetedScorer has no budget
    for ``task``.
    """
    budgeted = isinstance(scorer, BudgetedScorer)
    if folder is None or not budgeted:
        res = scorer(model, task)
        return CachedScore(res.score, res.n, round(res.generate_s, 1),
                           correctness_string(r.correct for r in res.records), False if budgeted else None)
    budget = scorer.budget(task)
    path = score_path(folder, model, limit=scorer.limit, max_new_tokens=budget, who=who,
                      family=task.removeprefix("pocket-") if who else None)
    return cached_score(path, (model, scorer.tokenizer), task, limit=scorer.limit, max_new_tokens=budget,
                        batch_size=scorer.limit)
