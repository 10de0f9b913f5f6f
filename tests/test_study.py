"""A study routed series by series: grouping, skipping, whole slides, SR outputs, metadata.json and series.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from onevlm.imaging.series import load_study
from onevlm.study import route_study, write_study_outputs
from onevlm.study.preparation import prepare_series

from conftest import SAMPLES, pydicom_file
from dicom_validation import dciodvfy_errors
from wsi_fixtures import dicomize, make_pyramid_tiff


def test_series_grouping_and_reading_order():
    folder = pydicom_file("17106").parent  # four CT slices of one series, plus other series nearby
    study = load_study([folder.parent])
    ct = next(s for s in study.series if s.modality == "CT")
    positions = [m.header.slice_position for m in ct.members]
    assert len(ct.members) == 4 and positions == sorted(positions)
    assert ct.representative() is ct.members[2]
    assert all(len({m.header.series_instance_uid for m in s.members}) == 1 for s in study.series)


def test_duplicates_and_problems_are_reported(tmp_path):
    shutil.copy(SAMPLES / "ct_head_512_j2k.dcm", tmp_path / "a.dcm")
    shutil.copy(SAMPLES / "ct_head_512_j2k.dcm", tmp_path / "b.dcm")  # same SOP Instance UID
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    study = load_study([tmp_path])
    assert len(study.series) == 1 and len(study.series[0].members) == 1
    assert [p.path.name for p in study.problems] == ["broken.dcm"]
    assert "broken.dcm" in study.problems[0].message


def test_non_image_series_are_skipped_and_bad_pixels_isolated(tmp_path):
    for name in ("rt_plan.dcm", "sr_simple_image_report.dcm", "ecg_waveform.dcm", "ct_head_512_j2k.dcm"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:64]
    ds.save_as(tmp_path / "truncated_pixels.dcm", enforce_file_format=True)
    prepared = prepare_series(load_study([tmp_path]).series, decode_pixels=True)
    by_file = {p.series.members[0].path.name: p for p in prepared}
    for name, kind in (("rt_plan.dcm", "RT plan"), ("sr_simple_image_report.dcm", "structured report"),
                       ("ecg_waveform.dcm", "waveform")):
        assert by_file[name].skipped.startswith(f"not an image: {kind}")
    assert by_file["truncated_pixels.dcm"].error.startswith("truncated_pixels.dcm: ")
    assert by_file["ct_head_512_j2k.dcm"].item.image is not None  # decoded once, for the VLM


def test_route_study_writes_sr_and_metadata(embedded_router, tmp_path):
    study = route_study(embedded_router, [SAMPLES])
    out = write_study_outputs(study, tmp_path / "out", embedded_router.cards)
    meta = json.loads(out.metadata_file.read_text())
    detail = json.loads(out.detail_file.read_text())
    assert (meta, detail) == (out.metadata, out.detail)
    assert meta["not_for_clinical_use"] is True and detail["not_for_clinical_use"] is True
    assert meta["series"] == len(study.series) == len(detail["entries"])
    # metadata.json is flat (a workflow condition reads top-level scalars only); the lists are in series.json
    assert all(isinstance(v, (str, int, float, bool)) for v in meta.values()), meta
    assert meta["detail_file"] == out.detail_file.name == "series.json"
    assert detail["study_instance_uids"] == sorted({r.series.study_instance_uid for r in study.series})
    assert meta["studies"] == len(detail["study_instance_uids"]) > 1 and "study_instance_uid" not in meta
    entries = {e["input"]: e for e in detail["entries"] if e["input"]}
    head = entries["ct_head_512_j2k.dcm"]
    assert head["modality"] == "brain CT scan" and head["outcome"] == "routed-set" and head["model_card_id"] is None
    assert head["cards"] == ["MODEL_01", "MODEL_02", "MODEL_03", "MODEL_04"] and not head["needs_review"]
    assert head["confidence"] <= head["stage_confidence"]["1"] and head["calibrated"] is False
    assert head["stage_confidence"]["2"] is None  # no finding evidence: no finding probability either
    assert head["stage_confidence"]["3"] is not None and head["stopped_at_stage"] is None
    tie = entries["us_small_parts_j2k.dcm"]
    assert tie["outcome"] == "review" and tie["needs_review"] and tie["cards"] == [] and tie["confidence"] is None
    assert tie["reasons"][0].startswith("stage 1 tie")
    # the study's outcome at the top level, for workflow conditions: review is the most urgent
    assert meta["outcome"] == "review" and meta["needs_review"] is True and meta["reviews"] == 2
    cards = sorted({c for e in detail["entries"] for c in e["cards"]})
    assert meta["cards"].split(",") == detail["model_card_ids"] == cards
    assert meta["with_cards"] == sum(1 for e in detail["entries"] if e["cards"])
    assert meta["confidence"] == min(e["confidence"] for e in detail["entries"] if e["cards"])
    assert meta["calibrated"] is False and "calibration_id" not in meta  # no value: left out, never null
    # the embedded router reads headers only: no VLM call, no header/image disagreement
    assert head["consulted"] == [["header"], ["header"], []] and head["vlm_calls"] == 0
    assert head["disagreement"] is None
    decided = [e for e in detail["entries"] if not e["skipped"] and not e["error"]]
    assert meta["vlm_calls"] == 0 and meta["series_without_vlm"] == len(decided) > 0 and meta["disagreements"] == 0
    liver = entries["mr_abdomen_liver.dcm"]
    assert liver["modality"] == "Other" and liver["stopped_early"] and liver["stopped_at_stage"] == 1
    skipped = [e for e in detail["entries"] if e["skipped"]]
    assert {e["dicom_modality"] for e in skipped} == {"RTPLAN", "SR", "ECG", "SEG"}
    # a retired SOP class (1994 ultrasound) still gets its SR, whose evidence names the retired class
    echo = entries["us_echocardiogram.dcm"]
    assert echo["error"] is None and echo["sr_file"]
    echo_sr = pydicom.dcmread(out.metadata_file.parent / echo["sr_file"])
    evidence = echo_sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.6"
    assert len(out.sr_files) == sum(1 for e in detail["entries"] if not e["skipped"] and not e["error"])
    for path in out.sr_files.values():
        errors = dciodvfy_errors(path)
        if path == out.metadata_file.parent / echo["sr_file"]:
            # that 1994 file's own UIDs (root 999.999) are illegal; the SR must keep its Study UID
            errors = [e for e in errors if "Illegal root for UID" not in e or "999.999." not in e]
        assert errors == [], path.name
        assert hd.sr.srread(path).VerificationFlag == "UNVERIFIED"
    decisions = out.decisions_file.read_text().splitlines()
    assert len(decisions) == sum(1 for e in detail["entries"] if not e["skipped"])


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slide")
    tiff = make_pyramid_tiff(root / "slide.tiff")
    folder = root / "dicom"
    dicomize(tiff, folder)
    return folder


def test_whole_slide_series_is_routed_by_its_thumbnail(embedded_router, dicom_slide, tmp_path):
    study = load_study([dicom_slide])
    assert len(study.series) == 1
    (prepared,) = prepare_series(study.series, decode_pixels=False)
    assert prepared.error is None and prepared.item.image is not None
    assert max(prepared.item.image.size) <= 1024
    routing = route_study(embedded_router, [dicom_slide])
    (result,) = routing.series
    assert result.decision.error is None
    out = write_study_outputs(routing, tmp_path / "out", embedded_router.cards)
    (sr_path,) = out.sr_files.values()
    assert dciodvfy_errors(sr_path) == []
    # one study: its UID is a scalar a workflow condition can read
    assert out.metadata["studies"] == 1 and out.metadata["study_instance_uid"] == result.series.study_instance_uid


def test_boxes_become_sr_regions_and_seg_or_annotations(embedded_router, dicom_slide, tmp_path):
    from onevlm.reports.boxes import ImageBox

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(SAMPLES / "ct_head_512_j2k.dcm", inputs / "ct.dcm")
    shutil.copytree(dicom_slide, inputs / "slide")
    routing = route_study(embedded_router, [inputs])
    series_uid = {r.series.modality: r.series.series_instance_uid for r in routing.series}
    boxes = {series_uid["CT"]: [ImageBox(100, 120, 220, 260, "intracranial hemorrhage", 0.8)],
             series_uid["SM"]: [ImageBox(64, 64, 320, 256, "tumor", 0.7), ImageBox(400, 300, 600, 500, "gland")]}
    out = write_study_outputs(routing, tmp_path / "out", embedded_router.cards, boxes=boxes)
    seg = hd.seg.segread(out.box_files[series_uid["CT"]])
    assert seg.SegmentSequence[0].SegmentLabel == "intracranial hemorrhage"
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(out.box_files[series_uid["SM"]]))
    assert sorted(g.label for g in ann.get_annotation_groups()) == ["gland", "tumor"]
    for uid, path in {**out.sr_files, **out.box_files}.items():
        errors = dciodvfy_errors(path)
        # dicom3tools 2022 flags CommonZCoordinateValue on 2D annotation groups even when absent
        assert [e for e in errors if "CommonZCoordinateValue" not in e] == [], path
    for uid, count in ((series_uid["CT"], 1), (series_uid["SM"], 2)):
        sr = hd.sr.srread(out.sr_files[uid])
        assert len(sr.content.get_planar_roi_measurement_groups()) == count
    entries = {e["series_instance_uid"]: e for e in out.detail["entries"]}
    assert entries[series_uid["CT"]]["box_file"].startswith("seg/")
    assert entries[series_uid["SM"]]["box_file"].startswith("annotations/")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_a_series_with_pixel_data_cut_short_gets_the_error(embedded_router, tmp_path):
    from damaged_dicom import cut_last_fragment, cut_native_pixels

    study_dir = tmp_path / "study"
    ct = study_dir / "ct"
    ct.mkdir(parents=True)
    for slice_file in sorted(pydicom_file("17106").parent.iterdir()):  # four CT slices of one series
        shutil.copy(slice_file, ct / f"{slice_file.name}.dcm")
    cut_native_pixels(pydicom_file("17196"), ct / "17196.dcm")  # one slice, not the representative
    cut_last_fragment(SAMPLES / "ct_head_512_j2k.dcm", study_dir / "j2k_cut.dcm")
    shutil.copy(SAMPLES / "mr_brain_pilot.dcm", study_dir / "mr.dcm")
    routing = route_study(embedded_router, [study_dir])
    assert routing.problems == ()  # the damaged files are read, and their series reported
    out = write_study_outputs(routing, tmp_path / "out", embedded_router.cards)
    meta = json.loads(out.metadata_file.read_text())
    detail = json.loads(out.detail_file.read_text())
    by_modality = {e["dicom_modality"]: e for e in detail["entries"] if e["input"] != "j2k_cut.dcm"}
    damaged_ct = by_modality["CT"]
    assert damaged_ct["error"] == "17196.dcm: pixel data truncated: 256 of 512 bytes"
    assert damaged_ct["outcome"] == "failed" and damaged_ct["cards"] == []
    j2k = next(e for e in detail["entries"] if e["input"] == "j2k_cut.dcm")
    assert j2k["error"].startswith("j2k_cut.dcm: pixel data truncated: ")
    # each damaged series gets an SR saying it has no AI result and why: silence would read as "nothing found"
    for entry in (damaged_ct, j2k):
        sr = pydicom.dcmread(out.sr_files[entry["series_instance_uid"]])
        assert str(sr.VerificationFlag) == "UNVERIFIED" and not dciodvfy_errors(out.sr_files[entry["series_instance_uid"]])
        texts = " | ".join(t for t in _all_texts(sr) if t)
        assert f"not routed, no AI result for this series: {entry['error']}" in texts, texts
        assert "Not routed: the image could not be processed" in _all_meanings(sr)
        assert str(tmp_path) not in texts
        evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        assert len(evidence) == (4 if entry is damaged_ct else 1)  # every instance of the series
    # the rest of the study goes on
    mr = by_modality["MR"]
    assert mr["error"] is None and mr["sr_file"] and mr["modality"] == "brain MRI scan"
    assert meta["errors"] == 2 and meta["needs_review"] is True


def _all_texts(ds) -> list[str]:
    found = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _all_texts(item)
    return found


def _all_meanings(ds) -> set[str]:
    found = set()
    for item in ds.get("ContentSequence", []):
        for code in item.get("ConceptCodeSequence", []):
            found.add(str(code.CodeMeaning))
        found |= _all_meanings(item)
    return found


def test_hybrid_study_counts_vlm_calls_and_disagreements(tmp_path):
    """metadata.json: the VLM calls, the series routed without one, the disagreements; series.json: per series."""
    from scripted_pixels import FixedPixels

    from onevlm.backends import create_backend
    from onevlm.cards import CardRepository, default_cards_dir
    from onevlm.router.pipeline import Router

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("ct_head_routine_brain.dcm", "ct_head_512_j2k.dcm", "cr_extremity_j2k.dcm", "rt_plan.dcm"):
        shutil.copy(SAMPLES / name, inputs / name)
    cards = CardRepository.load(default_cards_dir())
    # ct_head_512: only Body Part Examined backs brain CT, the image looks like a chest CT (a disagreement);
    # ct_head_routine_brain: five header statements back brain CT, the header decides stage 1 alone
    pixels = FixedPixels({"ct_head_512_j2k.dcm": {1: {"chest CT scan": 0.95, "brain CT scan": 0.01}}})
    router = Router(cards, create_backend("hybrid", cards, pixel_backend=pixels))
    out = write_study_outputs(route_study(router, [inputs]), tmp_path / "out", cards)
    meta = json.loads(out.metadata_file.read_text())
    detail = json.loads(out.detail_file.read_text())
    assert all(isinstance(v, (str, int, float, bool)) for v in meta.values()), meta
    entries = {e["input"]: e for e in detail["entries"]}
    disagree = entries["ct_head_512_j2k.dcm"]
    assert disagree["consulted"] == [["header", "pixels"], ["header"], []] and disagree["vlm_calls"] == 1
    assert disagree["disagreement"].startswith("stage 1: header says brain CT scan (Modality CT, "
                                               "BodyPartExamined HEAD); the image looks like chest CT scan (p 0.95)")
    assert disagree["outcome"] == "review" and disagree["sr_file"]
    assert dciodvfy_errors(out.metadata_file.parent / disagree["sr_file"]) == []
    asked = entries["ct_head_routine_brain.dcm"]  # the header decides stage 1, names no finding: stage 2 asks
    assert asked["consulted"] == [["header"], ["header", "pixels"], []] and asked["vlm_calls"] == 1
    assert asked["disagreement"] is None
    certain = entries["cr_extremity_j2k.dcm"]  # the header decides: the pixels are not read
    assert certain["consulted"] == [["header"]] and certain["vlm_calls"] == 0 and certain["outcome"] == "stopped"
    skipped = entries["rt_plan.dcm"]
    assert skipped["skipped"] and skipped["consulted"] == [] and skipped["vlm_calls"] == 0
    assert meta["vlm_calls"] == sum(e["vlm_calls"] for e in detail["entries"]) == len(pixels.calls) == 2
    assert meta["series_without_vlm"] == 1 and meta["disagreements"] == 1
    assert meta["outcome"] == "review" and meta["needs_review"] is True
    decisions = [json.loads(line) for line in out.decisions_file.read_text().splitlines()]
    assert sum(d["vlm_calls"] for d in decisions) == 2


def test_decision_records_without_vlm_counts_leave_the_keys_out():
    """An older decision record (no ``vlm_calls``, no stage consultation): the count is unknown, not 0."""
    from onevlm.reports.routing_metadata import build_metadata, series_entry

    stage = {"stage": 1, "confidence": 0.9, "informative": True}
    old = {"outcome": "routed", "cards": ["MODEL_01"], "confidence": 0.9, "error": None, "stages": [stage]}
    unsaid = {**old, "vlm_calls": 0}  # a backend that did not say what its stages read
    counted = {**old, "vlm_calls": 1, "stages": [{**stage, "consulted": ["header", "pixels"]}]}
    entries = [series_entry(d, study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{i}", dicom_modality="CT")
               for i, d in enumerate((old, unsaid, counted))]
    assert [e["vlm_calls"] for e in entries] == [None, None, 1]
    assert [e["consulted"] for e in entries] == [[None], [None], [["header", "pixels"]]]
    meta = build_metadata(entries)
    assert "vlm_calls" not in meta and "series_without_vlm" not in meta  # left out, never null
    assert meta["disagreements"] == 0
    meta = build_metadata(entries[2:])
    assert (meta["vlm_calls"], meta["series_without_vlm"], meta["disagreements"]) == (1, 0, 0)
