"""The three-stage router (section 3 of the paper).

Stage 1 picks the modality from the cards' deduplicated list (``None``: not a medical image,
``Other``: medical but no card covers it; both stop early). Stage 2 names the primary finding
(``Normal`` if none), independent of stage 1. Stage 3 sees no image: it picks a card ID among
the cards of the stage-1 modality, given the modality and finding, or ``None``. Each stage
keeps its top-2 answers and applies Algorithm 1 with that stage's cutoff.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from onevlm.calibration.cutoffs import Cutoffs
from onevlm.calibration.site import CalibrationError, SiteCalibration, calibration_identity
from onevlm.cards.repository import CardRepository
from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.answers import NormalisedAnswer, normalise, normalise_card_choice
from onevlm.router.backend import (
    NONE,
    NORMAL,
    OTHER,
    RouterBackend,
    StageRequest,
    StageResponse,
    answer_each,
)
from onevlm.router.decision import CandidateRecord, RoutingDecision, StageDecision
from onevlm.router.outcome import REVIEW, decide_outcome
from onevlm.router.prompts import prompt_id, stage1_prompt, stage2_prompt, stage3_prompt
from onevlm.router.selector import select_answer

logger = logging.getLogger(__name__)


def _pixel_data_error(item: RoutingInput) -> str | None:
    # Not logged here: the decision's error carries it and the caller reports it.
    problem = item.header.pixel_data_problem if item.header is not None else None
    return f"{item.path}: {problem}" if problem else None


def _check_fusion(backend: RouterBackend, calibration: SiteCalibration) -> None:
    """A hybrid backend must pool with the calibration's own fusion (it was fitted with it)."""
    fusion = getattr(backend, "fusion", None)
    if calibration.fusion is not None and calibration.calibrated and fusion != calibration.fusion:
        source = calibration.path or "calibration"
        raise CalibrationError(f"{source}: the hybrid backend was built without calibration "
                               f"{calibration.calibration_id}'s fusion; build it with that calibration")


@dataclass
class _Progress:
    """Mutable per-input state while the stages run."""

    item: RoutingInput
    stages: list[StageDecision]
    stop_reason: str | None = None
    stopped_early: bool = False
    error: str | None = None
    model_card_id: str | None = None

    @property
    def active(self) -> bool:
        return self.stop_reason is None and self.error is None


class Router:
    """Route inputs to model cards with a backend, per-stage cutoffs and full decision records.

    Parameters
    ----------
    cards:
        The model-card repository (stage 1's list and stage 3's candidates).
    backend:
        Anything implementing :class:`~onevlm.router.backend.RouterBackend`.
    cutoffs:
        Per-stage cutoffs for Algorithm 1 (default: the calibration's, else none, i.e. always the
        first answer).
    calibration:
        The site's calibration (:class:`~onevlm.calibration.site.SiteCalibration`); ``None``
        routes with the uncalibrated defaults and says so in every decision.

    Raises
    ------
    CalibrationError
        When the calibration was fitted for another backend, model or prompt version.
    """

    def __init__(self, cards: CardRepository, backend: RouterBackend, cutoffs: Cutoffs | None = None,
                 calibration: SiteCalibration | None = None) -> None:
        if not len(cards):
            raise ValueError("the router needs at least one model card")
        self.cards = cards
        self.backend = backend
        self.calibration = calibration
        if cutoffs is None and calibration is not None:
            cutoffs = calibration.cutoffs()
        self.cutoffs = cutoffs or Cutoffs()
        self.stage1_allowed = (*cards.modalities, NONE, OTHER)
        # Cards list 'normal' as a class; stage 2 spells it the paper's way, once.
        self.stage2_allowed = (*(f for f in cards.findings if f.lower() != NORMAL.lower()), NORMAL)
        self._stage1_prompt = stage1_prompt(cards.modalities)
        self._stage2_prompt = stage2_prompt()
        self._backend_identity = backend.identity()
        self.identity = calibration_identity(self._backend_identity, [prompt_id(s) for s in (1, 2, 3)])
        self.startup_seconds: float | None = None
        if calibration is not None:
            calibration.check_compatible(self.identity)
            _check_fusion(backend, calibration)

    def warm_up(self) -> float:
        """Load the backend's models now; the time is start-up, never charged to a stage.

        Returns the seconds it took (the first call's; later calls return at once).
        """
        if self.startup_seconds is None:
            started = time.perf_counter()
            warm_up = getattr(self.backend, "warm_up", None)  # part of the protocol; test doubles may omit it
            if warm_up is not None:
                warm_up()
            self.startup_seconds = time.perf_counter() - started
        return self.startup_seconds

    def route(self, item: RoutingInput) -> RoutingDecision:
        """Route one input."""
        return self.route_many([item])[0]

    def route_many(self, items: Sequence[RoutingInput]) -> list[RoutingDecision]:
        """Route several inputs, stage by stage, so a backend can batch each stage."""
        self.warm_up()
        # A file whose Pixel Data is cut short is a bad input, even for a backend that reads no pixels.
        states = [_Progress(item=item, stages=[], error=_pixel_data_error(item)) for item in items]

        self._run_stage(
            states,
            lambda s: StageRequest(stage=1, prompt=self._stage1_prompt, allowed=self.stage1_allowed),
            self._after_stage1,
        )
        self._run_stage(
            states,
            lambda s: StageRequest(stage=2, prompt=self._stage2_prompt, allowed=self.stage2_allowed,
                                   modality=s.stages[0].chosen, settled=self._settled_after_stage1(s)),
            self._after_stage2,
        )
        self._run_stage(states, self._stage3_request, self._after_stage3)
        return [self._decision(s) for s in states]

    # -- stages ---------------------------------------------------------------------------

    def _settled_after_stage1(self, state: _Progress) -> str | None:
        """Why no stage-2 evidence can change the route, else ``None`` (a hybrid then skips the pixels).

        One card for the modality: stage 2 has no set to split (a stage 2 without evidence routes
        the modality's cards). Stage 1 already sends the case to review: so would any finding.
        """
        modality = state.stages[0].chosen
        count = len(self.cards.by_modality(modality))
        if count <= 1:
            return f"{modality} has {count} card: no finding can change the route"
        stage1 = decide_outcome(state.stages[:1], self.modality_cards, self.calibration)
        if stage1.outcome == REVIEW:
            return f"stage 1 already sends the case to review ({stage1.reasons[0]})"
        return None

    def _stage3_request(self, state: _Progress) -> StageRequest:
        modality = state.stages[0].chosen
        finding = state.stages[1].chosen
        candidates = self.cards.by_modality(modality)
        prompt = stage3_prompt(modality, finding, [(c.id, c.task_caption) for c in candidates])
        stage2 = state.stages[1]
        return StageRequest(
            stage=3,
            prompt=prompt,
            allowed=(*(c.id for c in candidates), NONE),
            cards=candidates,
            modality=modality,
            finding=finding,
            finding_probs=dict(stage2.distribution) if stage2.informative and stage2.distribution else None,
        )

    def _run_stage(
        self,
        states: list[_Progress],
        make_request: Callable[[_Progress], StageRequest],
        after: Callable[[_Progress, StageDecision], None],
    ) -> None:
        active = [s for s in states if s.active]
        if not active:
            return
        requests = [make_request(s) for s in active]
        started = time.perf_counter()
        responses = self._answer(active, requests)
        # A batched stage costs its wall time shared equally among the inputs it served.
        per_item = (time.perf_counter() - started) / len(active)
        for state, request, response in zip(active, requests, responses):
            if isinstance(response, Exception):
                state.error = f"stage {request.stage}: {response}"
                logger.error("routing failed for %s at stage %d: %s", state.item.path.name, request.stage, response)
                continue
            decision = self._decide(request, response, per_item)
            outside = [i + 1 for i, c in enumerate(decision.candidates) if not c.in_allowed_set]
            if outside:
                # The text itself stays in the decision log (a model may echo what it read).
                logger.info("%s: stage %d answer(s) %s outside the admissible set (kept as written, not coerced)",
                            state.item.path.name, request.stage, "+".join(map(str, outside)))
            state.stages.append(decision)
            after(state, decision)

    def _answer(self, states: list[_Progress], requests: list[StageRequest]) -> list[StageResponse | Exception]:
        responses = answer_each(self.backend, [s.item for s in states], requests)
        failed = sum(isinstance(r, Exception) for r in responses)
        if failed and len(states) > 1:
            logger.warning("stage %d failed for %d of %d inputs; the others go on", requests[0].stage, failed,
                           len(states))
        return responses

    def _decide(self, request: StageRequest, response: StageResponse, seconds: float) -> StageDecision:
        records = tuple(self._normalise(request, c.text, c.p, c.sequence_logprob) for c in response.candidates)
        tau = self.cutoffs.for_stage(request.stage)
        first = records[0]
        second = records[1] if len(records) > 1 else None
        selection = select_answer(
            first.answer, min(first.p, 1.0),
            second.answer if second else None, min(second.p, 1.0) if second else None,
            tau,
        )
        return StageDecision(
            stage=request.stage,
            prompt_id=request.prompt.prompt_id,
            candidates=records,
            tau=tau,
            chosen=selection.answer,
            index=selection.index,
            seconds=seconds,
            evidence=response.evidence,
            distribution=response.distribution,
            informative=response.informative,
            consultation=response.consultation,
        )

    def _normalise(self, request: StageRequest, text: str, p: float, logprob: float | None) -> CandidateRecord:
        if request.stage == 3:
            norm: NormalisedAnswer = normalise_card_choice(text, [c.id for c in request.cards], NONE)
        else:
            norm = normalise(text, request.allowed)
        return CandidateRecord(
            answer=norm.answer,
            p=p,
            raw=text,
            in_allowed_set=norm.in_allowed_set,
            match=norm.match,
            sequence_logprob=logprob,
            justification=norm.justification,
        )

    @staticmethod
    def _after_stage1(state: _Progress, decision: StageDecision) -> None:
        chosen = decision.chosen_record
        if not chosen.in_allowed_set:
            state.stopped_early = True
            state.stop_reason = f"stage 1 answer {chosen.answer!r} is not an admissible modality"
        elif decision.chosen in (NONE, OTHER):
            state.stopped_early = True
            source = decision.evidence.get("source") if isinstance(decision.evidence, dict) else None
            if not decision.informative:
                # Nothing was known (an image file without a usable hint): say so, not a verdict.
                known = source or "no evidence of the modality"
                state.stop_reason = f"stage 1: {known} ({decision.chosen})"
            else:
                state.stop_reason = (
                    "stage 1: not a medical image (None)" if decision.chosen == NONE
                    else "stage 1: medical image of a modality no card covers (Other)"
                )

    @staticmethod
    def _after_stage2(state: _Progress, decision: StageDecision) -> None:
        # Stage 2 never stops the pipeline; a finding outside the cards' vocabulary is passed
        # on as written (and flagged in the log), since stage 3 may still judge it.
        return None

    @staticmethod
    def _after_stage3(state: _Progress, decision: StageDecision) -> None:
        chosen = decision.chosen_record
        if not chosen.in_allowed_set:
            state.stop_reason = f"stage 3 answer {chosen.answer!r} is not one of the candidate cards"
        elif decision.chosen == NONE:
            state.stop_reason = "stage 3: no candidate card fits (None)"
        else:
            state.model_card_id = decision.chosen

    def modality_cards(self, modality: str) -> list[str]:
        """The card IDs of one modality string."""
        return [c.id for c in self.cards.by_modality(modality)]

    def decide(self, stages: Sequence[StageDecision], stop_reason: str | None = None,
               error: str | None = None):
        """The route outcome of finished stages (:func:`~onevlm.router.outcome.decide_outcome`)."""
        return decide_outcome(stages, self.modality_cards, self.calibration, stop_reason=stop_reason, error=error)

    def _decision(self, state: _Progress) -> RoutingDecision:
        stages = tuple(state.stages)
        return RoutingDecision(
            input=str(state.item.path),
            reference=state.item.reference,
            backend=self._backend_identity,
            cutoffs=self.cutoffs.as_dict(),
            stages=stages,
            stopped_early=state.stopped_early,
            stop_reason=state.stop_reason,
            pipeline_card_id=state.model_card_id,
            seconds=sum(s.seconds for s in state.stages),
            error=state.error,
            outcome=self.decide(stages, state.stop_reason, state.error),
            startup_seconds=self.startup_seconds,
        )
