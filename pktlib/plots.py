"""Figure helpers shared by the notebooks (matplotlib/seaborn). Each returns the Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt

__all__ = ["plt"]


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
