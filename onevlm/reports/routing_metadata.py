"""``metadata.json``: the routing outcome per series, for a MONAI Deploy Workflow Manager to branch on.

Research use only: not for clinical use.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

DECISIONS_FILE = "decisions.jsonl"
METADATA_FILE = "metadata.json"


def series_entry(decision: Mapping[str, Any] | None, *, study_instance_uid: str, series_instance_uid: str,
                 dicom_modality: str, input_file: str | None = None, skipped: str | None = None,
                 sr_file: str | None = None, box_file: str | None = None,
                 execution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One series' entry: the router's answers, per-stage confidence, where it stopped, the card's result.

    ``decision`` is a :meth:`RoutingDecision.as_dict` record (``None`` for a skipped series);
    ``execution`` a :meth:`SpecialtyResult.as_dict` record when a specialty model was asked.
    """
    decision = decision or {}
    reference = decision.get("reference") or {}
    stages = decision.get("stages") or []
    stage_confidence: dict[str, float | None] = {"1": None, "2": None, "3": None}
    for stage in stages:
        stage_confidence[str(stage["stage"])] = stage["confidence"]
    routed = bool(decision.get("model_card_id"))
    return {
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "dicom_modality": dicom_modality,
        "routed_sop_instance_uid": reference.get("sop_instance_uid"),
        "input": reference.get("file") or input_file,
        "modality": decision.get("modality"),
        "finding": decision.get("finding"),
        "model_card_id": decision.get("model_card_id"),
        "confidence": decision.get("confidence"),
        "stage_confidence": stage_confidence,
        "stopped_early": bool(decision.get("stopped_early", False)),
        "stopped_at_stage": None if routed or not stages else stages[-1]["stage"],
        "stop_reason": decision.get("stop_reason"),
        "error": decision.get("error"),
        "skipped": skipped,
        "sr_file": sr_file,
        "box_file": box_file,
        "execution": dict(execution) if execution is not None else None,
        "not_for_clinical_use": True,
    }


def build_metadata(entries: Sequence[Mapping[str, Any]], problems: Iterable[Mapping[str, str]] = ()) -> dict[str, Any]:
    """The ``metadata.json`` document: a flag, counts, one entry per series, unreadable files."""
    entries = list(entries)
    problems = list(problems)
    return {
        "not_for_clinical_use": True,
        "study_instance_uids": sorted({e["study_instance_uid"] for e in entries}),
        "series": len(entries),
        "routed": sum(1 for e in entries if e["model_card_id"]),
        "skipped": sum(1 for e in entries if e["skipped"]),
        "errors": sum(1 for e in entries if e["error"]) + len(problems),
        # top level, because workflow conditions read only top-level values of metadata.json
        "model_card_ids": sorted({e["model_card_id"] for e in entries if e["model_card_id"]}),
        "executed": sum(1 for e in entries if (e.get("execution") or {}).get("status") == "executed"),
        "entries": entries,
        "problems": problems,
    }
