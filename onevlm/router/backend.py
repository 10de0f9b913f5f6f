"""The contract between the router and its backends (embedded, transformers, synthetic).

Per stage a backend returns its top-2 candidate answers, each with the paper's ``p_i``
(probability of the answer's first token, or the backend's equivalent), plus the evidence it
used. The router owns everything else: prompts, normalisation, selection, early stop, logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from onevlm.calibration.fusion import SOURCES, Disagreement
from onevlm.cards.schema import ModelCard
from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.prompts import StagePrompt

NONE = "None"
OTHER = "Other"
NORMAL = "Normal"


@dataclass(frozen=True)
class Candidate:
    """One candidate answer of a stage as the backend produced it.

    Attributes
    ----------
    text:
        The full answer as decoded (raw text; the router normalises it).
    p:
        Probability of the answer's first token (the paper's ``p_i``), in [0, 1].
    sequence_logprob:
        Log-probability of the whole answer, when the backend can compute it.
    """

    text: str
    p: float
    sequence_logprob: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError("candidate text must be a string")
        if math.isnan(self.p) or not 0.0 <= self.p <= 1.0 + 1e-6:
            raise ValueError(f"candidate probability must lie in [0, 1], got {self.p!r}")


def answer_probability(p: float, sequence_logprob: float | None) -> float:
    """What a decoded answer's probability is: its own token sequence's, never more than its first token's ``p``.

    (A subword first token may also begin other answers: "brain" begins "brain CT scan" and "brain MRI scan".)
    """
    return p if sequence_logprob is None else min(p, math.exp(sequence_logprob))


@dataclass(frozen=True)
class StageRequest:
    """What the router asks of a backend for one stage of one input.

    ``allowed`` is the admissible answer set (stage 1: modalities + None + Other; stage 2: the
    cards' findings + Normal, open to other findings; stage 3: candidate card IDs + None).
    ``cards``, ``modality`` and ``finding`` are stage 3's structured fields. At stage 2,
    ``modality`` is stage 1's answer (the paper's stage 2 does not see it; a hybrid backend uses
    it only to know whether the pixels can still matter) and ``settled`` says why no further
    evidence can change the route (e.g. stage 1 already sends the case to review), else ``None``.
    """

    stage: int
    prompt: StagePrompt
    allowed: tuple[str, ...]
    cards: tuple[ModelCard, ...] = ()
    modality: str | None = None
    finding: str | None = None
    settled: str | None = None
    #: Stage 3: stage 2's probabilities over findings, when it had evidence (a backend may weigh them).
    finding_probs: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.stage == 3 and (self.modality is None or self.finding is None):
            raise ValueError("stage 3 needs the modality and finding of stages 1 and 2")


@dataclass(frozen=True)
class Consultation:
    """Which sources of evidence about the image a stage used, and why.

    Attributes
    ----------
    consulted:
        ``("header",)``, ``("pixels",)``, ``("header", "pixels")``, or ``()`` for a text-only stage
        (stage 3 reads neither: it matches the answers above against the cards' captions).
    reason:
        Why, in words (e.g. "the header certifies brain CT scan (p 0.98 >= gate 0.95)").
    vlm_calls:
        Calls to the VLM this stage made for this input (0 or 1).
    sources:
        Each consulted source's own distribution over the admissible answers, before fusion
        (``None`` for a source that was not read); a calibration refits on them.
    disagreement:
        Set when the header and the pixels contradict each other beyond the calibrated margin.
    corroborated:
        Whether the header's own statements back its answer (the hybrid lets only such a header
        decide alone); ``None`` where not assessed.
    """

    consulted: tuple[str, ...]
    reason: str
    vlm_calls: int = 0
    sources: Mapping[str, Mapping[str, float] | None] = field(default_factory=dict)
    disagreement: Disagreement | None = None
    corroborated: bool | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.consulted if s not in SOURCES]
        if unknown:
            raise ValueError(f"consulted sources must be among {', '.join(SOURCES)}, got {unknown}")
        if self.vlm_calls not in (0, 1):
            raise ValueError(f"vlm_calls must be 0 or 1, got {self.vlm_calls!r}")

    @property
    def pixels_read(self) -> bool:
        return "pixels" in self.consulted

    def as_dict(self) -> dict[str, Any]:
        return {
            "consulted": list(self.consulted),
            "reason": self.reason,
            "vlm_calls": self.vlm_calls,
            "sources": {name: None if probs is None else {a: round(p, 9) for a, p in probs.items()}
                        for name, probs in self.sources.items()},
            "disagreement": self.disagreement.as_dict() if self.disagreement is not None else None,
            "corroborated": self.corroborated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Consultation":
        disagreement = data.get("disagreement")
        return cls(consulted=tuple(data.get("consulted") or ()), reason=str(data.get("reason", "")),
                   vlm_calls=int(data.get("vlm_calls", 0)),
                   sources={k: None if v is None else {a: float(p) for a, p in v.items()}
                            for k, v in (data.get("sources") or {}).items()},
                   disagreement=Disagreement.from_dict(disagreement) if disagreement else None,
                   corroborated=data.get("corroborated"))


@dataclass(frozen=True)
class StageResponse:
    """A backend's answer to one :class:`StageRequest`: candidates by decreasing ``p``.

    Attributes
    ----------
    candidates:
        The top-2 (or one) answers, as Algorithm 1 needs them.
    evidence:
        What the backend used (logged as is).
    distribution:
        The backend's probability for every admissible answer it scored (the embedded softmax,
        the VLM's options mode), when it has one; ``None`` when only the candidates' ``p`` are
        known (the paper's free-text mode). Calibration and prediction sets use it.
    informative:
        ``False`` when the backend had no evidence for this stage (e.g. no pixels read and no
        finding-bearing text at stage 2): its answer is a default, not a finding.
    consultation:
        Which sources the backend read for this stage and why (:class:`Consultation`).
    """

    candidates: tuple[Candidate, ...]
    evidence: dict[str, Any] = field(default_factory=dict)
    distribution: Mapping[str, float] | None = None
    informative: bool = True
    consultation: Consultation | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.candidates) <= 2:
            raise ValueError("a stage response carries one or two candidates")
        if len(self.candidates) == 2 and self.candidates[1].p > self.candidates[0].p:
            raise ValueError("candidates must be ordered by decreasing probability")
        if self.distribution is not None:
            if not self.distribution:
                raise ValueError("a distribution, when given, must not be empty")
            for answer, p in self.distribution.items():
                if math.isnan(p) or not 0.0 <= p <= 1.0 + 1e-6:
                    raise ValueError(f"distribution probability of {answer!r} must lie in [0, 1], got {p!r}")
            if sum(self.distribution.values()) > 1.0 + 1e-6:
                raise ValueError("a stage distribution must not sum to more than 1")


@runtime_checkable
class RouterBackend(Protocol):
    """What a router backend implements."""

    def identity(self) -> dict[str, Any]:
        """Backend name, model identity (path, hash or version) and settings, for the log."""

    def warm_up(self) -> None:
        """Load every model now (services call this at start-up so a bad path fails early)."""

    def answer(self, items: Sequence[RoutingInput], requests: Sequence[StageRequest]) -> list[StageResponse]:
        """Answer one stage for several inputs at once (``items[i]`` with ``requests[i]``).

        A backend may batch; it returns one response per input, in order. It raises
        :class:`BackendError` for an input it cannot process.
        """


class BackendError(RuntimeError):
    """A backend could not answer for an input (the message names the input)."""


def answer_each(backend: RouterBackend, items: Sequence[RoutingInput],
                requests: Sequence[StageRequest]) -> list[StageResponse | Exception]:
    """``backend.answer`` for a batch; when the batch fails, each input again alone, so only the failing ones fail.

    Returns one response per input, or the exception that input raised.
    """
    try:
        responses = list(backend.answer(items, requests))
        if len(responses) != len(items):
            raise RuntimeError(f"backend returned {len(responses)} responses for {len(items)} inputs")
        return list(responses)
    except Exception as batch_error:
        if len(items) == 1:
            return [batch_error]
        out: list[StageResponse | Exception] = []
        for item, request in zip(items, requests):
            try:
                out.append(backend.answer([item], [request])[0])
            except Exception as exc:
                out.append(exc)
        return out
