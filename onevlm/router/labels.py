"""LABELS.csv: the site's labelled inputs (path, modality, finding, card) and how they are read.

A row may name a file (relative to the CSV) or a DICOMweb instance URL, fetched while in use.
The same rows feed ``onevlm router evaluate`` and ``onevlm calibrate fit``.
"""

from __future__ import annotations

import csv
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from onevlm.calibration.cutoffs import CutoffRow, label_for
from onevlm.inputs.dicomweb_source import DicomWebReference
from onevlm.router.backend import NONE, RouterBackend
from onevlm.router.decision import RoutingDecision

LABEL_COLUMNS = ("path", "modality", "finding", "card")
UNLABELLED = ""  # a "?" in the card column: no gold final answer


@dataclass(frozen=True)
class LabelledInput:
    """One row of LABELS.csv: an input and its gold answers per stage.

    ``source`` is a DICOMweb instance URL when the row names one (``path`` is then where
    :func:`fetch_labelled` put the fetched copy).
    """

    path: Path
    modality: str
    finding: str
    card: str
    source: str | None = None


def read_labels(path: str | Path) -> list[LabelledInput]:
    """Read LABELS.csv (columns path, modality, finding, card); paths are relative to the file.

    An empty ``card`` means the gold final answer is ``None``; ``?`` means the row has no final
    label (it counts for stage 1 and 2 only). An empty ``finding`` skips stage 2 for the row.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(LABEL_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        rows = []
        for line, record in enumerate(reader, start=2):
            if not (record.get("path") or "").strip():
                raise ValueError(f"{path}: line {line}: empty path")
            text = record["path"].strip()
            reference = DicomWebReference.parse(text)
            if reference is not None:
                if not reference.sop_instance_uid:
                    raise ValueError(f"{path}: line {line}: {text} names no instance; label one "
                                     ".../studies/UID/series/UID/instances/UID per row")
                rows.append(LabelledInput(path=Path(f"{reference.sop_instance_uid}.dcm"), source=text,
                                          **_answers(record)))
                continue
            target = Path(text)
            if (path.parent / target).is_dir():
                raise ValueError(f"{path}: line {line}: {target} is a folder; label one file per row")
            rows.append(LabelledInput(path=target if target.is_absolute() else path.parent / target, **_answers(record)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _answers(record: dict) -> dict[str, str]:
    card = (record["card"] or "").strip()
    return {"modality": (record["modality"] or "").strip(), "finding": (record["finding"] or "").strip(),
            "card": UNLABELLED if card == "?" else (card or NONE)}


def fetch_labelled(rows: Sequence[LabelledInput], folder: Path, metadata_only: bool) -> list[LabelledInput]:
    """Rows naming DICOMweb instances, fetched into ``folder`` (metadata only when no pixels are read)."""
    from dataclasses import replace

    from onevlm.inputs.dicomweb_source import fetch

    out = []
    for number, row in enumerate(rows):
        if row.source is None:
            out.append(row)
            continue
        (fetched,) = fetch(DicomWebReference.parse(row.source), folder / f"{number:05d}", metadata_only)
        out.append(replace(row, path=fetched))
    return out


def same_answer(a: str | None, b: str) -> bool:
    """Answers compare ignoring case and surrounding space (as labels are written by people)."""
    return a is not None and a.strip().lower() == b.strip().lower()


def gold_answer(row: LabelledInput, stage: int) -> str:
    """The labelled answer of a stage ('' when the row has none)."""
    return {1: row.modality, 2: row.finding, 3: row.card}[stage]


def cutoff_rows(rows: Sequence[LabelledInput], decisions: Sequence[RoutingDecision]) -> list[CutoffRow]:
    """Algorithm 2's training rows from baseline decisions: ``(stage, p2, FIRST|SECOND)``."""
    out = []
    for row, decision in zip(rows, decisions):
        for stage in decision.stages:
            gold = gold_answer(row, stage.stage)
            if not gold or len(stage.candidates) < 2:
                continue
            first, second = stage.candidates
            label = label_for(first.answer.lower(), second.answer.lower(), gold.lower())
            out.append(CutoffRow(stage=stage.stage, p2=min(second.p, 1.0), label=label))
    return out


@contextmanager
def labelled_inputs(labels_csv: str | Path, backend: RouterBackend) -> Iterator[list[LabelledInput]]:
    """LABELS.csv's rows, DICOMweb instances among them fetched into a temporary folder while in use."""
    rows = read_labels(labels_csv)
    if not any(row.source for row in rows):
        yield rows
        return
    with tempfile.TemporaryDirectory(prefix="onevlm-labels-") as folder:
        yield fetch_labelled(rows, Path(folder), metadata_only=not backend.identity().get("pixels_read", True))
