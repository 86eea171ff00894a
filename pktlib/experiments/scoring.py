"""Scoring many in-memory variants of one student on the same test questions.

The transfer chapters (Post-Align, unaligned Pre-Align) score dozens of models built in memory
from one pair. They share two rules, kept here once:

* the **generation budget**: a damaged model fills any budget with garbage, so each task's
  new-token budget is ``margin`` times the longest reference answer among the scored examples
  (in tokens of the scoring tokenizer), plus 2;
* the **teacher gap**: a transfer can only be judged on a family where the teacher outscores the
  student; without such a family a run tests the code, not the question.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pktlib.data import answer_token_budget, load_task
from pktlib.errors import PktError
from pktlib.evaluation import EvalResult, evaluate

__all__ = ["generation_budget", "BudgetedScorer", "families_with_teacher_gap", "NO_TEACHER_GAP"]

NO_TEACHER_GAP = ("The teacher does not outscore the student on any family in this run (as with the barely "
                  "trained `tiny` preset), so there is no teacher knowledge to transfer: this run tests the "
                  "code, not the question.")


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

    def __call__(self, model, task: str) -> EvalResult:
        if task not in self.budgets:
            raise PktError(f"no generation budget for task {task!r}; known: {', '.join(self.budgets)}")
        return evaluate((model, self.tokenizer), task, limit=self.limit, max_new_tokens=self.budgets[task],
                        batch_size=self.limit, progress=False)


def families_with_teacher_gap(student: Mapping[str, float], teacher: Mapping[str, float]) -> list[str]:
    """The families (keys of ``student``, in order) on which the teacher scores higher."""
    return [f for f in student if teacher[f] > student[f]]
