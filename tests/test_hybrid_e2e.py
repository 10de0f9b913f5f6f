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


def test_cli_fits_and_evaluates_the_hybrid_router_with_a_model(tiny_model, tmp_path, capsys):
    """--model without --backend is the hybrid router in route, calibrate fit and router evaluate."""
    from onevlm.calibration.site import SiteCalibration
    from onevlm.cli import main

    labels = SAMPLES / "labels.csv"
    calibration = tmp_path / "calibration.json"
    assert main(["calibrate", "fit", str(labels), "--model", str(tiny_model), "--risk", "0.2", "--holdout", "0.3",
                 "-o", str(calibration)]) == 0
    fitted = SiteCalibration.load(calibration)
    assert fitted.identity["backend"] == "hybrid" and fitted.fusion is not None and fitted.fusion.calibrated
    assert set(fitted.identity) == {"backend", "header", "pixels", "prompts"}
    log = tmp_path / "decisions.jsonl"
    capsys.readouterr()
    assert main(["route", str(SAMPLES / "ct_head_512_j2k.dcm"), "--model", str(tiny_model), "--calibration",
                 str(calibration), "--log", str(log), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["backend"]["backend"] == "hybrid" and record["calibrated"] is True
    assert record["stages"][0]["consulted"] in (["header"], ["header", "pixels"])
    # the header-only embedded router refuses the hybrid's calibration, naming what differs
    assert main(["route", str(SAMPLES / "ct_head_512_j2k.dcm"), "--backend", "embedded", "--calibration",
                 str(calibration)]) != 0
    assert "does not fit this router" in capsys.readouterr().err
    out = tmp_path / "evaluation"
    assert main(["router", "evaluate", str(labels), "--model", str(tiny_model), "--holdout", "0.3", "--risk", "0.2",
                 "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"]["backend"] == "hybrid" and summary["calibration"]["heldout"]["n"] > 0
    assert SiteCalibration.load(out / "calibration.json").fusion is not None


def test_each_file_is_parsed_once_and_decoded_only_when_the_vlm_reads_it(tiny_model, tmp_path, monkeypatch):
    """The hybrid path: one header parse per file; pixels decoded from that parse, only for inputs whose pixels are read."""
    from onevlm.backends import create_backend
    from onevlm.cards import CardRepository, default_cards_dir
    import importlib

    conversion = importlib.import_module("onevlm.imaging.dicom_to_image")
    from onevlm.router.pipeline import Router
    from onevlm.router.runner import route_files

    cards = CardRepository.load(default_cards_dir())
    router = Router(cards, create_backend("hybrid", cards, model_dir=str(tiny_model)))
    stroke = stroke_protocol(tmp_path)  # its header decides stages 1-2: never decoded
    parsed, decoded = [], []
    real_dcmread, real_convert = pydicom.dcmread, conversion.dicom_to_image

    def counting_dcmread(source, *args, **kwargs):
        parsed.append(Path(getattr(source, "name", source)).name)
        return real_dcmread(source, *args, **kwargs)

    def counting_convert(source):
        decoded.append(Path(source.filename).name if isinstance(source, pydicom.Dataset) else Path(source).name)
        return real_convert(source)

    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)
    monkeypatch.setattr(conversion, "dicom_to_image", counting_convert)
    decisions = list(route_files(router, [stroke, SAMPLES / "ct_head_512_j2k.dcm", SAMPLES / "rt_plan.dcm"]))
    assert [d.vlm_calls for d in decisions] == [0, 2, 0]
    assert sorted(parsed) == sorted(["stroke.dcm", "ct_head_512_j2k.dcm", "rt_plan.dcm"])  # one parse each
    assert decoded == ["ct_head_512_j2k.dcm"]  # from that parse, once (its features serve stages 1 and 2)
