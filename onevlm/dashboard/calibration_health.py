"""Is the calibration keeping its promise on the cases people reviewed? (the drift check)

The calibration promises that the right card is among the routed ones with probability at least
``1 - α`` (policy ``sets``: the routed set covers it; policy ``selective``: the single routed card
is right). On reviewed cases routed under that calibration we count hits and ask whether the
shortfall is more than chance: with ``k`` hits in ``n`` cases, the one-sided ``(1 - δ)``
Clopper-Pearson upper bound on the true hit rate (:func:`onevlm.calibration.selective.clopper_pearson_upper`)
is below ``1 - α`` only when, at confidence ``1 - δ``, the true rate is below the promise: drift.
The tolerance shown is the lowest hit rate of ``n`` cases that is still consistent with it.

Reviewed cases are the ones people chose to review: the check speaks for the routed population
only when routed cases are reviewed at random (the review queue holds every ``review`` and
``routed-set`` case; routed single cards are reviewed from their decision page). Research use only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from onevlm.calibration.selective import clopper_pearson_upper
from onevlm.dashboard.study_index import SeriesCase
from onevlm.net.review_answers import CARD, NOT_ROUTABLE, ReviewAnswer

#: δ used when the calibration states none.
DEFAULT_DELTA = 0.1


@dataclass(frozen=True)
class PromiseCheck:
    """Hits among reviewed cases against a promised rate (``None``: nothing was promised)."""

    name: str
    n: int
    hits: int
    promised: float | None
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.hits <= self.n:
            raise ValueError(f"hits ({self.hits}) must lie in [0, n={self.n}]")
        if self.promised is not None and not 0.0 < self.promised < 1.0:
            raise ValueError(f"promised rate must lie in (0, 1), got {self.promised!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")

    @property
    def rate(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def upper_bound(self) -> float:
        """``(1 - δ)`` upper confidence bound on the true hit rate (1.0 with no case)."""
        return clopper_pearson_upper(self.hits, self.n, self.delta)

    @property
    def broken(self) -> bool:
        """The promise is broken beyond chance: even the upper bound is below it."""
        return self.promised is not None and self.n > 0 and self.upper_bound < self.promised

    @property
    def lowest_consistent_rate(self) -> float | None:
        """The lowest hit rate of ``n`` cases whose upper bound still reaches the promise."""
        if self.promised is None or self.n == 0:
            return None
        lo, hi = 0, self.n  # the bound grows with the hits: find the fewest hits that reach the promise
        while lo < hi:
            mid = (lo + hi) // 2
            if clopper_pearson_upper(mid, self.n, self.delta) >= self.promised:
                hi = mid
            else:
                lo = mid + 1
        return lo / self.n


@dataclass(frozen=True)
class ReviewedCase:
    """A reviewed series: its outcome, route confidence and whether the routed cards held the right one."""

    case: SeriesCase
    answer: ReviewAnswer
    calibration_id: str | None

    @property
    def hit(self) -> bool:
        """The right card is among the routed ones (``stopped``: the reviewer said not routable)."""
        if self.case.outcome == "stopped":
            return self.answer.kind == NOT_ROUTABLE
        return self.answer.kind == CARD and self.answer.card in self.case.cards


@dataclass(frozen=True)
class CalibrationHealth:
    """The checks of the calibration in force and the reviewed cases behind them."""

    calibration_id: str | None
    policy: str | None
    alpha: float | None
    delta: float
    routed_set: PromiseCheck
    routed: PromiseCheck
    combined: PromiseCheck
    reviewed: tuple[ReviewedCase, ...]
    other_calibration: int

    @property
    def drift(self) -> bool:
        return self.combined.broken

    def reliability_pairs(self) -> tuple[list[float], list[bool]]:
        """(route confidence, hit) of every reviewed routed or routed-set case with a confidence."""
        pairs = [(r.case.confidence, r.hit) for r in self.reviewed
                 if r.case.outcome in ("routed", "routed-set") and r.case.confidence is not None]
        return [c for c, _ in pairs], [h for _, h in pairs]


def calibration_health(reviewed: Iterable[ReviewedCase], calibration_id: str | None, alpha: float | None,
                       delta: float | None, policy: str | None) -> CalibrationHealth:
    """Check the calibration in force on the reviewed cases it routed.

    Parameters
    ----------
    reviewed:
        Reviewed series (any outcome).
    calibration_id, alpha, delta, policy:
        The calibration in force (``calibration_id`` None: uncalibrated, nothing is promised,
        the figures are shown without a check).
    """
    reviewed = tuple(reviewed)
    delta = delta or DEFAULT_DELTA
    promised = 1.0 - alpha if calibration_id is not None and alpha is not None else None
    under = [r for r in reviewed if r.calibration_id == calibration_id]

    def check(name: str, outcomes: Sequence[str]) -> PromiseCheck:
        cases = [r for r in under if r.case.outcome in outcomes]
        return PromiseCheck(name, len(cases), sum(r.hit for r in cases), promised, delta)

    return CalibrationHealth(
        calibration_id=calibration_id, policy=policy, alpha=alpha, delta=delta,
        routed_set=check("routed sets: the right card is in the set", ("routed-set",)),
        routed=check("single routed cards: the card is right", ("routed",)),
        combined=check("all routed cases (the promise)", ("routed", "routed-set")),
        reviewed=reviewed,
        other_calibration=len(reviewed) - len(under),
    )
