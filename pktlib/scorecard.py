"""The scorecard: the project's results, read from run records, beside the paper's numbers.

Every executed chapter writes ``book/<name>.record.json`` (:mod:`pktlib.records`). A chapter
that produces a score for the scorecard logs it under the metric ``scorecard`` as a list of
rows (or a ``{method: {task: score}}`` dict)::

    records.log_metrics(scorecard=[
        {"method": "laten", "task": "pocket-math", "score": 31.5, "n": 200,
         "pair": "pocket teacher-chat -> student-chat"},
    ])

:func:`collect_scores` finds those rows in every record; :func:`scorecard_tables` arranges
them per task family (knowledge / math / code) beside the paper's Table 1 and Table 8
(DESIGN.md section 5), each project cell linked to the chapter and the record it came from.
Missing records leave empty cells; nothing is ever filled in by hand.

Each row names its evaluation protocol (``"protocol"``, :data:`pktlib.evaluation.PROTOCOLS`;
``"pkt"`` when a row does not say). A score on one of the paper's own benchmarks is set beside
the paper's numbers only when it was scored with the paper's protocol (:data:`PAPER_PROTOCOL`,
open-instruct); otherwise its paper cells stay empty, because prompts and scoring differ and
the two numbers are not like for like. Pocket-suite rows (always the project's protocol) keep
the paper's numbers as the reference they mirror.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from pktlib.errors import PktError
from pktlib.records import load_records

__all__ = ["METHODS", "PAPER", "PAPER_PROTOCOL", "FAMILY_OF_TASK", "ScoreRow", "collect_scores", "scorecard_tables",
           "to_markdown", "build_label", "records_by_build", "across_builds", "PAPER_CLAIMS", "claims_by_build",
           "claims_markdown"]

# Methods in the paper's row order: id -> label. Aliases map common spellings to the ids.
METHODS: dict[str, str] = {
    "student": "Student (small chat model)",
    "teacher": "Teacher (large chat model)",
    "postalign-random-n1000": "Post-Align, random LoRA, N=1000",
    "postalign-seeking-n1000": "Post-Align, Seeking, N=1000",
    "postalign-pissa-n1000": "Post-Align, PiSSA, N=1000",
    "postalign-random-small": "Post-Align, random LoRA, N<100",
    "postalign-seeking-small": "Post-Align, Seeking, N<100",
    "unaligned-best": "Unaligned Pre-Align, best grid cell (Figure 2)",
    "unaligned-worst": "Unaligned Pre-Align, worst grid cell (Figure 2)",
    "seeking-unaligned": "Seeking without training (unaligned)",
    "laten": "LaTen (Pre-Align)",
}
ALIASES: dict[str, str] = {
    "student-chat": "student", "teacher-chat": "teacher", "seeking-no-train": "seeking-unaligned",
    "seeking_unaligned": "seeking-unaligned", "LaTen": "laten",
}

# Paper numbers (DESIGN.md section 5): method -> paper task -> score. Llama-2 13B -> 7B chat.
_T1_TASKS = ("mmlu", "gsm8k", "humaneval", "mbpp")
_PAPER_TASKS = frozenset({*_T1_TASKS, "gsm"})
_T1 = {
    "student": (44.20, 16.07, 14.05, 17.80),
    "teacher": (52.90, 20.55, 18.75, 19.20),
    "postalign-random-n1000": (49.73, 26.51, 14.22, 15.60),
    "postalign-seeking-n1000": (49.60, 28.23, 15.44, 20.60),
    "postalign-pissa-n1000": (49.77, 29.32, 16.26, 21.40),
    "postalign-random-small": (44.20, 16.35, 14.02, 18.20),
    "postalign-seeking-small": (44.20, 14.78, 14.63, 18.60),
    "seeking-unaligned": (38.50, 7.28, 0.61, 0.00),
    "laten": (44.40, 20.47, 14.63, 18.20),
}
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "Llama-2-13b-chat -> Llama-2-7b-chat (Table 1)": {
        m: dict(zip(_T1_TASKS, v)) for m, v in _T1.items()},
    "Qwen2.5-3B -> Qwen2.5-1.5B (Table 8)": {
        "student": {"gsm8k": 62.02}, "teacher": {"gsm8k": 73.24}, "laten": {"gsm8k": 62.32}},
}

# The paper scores with open-instruct (its README: "we employ Open-Instruct to evaluate").
PAPER_PROTOCOL = "open-instruct"

FAMILY_OF_TASK: dict[str, str] = {
    "mmlu": "knowledge", "pocket-knowledge": "knowledge",
    "gsm8k": "math", "gsm": "math", "pocket-math": "math",
    "humaneval": "code", "mbpp": "code", "pocket-code": "code",
}
FAMILIES = ("knowledge", "math", "code")


@dataclass
class ScoreRow:
    """One project score found in a record."""

    method: str
    task: str
    score: float
    record: str  # the record's stem (= the chapter's name)
    pair: str = ""
    n: int | None = None
    protocol: str = "pkt"  # the evaluation protocol the score was measured with
    # against the student, when the chapter compared them (pktlib.experiments.verdict.scorecard_fields)
    effect: float | None = None  # points
    ci: tuple[float, float] | None = None  # 95%, over seeds (over questions with one seed)
    p: float | None = None  # paired per-question test (exact McNemar with one seed; verdict.compare_runs)
    seeds: int | None = None
    verdict: str | None = None  # "better" / "worse" / "n.s." / "same answers" (verdict.Comparison.verdict)

    @property
    def comparable(self) -> bool:
        """Whether the paper's numbers may stand beside it: a pocket task, or the paper's protocol."""
        return self.task not in _PAPER_TASKS or self.protocol == PAPER_PROTOCOL


def _canonical(method: str) -> str:
    return ALIASES.get(method, method)


def _rows_of(stem: str, value: Any) -> list[ScoreRow]:
    """Rows from a record's ``scorecard`` metric (list of dicts, or {method: {task: score}})."""
    out = []
    if isinstance(value, Mapping):
        value = [{"method": m, "task": t, "score": s} for m, ts in value.items()
                 if isinstance(ts, Mapping) for t, s in ts.items()]
    if not isinstance(value, list):
        return out
    for row in value:
        if not isinstance(row, Mapping) or not {"method", "task", "score"} <= set(row):
            continue  # tolerate malformed rows: the table simply lacks them
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            continue
        out.append(ScoreRow(method=_canonical(str(row["method"])), task=str(row["task"]), score=score,
                            record=stem, pair=str(row.get("pair", "")),
                            n=int(row["n"]) if isinstance(row.get("n"), (int, float)) else None,
                            protocol=str(row.get("protocol") or "pkt"), **_comparison_of(row)))
    return out


def _comparison_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The optional comparison fields of a scorecard row; malformed ones are left out."""
    try:
        ci = row.get("ci")
        return {"effect": float(row["effect"]), "p": float(row["p"]),
                "ci": (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
                "seeds": int(row["seeds"]) if isinstance(row.get("seeds"), (int, float)) else None,
                "verdict": str(row["verdict"]) if isinstance(row.get("verdict"), str) else None}
    except (KeyError, TypeError, ValueError):
        return {}


def collect_scores(records: Mapping[str, Mapping[str, Any]]) -> list[ScoreRow]:
    """Every scorecard row of ``records`` (as returned by ``pktlib.records.load_records``)."""
    rows: list[ScoreRow] = []
    for stem, rec in sorted(records.items()):
        metrics = rec.get("metrics") if isinstance(rec, Mapping) else None
        if isinstance(metrics, Mapping) and "scorecard" in metrics:
            rows += _rows_of(stem, metrics["scorecard"])
    return rows


def _link(text: str, href: str) -> str:
    return f"[{text}]({href})"


def _record_link(href: str, style: str) -> str:
    if style == "download":
        return f"{{download}}`record <{href}>`"
    if style == "link":
        return _link("record", href)
    raise PktError(f"unknown record_style {style!r}; expected 'download' or 'link'")


def scorecard_tables(records: Mapping[str, Mapping[str, Any]], *,
                     chapter_href: Callable[[str], str] = lambda stem: f"{stem}.ipynb",
                     record_href: Callable[[str], str] = lambda stem: f"{stem}.record.json",
                     record_style: str = "download",
                     ) -> dict[str, pd.DataFrame]:
    """Per family, a table with one row per method: the paper's scores (each reference pair and
    task of that family) beside the project's (task, model pair, score, links).

    ``chapter_href``/``record_href`` turn a record stem into link targets (defaults: relative
    links from a chapter in ``book/``). ``record_style="download"`` writes the record link as a
    MyST ``{download}`` role, so the book build copies the JSON file into the site (a plain
    link to a ``.record.json`` is broken in the rendered book: Sphinx does not copy it);
    ``"link"`` writes a plain Markdown link. A method with several project scores on the family's
    tasks gets one row per score; a method with none keeps its paper numbers and empty cells.
    A score on a paper benchmark measured with another protocol than the paper's has empty paper cells.
    """
    found = collect_scores(records)
    tables = {}
    for fam in FAMILIES:
        fam_rows = []
        methods = list(METHODS) + sorted({r.method for r in found} - set(METHODS))
        for m in methods:
            base: dict[str, Any] = {"method": METHODS.get(m, m)}
            for ref, table in PAPER.items():
                for task, score in table.get(m, {}).items():
                    if FAMILY_OF_TASK.get(task) == fam:
                        base[f"paper: {task} ({ref.split(' (')[0]})"] = score
            mine = [r for r in found if r.method == m and FAMILY_OF_TASK.get(r.task) == fam]
            if not mine:
                fam_rows.append({**base, "project task": None, "protocol": None, "model pair": None,
                                 "project score": None, "n": None, "vs student": None, "source": None})
            for r in mine:
                # not like for like: no paper numbers beside it (module docstring)
                paper = base if r.comparable else {"method": base["method"]}
                fam_rows.append({**paper, "project task": r.task, "protocol": r.protocol, "model pair": r.pair or None,
                                 "project score": round(r.score, 2), "n": r.n, "vs student": _effect_text(r),
                                 "source": f"{_link(r.record, chapter_href(r.record))} · "
                                           f"{_record_link(record_href(r.record), record_style)}"})
        df = pd.DataFrame(fam_rows)
        df["n"] = df["n"].astype("Int64")  # a count, even with empty cells
        paper_cols = sorted(c for c in df.columns if c.startswith("paper:"))
        tables[fam] = df[["method", *paper_cols, "project task", "protocol", "model pair", "project score", "n",
                          "vs student", "source"]]
    return tables


def _effect_text(r: ScoreRow) -> str | None:
    """``"+1.2 [-0.3, +2.7], p = 0.12 (3 seeds)"``: the row's effect over the student, its 95%
    interval and paired p; None when the chapter made no comparison."""
    if r.effect is None:
        return None
    ci = f" [{r.ci[0]:+.1f}, {r.ci[1]:+.1f}]" if r.ci else ""
    seeds = f" ({r.seeds} seed{'s' if r.seeds != 1 else ''})" if r.seeds else ""
    return f"{r.effect:+.1f}{ci}, p = {r.p:.2g}{seeds}"


def build_label(record: Mapping[str, Any]) -> str | None:
    """The pocket-pair build a record's chapter ran on, from its own parameters: ``"<preset> seed <pair_seed>"``
    (the preset defaults to "default"); None for a chapter without a ``pair_seed`` parameter."""
    params = record.get("parameters") if isinstance(record, Mapping) else None
    seed = params.get("pair_seed") if isinstance(params, Mapping) else None
    if not isinstance(seed, int):
        return None
    return f"{params.get('preset', 'default')} seed {seed}"


def records_by_build(folders: Sequence[str | os.PathLike]) -> dict[str, dict[str, dict[str, Any]]]:
    """The records under ``folders`` grouped by the pocket-pair build they ran on: build label
    (:func:`build_label`, e.g. ``"default seed 1"``) -> {chapter stem: record}, read from each
    record's own parameters, so a folder's name cannot mislabel it, and builds of different
    presets stay apart.

    A folder may be a glob pattern (``"runs/pocket-seed-*"``: every build ``make book-seed`` ran).
    Records without a ``pair_seed`` parameter (chapters that do not run on the pocket pair) are
    left out; missing folders are skipped. Raises :class:`PktError` when two records of one chapter
    ran on the same build (which of them is meant is ambiguous), naming both files.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    where: dict[tuple[str, str], Path] = {}
    expanded = [Path(f) for pattern in folders
                for f in (sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [pattern])]
    for folder in expanded:
        if not folder.is_dir():
            continue
        for stem, rec in load_records(folder).items():
            label = build_label(rec)
            if label is None:
                continue
            path = folder / f"{stem}.record.json"
            if (label, stem) in where:
                raise PktError(f"two records of chapter {stem!r} on the pocket pair {label}: "
                               f"{where[label, stem]} and {path}; keep one")
            where[label, stem] = path
            out.setdefault(label, {})[stem] = rec
    return dict(sorted(out.items()))


def across_builds(builds: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """The scorecard's pocket-task comparisons on several pocket-pair builds, side by side.

    ``builds``: build label -> records (:func:`records_by_build`). One row per (chapter, method,
    task) on a pocket task that some build compared with the student; per build ``<label>: score``,
    ``<label>: vs student`` (effect, interval, p, seeds) and ``<label>: verdict``; ``same verdict``
    is True when every build reached the same verdict (better / worse / n.s. / same answers),
    False when they differ, and missing (NA) when some build lacks the comparison. Raises
    :class:`PktError` for fewer than two builds.
    """
    if len(builds) < 2:
        raise PktError(f"side by side needs records of at least two pocket-pair builds; found {sorted(builds)}")
    found: dict[tuple[str, str, str], dict[str, ScoreRow]] = {}
    for label, recs in builds.items():
        for r in collect_scores(recs):
            if r.task.startswith("pocket-") and r.effect is not None:
                found.setdefault((r.record, r.method, r.task), {})[label] = r
    order = {m: i for i, m in enumerate(METHODS)}
    rows = []
    for (stem, method, task), per in sorted(found.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)),
                                                                           kv[0][2])):
        row: dict[str, Any] = {"chapter": stem, "method": METHODS.get(method, method), "task": task}
        for label in builds:
            r = per.get(label)
            row[f"{label}: score"] = round(r.score, 2) if r else None
            row[f"{label}: vs student"] = _effect_text(r) if r else None
            row[f"{label}: verdict"] = r.verdict if r else None
        verdicts = [per[b].verdict if b in per else None for b in builds]
        row["same verdict"] = pd.NA if None in verdicts else len(set(verdicts)) == 1
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["same verdict"] = df["same verdict"].astype("boolean")
    return df


# The paper's claims that a pocket chapter decides: (claim, chapter, the metric holding its conclusion).
PAPER_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("LaTen improves the student, unstably", "laten", "lr_sweep_claim"),
    ("LaTen ≥ distillation at ≤ 100 examples", "distillation", "laten_claim"),
    ("A specialist source does not help", "specialist_sources", "verdict"),
)
_CLAIM_PREFIX = re.compile(r"^\*\*The paper's claim, \"[^\"]*\"\*\*:\s*")


def claims_by_build(builds: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Each of :data:`PAPER_CLAIMS` as each build's chapter concluded it, read from its record.

    ``builds``: build label -> records (:func:`records_by_build`). One row per (claim, build):
    ``claim``, ``chapter``, ``build`` and ``conclusion`` (the chapter's own sentence, without its
    bold "The paper's claim" lead; None where that build's record lacks it).
    """
    rows = []
    for claim, chapter, key in PAPER_CLAIMS:
        for label, recs in builds.items():
            text = ((recs.get(chapter) or {}).get("metrics") or {}).get(key)
            rows.append({"claim": claim, "chapter": chapter, "build": label,
                         "conclusion": _CLAIM_PREFIX.sub("", text.strip()) if isinstance(text, str) else None})
    return rows


def claims_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`claims_by_build` rows as a Markdown list: each claim, then each build's conclusion."""
    out, last = [], None
    for r in rows:
        if r["claim"] != last:
            out.append(f"- **{r['claim']}** (chapter `{r['chapter']}`)")
            last = r["claim"]
        out.append(f"  - *{r['build']}*: {r['conclusion'] or 'not run on this build'}")
    return "\n".join(out) + "\n"


def to_markdown(df) -> str:
    """A pipe table (links stay clickable when rendered as Markdown; empty cells are blank)."""
    if df is None or len(df.columns) == 0:
        raise PktError("empty scorecard table")

    def cell(v: Any) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    head = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    return head + "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)) + "\n"
