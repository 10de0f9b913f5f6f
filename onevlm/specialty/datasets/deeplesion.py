"""DeepLesion-style CT lesion sets (Yan et al. 2018): ``DL_info.csv`` and the key-slice PNGs.

Accepted layout::

    ROOT/
      DL_info.csv              the real file's columns (all required):  File_name, Patient_index,
                               Study_index, Series_ID, Key_slice_index, Measurement_coordinates,
                               Bounding_boxes, Lesion_diameters_Pixel_, Normalized_lesion_location,
                               Coarse_lesion_type, Possibly_noisy, Slice_range, Spacing_mm_px_,
                               Image_size, DICOM_windows, Patient_gender, Patient_age, Train_Val_Test
      Images_png/              (any case)
        <P>_<S>_<SE>/<slice>.png   for File_name ``<P>_<S>_<SE>_<slice>.png``

Slices are 16-bit greyscale PNGs storing ``HU + 32768``. A slice loads as 8-bit RGB after the
row's ``DICOM_windows`` (``"low, high"`` in HU): ``clip(HU, low, high)`` mapped linearly to
0..255. One sample per CSV row (per lesion; a slice with two lesions gives two samples), task
``region-classification``: the ``Bounding_boxes`` box (``"x1, y1, x2, y2"``, pixels, clipped to the
image) as a :class:`NormalisedBox` labelled with the lesion type, which is also the sample's label.
``Coarse_lesion_type`` 1..8 are bone, abdomen, mediastinum, liver, lung, kidney, soft tissue,
pelvis (label 0..7); -1 (not labelled: the official train split) rows are skipped and counted.
``Train_Val_Test`` 1, 2, 3 are train, val, test.

Patient fields (index, gender, age) are never logged, and neither is the file name (it starts
with the patient index): errors and ``source`` name the CSV row. Research use only.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from onevlm.specialty.datasets._common import DatasetError, check_split, child_dir, existing_dir, existing_file
from onevlm.specialty.samples import DatasetInfo, LabelledImage, NormalisedBox

logger = logging.getLogger(__name__)

DEEPLESION_COLUMNS = (
    "File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
    "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type",
    "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender",
    "Patient_age", "Train_Val_Test",
)
LESION_TYPES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft tissue", "pelvis")
HU_OFFSET = 32768
SPLIT_CODES = {"1": "train", "2": "val", "3": "test"}

DEEPLESION_INFO = DatasetInfo(
    name="deeplesion", task_type="region-classification", class_names=LESION_TYPES, specialty="radiology",
    description="DeepLesion (Yan et al. 2018): CT key slices, one boxed lesion per sample, 8 coarse lesion types.")

_FILE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.png$", re.IGNORECASE)


@dataclass(frozen=True)
class WindowedSlice:
    """Lazy loader of a 16-bit DeepLesion slice windowed to 8-bit RGB (picklable).

    ``where`` names the CSV row for errors (never the path: it carries the patient index).
    """

    path: Path
    low: float
    high: float
    where: str

    def __call__(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                image.load()
                mode = image.mode
                pixels = np.asarray(image)
        except FileNotFoundError as error:
            raise DatasetError(f"{self.where}: the key-slice PNG does not exist") from error
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise DatasetError(f"{self.where}: cannot read the key-slice PNG ({error})") from error
        if mode not in ("I;16", "I;16B", "I;16L", "I") or pixels.ndim != 2:
            raise DatasetError(f"{self.where}: the key-slice PNG must be 16-bit greyscale, found mode {mode}")
        return Image.fromarray(window_hu(pixels.astype(np.int32) - HU_OFFSET, self.low, self.high)).convert("RGB")


def window_hu(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map Hounsfield units to uint8 with the window ``[low, high]`` (clipped, linear, rounded).

    Parameters
    ----------
    hu : numpy.ndarray
        Pixel values in HU.
    low, high : float
        The window's bounds, ``low < high``.

    Returns
    -------
    numpy.ndarray
        uint8 array of the same shape: ``low`` and below -> 0, ``high`` and above -> 255.
    """
    if not high > low:
        raise ValueError(f"window must have low < high, got ({low}, {high})")
    scaled = (np.clip(hu.astype(np.float64), low, high) - low) / (high - low) * 255.0
    return np.rint(scaled).astype(np.uint8)


def _floats(row: dict[str, str], column: str, count: int, where: str) -> tuple[float, ...]:
    text = (row.get(column) or "").strip()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise DatasetError(f"{where}: {column} must be {count} comma-separated numbers, got {text!r}") from error
    if len(values) != count or not all(np.isfinite(values)):
        raise DatasetError(f"{where}: {column} must be {count} comma-separated numbers, got {text!r}")
    return values


def _integer(row: dict[str, str], column: str, where: str) -> int:
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise DatasetError(f"{where}: {column} must be an integer, got {text!r}")
    return int(value)


def _slice_path(images_dir: Path, file_name: str, where: str) -> Path:
    match = _FILE_NAME.match(file_name.strip())
    if match is None:
        raise DatasetError(f"{where}: File_name is not <patient>_<study>_<series>_<slice>.png")
    folder = images_dir / "_".join(match.groups()[:3])
    slice_text = match[4]
    for candidate in (f"{slice_text}.png", f"{int(slice_text):03d}.png", f"{int(slice_text)}.png"):
        if (folder / candidate).is_file():
            return folder / candidate
    return folder / f"{slice_text}.png"


def _png_size(path: Path, where: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.width, image.height
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{where}: cannot read the key-slice PNG ({error})") from error


def read_deeplesion(root: str | Path, split: str, *, images_dir: str | Path | None = None,
                    missing: Literal["error", "skip"] = "error",
                    skip_noisy: bool = False) -> tuple[DatasetInfo, list[LabelledImage]]:
    """Read one split of a DeepLesion-style folder; slices load (and are windowed) lazily.

    Parameters
    ----------
    root : str or Path
        The folder holding ``DL_info.csv`` and ``Images_png``, or the CSV file itself.
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    images_dir : str or Path, optional
        The key-slice folder when it is not ``<root>/Images_png``.
    missing : {"error", "skip"}
        What a row whose PNG is absent does: raise, or be skipped and counted (for a partial download).
    skip_noisy : bool
        Skip rows flagged ``Possibly_noisy`` = 1.

    Returns
    -------
    tuple of (DatasetInfo, list of LabelledImage)
        :data:`DEEPLESION_INFO` and one sample per lesion of the split, in CSV order; ``source`` is
        ``"DL_info.csv:row<line>"``.

    Raises
    ------
    DatasetError
        If the CSV or image folder is missing, the CSV lacks a column, or a row of the split is
        malformed (split code, lesion type, box, window, size or file name); the message names the
        CSV and its line, never patient fields.
    """
    split = check_split(split)
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    base = Path(root)
    if base.suffix.lower() == ".csv":
        csv_path = existing_file(base, "DeepLesion info CSV")
        base = csv_path.parent
    else:
        base = existing_dir(base, "DeepLesion root folder")
        csv_path = existing_file(base / "DL_info.csv", "DeepLesion info CSV")
    if images_dir is not None:
        slices_dir = existing_dir(images_dir, "DeepLesion image folder")
    else:
        found = child_dir(base, ("Images_png",))
        if found is None:
            raise DatasetError(f"{base}: no Images_png folder next to {csv_path.name}")
        slices_dir = found
    samples: list[LabelledImage] = []
    skipped = {"unknown type": 0, "noisy": 0, "missing image": 0, "clipped box": 0}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            columns = [c.strip() for c in reader.fieldnames or ()]
            absent = [c for c in DEEPLESION_COLUMNS if c not in columns]
            if absent:
                raise DatasetError(f"{csv_path}: missing column(s) {', '.join(absent)}")
            reader.fieldnames = columns
            for row in reader:
                where = f"{csv_path} line {reader.line_num}"
                code = (row.get("Train_Val_Test") or "").strip()
                if code not in SPLIT_CODES:
                    raise DatasetError(f"{where}: Train_Val_Test must be 1, 2 or 3, got {code!r}")
                if SPLIT_CODES[code] != split:
                    continue
                sample = _row_sample(row, where, reader.line_num, csv_path, slices_dir, split, missing,
                                     skip_noisy, skipped)
                if sample is not None:
                    samples.append(sample)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{csv_path}: cannot read the CSV ({error})") from error
    logger.info("deeplesion %s: %d lesions (skipped: %d unknown type, %d noisy, %d missing image; %d boxes "
                "clipped to the image)", split, len(samples), skipped["unknown type"], skipped["noisy"],
                skipped["missing image"], skipped["clipped box"])
    return DEEPLESION_INFO, samples


def _row_sample(row: dict[str, str], where: str, line: int, csv_path: Path, slices_dir: Path, split: str,
                missing: str, skip_noisy: bool, skipped: dict[str, int]) -> LabelledImage | None:
    lesion_type = _integer(row, "Coarse_lesion_type", where)
    if lesion_type == -1:
        skipped["unknown type"] += 1
        return None
    if not 1 <= lesion_type <= len(LESION_TYPES):
        raise DatasetError(f"{where}: Coarse_lesion_type must be 1..{len(LESION_TYPES)} or -1, got {lesion_type}")
    if skip_noisy and _integer(row, "Possibly_noisy", where) == 1:
        skipped["noisy"] += 1
        return None
    low, high = _floats(row, "DICOM_windows", 2, where)
    if not high > low:
        raise DatasetError(f"{where}: DICOM_windows must be 'low, high' with low < high, got ({low:g}, {high:g})")
    path = _slice_path(slices_dir, row.get("File_name") or "", where)
    if not path.is_file():
        if missing == "skip":
            skipped["missing image"] += 1
            return None
        raise DatasetError(f"{where}: the key-slice PNG named by File_name is not in {slices_dir.name}/")
    size_a, size_b = _floats(row, "Image_size", 2, where)
    if size_a <= 0 or size_b <= 0:
        raise DatasetError(f"{where}: Image_size must be positive, got ({size_a:g}, {size_b:g})")
    if size_a == size_b:
        width, height = size_a, size_b
    else:  # the column's order is not documented: take the PNG's own, which must agree
        png_width, png_height = _png_size(path, where)
        if sorted((png_width, png_height)) != sorted((size_a, size_b)):
            raise DatasetError(f"{where}: Image_size ({size_a:g}, {size_b:g}) disagrees with the PNG "
                               f"({png_width}x{png_height})")
        width, height = float(png_width), float(png_height)
    x0, y0, x1, y1 = _floats(row, "Bounding_boxes", 4, where)
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if not (cx0 < cx1 and cy0 < cy1):
        raise DatasetError(f"{where}: Bounding_boxes ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or outside the "
                           f"{width:g}x{height:g} image")
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        skipped["clipped box"] += 1
    label = lesion_type - 1
    box = NormalisedBox(cx0 / width, cy0 / height, cx1 / width, cy1 / height, label)
    return LabelledImage(dataset=DEEPLESION_INFO.name, split=split,
                         load=WindowedSlice(path, low, high, where), labels=(label,), boxes=(box,),
                         source=f"{csv_path.name}:row{line}")
