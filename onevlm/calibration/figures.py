"""Matplotlib figures of the calibration reports: one way to open and to finish a PNG."""

from __future__ import annotations

from pathlib import Path


def new_axes(height: float = 5.0):
    """A ``(figure, axes, pyplot)`` triple on the file-only Agg backend (imported here, only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, height), dpi=120)
    return fig, ax, plt


def save_figure(fig, ax, plt, path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Grid, labels, title and legend, then write ``path`` (folders made) and close the figure."""
    path = Path(path)
    ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
