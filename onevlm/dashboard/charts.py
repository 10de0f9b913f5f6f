"""The page's two charts as inline SVG, drawn server-side with matplotlib (imported only when drawn).

pyplot is not thread-safe and the page answers on several threads: drawing takes a lock, and
a chart whose data did not change is served from a small cache.
"""

from __future__ import annotations

import io
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Sequence

from onevlm.calibration.ece import expected_calibration_error

_LOCK = threading.Lock()
_CACHE: dict[tuple, str] = {}
_CACHE_SIZE = 32


def _inline(svg: str) -> str:
    """The ``<svg>`` element alone (no XML declaration or doctype), to sit inside HTML."""
    return svg[svg.index("<svg"):]


def _cached(key: tuple, draw) -> str:
    with _LOCK:
        if key not in _CACHE:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = draw()
        return _CACHE[key]


def hourly_chart(counts: Sequence[int], start: float) -> str:
    """Bars of studies received per hour, ``counts[i]`` in the hour starting ``start + i`` hours."""

    def draw() -> str:
        from onevlm.calibration.figures import new_axes

        fig, ax, plt = new_axes(height=2.0)
        fig.set_size_inches(7.5, 2.0)
        hours = [datetime.fromtimestamp(start + 3600 * i).strftime("%H") for i in range(len(counts))]
        ax.bar(range(len(counts)), counts, color="#3a6ea5")
        ax.set_xticks(range(0, len(counts), 3), hours[::3], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("studies", fontsize=8)
        ax.set_xlabel("hour of arrival (local time), last 24 h", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        plt.close(fig)
        return _inline(buffer.getvalue())

    return _cached(("hourly", tuple(counts), start), draw)


def reliability_chart(confidences: Sequence[float], hits: Sequence[bool], calibrated: bool) -> str:
    """Reliability diagram (hit rate against route confidence, 10 bins) of reviewed cases."""

    def draw() -> str:
        from onevlm.calibration.reliability import plot_reliability

        result = expected_calibration_error(list(confidences), [int(h) for h in hits])
        name = "route confidence, " + ("calibrated" if calibrated else "uncalibrated")
        with tempfile.TemporaryDirectory() as folder:
            path = plot_reliability({name: result}, Path(folder) / "reliability.svg",
                                    f"Reviewed cases (n={result.n})")
            return _inline(path.read_text(encoding="utf-8"))

    return _cached(("reliability", tuple(confidences), tuple(hits), calibrated), draw)
