"""The router's decision records: one per stage and one per input (the decision-log line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from onevlm.router.selector import Index

if TYPE_CHECKING:
    from onevlm.router.outcome import RouteOutcome

STAGE_NAMES = {1: "modality", 2: "finding", 3: "model_card"}


@dataclass(frozen=True)
class CandidateRecord:
    """One normalised candidate of a stage."""

    answer: str
    p: float
    raw: str
    in_allowed_set: bool
    match: str
    sequence_logprob: float | None = None
    justification: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "answer": self.answer,
            "p": self.p,
            "raw": self.raw,
            "in_allowed_set": self.in_allowed_set,
            "match": self.match,
        }
        if self.sequence_logprob is not None:
            out["sequence_logprob"] = self.sequence_logprob
        if self.justification is not None:
            out["justification"] = self.justification
        return out


@dataclass(frozen=True)
class StageDecision:
    """What happened at one stage: both candidates, the cutoff, and the choice."""

    stage: int
    prompt_id: str
    candidates: tuple[CandidateRecord, ...]
    tau: float | None
    chosen: str
    index: Index
    seconds: float
    evidence: dict[str, Any] = field(default_factory=dict)
    distribution: Mapping[str, float] | None = None
    informative: bool = True

    @property
    def chosen_record(self) -> CandidateRecord:
        return self.candidates[0 if self.index is Index.FIRST else 1]

    @property
    def confidence(self) -> float:
        """The backend's probability of the answer it kept (uncalibrated; see the route outcome)."""
        return self.chosen_record.p

    def as_dict(self) -> dict[str, Any]:
        chosen = self.chosen_record
        return {
            "stage": self.stage,
            "name": STAGE_NAMES[self.stage],
            "prompt_id": self.prompt_id,
            "candidates": [c.as_dict() for c in self.candidates],
            "tau": self.tau,
            "chosen": self.chosen,
            "index": self.index.value,
            "confidence": chosen.p,
            "raw": chosen.raw,
            "in_allowed_set": chosen.in_allowed_set,
            "justification": chosen.justification,
            "seconds": round(self.seconds, 6),
            "evidence": self.evidence,
            "informative": self.informative,
            # every admissible answer's probability, when the backend has them (calibration refits on it)
            "distribution": {a: round(p, 12) for a, p in self.distribution.items()} if self.distribution else None,
        }


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
    outcome: "RouteOutcome | None" = None
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
            "seconds": round(self.seconds, 6),
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 6),
            "error": self.error,
            "not_for_clinical_use": True,
        }
