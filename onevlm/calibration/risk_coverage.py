"""Risk-coverage curves and their area (AURC) for a confidence-ranked answerer.

Keep the ``k`` most confident cases (``k = 1..n``): coverage is ``k / n`` and risk the error rate
among them. AURC is the mean risk over the ``n`` prefixes (Geifman, Uziel & El-Yaniv, "Bias-Reduced
Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019); lower is better, and it mixes the
error rate with how well confidence ranks errors last.

Ties. A threshold cannot separate cases with the same confidence, so the curve has one point per
tie group, at its end; in the AURC every prefix inside a group takes the group's end value.
Without ties this is the usual per-prefix definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class RiskCoverage:
    """A risk-coverage curve.

    Attributes
    ----------
    coverage:
        Share of cases kept at each point, increasing, ending at 1.0.
    risk:
        Error rate among the kept cases at each point.
    aurc:
        Area under the curve (mean risk over the ``n`` prefixes).
    n:
        Cases.
    """

    coverage: tuple[float, ...]
    risk: tuple[float, ...]
    aurc: float
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n!r}")
        if not self.coverage or len(self.coverage) != len(self.risk):
            raise ValueError("coverage and risk must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.coverage, self.coverage[1:])):
            raise ValueError("coverage must be strictly increasing")
        if not math.isclose(self.coverage[-1], 1.0):
            raise ValueError(f"coverage must end at 1.0, got {self.coverage[-1]!r}")
        if any(not 0.0 <= r <= 1.0 for r in self.risk) or not 0.0 <= self.aurc <= 1.0:
            raise ValueError("risks and aurc must lie in [0, 1]")
        object.__setattr__(self, "coverage", tuple(float(c) for c in self.coverage))
        object.__setattr__(self, "risk", tuple(float(r) for r in self.risk))

    def as_dict(self) -> dict:
        return {"coverage": list(self.coverage), "risk": list(self.risk), "aurc": self.aurc, "n": self.n}


def risk_coverage(confidences: Sequence[float], correct: Sequence[bool | int]) -> RiskCoverage:
    """Compute the risk-coverage curve and AURC.

    Parameters
    ----------
    confidences:
        One confidence per case (any real scale; only the order matters).
    correct:
        Whether each case's answer was right (bool or 0/1).

    Returns
    -------
    RiskCoverage
        One point per distinct confidence, from the most to the least confident.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"confidences ({len(confidences)}) and correct ({len(correct)}) differ in length")
    if len(confidences) == 0:
        raise ValueError("at least one case is needed")
    conf = np.asarray(confidences, dtype=float)
    if conf.ndim != 1 or not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be finite numbers")
    ok = np.asarray(correct)
    if not np.all((ok == 0) | (ok == 1)):
        raise ValueError("correct must hold booleans or 0/1")
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    sorted_conf = conf[order]
    cum_errors = np.cumsum(~ok[order].astype(bool))
    ends = np.flatnonzero(np.append(sorted_conf[1:] != sorted_conf[:-1], True))
    kept = ends + 1
    risk = cum_errors[ends] / kept
    sizes = np.diff(np.concatenate(([0], kept)))
    aurc = float(np.dot(sizes, risk) / n)
    return RiskCoverage(coverage=tuple(kept / n), risk=tuple(risk), aurc=aurc, n=n)


def plot_risk_coverage(
    curves: Mapping[str, RiskCoverage],
    path: str | Path,
    title: str,
    marks: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Draw risk-coverage curves into a PNG.

    Parameters
    ----------
    curves:
        Name to curve; the legend shows each curve's AURC.
    path:
        Output PNG path.
    title:
        Figure title.
    marks:
        Optional named points ``(coverage, risk)``, e.g. a fitted threshold's held-out result.

    Returns
    -------
    Path
        The written PNG.
    """
    if not curves:
        raise ValueError("at least one curve is needed")
    from onevlm.calibration.figures import new_axes, save_figure

    fig, ax, plt = new_axes(height=4.5)
    for name, curve in curves.items():
        # steps: a coverage between two points takes the risk of the right one (tie groups)
        ax.step(curve.coverage, curve.risk, where="pre",
                label=f"{name} (AURC {curve.aurc:.3f}, n={curve.n})")
    for name, (cov, rsk) in (marks or {}).items():
        ax.scatter([cov], [rsk], marker="x", s=60, zorder=3, label=f"{name} ({cov:.2f}, {rsk:.3f})")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(bottom=0)
    return save_figure(fig, ax, plt, path, title, "coverage (share of cases answered)",
                       "risk (error rate among answered)")
