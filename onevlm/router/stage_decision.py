"""One stage's decision record: its candidates as normalised, the cutoff, the choice, and the evidence read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from onevlm.router.backend import Consultation
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
    distribution: Mapping[str, float] | None = None
    informative: bool = True
    #: Which sources of evidence the stage read and why (``None``: the backend did not say).
    consultation: Consultation | None = None

    @property
    def consulted(self) -> tuple[str, ...] | None:
        return self.consultation.consulted if self.consultation is not None else None

    @property
    def vlm_calls(self) -> int:
        return self.consultation.vlm_calls if self.consultation is not None else 0

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
            "consulted": list(self.consulted) if self.consulted is not None else None,
            "consultation": self.consultation.as_dict() if self.consultation is not None else None,
        }
