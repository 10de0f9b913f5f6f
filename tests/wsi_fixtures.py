"""Builders for small whole-slide test images, made from the H&E tile that `wsidicom-data` ships.

``make_pyramid_tiff`` writes a 3-level, 256-pixel-tiled, JPEG-compressed pyramidal TIFF with
``tifffile``; ``dicomize`` converts it to a DICOM VL Whole Slide Microscopy Image with
``wsidicomizer``. Nothing is downloaded.
"""

from __future__ import annotations

import datetime
from importlib.resources import files
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

LEVEL0_SIZE = (1024, 768)  # width, height
TILE = 256
LEVELS = 3
MPP = 0.5
# Painted white (glass) in level-0 pixels: (x0, y0, x1, y1), exactly one 256-pixel tile.
WHITE_BOX = (768, 0, 1024, 256)


def he_tile() -> np.ndarray:
    """The 240x240 RGB H&E tile shipped in the `wsidicom-data` wheel."""
    path = files("wsidicom_data") / "data" / "test_tile.png"
    with Image.open(str(path)) as image:
        return np.asarray(image.convert("RGB"))


def level0_pixels() -> np.ndarray:
    """Level-0 RGB pixels: the tile mirrored into a seamless block, repeated, one white area."""
    tile = he_tile()
    block = np.concatenate([tile, tile[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    width, height = LEVEL0_SIZE
    reps = (height // block.shape[0] + 1, width // block.shape[1] + 1, 1)
    pixels = np.tile(block, reps)[:height, :width].copy()
    x0, y0, x1, y1 = WHITE_BOX
    pixels[y0:y1, x0:x1] = 255
    return pixels


def make_pyramid_tiff(path: Path) -> Path:
    """Write a pyramidal tiled TIFF (level 0 plus 2 halvings as SubIFDs) to ``path``."""
    levels = [level0_pixels()]
    for _ in range(LEVELS - 1):
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    options = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                   compressionargs={"level": 90}, resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as writer:
        per_cm = 1e4 / MPP
        writer.write(levels[0], subifds=LEVELS - 1, resolution=(per_cm, per_cm), **options)
        for index, level in enumerate(levels[1:], start=1):
            scaled = per_cm / 2**index
            writer.write(level, subfiletype=1, resolution=(scaled, scaled), **options)
    return path


def dicomize(tiff: Path, folder: Path) -> list[Path]:
    """Convert ``tiff`` to DICOM WSI instances in ``folder`` with wsidicomizer; return the files."""
    import pydicom

    # Importing wsidicomizer switches pydicom to its "future" mode process-wide
    # (config.future_behavior()): stricter writing validation and no Dataset.pixel_array fallback
    # for every later test. Put pydicom's settings back as they were.
    config = pydicom.config
    saved = (config._use_future, config.INVALID_KEYWORD_BEHAVIOR,
             config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    from wsidicom.metadata import Patient, Study
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.metadata import WsiDicomizerMetadata

    config._use_future, config.INVALID_KEYWORD_BEHAVIOR = saved[:2]
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved[2:]

    folder.mkdir(parents=True, exist_ok=True)
    # Synthetic identifiers, so the study-level attributes viewers and DICOMDIRs want are set.
    metadata = WsiDicomizerMetadata(
        study=Study(identifier="WSI-TEST", date=datetime.date(2024, 1, 2), time=datetime.time(3, 4, 5),
                    accession_number="ACC-TEST"),
        patient=Patient(name="Synthetic^Slide", identifier="SYNTH-0001"),
    )
    written = WsiDicomizer.convert(tiff, folder, metadata=metadata, tile_size=TILE,
                                   include_label=False, include_overview=False)
    return [Path(p) for p in written]
