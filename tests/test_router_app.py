"""The MONAI Deploy router application, end to end on real DICOM files from pydicom's test data.

The test writes its own model cards (it does not depend on the shipped ``model_cards/``) and
runs ``python -m apps.router_app -i IN -o OUT`` in a subprocess, as a MAP entrypoint would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

CARDS = {
    "MODEL_01": """\
id: MODEL_01
modality: brain CT scan
task_caption: Classifies intracranial hemorrhage on non-contrast head CT.
task_type: classification
findings: [intracranial hemorrhage, normal]
specialty: radiology
intended_use: Research triage of non-contrast head CT.
out_of_scope: Clinical diagnosis; contrast-enhanced studies.
training_data:
  - name: RSNA Intracranial Hemorrhage Detection
    citation: Flanders AE et al. Radiology AI 2020.
metrics: []
dicom:
  modalities: [CT]
  body_parts: [HEAD, BRAIN]
""",
    "MODEL_02": """\
id: MODEL_02
modality: chest X-ray scan
task_caption: Detects pneumonia on frontal chest radiographs.
task_type: classification
findings: [pneumonia, normal]
specialty: radiology
intended_use: Research triage of frontal chest radiographs.
out_of_scope: Clinical diagnosis; lateral views.
training_data:
  - name: RSNA Pneumonia Detection
    citation: Shih G et al. Radiology AI 2019.
metrics: []
dicom:
  modalities: [CR, DX]
  body_parts: [CHEST]
""",
}

# pydicom test file -> name in the input folder
DICOM_INPUTS = {"17106": "ct_head.dcm", "rtplan.dcm": "rtplan.dcm", "reportsi.dcm": "reportsi.dcm"}
CORRUPT_NAME = "corrupt.dcm"


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path)


def _write_cards(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for card_id, text in CARDS.items():
        (folder / f"{card_id}.yaml").write_text(text, encoding="utf-8")
    return folder


def _run_app(input_dir: Path, output_dir: Path, cards_dir: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ONEVLM_CARDS": str(cards_dir)}
    env.pop("ONEVLM_CUTOFFS", None)
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "apps.router_app", "-i", str(input_dir), "-o", str(output_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def workspace(tmp_path: Path):
    """Cards, an input folder of real DICOM plus one corrupt file, and an output folder path."""
    cards = _write_cards(tmp_path / "cards")
    inputs = tmp_path / "input"
    inputs.mkdir()
    for source, target in DICOM_INPUTS.items():
        shutil.copyfile(_testdata(source), inputs / target)
    (inputs / CORRUPT_NAME).write_bytes(os.urandom(2048))
    yield cards, inputs, tmp_path / "output"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_metadata_entry_summarises_a_decision():
    from onevlm.reports.routing_metadata import build_metadata

    decision = {
        "input": "/in/a.dcm",
        "reference": {"file": "a.dcm", "sop_instance_uid": "1.2", "series_instance_uid": "1.3",
                      "study_instance_uid": "1.4"},
        "stages": [
            {"stage": 1, "index": "FIRST", "confidence": 0.9, "candidates": [{"p": 0.9}, {"p": 0.1}]},
            {"stage": 2, "index": "SECOND", "confidence": 0.4, "candidates": [{"p": 0.6}, {"p": 0.4}]},
        ],
        "stopped_early": False, "stop_reason": "stage 3: no candidate card fits (None)",
        "modality": "brain CT scan", "finding": "Normal", "model_card_id": None, "confidence": 0.4,
        "error": None,
    }
    metadata = build_metadata([decision])
    assert metadata["not_for_clinical_use"] is True
    assert metadata["count"] == 1 and metadata["routed"] == 0 and metadata["errors"] == 0
    entry = metadata["inputs"][0]
    assert entry["sop_instance_uid"] == "1.2" and entry["study_instance_uid"] == "1.4"
    assert entry["stage_confidence"] == {"1": 0.9, "2": 0.4, "3": None}
    assert entry["not_for_clinical_use"] is True


def test_core_package_does_not_import_monai_deploy():
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "onevlm").rglob("*.py")
        if "monai.deploy" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


@pytest.mark.slow
def test_router_app_routes_a_folder_end_to_end(workspace):
    cards, inputs, output = workspace
    result = _run_app(inputs, output, cards)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metadata = json.loads((output / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["not_for_clinical_use"] is True
    entries = {Path(e["input"]).name: e for e in metadata["inputs"]}
    assert sorted(entries) == sorted([*DICOM_INPUTS.values(), CORRUPT_NAME])
    assert metadata["count"] == len(entries) == 4

    ct = entries["ct_head.dcm"]
    assert ct["modality"] == "brain CT scan"
    assert ct["error"] is None
    assert ct["sop_instance_uid"] and ct["series_instance_uid"] and ct["study_instance_uid"]
    assert ct["stage_confidence"]["1"] is not None

    for name in ("rtplan.dcm", "reportsi.dcm"):
        entry = entries[name]
        assert entry["modality"] == "None", entry
        assert entry["stopped_early"] is True, entry
        assert entry["model_card_id"] is None
        assert entry["stage_confidence"]["2"] is None

    corrupt = entries[CORRUPT_NAME]
    assert corrupt["error"] and CORRUPT_NAME in corrupt["error"]
    assert corrupt["model_card_id"] is None

    lines = (output / "decisions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert all(r["not_for_clinical_use"] is True for r in records)
    assert {Path(r["input"]).name for r in records} == set(entries)


@pytest.mark.slow
def test_router_app_fails_on_a_missing_card_folder(workspace, tmp_path):
    _, inputs, output = workspace
    result = _run_app(inputs, output, tmp_path / "no-such-cards")
    assert result.returncode != 0
    assert "no-such-cards" in result.stderr
    assert not (output / "metadata.json").exists()
