"""Which SOP classes carry an image a router can look at, and which do not."""

from __future__ import annotations

from pydicom.uid import UID

_STORAGE = "1.2.840.10008.5.1.4.1.1."

#: SOP Class UID prefixes of objects that are not images to route: structured reports,
#: RT plans/structures/records, waveforms (ECG…), encapsulated documents, presentation states,
#: raw data, registrations, segmentations and surfaces, annotations, protocols, palettes.
NON_IMAGE_PREFIXES: tuple[tuple[str, str], ...] = (  # first match wins
    (_STORAGE + "88.", "structured report / key object selection"),
    (_STORAGE + "481.2", "RT dose"),
    (_STORAGE + "481.3", "RT structure set"),
    (_STORAGE + "481.4", "RT treatment record"),
    (_STORAGE + "481.5", "RT plan"),
    (_STORAGE + "481.6", "RT treatment record"),
    (_STORAGE + "481.7", "RT treatment record"),
    (_STORAGE + "481.8", "RT plan"),
    (_STORAGE + "481.9", "RT treatment record"),
    (_STORAGE + "481.", "RT object"),
    (_STORAGE + "9.", "waveform"),
    (_STORAGE + "104.", "encapsulated document"),
    (_STORAGE + "11.", "presentation state"),
    (_STORAGE + "66.4", "segmentation"),
    (_STORAGE + "66", "raw data / registration / fiducials / surface"),
    (_STORAGE + "67", "real world value mapping"),
    (_STORAGE + "68.", "surface"),
    (_STORAGE + "91.", "microscopy annotations"),
    (_STORAGE + "200.", "protocol"),
    (_STORAGE + "131", "structured display"),
    (_STORAGE + "78.", "ophthalmic measurements"),
    (_STORAGE + "79.", "ophthalmic measurements"),
    (_STORAGE + "80.", "ophthalmic measurements"),
    (_STORAGE + "81.", "ophthalmic measurements"),
    (_STORAGE + "82.", "ophthalmic measurements"),
    ("1.2.840.10008.5.1.4.38.", "hanging protocol"),
    ("1.2.840.10008.5.1.4.39.", "color palette"),
    ("1.2.840.10008.5.1.4.43.", "implant template"),
    ("1.2.840.10008.5.1.4.44.", "implant template"),
    ("1.2.840.10008.5.1.4.45.", "implant template"),
    ("1.2.840.10008.1.3.10", "media storage directory (DICOMDIR)"),
)

#: Image SOP classes whose UIDs fall under a non-image prefix above.
IMAGE_EXCEPTIONS = frozenset({_STORAGE + "481.1"})

#: Modality implied by common image SOP classes, for files that omit (0008,0060).
MODALITY_BY_SOP_CLASS = {
    _STORAGE + "1": "CR",
    _STORAGE + "1.1": "DX",
    _STORAGE + "1.1.1": "DX",
    _STORAGE + "1.2": "MG",
    _STORAGE + "1.2.1": "MG",
    _STORAGE + "2": "CT",
    _STORAGE + "2.1": "CT",
    _STORAGE + "4": "MR",
    _STORAGE + "4.1": "MR",
    _STORAGE + "6.1": "US",
    _STORAGE + "3.1": "US",
    _STORAGE + "77.1.1.1": "ES",
    _STORAGE + "77.1.2": "GM",
    _STORAGE + "77.1.3": "SM",
    _STORAGE + "77.1.4": "XC",
    _STORAGE + "77.1.5.1": "OP",
    _STORAGE + "77.1.5.2": "OP",
    _STORAGE + "77.1.5.4": "OPT",
    _STORAGE + "77.1.6": "SM",
}


def sop_class_name(uid: str) -> str:
    """The SOP class's name from pydicom's UID dictionary, or the UID itself."""
    name = UID(uid).name if uid else ""
    return name or uid


def non_image_kind(uid: str) -> str | None:
    """Return what kind of non-image object ``uid`` is, or ``None`` for an image SOP class."""
    if not uid:
        return None
    if uid in IMAGE_EXCEPTIONS:
        return None
    for prefix, kind in NON_IMAGE_PREFIXES:
        if uid == prefix.rstrip(".") or uid.startswith(prefix):
            return kind
    return None
