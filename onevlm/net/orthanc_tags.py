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

from pydicom.datadict import dictionary_VR, private_dictionary_VR

#: VRs whose values Orthanc does not give as text: never in a copy.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Left out too: Orthanc 1.10 shows only the first value of an AT element (a Frame Increment Pointer).
UNRELIABLE_VRS = BINARY_VRS | {"AT"}
#: Text VRs holding one value that may contain a backslash.
SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"FL", "FD"})
PIXEL_DATA_TAGS = {"7fe0,0010": "7FE00010", "7fe0,0008": "7FE00008", "7fe0,0009": "7FE00009"}


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
        try:
            vr = private_dictionary_VR(tag, creator)
        except KeyError:
            return None
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
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
    """
    if signed_pixels is None:
        signed_pixels = str(tags.get("0028,0103", {}).get("Value", "")).strip() == "1"
    creators: dict[tuple[int, int], str] = {}
    for key, item in tags.items():
        group, element = int(key[:4], 16), int(key[5:9], 16)
        if group % 2 and 0x10 <= element <= 0xFF and item.get("Type") == "String":
            creators[(group, element)] = str(item.get("Value", "")).strip()
    out: dict = {}
    for key, item in tags.items():
        kind = item.get("Type")
        if key.lower() in PIXEL_DATA_TAGS:
            out[PIXEL_DATA_TAGS[key.lower()]] = {"vr": "OW", "BulkDataURI": ""}
            continue
        tag = int(key[:4], 16) << 16 | int(key[5:9], 16)
        vr = _vr(tag, creators, signed_pixels)
        if vr is None or vr in UNRELIABLE_VRS or kind not in ("String", "Sequence", "Null"):
            continue
        name = f"{tag:08X}"
        if kind == "Sequence":
            if vr == "SQ":
                out[name] = {"vr": "SQ", "Value": [dicom_json(child, signed_pixels) for child in item.get("Value") or []]}
            continue
        if vr == "SQ":
            continue
        text = item.get("Value") if kind == "String" else None
        if text is None or text == "":
            out[name] = {"vr": vr}
            continue
        values = _values(vr, str(text))
        if values is not None:
            out[name] = {"vr": vr, "Value": values}
    return out
