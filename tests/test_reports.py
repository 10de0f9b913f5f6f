"""Routing SRs (TID 1500) and box SEGs: built with highdicom, valid per dciodvfy, read back."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from onevlm.inputs import load_input
from onevlm.reports import coding
from onevlm.reports.box_seg import build_box_seg
from onevlm.reports.boxes import ImageBox
from onevlm.reports.routing_sr import RESEARCH_STATEMENT, build_routing_sr, sr_uids

from conftest import SAMPLES, pydicom_file
from dicom_validation import dciodvfy_errors


def _sr(router, path, boxes=(), tmp_path=None):
    decision = router.route(load_input(path))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    sr = build_routing_sr(decision, [header], header, boxes, {c.id: c.task_caption for c in router.cards})
    out = tmp_path / f"{path.stem}_sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    return decision, out


def _evaluations(sr):
    return {e.name.meaning: e.value for g in sr.content.get_image_measurement_groups() for e in g.get_qualitative_evaluations()}


def _comments(sr):
    texts = []
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements":
            for group in item.ContentSequence:
                texts += [c.TextValue for c in group.ContentSequence if c.ValueType == "TEXT"
                          and c.ConceptNameCodeSequence[0].CodeValue == "121106"]
    return texts


def _measurements(sr):
    return {m.name.meaning: m.value for g in sr.content.get_image_measurement_groups() for m in g.get_measurements()}


def _set_cards(path):
    ds = pydicom.dcmread(path)
    found = []

    def walk(items):
        for item in items:
            if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeMeaning == "Model card in the routed set":
                found.append(item.ConceptCodeSequence[0].CodeValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def test_routed_set_sr(embedded_router, tmp_path):
    """A header that names no finding: the SR routes the modality's cards as a set, claims no single card."""
    box = ImageBox(100, 120, 220, 260, "intracranial hemorrhage", 0.83)
    decision, path = _sr(embedded_router, SAMPLES / "ct_head_512_j2k.dcm", [box], tmp_path)
    assert decision.outcome.outcome == "routed-set"
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.VerificationFlag == "UNVERIFIED" and "not for clinical use" in sr.SeriesDescription
    evaluations = _evaluations(sr)
    assert evaluations["Imaging modality (router stage 1)"].meaning == "brain CT scan"
    assert evaluations["Imaging modality (router stage 1)"].scheme_designator == "99ONEVLM"
    # stage 2 read no finding: "not assessed", never "Normal"
    assert evaluations["Primary finding (router stage 2)"] == coding.FINDING_NOT_ASSESSED
    assert "Selected model card (router stage 3)" not in evaluations  # no single card is claimed
    assert evaluations["Routing outcome"] == coding.OUTCOME_ROUTED_SET
    assert evaluations["Router calibration"] == coding.UNCALIBRATED
    assert _set_cards(path) == list(decision.cards) == ["MODEL_01", "MODEL_02", "MODEL_03", "MODEL_04"]
    measurements = _measurements(sr)
    assert measurements["Route confidence"] == pytest.approx(decision.confidence)
    assert measurements["Route confidence"] <= measurements["Router confidence, stage 1"]
    assert measurements["Router confidence, stage 1"] == pytest.approx(decision.stages[0].confidence)
    assert "Router confidence, stage 2" not in measurements and "Router confidence, stage 3" not in measurements
    comments = _comments(sr)
    assert comments[0].startswith("onevlm route: brain CT scan / finding not assessed -> one of 4 cards: MODEL_01")
    assert comments[0].endswith("uncalibrated)")
    assert RESEARCH_STATEMENT in comments
    # the box: a closed POLYLINE on the routed image, with a tracking identifier
    (roi,) = sr.content.get_planar_roi_measurement_groups()
    assert roi.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    data = roi.roi.value
    assert data.shape == (5, 2) and np.array_equal(data[0], data[-1])
    source = pydicom.dcmread(SAMPLES / "ct_head_512_j2k.dcm", stop_before_pixels=True)
    assert roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert roi.tracking_identifier == "intracranial hemorrhage (1)"
    # deterministic UIDs: routing the same series again gives the same SR identity
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == sr_uids(source.StudyInstanceUID, source.SeriesInstanceUID)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99ONEVLM"


def test_routed_series_sr(embedded_router, tmp_path):
    """A finding named in the header: one card, with its justification and a route confidence <= P1."""
    ds = pydicom.dcmread(pydicom_file("17106"))
    ds.ReasonForStudy = "suspected subdural hemorrhage after fall"
    source = tmp_path / "ct_head_sdh.dcm"
    ds.save_as(source)
    decision, path = _sr(embedded_router, source, tmp_path=tmp_path)
    assert decision.outcome.outcome == "routed"
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    evaluations = _evaluations(sr)
    assert evaluations["Primary finding (router stage 2)"] == coding.finding_code("subdural hemorrhage")
    card = evaluations["Selected model card (router stage 3)"]
    assert card.value == decision.model_card_id and card.meaning.startswith(decision.model_card_id + ":")
    assert evaluations["Routing outcome"] == coding.OUTCOME_ROUTED
    measurements = _measurements(sr)
    assert measurements["Route confidence"] == pytest.approx(decision.confidence)
    assert measurements["Route confidence"] <= measurements["Router confidence, stage 1"]
    comments = _comments(sr)
    assert comments[0].startswith(f"onevlm route: brain CT scan / subdural hemorrhage -> {decision.model_card_id} "
                                  f"(route confidence ")
    assert any(c.startswith("Justification: ") for c in comments)


def test_review_sr_names_no_card(embedded_router, tmp_path):
    """A stage-1 tie: the SR says 'requires human review' and why, and shows no card and no route confidence."""
    decision, path = _sr(embedded_router, SAMPLES / "us_small_parts_j2k.dcm", tmp_path=tmp_path)
    assert decision.outcome.outcome == "review"
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    evaluations = _evaluations(sr)
    assert evaluations["Routing outcome"] == coding.OUTCOME_REVIEW
    assert "Selected model card (router stage 3)" not in evaluations
    assert _set_cards(path) == []
    measurements = _measurements(sr)
    assert "Route confidence" not in measurements
    assert measurements["Router confidence, stage 1"] < 0.5
    label = _comments(sr)[0]
    assert label.startswith("onevlm route: requires human review: "
                            "stage 1 tie: breast ultrasound scan (0.2138) vs gallbladder ultrasound scan (0.2138)")
    assert "MODEL_" not in label


@pytest.mark.parametrize("name,outcome", [("mr_abdomen_liver.dcm", coding.OUTCOME_NOT_COVERED),
                                          ("cr_extremity_j2k.dcm", coding.OUTCOME_NOT_COVERED)])
def test_early_termination_is_stated(embedded_router, tmp_path, name, outcome):
    decision, path = _sr(embedded_router, SAMPLES / name, tmp_path=tmp_path)
    assert decision.stopped_early
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    evaluations = _evaluations(sr)
    assert evaluations["Routing outcome"] == outcome
    assert "Selected model card (router stage 3)" not in evaluations
    assert any(c.startswith("Routing stopped: stage 1") for c in _comments(sr))


def test_sr_from_a_series_with_legacy_header(embedded_router, tmp_path):
    # a 1990s file without Patient ID: the SR still builds (empty Type 2 values) and validates
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PatientID
    ds.StudyTime = "11:20:00"
    path = tmp_path / "legacy.dcm"
    ds.save_as(path, enforce_file_format=True)
    _, sr_path = _sr(embedded_router, path, tmp_path=tmp_path)
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert sr.PatientID == "" and sr.StudyTime == "112000"


@pytest.mark.parametrize(
    "name,boxes",
    [
        ("ct_head_512_j2k.dcm", [ImageBox(100, 120, 220, 260, "intracranial hemorrhage", 0.8), ImageBox(300, 300, 350, 340, "mass")]),
        ("cr_chest_j2k.dcm", [ImageBox(500, 600, 900, 1000, "nodule", 0.6)]),  # projection image, no frame of reference
        ("us_small_parts_j2k.dcm", [ImageBox(50, 60, 200, 180, "lymph node", 0.7)]),
    ],
)
def test_box_seg(tmp_path, name, boxes):
    source = pydicom.dcmread(SAMPLES / name)
    seg = build_box_seg(source, boxes)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = hd.seg.segread(path)
    labels = list(dict.fromkeys(b.label for b in boxes))
    assert [d.segment_label for d in back.SegmentSequence] == labels
    for number, label in enumerate(labels, start=1):
        mask = back.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[number]
        )[0, ..., 0]
        expected = np.zeros_like(mask)
        for b in boxes:
            if b.label == label:
                expected[int(b.y0):int(b.y1), int(b.x0):int(b.x1)] = 1
        assert np.array_equal(mask, expected)
    assert "not for clinical use" in back.SeriesDescription


def test_box_validation():
    with pytest.raises(ValueError):
        ImageBox(10, 10, 5, 20, "x")
    with pytest.raises(ValueError):
        ImageBox(0, 0, 5, 5, " ")
    with pytest.raises(ValueError):
        ImageBox(0, 0, 5, 5, "x", confidence=1.5)
    source = pydicom.dcmread(SAMPLES / "ct_head_512_j2k.dcm")
    with pytest.raises(ValueError, match="outside"):
        build_box_seg(source, [ImageBox(600, 600, 700, 700, "x")])


def _text_values(ds: pydicom.Dataset) -> list[str]:
    """Every text value of the dataset, nested sequences included."""
    values = []
    for element in ds.iterall():
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "UN") or element.value is None:
            continue
        items = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
        values += [str(v) for v in items]
    return values


def test_sr_carries_no_host_path_and_no_version_as_serial_number(embedded_router, tmp_path):
    import dataclasses
    import sys

    from conftest import REPO

    decision = embedded_router.route(load_input(SAMPLES / "ct_head_512_j2k.dcm"))
    # the embedded backend names its sentence model's folder (inside sys.prefix here); a
    # transformers backend names its model folder: give the decision both kinds of path
    model_dir = REPO / "models" / "medgemma-4b-it"
    backend = {**decision.backend, "model_dir": str(model_dir), "fingerprint": "sha256:abc123"}
    assert str(decision.backend["text_model_dir"]).startswith(sys.prefix)
    decision = dataclasses.replace(decision, backend=backend)
    header = pydicom.dcmread(SAMPLES / "ct_head_512_j2k.dcm", stop_before_pixels=True)
    sr = build_routing_sr(decision, [header], header)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    texts = _text_values(pydicom.dcmread(path))
    host = [p for p in (str(REPO), sys.prefix, sys.base_prefix, str(tmp_path)) if p and p != "/"]
    assert not [t for t in texts if any(p in t for p in host)]
    parameters = next(t for t in texts if t.startswith("backend: "))
    # model identity stays: the folders' names, the model name and the fingerprint
    assert '"model_dir": "medgemma-4b-it"' in parameters and '"fingerprint": "sha256:abc123"' in parameters
    assert "all-MiniLM-L6-v2" in parameters
    read = hd.sr.srread(path)
    context = {item.ConceptNameCodeSequence[0].CodeValue for item in read.ContentSequence}
    assert "121012" in context  # Device Observer UID: the device is still identified
    assert "121016" not in context  # Device Observer Serial Number: left out (a version is not one)


def test_without_host_paths_keeps_identity():
    from onevlm.reports.routing_sr import without_host_paths

    identity = {"backend": "transformers", "model_dir": "models/medgemma-4b-it", "model": "google/medgemma-4b-it",
                "fingerprint": "abc", "adapters": {"radiology": {"dir": "/srv/adapters/radiology-v2"}},
                "paths": ["/home/someone/x.json", "relative words"], "base_dir": "C:\\models\\base"}
    assert without_host_paths(identity) == {
        "backend": "transformers", "model_dir": "medgemma-4b-it", "model": "google/medgemma-4b-it",
        "fingerprint": "abc", "adapters": {"radiology": {"dir": "radiology-v2"}},
        "paths": ["x.json", "relative words"], "base_dir": "base"}


# --- what the router read (hybrid router: header first, the pixels only when the header cannot decide) --------------

NEW_CONCEPTS = {c.value for c in (*coding.STAGE_SOURCES_CONCEPTS.values(), coding.VLM_CALLS_CONCEPT,
                                  *coding.HEADER_IMAGE_CONCEPTS.values(), *coding.HEADER_ANSWER_CONCEPTS.values(),
                                  *coding.PIXELS_ANSWER_CONCEPTS.values())}
CALLS = "VLM calls (router, this series)"


def _hybrid_sr(answers, source, tmp_path):
    from scripted_pixels import FixedPixels

    from onevlm.backends import create_backend
    from onevlm.cards import CardRepository, default_cards_dir
    from onevlm.router.pipeline import Router

    cards = CardRepository.load(default_cards_dir())
    pixels = FixedPixels(answers)
    router = Router(cards, create_backend("hybrid", cards, pixel_backend=pixels))
    decision, path = _sr(router, source, tmp_path=tmp_path)
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert sr.VerificationFlag == "UNVERIFIED" and RESEARCH_STATEMENT in _comments(sr)
    return decision, pixels, sr


def _calls(sr):
    (group,) = sr.content.get_image_measurement_groups()
    (calls,) = group.get_measurements(name=coding.VLM_CALLS_CONCEPT)
    assert calls.unit == coding.CALLS_UNIT and calls.unit.value == "{calls}"
    return calls.value


def _parameters(sr):
    (group,) = sr.content.get_image_measurement_groups()
    return [item.TextValue for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]


def test_sr_of_a_header_and_image_disagreement(tmp_path):
    """The image looks like a chest CT, the header says brain CT: what each stage read, both answers coded, the sentence."""
    # only Body Part Examined backs brain CT in this header: the pixels are read, and contradict it
    answers = {"ct_head_512_j2k.dcm": {1: {"chest CT scan": 0.95, "brain CT scan": 0.01}}}
    decision, pixels, sr = _hybrid_sr(answers, SAMPLES / "ct_head_512_j2k.dcm", tmp_path)
    assert decision.outcome.outcome == "review" and decision.disagreement
    evaluations = _evaluations(sr)
    assert evaluations["Routing outcome"] == coding.OUTCOME_REVIEW
    assert evaluations["Evidence consulted, stage 1"] == coding.SOURCES_HEADER_AND_PIXELS
    assert evaluations["Evidence consulted, stage 2"] == coding.SOURCES_HEADER  # settled: stage 1 sends it to review
    assert "Evidence consulted, stage 3" not in evaluations  # a review case shows no stage 3
    assert evaluations["Header and image, stage 1"] == coding.HEADER_IMAGE_DISAGREE
    assert evaluations["Header and image, stage 1"].value == "RTR-DISAGREE"
    # both answers coded as stage 1's answers are
    assert evaluations["Header's answer, stage 1"] == coding.modality_answer_code("brain CT scan")
    assert evaluations["Image's answer, stage 1"] == coding.modality_answer_code("chest CT scan")
    assert evaluations["Image's answer, stage 1"].scheme_designator == "99ONEVLM"
    assert "Header and image, stage 2" not in evaluations
    assert _calls(sr) == decision.vlm_calls == len(pixels.calls) == 1
    comments = _comments(sr)
    assert comments[0].startswith("onevlm route: requires human review: header and image disagree: stage 1: ")
    assert comments[1] == f"Header and image disagree: {decision.disagreement}"
    assert ("header says brain CT scan (Modality CT, BodyPartExamined HEAD); the image looks like chest CT scan "
            "(p 0.95)") in comments[1]
    parameters = _parameters(sr)
    assert any(p.startswith('disagreement (stage 1): {"action": "review", "header_answer": "brain CT scan"')
               for p in parameters), parameters
    assert any(p.startswith("consultation (stage 1): header and pixels; 1 VLM call(s); ") for p in parameters)


def test_sr_of_a_stage_2_disagreement_codes_findings(tmp_path):
    """The header names a subdural hemorrhage, the image looks normal: the answers are coded as findings are."""
    ds = pydicom.dcmread(pydicom_file("17106"))
    ds.ReasonForStudy = "suspected subdural hemorrhage after fall"
    source = tmp_path / "ct_head_sdh.dcm"
    ds.save_as(source)
    answers = {source.name: {1: {"brain CT scan": 0.95}, 2: {"Normal": 0.97, "subdural hemorrhage": 0.01}}}
    decision, pixels, sr = _hybrid_sr(answers, source, tmp_path)
    assert decision.outcome.outcome == "review" and decision.disagreement.startswith("stage 2: ")
    evaluations = _evaluations(sr)
    assert "Header and image, stage 1" not in evaluations
    assert decision.stages[0].consultation.corroborated  # its header fields agree on a head CT
    assert evaluations["Evidence consulted, stage 1"] == coding.SOURCES_HEADER
    assert evaluations["Evidence consulted, stage 2"] == coding.SOURCES_HEADER_AND_PIXELS
    assert evaluations["Header and image, stage 2"] == coding.HEADER_IMAGE_DISAGREE
    assert evaluations["Header's answer, stage 2"] == coding.finding_code("subdural hemorrhage")
    assert evaluations["Image's answer, stage 2"] == coding.finding_code("Normal")
    assert evaluations["Image's answer, stage 2"].scheme_designator == "SCT"  # Normal 17621005
    assert _calls(sr) == decision.vlm_calls == len(pixels.calls) == 1


def test_sr_of_a_hybrid_decision_without_disagreement(tmp_path):
    """Header and image agree: the sources each stage read and the VLM calls, no disagreement."""
    answers = {"ct_head_512_j2k.dcm": {1: {"brain CT scan": 0.95, "chest CT scan": 0.01},
                                       2: {"Normal": 0.9, "intracranial hemorrhage": 0.05}}}
    decision, pixels, sr = _hybrid_sr(answers, SAMPLES / "ct_head_512_j2k.dcm", tmp_path)
    assert decision.outcome.outcome == "routed" and decision.disagreement is None
    evaluations = _evaluations(sr)
    assert evaluations["Imaging modality (router stage 1)"] == coding.modality_answer_code("brain CT scan")
    assert evaluations["Evidence consulted, stage 1"] == coding.SOURCES_HEADER_AND_PIXELS
    assert evaluations["Evidence consulted, stage 2"] == coding.SOURCES_HEADER_AND_PIXELS
    assert evaluations["Evidence consulted, stage 3"] == coding.SOURCES_TEXT_ONLY
    assert not [name for name in evaluations if name.startswith(("Header and image", "Header's", "Image's"))]
    assert _calls(sr) == decision.vlm_calls == len(pixels.calls) == 2
    assert not [c for c in _comments(sr) if c.startswith("Header and image disagree")]
    assert not [p for p in _parameters(sr) if p.startswith("disagreement")]


def test_embedded_sr_reads_the_header_only_and_calls_no_vlm(embedded_router, tmp_path):
    decision, path = _sr(embedded_router, SAMPLES / "ct_head_512_j2k.dcm", tmp_path=tmp_path)
    sr = hd.sr.srread(path)
    evaluations = _evaluations(sr)
    assert evaluations["Evidence consulted, stage 1"] == evaluations["Evidence consulted, stage 2"] == \
        coding.SOURCES_HEADER
    assert "Evidence consulted, stage 3" not in evaluations  # a routed set shows no stage 3
    assert _calls(sr) == 0
    # the route confidence stays the group's first number (OHIF draws it, inferred from the whole image)
    nums = [i for i in sr.content.get_image_measurement_groups()[0][0].ContentSequence if i.ValueType == "NUM"]
    assert nums[0].ConceptNameCodeSequence[0].CodeMeaning == "Route confidence"
    assert nums[-1].ConceptNameCodeSequence[0].CodeValue == coding.VLM_CALLS_CONCEPT.value


def _without_consultation_items(items):
    """The content tree without what consultation records add (codes, parameters, the disagreement comment)."""
    kept = []
    for item in items:
        name = item.ConceptNameCodeSequence[0] if item.get("ConceptNameCodeSequence") else None
        if name is not None and name.CodeValue in NEW_CONCEPTS:
            continue
        text = str(item.get("TextValue", ""))
        if text.startswith(("consultation (stage", "disagreement (stage", "Header and image disagree: ")):
            continue
        if "ContentSequence" in item:
            item.ContentSequence = _without_consultation_items(item.ContentSequence)
        kept.append(item)
    return kept


def test_a_decision_without_consultation_records_builds_as_before(embedded_router, tmp_path):
    """An older decision log (no consultation per stage): no new item; the rest is the same content tree."""
    import dataclasses

    decision = embedded_router.route(load_input(SAMPLES / "ct_head_512_j2k.dcm"))
    assert all(s.consultation is not None for s in decision.stages)
    old = dataclasses.replace(decision, stages=tuple(dataclasses.replace(s, consultation=None)
                                                     for s in decision.stages))
    assert old.vlm_calls == 0 and old.disagreement is None
    header = pydicom.dcmread(SAMPLES / "ct_head_512_j2k.dcm", stop_before_pixels=True)
    built = {}
    for name, d in (("old", old), ("new", decision)):
        sr = build_routing_sr(d, [header], header, card_captions={c.id: c.task_caption for c in embedded_router.cards})
        built[name] = tmp_path / f"{name}.dcm"
        sr.save_as(built[name], enforce_file_format=True)
    assert dciodvfy_errors(built["old"]) == []
    old_sr, new_sr = (pydicom.dcmread(built[name]) for name in ("old", "new"))
    codes_used = {str(e.value) for e in old_sr.iterall() if e.keyword == "CodeValue"}
    assert not codes_used & (NEW_CONCEPTS | {coding.SOURCES_HEADER.value, "{calls}"})
    assert not [t for t in _text_values(old_sr) if t.startswith("consultation (stage")]
    assert _without_consultation_items(new_sr.ContentSequence) == list(old_sr.ContentSequence)
    assert (old_sr.SOPInstanceUID, old_sr.VerificationFlag) == (new_sr.SOPInstanceUID, "UNVERIFIED")


def test_sr_of_a_finding_that_belongs_to_another_modality(tmp_path):
    """A header wrong in every field (a gastroscopy on a colonoscopy): the image's finding contradicts stage 1's
    modality; the SR codes it as a stage-1 disagreement with both modalities, the finding in the sentence."""
    from conftest import header_variant

    source = header_variant(tmp_path / "scope.dcm", Modality="ES", BodyPartExamined="STOMACH",
                            SeriesDescription="GASTROSCOPY")
    answers = {source.name: {2: {"adenomatous polyp": 0.9, "Normal": 0.05}}}
    decision, pixels, sr = _hybrid_sr(answers, source, tmp_path)
    assert decision.stages[0].consulted == ("header",) and decision.outcome.outcome == "review"
    evaluations = _evaluations(sr)
    assert evaluations["Header and image, stage 1"] == coding.HEADER_IMAGE_DISAGREE
    assert evaluations["Header's answer, stage 1"] == coding.modality_answer_code("esophageal gastroscopy scan")
    assert evaluations["Image's answer, stage 1"] == coding.modality_answer_code("colonoscopy scan")
    assert "Header and image, stage 2" not in evaluations
    assert any("the image's finding adenomatous polyp (p 0.90) belongs to colonoscopy scan" in c for c in _comments(sr))


def test_an_answer_outside_the_set_keeps_every_character_in_the_sr(tmp_path):
    """A VLM's free text can hold any character (a random model on Gemma 3's vocabulary writes emoji and scripts
    beyond Latin-1): the SR is UTF-8, so the quoted answer reads back exactly, whatever the source's character set."""
    from onevlm.cards import CardRepository, default_cards_dir
    from onevlm.router.backend import Candidate, StageResponse
    from onevlm.router.pipeline import Router

    class OneAnswer:
        def identity(self):
            return {"backend": "scripted"}

        def answer(self, items, requests):
            return [StageResponse((Candidate("échographie 🔘 સંપ", 0.7), Candidate("Other", 0.2)))] * len(items)

    source = SAMPLES / "ct_head_512_j2k.dcm"
    router = Router(CardRepository.load(default_cards_dir()), OneAnswer())
    decision, path = _sr(router, source, tmp_path=tmp_path)
    assert decision.outcome_name == "stopped"
    assert dciodvfy_errors(path) == []
    written = pydicom.dcmread(path)
    assert written.SpecificCharacterSet == "ISO_IR 192"
    assert written.PatientName == pydicom.dcmread(source, stop_before_pixels=True).PatientName
    meanings = [str(element.value) for element in written.iterall() if element.keyword == "CodeMeaning"]
    assert "outside the admissible set: échographie 🔘 સંપ" in meanings, meanings
