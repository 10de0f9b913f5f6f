"""The embedded default backend on real DICOM from pydicom / pydicom-data (no pixels read)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from onevlm.inputs import InputError, load_input

from conftest import SAMPLES, pydicom_file


def route(router, path: Path, hint: str | None = None):
    return router.route(load_input(path, hint=hint))


@pytest.mark.parametrize(
    "name,modality",
    [
        ("17106", "brain CT scan"),  # CT HEAD, "CT, HEAD/BRAIN WO CONTRAST"
        ("J2K_pixelrep_mismatch.dcm", "brain CT scan"),  # CT HEAD, JPEG 2000
        ("4950", "brain MRI scan"),  # MR, study "Brain"
        ("emri_small.dcm", "brain MRI scan"),  # enhanced MR, HEAD
        ("RG1_J2KI.dcm", "chest X-ray scan"),  # CR CHEST
        ("explicit_VR-UN.dcm", "abdominal CT scan"),  # CT PANCREAS
    ],
)
def test_routes_real_images_to_their_modality(embedded_router, name, modality):
    decision = route(embedded_router, pydicom_file(name))
    assert decision.error is None
    assert decision.modality == modality
    s1 = decision.stages[0]
    assert s1.confidence > 0.5
    assert s1.evidence["pixels_read"] is False
    assert s1.evidence["header"]["Modality"]  # says which evidence it used
    assert decision.pipeline_card_id is not None
    card = embedded_router.cards.get(decision.pipeline_card_id)
    assert card.modality == modality  # stage 3 chose among that modality's cards
    assert decision.stages[2].chosen_record.justification
    # No finding in these headers: the router routes the modality's cards as a set, not stage 3's guess.
    assert not decision.finding_assessed and decision.finding is None
    assert decision.outcome.outcome in ("routed", "routed-set")
    assert set(decision.cards) == {c.id for c in embedded_router.cards.by_modality(modality)}
    assert decision.confidence <= decision.outcome.stages[0].p


@pytest.mark.parametrize("name", ["rtplan.dcm", "reportsi.dcm", "test-SR.dcm", "waveform_ecg.dcm", "rtdose.dcm", "liver.dcm"])
def test_non_image_objects_stop_at_none(embedded_router, name):
    decision = route(embedded_router, pydicom_file(name))
    assert decision.error is None
    assert [s.chosen for s in decision.stages] == ["None"]
    assert decision.stopped_early and decision.model_card_id is None
    assert decision.stages[0].evidence["non_image"]


@pytest.mark.parametrize(
    "name,why",
    [
        ("RG3_J2KI.dcm", "extremity"),  # CR of a femur: no card covers bone X-ray
        ("examples_overlay.dcm", "liver"),  # MR abdomen^liver: no liver MRI card
        ("color-pl.dcm", "heart"),  # echocardiogram
        ("OBXXXX1A_rle.dcm", "uterus"),  # obstetric ultrasound
        ("JPEG2000.dcm", "NM"),  # nuclear medicine: no card accepts NM
    ],
)
def test_medical_images_no_card_covers_stop_at_other(embedded_router, name, why):
    decision = route(embedded_router, pydicom_file(name))
    assert decision.modality == "Other"
    assert decision.stopped_early
    assert why in decision.stages[0].evidence["reasons"]["Other"]


def test_probabilities_are_a_distribution(embedded_router):
    for path in sorted(SAMPLES.glob("*.dcm")):
        decision = route(embedded_router, path)
        for stage in decision.stages:
            ps = [c.p for c in stage.candidates]
            assert ps == sorted(ps, reverse=True)
            assert 0 < sum(ps) <= 1.0 + 1e-9
            assert stage.evidence["temperature"] > 0


def test_no_finding_text_is_no_finding(embedded_router):
    decision = route(embedded_router, pydicom_file("emri_small.dcm"))
    s2 = decision.stages[1]
    assert s2.chosen == "Normal"  # the paper's default answer, kept for the log ...
    assert s2.confidence < 0.1
    assert "no evidence" in s2.evidence["note"]
    assert not s2.informative and not s2.evidence["informative"]  # ... but never presented as a finding
    assert decision.finding is None and decision.as_dict()["finding"] is None
    assert any("stage 2 had no evidence" in r for r in decision.outcome.reasons)


def test_a_finding_named_in_the_header_reaches_stage3(embedded_router, tmp_path):
    ds = pydicom.dcmread(pydicom_file("17106"))
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.ReasonForStudy = "suspected subdural hemorrhage after fall"
    path = tmp_path / "ct_head_sdh.dcm"
    ds.save_as(path)
    decision = route(embedded_router, path)
    assert decision.modality == "brain CT scan"
    assert decision.finding == "subdural hemorrhage"
    assert "ReasonForStudy" in decision.stages[1].evidence["support"]["subdural hemorrhage"]
    assert decision.finding_assessed and decision.stages[1].informative
    card = embedded_router.cards.get(decision.pipeline_card_id)
    assert "subdural hemorrhage" in card.findings
    # With evidence at stage 2 the router names one card, and its confidence rests on stage 1.
    assert decision.outcome.outcome == "routed" and decision.model_card_id == card.id
    assert 0 < decision.confidence <= decision.outcome.stages[0].p


def test_png_without_hint_is_other_with_low_confidence(embedded_router, tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(png)
    decision = route(embedded_router, png)
    assert decision.modality == "Other" and decision.stopped_early
    assert decision.stages[0].confidence < 0.2
    assert decision.stages[0].evidence["pixels_read"] is False
    hinted = route(embedded_router, png, hint="Chest X-ray scan")
    assert hinted.modality == "chest X-ray scan"
    assert "user hint" in hinted.stages[0].evidence["source"]
    unknown = route(embedded_router, png, hint="elbow arthrogram")
    assert unknown.modality == "Other"
    assert "matches no admissible modality" in unknown.stages[0].evidence["source"]


def test_bad_inputs_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 10)
    with pytest.raises(InputError, match="corrupt.dcm"):
        load_input(corrupt)
    random_bytes = tmp_path / "notes.bin"
    random_bytes.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="notes.bin: neither a DICOM file nor a supported image"):
        load_input(random_bytes)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.dcm: empty file"):
        load_input(empty)
    with pytest.raises(InputError, match="missing.dcm: no such file"):
        load_input(tmp_path / "missing.dcm")
    broken_png = tmp_path / "broken.png"
    shutil.copy(pydicom_file("17106"), broken_png)
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(InputError, match="broken.png"):
        load_input(broken_png)


def test_png_without_hint_says_what_is_known(embedded_router, tmp_path):
    png = tmp_path / "photo.png"
    Image.new("RGB", (16, 16)).save(png)
    decision = route(embedded_router, png)
    assert not decision.stages[0].informative
    # no verdict ("a modality no card covers"): only that nothing tells the modality
    assert decision.stop_reason == "stage 1: no DICOM header and no hint: the modality is unknown (Other)"
    assert decision.outcome.reasons[0] == decision.stop_reason
    hinted = route(embedded_router, png, hint="chest x-ray")  # normalised as the CLI validates it
    assert hinted.modality == "chest X-ray scan" and hinted.stages[0].informative


# -- pixel data completeness (checked on the header read, no pixel loaded) ----------------------

PYDICOM_IMAGES = [
    "CT_small.dcm", "MR_small.dcm", "17106",  # native 16-bit
    "SC_rgb_small_odd.dcm",  # 27 bytes: the pad byte of an odd length
    "SC_ybr_full_422_uncompressed.dcm",  # subsampled native colour
    "liver.dcm",  # 1-bit SEG, 3 frames
    "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm",  # compressed, 10 frames
    "SC_rgb_rle_32bit_2frame.dcm", "JPEG2000.dcm", "color3d_jpeg_baseline.dcm",
]


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.dcm")), ids=lambda p: p.name)
def test_every_shipped_sample_has_complete_pixel_data(path):
    assert load_input(path).header.pixel_data_problem is None


@pytest.mark.parametrize("name", PYDICOM_IMAGES)
def test_pydicom_images_have_complete_pixel_data(name):
    header = load_input(pydicom_file(name)).header
    assert header.has_pixel_data and header.pixel_data_problem is None


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_pydicom_truncated_files_are_flagged():
    assert load_input(pydicom_file("MR_truncated.dcm")).header.pixel_data_problem == (
        "pixel data truncated: 8130 of 8192 bytes")
    short = load_input(pydicom_file("emri_small_jpeg_2k_lossless_too_short.dcm")).header
    assert short.has_pixel_data and short.pixel_data_problem.startswith("pixel data truncated: ")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_pixel_data_is_found_without_reading_pixels(tmp_path):
    from damaged_dicom import cut_last_fragment, cut_native_pixels

    native = tmp_path / "ct_cut.dcm"
    kept = cut_native_pixels(SAMPLES / "ct_head_routine_brain.dcm", native)
    header = load_input(native).header
    assert header.pixel_data_problem == f"pixel data truncated: {kept} of {2 * kept} bytes"
    # a value above the reader's defer size is measured against the file, not loaded
    big = tmp_path / "mr_cut.dcm"
    kept = cut_native_pixels(SAMPLES / "mr_abdomen_liver.dcm", big)
    assert load_input(big).header.pixel_data_problem == f"pixel data truncated: {kept} of {2 * kept} bytes"
    # compressed: pydicom drops a Pixel Data element that runs past the end; it is still reported
    for name in ("ct_head_512_j2k.dcm", "us_obstetric_rle.dcm", "nm_whole_body_j2k.dcm"):
        cut = tmp_path / f"cut_{name}"
        cut_last_fragment(SAMPLES / name, cut)
        header = load_input(cut).header
        assert header.has_pixel_data and header.non_image_kind is None, name  # still an image
        assert header.pixel_data_problem.startswith("pixel data truncated: "), name
    # the same checks on pydicom's own files
    cut = tmp_path / "cut_emri_rle.dcm"
    cut_last_fragment(pydicom_file("emri_small_RLE.dcm"), cut)
    assert load_input(cut).header.pixel_data_problem.startswith("pixel data truncated: ")


def test_fewer_fragments_than_frames_is_flagged(tmp_path):
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(pydicom_file("emri_small_jpeg_2k_lossless.dcm"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    ds.PixelData = encapsulate(frames[:7])  # three frames lost, the sequence closed as if whole
    path = tmp_path / "seven_of_ten.dcm"
    ds.save_as(path)
    assert load_input(path).header.pixel_data_problem == "pixel data truncated: 7 compressed fragment(s) for 10 frames"
    # frames split over several fragments each are fine (PS3.5 A.4)
    ds.PixelData = encapsulate(frames, fragments_per_frame=2)
    ds.save_as(path)
    assert load_input(path).header.pixel_data_problem is None


def test_pixel_data_check_on_a_dataset_in_memory():
    from onevlm.dicom.pixel_data import pixel_data_problem

    ds = pydicom.dcmread(pydicom_file("SC_rgb_small_odd.dcm"))
    assert len(ds.PixelData) == 28 and pixel_data_problem(ds) is None  # 27 bytes + the pad byte
    ds.PixelData = ds.PixelData[:26]
    assert pixel_data_problem(ds) == "pixel data truncated: 26 of 27 bytes"
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.Rows  # nothing to compare with: not flagged
    assert pixel_data_problem(ds) is None
