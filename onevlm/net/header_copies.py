"""Header-only copies from DICOM JSON, and the instances of a series the pipeline reads whole.

The Orthanc intake (``fetch: needed``) stores most instances as *header-only copies*: the
instance's header in the DICOM JSON model (Orthanc's tags converted by
:mod:`onevlm.net.orthanc_tags`; DICOMweb metadata is the same model), every element but Pixel Data
and other bulk values, marked by retention's private element (``ONEVLM`` block, (0009,xx02)), so
the router, an SR's evidence, retention and amendments treat it exactly as a copy retention made.
Only the instances the pipeline reads pixels from are fetched whole (:func:`whole_needed`).

Encoding is the intake's hot path (a 2,000-slice CT series): the elements of a series' instances
repeat, so each element is encoded once per distinct value (:class:`HeaderEncoder`), and a file is
the concatenation of its elements' bytes, Explicit VR Little Endian, after its file meta.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pydicom
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from onevlm.dicom.header import PRIVATE_CREATOR, DicomHeader, _int, _slice_position
from onevlm.imaging.series import SeriesGroup, _reading_order
from onevlm.inputs.routing_input import RoutingInput
from onevlm.net.retention import PIXELS_REMOVED, RETENTION_ELEMENT, RETENTION_GROUP

#: Elements holding pixels: never in a header-only copy; their presence makes the instance an image.
PIXEL_TAGS = ("7FE00008", "7FE00009", "7FE00010")
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Text VRs whose ASCII values are written as they are (``_plain``); PN and binary VRs go through pydicom.
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_VERSION_NAME = b"ONEVLM_HDRCOPY"


class MetadataError(ValueError):
    """DICOMweb metadata that cannot become a header-only copy (the instance is fetched whole instead)."""


@dataclass(frozen=True)
class HeaderCopy:
    """One instance's header-only copy (Part 10 bytes) and what the intake needs to know about it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    encoded: bytes


def _first(metadata: dict, tag: str) -> str:
    try:
        return str(metadata[tag]["Value"][0]).strip()
    except (KeyError, IndexError, TypeError):
        return ""


def _element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _plain(tag: str, vr: str, value: dict) -> bytes | None:
    """An element of a text VR with ASCII values, IS or DS, encoded directly; ``None``: pydicom encodes it.

    These are the values that change from slice to slice (UIDs, Instance Number, position): the
    hot path, where pydicom's generic element machinery costs more than the rest of a copy.
    """
    if vr not in _PLAIN_VRS or tag[4:8] == "0000" or int(tag[:4], 16) % 2:
        return None  # group lengths and private elements: pydicom's care
    values = value.get("Value", [])
    parts = []
    for item in values:
        if isinstance(item, str):
            parts.append(item)
        elif vr == "IS" and isinstance(item, int) and not isinstance(item, bool):
            parts.append(str(item))
        elif vr == "DS" and isinstance(item, (int, float)) and not isinstance(item, bool):
            text = str(item)
            if len(text) > 16 or "e" in text or "n" in text:  # exponent, inf, nan: pydicom formats these
                return None
            parts.append(text[:-2] if text.endswith(".0") else text)
        else:
            return None
    text = "\\".join(parts)
    if not text.isascii():
        return None  # a character set's business
    return _element(int(tag, 16), vr, text.encode())


def _file_meta(sop_class: str, sop: str) -> bytes:
    body = b"".join((
        _element(0x00020001, "OB", b"\0\1"),
        _element(0x00020002, "UI", sop_class.encode()),
        _element(0x00020003, "UI", sop.encode()),
        _element(0x00020010, "UI", str(ExplicitVRLittleEndian).encode()),
        _element(0x00020012, "UI", str(PYDICOM_IMPLEMENTATION_UID).encode()),
        _element(0x00020013, "SH", _VERSION_NAME),
    ))
    return b"\0" * 128 + b"DICM" + _element(0x00020000, "UL", struct.pack("<I", len(body))) + body


class HeaderEncoder:
    """Encodes DICOMweb metadata (one instance's JSON) as a header-only copy.

    Each element's bytes are kept with the value they encode, so the elements a series' instances
    share (patient, study, equipment, most of the image module) are encoded once. Not thread-safe:
    one encoder per thread.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[dict, bytes]] = {}
        self._charset: object = None

    def _encode(self, tag: str, value: dict, encodings: list[str] | None) -> bytes:
        vr = value.get("vr")
        if not vr:
            raise MetadataError(f"element {tag} has no VR")
        encoded = _plain(tag, vr, value)
        if encoded is not None:
            self._cache[tag] = (value, encoded)
            return encoded
        key = next((k for k in ("Value", "InlineBinary") if k in value), "Value")
        element = DataElement.from_json(pydicom.Dataset, tag, vr, value.get(key, []), key)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, element, encodings)
        encoded = fp.getvalue()
        self._cache[tag] = (value, encoded)
        return encoded

    def encode(self, metadata: dict) -> HeaderCopy:
        """The header-only copy of the instance ``metadata`` describes (DICOM JSON, as WADO-RS gives it).

        Bulk values (Pixel Data, anything given by ``BulkDataURI``) are left out; InlineBinary values
        are kept. Raises :class:`MetadataError` when the UIDs are missing or an element cannot be encoded.
        """
        sop, sop_class = _first(metadata, "00080018"), _first(metadata, "00080016")
        study, series = _first(metadata, "0020000D"), _first(metadata, "0020000E")
        if not (sop and sop_class and study and series):
            raise MetadataError("the metadata lacks a Study, Series, SOP Instance or SOP Class UID")
        charset = metadata.get("00080005", {}).get("Value")
        if charset != self._charset:  # text is encoded in the instance's character set: start afresh
            self._cache.clear()
            self._charset = charset
        encodings = [str(c) for c in charset] if charset else None
        # The marker goes in group 0009's ONEVLM block, else in its first free private block.
        slot = None
        for number in range(0x10, 0x100):
            name = _first(metadata, f"000900{number:02X}") if f"000900{number:02X}" in metadata else None
            if name == PRIVATE_CREATOR or name is None:
                slot = f"{number:02X}"
                break
        if slot is None:
            raise MetadataError("group 0009 has no free private block")
        marker = {f"000900{slot}": ("LO", PRIVATE_CREATOR.encode()),
                  f"{RETENTION_GROUP:04X}{slot}{RETENTION_ELEMENT:02X}": ("LO", PIXELS_REMOVED.encode())}
        chunks: list[tuple[str, bytes]] = []
        cache = self._cache
        try:
            for tag, value in metadata.items():
                if tag in marker:
                    continue  # an ONEVLM block already there (a copy of ours sent back): written afresh below
                cached = cache.get(tag)
                if cached is not None and cached[0] == value:  # the common case: as in the previous instance
                    chunks.append((tag, cached[1]))
                elif not (tag in PIXEL_TAGS or tag.startswith("0002") or "BulkDataURI" in value):
                    chunks.append((tag, self._encode(tag, value, encodings)))
        except MetadataError:
            raise
        except Exception as exc:  # pydicom's many errors on odd values: the instance is fetched whole
            raise MetadataError(f"cannot encode the metadata: {type(exc).__name__}: {exc}") from exc
        for tag, (vr, text) in marker.items():
            chunks.append((tag, _element(int(tag, 16), vr, text)))
        chunks.sort()  # 8 upper-case hex digits: text order is tag order (tags are unique)
        encoded = _file_meta(sop_class, sop) + b"".join(chunk for _, chunk in chunks)
        return HeaderCopy(study, series, sop, sop_class, encoded)


def _values(metadata: dict, tag: str) -> list:
    try:
        return list(metadata[tag]["Value"])
    except (KeyError, TypeError):
        return []


def routing_view(metadata: dict, path: Path) -> RoutingInput:
    """The instance ``metadata`` describes as the router will see it once whole (at ``path``, pixels as in Orthanc).

    Only what the router's series grouping reads (SOP class, pixels present, Instance Number, slice
    position by the header reader's own computation); read straight from the JSON, which is fast.
    Raises :class:`MetadataError` when the metadata lacks a UID.
    """
    uids = [_first(metadata, tag) for tag in ("00080016", "00080018", "0020000E", "0020000D")]
    if not all(uids):
        raise MetadataError(f"{path.name}: the metadata lacks a UID")
    number = _values(metadata, "00200013")
    fields = {"ImagePositionPatient": _values(metadata, "00200032") or None,
              "ImageOrientationPatient": _values(metadata, "00200037") or None,
              "InstanceNumber": number[0] if number else None}
    header = DicomHeader(
        sop_class_uid=uids[0], sop_instance_uid=uids[1], series_instance_uid=uids[2], study_instance_uid=uids[3],
        modality="", body_part_examined="", anatomic_region="", descriptions=(), image_type=(),
        photometric_interpretation="", has_pixel_data=any(tag in metadata for tag in PIXEL_TAGS),
        rows=None, columns=None, number_of_frames=None,
        instance_number=_int(fields, "InstanceNumber"), slice_position=_slice_position(fields))
    return RoutingInput(path=path, kind="dicom", header=header)


def whole_needed(members: Sequence[RoutingInput], whole: set[str], new: set[str]) -> set[str]:
    """SOP Instance UIDs of a series to fetch whole so that the router routes it by its middle image.

    Parameters
    ----------
    members:
        Every instance of the series the router will read (held in the spool, and new), as it would
        see them were they all whole (:func:`routing_view`).
    whole:
        Those already whole in the spool.
    new:
        Those not in the spool yet (the only ones that may be stored header-only).

    The router routes a series by the middle of its *whole* images (:meth:`SeriesGroup.representative`,
    in its reading order). The target is the middle image of the whole series; extra images are made
    whole on its lighter side until it is the middle of the whole ones. A whole-slide series is read
    whole (every level); objects without pixels need nothing whole.
    """
    if not members:
        return set()
    group = SeriesGroup(members[0].header.study_instance_uid, members[0].header.series_instance_uid,
                        tuple(sorted(members, key=_reading_order)))
    if any(m.header.sop_class_uid == WSI_SOP_CLASS for m in group.members):
        return {m.header.sop_instance_uid for m in group.members} & new
    images = [m.header.sop_instance_uid for m in group.images]
    if not images:
        return set()
    middle = len(images) // 2
    target = images[middle]
    chosen = (set(whole) & set(images)) | {target}
    before = [uid for uid in images[:middle] if uid not in chosen]
    after = [uid for uid in images[middle + 1:] if uid not in chosen]
    # Prefer instances not yet in the spool (fetched anyway), nearest the middle.
    before.reverse()  # nearest the middle first
    before.sort(key=lambda uid: uid not in new)  # stable: new ones (fetched anyway) first
    after.sort(key=lambda uid: uid not in new)
    rank = {uid: i for i, uid in enumerate(images)}
    while True:
        ahead = sum(1 for uid in chosen if rank[uid] < middle)
        wanted = (len(chosen)) // 2  # the router takes the whole images' middle one
        if ahead == wanted:
            return chosen - set(whole)
        chosen.add(before.pop(0) if ahead < wanted else after.pop(0))
