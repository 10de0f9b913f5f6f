"""`onevlm route` and `onevlm router evaluate` end to end on real DICOM files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from onevlm.cli import main
from onevlm.router import read_log

from conftest import SAMPLES

REQUIRED_KEYS = {"input", "stages", "stopped_early", "model_card_id"}


@pytest.fixture()
def study(tmp_path):
    """A folder of real samples plus a corrupt file and a non-image object."""
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("ct_head_routine_brain.dcm", "cr_chest_j2k.dcm", "rt_plan.dcm", "mr_abdomen_liver.dcm"):
        shutil.copy(SAMPLES / name, folder / name)
    (folder / "b_corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 40)
    return folder


def test_route_json_records_and_bad_input(study, tmp_path, capsys):
    log = tmp_path / "decisions.jsonl"
    code = main(["route", str(study), "--json", "--log", str(log)])
    captured = capsys.readouterr()
    assert code == 1  # one input failed
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 5  # the others went on
    by_file = {r["reference"]["file"]: r for r in records}
    for record in records:
        assert REQUIRED_KEYS <= set(record)
        for stage in record["stages"]:
            assert {"stage", "candidates", "chosen", "index", "raw"} <= set(stage)
            assert stage["index"] in ("FIRST", "SECOND")
            assert all({"answer", "p"} <= set(c) for c in stage["candidates"])
    bad = by_file["b_corrupt.dcm"]
    assert "b_corrupt.dcm" in bad["error"] and bad["model_card_id"] is None and bad["stages"] == []
    assert "b_corrupt.dcm" in captured.err
    head = by_file["ct_head_routine_brain.dcm"]
    assert head["stages"][0]["chosen"] == "brain CT scan" and head["pipeline_card_id"].startswith("MODEL_")
    assert [s["stage"] for s in head["stages"]] == [1, 2, 3]
    # The header names no finding: no single card is claimed, the brain CT cards are routed as a set,
    # and the route confidence never exceeds the stage-1 probability it rests on.
    assert head["outcome"] == "routed-set" and head["model_card_id"] is None and not head["calibrated"]
    assert head["finding"] is None and not head["finding_assessed"] and not head["stages"][1]["informative"]
    assert head["cards"] == ["MODEL_01", "MODEL_02", "MODEL_03", "MODEL_04"]
    assert 0 < head["confidence"] <= head["stages"][0]["confidence"]
    assert set(head["stages"][0]["distribution"]) >= {"brain CT scan", "None", "Other"}
    plan = by_file["rt_plan.dcm"]
    assert plan["stages"][0]["chosen"] == "None" and plan["stopped_early"] and plan["model_card_id"] is None
    assert plan["outcome"] == "stopped" and not plan["needs_review"]
    assert bad["outcome"] == "failed"
    assert by_file["mr_abdomen_liver.dcm"]["stages"][0]["chosen"] == "Other"
    # the decision log holds the same records
    assert [r["input"] for r in read_log(log)] == [r["input"] for r in records]


def test_route_table_output(study, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    assert main(["route", str(study / "ct_head_routine_brain.dcm"), "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (modality" in out and "stage 3 (model_card" in out
    assert "<- FIRST" in out and "SECOND" in out
    assert "NO EVIDENCE" in out
    assert "=> routed-set: MODEL_01, MODEL_02, MODEL_03, MODEL_04  route confidence 0." in out
    assert "(uncalibrated)" in out
    assert log.exists()


@pytest.mark.parametrize("name,tied", [("us_small_parts_j2k.dcm", "breast ultrasound scan"),
                                       ("mr_small_no_bodypart.dcm", "brain MRI scan")])
def test_a_stage1_tie_goes_to_review_not_to_a_confident_card(name, tied, tmp_path, capsys):
    assert main(["route", str(SAMPLES / name), "--json", "--log", str(tmp_path / "l")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["outcome"] == "review" and record["needs_review"]
    assert record["cards"] == [] and record["model_card_id"] is None and record["confidence"] is None
    stage1 = record["route"]["stages"][0]
    assert stage1["tie"] and stage1["margin"] < 0.02 and tied in stage1["tied"]
    assert record["route"]["reasons"][0].startswith("stage 1 tie: ")


def test_route_with_cutoffs_file(study, tmp_path, capsys):
    cutoffs = tmp_path / "cutoffs.json"
    cutoffs.write_text(json.dumps({"1": 0.0, "2": None, "3": None}))  # stage 1 always takes a different runner-up
    assert main(["route", str(study / "ct_head_routine_brain.dcm"), "--json", "--cutoffs", str(cutoffs), "--log", str(tmp_path / "l")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["cutoffs"]["1"] == 0.0
    assert record["stages"][0]["index"] == "SECOND"
    assert record["stages"][0]["chosen"] == record["stages"][0]["candidates"][1]["answer"]


def test_route_reports_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "cutoffs.json"
    bad.write_text("{not json")
    assert main(["route", str(SAMPLES / "rt_plan.dcm"), "--cutoffs", str(bad)]) == 2
    assert "cutoffs.json" in capsys.readouterr().err
    assert main(["route", str(SAMPLES / "rt_plan.dcm"), "--cards", str(tmp_path / "no_cards")]) == 2
    assert "no_cards" in capsys.readouterr().err


def test_router_evaluate(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    rows = [
        (SAMPLES / "ct_head_routine_brain.dcm", "brain CT scan", "Normal", "MODEL_01"),
        (SAMPLES / "mr_brain_pilot.dcm", "brain MRI scan", "Normal", "MODEL_07"),
        (SAMPLES / "cr_chest_j2k.dcm", "chest X-ray scan", "Normal", "MODEL_89"),
        (SAMPLES / "rt_plan.dcm", "None", "", ""),
        (SAMPLES / "us_echocardiogram.dcm", "Other", "", ""),
        (SAMPLES / "us_small_parts_j2k.dcm", "Other", "", ""),
    ]
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "finding", "card"])
        writer.writerows((str(p), m, f, c) for p, m, f, c in rows)
    out = tmp_path / "eval"
    assert main(["router", "evaluate", str(labels), "--fit", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 6
    # recompute the baseline's stage-1 and final accuracy from its own decision log
    decisions = list(read_log(out / "decisions_baseline.jsonl"))
    stage1 = sum(d["stages"][0]["chosen"] == r[1] for d, r in zip(decisions, rows)) / 6
    final = sum((d["pipeline_card_id"] or "None") == (r[3] or "None") for d, r in zip(decisions, rows)) / 6
    assert summary["baseline"]["stage_accuracy"]["1"]["accuracy"] == pytest.approx(stage1)
    assert summary["baseline"]["final_accuracy"] == pytest.approx(final)
    assert stage1 == pytest.approx(5 / 6)  # the small-parts ultrasound cannot be told apart from its header
    assert 0 <= summary["baseline"]["ece"] <= 1
    # in-sample fitted cutoffs never score below the baseline on their own rows
    for stage, fit in summary["fits"].items():
        assert summary["cutoff"]["stage_accuracy"][stage]["accuracy"] >= summary["baseline"]["stage_accuracy"][stage]["accuracy"] or stage == "3"
    with (out / "cutoff_rows.csv").open() as handle:
        cut_rows = list(csv.DictReader(handle))
    assert cut_rows and {r["label"] for r in cut_rows} <= {"FIRST", "SECOND"}
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Stage 1 — Modality |" in (out / "summary.md").read_text()
    assert "Final accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_routes_every_sample(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "onevlm")
    result = subprocess.run([exe, "route", str(SAMPLES), "--json", "--log", str(tmp_path / "log.jsonl")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(list(SAMPLES.glob("*.dcm")))
    assert all(r["error"] is None for r in records)


def test_evaluate_shipped_sample_labels(tmp_path, capsys):
    """dicom_samples/labels.csv: stage-1 truth for every sample; '?' rows have no final label."""
    out = tmp_path / "eval"
    assert main(["router", "evaluate", str(SAMPLES / "labels.csv"), "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    baseline = summary["baseline"]
    assert baseline["stage_accuracy"]["1"] == {"accuracy": pytest.approx(15 / 16), "n": 16}
    assert baseline["final_n"] == 10  # the 6 routed image rows carry '?'
    assert baseline["stage_accuracy"]["2"]["n"] == 0  # no finding labels
    capsys.readouterr()


def test_an_unknown_hint_is_an_error_and_a_close_one_is_normalised(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.new("RGB", (16, 16)).save(png)
    log = str(tmp_path / "log.jsonl")
    for hint in ("banana", "x-ray"):
        assert main(["route", "--hint", hint, str(png), "--json", "--log", log]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing routed
        assert f"--hint '{hint}' names no admissible modality" in captured.err
        assert "chest X-ray scan" in captured.err and "brain CT scan" in captured.err  # the admissible list
    assert main(["route", "--hint", "chest x-ray", str(png), "--json", "--log", log]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["stages"][0]["chosen"] == "chest X-ray scan" and record["stages"][0]["informative"]
    # without a hint the stop reason says what is known, not a verdict
    assert main(["route", str(png), "--log", log]) == 0
    assert "=> stopped: stage 1: no DICOM header and no hint: the modality is unknown (Other)" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_pixel_data_is_a_bad_input(tmp_path, monkeypatch, capsys):
    from damaged_dicom import cut_last_fragment, cut_native_pixels

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    kept = cut_native_pixels(SAMPLES / "ct_head_routine_brain.dcm", folder / "ct_cut.dcm")
    cut_last_fragment(SAMPLES / "ct_head_512_j2k.dcm", folder / "j2k_cut.dcm")
    shutil.copy(SAMPLES / "mr_brain_pilot.dcm", folder / "whole.dcm")
    assert main(["route", "in", "--json", "--log", "log.jsonl"]) == 1
    captured = capsys.readouterr()
    records = {r["reference"]["file"]: r for r in map(json.loads, captured.out.splitlines())}
    assert records["ct_cut.dcm"]["error"] == f"in/ct_cut.dcm: pixel data truncated: {kept} of {2 * kept} bytes"
    assert records["j2k_cut.dcm"]["error"].startswith("in/j2k_cut.dcm: pixel data truncated: ")
    assert all(records[n]["stages"] == [] and records[n]["cards"] == [] for n in ("ct_cut.dcm", "j2k_cut.dcm"))
    assert records["whole.dcm"]["error"] is None  # the rest goes on
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {records['ct_cut.dcm']['error']}", f"error: {records['j2k_cut.dcm']['error']}"]


def test_each_bad_input_is_reported_once_in_the_users_terms(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "empty.dcm").write_bytes(b"")
    (mixed / "notdicom.dcm").write_text("a text file, not DICOM\n" * 20)
    (mixed / "fake.png").write_text("not an image")
    shutil.copy(SAMPLES / "rt_plan.dcm", mixed / "plan.dcm")
    assert main(["route", "mixed", "--log", "log.jsonl"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "error: mixed/empty.dcm: empty file",
        "error: mixed/fake.png: not a readable image (unknown format or corrupt)",
        "error: mixed/notdicom.dcm: not a DICOM file",
    ]
    assert "ERROR" not in captured.out and "mixed/plan.dcm" in captured.out  # the table holds the routed input
    # the log and --json keep each record's error field
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted(r["error"] for r in records if r["error"]) == [line[len("error: "):] for line in captured.err.splitlines()]
    assert main(["route", "mixed/notdicom.dcm", "--json", "--log", "log.jsonl"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"] == "mixed/notdicom.dcm: not a DICOM file"
    assert captured.err == "error: mixed/notdicom.dcm: not a DICOM file\n"


def test_user_errors_of_other_commands_are_messages(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'metadata.json'}: cannot read: No such file")
    (tmp_path / "metadata.json").write_text("{}")
    assert main(["summary", str(tmp_path)]) == 1
    assert "not an onevlm metadata.json" in capsys.readouterr().err
    assert main(["route", str(SAMPLES / "ct_head_routine_brain.dcm"), "--text-model", str(tmp_path / "nowhere"),
                 "--log", str(tmp_path / "log.jsonl")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["calibrate", "apply", "--calibration", str(tmp_path / "missing.json"),
                 "--scores", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.json" in capsys.readouterr().err
    assert main(["status", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
