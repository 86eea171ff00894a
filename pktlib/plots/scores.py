"""Figures of scores and training: bars, curves over steps, rates and budgets, sweeps, gains,
the distillation grids and the intro's dashboard."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pktlib.dashboard import PARADIGMS, POCKET, Gain
from pktlib.scorecard import FAMILIES
from pktlib.plots.base import finish_axes, set_title

__all__ = ["bars", "lines_by_bin", "loss_curves", "loss_bands", "score_vs_step", "score_vs_rate", "loss_gain",
           "laten_lr_sweep", "gain_bars", "grouped_bars", "gap_intervals", "curve_grid", "results_dashboard"]


def bars(table: pd.DataFrame | pd.Series, *, ylabel: str, xlabel: str | None = None, title: str | None = None,
         logy: bool = False, hline: float | None = None, rot: int = 0, figsize: tuple[float, float] = (7, 3.5),
         width: float = 0.5) -> Figure:
    """Grouped bars: one group per row of ``table``, one bar per column (a Series: one bar per row).

    ``hline`` draws a dotted reference line (chance, or 1 for ratios).
    """
    fig, ax = plt.subplots(figsize=figsize)
    table.plot.bar(ax=ax, logy=logy, rot=rot, width=width)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1)
    return finish_axes(fig, ax, xlabel=xlabel, ylabel=ylabel, title=title)


def lines_by_bin(acc: pd.DataFrame, *, xlabel: str, ylabel: str, title: str | None = None,
                 chance: float | None = None) -> Figure:
    """One line per column of ``acc`` over its rows (bins, in order); ``chance``: a dotted line."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    acc.plot(ax=ax, marker="o")
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    return finish_axes(fig, ax, xlabel=xlabel, ylabel=ylabel, title=title, legend=10)


def loss_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], *,
                title: str | None = None) -> Figure:
    """One panel per stage, one line per model: ``{stage: {model: [(step, loss), ...]}}``."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (stage, per_model) in zip(axes[0], curves.items()):
        for name, curve in per_model.items():
            ax.plot([p[0] for p in curve], [p[1] for p in curve], label=name)
        ax.set(title=f"{stage} training", xlabel="step", ylabel="loss (nats/token)")
        ax.legend()
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def loss_bands(bands: pd.DataFrame, *, row: str = "setting", col: str = "family", hue: str = "init",
               title: str | None = None) -> Figure:
    """Mean training loss per step with a ± one std band: panels ``row`` x ``col``, lines by ``hue``.

    ``bands``: columns ``row``, ``col``, ``hue``, step, mean, std (one row per step).
    """
    rows, cols, hues = (list(dict.fromkeys(bands[c])) for c in (row, col, hue))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.6 * len(cols), 3.0 * len(rows)),
                             squeeze=False, sharex="col")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            for h in hues:
                b = bands[(bands[row] == r) & (bands[col] == c) & (bands[hue] == h)].sort_values("step")
                ax.plot(b.step, b["mean"], label=h)
                ax.fill_between(b.step, b["mean"] - b["std"], b["mean"] + b["std"], alpha=0.2)
            ax.set_title(f"pocket-{c}, {r}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
    axes[0][0].legend()
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def score_vs_step(curve: pd.DataFrame, baselines: pd.DataFrame, *, configs: Sequence[str], tasks: Sequence[str],
                  title: str | None = None) -> Figure:
    """LaTen score against alignment step: one thin line per seed, the mean thick, step 0 the
    student; dashed the teacher, dotted the student. Panels: configs (rows) x tasks (columns).

    ``curve``: columns config, task, seed, step, score; ``baselines``: task, model, score.
    """
    fig, axes = plt.subplots(len(configs), len(tasks), figsize=(4 * len(tasks), 3.2 * len(configs)), squeeze=False)
    for i, name in enumerate(configs):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            b = baselines[baselines.task == task].set_index("model").score
            d = curve[(curve.config == name) & (curve.task == task)]
            for _, g in d.groupby("seed"):
                g = g.sort_values("step")
                ax.plot([0, *g.step], [b["student"], *g.score], color="tab:blue", alpha=0.35, lw=1)
            m = d.groupby("step").score.mean()
            ax.plot([0, *m.index], [b["student"], *m.values], color="tab:blue", lw=2.5, marker="o", label="LaTen (mean)")
            ax.axhline(b["teacher"], color="tab:red", ls="--", label="teacher")
            ax.axhline(b["student"], color="gray", ls=":", label="student")
            ax.set_title(f"{task} ({name})", fontsize=10)
            ax.set_xlabel("alignment step")
            ax.set_ylabel("score (%)")
    axes[0][0].legend(fontsize=8)
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def score_vs_rate(rates: pd.DataFrame, students: Mapping[str, float], *, title: str | None = None) -> Figure:
    """Mean ± std score against transfer rate, one line per task, its student's score dotted.

    ``rates``: columns task, transfer_rate, mean, std; ``students``: task -> student score.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, g in rates.groupby("task"):
        line = ax.errorbar(g.transfer_rate, g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=task)
        ax.axhline(students[task], color=line[0].get_color(), ls=":", lw=1)
    return finish_axes(fig, ax, xlabel="transfer rate (share of student neurons per layer)", ylabel="score (%)",
                   title=title, default="LaTen against transfer rate (dotted: student)", legend=8)


def loss_gain(logs: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Mean over seeds of the batch loss gain per alignment step, one line per (config, task).

    ``logs``: columns config, task, step, lm_gain_vs_student. The "paper lr" lines are solid.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (name, task), g in logs.groupby(["config", "task"]):
        m = g.groupby("step").lm_gain_vs_student.mean()
        ax.plot(m.index, m.values, marker="o", ls="-" if name == "paper lr" else "--", label=f"{task}, {name}")
    ax.axhline(0, color="gray", lw=1)
    return finish_axes(fig, ax, xlabel="alignment step", ylabel="student LM loss - injected LM loss", title=title,
                   default="Batch loss gain from the translated neurons (after the step)", legend=7)


def laten_lr_sweep(table: pd.DataFrame, *, band: tuple[float, float] = (0.01, 0.1),
                   title: str | None = None) -> Figure:
    """LaTen against its learning rate, one column per task. Top: injected delta RMS over the
    student's weight RMS (median over seeds, log-log; shaded: ``band``). Bottom: score gap to the
    student per seed (filled: McNemar p < alpha, i.e. ``outcome`` "better"/"worse") and its mean.
    One colour per penalty weight, one line style per alignment step.

    ``table``: columns task, penalty, lr, step, seed, ratio, gap, outcome
    (:func:`pktlib.experiments.laten_sweep.lr_sweep_table`).
    """
    tasks = sorted(table.task.unique())
    penalties = sorted(table.penalty.unique(), reverse=True)
    steps = sorted(table.step.unique())
    colours = {p: f"C{i}" for i, p in enumerate(penalties)}
    styles = {s: ls for s, ls in zip(steps, ["-", "--", ":", "-."] * len(steps))}
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False, sharex=True)
    for j, task in enumerate(tasks):
        top, bottom = axes[0][j], axes[1][j]
        top.axhspan(*band, color="gray", alpha=0.15, lw=0)
        bottom.axhline(0, color="gray", lw=1)
        d = table[table.task == task]
        for (pen, st), g in d.groupby(["penalty", "step"]):
            label = f"penalty {pen:g}, step {st}"
            ratio = g.groupby("lr").ratio.median()
            top.plot(ratio.index, ratio.values, color=colours[pen], ls=styles[st], marker="o", ms=3, label=label)
            gap = g.groupby("lr").gap.mean()
            bottom.plot(gap.index, gap.values, color=colours[pen], ls=styles[st], lw=1.5, label=label)
            # seeds side by side around each lr, so their points do not hide each other
            shift = 1 + 0.06 * (g.seed - g.seed.mean())
            sig = g.outcome.isin(["better", "worse"])
            bottom.scatter(g.lr[sig] * shift[sig], g.gap[sig], color=colours[pen], s=18, zorder=3)
            bottom.scatter(g.lr[~sig] * shift[~sig], g.gap[~sig], facecolors="none", edgecolors=colours[pen], s=18,
                           zorder=3)
        top.set_xscale("log"), top.set_yscale("log")
        bottom.set_xscale("log")
        top.set_title(task, fontsize=10)
        top.set_ylabel("delta RMS / weight RMS")
        bottom.set_ylabel("score - student (points)")
        bottom.set_xlabel("translator learning rate")
    axes[0][0].legend(fontsize=7)
    set_title(fig, title, "LaTen beyond the inert regime (filled: seed differs from the student, McNemar p < 0.05)",
           fontsize=10)
    fig.tight_layout()
    return fig


def gain_bars(gains: pd.DataFrame, families: Sequence[str], *, title: str | None = None) -> Figure:
    """Horizontal bars of each method's gain over the student, one panel per family, one colour per
    source. ``gains``: columns source, family, method, gain."""
    fig, axes = plt.subplots(1, len(families), figsize=(13, 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        sub = gains[gains.family == fam].pivot_table(index="method", columns="source", values="gain")
        if len(sub):
            sub.plot.barh(ax=ax)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(fam)
        ax.set_xlabel("score gain over the student (points)")
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def grouped_bars(values, *, errors=None, references=None, ylabel: str = "score (%)", panel_title: str = "{}",
                 width: float = 4.2, height: float = 3.2):
    """One panel per key of ``values``; in each, groups of bars: ``values[panel][group][bar]``.

    ``errors`` has the same nesting (error-bar half widths, e.g. one std over seeds, or
    ``(below, above)`` pairs, e.g. a score's interval; missing or NaN: none). ``references[panel]``
    maps a label to a value drawn as a horizontal line (e.g. the student's and the teacher's
    scores). Bars keep the order of first appearance. Returns the Figure.
    """
    panels = list(values)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    styles = [dict(color="gray", ls=":"), dict(color="tab:red", ls="--"), dict(color="tab:green", ls="-."),
              dict(color="tab:purple", ls=(0, (5, 2, 1, 2)))]
    for ax, panel in zip(axes[0], panels):
        groups = list(values[panel])
        bars = list(dict.fromkeys(b for g in groups for b in values[panel][g]))
        w = 0.8 / max(1, len(bars))
        for i, bar in enumerate(bars):
            x = np.arange(len(groups)) + (i - (len(bars) - 1) / 2) * w
            y = [values[panel][g].get(bar, np.nan) for g in groups]
            e = [((errors or {}).get(panel, {}).get(g, {}) or {}).get(bar, np.nan) for g in groups]
            e = [(0.0, 0.0) if v is None or (isinstance(v, float) and math.isnan(v))
                 else tuple(v) if isinstance(v, (tuple, list)) else (v, v) for v in e]
            ax.bar(x, y, w, yerr=[[float(lo) for lo, _ in e], [float(hi) for _, hi in e]], capsize=2, label=bar)
        for j, (label, v) in enumerate(((references or {}).get(panel) or {}).items()):
            ax.axhline(v, lw=1.2, label=label, **styles[j % len(styles)])
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_title(panel_title.format(panel), fontsize=10)
        ax.set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def gap_intervals(per_seed: pd.DataFrame, over_seeds: pd.DataFrame, *, labels: Mapping[str, str] | None = None,
                  xlabel: str = "specialist source minus plain source (points)", title: str | None = None) -> Figure:
    """A forest plot of paired gaps: one row per (family, method, seed) of ``per_seed`` (columns
    family, method, seed, gap, ci_low, ci_high, p_value; filled marker where p < 0.05) and, under
    each (family, method), the mean over seeds of ``over_seeds`` (gap, gap_low, gap_high) as a
    diamond. ``labels`` renames methods. A vertical line marks no difference. Returns the Figure.
    """
    rows = []  # (label, gap, low, high, kind)
    for (fam, method), g in over_seeds.groupby(["family", "method"], sort=False):
        name = (labels or {}).get(method, method)
        for r in per_seed[(per_seed.family == fam) & (per_seed.method == method)].itertuples():
            rows.append((f"{fam}, {name}, seed {r.seed}", r.gap, r.ci_low, r.ci_high,
                         "significant" if r.p_value < 0.05 else "seed"))
        m = g.iloc[0]
        rows.append((f"{fam}, {name}: mean", m.gap, m.gap_low, m.gap_high, "mean"))
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 1.2))
    style = {"seed": dict(marker="o", mfc="white", color="tab:blue"),
             "significant": dict(marker="o", color="tab:blue"), "mean": dict(marker="D", color="black")}
    for i, (_, gap, lo, hi, kind) in enumerate(rows):
        y = len(rows) - 1 - i
        ax.plot([lo, hi], [y, y], color=style[kind]["color"], lw=1.2)
        ax.plot([gap], [y], ls="", **style[kind])
    ax.axvline(0, color="gray", ls=":", lw=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    return finish_axes(fig, ax, xlabel=xlabel, title=title,
                       default="Paired gaps: per seed 95% interval (filled: McNemar p < 0.05), mean ± 2 s.e.")


def curve_grid(curves, *, xlabel: str = "step", ylabel: str = "loss", width: float = 4.2, height: float = 3.0,
               logy: bool = False):
    """Line plots ``curves[(row, column)][label] = [(x, y), ...]``: one panel per (row, column).

    Returns the Figure.
    """
    rows = list(dict.fromkeys(r for r, _ in curves))
    cols = list(dict.fromkeys(c for _, c in curves))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(width * len(cols), height * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            for label, pts in (curves.get((r, c)) or {}).items():
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=label, lw=1.3)
            ax.set_title(f"{r}, {c}", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if logy:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def results_dashboard(gains: Sequence[Gain], *,
                      width: float = 10.0) -> "plt.Figure":
    """The intro page's figure: per paradigm (rows) and task family (columns), each method's
    gain over the student in points, one bar per source (the paper's pairs first, then the
    pocket pair, then real pairs), with the spread over rows as an error bar where there are
    several. ``gains`` come from :func:`pktlib.dashboard.gains`; methods are drawn in the order
    of :data:`pktlib.dashboard.PARADIGMS`. Bars carry their values, so the figure reads without
    the axis. Returns the Figure (not shown)."""

    sources = sorted({g.source for g in gains},
                     key=lambda s: (0 if s.startswith("paper") else 1 if s == POCKET else 2, s))
    colours = {s: c for s, c in zip(sources, _source_colours(sources))}
    paradigms = list(PARADIGMS)
    fig, axes = plt.subplots(len(paradigms), len(FAMILIES), figsize=(width, 1.2 + 2.0 * len(paradigms)),
                             sharex="row", squeeze=False, layout="constrained")
    bar_h = 0.8 / max(1, len(sources))
    for r, paradigm in enumerate(paradigms):
        methods = list(PARADIGMS[paradigm])
        for c, fam in enumerate(FAMILIES):
            ax = axes[r, c]
            for k, src in enumerate(sources):
                for i, m in enumerate(methods):
                    g = next((x for x in gains if (x.paradigm, x.method, x.family, x.source) == (paradigm, m, fam, src)), None)
                    if g is None:
                        continue
                    y = i - 0.4 + bar_h * (k + 0.5)
                    ax.barh(y, g.gain, height=bar_h * 0.9, color=colours[src],
                            xerr=g.spread if g.spread else None, error_kw={"lw": 0.8, "capsize": 2}, label=src)
                    ax.annotate(f"{g.gain:+.1f}", (g.gain, y), xytext=(3 if g.gain >= 0 else -3, 0),
                                textcoords="offset points", va="center", ha="left" if g.gain >= 0 else "right",
                                fontsize=7)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(list(PARADIGMS[paradigm].values()) if c == 0 else [])
            ax.set_ylim(len(methods) - 0.5, -0.5)  # first method on top
            ax.margins(x=0.25)
            ax.grid(axis="x", lw=0.3, alpha=0.5)
            if r == 0:
                ax.set_title(fam)
            if r == len(paradigms) - 1:
                ax.set_xlabel("gain over the student (points)")
        axes[r, 0].set_ylabel(paradigm.split(" (")[0], fontsize=12, fontweight="bold")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in sources]
    if handles:
        fig.legend(handles, sources, loc="outside upper center", ncols=min(4, len(sources)), frameon=False,
                   fontsize=10)
    else:
        fig.suptitle("no results yet")
    return fig


def _source_colours(sources: Sequence[str]) -> list:
    """Greys for the paper's pairs, the first palette colour for the pocket pair, then the rest."""

    greys = iter(["0.35", "0.65", "0.8"])
    palette = iter(mpl.colormaps["tab10"].colors)
    return [next(greys, "0.5") if s.startswith("paper") else next(palette) for s in sources]
