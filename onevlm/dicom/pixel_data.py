"""Is a DICOM instance's Pixel Data complete? Checked on the dataset as the header reader left it.

The router's header path never decodes pixels, so a file cut short in transfer (half its pixel
bytes missing) would otherwise route as if it were whole. The check is conservative: it flags
only what is certainly broken.

- Native (uncompressed) Pixel Data must hold Rows x Columns x Number of Frames x Samples per
  Pixel x Bits Allocated / 8 bytes (pydicom's :func:`~pydicom.pixels.utils.get_expected_length`,
  which also knows YBR_FULL_422 and 1-bit data); more is tolerated (the pad byte of an odd
  length, writers that pad further). A value deferred by the reader (``defer_size``) is measured
  against the file size, so no pixel byte is loaded.
- Encapsulated (compressed) Pixel Data must parse into items (pydicom's
  :func:`~pydicom.encaps.parse_basic_offsets` and :func:`~pydicom.encaps.parse_fragments`), its
  last fragment must lie inside the file and the sequence must be closed. Every frame starts a
  fragment of its own (PS3.5 A.4), so fewer fragments than frames is broken whatever the offset
  table says; video transfer syntaxes (one stream for all frames) are exempt from that count.
"""

from __future__ import annotations

import io
import logging
import struct
from typing import BinaryIO

import pydicom
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.uid import MPEGTransferSyntaxes

logger = logging.getLogger(__name__)

PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)


def pixel_data_problem(
    ds: pydicom.Dataset,
    source: BinaryIO | None = None,
    size: int | None = None,
    stopped_at: int | None = None,
) -> str | None:
    """Why the dataset's Pixel Data is certainly incomplete, or ``None`` (complete, absent or unknown).

    Parameters
    ----------
    ds:
        The dataset as read, ideally with ``defer_size`` so large values stay on disk.
    source:
        The open, seekable file ``ds`` was read from (deferred values are measured in it; it is
        not re-opened). ``None``: only values in memory are checked.
    size:
        The file's size in bytes (with ``source``).
    stopped_at:
        ``source.tell()`` right after reading: pydicom drops an encapsulated Pixel Data element
        whose sequence runs past the end of the file and stops there, at its value.

    Returns
    -------
    str or None
        ``"pixel data truncated: N of M bytes"`` or a like sentence in the user's terms.
    """
    try:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_deflated:
            # Offsets then count in the inflated stream, not in the file: sizes do not compare.
            source = size = stopped_at = None
        element = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
        if element is None:
            return _dropped_pixel_data(ds, source, size, stopped_at)
        # A raw element (as read) has a length; a converted one (set in memory) knows if it is undefined.
        if getattr(element, "length", None) == _UNDEFINED_LENGTH or getattr(element, "is_undefined_length", False):
            return _encapsulated_problem(ds, element, source, size)
        return _native_problem(ds, element, size)
    except Exception as exc:  # a check that cannot decide flags nothing
        logger.debug("pixel data check skipped: %s: %s", type(exc).__name__, exc)
        return None


def _native_problem(ds: pydicom.Dataset, element, size: int | None) -> str | None:
    from pydicom.pixels.utils import get_expected_length

    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # Rows, Columns, Bits Allocated… missing: nothing to compare with
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        available = len(value)  # a short read at the end of the file keeps what was there
    elif value is not None or getattr(element, "length", None) is None:
        return None  # not bytes (pixels set as an array?): nothing to measure
    else:
        available = element.length
        tell = getattr(element, "value_tell", None)
        if value is None and size is not None and tell is not None:
            available = min(available, max(0, size - tell))
    if available < expected:
        return f"pixel data truncated: {available} of {expected} bytes"
    return None


def _encapsulated_problem(ds: pydicom.Dataset, element, source: BinaryIO | None, size: int | None) -> str | None:
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        # In memory the value ends where pydicom found the sequence delimiter.
        problem, fragments = _walk(io.BytesIO(value), 0, len(value), closed=True)
    elif source is not None and size is not None and getattr(element, "value_tell", None) is not None:
        problem, fragments = _walk(source, element.value_tell, size, closed=False)
    else:
        return None
    if problem is not None:
        return problem
    return _frame_count_problem(ds, fragments)


def _dropped_pixel_data(ds: pydicom.Dataset, source: BinaryIO | None, size: int | None,
                        stopped_at: int | None) -> str | None:
    if source is None or size is None or stopped_at is None or stopped_at >= size:
        return None
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    header_length = 8 if implicit else 12
    if stopped_at < header_length:
        return None
    source.seek(stopped_at - header_length)
    header = source.read(header_length)
    group, elem = struct.unpack(f"{endian}HH", header[:4])
    (length,) = struct.unpack(f"{endian}L", header[-4:])
    if (group << 16 | elem) != PIXEL_DATA_TAG or length != _UNDEFINED_LENGTH:
        return None  # the reader stopped in some other element: not ours to judge
    problem, _ = _walk(source, stopped_at, size, closed=False)
    return problem or "pixel data truncated: the compressed data is not closed"


def _walk(buffer: BinaryIO, start: int, end: int, closed: bool) -> tuple[str | None, int]:
    """Parse the items of an encapsulated value from ``start``; ``end`` bounds the data.

    ``closed``: the value was already cut at its sequence delimiter (in memory); otherwise the
    delimiter must follow the last fragment. Returns (problem, number of fragments).
    """
    buffer.seek(start)
    try:
        parse_basic_offsets(buffer)
        count, offsets = parse_fragments(buffer)
    except (ValueError, struct.error) as exc:
        return f"pixel data damaged: the compressed fragments do not parse ({exc})", 0
    last_end = buffer.tell()  # after the offset table: the end when there is no fragment
    if offsets:
        buffer.seek(offsets[-1] + 4)
        raw = buffer.read(4)
        if len(raw) < 4:
            return _truncated(start, end, offsets[-1] + 8 + (0 if closed else 8)), count
        last_end = offsets[-1] + 8 + struct.unpack("<L", raw)[0]
    if closed:
        declared = last_end
    else:
        declared = last_end + 8  # the sequence delimiter item
        if declared <= end:
            buffer.seek(last_end)
            if struct.unpack("<HH", buffer.read(4)) != _SEQUENCE_DELIMITER:
                return "pixel data damaged: the compressed fragments are not closed", count
    if declared > end:
        return _truncated(start, end, declared), count
    return None, count


def _truncated(start: int, end: int, declared_end: int) -> str:
    return f"pixel data truncated: {max(0, end - start)} of {declared_end - start} bytes"


def _frame_count_problem(ds: pydicom.Dataset, fragments: int) -> str | None:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if fragments == 0:
        return "pixel data truncated: no compressed frame in it"
    if syntax is not None and syntax in MPEGTransferSyntaxes:
        return None  # one video stream carries every frame
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return None
    if frames > fragments:
        return f"pixel data truncated: {fragments} compressed fragment(s) for {frames} frames"
    return None
