"""Figures: each plots function draws the expected panels and artists from small inputs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pktlib import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plots.plt.close("all")


def _visible_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_bars_groups_columns_and_draws_the_reference_line():
    table = pd.DataFrame({"teacher": [60.0, 40.0], "student": [50.0, 30.0]}, index=["math", "code"])
    fig = plots.bars(table, ylabel="score", hline=25, title="scores")
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert len(ax.patches) == 4 and sorted(p.get_height() for p in ax.patches) == [30, 40, 50, 60]
    assert ax.get_title() == "scores" and ax.get_ylabel() == "score"
    assert [l.get_ydata()[0] for l in ax.lines] == [25]
    assert plots.bars(table, ylabel="n", logy=True).axes[0].get_yscale() == "log"


def test_lines_by_bin_one_line_per_model_and_chance():
    acc = pd.DataFrame({"teacher-chat": [20.0, 60.0, 90.0], "student-chat": [10.0, 30.0, 80.0]},
                       index=["[12, 16)", "[16, 22)", "[22, 33)"])
    fig = plots.lines_by_bin(acc, xlabel="bin", ylabel="acc", title="t", chance=25)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two models + chance
    assert list(ax.lines[0].get_ydata()) == [20.0, 60.0, 90.0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"teacher-chat", "student-chat", "chance"}


def test_loss_curves_one_panel_per_stage():
    curves = {"base": {"teacher": [(0, 5.0), (2, 4.0)], "student": [(0, 5.5), (2, 4.5)]},
              "chat": {"teacher": [(0, 2.0)], "student": [(0, 2.5)]}}
    fig = plots.loss_curves(curves, title="training")
    assert [ax.get_title() for ax in fig.axes] == ["base training", "chat training"]
    assert len(fig.axes[0].lines) == 2 and list(fig.axes[0].lines[1].get_ydata()) == [5.5, 4.5]
    assert fig._suptitle.get_text() == "training"


def test_loss_bands_panels_lines_and_bands():
    rows = [{"family": f, "setting": s, "init": i, "step": st, "mean": 1.0 / (st + 1), "std": 0.1}
            for f in ("math", "code") for s in ("N=16", "align") for i in ("random", "seeking") for st in (1, 2, 3)]
    fig = plots.loss_bands(pd.DataFrame(rows))
    assert len(fig.axes) == 4
    ax = fig.axes[0]
    assert ax.get_title() == "pocket-math, N=16"
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # a mean line and a band per init
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 1 / 3, 0.25])


def test_score_change_heatmaps_labels_cells_and_skips_nan():
    mat = pd.DataFrame([[10.0, np.nan], [30.0, 40.0]], index=["top", "bottom"], columns=["pca\nrandom", "Seeking"])
    fig = plots.score_change_heatmaps({"math": mat}, {"math": 20.0}, panel_titles={"math": "pocket-math"}, title="grid")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["10", "30", "40"]
    img = ax.images[0].get_array()
    assert img[0, 0] == -10 and img[1, 1] == 20  # coloured by the change against the student
    assert [t.get_text() for t in ax.get_yticklabels()] == ["top", "bottom"]
    assert ax.get_title() == "pocket-math"


def test_layer_profiles_and_stability_curves():
    profiles = {f"math/{r}": {"ffn": [0.1, 0.2, 0.5], "attn": [0.0, 0.1, 0.1]} for r in ("teacher", "student")}
    fig = plots.layer_profiles(profiles, ["math"])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3  # two models + the zero line
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [0, 0.5, 1])
    stab = {f"{r}/{k}": {"jaccard": [0.5, 0.6], "chance": 0.1} for r in ("teacher", "student") for k in ("ffn", "attn")}
    fig = plots.stability_curves(stab, k=4)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4  # two curves + two chance lines
    assert fig.axes[0].get_title() == "FFN: top-4 Jaccard across examples"


def test_neuron_heatmaps_grid_and_symmetric_scale():
    scores = {(r, k): torch.arange(-6.0, 6.0).reshape(2, 6) for r in ("teacher", "student") for k in ("ffn", "attn")}
    fig = plots.neuron_heatmaps(scores, title="neurons")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and len(fig.axes) == 8  # four heatmaps, four colour bars
    vmin, vmax = panels[0].images[0].get_clim()
    assert vmin == -vmax and vmax > 0
    assert panels[0].get_title() == "teacher FFN neurons"


def test_heatmap_grid_hides_unused_panels():
    m = torch.eye(3)
    fig = plots.heatmap_grid([[(m, "a", "x", "y"), (m, "b", "x", "y")], [(m, "c", "x", "y")]], label="CKA")
    shown = [ax for ax in fig.axes if ax.images and ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["a", "b", "c"]
    assert sum(1 for ax in fig.axes if not ax.get_visible()) == 1
    assert shown[0].images[0].get_clim() == (0.0, 1.0)


def test_laten_figures():
    curve = pd.DataFrame([{"config": "paper lr", "task": "pocket-math", "seed": s, "step": st, "score": 10.0 + s + st}
                          for s in (0, 1) for st in (1, 2)])
    base = pd.DataFrame([{"task": "pocket-math", "model": "student", "score": 10.0},
                         {"task": "pocket-math", "model": "teacher", "score": 30.0}])
    fig = plots.score_vs_step(curve, base, configs=["paper lr"], tasks=["pocket-math"])
    ax = fig.axes[0]
    assert len(ax.lines) == 2 + 1 + 2  # two seeds, the mean, teacher and student lines
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [10.0, 11.5, 12.5])  # the mean starts at the student
    rates = pd.DataFrame({"task": ["pocket-math"] * 2, "transfer_rate": [0.1, 0.2], "mean": [10.0, 12.0],
                          "std": [1.0, float("nan")]})
    fig = plots.score_vs_rate(rates, {"pocket-math": 9.0})
    assert fig.axes[0].get_title() == "LaTen against transfer rate (dotted: student)"
    logs = pd.DataFrame({"config": ["paper lr"] * 2, "task": ["pocket-math"] * 2, "step": [1, 2],
                         "lm_gain_vs_student": [0.1, -0.2]})
    fig = plots.loss_gain(logs, title="gain")
    assert fig.axes[0].get_title() == "gain" and list(fig.axes[0].lines[0].get_ydata()) == [0.1, -0.2]


def test_structural_delta_and_gain_figures():
    table = pd.DataFrame([{"init": i, "module": m, "layer": l, "cos_ba_w": 0.5, "cos_ba_residual": -0.1}
                          for i in ("PiSSA", "Seeking") for m in ("up_proj", "o_proj") for l in (0, 1)])
    fig = plots.structural_cosines(table, ["up_proj", "o_proj"])
    assert len(fig.axes) == 4 and len(fig.axes[0].lines) == 3  # two inits + zero line
    hists = {"up_proj": {"SFT": (torch.tensor([1.0, 5.0]), torch.tensor([-1.0, 0.0, 1.0]))}}
    fig = plots.delta_histograms(hists)
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].patches) == 1
    stats = pd.DataFrame([{"source": "SFT", "module": "all", "q0.01": -0.01, "q0.5": 0.0001, "q0.99": 0.02},
                          {"source": "SFT", "module": "up_proj", "q0.01": -1, "q0.5": 0, "q0.99": 1}])
    fig = plots.quantile_curves(stats)
    assert len(fig.axes[0].lines) == 1 and list(fig.axes[0].lines[0].get_ydata()) == [0.01, 0.0001, 0.02]
    gains = pd.DataFrame({"source": ["project", "paper"], "family": ["math", "math"], "method": ["laten", "laten"],
                          "gain": [3.0, 4.4]})
    fig = plots.gain_bars(gains, ["knowledge", "math"])
    assert len(fig.axes[1].patches) == 2 and not fig.axes[0].patches



def test_grouped_bars_takes_asymmetric_intervals():
    values = {"gap": {"GSM8K": {"pair": 10.0, "paper": 11.2}, "MMLU": {"pair": -5.0, "paper": np.nan}}}
    errors = {"gap": {"GSM8K": {"pair": (8.0, 8.0)}, "MMLU": {"pair": (7.0, 2.0)}}}
    fig = plots.grouped_bars(values, errors=errors)
    ax = fig.axes[0]
    bars = [p for p in ax.patches]
    assert [round(b.get_height(), 1) for b in bars[:2]] == [10.0, -5.0]
    caps = [c for c in ax.collections if len(c.get_segments())]  # error-bar line collections
    segs = caps[0].get_segments()
    assert [(round(s[0][1], 1), round(s[1][1], 1)) for s in segs] == [(2.0, 18.0), (-12.0, -3.0)]


def test_laten_lr_sweep_ratio_and_gap_panels():
    rows = [{"task": t, "penalty": pen, "lr": lr, "step": st, "seed": seed, "ratio": lr * (1 + (pen == 0)),
             "gap": 10.0 * seed - 5, "outcome": "better" if seed == 1 and lr > 1e-3 else "n.s."}
            for t in ("pocket-code", "pocket-math") for pen in (1000.0, 0.0) for lr in (3e-5, 3e-3) for st in (1, 4)
            for seed in (0, 1)]
    fig = plots.laten_lr_sweep(pd.DataFrame(rows))
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    top, bottom = fig.axes[0], fig.axes[2]  # first task's column
    assert top.get_title() == "pocket-code" and top.get_yscale() == "log" and bottom.get_xscale() == "log"
    assert len(top.lines) == 4  # one per (penalty, step)
    line = next(l for l in top.lines if l.get_label() == "penalty 0, step 1")
    assert list(line.get_xdata()) == [3e-5, 3e-3] and list(line.get_ydata()) == pytest.approx([6e-5, 6e-3])
    gaps = [l for l in bottom.lines if l.get_label().startswith("penalty")]
    assert len(gaps) == 4 and all(list(l.get_ydata()) == [0.0, 0.0] for l in gaps)  # mean of -5 and +5
    filled = sum(len(c.get_offsets()) for c in bottom.collections if len(c.get_facecolors()))
    assert filled == 4  # the significant seed at lr 3e-3, per (penalty, step)
