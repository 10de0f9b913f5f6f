"""``onevlm router evaluate``: per-stage accuracy, final accuracy and ECE, baseline versus cutoff.

The baseline always keeps the first answer; the cutoff router applies Algorithm 1 with the
given (or fitted) cutoffs. Both runs share one set of backend answers (stage answers are cached
per input, stage and structured fields), so the comparison isolates the selector.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from onevlm.calibration.cutoffs import Cutoffs, fit_cutoffs
from onevlm.calibration.ece import EceResult, expected_calibration_error
from onevlm.calibration.reliability import plot_reliability
from onevlm.cards.repository import CardRepository
from onevlm.router.backend import RouterBackend
from onevlm.router.caching import CachingBackend
from onevlm.router.decision import RoutingDecision
from onevlm.router.decision_log import DecisionLog
from onevlm.router.labels import (  # noqa: F401  (read_labels, LABEL_COLUMNS: this module's public names too)
    LABEL_COLUMNS,
    UNLABELLED,
    LabelledInput,
    cutoff_rows,
    gold_answer,
    labelled_inputs,
    read_labels,
    same_answer,
)
from onevlm.router.pipeline import Router
from onevlm.router.runner import route_files
from onevlm.router.site_calibration import calibrate_rows, fit_router_calibration, heldout_report

logger = logging.getLogger(__name__)

@dataclass
class MethodReport:
    """Scores of one method (baseline or cutoff) over the labelled set."""

    name: str
    cutoffs: dict[str, float | None]
    stage_correct: dict[int, int] = field(default_factory=dict)
    stage_total: dict[int, int] = field(default_factory=dict)
    final_correct: int = 0
    final_n: int = 0
    n: int = 0
    failed: int = 0
    ece: EceResult | None = None

    def accuracy(self, stage: int) -> float | None:
        total = self.stage_total.get(stage, 0)
        return self.stage_correct.get(stage, 0) / total if total else None

    @property
    def final_accuracy(self) -> float | None:
        return self.final_correct / self.final_n if self.final_n else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoffs": self.cutoffs,
            "stage_accuracy": {
                str(s): {"accuracy": self.accuracy(s), "n": self.stage_total.get(s, 0)} for s in (1, 2, 3)
            },
            "final_accuracy": self.final_accuracy,
            "final_n": self.final_n,
            "n": self.n,
            "failed": self.failed,
            "ece": self.ece.ece if self.ece else None,
            "ece_bins": self.ece.as_dict()["bins"] if self.ece else None,
        }


def score(name: str, rows: Sequence[LabelledInput], decisions: Sequence[RoutingDecision], cutoffs: Cutoffs) -> tuple[MethodReport, list[tuple[float, int]]]:
    """Per-stage accuracy over the inputs where that stage ran, final accuracy over all inputs."""
    report = MethodReport(name=name, cutoffs=cutoffs.as_dict())
    predictions: list[tuple[float, int]] = []
    for row, decision in zip(rows, decisions):
        report.n += 1
        if decision.error:
            report.failed += 1
        for stage in decision.stages:
            gold = gold_answer(row, stage.stage)
            if not gold:
                continue
            report.stage_total[stage.stage] = report.stage_total.get(stage.stage, 0) + 1
            report.stage_correct[stage.stage] = report.stage_correct.get(stage.stage, 0) + int(same_answer(stage.chosen, gold))
        if row.card == UNLABELLED:
            continue
        report.final_n += 1
        correct = int(same_answer(decision.final_label, row.card))
        report.final_correct += correct
        if decision.final_confidence is not None:
            predictions.append((decision.final_confidence, correct))
    if predictions:
        report.ece = expected_calibration_error([c for c, _ in predictions], [k for _, k in predictions])
    return report, predictions


def evaluate(
    labels_csv: str | Path,
    cards: CardRepository,
    backend: RouterBackend,
    out_dir: str | Path,
    cutoffs: Cutoffs | None = None,
    fit: bool = False,
    batch_size: int = 8,
    calibration=None,
    holdout: float | None = None,
    risk: float = 0.1,
    delta: float = 0.1,
    seed: int = 0,
    on_disagreement: str = "review",
) -> dict[str, Any]:
    """Run baseline and cutoff routing over LABELS.csv and write the report to ``out_dir``.

    Writes ``summary.json``, ``summary.md`` (tables 2 and 3 of the paper), the two decision
    logs, ``cutoff_rows.csv`` (Algorithm 2 input), prediction CSVs and ``reliability.png``.
    With ``fit=True`` the cutoffs are fitted on these same rows (an in-sample fit, so stated).

    Calibration (section 5): with ``calibration`` (a :class:`SiteCalibration` fitted elsewhere)
    every row is held out; with ``holdout`` a calibration is fitted on the other rows
    (``calibration.json``) and measured on that share. Either way ``summary.json`` gains
    ``calibration`` (per-stage ECE before/after temperature scaling, coverage and mean set size
    against α, selective accuracy and share routed, AURC) and the plots are written.
    """
    with labelled_inputs(labels_csv, backend) as rows:
        return _evaluate_rows(rows, labels_csv, cards, backend, out_dir, cutoffs, fit, batch_size, calibration,
                              holdout, risk, delta, seed, on_disagreement)


def _evaluate_rows(rows: Sequence[LabelledInput], labels_csv: str | Path, cards: CardRepository,
                   backend: RouterBackend, out_dir: str | Path, cutoffs: Cutoffs | None, fit: bool, batch_size: int,
                   calibration, holdout: float | None, risk: float, delta: float, seed: int,
                   on_disagreement: str = "review") -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cached = CachingBackend(backend)

    def run(method_cutoffs: Cutoffs, log_name: str) -> list[RoutingDecision]:
        router = Router(cards, cached, method_cutoffs)
        decisions = []
        with DecisionLog(out / log_name) as log:
            for decision in route_files(router, [r.path for r in rows], batch_size=batch_size):
                log.write(decision)
                decisions.append(decision)
        return decisions

    (out / "decisions_baseline.jsonl").unlink(missing_ok=True)
    (out / "decisions_cutoff.jsonl").unlink(missing_ok=True)
    baseline_decisions = run(Cutoffs(), "decisions_baseline.jsonl")
    training_rows = cutoff_rows(rows, baseline_decisions)
    with (out / "cutoff_rows.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "p2", "label"])
        for r in training_rows:
            writer.writerow([r.stage, repr(r.p2), r.label])
    fits = {}
    if fit:
        if not training_rows:
            raise ValueError("no rows with two candidates to fit cutoffs on")
        fits = fit_cutoffs(training_rows)
        cutoffs = Cutoffs.from_fits(fits)
        (out / "cutoffs.json").write_text(json.dumps({str(s): f.as_dict() for s, f in fits.items()}, indent=2))
    if cutoffs is None and calibration is not None:
        cutoffs = calibration.cutoffs()
    cutoffs = cutoffs or Cutoffs()
    cutoff_decisions = run(cutoffs, "decisions_cutoff.jsonl")
    calibration_summary = _calibration_report(cards, cached, rows, cutoff_decisions, cutoffs, out, calibration,
                                              holdout, risk, delta, seed, str(labels_csv), backend, batch_size,
                                              on_disagreement)

    baseline, base_pred = score("baseline", rows, baseline_decisions, Cutoffs())
    with_cutoff, cut_pred = score("cutoff", rows, cutoff_decisions, cutoffs)
    for name, preds in (("baseline", base_pred), ("cutoff", cut_pred)):
        with (out / f"predictions_{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["confidence", "correct"])
            writer.writerows((repr(c), k) for c, k in preds)
    plots = {}
    has_cutoffs = any(v is not None for v in cutoffs.as_dict().values())
    curves = {"baseline (no cutoff)": baseline.ece} if baseline.ece else {}
    if has_cutoffs and with_cutoff.ece:  # without cutoffs the cutoff run is the baseline: one curve
        curves["cutoff"] = with_cutoff.ece
    if curves:
        plots["reliability"] = str(
            plot_reliability(
                curves,
                out / "reliability.png",
                f"Reliability — {Path(labels_csv).name}: {baseline.final_n} of {len(rows)} inputs have a final label",
            )
        )
    summary = {
        "labels": str(labels_csv),
        "n": len(rows),
        "backend": backend.identity(),
        "cutoffs_fitted_in_sample": fit,
        "fits": {str(s): f.as_dict() for s, f in fits.items()},
        "baseline": baseline.as_dict(),
        "cutoff": with_cutoff.as_dict(),
        "plots": plots,
        "calibration": calibration_summary,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(baseline, with_cutoff, len(rows), fit)
                                    + calibration_markdown(calibration_summary))
    return summary


def _calibration_report(cards, backend, rows, decisions, cutoffs, out: Path, calibration, holdout, risk, delta,
                        seed, source, uncached=None, batch_size: int = 8,
                        on_disagreement: str = "review") -> dict[str, Any] | None:
    if calibration is None and not holdout:
        return None
    router = Router(cards, backend, cutoffs)
    if calibration is None and getattr(uncached, "name", None) == "hybrid":
        # the fusion is fitted on both sources of every input: the calibration routes them itself
        calibration = calibrate_rows(rows, source, cards, uncached, risk, delta, holdout, seed, None, None, out,
                                     batch_size, on_disagreement)
        calibration.save(out / "calibration.json")
        return {"calibration_id": calibration.calibration_id,
                "scope": f"fitted on {calibration.fitted.get('fit')} rows, measured on the "
                         f"{calibration.fitted.get('holdout')} held out",
                "risk": calibration.risk, "delta": calibration.delta, "policy": calibration.settings.policy,
                "heldout": calibration.heldout}
    if calibration is None:
        calibration, held = fit_router_calibration(decisions, rows, router.modality_cards, router.identity, risk,
                                                   delta, holdout, seed, source=source, cutoffs=cutoffs)
        calibration.save(out / "calibration.json")
        scope = f"fitted on {calibration.fitted.get('fit')} rows, measured on the {len(held)} held out"
    else:
        calibration.check_compatible(router.identity)
        held = list(range(len(rows)))
        scope = "fitted elsewhere; every row here is held out"
    report = heldout_report([decisions[i] for i in held], [rows[i] for i in held], calibration,
                            router.modality_cards, out)
    return {"calibration_id": calibration.calibration_id, "scope": scope, "risk": calibration.risk,
            "delta": calibration.delta, "policy": calibration.settings.policy, "heldout": report}


def calibration_markdown(summary: dict[str, Any] | None) -> str:
    """The calibration section of ``summary.md`` (empty without a calibration)."""
    if not summary:
        return ""
    report = summary["heldout"]
    lines = ["", f"## Calibration {summary['calibration_id']} ({summary['scope']})", "",
             f"Risk α = {summary['risk']}, δ = {summary['delta']}, policy {summary['policy']}.", "",
             "| Stage | n | ECE before | ECE after | coverage (target) | mean set size |", "|---|---|---|---|---|---|"]
    for stage, figures in sorted(report["stages"].items()):
        coverage = figures.get("coverage") or {}
        target = f" (≥ {1 - coverage['alpha']:.3f})" if coverage else ""
        lines.append(f"| {stage} | {figures.get('n', 0)} | {_fmt(figures.get('ece_before'))} | "
                     f"{_fmt(figures.get('ece_after'))} | {_fmt(coverage.get('coverage'))}{target} | "
                     f"{_fmt(coverage.get('mean_set_size'))} |")
    route = report.get("route") or {}
    if route:
        lines += ["", f"Route (n = {route['n']}): outcomes {route['outcomes']}; routed sets cover the labelled card in "
                      f"{_fmt(route.get('routed_coverage'))} of routed cases, marginal coverage "
                      f"{_fmt(route.get('marginal_coverage'))} (review counts as covered); mean set size "
                      f"{_fmt(route.get('mean_set_size'))}; AURC {route.get('aurc')}."]
        selective = route.get("selective")
        if selective:
            lines.append(f"Selective threshold {selective.get('threshold')}: {selective.get('routed')} routed, accuracy "
                         f"{_fmt(selective.get('selective_accuracy'))}.")
    lines.append("")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def summary_markdown(baseline: MethodReport, cutoff: MethodReport, n: int, fitted: bool) -> str:
    """Tables 2 and 3 of the paper for this run."""
    names = {1: "Stage 1 — Modality", 2: "Stage 2 — Disease", 3: "Stage 3 — Final"}
    lines = [
        f"# Router evaluation (n = {n})",
        "",
        "Research use only. Per-stage accuracy counts the inputs where the stage ran and the label names that "
        "stage's answer (n per stage).",
        f"Final accuracy and ECE count the {baseline.final_n} of {n} inputs whose card label is not '?' "
        "(an empty card label means the right answer is None); the paper's answer (stage 3's card or None) is scored, "
        "with the backend's probability of it (uncalibrated), as in the paper's table 3.",
        f"Cutoffs: {cutoff.cutoffs}" + (" (fitted on these rows: in-sample)" if fitted else ""),
        "",
        "| Stage / Task | n | Baseline acc | Cutoff acc |",
        "|---|---|---|---|",
    ]
    for s in (1, 2, 3):
        lines.append(f"| {names[s]} | {baseline.stage_total.get(s, 0)} | {_fmt(baseline.accuracy(s))} | {_fmt(cutoff.accuracy(s))} |")
    lines += [
        "",
        "| Method | Final accuracy | ECE (10 right-closed bins) |",
        "|---|---|---|",
        f"| Baseline (no cutoff) | {_fmt(baseline.final_accuracy)} | {_fmt(baseline.ece.ece if baseline.ece else None)} |",
        f"| Cutoff | {_fmt(cutoff.final_accuracy)} | {_fmt(cutoff.ece.ece if cutoff.ece else None)} |",
        "",
    ]
    return "\n".join(lines)
