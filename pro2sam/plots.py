"""Plots as PNG bytes (matplotlib's Agg backend, no display): the confidence's risk-coverage curve
(``pro2sam evaluate``) and the QA report's histograms and per-class counts (``pro2sam report``).

Figures are made with :class:`matplotlib.figure.Figure` directly, not ``pyplot``, so no global
state is touched and nothing needs a screen.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["risk_coverage_png", "histograms_png", "class_counts_png"]

_DPI = 100
_BLUE, _GREY = "#3366aa", "#999999"


def _figure(width_in: float, height_in: float, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def risk_coverage_png(
    coverage: Sequence[float], accuracy: Sequence[float], *, marks: Mapping[str, float | None], title: str
) -> bytes:
    """The risk-coverage curve: GT-known Loc (percent) of the most confident share of the images.

    Args:
        coverage, accuracy: the curve (:func:`pro2sam.confidence.risk_coverage_curve`).
        marks: coverage in percent (``"80"``) -> accuracy there, drawn as labelled points.
        title: the figure's title.
    """
    fig, axes = _figure(6.0, 4.0)
    ax = axes[0][0]
    coverage = np.asarray(coverage, dtype=np.float64)
    ax.plot(100 * coverage, accuracy, color=_BLUE, label="most confident first")
    if len(accuracy):
        ax.axhline(accuracy[-1], color=_GREY, linestyle="--", label=f"all images: {accuracy[-1]:.1f}")
        # a perfect ranking puts every right box first: the ceiling of any confidence
        ceiling = np.minimum(100.0, accuracy[-1] / np.maximum(coverage, 1e-9))
        ax.plot(100 * coverage, ceiling, color=_GREY, linestyle=":", label="ceiling (a perfect ranking)")
    for percent, value in marks.items():
        if value is not None:
            ax.plot([float(percent)], [value], "o", color="#cc3311")
            ax.annotate(f"{value:.1f}", (float(percent), value), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("coverage: most confident share of the images (%)")
    ax.set_ylabel("GT-known Loc (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def histograms_png(histograms: Mapping[str, tuple[Sequence[float], Sequence[int]]], *, cols: int = 3) -> bytes:
    """One bar histogram per entry, ``title -> (bin edges (B+1,), counts (B,))``, in a grid."""
    n = max(1, len(histograms))
    rows = (n + cols - 1) // cols
    fig, axes = _figure(4.0 * cols, 2.8 * rows, rows, cols)
    flat = [ax for row in axes for ax in row]
    for ax, (title, (edges, counts)) in zip(flat, histograms.items()):
        edges = np.asarray(edges, dtype=np.float64)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=_BLUE)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("images")
        ax.grid(alpha=0.3)
    for ax in flat[len(histograms):]:
        ax.set_visible(False)
    return _png(fig)


def class_counts_png(names: Sequence[str], counts: Sequence[int], *, title: str) -> bytes:
    """A horizontal bar chart of images per class, in the order given (most first)."""
    fig, axes = _figure(6.0, 0.8 + 0.22 * max(1, len(names)))
    ax = axes[0][0]
    y = np.arange(len(names))
    ax.barh(y, counts, color=_BLUE)
    ax.set_yticks(y, [str(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)
