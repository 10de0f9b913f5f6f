"""``metadata.json``: the routing outcome per series, for a MONAI Deploy Workflow Manager to branch on.

Research use only: not for clinical use.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

DECISIONS_FILE = "decisions.jsonl"
METADATA_FILE = "metadata.json"


#: Study-level outcome: the most urgent of its series' outcomes, in this order.
OUTCOME_URGENCY = ("review", "failed", "routed-set", "routed", "stopped", "skipped")


def series_entry(decision: Mapping[str, Any] | None, *, study_instance_uid: str, series_instance_uid: str,
                 dicom_modality: str, input_file: str | None = None, skipped: str | None = None,
                 sr_file: str | None = None, box_file: str | None = None,
                 executions: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One series' entry: outcome, card(s), route confidence, stage probabilities, the cards' results.

    ``decision`` is a :meth:`RoutingDecision.as_dict` record (``None`` for a skipped series);
    ``executions`` the :meth:`SpecialtyResult.as_dict` records of the routed card(s) when a
    specialty model was asked. Stage probabilities are the calibrated ones where the router was
    calibrated (``calibrated``); stage 2's is ``None`` when it had no evidence.
    """
    decision = decision or {}
    reference = decision.get("reference") or {}
    stages = decision.get("stages") or []
    route = decision.get("route") or {}
    assessed = {a["stage"]: a for a in route.get("stages") or []}
    stage_confidence: dict[str, float | None] = {"1": None, "2": None, "3": None}
    for stage in stages:
        if stage["stage"] == 2 and not stage.get("informative", True):
            continue
        stage_confidence[str(stage["stage"])] = (assessed.get(stage["stage"]) or {}).get("p", stage["confidence"])
    outcome = "skipped" if skipped else (decision.get("outcome") or ("failed" if decision.get("error") else "review"))
    routed = bool(decision.get("cards"))
    return {
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "dicom_modality": dicom_modality,
        "routed_sop_instance_uid": reference.get("sop_instance_uid"),
        "input": reference.get("file") or input_file,
        "modality": decision.get("modality"),
        "finding": decision.get("finding"),
        "outcome": outcome,
        "needs_review": outcome == "review",
        "cards": list(decision.get("cards") or []),
        "model_card_id": decision.get("model_card_id"),
        "confidence": decision.get("confidence"),
        "calibrated": bool(decision.get("calibrated")),
        "reasons": list(route.get("reasons") or []),
        "stage_confidence": stage_confidence,
        "stopped_early": bool(decision.get("stopped_early", False)),
        "stopped_at_stage": None if routed or not stages else stages[-1]["stage"],
        "stop_reason": decision.get("stop_reason"),
        "error": decision.get("error"),
        "skipped": skipped,
        "sr_file": sr_file,
        "box_file": box_file,
        "executions": [dict(e) for e in executions or ()],
        "not_for_clinical_use": True,
    }


def build_metadata(entries: Sequence[Mapping[str, Any]], problems: Iterable[Mapping[str, str]] = (),
                   calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``metadata.json`` document: a flag, counts, the study's outcome, one entry per series.

    Workflow conditions read only top-level scalars, so the study's outcome is there too:
    ``outcome`` (the most urgent of its series', in :data:`OUTCOME_URGENCY` order),
    ``needs_review`` (a series went to review, or failed), ``with_cards`` (series routed to a
    card or a set), ``cards`` (comma-separated), ``confidence`` (the lowest route confidence
    among the routed series) and ``calibrated`` (every decided series' probabilities calibrated).
    """
    entries = list(entries)
    problems = list(problems)
    outcomes = [e["outcome"] for e in entries] + (["failed"] if problems else [])  # an unreadable file failed
    outcome = next((o for o in OUTCOME_URGENCY if o in outcomes), "skipped")
    cards = sorted({c for e in entries for c in e["cards"]})
    routed = [e for e in entries if e["cards"]]
    confidences = [e["confidence"] for e in routed if e["confidence"] is not None]
    decided = [e for e in entries if not e["skipped"] and not e["error"]]
    return {
        "not_for_clinical_use": True,
        "study_instance_uids": sorted({e["study_instance_uid"] for e in entries}),
        # top level, because workflow conditions read only top-level values of metadata.json
        "outcome": outcome,
        "needs_review": any(o in ("review", "failed") for o in outcomes) or bool(problems),
        "with_cards": len(routed),
        "cards": ",".join(cards),
        "confidence": min(confidences) if confidences else None,
        "calibrated": bool(decided) and all(e["calibrated"] for e in decided),
        "calibration_id": (calibration or {}).get("calibration_id"),
        "series": len(entries),
        "routed": sum(1 for e in entries if e["outcome"] == "routed"),
        "routed_sets": sum(1 for e in entries if e["outcome"] == "routed-set"),
        "reviews": sum(1 for e in entries if e["outcome"] == "review"),
        "skipped": sum(1 for e in entries if e["skipped"]),
        "errors": sum(1 for e in entries if e["error"]) + len(problems),
        "model_card_ids": cards,
        "executed": sum(1 for e in entries for x in e["executions"] if x.get("status") == "executed"),
        "entries": entries,
        "problems": problems,
    }
