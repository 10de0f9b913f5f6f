"""Real DICOM files damaged the way transfers damage them: pixel bytes cut off the end."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.encaps import parse_basic_offsets, parse_fragments


def _pixel_element(path: Path):
    ds = pydicom.dcmread(path, defer_size=0)  # every value deferred: offsets only
    element = ds.get_item("PixelData", keep_deferred=True)
    assert element is not None, f"{path.name} has no Pixel Data"
    return element


def cut_native_pixels(source: Path, target: Path) -> int:
    """Copy ``source`` (uncompressed) to ``target`` without the second half of its pixel bytes.

    Returns the number of pixel bytes kept.
    """
    element = _pixel_element(source)
    assert element.length != 0xFFFFFFFF, f"{source.name} is not uncompressed"
    data = source.read_bytes()
    assert element.value_tell + element.length == len(data), "Pixel Data must be the last element"
    kept = element.length // 2
    target.write_bytes(data[:element.value_tell + kept])
    return kept


def cut_last_fragment(source: Path, target: Path) -> None:
    """Copy ``source`` (compressed) to ``target`` ending halfway through its last fragment."""
    element = _pixel_element(source)
    assert element.length == 0xFFFFFFFF, f"{source.name} is not compressed"
    data = source.read_bytes()
    with source.open("rb") as handle:
        handle.seek(element.value_tell)
        parse_basic_offsets(handle)
        _, offsets = parse_fragments(handle)
    last = offsets[-1]
    (length,) = struct.unpack("<L", data[last + 4:last + 8])
    target.write_bytes(data[:last + 8 + length // 2])
