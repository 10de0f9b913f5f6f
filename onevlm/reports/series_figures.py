"""What the service counts of one routed series: the figures ``/status``, ``/metrics`` and the overview add up.

Taken from the series' ``series.json`` entry (:func:`onevlm.reports.routing_metadata.series_entry`)
when the group's results are written, and kept in the journal (``series_figures``), so counting over
every current result is one query rather than a walk over every results folder. Research use only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: Outcomes a series can end in (``failed``: its image could not be read or routing raised).
OUTCOMES = ("routed", "routed-set", "review", "stopped", "skipped", "failed")


@dataclass(frozen=True)
class SeriesFigures:
    """One series' figures.

    ``decided``: the router reached a decision (neither skipped nor an error); ``vlm_calls`` is
    ``None`` where the record does not say; ``error`` is why a series failed, in words.
    """

    series_instance_uid: str
    outcome: str
    confidence: float | None
    calibrated: bool
    vlm_calls: int | None
    disagreement: bool
    decided: bool
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.series_instance_uid:
            raise ValueError("series_instance_uid is empty")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}: one of {', '.join(OUTCOMES)}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence {self.confidence!r} is not a probability")
        if self.vlm_calls is not None and self.vlm_calls < 0:
            raise ValueError(f"vlm_calls {self.vlm_calls!r} is negative")

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "SeriesFigures":
        """The figures of a ``series.json`` entry."""
        calls = entry.get("vlm_calls")
        error = entry.get("error")
        outcome = str(entry["outcome"])
        return cls(
            series_instance_uid=str(entry["series_instance_uid"]),
            outcome=outcome,
            confidence=entry.get("confidence"),
            calibrated=bool(entry.get("calibrated")),
            vlm_calls=calls if isinstance(calls, int) and not isinstance(calls, bool) else None,
            disagreement=bool(entry.get("disagreement")),
            decided=outcome not in ("skipped", "failed") and not error,
            error=str(error) if error else None,
        )
