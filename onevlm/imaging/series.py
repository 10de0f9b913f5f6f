"""Group DICOM files into series and pick the instance a series is routed by.

A series is routed once, by a representative image: the middle slice of a stack (ordered by
position along the slice normal, else by Instance Number), the middle frame of a multi-frame
object (see ``dicom_to_image``). Files that cannot be read are reported, not fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from onevlm.inputs.discovery import discover_files
from onevlm.inputs.routing_input import InputError, RoutingInput, load_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesGroup:
    """The instances of one series, sorted as a reader would page through them."""

    study_instance_uid: str
    series_instance_uid: str
    members: tuple[RoutingInput, ...]

    @property
    def modality(self) -> str:
        return self.members[0].header.effective_modality

    @property
    def images(self) -> tuple[RoutingInput, ...]:
        return tuple(m for m in self.members if m.header.non_image_kind is None)

    @property
    def non_image_kind(self) -> str | None:
        """What the series is when none of its instances is an image (SR, RT plan…), else None."""
        if self.images:
            return None
        return self.members[0].header.non_image_kind

    def representative(self) -> RoutingInput:
        """The middle image of the series (or its first instance if it holds no image)."""
        images = self.images
        return images[len(images) // 2] if images else self.members[0]


@dataclass(frozen=True)
class InputProblem:
    """A file that could not be read; ``message`` names the file and the problem."""

    path: Path
    message: str


@dataclass(frozen=True)
class StudyFiles:
    """The DICOM series found under some paths, and the files that could not be read."""

    series: tuple[SeriesGroup, ...]
    problems: tuple[InputProblem, ...] = ()


def load_study(paths: Iterable[str | Path]) -> StudyFiles:
    """:func:`group_series` as one value (what the loader operator emits)."""
    groups, problems = group_series(paths)
    return StudyFiles(tuple(groups), tuple(problems))


def group_series(paths: Iterable[str | Path]) -> tuple[list[SeriesGroup], list[InputProblem]]:
    """Read every DICOM file under ``paths`` and group them by (study, series).

    Returns
    -------
    tuple
        The series (in order of first appearance) and the files that could not be read.
        Ordinary image files (PNG/JPEG) are reported as problems: a series needs DICOM.
    """
    groups: dict[tuple[str, str], dict[str, RoutingInput]] = {}
    problems: list[InputProblem] = []
    for path in discover_files(paths):
        try:
            item = load_input(path)
        except InputError as exc:
            logger.error("%s", exc)
            problems.append(InputProblem(path, str(exc)))
            continue
        if item.header is None:
            problems.append(InputProblem(path, f"{path.name}: not DICOM (route ordinary images with `onevlm route`)"))
            continue
        key = (item.header.study_instance_uid, item.header.series_instance_uid)
        members = groups.setdefault(key, {})
        if item.header.sop_instance_uid in members:
            logger.warning("%s: duplicate of SOP Instance %s (%s); ignored", path.name,
                           item.header.sop_instance_uid, members[item.header.sop_instance_uid].path.name)
            continue
        members[item.header.sop_instance_uid] = item
    result = []
    for (study, series), members in groups.items():
        ordered = sorted(members.values(), key=_reading_order)
        group = SeriesGroup(study, series, tuple(ordered))
        # Only the representative is decoded later: the other members' parsed datasets can go.
        keep = group.representative()
        result.append(SeriesGroup(study, series, tuple(m if m is keep else replace(m, dataset=None) for m in ordered)))
    return result, problems


def _reading_order(item: RoutingInput) -> tuple:
    h = item.header
    return (h.slice_position is None, h.slice_position or 0.0, h.instance_number is None,
            h.instance_number or 0, item.path.name)
