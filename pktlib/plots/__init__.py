"""The book's figures. Each function draws one figure from tidy results and returns it.

Inputs are the tables and dicts that :mod:`pktlib.experiments` and the analysis modules return
(nothing is computed here beyond what drawing needs), so a chapter's plot cell is one call.
Every function takes ``title``: the figure's title (``None`` keeps the default, ``""`` none).
In a notebook, assign the result (``fig = plots.x(...)``); the inline backend shows it once.
"""
from __future__ import annotations

from pktlib.plots.base import plt
from pktlib.plots.analysis import (score_change_heatmaps, layer_profiles, neuron_heatmaps, stability_curves,
                                   heatmap_grid, structural_cosines, delta_histograms, quantile_curves)
from pktlib.plots.scores import (bars, lines_by_bin, loss_curves, loss_bands, score_vs_step, score_vs_rate,
                                 loss_gain, laten_lr_sweep, gain_bars, grouped_bars, gap_intervals, curve_grid, results_dashboard)

__all__ = ["plt", "bars", "lines_by_bin", "loss_curves", "loss_bands", "score_vs_step", "score_vs_rate", "loss_gain",
           "laten_lr_sweep", "gain_bars", "grouped_bars", "gap_intervals", "curve_grid", "results_dashboard", "score_change_heatmaps",
           "layer_profiles", "neuron_heatmaps", "stability_curves", "heatmap_grid", "structural_cosines",
           "delta_histograms", "quantile_curves"]
