"""Bounding boxes as a DICOM Segmentation (binary, one segment per label), built with highdicom.

For radiology and endoscopy frames: each box becomes a filled rectangle in a binary segment on
the frame it was found on, so any SEG-aware viewer overlays it on the source image. (Whole-slide
images use Microscopy Bulk Simple Annotations instead: see ``bulk_annotations``.)
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from onevlm import __version__
from onevlm.reports import coding
from onevlm.reports.boxes import ImageBox
from onevlm.reports.source_attributes import evidence_ready

SEG_SERIES_NUMBER = 9902
SEG_DESCRIPTION = "onevlm boxes - research use only, not for clinical use"


def seg_uids(study_uid: str, source_series_uid: str) -> tuple[str, str]:
    """Deterministic (series, instance) UIDs of the box SEG for a source series."""
    return (
        generate_uid(entropy_srcs=[study_uid, source_series_uid, "onevlm-box-seg-series"]),
        generate_uid(entropy_srcs=[study_uid, source_series_uid, "onevlm-box-seg-instance"]),
    )


def _frames(source: pydicom.Dataset) -> int:
    return int(source.get("NumberOfFrames", 1) or 1)


def box_masks(source: pydicom.Dataset, boxes: Sequence[ImageBox], labels: Sequence[str]) -> np.ndarray:
    """Masks of shape (frames, rows, columns, segments): each box filled in its label's segment."""
    rows, columns = int(source.Rows), int(source.Columns)
    mask = np.zeros((_frames(source), rows, columns, len(labels)), dtype=bool)
    for box in boxes:
        frame = (box.frame or 1) - 1
        if frame >= mask.shape[0]:
            raise ValueError(f"box on frame {box.frame}, but the source has {mask.shape[0]} frame(s)")
        x0, y0 = int(np.floor(box.x0)), int(np.floor(box.y0))
        x1, y1 = min(int(np.ceil(box.x1)), columns), min(int(np.ceil(box.y1)), rows)
        if x0 >= columns or y0 >= rows:
            raise ValueError(f"box ({box.x0}, {box.y0}, {box.x1}, {box.y1}) lies outside the {columns}x{rows} image")
        mask[frame, y0:y1, x0:x1, labels.index(box.label)] = True
    return mask


def build_box_seg(source: pydicom.Dataset, boxes: Sequence[ImageBox],
                  sop_instance_uid: str | None = None) -> hd.seg.Segmentation:
    """Build a binary SEG of ``boxes`` on the image ``source`` (a full dataset, pixels included).

    ``sop_instance_uid`` overrides the first version's UID (derived from the source series).

    Raises
    ------
    ValueError
        If there are no boxes or a box lies outside the image.
    """
    if not boxes:
        raise ValueError("a box SEG needs at least one box")
    labels = list(dict.fromkeys(box.label for box in boxes))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="onevlm specialty model", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=coding.finding_code(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, label in enumerate(labels)
    ]
    series_uid, instance_uid = seg_uids(str(source.StudyInstanceUID), str(source.SeriesInstanceUID))
    instance_uid = sop_instance_uid or instance_uid
    seg = hd.seg.Segmentation(
        source_images=[evidence_ready(source)],
        pixel_array=box_masks(source, boxes, labels),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="onevlm",
        manufacturer_model_name="onevlm",
        software_versions=__version__,
        device_serial_number=__version__,
        series_description=SEG_DESCRIPTION,
        coding_schemes=[coding.scheme_item()],
    )
    if "FrameOfReferenceUID" not in seg:
        # Projection images (CR, US, endoscopy) carry Patient Orientation instead of a patient
        # coordinate system; the SEG repeats it (Type 2C), empty when the source has none.
        seg.PatientOrientation = source.get("PatientOrientation", "") or ""
        _drop_invalid_pixel_spacing(seg)
    return seg


def _drop_invalid_pixel_spacing(seg: hd.seg.Segmentation) -> None:
    """Remove pixel measures copied from a source whose Pixel Spacing is zero (not a spacing at all).

    Without a frame of reference the measures are optional; a zero spacing would be invalid.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures and any(float(v) <= 0 for v in measures[0].get("PixelSpacing", [1, 1])):
        del shared.PixelMeasuresSequence
