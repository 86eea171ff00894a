"""Results at a glance: each method's gain over the student, per paradigm, from the run records.

The intro page of the book shows one figure (:func:`pktlib.plots.results_dashboard`) built from
the rows this module computes: for every transfer method of the two paradigms and every task
family, the gain over the student model in points, for the paper's pair (Table 1, Llama-2
13B -> 7B chat; Table 8 for Qwen2.5 3B -> 1.5B), the pocket pair and, when records from a
real pair exist (``pkt run ... -p pair NAME`` on a GPU), each real pair.

A project gain is ``score - student score`` on the same task, with the student's score taken,
in this order, from the same record (the chapter evaluated both on the same questions), else
from the mean of the student's rows on that task for the same pair in other records. A method
with several rows (seeds, chapters) gets their mean and their spread. Nothing is filled in by
hand: a method, family or pair without records has no bar.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pktlib.scorecard import FAMILIES, FAMILY_OF_TASK, METHODS, PAPER, ScoreRow, collect_scores

__all__ = ["PARADIGMS", "PAPER_SOURCES", "POCKET", "Gain", "source_of", "gains_from_rows", "gains"]

# The methods shown, per paradigm, in the paper's order: id (of pktlib.scorecard.METHODS) -> short label.
PARADIGMS: dict[str, dict[str, str]] = {
    "Post-Align (transfer initialises LoRA, then fine-tuning)": {
        "postalign-seeking-n1000": "Seeking, N=1000", "postalign-pissa-n1000": "PiSSA, N=1000",
        "postalign-random-n1000": "random LoRA, N=1000", "postalign-seeking-small": "Seeking, N<100"},
    "Pre-Align (transfer alone, no fine-tuning)": {
        "laten": "LaTen", "seeking-unaligned": "Seeking, untrained", "unaligned-best": "unaligned, best cell"},
}
# Short labels of the paper's reference pairs (keys of pktlib.scorecard.PAPER).
PAPER_SOURCES: dict[str, str] = {
    "Llama-2-13b-chat -> Llama-2-7b-chat (Table 1)": "paper: Llama-2 13B→7B",
    "Qwen2.5-3B -> Qwen2.5-1.5B (Table 8)": "paper: Qwen2.5 3B→1.5B",
}
POCKET = "pocket pair"


@dataclass
class Gain:
    """One bar: ``gain`` (points over the student) of ``method`` on ``family`` for ``source``."""

    paradigm: str
    method: str
    family: str
    source: str
    gain: float
    spread: float | None = None  # standard deviation over rows, when there are several
    n_rows: int = 1
    records: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return PARADIGMS.get(self.paradigm, {}).get(self.method) or METHODS.get(self.method, self.method)


def source_of(row: ScoreRow) -> str:
    """Which pair a project row belongs to: the pocket pair, or the real pair it names."""
    pair = row.pair.strip()
    if row.task.startswith("pocket-") or "pocket" in pair.lower():
        return POCKET
    return pair.split(",")[0].strip() or "real pair"


def _paradigm_of(method: str) -> str | None:
    return next((p for p, ms in PARADIGMS.items() if method in ms), None)


def _paper_gains(only_paradigms: bool) -> list[Gain]:
    out = []
    for ref, table in PAPER.items():
        student = table.get("student", {})
        for method, scores in table.items():
            paradigm = _paradigm_of(method)
            if paradigm is None and only_paradigms:
                continue
            for fam in FAMILIES:
                # a family with two paper tasks (code: HumanEval, MBPP) gets their mean gain
                per_task = [s - student[t] for t, s in scores.items() if FAMILY_OF_TASK.get(t) == fam and t in student]
                if per_task:
                    out.append(Gain(paradigm or "", method, fam, PAPER_SOURCES.get(ref, ref), statistics.fmean(per_task),
                                    n_rows=len(per_task)))
    return out


def _student_baseline(row: ScoreRow, students: list[ScoreRow]) -> float | None:
    same_record = [s.score for s in students if s.record == row.record and s.task == row.task]
    if same_record:
        return statistics.fmean(same_record)
    same_pair = [s.score for s in students if s.task == row.task and source_of(s) == source_of(row)]
    return statistics.fmean(same_pair) if same_pair else None


def gains_from_rows(rows: Sequence[ScoreRow], *, paper: bool = True, only_paradigms: bool = True) -> list[Gain]:
    """The gains of scorecard ``rows`` (:func:`pktlib.scorecard.collect_scores`) and, if
    ``paper``, of the paper's tables, per source, method and family. With ``only_paradigms``
    (the dashboard) only the transfer methods of :data:`PARADIGMS`; without it every method,
    the student and teacher included (their paradigm is ""). Rows of tasks outside the three
    families, or without a student score to compare with, are left out."""
    students = [r for r in rows if r.method == "student"]
    grouped: dict[tuple[str, str, str, str], list[tuple[float, str]]] = {}
    for r in rows:
        paradigm, fam = _paradigm_of(r.method), FAMILY_OF_TASK.get(r.task)
        if (paradigm is None and only_paradigms) or fam is None:
            continue
        base = _student_baseline(r, students)
        if base is None:
            continue
        grouped.setdefault((paradigm or "", r.method, fam, source_of(r)), []).append((r.score - base, r.record))
    out = _paper_gains(only_paradigms) if paper else []
    for (paradigm, method, fam, source), vals in sorted(grouped.items()):
        g = [v for v, _ in vals]
        out.append(Gain(paradigm, method, fam, source, statistics.fmean(g),
                        spread=statistics.stdev(g) if len(g) > 1 else None, n_rows=len(g),
                        records=sorted({rec for _, rec in vals})))
    return out


def gains(records: Mapping[str, Mapping[str, Any]], *, paper: bool = True) -> list[Gain]:
    """Every bar of the dashboard, from ``records`` (as :func:`pktlib.records.load_records`
    returns them): the paper's gains (if ``paper``) and each project pair's, per paradigm,
    method and family (:func:`gains_from_rows` with the methods of :data:`PARADIGMS`)."""
    return gains_from_rows(collect_scores(records), paper=paper)
