"""Which identity a result object gets: the first version's, or a new one that amends it.

DICOM says changed content is a new instance. A routing SR, SEG or bulk-annotation object is first
built with the UIDs derived from its source series (so re-routing the same series gives the same
object). A writer that keeps results over time (the listener service) compares each new build
with the version it last sent, by content (:func:`content_digest`: without the instance's own
identity and creation times): the same content keeps its UID and is not sent again; changed
content becomes the next version, a new SOP Instance UID in the same series, and an SR names
every earlier version in its Predecessor Documents Sequence. A one-shot writer (the MONAI Deploy
app) keeps the first version: :class:`FirstVersions`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import pydicom

#: Attributes that differ between builds of the same content, or that name the version itself.
IDENTITY_AND_TIMES = ("SOPInstanceUID", "InstanceCreationDate", "InstanceCreationTime", "ContentDate",
                      "ContentTime", "PredecessorDocumentsSequence")

#: ``rebuild(sop_instance_uid, previous_versions)``: the object built again under another identity.
Rebuild = Callable[[str, Sequence[pydicom.Dataset]], pydicom.Dataset]


def content_digest(dataset: pydicom.Dataset) -> str:
    """SHA-256 of a result object's content, without its instance UID, version references and creation times."""
    copy = _shallow(dataset)
    for keyword in IDENTITY_AND_TIMES:
        if keyword in copy:
            delattr(copy, keyword)
    if "ContributingEquipmentSequence" in copy:
        items = [_shallow(item) for item in copy.ContributingEquipmentSequence]
        for item in items:
            if "ContributionDateTime" in item:
                del item.ContributionDateTime
        copy.ContributingEquipmentSequence = items
    buffer = io.BytesIO()
    copy.save_as(buffer, implicit_vr=False, little_endian=True)  # content only: no file meta
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _shallow(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """A new dataset holding the same elements (``Dataset(ds)`` would share ``ds``'s element dict)."""
    copy = pydicom.Dataset()
    for element in dataset:
        copy.add(element)
    return copy


@dataclass(frozen=True)
class PreviousVersion:
    """An earlier version of a result: what a Predecessor Documents Sequence item references."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, dataset: pydicom.Dataset) -> "PreviousVersion":
        return cls(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPClassUID),
                   str(dataset.SOPInstanceUID))

    def as_dataset(self) -> pydicom.Dataset:
        """The four attributes highdicom reads from a previous version."""
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds

    def as_list(self) -> list[str]:
        return [self.study_instance_uid, self.series_instance_uid, self.sop_class_uid, self.sop_instance_uid]


class ResultVersions(Protocol):
    """Decides the identity of each result object a study writes."""

    def settle(self, kind: str, first: pydicom.Dataset, rebuild: Rebuild) -> pydicom.Dataset:
        """The object to write: ``first`` (built as the first version), or ``rebuild(...)``'s amendment."""


class FirstVersions:
    """Every object keeps the first version's identity (a writer that does not keep results over time)."""

    def settle(self, kind: str, first: pydicom.Dataset, rebuild: Rebuild) -> pydicom.Dataset:
        return first
