"""The embedded backend: routes real DICOM offline from header evidence, without a VLM.

It never claims to read pixels: stage 1 uses the DICOM header (or a user hint for ordinary
images), stage 2 the header's descriptive text, stage 3 the cards' captions. Every response
records the evidence used and ``pixels_read: false``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from onevlm import __version__
from onevlm.backends.embedded.card_matching import rank_cards
from onevlm.backends.embedded.distribution import Ranked
from onevlm.backends.embedded.finding_evidence import rank_findings
from onevlm.backends.embedded.modality_evidence import (
    modality_profiles,
    rank_for_image_file,
    rank_modalities,
)
from onevlm.backends.embedded.text_encoder import TextEncoder, shared_encoder
from onevlm.cards.repository import CardRepository
from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.answers import normalise_modality_hint
from onevlm.router.backend import Candidate, Consultation, StageRequest, StageResponse

logger = logging.getLogger(__name__)


class EmbeddedBackend:
    """Header-evidence router backend (the offline default).

    Parameters
    ----------
    cards:
        The repository the router uses (stage 1 needs each modality's DICOM codes and anatomy).
    text_model_dir:
        Sentence-transformers folder for stages 2–3 (default: the bundled all-MiniLM-L6-v2).
    encoder:
        An already loaded :class:`TextEncoder` (tests share one).
    """

    name = "embedded"

    def __init__(
        self,
        cards: CardRepository,
        text_model_dir: str | None = None,
        encoder: TextEncoder | None = None,
    ) -> None:
        self.cards = cards
        self._profiles = modality_profiles(cards)
        self._text_model_dir = text_model_dir
        self._encoder = encoder

    @property
    def encoder(self) -> TextEncoder:
        # Loaded on first use: stage 1 alone (e.g. a folder of SRs) needs no model.
        if self._encoder is None:
            self._encoder = shared_encoder(self._text_model_dir)
        return self._encoder

    def warm_up(self) -> None:
        """Load the sentence model now instead of at the first stage 2 or 3."""
        _ = self.encoder

    def identity(self) -> dict[str, Any]:
        from onevlm.backends.embedded.text_encoder import MODEL_NAME, default_text_model_dir

        return {
            "backend": self.name,
            "onevlm_version": __version__,
            "model": "DICOM header rules + " + MODEL_NAME,
            "text_model_dir": str(self._text_model_dir or default_text_model_dir()),
            "pixels_read": False,
            # Versions of the evidence rules: a calibration fitted on other rules does not apply.
            "methods": "dicom-header-rules-v1+header-text-minilm-v1+caption-similarity-minilm-v1",
        }

    def answer(self, items: Sequence[RoutingInput], requests: Sequence[StageRequest]) -> list[StageResponse]:
        return [self._answer_one(item, request) for item, request in zip(items, requests)]

    def _answer_one(self, item: RoutingInput, request: StageRequest) -> StageResponse:
        if request.stage == 1:
            if item.header is not None:
                ranking, evidence = rank_modalities(item.header, self._profiles)
            else:
                # The same mapping the CLI validates --hint with.
                matched = normalise_modality_hint(item.hint, self.cards.modalities) if item.hint else None
                ranking, evidence = rank_for_image_file(item.hint, self._profiles, matched)
            return _response(ranking, evidence)
        if request.stage == 2:
            needs_encoder = item.header is not None and bool(item.header.descriptions)
            ranking, evidence = rank_findings(item.header, request.allowed, self.encoder if needs_encoder else None)
            return _response(ranking, evidence)
        ranking, justifications, evidence = rank_cards(
            request.modality, request.finding, request.cards, self.encoder
        )
        top = ranking[:2]
        candidates = tuple(
            Candidate(text=f"{r.answer}: {justifications[r.answer]}", p=r.p) for r in top
        )
        return StageResponse(candidates=candidates, evidence=evidence, distribution=_distribution(ranking),
                             consultation=TEXT_ONLY)


#: Stage 3 reads neither the header nor the pixels.
TEXT_ONLY = Consultation((), "text only: the answers of stages 1-2 against the cards' captions")
HEADER_ONLY = Consultation(("header",), "the embedded router reads the DICOM header (or the user's hint), "
                                       "never the pixels")


def _distribution(ranking: list[Ranked]) -> dict[str, float]:
    return {r.answer: r.p for r in ranking}


def _response(ranking: list[Ranked], evidence: dict) -> StageResponse:
    top = ranking[:2]
    evidence = {**evidence, "logits": {r.answer: round(r.logit, 4) for r in top}}
    return StageResponse(candidates=tuple(Candidate(text=r.answer, p=r.p) for r in top), evidence=evidence,
                         distribution=_distribution(ranking), informative=evidence.get("informative", True),
                         consultation=HEADER_ONLY)
