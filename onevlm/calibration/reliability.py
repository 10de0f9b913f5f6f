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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
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
    ax.grid(alpha=0.3)
    ax.set_xlabel("confidence (mean per bin)")
    ax.set_ylabel("accuracy (per bin)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
