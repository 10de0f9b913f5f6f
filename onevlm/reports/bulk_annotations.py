"""Boxes found on a whole slide, as a DICOM Microscopy Bulk Simple Annotations object.

The specialty model's detections (level-0 pixel boxes with a label and an optional confidence)
become one highdicom :class:`highdicom.ann.MicroscopyBulkSimpleAnnotations` instance that
references the slide's level-0 VOLUME image, with 2D coordinates in its Total Pixel Matrix.
Annotations are grouped by label (one Annotation Group per label, RECTANGLE graphic type);
the confidence is stored as a per-annotation measurement.

Labels with a standard meaning are coded with SNOMED CT concepts from pydicom's code
dictionary; any other label gets a code in the private coding scheme ``99ONEVLM`` (code value: a
stable hash of the label; meaning: the label), declared in the Coding Scheme Identification
Sequence. Research use only, not for clinical use: the object says so in its descriptions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from onevlm import __version__
from onevlm.reports import coding
from onevlm.reports.boxes import ImageBox

logger = logging.getLogger(__name__)

PRIVATE_SCHEME = coding.SCHEME

SERIES_DESCRIPTION = "onevlm slide boxes - research use only, not for clinical use"
CONTENT_DESCRIPTION = "Model-detected regions. Research use only, not for clinical use"
# Both are LO (at most 64 characters); tests check the length.

WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"

# Property category for a label without a standard concept: a private code, because a generic
# SNOMED category such as "Morphologically Abnormal Structure" would claim more than we know.
FINDING_CATEGORY = Code("FINDING", PRIVATE_SCHEME, "Model-detected region")

# Category (CID 7150) and type (CID 8135 and friends) for labels with a SNOMED CT concept.
# Keys are lower-cased labels.
STANDARD_LABELS: Mapping[str, tuple[Code, Code]] = {
    "tissue": (codes.SCT.Tissue, codes.SCT.Tissue),
    "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "neoplasm": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "carcinoma": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Carcinoma),
    "necrosis": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Necrosis),
    "inflammation": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Inflammation),
    "nucleus": (codes.SCT.Tissue, codes.SCT.Nucleus),
    "cell": (codes.SCT.Tissue, codes.SCT.Cell),
}

# DCM 111012 "Certainty of Finding": the CAD concept for how sure the detector is.
CONFIDENCE_CONCEPT = codes.DCM.CertaintyOfFinding
CONFIDENCE_UNIT = codes.UCUM.NoUnits  # UCUM "1"


def _check_lo(name: str, value: str) -> None:
    # LO: at most 64 characters, no backslash (value separator) and no control characters.
    if len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{name} must be at most 64 printable characters without '\\', got {value!r}")


def label_code(label: str) -> Code:
    """The private ``99ONEVLM`` code for a label that has no standard concept.

    Parameters
    ----------
    label : str
        The annotation label (at most 64 characters).

    Returns
    -------
    pydicom.sr.coding.Code
        The same private finding code the routing SR and the box SEG give this label (stable
        across runs and machines; see :func:`onevlm.reports.coding.private_code`).
    """
    code = coding.private_code("FND", label)
    return Code(code.value, code.scheme_designator, code.meaning)


def label_codes(label: str) -> tuple[Code, Code]:
    """Annotated property (category, type) for a label.

    Parameters
    ----------
    label : str
        The annotation label.

    Returns
    -------
    tuple of pydicom.sr.coding.Code
        SNOMED CT codes from :data:`STANDARD_LABELS` when the label (case-insensitive) has one,
        otherwise (:data:`FINDING_CATEGORY`, :func:`label_code` of the label).
    """
    standard = STANDARD_LABELS.get(label.strip().lower())
    if standard is not None:
        return standard
    return FINDING_CATEGORY, label_code(label)


def _derived_uid(seed: str, *parts: str) -> UID:
    # Same seed and parts give the same UID, so a caller that fixes the instance UID gets a
    # reproducible object; otherwise the seed is random.
    return generate_uid(entropy_srcs=[seed, *parts])


def build_box_annotations(
    source: pydicom.Dataset,
    boxes: Sequence[ImageBox],
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 901,
    instance_number: int = 1,
    algorithm_name: str = "onevlm",
    algorithm_version: str = __version__,
    manufacturer: str = "onevlm",
    device_serial_number: str = "onevlm-research",
) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    """Build a Microscopy Bulk Simple Annotations object holding boxes on one slide.

    Parameters
    ----------
    source : pydicom.Dataset
        Header of the slide's level-0 VOLUME instance (``WholeSlide.source_dataset``); the
        object joins its study and references it.
    boxes : sequence of ImageBox
        At least one box, in level-0 pixels, each inside the source's Total Pixel Matrix.
    series_instance_uid, sop_instance_uid : str, optional
        UIDs for the new series and instance; generated when omitted. When
        ``sop_instance_uid`` is given, the group UIDs (and a missing series UID) are derived
        from it, so equal inputs give an identical object.
    series_number, instance_number : int
        Positive numbers of the new series and instance.
    algorithm_name, algorithm_version : str
        Written to the Algorithm Identification Sequence of every group and as the model
        name and software version of the equipment.
    manufacturer : str
        Manufacturer of the "device" (this software).
    device_serial_number : str
        Device Serial Number (required by the equipment module).

    Returns
    -------
    highdicom.ann.MicroscopyBulkSimpleAnnotations
        The object, ready for ``save_as``/``dcmwrite``.

    Raises
    ------
    TypeError
        If ``source`` is not a dataset or a box is not a :class:`ImageBox`.
    ValueError
        If ``source`` is not a VL Whole Slide Microscopy VOLUME image, there are no boxes, a box
        lies outside the image, or a number or name is invalid.
    """
    if not isinstance(source, pydicom.Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    if str(source.get("SOPClassUID", "")) != WSI_SOP_CLASS_UID:
        raise ValueError(f"source SOP Class {source.get('SOPClassUID')} is not VL Whole Slide Microscopy Image")
    image_type = [str(v).upper() for v in (source.get("ImageType") or [])]
    if len(image_type) < 3 or image_type[2] != "VOLUME":
        raise ValueError(f"source {source.get('SOPInstanceUID')} is not a VOLUME image (ImageType {image_type})")
    if not boxes:
        raise ValueError("boxes must hold at least one ImageBox")
    for index, box in enumerate(boxes):
        if not isinstance(box, ImageBox):
            raise TypeError(f"boxes[{index}] must be a ImageBox, got {type(box).__name__}")
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a positive integer, got {number!r}")
    for name, text in (("algorithm_name", algorithm_name), ("algorithm_version", algorithm_version),
                       ("manufacturer", manufacturer), ("device_serial_number", device_serial_number)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string")
        _check_lo(name, text)

    columns = int(source.get("TotalPixelMatrixColumns") or source.Columns)
    rows = int(source.get("TotalPixelMatrixRows") or source.Rows)
    for index, box in enumerate(boxes):
        if box.x1 > columns or box.y1 > rows:
            raise ValueError(f"boxes[{index}] ({box.x0}, {box.y0})-({box.x1}, {box.y1}) lies outside "
                             f"the {columns}x{rows} total pixel matrix")

    if sop_instance_uid is None:
        sop_instance_uid = hd.UID()
        seed = str(sop_instance_uid)
    else:
        seed = str(sop_instance_uid)
    if series_instance_uid is None:
        series_instance_uid = _derived_uid(seed, "series")

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm_version,
        source=manufacturer,
    )

    by_label: dict[str, list[ImageBox]] = {}
    for box in boxes:  # dict keeps first-seen label order, so group numbers are stable
        by_label.setdefault(box.label, []).append(box)

    groups: list[hd.ann.AnnotationGroup] = []
    private_used = False
    for number, (label, members) in enumerate(by_label.items(), start=1):
        category, prop_type = label_codes(label)
        private_used |= PRIVATE_SCHEME in (category.scheme_designator, prop_type.scheme_designator)
        measurements = None
        if any(box.confidence is not None for box in members):
            values = np.array([np.nan if b.confidence is None else float(b.confidence) for b in members])
            measurements = [hd.ann.Measurements(name=CONFIDENCE_CONCEPT, values=values, unit=CONFIDENCE_UNIT)]
        groups.append(hd.ann.AnnotationGroup(
            number=number,
            uid=_derived_uid(seed, "group", label),
            label=label,
            annotated_property_category=category,
            annotated_property_type=prop_type,
            graphic_type=hd.ann.GraphicTypeValues.RECTANGLE,
            graphic_data=[box.corners() for box in members],
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            measurements=measurements,
            description="Research use only, not for clinical use",
        ))

    coding_schemes = None
    if private_used:
        coding_schemes = [coding.scheme_item()]

    annotations = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number=device_serial_number,
        content_description=CONTENT_DESCRIPTION,
        series_description=SERIES_DESCRIPTION,
        coding_schemes=coding_schemes,
    )
    logger.info("built bulk annotations %s: %d boxes in %d groups on source %s (series %s)",
                sop_instance_uid, len(boxes), len(groups), source.SOPInstanceUID, source.SeriesInstanceUID)
    return annotations
