"""From stage answers to a routing outcome a person can trust: routed, routed-set, review or stopped.

The three stages (Algorithm 1) give the paper's answer. This module decides what the router may
*claim* from them:

- **Route confidence** = P1(modality) x sum over the routed cards c of P3(c | modality, finding):
  the estimated probability that the right card is among the routed ones. It never exceeds the
  stage-1 probability it rests on. Probabilities are calibrated (temperature scaling) where the
  site fitted a calibration, else the backend's own (``calibrated: false``).
- **Ties**: a stage whose top-2 margin is below ``tie_epsilon`` is flagged; a stage-1 tie sends
  the case to review; a stage-3 tie routes both cards as a set; a stage-2 tie counts as no evidence.
- **No stage-2 evidence** (the backend read no pixels and no finding-bearing text): stage 3's
  choice within the modality would rest on the default ``Normal``, so the card set is the
  modality's cards, not a guess.
- **Prediction sets** (calibrated, policy ``sets``): the split-conformal sets of stages 1 and 3;
  the case is routed to the stage-3 set when it is small enough, else reviewed.
- **Selective** (policy ``selective``): one card when its route confidence reaches the fitted
  threshold, else review.
- **Header and pixels disagree** (hybrid backend): a stage whose pixels contradict the header
  beyond the calibrated margin sends the case to review, saying both answers in words; under the
  site policy ``pixels`` the stage was decided on the pixels and the route goes on, flagged.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from onevlm.calibration.scores import StageScores
from onevlm.calibration.site import RoutingSettings, SiteCalibration
from onevlm.router.backend import NONE, OTHER, answer_probability
from onevlm.router.stage_decision import StageDecision

ROUTED = "routed"
ROUTED_SET = "routed-set"
REVIEW = "review"
STOPPED = "stopped"
FAILED = "failed"
OUTCOMES = (ROUTED, ROUTED_SET, REVIEW, STOPPED, FAILED)
STOP_ANSWERS = frozenset({NONE, OTHER})
#: How an empty decoded answer is listed (a VLM can end its turn at once).
EMPTY_ANSWER = "(empty answer)"
#: Answers per stage written to the decision log (the full distribution is in the stage record).
LOGGED_ANSWERS = 5


def stage_scores(stage: StageDecision) -> StageScores:
    """A stage's probabilities: the backend's distribution, else its candidates' ``p``.

    A decoded answer counts with the probability of its own token sequence when the backend
    gives one (free-text VLM answers): its first token's ``p`` — what Algorithm 1 compares — also
    covers every other answer starting with that token ("brain" begins both "brain CT scan" and
    "brain MRI scan"), so it can be higher than the evidence for this answer; the sequence's
    probability never is. Two candidates that normalise to the same answer add up: their token
    sequences are disjoint.
    """
    if stage.distribution:
        return StageScores(stage=stage.stage, probs=_at_most_one(dict(stage.distribution)))
    probs: dict[str, float] = {}
    for candidate in stage.candidates:
        answer = candidate.answer.strip() or EMPTY_ANSWER
        p = answer_probability(candidate.p, candidate.sequence_logprob)
        probs[answer] = min(probs.get(answer, 0.0) + p, 1.0)
    return StageScores(stage=stage.stage, probs=_at_most_one(probs))


def _at_most_one(probs: dict[str, float]) -> dict[str, float]:
    """Rescale probabilities whose sum exceeds 1 by float or rounding noise (a logged distribution)."""
    total = sum(probs.values())
    return {a: p / total for a, p in probs.items()} if total > 1.0 else probs


def _ranked(probs: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(probs.items(), key=lambda item: -item[1])


@dataclass(frozen=True)
class StageAssessment:
    """One stage as the outcome sees it.

    Attributes
    ----------
    stage, chosen:
        The stage and the answer Algorithm 1 kept.
    raw, calibrated:
        The backend's probabilities and their calibrated version (``None``: not calibrated).
    p:
        The probability of ``chosen`` shown to people (calibrated where available).
    margin, tie:
        Top-2 margin of the shown probabilities, and whether it is below ``tie_epsilon``.
    tied:
        The answers within ``tie_epsilon`` of the top one (empty without a tie).
    informative:
        ``False`` when the backend had no evidence for this stage.
    prediction_set:
        The conformal set (calibrated, policy ``sets``), else ``None``.
    full_distribution:
        Whether the backend scored every admissible answer (else: only its top-2 candidates).
    """

    stage: int
    chosen: str
    raw: Mapping[str, float]
    calibrated: Mapping[str, float] | None
    p: float
    margin: float
    tie: bool
    tied: tuple[str, ...]
    informative: bool
    prediction_set: tuple[str, ...] | None
    full_distribution: bool
    consulted: tuple[str, ...] | None = None
    consult_reason: str | None = None
    vlm_calls: int = 0

    @property
    def shown(self) -> Mapping[str, float]:
        return self.calibrated if self.calibrated is not None else self.raw

    def as_dict(self) -> dict[str, Any]:
        def top(probs: Mapping[str, float] | None) -> dict[str, float] | None:
            return None if probs is None else {a: round(p, 6) for a, p in _ranked(probs)[:LOGGED_ANSWERS]}

        return {
            "stage": self.stage,
            "chosen": self.chosen,
            "p": round(self.p, 6),
            "raw": top(self.raw),
            "calibrated": top(self.calibrated),
            "margin": round(self.margin, 6),
            "tie": self.tie,
            "tied": list(self.tied),
            "informative": self.informative,
            "set": list(self.prediction_set) if self.prediction_set is not None else None,
            "distribution": "full" if self.full_distribution else "top-2",
            "consulted": list(self.consulted) if self.consulted is not None else None,
            "consult_reason": self.consult_reason,
            "vlm_calls": self.vlm_calls,
        }


def assess_stage(stage: StageDecision, calibration: SiteCalibration | None, settings: RoutingSettings) -> StageAssessment:
    """Calibrate one stage's probabilities, flag ties and build its prediction set."""
    scores = stage_scores(stage)
    fitted = calibration.stage(stage.stage) if calibration is not None and calibration.calibrated else None
    calibrated = fitted.calibrate(scores) if fitted is not None else None
    shown = (calibrated or scores).probs
    ranked = _ranked(shown)
    first_p = ranked[0][1]
    second_p = ranked[1][1] if len(ranked) > 1 else 0.0
    margin = first_p - second_p
    tie = len(ranked) > 1 and margin < settings.tie_epsilon
    tied = tuple(a for a, p in ranked if first_p - p < settings.tie_epsilon) if tie else ()
    prediction_set = None
    if fitted is not None and calibrated is not None and settings.policy == "sets":
        prediction_set = fitted.prediction_set(calibrated)
    return StageAssessment(
        stage=stage.stage,
        chosen=stage.chosen,
        raw=dict(scores.probs),
        calibrated=dict(calibrated.probs) if calibrated is not None else None,
        p=float(shown.get(stage.chosen, 0.0)),
        margin=margin,
        tie=tie,
        tied=tied,
        informative=stage.informative,
        prediction_set=prediction_set,
        full_distribution=bool(stage.distribution),
        consulted=stage.consulted,
        consult_reason=stage.consultation.reason if stage.consultation is not None else None,
        vlm_calls=stage.vlm_calls,
    )


@dataclass(frozen=True)
class RouteOutcome:
    """What the router claims for one input.

    Attributes
    ----------
    outcome:
        ``routed`` (one card), ``routed-set`` (a few cards), ``review`` (a person decides),
        ``stopped`` (not a medical image, no card covers it, no card fits) or ``failed``.
    cards:
        The routed card IDs (one for ``routed``, several for ``routed-set``, none otherwise).
    confidence:
        Route confidence (module docstring); for ``stopped`` the probability of the stop
        answer; ``None`` for ``review`` and ``failed``.
    calibrated:
        Whether the probabilities were calibrated on the site's labels.
    reasons:
        Why the case was reviewed or stopped, and notes on how the set was formed.
    disagreement:
        The header and the pixels contradict each other (in words), else ``None``.
    """

    outcome: str
    cards: tuple[str, ...] = ()
    confidence: float | None = None
    calibrated: bool = False
    reasons: tuple[str, ...] = ()
    stages: tuple[StageAssessment, ...] = ()
    calibration: Mapping[str, Any] | None = None
    policy: str = "sets"
    disagreement: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        if self.outcome == ROUTED and len(self.cards) != 1:
            raise ValueError("a routed outcome has exactly one card")
        if self.outcome == ROUTED_SET and len(self.cards) < 2:
            raise ValueError("a routed-set outcome has at least two cards")
        if self.outcome not in (ROUTED, ROUTED_SET) and self.cards:
            raise ValueError(f"a {self.outcome} outcome routes no card")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0 + 1e-9:
            raise ValueError(f"confidence must lie in [0, 1], got {self.confidence!r}")

    @property
    def needs_review(self) -> bool:
        return self.outcome == REVIEW

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "cards": list(self.cards),
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "calibrated": self.calibrated,
            "needs_review": self.needs_review,
            "reasons": list(self.reasons),
            "policy": self.policy,
            "calibration": dict(self.calibration) if self.calibration else None,
            "disagreement": self.disagreement,
            "stages": [s.as_dict() for s in self.stages],
        }


@dataclass
class _Draft:
    """The outcome being decided (so each rule reads as one step)."""

    calibrated: bool
    stages: tuple[StageAssessment, ...]
    calibration: Mapping[str, Any] | None
    policy: str
    notes: list[str] = field(default_factory=list)
    disagreement: str | None = None

    def make(self, outcome: str, cards: Sequence[str] = (), confidence: float | None = None,
             reason: str | None = None) -> RouteOutcome:
        reasons = ([reason] if reason else []) + self.notes
        return RouteOutcome(outcome=outcome, cards=tuple(cards), confidence=confidence, calibrated=self.calibrated,
                            reasons=tuple(reasons), stages=self.stages, calibration=self.calibration,
                            policy=self.policy, disagreement=self.disagreement)


def _header_words(stage: StageDecision) -> str | None:
    """What the header itself says at stage 1, in its own terms (``Modality CT, BodyPartExamined CHEST``)."""
    if stage.stage != 1 or not isinstance(stage.evidence, dict):
        return None
    header = (stage.evidence.get("header") or {}).get("header") or {}
    words = [f"{key} {header[key]}" for key in ("Modality", "BodyPartExamined") if header.get(key)]
    return ", ".join(words) or None


def disagreement_text(stages: Sequence[StageDecision]) -> str | None:
    """Every stage's header/pixels contradiction in words (``stage 1: header says ...``), else ``None``."""
    texts = [f"stage {s.stage}: {s.consultation.disagreement.text(_header_words(s))}" for s in stages
             if s.consultation is not None and s.consultation.disagreement is not None]
    return "; ".join(texts) or None


def _pair(assessment: StageAssessment) -> str:
    shown = assessment.shown
    return " vs ".join(f"{a} ({shown.get(a, 0.0):.4f})" for a in assessment.tied)


def decide_outcome(
    stages: Sequence[StageDecision],
    modality_cards: Callable[[str], Sequence[str]],
    calibration: SiteCalibration | None = None,
    stop_reason: str | None = None,
    error: str | None = None,
) -> RouteOutcome:
    """Decide the outcome of one routed input (the rules are in the module docstring).

    Parameters
    ----------
    stages:
        The stage decisions Algorithm 1 made (one to three).
    modality_cards:
        The card IDs of a modality (the set routed when stage 2 had no evidence).
    calibration:
        The site's calibration (``None``: uncalibrated defaults).
    stop_reason, error:
        The pipeline's stop reason and error, if any.
    """
    settings = calibration.settings if calibration is not None else RoutingSettings()
    calibrated = calibration is not None and calibration.calibrated
    assessed = tuple(assess_stage(s, calibration, settings) for s in stages)
    draft = _Draft(calibrated, assessed, calibration.summary() if calibration is not None else None, settings.policy,
                   disagreement=disagreement_text(stages))
    if error is not None or not assessed:
        return draft.make(FAILED, reason=error or "no stage ran")
    flagged = [s for s in stages if s.consultation is not None and s.consultation.disagreement is not None]
    if any(s.consultation.disagreement.action == "review" for s in flagged):
        return draft.make(REVIEW, reason=f"header and image disagree: {draft.disagreement} (a person checks the "
                                         "image and corrects the header at its source)")
    if flagged:
        draft.notes.append(f"header and image disagree: {draft.disagreement}; the stage was decided on the pixels "
                           "(site policy on_disagreement: pixels)")

    s1 = assessed[0]
    if not stages[0].chosen_record.in_allowed_set:
        return draft.make(STOPPED, reason=stop_reason)
    if s1.tie and not set(s1.tied) <= STOP_ANSWERS:
        return draft.make(REVIEW, reason=f"stage 1 tie: {_pair(s1)} (margin {s1.margin:.4f} < {settings.tie_epsilon})")
    if s1.prediction_set is not None:
        members = set(s1.prediction_set)
        if not members:
            return draft.make(REVIEW, reason="stage 1: empty prediction set (no modality is plausible enough)")
        if len(members) > 1 and not members <= STOP_ANSWERS:
            return draft.make(REVIEW, reason=f"stage 1: the modality is uncertain, its prediction set holds "
                                             f"{', '.join(s1.prediction_set)}")
        if s1.chosen not in members and not (members <= STOP_ANSWERS and s1.chosen in STOP_ANSWERS):
            return draft.make(REVIEW, reason=f"stage 1: the answer kept ({s1.chosen}) is outside the prediction "
                                             f"set ({', '.join(s1.prediction_set)})")
    if s1.chosen in STOP_ANSWERS:
        members = set(s1.prediction_set or ()) | {s1.chosen} | set(s1.tied)
        return draft.make(STOPPED, confidence=min(sum(s1.shown.get(a, 0.0) for a in members & STOP_ANSWERS), 1.0),
                          reason=stop_reason)
    if len(assessed) < 3:
        return draft.make(FAILED, reason=stop_reason or "stage 3 did not run")

    s2, s3 = assessed[1], assessed[2]
    p1 = s1.p
    if not stages[2].chosen_record.in_allowed_set:
        return draft.make(STOPPED, reason=stop_reason)
    if not s2.informative or s2.tie:
        cards = tuple(modality_cards(s1.chosen))
        why = "had no evidence" if not s2.informative else f"is a tie ({_pair(s2)})"
        draft.notes.append(f"stage 2 {why}: the cards are those of {s1.chosen}, chosen by modality alone")
    elif s3.prediction_set is not None:
        cards = s3.prediction_set
    elif s3.tie:
        cards = tuple(dict.fromkeys((s3.chosen, *s3.tied)))
        draft.notes.append(f"stage 3 tie: {_pair(s3)}; both are routed")
    else:
        cards = (s3.chosen,)

    if NONE in cards:
        if len(cards) == 1:
            return draft.make(STOPPED, confidence=p1 * s3.shown.get(NONE, 0.0),
                              reason=stop_reason or "stage 3: no candidate card fits (None)")
        return draft.make(REVIEW, reason=f"stage 3: the set holds None as well as cards ({', '.join(cards)})")
    if not cards:
        return draft.make(REVIEW, reason="stage 3: empty prediction set (no card is plausible enough)")
    if len(cards) > settings.max_set_size:
        return draft.make(REVIEW, reason=f"{len(cards)} cards remain possible ({', '.join(cards)}), more than "
                                         f"max_set_size {settings.max_set_size}")
    confidence = min(p1 * sum(s3.shown.get(c, 0.0) for c in cards), p1)
    if settings.policy == "selective":
        if len(cards) > 1:
            return draft.make(REVIEW, reason=f"selective policy: no single card ({', '.join(cards)})")
        threshold = calibration.route_selective.threshold if calibrated and calibration.route_selective else None
        if calibrated and threshold is None:
            return draft.make(REVIEW, reason="selective policy: no threshold certifies the risk bound on the "
                                             "calibration data")
        if threshold is not None and confidence < threshold:
            return draft.make(REVIEW, reason=f"route confidence {confidence:.4f} below the threshold {threshold:.4f}")
    return draft.make(ROUTED if len(cards) == 1 else ROUTED_SET, cards=cards, confidence=confidence)
