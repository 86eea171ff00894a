"""Delta ranges (paper Section 5, Figures 7-9): SFT deltas against Seeking's extracted weights.

The deltas are per (student or teacher layer, module) tensors (:func:`pktlib.similarity.sft_deltas`,
:func:`pktlib.similarity.seeking_deltas`). :func:`stats_table` pools them per source and module;
:func:`injection_variants` builds the student variants whose scores separate the direction of
the extracted weights from their scale.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
from torch import Tensor, nn

from pktlib import similarity
from pktlib.evaluation import evaluate
from pktlib.models import spec

__all__ = ["STAT_COLUMNS", "SFT_TEACHER", "SFT_STUDENT", "SEEKING", "stats_table", "common_range", "histograms",
           "injection_variants", "sft_roundtrip", "score_variants", "reading"]

STAT_COLUMNS = ["source", "module", "n", "std", "min", "max", "q0.01", "q0.5", "q0.99",
                "share_within_0_002", "share_within_0_005"]
SFT_TEACHER = "SFT delta (teacher)"
SFT_STUDENT = "SFT delta (student)"
SEEKING = "Seeking extracted (teacher -> student)"
Deltas = Mapping[Any, Tensor]  # (layer, module) -> delta


def _of_module(deltas: Deltas, module: str) -> dict[Any, Tensor]:
    return {k: v for k, v in deltas.items() if k[-1] == module}


def stats_table(sources: Mapping[str, Deltas], modules: Sequence[str]) -> pd.DataFrame:
    """:func:`pktlib.similarity.delta_stats` per source, over all modules ("all") and per module."""
    rows = []
    for src, deltas in sources.items():
        rows.append({"source": src, "module": "all", **similarity.delta_stats(deltas).as_row()})
        for m in modules:
            rows.append({"source": src, "module": m, **similarity.delta_stats(_of_module(deltas, m)).as_row()})
    return pd.DataFrame(rows)


def common_range(sources: Mapping[str, Deltas]) -> tuple[float, float]:
    """(smallest, largest) value over every delta of every source."""
    lo = min(float(min(v.min() for v in d.values())) for d in sources.values())
    hi = max(float(max(v.max() for v in d.values())) for d in sources.values())
    return lo, hi


def histograms(sources: Mapping[str, Deltas], modules: Sequence[str], *, bins: int
               ) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """``{module: {source: (counts, edges)}}`` on the :func:`common_range` of all sources."""
    rng = common_range(sources)
    return {m: {src: similarity.delta_histogram(list(_of_module(d, m).values()), bins=bins, range=rng)
                for src, d in sources.items()} for m in modules}


def injection_variants(student: tuple[nn.Module, Any], student_base: tuple[nn.Module, Any],
                       sources: Mapping[str, Deltas]) -> tuple[dict[str, tuple[nn.Module, Any]], float]:
    """(the student variants to score, the rescale factor std(SFT) / std(Seeking)).

    student-chat, student-base, student-base plus its own SFT delta (must give back student-chat's
    weights), student-chat plus Seeking's extracted matrices, and the same rescaled to the SFT std.
    Seeking's keys are (student layer, module) too, so both apply to the student's weights.
    """
    sft_s, seek = sources[SFT_STUDENT], sources[SEEKING]
    scale = similarity.delta_stats(sft_s).std / similarity.delta_stats(seek).std
    tok = student[1]
    variants = {
        "student-chat": student,
        "student-base": student_base,
        "student-base + own SFT delta": (similarity.apply_deltas(student_base[0], sft_s), tok),
        "student-chat + Seeking (unaligned)": (similarity.apply_deltas(student[0], seek), tok),
        "student-chat + Seeking rescaled to SFT std": (similarity.apply_deltas(student[0], seek, scale=scale), tok),
    }
    return variants, scale


def sft_roundtrip(rebuilt: nn.Module, chat: nn.Module, deltas: Deltas) -> float:
    """Largest |rebuilt - chat| over the weights ``deltas`` covers (0 up to rounding when rebuilt =
    base + (chat - base)); the other weights keep their base values and are not compared."""
    s = spec(chat)
    return max(float((s.weight(rebuilt, l, m) - s.weight(chat, l, m)).detach().abs().max()) for l, m in deltas)


def score_variants(variants: Mapping[str, tuple[nn.Module, Any]], task: str, *, limit: int) -> pd.DataFrame:
    """Score, n and Wilson 95% interval of every variant on ``task``'s first ``limit`` test examples."""
    rows = []
    for name, mt in variants.items():
        res = evaluate(mt, task, "test", limit=limit, progress=False)
        rows.append({"model": name, "score": res.score, "n": res.n, "ci95_low": res.ci95[0], "ci95_high": res.ci95[1]})
    return pd.DataFrame(rows)


def reading(stats: pd.DataFrame, scores: pd.DataFrame, *, task: str, limit: int) -> str:
    """Shares within +-0.005, stds, and what injecting the extracted matrices did (Markdown)."""
    st = stats[stats.module == "all"].set_index("source")
    sc = scores.set_index("model")["score"]
    return (f"{100 * st.loc[SFT_STUDENT, 'share_within_0_005']:.1f}% of the student's SFT delta values "
            f"({100 * st.loc[SFT_TEACHER, 'share_within_0_005']:.1f}% of the teacher's) lie within +-0.005, "
            f"against {100 * st.loc[SEEKING, 'share_within_0_005']:.1f}% of Seeking's extracted values; "
            f"their standard deviations are {st.loc[SFT_STUDENT, 'std']:.2g} and {st.loc[SEEKING, 'std']:.2g}. "
            f"Injected, the extracted matrices move the student from {sc['student-chat']:.1f} to "
            f"{sc['student-chat + Seeking (unaligned)']:.1f} on {task} ({limit} test examples); rescaled to the SFT "
            f"range they give {sc['student-chat + Seeking rescaled to SFT std']:.1f}.")
