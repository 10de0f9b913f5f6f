"""DICOM pixel data to the RGB image a VLM sees: modality LUT, windowing, photometric handling.

Grey-scale: the Modality LUT (rescale slope/intercept) then the file's VOI LUT or window; a CT
without one gets a preset window for its anatomy (brain, lung, else soft tissue); any other file
without one is windowed to its 0.5–99.5 percentile range. MONOCHROME1 is inverted so that
dense structures are bright, as readers see them. Colour (RGB, YBR — pydicom converts to RGB —
and PALETTE COLOR) keeps its colours. A multi-frame object gives its middle frame. Images larger
than ``MAX_SIDE`` are downscaled (the VLM's processor resizes to its own input size anyway).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from onevlm.inputs.routing_input import RoutingInput

MAX_SIDE = 1024
PERCENTILES = (0.5, 99.5)

#: CT window presets (centre, width) in Hounsfield units, by Body Part Examined.
CT_WINDOWS = {"brain": (40.0, 80.0), "lung": (-600.0, 1500.0), "soft tissue": (40.0, 400.0)}
CT_WINDOW_BY_BODY_PART = {"HEAD": "brain", "BRAIN": "brain", "SKULL": "brain", "CHEST": "lung", "LUNG": "lung", "THORAX": "lung"}


def ct_preset(ds: pydicom.Dataset) -> tuple[float, float]:
    """The preset (centre, width) for a CT slice that carries no window of its own."""
    name = CT_WINDOW_BY_BODY_PART.get(str(ds.get("BodyPartExamined", "")).upper(), "soft tissue")
    return CT_WINDOWS[name]


def _apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo, hi = centre - width / 2.0, centre + width / 2.0
    return ((np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0 + 0.5).astype(np.uint8)


class ImageConversionError(ValueError):
    """Pixel data could not be turned into an image; the message names the file."""


def _window_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values, PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    scaled = (np.clip(values, lo, hi) - lo) / (hi - lo)
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def _frame(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and pixels.ndim == (4 if samples > 1 else 3):
        return pixels[frames // 2]
    return pixels


def dicom_to_image(source: str | Path | pydicom.Dataset) -> Image.Image:
    """The RGB :class:`PIL.Image.Image` of a DICOM image: a file, or a dataset already parsed.

    A dataset whose Pixel Data was left on disk (:func:`onevlm.dicom.header.read_dicom`) reads
    just that value from its file; the header is not parsed again.

    Raises
    ------
    ImageConversionError
        If the file has no pixel data or its pixels cannot be decoded.
    """
    path = Path(source.filename if isinstance(source, pydicom.Dataset) and source.filename else
                "<dataset>" if isinstance(source, pydicom.Dataset) else source)
    try:
        ds = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(path)
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise ImageConversionError(f"{path.name}: no pixel data")
        # pydicom.pixels.pixel_array works whatever mode another library put pydicom in
        pixels = _frame(ds, pixel_array(ds))
    except ImageConversionError:
        raise
    except Exception as exc:
        raise ImageConversionError(f"{path.name}: cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        if rgb.dtype != np.uint8:
            rgb = (rgb / max(float(rgb.max()), 1.0) * 255).astype(np.uint8)
        image = Image.fromarray(rgb, mode="RGB")
    elif pixels.ndim == 3 and pixels.shape[-1] == 3:
        rgb = pixels if pixels.dtype == np.uint8 else _window_to_uint8(pixels.astype(np.float64))
        image = Image.fromarray(rgb, mode="RGB")
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            grey = _window_to_uint8(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
        elif str(ds.get("Modality", "")).upper() == "CT":
            grey = _apply_window(values, *ct_preset(ds))
        else:
            grey = _window_to_uint8(values)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey, mode="L").convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def load_image(item: RoutingInput) -> Image.Image:
    """The RGB image of a routing input (DICOM or an ordinary image file).

    An image attached to the input (a whole-slide thumbnail, say) is used as it is.
    """
    if item.image is not None:
        return item.image
    if item.kind == "dicom":
        return dicom_to_image(item.dataset if item.dataset is not None else item.path)
    try:
        with Image.open(item.path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise ImageConversionError(f"{item.path.name}: cannot read image: {exc}") from exc
