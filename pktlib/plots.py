"""Figure helpers shared by the notebooks and the book (matplotlib/seaborn). Each returns the Figure."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt

__all__ = ["plt", "results_dashboard"]


def results_dashboard(gains: Sequence["pktlib.dashboard.Gain"], *,  # noqa: F821
                      width: float = 10.0) -> "plt.Figure":
    """The intro page's figure: per paradigm (rows) and task family (columns), each method's
    gain over the student in points, one bar per source (the paper's pairs first, then the
    pocket pair, then real pairs), with the spread over rows as an error bar where there are
    several. ``gains`` come from :func:`pktlib.dashboard.gains`; methods are drawn in the order
    of :data:`pktlib.dashboard.PARADIGMS`. Bars carry their values, so the figure reads without
    the axis. Returns the Figure (not shown)."""
    from pktlib.dashboard import PARADIGMS, POCKET
    from pktlib.scorecard import FAMILIES

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
    import matplotlib as mpl

    greys = iter(["0.35", "0.65", "0.8"])
    palette = iter(mpl.colormaps["tab10"].colors)
    return [next(greys, "0.5") if s.startswith("paper") else next(palette) for s in sources]


# ---------------------------------------------------------------------------------------
# Distillation baselines (notebooks/distillation.ipynb)

__all__ += ["grouped_bars", "curve_grid"]


def grouped_bars(values, *, errors=None, references=None, ylabel: str = "score (%)", panel_title: str = "{}",
                 width: float = 4.2, height: float = 3.2):
    """One panel per key of ``values``; in each, groups of bars: ``values[panel][group][bar]``.

    ``errors`` has the same nesting (error-bar half widths, e.g. one std over seeds; missing or
    NaN: none). ``references[panel]`` maps a label to a value drawn as a horizontal line
    (e.g. the student's and the teacher's scores). Bars keep the order of first appearance.
    Returns the Figure.
    """
    import math

    import numpy as np

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
            e = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in e]
            ax.bar(x, y, w, yerr=e, capsize=2, label=bar)
        for j, (label, v) in enumerate(((references or {}).get(panel) or {}).items()):
            ax.axhline(v, lw=1.2, label=label, **styles[j % len(styles)])
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_title(panel_title.format(panel), fontsize=10)
        ax.set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


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
