"""Write a routed study's results: routing SRs, box objects, decisions.jsonl, metadata.json and series.json.

With a specialty model (route -> execute) each routed series' SR also carries its card's result
or the reason the card did not run, detected boxes become a SEG (or bulk annotations for a
slide), and the result is in the series' ``decisions.jsonl`` record and ``series.json`` entry.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pydicom
from pydicom.uid import generate_uid

from onevlm.disk_full import is_disk_full
from onevlm.cards.repository import CardRepository
from onevlm.reports.box_seg import build_box_seg
from onevlm.reports.bulk_annotations import build_box_annotations
from onevlm.reports.routing_metadata import (DECISIONS_FILE, DETAIL_FILE, METADATA_FILE, build_detail, build_metadata,
                                             series_entry)
from onevlm.reports.boxes import ImageBox
from onevlm.reports.routing_sr import build_routing_sr
from onevlm.specialty.execution import SpecialtyResult
from onevlm.study.preparation import is_whole_slide_series
from onevlm.study.execution import StudyExecution
from onevlm.study.result_versions import FirstVersions, ResultVersions
from onevlm.study.routing import SeriesRouting, StudyRouting

logger = logging.getLogger(__name__)

SR_FOLDER = "sr"
SEG_FOLDER = "seg"
ANNOTATION_FOLDER = "annotations"


@dataclass(frozen=True)
class StudyOutputs:
    """What was written: SR and box files by series UID, and the summary files with their content.

    ``metadata`` is ``metadata.json`` (flat: the study's outcome and counts, for workflow
    conditions); ``detail`` is ``series.json`` (``entries`` per series, ``problems``, study UIDs,
    card IDs): see :mod:`onevlm.reports.routing_metadata`.
    """

    sr_files: dict[str, Path]
    box_files: dict[str, Path]
    decisions_file: Path
    metadata_file: Path
    metadata: dict
    detail_file: Path
    detail: dict


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save(dataset: pydicom.Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    tmp = path.with_name(f".{path.name}.tmp")
    dataset.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path


def sr_evidence(result: SeriesRouting) -> list[pydicom.Dataset]:
    """The routing SR's evidence: the routed instance's dataset first (the SR takes its patient and study
    from it), then each other instance of the series as its reference needs it — Study, Series, SOP
    Instance and SOP Class UIDs, from the header the router parsed, so no file is parsed a second time."""
    assert result.routed is not None
    routed = result.routed.dataset
    if routed is None:
        routed = pydicom.dcmread(result.routed.path, stop_before_pixels=True)
    evidence = [routed]
    for member in result.series.members:
        header = member.header
        if header.sop_instance_uid == result.routed.header.sop_instance_uid:
            continue
        reference = pydicom.Dataset()
        reference.StudyInstanceUID = header.study_instance_uid
        reference.SeriesInstanceUID = header.series_instance_uid
        reference.SOPInstanceUID = header.sop_instance_uid
        reference.SOPClassUID = header.sop_class_uid
        evidence.append(reference)
    return evidence


def write_series_sr(result: SeriesRouting, out_dir: Path, cards: CardRepository | None = None,
                    boxes: Sequence[ImageBox] = (), executions: Sequence[SpecialtyResult] = (),
                    versions: ResultVersions | None = None) -> Path:
    """Build and write the routing SR of one routed series (with its boxes and specialty results).

    ``versions`` decides its identity: the first version's, or an amendment of an earlier one.
    """
    assert result.decision is not None and result.routed is not None
    evidence = sr_evidence(result)
    routed = evidence[0]
    captions = {c.id: c.task_caption for c in cards} if cards is not None else None

    def build(uid: str | None = None, previous: Sequence[pydicom.Dataset] = ()):
        return build_routing_sr(result.decision, evidence, routed, boxes=boxes, card_captions=captions,
                                executions=executions, sop_instance_uid=uid, previous_versions=previous)

    return _save((versions or FirstVersions()).settle(SR_FOLDER, build(), build), out_dir / SR_FOLDER)


def write_box_objects(result: SeriesRouting, boxes: Sequence[ImageBox], out_dir: Path,
                      versions: ResultVersions | None = None) -> Path:
    """Write a series' boxes as a SEG (radiology, endoscopy) or bulk annotations (whole slides)."""
    assert result.routed is not None
    versions = versions or FirstVersions()
    if is_whole_slide_series(result.series):
        source = pydicom.dcmread(result.routed.path, stop_before_pixels=True)
        first_uid = generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "onevlm-box-annotations"])

        def annotations(uid: str, previous: Sequence[pydicom.Dataset] = ()):
            return build_box_annotations(source, boxes, sop_instance_uid=uid)  # no predecessor attribute in this IOD

        return _save(versions.settle(ANNOTATION_FOLDER, annotations(first_uid), annotations),
                     out_dir / ANNOTATION_FOLDER)
    source = pydicom.dcmread(result.routed.path)

    def seg(uid: str | None = None, previous: Sequence[pydicom.Dataset] = ()):
        return build_box_seg(source, boxes, sop_instance_uid=uid)  # no predecessor attribute in this IOD

    return _save(versions.settle(SEG_FOLDER, seg(), seg), out_dir / SEG_FOLDER)


def write_study_outputs(study: StudyRouting, out_dir: str | Path, cards: CardRepository | None = None,
                        boxes: Mapping[str, Sequence[ImageBox]] | None = None,
                        execution: StudyExecution | None = None,
                        versions: ResultVersions | None = None) -> StudyOutputs:
    """Write SRs, box objects, ``decisions.jsonl``, ``metadata.json`` and ``series.json`` into ``out_dir``.

    ``versions`` decides each result object's identity (default: the first version's; the listener
    service amends what it sent before: :mod:`onevlm.study.result_versions`).

    ``boxes`` maps a series UID to boxes on its routed image: they go into that series' SR and
    into a SEG or bulk-annotation object. ``execution`` holds the specialty results per series,
    one per routed card (and their boxes, which join ``boxes``). A series whose objects cannot
    be built gets the error in its ``series.json`` entry; the others go on.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    boxes = dict(boxes or {})
    results = execution.results if execution is not None else {}
    if execution is not None:
        for uid, found in execution.boxes.items():
            boxes[uid] = (*boxes.get(uid, ()), *found)
    sr_files: dict[str, Path] = {}
    box_files: dict[str, Path] = {}
    entries = []
    lines = []
    for result in study.series:
        series = result.series
        record = result.decision.as_dict() if result.decision is not None else None
        sr_file = box_file = None
        series_boxes = boxes.get(series.series_instance_uid, ())
        specialty = results.get(series.series_instance_uid, ())
        if record is not None and specialty:
            record["executions"] = [r.as_dict() for r in specialty]
        # A series that could not be routed (its image unreadable…) gets an SR saying so: a missing result must
        # not read as "the AI found nothing".
        if record is not None and (record["error"] is None or result.routed is not None):
            try:
                path = write_series_sr(result, out, cards, series_boxes, specialty, versions)
                sr_files[series.series_instance_uid] = path
                sr_file = str(path.relative_to(out))
                if series_boxes and record["error"] is None:
                    box_path = write_box_objects(result, series_boxes, out, versions)
                    box_files[series.series_instance_uid] = box_path
                    box_file = str(box_path.relative_to(out))
            except Exception as exc:
                if is_disk_full(exc):  # not this series' fault: the caller waits for space and writes it all again
                    raise
                problem = f"result objects could not be written: {type(exc).__name__}: {exc}"
                record["error"] = f"{record['error']}; {problem}" if record["error"] else problem
                logger.error("series %s: %s", series.series_instance_uid, record["error"])
        if record is not None:
            lines.append(json.dumps(record, ensure_ascii=False))
        entries.append(series_entry(record, study_instance_uid=series.study_instance_uid,
                                    series_instance_uid=series.series_instance_uid,
                                    dicom_modality=series.modality, input_file=series.members[0].path.name,
                                    skipped=result.skipped, sr_file=sr_file,
                                    box_file=box_file, executions=record.get("executions") if record else None))
    problems = [{"file": p.path.name, "error": p.message} for p in study.problems]
    calibration = next((r.decision.outcome.calibration for r in study.series
                        if r.decision is not None and r.decision.outcome is not None and r.decision.outcome.calibration), None)
    metadata = build_metadata(entries, problems, calibration)
    detail = build_detail(entries, problems)
    decisions_file = out / DECISIONS_FILE
    metadata_file = out / METADATA_FILE
    detail_file = out / DETAIL_FILE
    _atomic_write(decisions_file, "".join(line + "\n" for line in lines))
    # the detail first: whoever sees metadata.json can read the series.json it names
    _atomic_write(detail_file, json.dumps(detail, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(metadata_file, json.dumps(metadata, indent=2) + "\n")
    return StudyOutputs(sr_files, box_files, decisions_file, metadata_file, metadata, detail_file, detail)
