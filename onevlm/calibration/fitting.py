"""Fit and apply per-stage calibrations from scores alone (no model, no DICOM).

A *score row* is one input's candidate probabilities at one stage with the right answer
(:class:`~onevlm.calibration.scores.StageScores`). Per stage this module fits a temperature
(on the fitting rows), then, on the same rows after scaling, the split-conformal quantile and a
selective threshold, and reports the held-out figures: ECE before and after scaling, empirical
coverage and mean set size against α, and the selective accuracy and share routed at the
threshold. ``onevlm calibrate fit --scores`` and ``onevlm calibrate apply`` are thin wrappers;
the router's own fit (:mod:`onevlm.router.site_calibration`) uses :func:`fit_stage` per stage.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from onevlm.calibration.conformal import coverage_report, fit_conformal
from onevlm.calibration.ece import EceResult, expected_calibration_error
from onevlm.calibration.scores import StageScores
from onevlm.calibration.selective import certified_threshold, selective_report
from onevlm.calibration.site import RoutingSettings, SiteCalibration, StageCalibration
from onevlm.calibration.temperature import fit_temperature, scale

OUTCOME_ROUTED = "routed"
OUTCOME_SET = "routed-set"
OUTCOME_REVIEW = "review"


def split_indices(n: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)`` into (fit, held-out) index lists.

    ``holdout`` is the held-out share in [0, 1); at least one row is kept for fitting.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must lie in [0, 1), got {holdout!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_holdout = min(int(round(n * holdout)), max(n - 1, 0))
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


def top_correct(rows: Sequence[StageScores]) -> tuple[list[float], list[bool]]:
    """The top answer's probability and whether it is the gold, per row with a gold."""
    confidences, correct = [], []
    for row in rows:
        if row.gold is None:
            continue
        answer, p = row.top()
        confidences.append(p)
        correct.append(answer == row.gold)
    return confidences, correct


def ece_of(rows: Sequence[StageScores]) -> EceResult | None:
    confidences, correct = top_correct(rows)
    return expected_calibration_error(confidences, correct) if confidences else None


@dataclass(frozen=True)
class StageFit:
    """One stage's fitted calibration and the temperature fit's own figures."""

    calibration: StageCalibration
    nll_before: float
    nll_after: float


def fit_stage(stage: int, rows: Sequence[StageScores], alpha: float, delta: float,
              tau: float | None = None, scale_temperature: bool = True) -> StageFit:
    """Temperature, conformal quantile (level ``alpha``) and selective threshold of one stage.

    ``scale_temperature=False`` keeps ``T = 1``: the rows are already calibrated (a hybrid stage's
    distribution, whose fusion fit is its calibration map).

    Raises
    ------
    ValueError
        When no row has a usable gold answer.
    """
    labelled = [r for r in rows if r.gold is not None]
    if not labelled:
        raise ValueError(f"stage {stage}: no row with a gold answer to fit on")
    if scale_temperature:
        fitted = fit_temperature(labelled)
        temperature, nll_before, nll_after = fitted.temperature, fitted.nll_before, fitted.nll_after
    else:
        temperature = 1.0
        nll_before = nll_after = mean_nll(labelled)
    scaled = [scale(r, temperature) for r in labelled]
    conformal = fit_conformal(scaled, alpha)
    confidences, correct = top_correct(scaled)
    selective = certified_threshold(confidences, correct, alpha, delta)
    calibration = StageCalibration(stage=stage, temperature=temperature, tau=tau,
                                   conformal=conformal, selective=selective, n=len(labelled))
    return StageFit(calibration, nll_before, nll_after)


def mean_nll(rows: Sequence[StageScores]) -> float:
    """Mean negative log-likelihood of the gold answers (an unlisted gold takes the unlisted mass)."""
    values = [-math.log(max(r.probs.get(r.gold, r.rest), 1e-12)) for r in rows if r.gold is not None]
    return sum(values) / len(values) if values else 0.0


def stage_heldout(calibration: StageCalibration, rows: Sequence[StageScores]) -> dict[str, Any]:
    """Held-out figures of one stage: ECE before/after scaling, coverage, selective accuracy."""
    labelled = [r for r in rows if r.gold is not None]
    if not labelled:
        return {"n": 0}
    scaled = [calibration.calibrate(r) for r in labelled]
    before, after = ece_of(labelled), ece_of(scaled)
    out: dict[str, Any] = {
        "n": len(labelled),
        "ece_before": before.ece if before else None,
        "ece_after": after.ece if after else None,
    }
    if calibration.conformal is not None:
        out["coverage"] = coverage_report(scaled, calibration.conformal.qhat, calibration.conformal.alpha,
                                          n_calibration=calibration.conformal.n).as_dict()
    if calibration.selective is not None:
        confidences, correct = top_correct(scaled)
        out["selective"] = selective_report(confidences, correct, calibration.selective.threshold).as_dict()
    return out


def fit_from_scores(rows: Sequence[StageScores], risk: float, delta: float = 0.1, holdout: float = 0.0,
                    seed: int = 0, settings: RoutingSettings | None = None,
                    source: str | None = None) -> SiteCalibration:
    """A calibration fitted per stage on score rows alone (``onevlm calibrate fit --scores``).

    Each stage's set is at level ``risk`` (the rows are stage questions, not routes). With
    ``holdout > 0`` a seeded share of each stage's rows is kept out of fitting and reported.
    The result carries no backend identity, so a router refuses it.
    """
    stages: dict[int, StageCalibration] = {}
    heldout: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for stage in sorted({r.stage for r in rows}):
        stage_rows = [r for r in rows if r.stage == stage and r.gold is not None]
        fit_idx, held_idx = split_indices(len(stage_rows), holdout, seed)
        fitted = fit_stage(stage, [stage_rows[i] for i in fit_idx], risk, delta)
        stages[stage] = fitted.calibration
        sizes[str(stage)] = len(stage_rows)
        if held_idx:
            heldout[str(stage)] = stage_heldout(fitted.calibration, [stage_rows[i] for i in held_idx])
    if not stages:
        raise ValueError("no score rows to fit on")
    return scores_calibration(stages, risk, delta, settings, source, sizes, holdout, seed, heldout)


def scores_calibration(stages: dict[int, StageCalibration], risk: float, delta: float,
                       settings: RoutingSettings | None, source: str | None, sizes: dict[str, int], holdout: float,
                       seed: int, heldout: dict[str, Any], **extra: Any) -> SiteCalibration:
    """A calibration fitted on score rows: no backend identity (a router refuses it), how it was fitted.

    ``extra`` are further :class:`SiteCalibration` fields (a hybrid fit's ``fusion``); a ``kind`` in
    them is recorded in ``fitted`` instead.
    """
    kind = extra.pop("kind", None)
    fitted = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source or "scores",
              "rows": sizes, "holdout": holdout, "seed": seed}
    if kind:
        fitted["kind"] = kind
    return SiteCalibration(settings=settings or RoutingSettings(), stages=stages, risk=risk, delta=delta,
                           identity={}, fitted=fitted, heldout=heldout or None, **extra)


def score_outcome(fitted: StageCalibration, scaled: StageScores, settings: RoutingSettings) -> dict[str, Any]:
    """One stage's set, outcome and confidence for calibrated probabilities (rules: :func:`apply_to_scores`)."""
    top, confidence = scaled.top()
    ranked = sorted(scaled.probs.values(), reverse=True)
    tie = len(ranked) > 1 and ranked[0] - ranked[1] < settings.tie_epsilon
    members = fitted.prediction_set(scaled) or ()
    open_set = fitted.conformal is not None and fitted.conformal.open_set
    if settings.policy == "selective":
        threshold = fitted.selective.threshold if fitted.selective is not None else None
        routed = threshold is not None and confidence >= threshold and not tie
        outcome = OUTCOME_ROUTED if routed else OUTCOME_REVIEW
    elif len(members) == 1 and not tie and not open_set:
        outcome = OUTCOME_ROUTED
    elif 2 <= len(members) <= settings.max_set_size and not open_set:
        outcome = OUTCOME_SET
    else:
        outcome = OUTCOME_REVIEW
    return {"stage": scaled.stage, "set": list(members), "outcome": outcome, "confidence": confidence, "top": top,
            "tie": tie}


def apply_to_scores(calibration: SiteCalibration, rows: Sequence[StageScores]) -> list[dict[str, Any]]:
    """Per row: the calibrated set, an outcome and the calibrated probability of the top answer.

    Outcome (policy ``sets``): ``routed`` for a one-answer set, ``routed-set`` for a set of at
    most ``max_set_size``, ``review`` for an empty, open or larger set or a tie at the top.
    Policy ``selective``: ``routed`` when the top probability reaches the stage threshold and is
    no tie, else ``review``.
    """
    fitted_stages = []
    for row in rows:  # every row checked before any is applied
        fitted = calibration.stage(row.stage)
        if fitted is None:
            raise ValueError(f"the calibration has no stage {row.stage}")
        fitted_stages.append(fitted)
    return [score_outcome(fitted, fitted.calibrate(row), calibration.settings)
            for fitted, row in zip(fitted_stages, rows)]
