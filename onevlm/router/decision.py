"""The router's decision records: one per stage and one per input (the decision-log line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onevlm.router.selector import Index

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

    @property
    def chosen_record(self) -> CandidateRecord:
        return self.candidates[0 if self.index is Index.FIRST else 1]

    @property
    def confidence(self) -> float:
        """The probability the router gave the answer it kept."""
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
        }


@dataclass(frozen=True)
class RoutingDecision:
    """The full record of routing one input: the decision-log line.

    ``model_card_id`` is ``None`` when the router abstained (early stop, stage-3 ``None``, an
    answer outside the admissible set) or when the input failed (``error`` set).
    """

    input: str
    reference: dict[str, Any]
    backend: dict[str, Any]
    cutoffs: dict[str, float | None]
    stages: tuple[StageDecision, ...]
    stopped_early: bool
    stop_reason: str | None
    model_card_id: str | None
    seconds: float
    error: str | None = None

    @property
    def modality(self) -> str | None:
        return self._chosen(1)

    @property
    def finding(self) -> str | None:
        return self._chosen(2)

    @property
    def final_label(self) -> str:
        """The emitted label as the paper scores it: a card ID or ``"None"``."""
        return self.model_card_id or "None"

    @property
    def confidence(self) -> float | None:
        """Probability of the emitted label at decision time (the last stage that ran)."""
        return self.stages[-1].confidence if self.stages else None

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
            "model_card_id": self.model_card_id,
            "confidence": self.confidence,
            "seconds": round(self.seconds, 6),
            "error": self.error,
            "not_for_clinical_use": True,
        }
