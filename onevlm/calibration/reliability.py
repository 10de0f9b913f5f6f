"""Reliability diagrams (accuracy versus confidence per bin, with the ideal y = x)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from onevlm.calibration.ece import EceResult


def plot_reliability(results: Mapping[str, EceResult], path: str | Path, title: str) -> Path:
    """Draw one reliability curve per method (e.g. baseline and cutoff) into a PNG.

    Parameters
    ----------
    results:
        Method name to its :class:`EceResult`; the legend shows each method's ECE.
    path:
        Output PNG path.
    title:
        Figure title (e.g. "Reliability — held-out split").
    """
    from onevlm.calibration.figures import new_axes, save_figure

    fig, ax, plt = new_axes(height=5.0)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="ideal (y = x)")
    markers = "osd^v"
    for i, (name, result) in enumerate(results.items()):
        filled = [b for b in result.bins if b.count]
        ax.plot(
            [b.confidence for b in filled],
            [b.accuracy for b in filled],
            marker=markers[i % len(markers)],
            label=f"{name} (ECE {result.ece:.3f}, n={result.n})",
        )
        for b in filled:
            ax.annotate(str(b.count), (b.confidence, b.accuracy), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xticks([i / 10 for i in range(11)])
    return save_figure(fig, ax, plt, path, title, "confidence (mean per bin)", "accuracy (per bin)")
