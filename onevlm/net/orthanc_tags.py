"""Orthanc's own tag format (``GET /instances/{id}/tags``) as DICOM JSON, for header-only copies.

Orthanc (1.9.1 and later) answers ``/instances/{id}/tags`` by reading the stored file only up to
its Pixel Data, so it is the cheapest complete header Orthanc gives for one instance: a few
milliseconds, against reading and converting the whole file for the DICOMweb plugin's instance
metadata. The format names each element and gives its value as text, but not its VR; this module
takes the VR from the DICOM dictionary (pydicom's, private creators' dictionaries included) and
returns the DICOM JSON model (PS3.18 F.2) that :class:`~onevlm.net.header_copies.HeaderEncoder`
encodes.

What a copy made this way leaves out, by design: binary values (OB, OW, UN, …; Orthanc does not
give them), AT values (Orthanc gives only the first), private elements whose creator is not in pydicom's dictionaries (their VR is unknown),
values Orthanc reports as too long (text over its limit, e.g. a long Image Comments), and Pixel Data (marked present by a ``BulkDataURI``, which
the encoder skips, so the copy is known to describe an image). Every element the router, an SR's
evidence, retention and amendments read is public text or a number, so it is kept.
"""

from __future__ import annotations

import functools

from pydicom.datadict import dictionary_VR, private_dictionary_VR

#: VRs whose values Orthanc does not give as text: never in a copy.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Left out too: Orthanc 1.10 shows only the first value of an AT element (a Frame Increment Pointer).
UNRELIABLE_VRS = BINARY_VRS | {"AT"}
#: Text VRs holding one value that may contain a backslash.
SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"FL", "FD"})
_ODD_DIGITS = frozenset("13579bBdDfF")
#: Elements converted already: most of a series' elements repeat from instance to instance. The
#: attributes returned are shared between calls: read them, never change them.
_MEMO: dict[tuple, tuple[str, dict] | None] = {}
_MEMO_SIZE = 50_000
_MISSING = object()
PIXEL_DATA_TAGS = {"7fe0,0010": "7FE00010", "7fe0,0008": "7FE00008", "7fe0,0009": "7FE00009"}


@functools.lru_cache(maxsize=65536)
def _dictionary_vr(tag: int, creator: str | None) -> str | None:
    """The dictionary's VR of a public element (``creator`` None) or a private one, ``None`` if unknown.

    Cached: the same few hundred elements recur in every instance, and the lookup is most of the
    conversion's time otherwise."""
    try:
        return dictionary_VR(tag) if creator is None else private_dictionary_VR(tag, creator)
    except KeyError:
        return None


def _vr(tag: int, creators: dict[tuple[int, int], str], signed_pixels: bool) -> str | None:
    """The element's VR from the dictionary, or ``None`` where it cannot be known."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2:
        if element == 0:
            return None  # a private group length
        if 0x10 <= element <= 0xFF:
            return "LO"  # a private creator
        creator = creators.get((group, element >> 8))
        if creator is None:
            return None
        vr = _dictionary_vr(tag, creator)
    else:
        vr = _dictionary_vr(tag, None)
    if vr is None:
        return None
    if vr == "US or SS":
        return "SS" if signed_pixels else "US"
    if " or " in vr:  # OB or OW, US or OW, …: binary either way
        return None
    return vr


def _values(vr: str, text: str) -> list | None:
    """The element's values in DICOM JSON from Orthanc's text, or ``None`` where they do not parse."""
    parts = [text] if vr in SINGLE_VALUED else text.split("\\")
    try:
        if vr in INTEGER_VRS:
            return [int(p) for p in parts]
        if vr in FLOAT_VRS:
            return [float(p) for p in parts]
    except ValueError:
        return None
    if vr == "PN":
        names = []
        for p in parts:
            groups = p.split("=")
            names.append({key: value for key, value in zip(("Alphabetic", "Ideographic", "Phonetic"), groups)
                          if value})
        return names
    return parts


def dicom_json(tags: dict, signed_pixels: bool | None = None) -> dict:
    """Convert one dataset (or sequence item) of Orthanc's full tag format to DICOM JSON.

    Parameters
    ----------
    tags:
        ``{"gggg,eeee": {"Name": …, "Type": "String" | "Sequence" | "Null" | "TooLong", "Value": …}}``
        as ``/instances/{id}/tags`` returns it.
    signed_pixels:
        Whether Pixel Representation is 1, for the elements whose VR depends on it (US or SS);
        read from ``tags`` when not given (sequence items inherit the instance's).

    Returns
    -------
    dict
        ``{"GGGGEEEE": {"vr": …, "Value": […]}}``, the elements whose VR and value could be known
        (see the module's notes for what is left out), Pixel Data as ``{"vr": "OW", "BulkDataURI": ""}``.
        Attributes may be shared with earlier results (a cache): read them, do not change them.
    """
    if signed_pixels is None:
        signed_pixels = str(tags.get("0028,0103", {}).get("Value", "")).strip() == "1"
    creators: dict[tuple[int, int], str] = {}
    for key, item in tags.items():
        if key[3] in _ODD_DIGITS and key[5:7] == "00" and item.get("Type") == "String":
            element = int(key[5:9], 16)
            if 0x10 <= element <= 0xFF:
                creators[(int(key[:4], 16), element)] = str(item.get("Value", "")).strip()
    context = (signed_pixels, frozenset(creators.items()))
    out: dict = {}
    for key, item in tags.items():
        kind = item.get("Type")
        if kind == "Sequence":
            tag = int(key[:4], 16) << 16 | int(key[5:9], 16)
            if _vr(tag, creators, signed_pixels) == "SQ":
                out[f"{tag:08X}"] = {"vr": "SQ", "Value": [dicom_json(child, signed_pixels)
                                                            for child in item.get("Value") or []]}
            continue
        memo_key = (key, kind, item.get("Value"), context)
        converted = _MEMO.get(memo_key, _MISSING)
        if converted is _MISSING:
            converted = _element(key, kind, item.get("Value"), creators, signed_pixels)
            if len(_MEMO) >= _MEMO_SIZE:
                _MEMO.clear()
            _MEMO[memo_key] = converted
        if converted is not None:
            out[converted[0]] = converted[1]
    return out


def _element(key: str, kind: str | None, text: object, creators: dict[tuple[int, int], str],
             signed_pixels: bool) -> tuple[str, dict] | None:
    """One element (not a sequence) as ``(tag, DICOM JSON attribute)``, or ``None`` where it is left out."""
    if key.lower() in PIXEL_DATA_TAGS:
        return PIXEL_DATA_TAGS[key.lower()], {"vr": "OW", "BulkDataURI": ""}
    tag = int(key[:4], 16) << 16 | int(key[5:9], 16)
    vr = _vr(tag, creators, signed_pixels)
    if vr is None or vr in UNRELIABLE_VRS or vr == "SQ" or kind not in ("String", "Null"):
        return None
    name = f"{tag:08X}"
    if kind == "Null" or text is None or text == "":
        return name, {"vr": vr}
    values = _values(vr, str(text))
    return None if values is None else (name, {"vr": vr, "Value": values})
