"""Read the DICOM attributes the router uses, without decoding pixels."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from onevlm.dicom.pixel_data import pixel_data_problem
from onevlm.dicom.sop_classes import MODALITY_BY_SOP_CLASS, non_image_kind, sop_class_name

#: Free-text header fields that describe the acquisition (never patient identity).
DESCRIPTIVE_FIELDS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "ReasonForStudy",
    "AdmittingDiagnosesDescription",
    "ImageComments",
)


class DicomReadError(ValueError):
    """A file could not be read as DICOM. The message names the file and the problem.

    Attributes
    ----------
    source:
        How the message names the file (its name).
    problem:
        The problem alone, in the user's terms, for callers that name the file their own way.
    """

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


@dataclass(frozen=True)
class DicomHeader:
    """The header evidence of one DICOM instance (no PHI: no names, no dates)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    anatomic_region: str
    descriptions: tuple[tuple[str, str], ...]
    image_type: tuple[str, ...]
    photometric_interpretation: str
    has_pixel_data: bool
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    instance_number: int | None = None
    slice_position: float | None = None
    #: Why the Pixel Data is certainly incomplete (truncated file…), else ``None``.
    pixel_data_problem: str | None = None

    @property
    def sop_class_name(self) -> str:
        return sop_class_name(self.sop_class_uid)

    @property
    def non_image_kind(self) -> str | None:
        """What non-image object this is (SR, RT plan, ECG…), or ``None`` if it is an image."""
        kind = non_image_kind(self.sop_class_uid)
        if kind is None and not self.has_pixel_data:
            return "object without pixel data"
        return kind

    @property
    def effective_modality(self) -> str:
        """(0008,0060), or the modality implied by the SOP class when the file omits it."""
        return self.modality or MODALITY_BY_SOP_CLASS.get(self.sop_class_uid, "")

    def evidence(self) -> dict:
        """The attributes as logged evidence (UIDs and acquisition descriptions only)."""
        return {
            "SOPClassUID": self.sop_class_uid,
            "SOPClassName": self.sop_class_name,
            "Modality": self.modality,
            "BodyPartExamined": self.body_part_examined,
            "AnatomicRegion": self.anatomic_region,
            "ImageType": list(self.image_type),
            "PhotometricInterpretation": self.photometric_interpretation,
            "PixelData": self.has_pixel_data,
            **{name: text for name, text in self.descriptions},
        }


#: Private block marking a header-only copy of an instance whose pixels stayed on a DICOMweb service.
PRIVATE_CREATOR = "ONEVLM"
PIXELS_ON_SERVER_GROUP, PIXELS_ON_SERVER_ELEMENT = 0x0009, 0x01


def pixels_left_on_server(ds: pydicom.Dataset) -> str | None:
    """The DICOMweb URL of the instance a header-only copy was made from (its pixels are there), else None."""
    try:
        return str(ds.get_private_item(PIXELS_ON_SERVER_GROUP, PIXELS_ON_SERVER_ELEMENT, PRIVATE_CREATOR).value)
    except KeyError:
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).split())


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _slice_position(ds: pydicom.Dataset) -> float | None:
    # Position along the slice normal orders a stack even when Instance Numbers lie.
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        if position is None or orientation is None or len(orientation) != 6 or len(position) != 3:
            return None
        row = [float(v) for v in orientation[:3]]
        col = [float(v) for v in orientation[3:]]
        normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
        return sum(n * float(p) for n, p in zip(normal, position))
    except (TypeError, ValueError):
        return None


def is_dicom_file(path: str | Path) -> bool:
    """True if the file carries the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def header_from_dataset(ds: pydicom.Dataset, source: str = "<dataset>") -> DicomHeader:
    """Extract a :class:`DicomHeader` from a dataset already in memory.

    Raises
    ------
    DicomReadError
        If the dataset has no SOP Class UID (it is not a storable DICOM instance).
    """
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if not sop_class:
        raise DicomReadError(source, "not a DICOM instance: no SOP Class UID")
    region = ""
    if "AnatomicRegionSequence" in ds and len(ds.AnatomicRegionSequence):
        region = _text(ds.AnatomicRegionSequence[0], "CodeMeaning")
    descriptions = tuple((name, _text(ds, name)) for name in DESCRIPTIVE_FIELDS if _text(ds, name))
    image_type = tuple(str(v) for v in ds.get("ImageType", []) or [] if str(v))
    return DicomHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        modality=_text(ds, "Modality").upper(),
        body_part_examined=_text(ds, "BodyPartExamined").upper(),
        anatomic_region=region,
        descriptions=descriptions,
        image_type=image_type,
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
        has_pixel_data=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        or pixels_left_on_server(ds) is not None,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames"),
        instance_number=_int(ds, "InstanceNumber"),
        slice_position=_slice_position(ds),
    )


def read_header(path: str | Path, force: bool = False) -> DicomHeader:
    """Read a DICOM file's header; pixel data is detected but not loaded.

    ``force`` also reads files without the Part 10 preamble and meta header.

    Raises
    ------
    DicomReadError
        If the file is missing, not DICOM, truncated in its header, or has no SOP Class UID.
        Pixel Data cut short is not an error here: it is the header's ``pixel_data_problem``.
    """
    return read_dicom(path, force)[0]


def read_dicom(path: str | Path, force: bool = False) -> tuple[DicomHeader, pydicom.Dataset]:
    """Parse a DICOM file once: its header evidence and the dataset, large values left on disk.

    The dataset's Pixel Data (and any value over 64 KB) is read from the file only when used, so
    whoever decodes the image later does so from this dataset without parsing the file again.
    Errors as :func:`read_header`.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # defer_size keeps large values (pixel data) on disk: we only need to know they exist.
            ds = pydicom.dcmread(handle, defer_size="64 KB", force=force)
            # Checked on this read, through the same handle: the file is parsed once, no pixel loaded.
            stopped_at = handle.tell()
            problem = pixel_data_problem(ds, handle, os.fstat(handle.fileno()).st_size, stopped_at)
            if problem is not None and "SOPInstanceUID" not in ds:
                # pydicom drops every element when encapsulated Pixel Data ends before its delimiter: the
                # header is read again without the pixels (damaged files only), so the series is still known.
                handle.seek(0)
                ds = pydicom.dcmread(handle, stop_before_pixels=True, force=force)
    except InvalidDicomError as exc:
        # pydicom's text advises force=True: not the user's terms.
        raise DicomReadError(path.name, "not a DICOM file") from exc
    except FileNotFoundError as exc:
        raise DicomReadError(path.name, "file not found") from exc
    except OSError as exc:  # permissions, I/O: not the file's content
        raise DicomReadError(path.name, f"cannot be read: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt data
        raise DicomReadError(path.name, f"corrupt DICOM file: its header cannot be parsed ({exc or type(exc).__name__})") from exc
    try:
        header = header_from_dataset(ds, source=path.name)
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(path.name, f"corrupt DICOM header ({exc or type(exc).__name__})") from exc
    if problem is None:
        return header, ds
    # A dropped (unparseable) Pixel Data element still means the file was an image.
    return replace(header, pixel_data_problem=problem, has_pixel_data=True), ds
