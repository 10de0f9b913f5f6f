"""DICOM pixels to the image a VLM sees, across modalities, photometrics and transfer syntaxes."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from onevlm.imaging.dicom_to_image import MAX_SIDE, ImageConversionError, ct_preset, dicom_to_image

from conftest import SAMPLES, pydicom_file


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # CT, uncompressed, signed 16-bit
        "J2K_pixelrep_mismatch.dcm",  # CT, JPEG 2000 lossless
        "MR_small_RLE.dcm",  # MR, RLE lossless
        "MR_small_jpeg_ls_lossless.dcm",  # MR, JPEG-LS
        "emri_small_jpeg_2k_lossless.dcm",  # enhanced MR, 10 frames, JPEG 2000
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # US, JPEG lossless
        "SC_rgb_jpeg_dcmtk.dcm",  # RGB, JPEG baseline (YBR_FULL)
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422
        "OBXXXX1A_rle.dcm",  # PALETTE COLOR, RLE
        "RG1_J2KI.dcm",  # CR, MONOCHROME1, JPEG 2000, 1955x1841
        "JPEG2000.dcm",  # NM, JPEG 2000
        "SC_rgb_16bit.dcm",  # RGB 16-bit
        "color3d_jpeg_baseline.dcm",  # US multi-frame colour, JPEG baseline
    ],
)
def test_real_files_become_rgb_images(name):
    image = dicom_to_image(pydicom_file(name))
    assert image.mode == "RGB"
    assert max(image.size) <= MAX_SIDE
    pixels = np.asarray(image)
    assert pixels.std() > 0  # not a blank image


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    normal = np.asarray(dicom_to_image(_save(ds, tmp_path / "m2.dcm")))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = np.asarray(dicom_to_image(_save(ds, tmp_path / "m1.dcm")))
    assert np.abs(normal.astype(int) + inverted.astype(int) - 255).max() <= 1


def test_ct_without_window_gets_a_preset(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.BodyPartExamined = "HEAD"
    assert ct_preset(ds) == (40.0, 80.0)
    head = np.asarray(dicom_to_image(_save(ds, tmp_path / "head.dcm")))
    ds.BodyPartExamined = "CHEST"
    assert ct_preset(ds) == (-600.0, 1500.0)
    chest = np.asarray(dicom_to_image(_save(ds, tmp_path / "chest.dcm")))
    assert not np.array_equal(head, chest)  # the window follows the anatomy


def test_multiframe_gives_the_middle_frame(tmp_path):
    ds = pydicom.dcmread(pydicom_file("emri_small.dcm"))
    frames = ds.pixel_array
    middle = frames[len(frames) // 2]
    image = np.asarray(dicom_to_image(pydicom_file("emri_small.dcm")).convert("L")).astype(float)
    correlation = np.corrcoef(image.ravel(), middle.astype(float).ravel())[0, 1]
    assert correlation > 0.95


def test_large_images_are_downscaled():
    image = dicom_to_image(SAMPLES / "cr_chest_j2k.dcm")  # 1955 x 1841
    assert max(image.size) == MAX_SIDE


def test_objects_without_pixels_and_corrupt_pixels_name_the_file(tmp_path):
    with pytest.raises(ImageConversionError, match="rt_plan.dcm: no pixel data"):
        dicom_to_image(SAMPLES / "rt_plan.dcm")
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data
    with pytest.raises(ImageConversionError, match="short.dcm: cannot decode pixel data"):
        dicom_to_image(_save(ds, tmp_path / "short.dcm"))


def _save(ds: pydicom.Dataset, path):
    ds.save_as(path, enforce_file_format=True)
    return path
