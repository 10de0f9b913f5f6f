"""Route every prepared series of a study once, by its representative image."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from onevlm.imaging.series import InputProblem, SeriesGroup, load_study
from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.decision import RoutingDecision
from onevlm.router.pipeline import Router
from onevlm.router.runner import failed_decision
from onevlm.study.preparation import PreparedSeries, prepare_series

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesRouting:
    """The outcome for one series: a decision, or the reason it was skipped."""

    series: SeriesGroup
    routed: RoutingInput | None = None
    decision: RoutingDecision | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class StudyRouting:
    """All series of the input plus the files that could not be read."""

    series: tuple[SeriesRouting, ...]
    problems: tuple[InputProblem, ...] = field(default_factory=tuple)


def route_prepared(router: Router, prepared: Sequence[PreparedSeries], batch_size: int = 8) -> list[SeriesRouting]:
    """Route the prepared series in batches; skipped and failed series keep their reason."""
    results: dict[int, SeriesRouting] = {}
    todo: list[int] = []
    for index, entry in enumerate(prepared):
        if entry.skipped is not None:
            results[index] = SeriesRouting(entry.series, skipped=entry.skipped)
        elif entry.error is not None:
            item = entry.item or entry.series.representative()
            decision = replace(failed_decision(router, item.path, entry.error), reference=item.reference)
            results[index] = SeriesRouting(entry.series, routed=item, decision=decision)
        else:
            todo.append(index)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        decisions = router.route_many([prepared[i].item for i in chunk])
        for index, decision in zip(chunk, decisions):
            entry = prepared[index]
            results[index] = SeriesRouting(entry.series, routed=entry.item, decision=decision)
            logger.info("series %s -> %s %s", entry.series.series_instance_uid, decision.outcome_name,
                        ", ".join(decision.cards) or decision.error or decision.stop_reason or "")
    return [results[i] for i in range(len(prepared))]


def decodes_ahead(backend) -> bool:
    """Whether the representative images must be decoded before routing (a pixels-only backend)."""
    return bool(backend.identity().get("pixels_read", True)) and not getattr(backend, "decodes_on_demand", False)


def route_study(router: Router, paths: Iterable[str | Path], decode_pixels: bool | None = None,
                batch_size: int = 8) -> StudyRouting:
    """Load the DICOM files under ``paths``, prepare each series and route it once.

    ``decode_pixels`` defaults to whether the router's backend reads pixels (ahead of routing: a
    backend that decodes on demand, the hybrid, decodes only the images it asks for).
    """
    study = load_study(paths)
    if decode_pixels is None:
        decode_pixels = decodes_ahead(router.backend)
    prepared = prepare_series(study.series, decode_pixels)
    return StudyRouting(tuple(route_prepared(router, prepared, batch_size)), study.problems)
