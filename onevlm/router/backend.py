"""The contract between the router and its backends (embedded, transformers, synthetic).

Per stage a backend returns its top-2 candidate answers, each with the paper's ``p_i``
(probability of the answer's first token, or the backend's equivalent), plus the evidence it
used. The router owns everything else: prompts, normalisation, selection, early stop, logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

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


@dataclass(frozen=True)
class StageRequest:
    """What the router asks of a backend for one stage of one input.

    ``allowed`` is the admissible answer set (stage 1: modalities + None + Other; stage 2: the
    cards' findings + Normal, open to other findings; stage 3: candidate card IDs + None).
    ``cards``, ``modality`` and ``finding`` are stage 3's structured fields.
    """

    stage: int
    prompt: StagePrompt
    allowed: tuple[str, ...]
    cards: tuple[ModelCard, ...] = ()
    modality: str | None = None
    finding: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.stage == 3 and (self.modality is None or self.finding is None):
            raise ValueError("stage 3 needs the modality and finding of stages 1 and 2")


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
    """

    candidates: tuple[Candidate, ...]
    evidence: dict[str, Any] = field(default_factory=dict)
    distribution: Mapping[str, float] | None = None
    informative: bool = True

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
