"""The router's decision record of one input (the decision-log line); stage records are in :mod:`.stage_decision`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onevlm.router.outcome import RouteOutcome
from onevlm.router.stage_decision import STAGE_NAMES, CandidateRecord, StageDecision  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class RoutingDecision:
    """The full record of routing one input: the decision-log line.

    ``pipeline_card_id`` is the paper's answer (stage 3's card after Algorithm 1; ``None`` after
    an early stop, a stage-3 ``None``, an answer outside the admissible set or an error).
    ``outcome`` is what the router claims from it (:mod:`onevlm.router.outcome`): the routed
    card(s), the route confidence, or review. ``model_card_id`` is the card only when the
    outcome routes exactly one.
    """

    input: str
    reference: dict[str, Any]
    backend: dict[str, Any]
    cutoffs: dict[str, float | None]
    stages: tuple[StageDecision, ...]
    stopped_early: bool
    stop_reason: str | None
    pipeline_card_id: str | None
    seconds: float
    error: str | None = None
    outcome: RouteOutcome | None = None
    #: The process's one-time model loading before its first route (not part of ``seconds``).
    startup_seconds: float | None = None

    @property
    def modality(self) -> str | None:
        return self._chosen(1)

    @property
    def finding(self) -> str | None:
        """Stage 2's finding; ``None`` when stage 2 did not run or had no evidence (its answer is a default)."""
        stage = self.stage(2)
        return stage.chosen if stage is not None and stage.informative else None

    @property
    def finding_assessed(self) -> bool:
        """Whether stage 2 ran with evidence behind its answer."""
        stage = self.stage(2)
        return stage is not None and stage.informative

    def stage(self, number: int) -> StageDecision | None:
        return next((s for s in self.stages if s.stage == number), None)

    @property
    def final_label(self) -> str:
        """The emitted label as the paper scores it: a card ID or ``"None"``."""
        return self.pipeline_card_id or "None"

    @property
    def final_confidence(self) -> float | None:
        """The paper's confidence of the emitted label: the backend's p at the last stage that ran."""
        return self.stages[-1].confidence if self.stages else None

    @property
    def model_card_id(self) -> str | None:
        """The routed card when the outcome routes exactly one, else ``None``."""
        if self.outcome is not None and self.outcome.outcome == "routed":
            return self.outcome.cards[0]
        return None

    @property
    def cards(self) -> tuple[str, ...]:
        """The routed card(s): one (routed), several (routed-set) or none."""
        return self.outcome.cards if self.outcome is not None else ()

    @property
    def confidence(self) -> float | None:
        """Route confidence (see :class:`~onevlm.router.outcome.RouteOutcome`)."""
        return self.outcome.confidence if self.outcome is not None else None

    @property
    def vlm_calls(self) -> int:
        """VLM calls made for this input, all stages together."""
        return sum(s.vlm_calls for s in self.stages)

    @property
    def disagreement(self) -> str | None:
        """Header and pixels contradict each other (in words), else ``None``."""
        return self.outcome.disagreement if self.outcome is not None else None

    @property
    def outcome_name(self) -> str:
        return self.outcome.outcome if self.outcome is not None else ("failed" if self.error else "review")

    def _chosen(self, stage: int) -> str | None:
        for decision in self.stages:
            if decision.stage == stage:
                return decision.chosen
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "reference": self.reference,
            "backend": self.backend,
            "cutoffs": self.cutoffs,
            "stages": [s.as_dict() for s in self.stages],
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "modality": self.modality,
            "finding": self.finding,
            "finding_assessed": self.finding_assessed,
            "outcome": self.outcome_name,
            "cards": list(self.cards),
            "model_card_id": self.model_card_id,
            "pipeline_card_id": self.pipeline_card_id,
            "confidence": self.confidence,
            "calibrated": bool(self.outcome and self.outcome.calibrated),
            "needs_review": self.outcome_name == "review",
            "route": self.outcome.as_dict() if self.outcome is not None else None,
            "vlm_calls": self.vlm_calls,
            "disagreement": self.disagreement,
            "seconds": round(self.seconds, 6),
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 6),
            "error": self.error,
            "not_for_clinical_use": True,
        }
