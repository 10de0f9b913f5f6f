"""``metadata.json``: the routing outcome per input, for a MONAI Deploy Workflow Manager to branch on.

Research use only: not for clinical use.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

DECISIONS_FILE = "decisions.jsonl"
METADATA_FILE = "metadata.json"


def metadata_entry(decision: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of one decision dict that a workflow manager can branch on."""
    reference = decision.get("reference") or {}
    stage_confidence: dict[str, float | None] = {"1": None, "2": None, "3": None}
    for stage in decision.get("stages") or ():
        stage_confidence[str(stage["stage"])] = stage["confidence"]
    return {
        "input": decision.get("input"),
        "sop_instance_uid": reference.get("sop_instance_uid"),
        "series_instance_uid": reference.get("series_instance_uid"),
        "study_instance_uid": reference.get("study_instance_uid"),
        "modality": decision.get("modality"),
        "finding": decision.get("finding"),
        "model_card_id": decision.get("model_card_id"),
        "confidence": decision.get("confidence"),
        "stage_confidence": stage_confidence,
        "stopped_early": decision.get("stopped_early", False),
        "stop_reason": decision.get("stop_reason"),
        "error": decision.get("error"),
        "not_for_clinical_use": True,
    }


def build_metadata(decisions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``metadata.json`` document: a flag, counts and one entry per routed input."""
    entries = [metadata_entry(d) for d in decisions]
    return {
        "not_for_clinical_use": True,
        "count": len(entries),
        "routed": sum(1 for e in entries if e["model_card_id"]),
        "errors": sum(1 for e in entries if e["error"]),
        "inputs": entries,
    }
