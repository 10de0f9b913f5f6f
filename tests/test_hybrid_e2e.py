"""The hybrid router in the listener service: real C-STOREs, a synthetic VLM whose answers are scripted.

Three studies: a stroke-protocol head CT whose header says everything (the header decides: no VLM
call), a head CT whose only anatomy field, Body Part Examined, says CHEST (the image is read and
contradicts it: flagged in the SR, on the operator's page and in ``/status``), and a nuclear-medicine
scan (no card accepts NM: the header decides Other).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_peers import free_port, running_service, service_config, storescu, wait_until
from scripted_vlm import ScriptedAnswers

SAMPLES = Path(__file__).resolve().parents[1] / "dicom_samples"
#: What the VLM sees in every image: a brain CT (stage 1's admissible answer), an acute stroke (stage 2's).
SCRIPT = {"brain CT scan": 0.6, "acute ischemic stroke": 0.35}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from onevlm.vlm.synthetic import build_synthetic_model

    return build_synthetic_model("tiny", tmp_path_factory.mktemp("hybrid-vlm") / "model")


def stroke_protocol(folder: Path) -> Path:
    """The routine head CT as a stroke protocol names it: anatomy and finding each stated twice."""
    ds = pydicom.dcmread(SAMPLES / "ct_head_routine_brain.dcm")
    for keyword in ("ProtocolName", "PerformedProcedureStepDescription", "RequestedProcedureDescription"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyDescription = "CT HEAD ACUTE ISCHEMIC STROKE"
    ds.SeriesDescription = "HEAD 5MM"
    ds.ReasonForStudy = "acute ischemic stroke"
    path = folder / "stroke.dcm"
    ds.save_as(path)
    return path


def wrong_body_part(folder: Path) -> Path:
    """A head CT whose only anatomy field says CHEST (a study of its own)."""
    ds = pydicom.dcmread(SAMPLES / "ct_head_512_j2k.dcm")
    ds.decompress()  # storescu sends what it can convert
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "wrong_body_part.dcm"
    ds.save_as(path)
    return path


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def test_service_routes_on_the_header_when_it_decides_and_flags_a_wrong_body_part(tiny_model, tmp_path):
    from onevlm.net.config import parse_config

    inputs = tmp_path / "in"
    inputs.mkdir()
    nm = pydicom.dcmread(SAMPLES / "nm_whole_body_j2k.dcm")
    nm.decompress()
    nm.save_as(inputs / "nm_whole_body_j2k.dcm")
    files = [stroke_protocol(inputs), wrong_body_part(inputs), inputs / "nm_whole_body_j2k.dcm"]
    spool = tmp_path / "spool"
    config = service_config(spool, pipeline={"model_dir": str(tiny_model)}, status_port=free_port())
    assert parse_config(config).pipeline.backend == "hybrid"  # a VLM configured: the hybrid router by default
    with running_service(config) as service:
        ScriptedAnswers(service.router.backend.pixels.loaded, SCRIPT)
        sent = storescu(files, service.listener.port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        results = spool / "results"
        wait_until(lambda: len(list(results.glob("*/metadata.json"))) == 3, 180, 0.5, "three studies' results")
        records = {}
        for folder in results.iterdir():
            for line in (folder / "decisions.jsonl").read_text().splitlines():
                record = json.loads(line)
                records[record["reference"]["study_instance_uid"]] = (folder, record)
        by_name = {p.name: pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in files}

        folder, stroke = records[by_name["stroke.dcm"]]
        assert stroke["vlm_calls"] == 0 and [s["consulted"] for s in stroke["stages"]] == [["header"], ["header"], []]
        assert stroke["outcome"] == "routed" and stroke["cards"] == ["MODEL_04"]
        assert json.loads((folder / "metadata.json").read_text())["series_without_vlm"] == 1

        folder, wrong = records[by_name["wrong_body_part.dcm"]]
        first = wrong["stages"][0]
        assert first["consulted"] == ["header", "pixels"] and "only BodyPartExamined backs it" in \
            first["consultation"]["reason"]
        assert wrong["vlm_calls"] == 1  # stage 1 sends it to review: stage 2 reads no pixels
        assert wrong["disagreement"].startswith("stage 1: header says chest CT scan (Modality CT, BodyPartExamined "
                                                "CHEST); the image looks like brain CT scan (p 0.")
        assert wrong["outcome"] == "review"
        sr = pydicom.dcmread(next((folder / "sr").glob("*.dcm")))
        codes = {item.ConceptCodeSequence[0].CodeValue for item in _content_items(sr) if "ConceptCodeSequence" in item}
        assert "RTR-DISAGREE" in codes and sr.VerificationFlag == "UNVERIFIED"

        _, nm = records[by_name["nm_whole_body_j2k.dcm"]]
        assert nm["vlm_calls"] == 0 and nm["outcome"] == "stopped" and nm["stages"][0]["consulted"] == ["header"]

        page = service.dashboard_url
        status = json.loads(_get(page + "status"))
        assert status["vlm_calls"] == 1 and status["disagreements"] == 1 and status["series_without_vlm"] == 2
        flagged = _get(page + "studies?disagreement=1")
        assert wrong["reference"]["study_instance_uid"] in flagged
        assert stroke["reference"]["study_instance_uid"] not in flagged


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)
