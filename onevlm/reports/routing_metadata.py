"""``metadata.json`` (the study's outcome, flat) and ``series.json`` (the outcome per series).

``metadata.json`` is for a MONAI Deploy Workflow Manager to branch on. Its Argo plug-in reads
the file into a flat ``Dictionary<string, object>`` and stores it before any condition runs;
conditions read top-level keys only and compare them as strings (a missing key is ``NULL``).
So ``metadata.json`` holds scalars only, and never a JSON ``null``: the WM's parser fails a
condition on one, whereas a missing key is its documented ``NULL``. The lists (one entry per
series, unreadable files, study UIDs, card IDs) are in ``series.json`` next to it, which
``metadata.json`` names in ``detail_file``.

Research use only: not for clinical use.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

DECISIONS_FILE = "decisions.jsonl"
METADATA_FILE = "metadata.json"
DETAIL_FILE = "series.json"

#: A value of ``metadata.json``: what a workflow condition can compare.
Scalar = str | int | float | bool


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

    What the router read: ``consulted`` per stage that ran (``["header"]``, ``["pixels"]``,
    ``["header", "pixels"]``, ``[]`` for text only; ``None`` where the stage did not say),
    ``vlm_calls`` (all stages; 0 for a skipped series; ``None`` when unknown: see
    :func:`known_vlm_calls`) and ``disagreement``: the header and the image contradicting
    each other, in words, else ``None``.
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
    consulted = [stage.get("consulted") for stage in stages]
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
        "vlm_calls": 0 if skipped else known_vlm_calls(decision),
        "consulted": consulted,
        "disagreement": decision.get("disagreement"),
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


def known_vlm_calls(decision: Mapping[str, Any]) -> int | None:
    """A decision record's VLM calls, or ``None`` when the record cannot tell.

    A record written before the count existed has no ``vlm_calls``; one whose stages all lack a
    consultation record (a backend that did not say what it read) counts 0 without meaning it.
    """
    stages = decision.get("stages") or []
    if "vlm_calls" not in decision or (stages and all(s.get("consulted") is None for s in stages)):
        return None
    return int(decision["vlm_calls"])


def build_metadata(entries: Sequence[Mapping[str, Any]], problems: Iterable[Mapping[str, str]] = (),
                   calibration: Mapping[str, Any] | None = None) -> dict[str, Scalar]:
    """The ``metadata.json`` document: the study's outcome and counts, scalars only.

    ``outcome`` is the most urgent of its series' outcomes (in :data:`OUTCOME_URGENCY` order),
    ``needs_review`` whether a series went to review or failed (or a file was unreadable),
    ``with_cards`` the number of series routed to a card or a set, ``cards`` the chosen card
    IDs (sorted, comma-separated; empty when none), ``confidence`` the lowest route confidence
    among the routed series, ``calibrated`` whether every decided series' probabilities were
    calibrated, and ``study_instance_uid`` the study when the output holds exactly one
    (``studies`` counts them). ``detail_file`` names the :func:`build_detail` document.

    What the router read: ``vlm_calls`` the VLM calls over the study's series (0 for the
    embedded router, which reads headers only), ``series_without_vlm`` the decided series
    (neither skipped nor failed) decided without any VLM call (every one of the embedded
    router's; the hybrid router's where the header decided alone), and ``disagreements`` the
    series whose header and image disagree.

    A value that does not exist (``confidence`` with nothing routed, ``calibration_id`` when
    uncalibrated, ``study_instance_uid`` with several studies, ``vlm_calls`` and
    ``series_without_vlm`` when a series' decision record does not count its calls) is left out
    rather than written as ``null``: a workflow condition reads a missing key as ``NULL``.
    """
    entries = list(entries)
    problems = list(problems)
    outcomes = [e["outcome"] for e in entries] + (["failed"] if problems else [])  # an unreadable file failed
    outcome = next((o for o in OUTCOME_URGENCY if o in outcomes), "skipped")
    cards = sorted({c for e in entries for c in e["cards"]})
    routed = [e for e in entries if e["cards"]]
    confidences = [e["confidence"] for e in routed if e["confidence"] is not None]
    decided = [e for e in entries if not e["skipped"] and not e["error"]]
    studies = sorted({e["study_instance_uid"] for e in entries})
    calls = [e.get("vlm_calls") for e in entries]
    calls_known = all(c is not None for c in calls)
    document: dict[str, Scalar | None] = {
        "not_for_clinical_use": True,
        "detail_file": DETAIL_FILE,
        "studies": len(studies),
        "study_instance_uid": studies[0] if len(studies) == 1 else None,
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
        "unreadable": len(problems),
        "executed": sum(1 for e in entries for x in e["executions"] if x.get("status") == "executed"),
        "vlm_calls": sum(calls) if calls_known else None,
        "series_without_vlm": sum(1 for e in decided if e.get("vlm_calls") == 0) if calls_known else None,
        "disagreements": sum(1 for e in entries if e.get("disagreement")),
    }
    return {key: value for key, value in document.items() if value is not None}


def build_detail(entries: Sequence[Mapping[str, Any]], problems: Iterable[Mapping[str, str]] = ()) -> dict[str, Any]:
    """The ``series.json`` document: the structured detail that ``metadata.json`` cannot hold.

    ``entries`` (one :func:`series_entry` per series), ``problems`` (unreadable files: ``file``
    and ``error``), ``study_instance_uids`` and ``model_card_ids`` (both sorted).
    """
    entries = [dict(e) for e in entries]
    return {
        "not_for_clinical_use": True,
        "metadata_file": METADATA_FILE,
        "study_instance_uids": sorted({e["study_instance_uid"] for e in entries}),
        "model_card_ids": sorted({c for e in entries for c in e["cards"]}),
        "entries": entries,
        "problems": [dict(p) for p in problems],
    }
