"""Make imperfect source headers acceptable as evidence for derived objects (SR, SEG).

Real archives hold files that omit Type 2 attributes of the Patient and General Study modules
(present but possibly empty), or that keep ACR-NEMA style dates and times ("1994.11.05",
"11:20:00"). highdicom copies these into the derived object and rightly refuses invalid values.
An empty value is what the standard asks for when a Type 2 value is unknown; a legacy date or
time is rewritten in today's form; anything else unparseable becomes empty (and is logged).
"""

from __future__ import annotations

import copy
import logging
import re

import pydicom

logger = logging.getLogger(__name__)

#: Type 2 attributes of the Patient and General Study modules that derived objects copy.
TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
#: Retired image SOP classes and the current class with the same Patient/Study modules.
RETIRED_TO_CURRENT = {
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame (Retired)
    "1.2.840.10008.5.1.4.1.1.5": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine (Retired)
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound (Retired)
}
DATE_KEYWORDS = ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate", "PatientBirthDate")
TIME_KEYWORDS = ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _fixed(keyword: str, raw: str) -> str:
    value = raw.strip()
    if keyword in DATE_KEYWORDS:
        candidate = value.replace(".", "").replace("-", "")
        return candidate if _DATE.match(candidate) or not candidate else ""
    candidate = value.replace(":", "")
    return candidate if _TIME.match(candidate) or not candidate else ""


def evidence_ready(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` itself when usable as is, else a copy with Type 2 gaps filled and legacy DA/TM fixed."""
    changes: dict[str, str] = {}
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            changes[keyword] = ""
    for keyword in DATE_KEYWORDS + TIME_KEYWORDS:
        element = ds.get(keyword)
        if element is None or keyword in changes:
            continue
        raw = str(element)
        fixed = _fixed(keyword, raw)
        if fixed != raw:
            changes[keyword] = fixed
            if not fixed and raw.strip():
                logger.warning("SOP %s: %s is not a valid date/time; left empty in derived objects",
                               ds.get("SOPInstanceUID", "?"), keyword)
    if not changes:
        return ds
    completed = copy.deepcopy(ds)
    for keyword, value in changes.items():
        setattr(completed, keyword, value)
    return completed


def as_current_sop_class(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds``, or for a retired SOP class a copy presented as its current successor.

    highdicom copies Patient and Study attributes by the source's IOD and knows no retired IOD;
    the modules copied are the same. Callers must put the original SOP Class UID back into any
    reference they build from the copy (see :func:`restore_referenced_sop_classes`).
    """
    current = RETIRED_TO_CURRENT.get(str(ds.get("SOPClassUID", "")))
    if current is None:
        return ds
    presented = copy.deepcopy(ds)
    presented.SOPClassUID = current
    return presented


def restore_referenced_sop_classes(sequence, originals: dict[str, str]) -> None:
    """Set ReferencedSOPClassUID back to the original class of each instance, recursively."""
    for item in sequence or ():
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in originals and "ReferencedSOPClassUID" in item:
            item.ReferencedSOPClassUID = originals[uid]
        for element in item:
            if element.VR == "SQ":
                restore_referenced_sop_classes(element.value, originals)
