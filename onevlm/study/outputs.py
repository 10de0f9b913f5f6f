"""Write a routed study's results: one routing SR per routed series, decisions.jsonl, metadata.json."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom

from onevlm.cards.repository import CardRepository
from onevlm.reports.routing_metadata import DECISIONS_FILE, METADATA_FILE, build_metadata, series_entry
from onevlm.reports.routing_sr import build_routing_sr
from onevlm.study.routing import SeriesRouting, StudyRouting

logger = logging.getLogger(__name__)

SR_FOLDER = "sr"


@dataclass(frozen=True)
class StudyOutputs:
    """What was written: SR files by series UID, and the two summary files."""

    sr_files: dict[str, Path]
    decisions_file: Path
    metadata_file: Path
    metadata: dict


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_series_sr(result: SeriesRouting, out_dir: Path, cards: CardRepository | None = None) -> Path:
    """Build and write the routing SR of one routed series; returns its path."""
    assert result.decision is not None and result.routed is not None
    evidence = [pydicom.dcmread(m.path, stop_before_pixels=True) for m in result.series.members]
    routed = next(ds for ds in evidence if str(ds.SOPInstanceUID) == result.routed.header.sop_instance_uid)
    captions = {c.id: c.task_caption for c in cards} if cards is not None else None
    sr = build_routing_sr(result.decision, evidence, routed, card_captions=captions)
    folder = out_dir / SR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sr.SOPInstanceUID}.dcm"
    tmp = path.with_name(f".{path.name}.tmp")
    sr.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path


def write_study_outputs(study: StudyRouting, out_dir: str | Path, cards: CardRepository | None = None) -> StudyOutputs:
    """Write SRs, ``decisions.jsonl`` and ``metadata.json`` into ``out_dir`` (replacing earlier ones).

    A series whose SR cannot be built gets the error in its metadata entry; the others go on.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sr_files: dict[str, Path] = {}
    entries = []
    lines = []
    for result in study.series:
        series = result.series
        record = result.decision.as_dict() if result.decision is not None else None
        sr_file = None
        if record is not None and record["error"] is None:
            try:
                path = write_series_sr(result, out, cards)
                sr_files[series.series_instance_uid] = path
                sr_file = str(path.relative_to(out))
            except Exception as exc:
                record["error"] = f"routing SR could not be written: {type(exc).__name__}: {exc}"
                logger.error("series %s: %s", series.series_instance_uid, record["error"])
        if record is not None:
            lines.append(json.dumps(record, ensure_ascii=False))
        entries.append(series_entry(record, study_instance_uid=series.study_instance_uid,
                                    series_instance_uid=series.series_instance_uid,
                                    dicom_modality=series.modality, skipped=result.skipped, sr_file=sr_file))
    problems = [{"file": p.path.name, "error": p.message} for p in study.problems]
    metadata = build_metadata(entries, problems)
    decisions_file = out / DECISIONS_FILE
    metadata_file = out / METADATA_FILE
    _atomic_write(decisions_file, "".join(line + "\n" for line in lines))
    _atomic_write(metadata_file, json.dumps(metadata, indent=2) + "\n")
    return StudyOutputs(sr_files, decisions_file, metadata_file, metadata)
