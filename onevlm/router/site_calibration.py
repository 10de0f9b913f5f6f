"""Fit a site's calibration from routed, labelled inputs, and measure it on held-out ones.

Input: decisions of the router (routed now, or read from a decision log) paired with the rows
of LABELS.csv. Per stage the score rows are the stage's probabilities (the backend's full
distribution where it has one, else its top-2 candidates) with the labelled answer as gold;
stage 3's rows are those whose stage 1 chose the labelled modality, so its sets are calibrated
given a right modality. The site's α is the end-to-end risk: the stage-1 and stage-3 sets are
each fitted at α/2, so the routed card set misses the right card with probability at most α
(union bound; a review case counts as the full set). The selective policy's threshold is
fitted on route confidence (P1 x P3 of the single card offered) at (α, δ).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from onevlm.calibration.cutoffs import Cutoffs, fit_cutoffs
from onevlm.calibration.ece import expected_calibration_error
from onevlm.calibration.fitting import ece_of, fit_stage, split_indices, stage_heldout
from onevlm.calibration.fusion import HEADER, PIXELS, Fusion, SourceRow, complete, fit_stage_fusion, flat
from onevlm.calibration.reliability import plot_reliability
from onevlm.calibration.risk_coverage import plot_risk_coverage, risk_coverage
from onevlm.calibration.scores import StageScores
from onevlm.calibration.selective import certified_threshold, selective_report
from onevlm.calibration.site import RoutingSettings, SiteCalibration, StageCalibration
from onevlm.router.decision import RoutingDecision
from onevlm.router.labels import UNLABELLED, LabelledInput, cutoff_rows, gold_answer, same_answer
from onevlm.router.outcome import REVIEW, assess_stage, decide_outcome, stage_scores

logger = logging.getLogger(__name__)

ModalityCards = Callable[[str], Sequence[str]]
#: Stages whose prediction sets decide the route (stage 2 is conditioned on, not covered).
SET_STAGES = (1, 3)
#: Stages where the hybrid router pools header and pixels (stage 3 is text only).
FUSED_STAGES = (1, 2)


def _canonical(gold: str, answers: Sequence[str]) -> str:
    """The label spelled as the backend spells the answer (labels are matched ignoring case)."""
    return next((a for a in answers if same_answer(a, gold)), gold)


def labelled_scores(decision: RoutingDecision, row: LabelledInput) -> list[StageScores]:
    """The score rows of one labelled decision (one per stage that ran and has a label)."""
    out = []
    for stage in decision.stages:
        gold = gold_answer(row, stage.stage)
        if not gold or (stage.stage == 3 and not same_answer(decision.modality, row.modality)):
            continue
        scores = stage_scores(stage)
        out.append(StageScores(stage.stage, scores.probs, _canonical(gold, list(scores.probs))))
    return out


def _indexed_pairs(decisions: Sequence[RoutingDecision], rows: Sequence[LabelledInput]) -> list[tuple[int, RoutingDecision, LabelledInput]]:
    if len(decisions) != len(rows):
        raise ValueError(f"{len(decisions)} decisions for {len(rows)} labelled rows")
    pairs = [(i, d, r) for i, (d, r) in enumerate(zip(decisions, rows)) if d.error is None and d.stages]
    if not pairs:
        raise ValueError("no labelled input could be routed: nothing to calibrate on")
    return pairs


def _pairs(decisions: Sequence[RoutingDecision], rows: Sequence[LabelledInput]) -> list[tuple[RoutingDecision, LabelledInput]]:
    return [(d, r) for _, d, r in _indexed_pairs(decisions, rows)]


def _route_rows(pairs, calibration: SiteCalibration, modality_cards: ModalityCards) -> tuple[list[float], list[bool]]:
    """Route confidence of the single card each case would be routed to, and whether it is right."""
    confidences, correct = [], []
    for decision, row in pairs:
        if row.card == UNLABELLED:
            continue
        outcome = decide_outcome(decision.stages, modality_cards, calibration, decision.stop_reason, decision.error)
        if outcome.outcome == "routed" and outcome.confidence is not None:
            confidences.append(outcome.confidence)
            correct.append(same_answer(outcome.cards[0], row.card))
    return confidences, correct


def fit_router_calibration(
    decisions: Sequence[RoutingDecision],
    rows: Sequence[LabelledInput],
    modality_cards: ModalityCards,
    identity: Mapping[str, Any],
    risk: float = 0.1,
    delta: float = 0.1,
    holdout: float = 0.3,
    seed: int = 0,
    settings: RoutingSettings | None = None,
    source: str | None = None,
    cutoffs: Cutoffs | None = None,
    fusion: Fusion | None = None,
) -> tuple[SiteCalibration, list[int]]:
    """Fit cutoffs, temperatures, conformal sets and the selective threshold on the fitting split.

    ``cutoffs`` given: they are kept instead of fitting Algorithm 2 (the decisions were routed
    with them). ``fusion`` given (a hybrid router, routed with it): it is stored, and the stages
    it pools keep ``T = 1`` (the fusion is their calibration map).

    Returns
    -------
    (SiteCalibration, list[int])
        The calibration (its ``heldout`` is filled by :func:`heldout_report`) and the indices
        of ``decisions`` kept out of fitting.
    """
    settings = settings or RoutingSettings()
    indexed = _indexed_pairs(decisions, rows)
    pairs = [(d, r) for _, d, r in indexed]
    fit_idx, held_idx = split_indices(len(pairs), holdout, seed)
    fit_pairs = [pairs[i] for i in fit_idx]
    if cutoffs is None:
        fits = fit_cutoffs(cutoff_rows([r for _, r in fit_pairs], [d for d, _ in fit_pairs]))
        taus = {stage: fit.tau for stage, fit in fits.items()}
    else:
        taus = {stage: cutoffs.for_stage(stage) for stage in (1, 2, 3)}
    scores = [s for d, r in fit_pairs for s in labelled_scores(d, r)]
    stages: dict[int, StageCalibration] = {}
    for stage in (1, 2, 3):
        stage_rows = [s for s in scores if s.stage == stage]
        tau = taus.get(stage)
        if not stage_rows:
            stages[stage] = StageCalibration(stage=stage, tau=tau)
            logger.warning("stage %d: no labelled row to calibrate on; its probabilities stay the backend's", stage)
            continue
        alpha = risk / len(SET_STAGES)
        pooled = fusion is not None and stage in FUSED_STAGES
        stages[stage] = fit_stage(stage, stage_rows, alpha, delta, tau=tau, scale_temperature=not pooled).calibration
    provisional = SiteCalibration(settings=RoutingSettings("selective", settings.max_set_size, settings.tie_epsilon),
                                  stages=stages, risk=risk, delta=delta, identity=identity, fusion=fusion)
    confidences, correct = _route_rows(fit_pairs, provisional, modality_cards)
    route_selective = certified_threshold(confidences, correct, risk, delta) if confidences else None
    calibration = SiteCalibration(
        settings=settings, stages=stages, risk=risk, delta=delta, route_selective=route_selective,
        identity=dict(identity), fusion=fusion,
        fitted={"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source,
                "inputs": len(pairs), "fit": len(fit_pairs), "holdout": len(held_idx), "holdout_share": holdout,
                "seed": seed, "stage_rows": {str(s): stages[s].n for s in stages},
                "alpha_per_set_stage": risk / len(SET_STAGES)},
    )
    return calibration, [indexed[i][0] for i in held_idx]


def pipeline_confidence(decision: RoutingDecision, calibration: SiteCalibration | None) -> float | None:
    """The probability of the paper's answer (stage-1 stop, or P1 x P3 of stage 3's card), calibrated."""
    settings = calibration.settings if calibration is not None else RoutingSettings()
    if not decision.stages:
        return None
    assessed = [assess_stage(s, calibration, settings) for s in decision.stages]
    if len(assessed) < 3:
        return assessed[0].p
    return assessed[0].p * assessed[2].p


def heldout_report(
    decisions: Sequence[RoutingDecision],
    rows: Sequence[LabelledInput],
    calibration: SiteCalibration,
    modality_cards: ModalityCards,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Held-out figures of a calibration: per stage and end to end, with plots in ``out_dir``.

    Per stage: ECE of the top answer before and after temperature scaling, coverage and mean set
    size against the stage's α, selective accuracy at the stage threshold. End to end: the
    outcomes, the routed sets' coverage of the labelled card (a review case counts as covering,
    as the full set would), mean routed-set size, accuracy and share routed at the selective
    threshold, and the risk-coverage curve of the paper's answer ranked by route confidence
    (AURC), uncalibrated and calibrated.
    """
    pairs = _pairs(decisions, rows)
    report: dict[str, Any] = {"n": len(pairs), "stages": {}}
    scores = [s for d, r in pairs for s in labelled_scores(d, r)]
    plots: dict[str, str] = {}
    out = Path(out_dir) if out_dir is not None else None
    for stage in (1, 2, 3):
        fitted = calibration.stage(stage)
        stage_rows = [s for s in scores if s.stage == stage]
        if fitted is None or not stage_rows:
            continue
        report["stages"][str(stage)] = stage_heldout(fitted, stage_rows)
        if out is not None:
            before = ece_of(stage_rows)
            after = ece_of([fitted.calibrate(s) for s in stage_rows])
            if before and after:
                path = out / f"reliability_stage{stage}.png"
                plot_reliability({"backend's probabilities": before, f"temperature-scaled (T={fitted.temperature:.3g})": after},
                                 path, f"Stage {stage} reliability, held-out (n={before.n})")
                plots[f"reliability_stage{stage}"] = str(path)

    labelled = [(d, r) for d, r in pairs if r.card != UNLABELLED]
    outcomes = [decide_outcome(d.stages, modality_cards, calibration, d.stop_reason, d.error) for d, _ in labelled]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    routed = [(o, r) for o, (_, r) in zip(outcomes, labelled) if o.cards]
    covered = sum(1 for o, r in routed if any(same_answer(c, r.card) for c in o.cards))
    stopped_right = sum(1 for o, (d, r) in zip(outcomes, labelled)
                        if o.outcome == "stopped" and same_answer(d.final_label, r.card))
    reviews = counts.get(REVIEW, 0)
    route: dict[str, Any] = {
        "n": len(labelled),
        "outcomes": counts,
        "routed_coverage": covered / len(routed) if routed else None,
        "marginal_coverage": (covered + stopped_right + reviews) / len(labelled) if labelled else None,
        "mean_set_size": sum(len(o.cards) for o, _ in routed) / len(routed) if routed else None,
        "risk": calibration.risk,
    }
    if calibration.route_selective is not None:
        confidences, correct = _route_rows(labelled, calibration, modality_cards)
        fitted_threshold = calibration.route_selective.threshold
        selected = selective_report(confidences, correct, fitted_threshold).as_dict() if confidences else None
        if selected is not None:
            selected["share_routed_of_all"] = selected["routed"] / len(labelled) if labelled else None
        route["selective"] = selected
    curves = {}
    for name, cal in (("uncalibrated", None), ("calibrated", calibration)):
        confidences = [pipeline_confidence(d, cal) for d, _ in labelled]
        correct = [same_answer(d.final_label, r.card) for d, r in labelled]
        keep = [(c, k) for c, k in zip(confidences, correct) if c is not None]
        if keep:
            curves[name] = risk_coverage([c for c, _ in keep], [k for _, k in keep])
            if name == "calibrated":
                ece = expected_calibration_error([c for c, _ in keep], [k for _, k in keep])
                route["ece_route_confidence"] = ece.ece
            else:
                route["ece_route_confidence_uncalibrated"] = expected_calibration_error(
                    [c for c, _ in keep], [k for _, k in keep]).ece
    if curves:
        route["aurc"] = {name: curve.aurc for name, curve in curves.items()}
        if out is not None:
            path = out / "risk_coverage.png"
            plot_risk_coverage(curves, path, f"Risk-coverage of the routed answer, held-out (n={len(labelled)})")
            plots["risk_coverage"] = str(path)
    report["route"] = route
    report["plots"] = plots
    return report


def route_labelled(router, rows: Sequence[LabelledInput], batch_size: int = 8) -> list[RoutingDecision]:
    """Route every labelled input (in order; an unreadable one becomes an error record)."""
    from onevlm.router.runner import route_files

    return list(route_files(router, [r.path for r in rows], batch_size=batch_size))


def decisions_from_log(path: str | Path, rows: Sequence[LabelledInput]) -> list[RoutingDecision]:
    """The logged decision of each labelled input, matched by path, else by file name.

    Raises
    ------
    ValueError
        Naming the log and the first labelled input it lacks.
    """
    from onevlm.router.decision_log import decision_from_record, read_log

    by_path: dict[str, Mapping[str, Any]] = {}
    by_name: dict[str, Mapping[str, Any]] = {}
    try:
        for record in read_log(path):
            by_path[str(Path(record["input"]).resolve())] = record
            by_name[Path(record["input"]).name] = record
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the decision log: {exc}") from exc
    decisions = []
    for row in rows:
        record = by_path.get(str(row.path.resolve())) or by_name.get(row.path.name)
        if record is None:
            raise ValueError(f"{path}: no decision for labelled input {row.path.name}")
        decisions.append(decision_from_record(record))
    return decisions


def calibrate_from_labels(
    labels_csv: str | Path,
    cards,
    backend,
    risk: float = 0.1,
    delta: float = 0.1,
    holdout: float = 0.3,
    seed: int = 0,
    settings: RoutingSettings | None = None,
    decisions_log: str | Path | None = None,
    report_dir: str | Path | None = None,
    batch_size: int = 8,
    on_disagreement: str = "review",
) -> SiteCalibration:
    """``onevlm calibrate fit LABELS.csv``: route (or read the log), fit, report held out.

    Routing runs twice when Algorithm 2 fits any cutoff: first without cutoffs (its rows need
    both candidates of the baseline), then with them, so stage 3's probabilities are those of
    the router as it will run. Stage answers are cached between the runs.

    A hybrid backend is first run reading the pixels of every input (both sources on every
    labelled input), its fusion fitted on the fitting split (:func:`fit_fusion`), then the router
    runs as it will in service (the cascade with that fusion) and the sets are fitted on what it
    produces; the VLM's answers are cached, so each input costs at most one VLM call per stage.
    """
    from onevlm.router.labels import labelled_inputs, read_labels

    if decisions_log is not None:  # a logged decision is matched by file name: nothing to fetch
        return calibrate_rows(read_labels(labels_csv), labels_csv, cards, backend, risk, delta, holdout, seed,
                              settings, decisions_log, report_dir, batch_size, on_disagreement)
    with labelled_inputs(labels_csv, backend) as rows:
        return calibrate_rows(rows, labels_csv, cards, backend, risk, delta, holdout, seed, settings, None,
                              report_dir, batch_size, on_disagreement)


def calibrate_rows(rows, labels_csv, cards, backend, risk, delta, holdout, seed, settings, decisions_log,
                    report_dir, batch_size, on_disagreement: str = "review") -> SiteCalibration:
    from onevlm.router.caching import CachingBackend
    from onevlm.router.pipeline import Router

    hybrid = getattr(backend, "name", None) == "hybrid"
    if hybrid and decisions_log is not None:
        raise ValueError(f"{decisions_log}: a hybrid calibration needs the pixels of every labelled input, which a "
                         "cascade's log lacks where the header decided; fit on LABELS.csv without --decisions")
    fusion = None
    if hybrid:
        # Both sources cached: every later pass reuses the VLM's answers.
        from onevlm.backends.hybrid import HybridBackend

        backend = HybridBackend(CachingBackend(backend.header), CachingBackend(backend.pixels), None, "always",
                                backend.cards)
        always = route_labelled(Router(cards, backend), rows, batch_size)
        fusion = fit_fusion(always, rows, risk, delta, holdout, seed, on_disagreement)
        backend = backend.with_fusion(fusion, read_pixels="cascade")
    cached = backend if hybrid else CachingBackend(backend)
    router = Router(cards, cached)
    modality_cards = router.modality_cards
    if decisions_log is not None:
        decisions = decisions_from_log(decisions_log, rows)
        source = f"{Path(labels_csv).name} + decisions {Path(decisions_log).name}"
    else:
        decisions = route_labelled(router, rows, batch_size)
        source = Path(labels_csv).name
    calibration, held = fit_router_calibration(decisions, rows, modality_cards, router.identity, risk, delta,
                                               holdout, seed, settings, source, fusion=fusion)
    cutoffs = calibration.cutoffs()
    if decisions_log is None and any(v is not None for v in cutoffs.as_dict().values()):
        decisions = route_labelled(Router(cards, cached, cutoffs), rows, batch_size)
        calibration, held = fit_router_calibration(decisions, rows, modality_cards, router.identity, risk, delta,
                                                   holdout, seed, settings, source, cutoffs=cutoffs, fusion=fusion)
    if held:
        report = heldout_report([decisions[i] for i in held], [rows[i] for i in held], calibration, modality_cards,
                                report_dir)
        calibration = replace(calibration, heldout=report)
    return calibration


def source_rows(decisions: Sequence[RoutingDecision], rows: Sequence[LabelledInput], stage: int) -> list[SourceRow]:
    """Both sources of one pooled stage per labelled decision (a hybrid router's consultation records)."""
    out = []
    for decision, row in zip(decisions, rows):
        record = decision.stage(stage)
        gold = gold_answer(row, stage)
        if record is None or record.consultation is None or not gold or not record.consultation.sources:
            continue
        sources = record.consultation.sources
        answers = tuple(sources.get(HEADER) or sources.get(PIXELS) or ())
        if not answers:
            continue
        header = sources.get(HEADER)
        pixels = sources.get(PIXELS)
        corroborated = record.consultation.corroborated is not False
        out.append(SourceRow(stage, answers, complete(header, answers) if header else flat(answers),
                             complete(pixels, answers) if pixels else None, _canonical(gold, answers), corroborated))
    return out


def fit_fusion(decisions: Sequence[RoutingDecision], rows: Sequence[LabelledInput], risk: float, delta: float,
               holdout: float, seed: int, on_disagreement: str = "review") -> Fusion:
    """Fit the hybrid router's fusion on the fitting split of decisions that read both sources.

    The split is :func:`fit_router_calibration`'s (same inputs, holdout and seed), so the held-out
    inputs stay out of the fusion too. Each pooled stage is fitted at the stage level α/2 (the
    route's α spread over the two set stages, as the sets are).
    """
    indexed = _indexed_pairs(decisions, rows)
    fit_idx, _ = split_indices(len(indexed), holdout, seed)
    fit_decisions = [indexed[i][1] for i in fit_idx]
    fit_rows = [indexed[i][2] for i in fit_idx]
    stages = {}
    for stage in FUSED_STAGES:
        stage_rows = source_rows(fit_decisions, fit_rows, stage)
        if not any(r.gold in r.answers for r in stage_rows):
            logger.warning("stage %d: no labelled input to fit the fusion on; its defaults stay", stage)
            continue
        stages[stage] = fit_stage_fusion(stage, stage_rows, risk / len(SET_STAGES))
    return Fusion(stages=stages, on_disagreement=on_disagreement, calibrated=True)
