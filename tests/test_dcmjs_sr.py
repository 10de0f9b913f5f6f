"""dcmjs (the JavaScript DICOM library OHIF uses) reads our routing SR: tests/js/parse_sr.mjs.

Needs ``npm ci --prefix tests/js`` (make test runs it); fails, never skips, without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from onevlm.reports import coding
from onevlm.reports.boxes import ImageBox
from onevlm.reports.routing_sr import RESEARCH_STATEMENT, SERIES_DESCRIPTION

from conftest import SAMPLES
from ohif_support import head_ct_with_finding, require_node_modules, run_node, write_routing_sr

BOXES = (
    ImageBox(20, 30, 60, 70, "Mass", 0.87),
    ImageBox(70, 60, 110, 100, "intracranial hemorrhage", 0.42),
)
UNITLESS = {"value": "1", "scheme": "UCUM", "meaning": "no units"}
CALLS = {"value": "{calls}", "scheme": "UCUM", "meaning": "calls"}


def parse(path: Path) -> dict:
    require_node_modules("dcmjs")
    result = run_node("parse_sr.mjs", str(path), timeout=60)
    assert result.returncode == 0, f"parse_sr.mjs failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)


def whole_image(header: pydicom.Dataset) -> list[list[float]]:
    rows, columns = int(header.Rows), int(header.Columns)
    return [[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]]


def check_document(report: dict, header: pydicom.Dataset) -> list[dict]:
    assert report["documentTitle"] == {"value": "126000", "scheme": "DCM", "meaning": "Imaging Measurement Report"}
    assert report["templateIdentifier"] == "1500"
    assert report["sopClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert report["studyInstanceUID"] == header.StudyInstanceUID
    assert report["seriesDescription"] == SERIES_DESCRIPTION
    assert report["verificationFlag"] == "UNVERIFIED" and report["completionFlag"] == "COMPLETE"
    assert report["observerContext"]["Observer Type"] == "Device"
    assert report["observerContext"]["Device Observer Name"] == "onevlm"
    assert report["imagingMeasurements"] is not None, "no 'Imaging Measurements' container found by dcmjs"
    return report["imagingMeasurements"]["measurementGroups"]


def check_routing_region(routing: dict, header: pydicom.Dataset) -> None:
    # The routing group's confidence is INFERRED FROM the whole routed image (OHIF needs a region).
    (region,) = routing["scoords"]
    assert region["inferredFrom"] == ("Route confidence" if "Route confidence" in routing["measurements"]
                                      else "Router confidence, stage 1")
    assert region["graphicType"] == "POLYLINE"
    assert region["points"] == whole_image(header)
    assert region["referencedSOPInstanceUID"] == header.SOPInstanceUID
    assert region["referencedSOPClassUID"] == header.SOPClassUID


def test_dcmjs_reads_routed_ct_with_two_boxes(embedded_router, tmp_path):
    source = head_ct_with_finding(tmp_path / "ct.dcm")  # 128x128 uncompressed CT naming a finding
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decision, sr_path = write_routing_sr(embedded_router, source, tmp_path / "ct_sr.dcm", BOXES)
    assert decision.model_card_id, "a head CT naming a finding routes to one card"

    report = parse(sr_path)
    groups = check_document(report, header)
    assert report["procedureReported"] == [{"value": "CT", "scheme": "DCM", "meaning": "Computed Tomography"}]
    assert [g["trackingIdentifier"] for g in groups] == ["onevlm routing", "Mass (1)", "intracranial hemorrhage (2)"]
    assert len({g["trackingUID"] for g in groups}) == 3 and all(groups[i]["trackingUID"] for i in range(3))

    routing = groups[0]
    evaluations = routing["qualitativeEvaluations"]
    assert evaluations == {
        "Imaging modality (router stage 1)": decision.modality,
        "Primary finding (router stage 2)": coding.finding_code(decision.finding).meaning,
        "Selected model card (router stage 3)": evaluations["Selected model card (router stage 3)"],
        "Routing outcome": coding.OUTCOME_ROUTED.meaning,
        "Router calibration": coding.UNCALIBRATED.meaning,
        # the embedded router reads the header at stages 1-2, and stage 3 only text
        "Evidence consulted, stage 1": coding.SOURCES_HEADER.meaning,
        "Evidence consulted, stage 2": coding.SOURCES_HEADER.meaning,
        "Evidence consulted, stage 3": coding.SOURCES_TEXT_ONLY.meaning,
    }
    assert evaluations["Selected model card (router stage 3)"].startswith(f"{decision.model_card_id}: ")
    measurements = routing["measurements"]
    assert measurements["Route confidence"]["value"] == pytest.approx(decision.confidence, rel=1e-9)
    assert measurements["Route confidence"]["unit"] == UNITLESS
    assert measurements["Route confidence"]["value"] <= measurements["Router confidence, stage 1"]["value"]
    for stage in decision.stages:
        assert measurements[f"Router confidence, stage {stage.stage}"]["value"] == pytest.approx(stage.confidence, rel=1e-9)
    assert measurements["VLM calls (router, this series)"] == {"value": 0, "unit": CALLS}
    assert routing["comments"][0].endswith("(route confidence %.2f, uncalibrated)" % decision.confidence)
    assert RESEARCH_STATEMENT in routing["comments"]
    assert any(c.startswith("Justification: ") for c in routing["comments"])
    assert routing["algorithm"]["Algorithm Name"] == ["onevlm model-card router"]
    check_routing_region(routing, header)

    for group, box in zip(groups[1:], BOXES):
        (region,) = group["scoords"]
        assert region.get("inferredFrom") is None  # TID 1410: the region belongs to the group
        assert region["concept"] == "Image Region"
        assert region["graphicType"] == "POLYLINE"
        assert len(region["points"]) == 5 and region["points"][0] == region["points"][-1]
        assert region["points"] == box.polyline().tolist()
        assert region["referencedSOPInstanceUID"] == header.SOPInstanceUID
        assert region["referencedSOPClassUID"] == header.SOPClassUID
        assert region["referencedFrameNumbers"] == []
        assert group["findings"] == [
            {"value": coding.finding_code(box.label).value, "scheme": coding.finding_code(box.label).scheme_designator,
             "meaning": coding.finding_code(box.label).meaning}
        ]
        assert group["measurements"]["Certainty of Finding"]["value"] == pytest.approx(box.confidence)
        assert group["comments"] == [f"Finding: {box.label}"]

    # dcmjs's own TID 1500 reader (adapters.Cornerstone3D.MeasurementReport.generateToolState)
    # runs without error but recovers nothing: dcmjs 0.52 only picks up groups whose tracking
    # identifier is "Cornerstone3DTools@^0.1.0:<Tool>", and its tools expect the TID 300 form
    # (SCOORD under a NUM), not TID 1410. OHIF 3 uses @cornerstonejs/adapters instead.
    adapter = report["dcmjsAdapter"]
    assert adapter["available"]
    assert adapter["asShipped"]["ok"], adapter["asShipped"]
    assert adapter["asShipped"]["count"] == 0, f"dcmjs now recovers tool state from our SR: {adapter['asShipped']}"


def test_dcmjs_reads_sr_of_series_stopped_early(embedded_router, tmp_path):
    source = SAMPLES / "mr_abdomen_liver.dcm"  # MR of the liver: no card covers it -> Other
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decision, sr_path = write_routing_sr(embedded_router, source, tmp_path / "mr_sr.dcm")
    assert decision.stopped_early and decision.modality == "Other"

    report = parse(sr_path)
    (routing,) = check_document(report, header)
    assert routing["trackingIdentifier"] == "onevlm routing"
    assert routing["qualitativeEvaluations"] == {
        "Imaging modality (router stage 1)": "Other",
        "Routing outcome": coding.OUTCOME_NOT_COVERED.meaning,
        "Router calibration": coding.UNCALIBRATED.meaning,
        "Evidence consulted, stage 1": coding.SOURCES_HEADER.meaning,
    }
    assert routing["measurements"]["Route confidence"]["value"] == pytest.approx(decision.confidence, rel=1e-9)
    assert set(routing["measurements"]) == {"Route confidence", "Router confidence, stage 1",
                                            "VLM calls (router, this series)"}
    assert any(c.startswith("Routing stopped: stage 1") for c in routing["comments"])
    assert RESEARCH_STATEMENT in routing["comments"]
    check_routing_region(routing, header)
    assert report["dcmjsAdapter"]["asShipped"]["ok"]


def test_dcmjs_reads_the_specialty_result_in_the_routing_group(embedded_router, tmp_path):
    """Route -> execute: the card's answer (here a parsed grading answer) sits in the routing group."""
    from onevlm.inputs import load_input
    from onevlm.reports.routing_sr import build_routing_sr
    from onevlm.specialty.execution import AdapterTask, parse_result
    from onevlm.specialty.samples import DatasetInfo

    source = head_ct_with_finding(tmp_path / "ct.dcm")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decision = embedded_router.route(load_input(source))
    info = DatasetInfo("breastgrades", "grading", ("benign", "probably benign", "suspicious"), "radiology")
    task = AdapterTask("radiology", info, "letters", "grading-v1-test")
    result = parse_result(decision.model_card_id, task, "2", 0.05, {"dir": "radiology"})
    sr = build_routing_sr(decision, [header], header, executions=[result])
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)

    (routing,) = check_document(parse(tmp_path / "sr.dcm"), header)
    evaluations = routing["qualitativeEvaluations"]
    assert evaluations["Specialty model execution"] == "Executed by the specialty model"
    assert evaluations["Specialty task"] == "radiology/breastgrades"
    assert evaluations["Grade (specialty model)"] == "grade 2: suspicious"
    assert routing["comments"][0].endswith("; result: grade 2 (suspicious)")
    assert f"specialty answer ({decision.model_card_id}): 2" in routing["algorithm"]["Algorithm Parameters"]
    assert f"specialty prompt ({decision.model_card_id}): grading-v1-test" in routing["algorithm"]["Algorithm Parameters"]
    assert routing["algorithm"]["Algorithm Name"] == ["onevlm model-card router and specialty model"]
    check_routing_region(routing, header)


def test_dcmjs_reads_a_routed_set_and_a_review_case(embedded_router, tmp_path):
    """The outcome is a coded value OHIF's library reads: the set's cards in order, or review and why."""
    source = SAMPLES / "ct_head_routine_brain.dcm"  # no finding in the header: the brain CT cards as a set
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decision, sr_path = write_routing_sr(embedded_router, source, tmp_path / "set_sr.dcm")
    assert decision.outcome.outcome == "routed-set"
    (routing,) = check_document(parse(sr_path), header)
    items = routing["codedItems"]
    assert [i["value"] for i in items if i["name"] == "Model card in the routed set"] == list(decision.cards)
    assert routing["qualitativeEvaluations"]["Routing outcome"] == coding.OUTCOME_ROUTED_SET.meaning
    assert routing["qualitativeEvaluations"]["Primary finding (router stage 2)"] == coding.FINDING_NOT_ASSESSED.meaning
    assert "Selected model card (router stage 3)" not in routing["qualitativeEvaluations"]
    assert routing["measurements"]["Route confidence"]["value"] == pytest.approx(decision.confidence, rel=1e-9)
    assert routing["comments"][0].startswith("onevlm route: brain CT scan / finding not assessed -> one of 4 cards")
    check_routing_region(routing, header)

    source = SAMPLES / "us_small_parts_j2k.dcm"  # a four-way stage-1 tie
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decision, sr_path = write_routing_sr(embedded_router, source, tmp_path / "review_sr.dcm")
    (routing,) = check_document(parse(sr_path), header)
    assert routing["qualitativeEvaluations"]["Routing outcome"] == coding.OUTCOME_REVIEW.meaning
    assert not [i for i in routing["codedItems"] if i["name"] in ("Model card in the routed set",
                                                                  "Selected model card (router stage 3)")]
    assert "Route confidence" not in routing["measurements"]
    assert "requires human review: stage 1 tie" in routing["comments"][0]
    check_routing_region(routing, header)


def test_dcmjs_reads_a_header_and_image_disagreement(tmp_path):
    """Hybrid router: what each stage read, the VLM calls and a disagreement with both answers coded."""
    from scripted_pixels import FixedPixels

    from onevlm.backends import create_backend
    from onevlm.cards import CardRepository, default_cards_dir
    from onevlm.router.pipeline import Router

    cards = CardRepository.load(default_cards_dir())
    # only Body Part Examined backs brain CT in this header: the pixels are read, and contradict it
    from conftest import header_variant

    source = header_variant(tmp_path / "ct_head_body_part_only.dcm")
    pixels = FixedPixels({source.name: {1: {"chest CT scan": 0.95, "brain CT scan": 0.01}}})
    router = Router(cards, create_backend("hybrid", cards, pixel_backend=pixels))
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decision, sr_path = write_routing_sr(router, source, tmp_path / "disagree_sr.dcm")
    assert decision.outcome.outcome == "review" and decision.disagreement

    (routing,) = check_document(parse(sr_path), header)
    evaluations = routing["qualitativeEvaluations"]
    assert evaluations["Routing outcome"] == coding.OUTCOME_REVIEW.meaning
    assert evaluations["Evidence consulted, stage 1"] == "Header and image pixels"
    assert evaluations["Header and image, stage 1"] == "Header and image disagree"
    items = {i["name"]: i for i in routing["codedItems"]}
    assert items["Header's answer, stage 1"]["value"] == coding.modality_answer_code("brain CT scan").value
    assert items["Image's answer, stage 1"]["value"] == coding.modality_answer_code("chest CT scan").value
    assert routing["measurements"]["VLM calls (router, this series)"] == {"value": decision.vlm_calls, "unit": CALLS}
    assert routing["comments"][0].startswith("onevlm route: requires human review: header and image disagree")
    assert routing["comments"][1] == f"Header and image disagree: {decision.disagreement}"
    assert RESEARCH_STATEMENT in routing["comments"]
    check_routing_region(routing, header)
