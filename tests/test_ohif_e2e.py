"""The real OHIF viewer (3.13, prebuilt) shows our routing SR and box SEG, served from Orthanc.

Orthanc (Debian, DICOMweb plugin) runs on free loopback ports with its storage in tmp_path;
OHIF's dist/ is served by tests/ohif_support.ViewerServer, which proxies /dicom-web to Orthanc
from the same origin; headless Chromium is driven by tests/js/ohif_e2e.mjs (playwright-core,
never downloading a browser). Screenshots go to tmp_path and to test-artifacts/ at the repo root.

Needs ``npm ci --prefix tests/js``, the Debian packages orthanc + orthanc-dicomweb and
/usr/bin/chromium; fails, never skips, without them. Research use only.
"""

from __future__ import annotations

import json
import subprocess
import time

import pydicom
import pytest

from onevlm.reports.box_seg import SEG_DESCRIPTION
from onevlm.reports.boxes import ImageBox
from onevlm.reports.routing_sr import SERIES_DESCRIPTION

from conftest import SAMPLES
from ohif_support import (
    ARTIFACTS,
    CHROMIUM,
    head_ct_with_finding,
    ohif_stack,
    port_is_closed,
    require_node_modules,
    run_node,
    tracking_uids,
    write_box_seg,
    write_routing_sr,
)

pytestmark = pytest.mark.slow

BOXES = (
    ImageBox(20, 30, 60, 70, "Mass", 0.87),
    ImageBox(70, 60, 110, 100, "intracranial hemorrhage", 0.42),
)
PNG = b"\x89PNG\r\n\x1a\n"


def detection_result(decision):
    """The card's result as the specialty model gives it: these boxes, parsed from a detection answer."""
    from onevlm.specialty.execution import AdapterTask, parse_result
    from onevlm.specialty.samples import DatasetInfo

    info = DatasetInfo("findings", "detection", tuple(box.label for box in BOXES), "radiology")
    task = AdapterTask("radiology", info, "letters", "detection-v1-test")
    answer = "Mass [0.156, 0.234, 0.469, 0.547]\nintracranial hemorrhage [0.547, 0.469, 0.859, 0.781]"
    return [parse_result(decision.model_card_id, task, answer, 0.1, {"dir": "radiology"})]


def _lines(annotation: dict) -> list[str]:
    return [line.strip() for line in annotation["lines"]]


def test_ohif_shows_routing_sr_and_box_seg(embedded_router, tmp_path):
    require_node_modules("@ohif/app", "playwright-core")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (or set ONEVLM_CHROMIUM)", pytrace=False)
    started = time.monotonic()

    # Study 1: an uncompressed head CT naming a finding, routed to one card, with two boxes (SR + SEG).
    ct = head_ct_with_finding(tmp_path / "dicom" / "ct.dcm")
    ct_header = pydicom.dcmread(ct, stop_before_pixels=True)
    ct_decision, ct_sr = write_routing_sr(embedded_router, ct, tmp_path / "dicom" / "ct_sr.dcm", BOXES,
                                          execution=detection_result)
    ct_seg = write_box_seg(ct, tmp_path / "dicom" / "ct_seg.dcm", BOXES)
    ct_groups = tracking_uids(ct_sr)
    # Study 2: an MR of the liver the router stops early on (Other): an SR with the routing group only.
    mr = SAMPLES / "mr_abdomen_liver.dcm"
    mr_header = pydicom.dcmread(mr, stop_before_pixels=True)
    mr_decision, mr_sr = write_routing_sr(embedded_router, mr, tmp_path / "dicom" / "mr_sr.dcm")
    mr_groups = tracking_uids(mr_sr)
    assert ct_decision.model_card_id and mr_decision.stopped_early

    artifacts = ARTIFACTS / "ohif"
    shots = {
        "ct_sr": [tmp_path / "ohif_ct_sr.png", artifacts / "ohif_ct_sr.png"],
        "ct_seg": [tmp_path / "ohif_ct_seg.png", artifacts / "ohif_ct_seg.png"],
        "mr_sr": [tmp_path / "ohif_mr_sr.png", artifacts / "ohif_mr_sr.png"],
    }
    for paths in shots.values():
        for path in paths:
            path.unlink(missing_ok=True)

    with ohif_stack(tmp_path, [ct, ct_sr, ct_seg, mr, mr_sr]) as (orthanc, viewer):
        series = orthanc.get_json(f"/studies/{_orthanc_study_id(orthanc, ct_header.StudyInstanceUID)}/series?expand")
        descriptions = sorted(s["MainDicomTags"].get("SeriesDescription", "") for s in series)
        assert SERIES_DESCRIPTION in descriptions and SEG_DESCRIPTION in descriptions
        spec = {
            "baseUrl": viewer.url,
            "chromium": str(CHROMIUM),
            "userDataDir": str(tmp_path / "chromium-profile"),
            "timeoutMs": 45000,
            "studies": [
                {
                    "studyInstanceUID": ct_header.StudyInstanceUID,
                    "srDescriptionPrefix": "onevlm routing",
                    "srAnnotationUIDs": list(ct_groups.values()),
                    "zoomOutSteps": 3,
                    "segDescriptionPrefix": "onevlm boxes",
                    "segLabels": [box.label for box in BOXES],
                    "screenshots": {"sr": [str(p) for p in shots["ct_sr"]], "seg": [str(p) for p in shots["ct_seg"]]},
                },
                {
                    "studyInstanceUID": mr_header.StudyInstanceUID,
                    "srDescriptionPrefix": "onevlm routing",
                    "srAnnotationUIDs": list(mr_groups.values()),
                    "zoomOutSteps": 3,
                    "screenshots": {"sr": [str(p) for p in shots["mr_sr"]]},
                },
            ],
        }
        spec_path = tmp_path / "ohif_spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        try:
            result = run_node("ohif_e2e.mjs", str(spec_path), timeout=180)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"ohif_e2e.mjs timed out:\n{exc.stdout}\n{exc.stderr}\n{_diagnostics(orthanc, viewer)}")
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"ohif_e2e.mjs gave no report ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        if not report["ok"]:
            pytest.fail(
                f"OHIF check failed at step '{report['step']}': {report.get('error')}\n"
                f"screenshot: {report.get('failureScreenshot')}\npage: {report.get('bodyText')}\n"
                f"page errors: {report['pageErrors']}\nconsole errors: {report['consoleErrors'][:10]}\n"
                f"{_diagnostics(orthanc, viewer)}"
            )
        proxy_failures = viewer.failed_requests()
        ports = (orthanc.http_port, orthanc.dicom_port, viewer.port)
    assert all(port_is_closed(port) for port in ports), "Orthanc or the viewer server still listens after the test"
    (ct_view, mr_view) = report["studies"]

    # The study browser lists our SR and SEG series by their descriptions.
    listed = {(s["modality"], s["description"]) for s in ct_view["series"]}
    assert ("SR", SERIES_DESCRIPTION) in listed and ("SEG", SEG_DESCRIPTION) in listed, ct_view["series"]
    assert any(s["description"].startswith("onevlm routing") for s in mr_view["series"] if s["modality"] == "SR")

    # The SR viewport draws every measurement group of our SR (routing group included).
    for view, groups in ((ct_view, ct_groups), (mr_view, mr_groups)):
        assert not view["srErrorBoundary"], report
        drawn = {a["uid"]: _lines(a) for a in view["srAnnotations"]}
        assert set(groups.values()) <= set(drawn), (groups, drawn)
        assert view["srPolylines"] >= len(groups)
    drawn = {a["uid"]: _lines(a) for a in ct_view["srAnnotations"]}
    for box in BOXES:
        lines = drawn[ct_groups[f"{box.label} ({BOXES.index(box) + 1})"]]
        # OHIF 3.13 labels a TID 1410 region with its numbers only (not its finding or comments)
        assert f"Certainty of Finding: {box.confidence:.2f} 1" in lines, lines
    routing = drawn[ct_groups["onevlm routing"]]
    # the summary comes first: the card, its route confidence and that it is uncalibrated
    assert routing[0].startswith(f"onevlm route: brain CT scan / subdural hemorrhage -> {ct_decision.model_card_id} "
                                 f"(route confidence {ct_decision.confidence:.2f}, uncalibrated)"), routing
    # route -> execute: the card's result is in the label and the group's numbers
    assert "; result: 2 region(s): Mass, intracranial hemorrhage" in routing[0], routing
    assert f"Route confidence: {ct_decision.confidence:.2f} 1" in routing
    assert any(line.startswith("Justification: ") for line in routing), routing
    mr_routing = {a["uid"]: _lines(a) for a in mr_view["srAnnotations"]}[mr_groups["onevlm routing"]]
    assert any(line.startswith("Routing stopped: stage 1") for line in mr_routing), mr_routing
    assert f"Route confidence: {mr_decision.confidence:.2f} 1" in mr_routing

    # The SEG loads on the CT and its segments carry the box labels.
    assert ct_view["segLabels"] == [box.label for box in BOXES] and not ct_view["segErrorBoundary"]

    # OHIF itself raised nothing, and every DICOMweb request through the proxy succeeded.
    assert report["pageErrors"] == [], report["pageErrors"]
    assert [r for r in proxy_failures if r[1].startswith(("/dicom-web", "/wado"))] == []
    for paths in shots.values():
        for path in paths:
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 20_000, path
    elapsed = time.monotonic() - started
    print(f"OHIF e2e: {elapsed:.1f} s in all, browser steps {report['timingsMs']}")
    print(f"OHIF console errors ({len(report['consoleErrors'])}): {report['consoleErrors'][:5]}")


def _orthanc_study_id(orthanc, study_uid: str) -> str:
    (study_id,) = [s["ID"] for s in orthanc.get_json("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]
    return study_id


def _diagnostics(orthanc, viewer) -> str:
    return (
        f"failed proxy requests: {viewer.failed_requests()[:20]}\n"
        f"Orthanc log (tail):\n{orthanc.log_tail()}"
    )
