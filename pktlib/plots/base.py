"""Shared pieces of the book's figures: line styles, titles, axis finishing."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["plt", "Figure", "ROLE_STYLES", "KIND_LABELS", "set_title", "finish_axes", "integer_ticks"]

ROLE_STYLES = {"teacher": "-o", "student": "--s"}
KIND_LABELS = {"ffn": "FFN", "attn": "attention"}


def set_title(obj, title: str | None, default: str, **kwargs) -> None:
    """Set ``title`` (or ``default`` when it is None) on an Axes or, as a suptitle, on a Figure."""
    text = default if title is None else title
    if not text:
        return
    if isinstance(obj, Figure):
        obj.suptitle(text, **kwargs)
    else:
        obj.set_title(text, **kwargs)


def finish_axes(fig: Figure, ax, *, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
                default: str = "", legend: float | None = None) -> Figure:
    """Label a one-axes figure, add its legend (font size ``legend``; None: no legend) and lay it out."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    set_title(ax, title, default)
    if legend is not None:
        ax.legend(fontsize=legend)
    fig.tight_layout()
    return fig


def integer_ticks(axis, n: int) -> None:
    """Integer ticks for ``n`` rows or columns of a matrix: every index when few, else a sparse set."""
    if n <= 12:
        axis.set_ticks(range(n))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))
