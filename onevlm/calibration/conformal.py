"""Split-conformal prediction sets with the LAC score (``1 - p(gold)``).

Guarantee. If the calibration rows and a new test row are exchangeable, the set
``{y : 1 - p(y) <= qhat}`` with ``qhat`` the ``ceil((n+1)(1-alpha))``-th smallest calibration
score contains the gold answer with probability at least ``1 - alpha`` (and at most
``1 - alpha + 1/(n+1)`` for continuous scores). The probability is *marginal*: over the draw of
the calibration set and of the test row together (Vovk, Gammerman & Shafer, "Algorithmic Learning
in a Random World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction
and Distribution-Free Uncertainty Quantification", 2021, for the ``(n+1)`` finite-sample
correction).

What it does not promise. No coverage per class, per modality or per patient group
(conditional coverage): a rare answer can be covered far less often than ``1 - alpha`` while the
average holds. No coverage under drift (a new scanner, protocol or population breaks
exchangeability): re-calibrate on the site's data and monitor held-out coverage.

Unlisted answers. A backend may list only its top answers. An unlisted answer has probability 0
as far as the listed ones go, so its score is 1. When ``qhat >= 1`` the conformal set therefore
also admits every unlisted answer (an *open* set: send the case to a human);
:func:`prediction_set` still returns only listed answers (``REST`` is never an element), and
:func:`is_open_set` says when that list is incomplete. Coverage is counted on the scores
(``score(gold) <= qhat``), which is the quantity the guarantee is about; it equals "gold in the
listed set" whenever the set is not open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from onevlm.calibration.scores import StageScores

#: Slack when comparing a score to ``qhat`` (float noise in ``1 - p``).
SCORE_TOLERANCE = 1e-12
#: Relative slack inside ``ceil((n+1)(1-alpha))``: ``20 * (1 - 0.05)`` must give rank 19.
RANK_TOLERANCE = 1e-9


def _check_alpha(alpha: float) -> float:
    value = float(alpha)
    if not 0.0 < value < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return value


def _rank(n: int, alpha: float) -> int:
    """``ceil((n+1)(1-alpha))`` robust to float noise in ``1 - alpha``."""
    x = (n + 1) * (1.0 - alpha)
    return math.ceil(x - RANK_TOLERANCE * max(1.0, x))


def nonconformity(scores: StageScores) -> float:
    """LAC nonconformity of the gold answer, ``1 - p(gold)`` (1.0 when the gold is not listed).

    Parameters
    ----------
    scores:
        Scores with a known gold (usually temperature-scaled).

    Raises
    ------
    ValueError
        If the gold is unknown.
    """
    if scores.gold is None:
        raise ValueError("nonconformity needs a gold answer")
    return 1.0 - scores.probs.get(scores.gold, 0.0)


def conformal_quantile(values: Sequence[float], alpha: float) -> float:
    """The split-conformal quantile of calibration scores.

    Parameters
    ----------
    values:
        Nonconformity scores of the calibration rows.
    alpha:
        Miscoverage level in (0, 1).

    Returns
    -------
    float
        The ``ceil((n+1)(1-alpha))``-th smallest value (1-based), i.e. ``np.quantile(values,
        k/n, method="inverted_cdf")``; ``math.inf`` when that rank exceeds ``n`` (too few rows:
        the set must hold everything).
    """
    alpha = _check_alpha(alpha)
    ordered = sorted(float(v) for v in values)
    if any(math.isnan(v) for v in ordered):
        raise ValueError("nonconformity scores must not be NaN")
    k = _rank(len(ordered), alpha)
    if k > len(ordered):
        return math.inf
    return ordered[max(k, 1) - 1]


def min_calibration_size(alpha: float) -> int:
    """Smallest calibration size for which :func:`conformal_quantile` is finite.

    ``ceil((n+1)(1-alpha)) <= n`` holds iff ``n >= ceil(1/alpha) - 1`` (e.g. 19 rows for
    ``alpha = 0.05``, 99 for ``alpha = 0.01``).
    """
    alpha = _check_alpha(alpha)
    n = max(1, math.ceil(1.0 / alpha - RANK_TOLERANCE) - 1)
    # settle float edge cases on the same rank rule the quantile uses
    while _rank(n, alpha) > n:
        n += 1
    while n > 1 and _rank(n - 1, alpha) <= n - 1:
        n -= 1
    return n


def is_open_set(qhat: float) -> bool:
    """Whether sets at ``qhat`` also admit every unlisted answer (score 1), i.e. ``qhat >= 1``."""
    return qhat >= 1.0 - SCORE_TOLERANCE


def prediction_set(scores: StageScores, qhat: float) -> tuple[str, ...]:
    """The listed answers whose score ``1 - p`` is at most ``qhat``.

    Parameters
    ----------
    scores:
        One input's (temperature-scaled) scores.
    qhat:
        The fitted conformal quantile; ``math.inf`` admits every listed answer.

    Returns
    -------
    tuple of str
        By decreasing probability (ties: listed order). ``REST`` is never included; see
        :func:`is_open_set` for when unlisted answers also belong to the set.
    """
    if math.isnan(qhat):
        raise ValueError("qhat must not be NaN")
    kept = [(a, p) for a, p in scores.probs.items() if 1.0 - p <= qhat + SCORE_TOLERANCE]
    kept.sort(key=lambda item: -item[1])  # stable: ties keep the listed order
    return tuple(a for a, _ in kept)


def _covers(scores: StageScores, qhat: float) -> bool:
    return nonconformity(scores) <= qhat + SCORE_TOLERANCE


@dataclass(frozen=True)
class ConformalFit:
    """A fitted split-conformal quantile.

    Attributes
    ----------
    alpha:
        Target miscoverage.
    qhat:
        The quantile; ``math.inf`` when ``n`` is below :func:`min_calibration_size`.
    n:
        Calibration rows used (rows with a gold).
    """

    alpha: float
    qhat: float
    n: int

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if math.isnan(self.qhat) or not (0.0 <= self.qhat <= 1.0 or self.qhat == math.inf):
            raise ValueError(f"qhat must lie in [0, 1] or be infinite, got {self.qhat!r}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n!r}")

    @property
    def open_set(self) -> bool:
        """Whether every set also admits unlisted answers (see :func:`is_open_set`)."""
        return is_open_set(self.qhat)

    def as_dict(self) -> dict:
        """JSON-safe form; an infinite ``qhat`` is written as ``None``."""
        return {"alpha": self.alpha, "qhat": None if math.isinf(self.qhat) else self.qhat, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict) -> ConformalFit:
        """Inverse of :meth:`as_dict`."""
        try:
            qhat = data["qhat"]
            return cls(alpha=float(data["alpha"]), qhat=math.inf if qhat is None else float(qhat), n=int(data["n"]))
        except KeyError as exc:
            raise ValueError(f"conformal fit lacks {exc.args[0]!r}") from exc


def fit_conformal(rows: Sequence[StageScores], alpha: float) -> ConformalFit:
    """Fit the split-conformal quantile on calibration rows.

    Parameters
    ----------
    rows:
        Calibration scores, already temperature-scaled if scaling is used (the temperature must
        come from other rows, or exchangeability is lost); rows without a gold are skipped.
    alpha:
        Target miscoverage in (0, 1).

    Returns
    -------
    ConformalFit

    Raises
    ------
    ValueError
        If no row has a gold.
    """
    alpha = _check_alpha(alpha)
    values = [nonconformity(r) for r in rows if r.gold is not None]
    if not values:
        raise ValueError("no calibration row has a gold answer")
    return ConformalFit(alpha=alpha, qhat=conformal_quantile(values, alpha), n=len(values))


@dataclass(frozen=True)
class CoverageReport:
    """Held-out coverage of conformal sets at a fitted ``qhat``.

    Attributes
    ----------
    alpha:
        Target miscoverage.
    n, covered, coverage:
        Test rows, rows whose gold is in the set, and their ratio.
    mean_set_size, empty_sets:
        Mean number of listed answers per set, and sets with none.
    tolerance:
        ``3 * sqrt(alpha (1 - alpha) / n)``: three binomial standard deviations of the empirical
        coverage of ``n`` test rows. With ``n_calibration`` known, the spread the calibration
        draw adds (``alpha (1 - alpha) / (n_calibration + 2)``) is included under the root.
    n_calibration:
        Calibration rows behind ``qhat`` when known, else ``None``.
    """

    alpha: float
    n: int
    covered: int
    coverage: float
    mean_set_size: float
    empty_sets: int
    tolerance: float
    n_calibration: int | None = None

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n!r}")
        if not 0 <= self.covered <= self.n:
            raise ValueError(f"covered must lie in [0, n], got {self.covered!r}")
        if not math.isclose(self.coverage, self.covered / self.n, abs_tol=1e-12):
            raise ValueError(f"coverage {self.coverage!r} is not covered / n")
        if not 0 <= self.empty_sets <= self.n:
            raise ValueError(f"empty_sets must lie in [0, n], got {self.empty_sets!r}")
        if not math.isfinite(self.mean_set_size) or self.mean_set_size < 0:
            raise ValueError(f"mean_set_size must be a finite non-negative number, got {self.mean_set_size!r}")
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"tolerance must be a finite non-negative number, got {self.tolerance!r}")
        if self.n_calibration is not None and self.n_calibration < 1:
            raise ValueError(f"n_calibration must be at least 1, got {self.n_calibration!r}")

    @property
    def meets_guarantee(self) -> bool:
        """Whether ``coverage >= 1 - alpha - tolerance``."""
        return self.coverage >= 1.0 - self.alpha - self.tolerance

    def as_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "n": self.n,
            "covered": self.covered,
            "coverage": self.coverage,
            "mean_set_size": self.mean_set_size,
            "empty_sets": self.empty_sets,
            "tolerance": self.tolerance,
            "n_calibration": self.n_calibration,
            "meets_guarantee": self.meets_guarantee,
        }


def coverage_report(
    rows: Sequence[StageScores], qhat: float, alpha: float, n_calibration: int | None = None
) -> CoverageReport:
    """Evaluate conformal sets on held-out rows.

    Parameters
    ----------
    rows:
        Test scores (scaled like the calibration rows), each with a gold.
    qhat:
        The fitted quantile.
    alpha:
        The miscoverage it was fitted for.
    n_calibration:
        Calibration rows behind ``qhat``; when given, the tolerance also covers the spread of
        the coverage over calibration draws. Without it a correct procedure fails the check
        about one time in nine with 1000 calibration and 5000 test rows.

    Returns
    -------
    CoverageReport

    Raises
    ------
    ValueError
        If there is no row or a row lacks a gold.
    """
    alpha = _check_alpha(alpha)
    if not rows:
        raise ValueError("coverage needs at least one test row")
    covered = sizes = empty = 0
    for i, row in enumerate(rows):
        if row.gold is None:
            raise ValueError(f"test row {i} has no gold answer")
        size = len(prediction_set(row, qhat))
        covered += _covers(row, qhat)
        sizes += size
        empty += size == 0
    n = len(rows)
    variance = alpha * (1.0 - alpha) / n
    if n_calibration is not None:
        variance += alpha * (1.0 - alpha) / (n_calibration + 2)
    return CoverageReport(
        alpha=alpha,
        n=n,
        covered=covered,
        coverage=covered / n,
        mean_set_size=sizes / n,
        empty_sets=empty,
        tolerance=3.0 * math.sqrt(variance),
        n_calibration=n_calibration,
    )
