"""The hybrid backend: the DICOM header first, the pixels (a VLM) only when the header cannot decide.

Per stage 1 and 2 the header source (the embedded backend's rules and text model) answers every
input. For each input the cascade (:mod:`onevlm.calibration.fusion`) then decides from the
header alone whether the pixel source is asked: not when the header certifies the stage, not
when the router says the route is already settled (stage 1 sends the case to review, the
modality has one card), not for an object without pixels. The inputs that need it go to the
pixel source in one batch; their stage distribution is the pooled one, and a contradiction
between the two is recorded as a disagreement. Stage 3 is text only: the header source's caption
matcher answers it, weighing the cards by stage 2's likely findings, and the VLM is not called.

Every response carries a :class:`~onevlm.router.backend.Consultation`: which sources were read and
why, the VLM calls made, both sources' own distributions (a calibration refits on them) and the
disagreement, if any.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Sequence

from onevlm import __version__
from onevlm.cards.repository import CardRepository
from onevlm.calibration.fusion import HEADER, PIXELS, Fusion, StageMix, complete, flat, top
from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.answers import normalise
from onevlm.router.backend import (
    Candidate,
    Consultation,
    RouterBackend,
    StageRequest,
    StageResponse,
    answer_each,
    answer_probability,
)

logger = logging.getLogger(__name__)

_NO_HEADER_EVIDENCE = {1: "the header says nothing of the modality (no DICOM header, no hint): the pixels decide",
                       2: "the header names no finding: the pixels decide"}
#: ``cascade``: the pixels only when the header cannot decide; ``always``: every stage 1-2 reads them
#: (a calibration fit needs both sources on every labelled input).
PIXEL_POLICIES = ("cascade", "always")


def pixel_distribution(response: StageResponse, allowed: Sequence[str]) -> dict[str, float]:
    """The pixel source's probabilities over the admissible answers.

    Its full distribution where it has one (options mode); else its decoded answers, normalised
    onto the admissible set, each counting with its own token sequence's probability (never more
    than its first token's): what is not on the admissible set is unlisted mass.
    """
    if response.distribution:
        return {a: float(p) for a, p in response.distribution.items() if a in allowed}
    probs: dict[str, float] = {}
    for candidate in response.candidates:
        answer = normalise(candidate.text, allowed)
        if not answer.in_allowed_set:
            continue
        p = answer_probability(candidate.p, candidate.sequence_logprob)
        probs[answer.answer] = min(probs.get(answer.answer, 0.0) + p, 1.0)
    total = math.fsum(probs.values())
    return {a: p / total for a, p in probs.items()} if total > 1.0 else probs


#: Stage 3 weighs at most this many of stage 2's findings.
MAX_FINDINGS = 5
#: ... those holding this share of stage 2's probability (each at least FINDING_FLOOR).
FINDING_MASS, FINDING_FLOOR = 0.99, 0.01


def header_backs(response: StageResponse, stage: int, answer: str) -> tuple[bool, str | None]:
    """Whether the header source backs ``answer`` with agreeing statements, and if not, why (in words).

    The header source's ``corroboration`` evidence: stage 1, two independent statements of anatomy
    and none contradicting; stage 2, two different phrases of the header's text naming the finding.
    """
    evidence = (response.evidence or {}).get("corroboration")
    if not isinstance(evidence, dict):
        return True, None  # a header source without the notion: its probabilities and the gate decide
    if evidence.get("answer") != answer:
        return False, f"the header's fields do not single out {answer}"
    if evidence.get("corroborated"):
        return True, None
    if evidence.get("conflicting"):
        return False, (f"header fields disagree ({', '.join(evidence.get('supporting') or ['none'])} for it; "
                       f"{', '.join(evidence['conflicting'])} against)")
    supporting = evidence.get("supporting") or []
    if not supporting:
        return False, "no header field names its anatomy" if stage == 1 else "no header phrase names it"
    if stage == 2:
        return False, (f"only {supporting[0]} names it: one phrase alone is wrong too often (descriptions on "
                       "about 10 % of series)")
    return False, (f"only {supporting[0]} backs it: one field alone is wrong too often (Body Part Examined on "
                   "about 15 % of images)")


def likely_findings(request: StageRequest) -> list[tuple[str, float]]:
    """Stage 2's likely findings and their weights (renormalised), or the chosen finding alone."""
    probs = request.finding_probs
    if not probs:
        return [(request.finding, 1.0)]
    ranked = sorted(((f, p) for f, p in probs.items() if p >= FINDING_FLOOR), key=lambda kv: -kv[1])
    chosen, total = [], 0.0
    for finding, p in ranked[:MAX_FINDINGS]:
        chosen.append((finding, p))
        total += p
        if total >= FINDING_MASS:
            break
    if request.finding not in {f for f, _ in chosen}:
        return [(request.finding, 1.0)]  # Algorithm 1 kept an answer outside the likely ones: follow it
    return [(f, p / total) for f, p in chosen]


def _mixed_cards(parts: list[tuple[StageRequest, StageResponse, float]]) -> StageResponse:
    """The weighted mixture of stage-3 distributions (one per finding), as one response."""
    mixture: dict[str, float] = {}
    for _, response, weight in parts:
        for card, p in (response.distribution or {}).items():
            mixture[card] = mixture.get(card, 0.0) + weight * p
    ranked = sorted(mixture.items(), key=lambda kv: -kv[1])
    weights = ", ".join(f"{r.finding} {w:.2f}" for r, _, w in parts)
    candidates = tuple(Candidate(f"{card}: weighed over stage 2's findings ({weights})", min(p, 1.0))
                       for card, p in ranked[:2])
    first = parts[0][1]
    evidence = {**first.evidence, "findings_weighed": {r.finding: round(w, 6) for r, _, w in parts}}
    return StageResponse(candidates, evidence, distribution=mixture, consultation=first.consultation)


class HybridBackend:
    """Router backend reading the DICOM header and, when it can change the answer, the pixels.

    Parameters
    ----------
    header:
        The header source (an :class:`~onevlm.backends.embedded.EmbeddedBackend`); it also
        answers stage 3.
    pixels:
        The pixel source: any backend that reads images (``transformers``, or the specialty
        model's shared base).
    fusion:
        The fitted fusion (``calibration.json``'s ``fusion``); ``None``: the uncalibrated defaults.
    read_pixels:
        ``cascade`` (default) or ``always`` (see :data:`PIXEL_POLICIES`).
    cards:
        The card repository: with it, an image whose stage-2 finding belongs to other modalities'
        cards than the one stage 1 chose is a disagreement too (a header whose fields are wrong
        together, as a wrong protocol at the scanner writes them, is caught there).
    """

    name = "hybrid"
    #: Images are decoded by the pixel source when the cascade asks for them, never ahead.
    decodes_on_demand = True

    def __init__(self, header: RouterBackend, pixels: RouterBackend, fusion: Fusion | None = None,
                 read_pixels: str = "cascade", cards: CardRepository | None = None) -> None:
        if read_pixels not in PIXEL_POLICIES:
            raise ValueError(f"read_pixels must be one of {', '.join(PIXEL_POLICIES)}, got {read_pixels!r}")
        self.header = header
        self.pixels = pixels
        self.fusion = fusion or Fusion()
        self.read_pixels = read_pixels
        self.cards = cards if cards is not None else getattr(header, "cards", None)
        self._owners: dict[str, list[str]] = {}
        for card in (self.cards.cards if self.cards is not None else ()):
            for finding in card.findings:
                holders = self._owners.setdefault(finding.lower(), [])
                if card.modality not in holders:
                    holders.append(card.modality)

    def with_fusion(self, fusion: Fusion | None, read_pixels: str | None = None) -> "HybridBackend":
        """The same sources (models stay loaded) with another fusion or pixel policy."""
        return HybridBackend(self.header, self.pixels, fusion, read_pixels or self.read_pixels, self.cards)

    def __str__(self) -> str:
        return f"hybrid (header, then {self.pixels} when the header cannot decide)"

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "onevlm_version": __version__,
            "header": self.header.identity(),
            "pixels": self.pixels.identity(),
            # the image must be at hand: the cascade may ask for it
            "pixels_read": True,
            "fusion": "calibrated" if self.fusion.calibrated else "uncalibrated defaults",
        }

    def warm_up(self) -> None:
        """Load both sources' models now (a bad model path fails at start-up)."""
        for source in (self.header, self.pixels):
            warm_up = getattr(source, "warm_up", None)
            if warm_up is not None:
                warm_up()

    def answer(self, items: Sequence[RoutingInput], requests: Sequence[StageRequest]) -> list[StageResponse]:
        responses: list[StageResponse | None] = [None] * len(items)
        for stage in sorted({r.stage for r in requests}):
            index = [i for i, r in enumerate(requests) if r.stage == stage]
            batch_items, batch_requests = [items[i] for i in index], [requests[i] for i in index]
            answered = (self._answer_cards(batch_items, batch_requests) if stage == 3
                        else self._answer_stage(batch_items, batch_requests))
            for i, response in zip(index, answered):
                responses[i] = response
        return [r for r in responses if r is not None]

    # -- stages 1 and 2 -------------------------------------------------------------------------

    def _answer_stage(self, items: list[RoutingInput], requests: list[StageRequest]) -> list[StageResponse]:
        # The sources see the paper's stage request: stage 2 never learns stage 1's answer.
        source_requests = [replace(r, modality=None, settled=None, finding_probs=None) for r in requests]
        header_responses = self.header.answer(items, source_requests)
        stage = requests[0].stage
        fusion = self.fusion.stage(stage)
        headers, reasons, backed, ask = [], [], [], []
        for i, (item, request, response) in enumerate(zip(items, requests, header_responses)):
            answers = request.allowed
            header = complete(response.distribution or {c.text: c.p for c in response.candidates}, answers) \
                if response.informative else flat(answers)
            headers.append(header)
            corroborated, why = header_backs(response, stage, top(header)[0])
            alone = fusion.header_alone(header, answers, corroborated)
            backed.append(corroborated)
            reason = self._why_not(item, request)
            if reason is None and self.read_pixels == "cascade" and fusion.header_decides(alone, corroborated):
                reason = fusion.gate_reason(alone)
            if reason is None:
                ask.append(i)
                reason = fusion.gate_reason(alone, why) if response.informative else _NO_HEADER_EVIDENCE[stage]
            reasons.append(reason)
        pixel_responses = self._ask_pixels([items[i] for i in ask], [source_requests[i] for i in ask])
        by_item = dict(zip(ask, pixel_responses))
        out = []
        for i, (request, header_response, header) in enumerate(zip(requests, header_responses, headers)):
            answers = request.allowed
            pixel_response = by_item.get(i)
            if isinstance(pixel_response, Exception):
                reasons[i] = f"the pixels could not be read ({pixel_response}): decided on the header alone"
                logger.warning("%s: stage %d pixels unreadable (%s); the header decides", items[i].path.name, stage,
                               pixel_response)
                pixel_response = None
            pixels = complete(pixel_distribution(pixel_response, answers), answers) if pixel_response else None
            mix = fusion.mix(header, pixels, answers, self.fusion.on_disagreement, no_pixels_reason=reasons[i],
                             corroborated=backed[i])
            if stage == 2 and pixels is not None and mix.disagreement is None and request.modality:
                # the finding the image shows may belong to another modality than the one stage 1 chose
                foreign = fusion.foreign_finding(fusion.pixels_alone(pixels, answers), request.modality, self._owners,
                                                 self.fusion.on_disagreement)
                if foreign is not None:
                    mix = replace(mix, disagreement=foreign)
            out.append(self._response(mix, header_response, pixel_response, header, pixels, backed[i]))
        return out

    @staticmethod
    def _why_not(item: RoutingInput, request: StageRequest) -> str | None:
        """Why the pixels cannot matter for this input and stage, whatever the header says, or ``None``."""
        non_image = item.header.non_image_kind if item.header is not None else None
        if non_image:
            return f"no pixels to read: {non_image}"
        return request.settled

    # -- stage 3 ----------------------------------------------------------------------------------

    def _answer_cards(self, items: list[RoutingInput], requests: list[StageRequest]) -> list[StageResponse]:
        """Stage 3 on text: the cards' captions against each likely finding, weighted by stage 2's probabilities.

        Matching text is cheap, so the card distribution is ``sum_f P2(f) P3(card | modality, f)`` over
        the findings that hold 99 % of stage 2's mass (at most :data:`MAX_FINDINGS`), not the
        distribution given stage 2's one answer: a sure finding gives one card, an uncertain one a
        set. Without stage-2 probabilities it is the chosen finding's match.
        """
        expanded_items, expanded_requests, spans, weights = [], [], [], []
        for item, request in zip(items, requests):
            findings = likely_findings(request)
            start = len(expanded_requests)
            for finding, weight in findings:
                expanded_items.append(item)
                expanded_requests.append(replace(request, finding=finding, finding_probs=None))
                weights.append(weight)
            spans.append((start, len(expanded_requests)))
        answered = self.header.answer(expanded_items, expanded_requests)
        out = []
        for start, end in spans:
            parts = list(zip(expanded_requests[start:end], answered[start:end], weights[start:end]))
            out.append(parts[0][1] if len(parts) == 1 else _mixed_cards(parts))
        return out

    def _ask_pixels(self, items: list[RoutingInput], requests: list[StageRequest]) -> list[StageResponse | Exception]:
        # an input whose pixels fail is decided on its header; the others keep their pixels
        return answer_each(self.pixels, items, requests) if items else []

    def _response(self, mix: StageMix, header_response: StageResponse, pixel_response: StageResponse | None,
                  header: dict[str, float], pixels: dict[str, float] | None, corroborated: bool) -> StageResponse:
        ranked = sorted(mix.probs.items(), key=lambda item: -item[1])
        candidates = tuple(Candidate(text=a, p=min(p, 1.0)) for a, p in ranked[:2])
        vlm_calls = pixel_response.consultation.vlm_calls if pixel_response is not None and \
            pixel_response.consultation is not None else int(pixel_response is not None)
        consultation = Consultation(
            consulted=mix.consulted,
            reason=mix.reason,
            vlm_calls=vlm_calls,
            sources={HEADER: header if header_response.informative else None, PIXELS: pixels},
            disagreement=mix.disagreement,
            corroborated=corroborated,
        )
        evidence = {
            "method": "hybrid-header-then-pixels-v1",
            "pixels_read": PIXELS in mix.consulted,
            "fusion": "calibrated" if self.fusion.calibrated else "uncalibrated defaults",
            HEADER: header_response.evidence,
            PIXELS: pixel_response.evidence if pixel_response is not None else None,
        }
        informative = header_response.informative or pixel_response is not None
        return StageResponse(candidates=candidates, evidence=evidence, distribution=dict(mix.probs),
                             informative=informative, consultation=consultation)
