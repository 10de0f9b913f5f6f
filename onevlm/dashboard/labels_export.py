"""``onevlm labels export``: reviewers' answers as the LABELS.csv that ``onevlm calibrate fit`` reads.

One row per reviewed series (its latest answer): ``path`` is the routed instance in the
service's spool (absolute, so the file can live anywhere), ``modality`` the right card's
modality, ``finding`` empty (reviewers name the card, not the finding: stage 2 is skipped),
``card`` the right card. "Not routable" is a gold ``None`` (empty card, no modality).
"None of these" says the router missed without saying what is right: it is kept for the
calibration health check but no label can be written, so it is counted and left out, as are
answers whose spool file is gone. Research use only.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from onevlm.cards.repository import CardRepository
from onevlm.dashboard.study_index import StudyIndex
from onevlm.net.review_answers import CARD, NONE_OF_THESE, ReviewAnswer
from onevlm.router.evaluation import LABEL_COLUMNS


@dataclass(frozen=True)
class LabelsExport:
    """What an export wrote and what it left out (with why)."""

    rows: tuple[tuple[str, str, str, str], ...]
    none_of_these: int
    missing_file: int
    unknown_series: int


def label_rows(index: StudyIndex, answers: Mapping[tuple[str, str], ReviewAnswer],
               cards: CardRepository) -> LabelsExport:
    """The LABELS.csv rows of the latest answers (sorted by group and series).

    Raises
    ------
    ValueError
        If an answer names a card the repository does not hold.
    """
    rows = []
    none_of_these = missing = unknown = 0
    for (group_key, series_uid), answer in sorted(answers.items()):
        if answer.kind == NONE_OF_THESE:
            none_of_these += 1
            continue
        result = index.group(group_key)
        case = next((s for s in result.series if s.series_instance_uid == series_uid), None) if result else None
        if case is None:
            unknown += 1
            continue
        if case.instance_path is None or not case.instance_path.is_file():
            missing += 1
            continue
        if answer.kind == CARD:
            try:
                modality = cards.get(answer.card).modality
            except KeyError as exc:
                raise ValueError(f"the answer for series {series_uid} names card {answer.card}, which is not "
                                 "in the card repository") from exc
            rows.append((str(case.instance_path.resolve()), modality, "", answer.card))
        else:  # not routable: the gold final answer is None
            rows.append((str(case.instance_path.resolve()), "", "", ""))
    return LabelsExport(tuple(rows), none_of_these, missing, unknown)


def write_labels(export: LabelsExport, path: str | Path) -> Path:
    """Write the rows as LABELS.csv (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(export.rows)
    os.replace(tmp, path)
    return path
