"""Figures of the analyses: attribution heatmaps and profiles, stability, CKA grids, structural
cosines and delta distributions."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pktlib.plots.base import KIND_LABELS, ROLE_STYLES, finish_axes, integer_ticks, set_title

__all__ = ["score_change_heatmaps", "layer_profiles", "neuron_heatmaps", "stability_curves", "heatmap_grid",
           "structural_cosines", "delta_histograms", "quantile_curves"]


def score_change_heatmaps(scores: Mapping[str, pd.DataFrame], baselines: Mapping[str, float], *,
                          panel_titles: Mapping[str, str] | None = None, title: str | None = None) -> Figure:
    """Per panel a score matrix coloured by its change against ``baselines[panel]`` (red: worse,
    blue: better), each cell labelled with its score (NaN cells stay blank)."""
    fig, axes = plt.subplots(1, len(scores), figsize=(5.2 * len(scores), 3.6), squeeze=False)
    for ax, (name, mat) in zip(axes[0], scores.items()):
        m, base = mat.to_numpy(dtype=float), baselines[name]
        lim = max(1.0, np.nanmax(np.abs(m - base)))
        ax.imshow(m - base, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(m.shape[1]), list(mat.columns), fontsize=7)
        ax.set_yticks(range(m.shape[0]), list(mat.index))
        ax.set_title((panel_titles or {}).get(name, name), fontsize=9)
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def layer_profiles(profiles: Mapping[str, Mapping[str, Sequence[float]]], families: Sequence[str],
                   roles: Sequence[str] = ("teacher", "student"), *, title: str | None = None) -> Figure:
    """Layer scores against relative depth: columns the families, rows FFN and attention.

    ``profiles["<family>/<role>"]`` holds ``{"ffn": [...], "attn": [...]}`` (one value per layer).
    """
    fig, axes = plt.subplots(2, len(families), figsize=(4.2 * len(families), 6), sharex=True, squeeze=False)
    for c, fam in enumerate(families):
        for r, kind in enumerate(KIND_LABELS):
            ax = axes[r, c]
            for role in roles:
                ys = profiles[f"{fam}/{role}"][kind]
                xs = np.linspace(0, 1, len(ys)) if len(ys) > 1 else [0.5]
                ax.plot(xs, ys, ROLE_STYLES.get(role, "-"), label=role)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{fam}: {KIND_LABELS[kind]}")
            if c == 0:
                ax.set_ylabel("layer score (log-prob gain per example)")
            if r == 1:
                ax.set_xlabel("relative depth")
    axes[0, 0].legend()
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def neuron_heatmaps(scores: Mapping[tuple[str, str], Any], *, title: str | None = None) -> Figure:
    """Neuron-score heatmaps (layers x neurons), one per ``(row, column)`` key, e.g. (role, kind).

    The diverging colour scale is symmetric at the 99.9th percentile of |score| of each panel.
    """
    rows, cols = list(dict.fromkeys(k[0] for k in scores)), list(dict.fromkeys(k[1] for k in scores))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(6.5 * len(cols), 3.25 * len(rows)), squeeze=False)
    for (r, c), S in scores.items():
        ax = axes[rows.index(r), cols.index(c)]
        S = np.asarray(S, dtype=float)
        lim = float(np.quantile(np.abs(S), 0.999)) or 1.0
        im = ax.imshow(S, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_yticks(range(S.shape[0]))
        ax.set_title(f"{r} {KIND_LABELS.get(c, c)} neurons")
        ax.set_ylabel("layer")
        ax.set_xlabel("neuron")
        fig.colorbar(im, ax=ax, fraction=0.03)
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def stability_curves(stab: Mapping[str, Mapping[str, Any]], *, k: int, title: str | None = None) -> Figure:
    """Mean top-``k`` Jaccard across examples per layer, FFN and attention panels, one line per model,
    with each model's chance level dotted. ``stab["<role>/<kind>"]`` has "jaccard" and "chance"."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    roles = list(dict.fromkeys(key.split("/")[0] for key in stab))
    for ax, kind in zip(axes, KIND_LABELS):
        n = 0
        for i, role in enumerate(roles):
            v = stab.get(f"{role}/{kind}")
            if v is None:
                continue
            ax.plot(range(len(v["jaccard"])), v["jaccard"], ROLE_STYLES.get(role, "-"), label=f"{role}: pairs of examples")
            ax.axhline(v["chance"], ls=":", color=f"C{i}", lw=1)
            n = max(n, len(v["jaccard"]))
        ax.set_title(f"{KIND_LABELS[kind]}: top-{k} Jaccard across examples")
        ax.set_xlabel("layer")
        ax.set_xticks(range(n))
    axes[0].set_ylabel("mean Jaccard index")
    axes[0].legend()
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def heatmap_grid(panels: Sequence[Sequence[tuple[Any, str, str, str]]], *, label: str = "linear CKA",
                 vmin: float = 0.0, vmax: float = 1.0, title: str | None = None) -> Figure:
    """Rows of heatmaps sharing one colour bar: each panel is ``(matrix, title, xlabel, ylabel)``.

    The matrix's first axis is drawn upwards (``origin="lower"``), as layer-by-layer CKA is read.
    """
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    # constrained layout leaves room for the shared colour bar (tight_layout cannot)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.8 * n_cols if n_rows > 1 else 5 * n_cols, 3.2 * n_rows + 0.6),
                             squeeze=False, layout="constrained")
    im = None
    for i, row in enumerate(panels):
        for j, (mat, name, xl, yl) in enumerate(row):
            ax = axes[i, j]
            im = ax.imshow(np.asarray(mat, dtype=float), vmin=vmin, vmax=vmax, cmap="magma", origin="lower",
                           aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            integer_ticks(ax.xaxis, np.shape(mat)[1])
            integer_ticks(ax.yaxis, np.shape(mat)[0])
        for j in range(len(row), n_cols):
            axes[i, j].set_visible(False)
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    set_title(fig, title, "")
    return fig


def structural_cosines(table: pd.DataFrame, modules: Sequence[str], *, title: str | None = None) -> Figure:
    """cos(BA, W) (top row) and cos(BA, W - BA) (bottom row) per student layer, one panel per
    module, one line per ``init``. ``table``: columns init, module, layer, cos_ba_w, cos_ba_residual."""
    fig, axes = plt.subplots(2, len(modules), figsize=(3.4 * len(modules), 5.6), squeeze=False, sharey="row")
    for c, m in enumerate(modules):
        for r, (col, label) in enumerate([("cos_ba_w", "cos(BA, W)"), ("cos_ba_residual", "cos(BA, W - BA)")]):
            ax = axes[r, c]
            for name, t in table.groupby("init", sort=False):
                sub = t[t["module"] == m]
                ax.plot(sub["layer"], sub[col], marker="o", label=name)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{m}: {label}", fontsize=9)
            ax.set_xlabel("student layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend()
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def delta_histograms(hists: Mapping[str, Mapping[str, tuple[Any, Any]]], *, title: str | None = None) -> Figure:
    """Log-count histograms, one panel per module, one outline per source:
    ``{module: {source: (counts, edges)}}`` (edges one longer than counts)."""
    fig, axes = plt.subplots(1, len(hists), figsize=(3.6 * len(hists), 3.2), squeeze=False, sharey=True)
    for ax, (m, per_source) in zip(axes[0], hists.items()):
        for src, (counts, edges) in per_source.items():
            ax.stairs(np.asarray(counts, dtype=float), np.asarray(edges, dtype=float), label=src, fill=False)
        ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("value")
    axes[0, 0].set_ylabel("count (log)")
    axes[0, -1].legend(fontsize=7)
    set_title(fig, title, "")
    fig.tight_layout()
    return fig


def quantile_curves(stats: pd.DataFrame, *, title: str | None = None) -> Figure:
    """|value| at each quantile (logit x axis, log y axis), one line per source, from the "all"
    rows of a delta-statistics table (columns source, module and ``q<quantile>``)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    qs = [c for c in stats.columns if c.startswith("q") and c[1:2].isdigit()]
    for _, row in stats[stats.module == "all"].iterrows():
        ax.plot([float(q[1:]) for q in qs], [abs(row[q]) for q in qs], marker="o", label=row["source"])
    ax.set_xscale("logit")
    ax.set_yscale("log")
    return finish_axes(fig, ax, xlabel="quantile", ylabel="|value| at quantile", title=title, legend=7)
