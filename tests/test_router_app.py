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
from concurrent.futures import ThreadPoolExecutor
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

# pydicom test file -> name in the input folder: a 4-slice CT head series, an enhanced MR,
# a chest CR, an RT plan and an SR (not images)
CT_SERIES = ["17106", "17136", "17166", "17196"]
DICOM_INPUTS = {**{n: f"ct/{n}.dcm" for n in CT_SERIES}, "emri_small.dcm": "mr.dcm", "RG1_J2KI.dcm": "cr_chest.dcm",
                "rtplan.dcm": "rtplan.dcm", "reportsi.dcm": "reportsi.dcm"}
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


def _run_app(input_dir: Path, output_dir: Path, cards_dir: Path, model: Path | None = None,
             **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ONEVLM_CARDS": str(cards_dir)}
    env.pop("ONEVLM_CUTOFFS", None)
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "apps.router_app", "-i", str(input_dir), "-o", str(output_dir),
         *(["-m", str(model)] if model is not None else [])],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _make_workspace(root: Path) -> tuple[Path, Path, Path]:
    """Cards, an input folder of real DICOM plus one corrupt file, and an output folder path, under ``root``."""
    cards = _write_cards(root / "cards")
    inputs = root / "input"
    inputs.mkdir()
    (inputs / "ct").mkdir()
    for source, target in DICOM_INPUTS.items():
        shutil.copyfile(_testdata(source), inputs / target)
    (inputs / CORRUPT_NAME).write_bytes(os.urandom(2048))
    return cards, inputs, root / "output"


@pytest.fixture
def workspace(tmp_path: Path):
    """Cards, an input folder of real DICOM plus one corrupt file, and an output folder path."""
    yield _make_workspace(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def solo_runs(gemma3_tiny_dir, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The app runs of three tests below, each on a workspace of its own, started two side by side (each is a
    process of its own, as a MAP starts the app; most of a run is one core's start-up): name -> (the run, its
    workspace folder)."""
    roots = {name: tmp_path_factory.mktemp(f"router-app-{name}") for name in ("folder", "gemma3", "missing-cards")}
    folder_cards, folder_inputs, folder_output = _make_workspace(roots["folder"])
    gemma3_cards = _write_cards(roots["gemma3"] / "cards")
    gemma3_inputs = roots["gemma3"] / "input"
    gemma3_inputs.mkdir()
    from conftest import SAMPLES

    shutil.copyfile(SAMPLES / "ct_head_512_j2k.dcm", gemma3_inputs / "ct_head.dcm")
    _, missing_inputs, missing_output = _make_workspace(roots["missing-cards"])
    runs = {  # name -> _run_app's arguments
        "folder": (folder_inputs, folder_output, folder_cards),
        "gemma3": (gemma3_inputs, roots["gemma3"] / "output", gemma3_cards, gemma3_tiny_dir),
        "missing-cards": (missing_inputs, missing_output, roots["missing-cards"] / "no-such-cards"),
    }
    with ThreadPoolExecutor(2) as pool:
        started = {name: pool.submit(_run_app, *arguments) for name, arguments in runs.items()}
        return {name: (future.result(), roots[name]) for name, future in started.items()}


def test_core_package_does_not_import_monai_deploy():
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "onevlm").rglob("*.py")
        if "monai.deploy" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.mark.slow
def test_router_app_routes_a_folder_end_to_end(solo_runs, capsys):
    import highdicom as hd
    import pydicom

    result, root = solo_runs["folder"]
    inputs, output = root / "input", root / "output"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metadata = json.loads((output / "metadata.json").read_text(encoding="utf-8"))
    detail = json.loads((output / metadata["detail_file"]).read_text(encoding="utf-8"))
    assert metadata["not_for_clinical_use"] is True and detail["not_for_clinical_use"] is True
    assert metadata["series"] == 5  # CT (4 slices), MR, CR, RT plan, SR
    # flat for the Workflow Manager's conditions; the lists per series are in series.json
    assert all(isinstance(v, (str, int, float, bool)) for v in metadata.values()), metadata
    assert metadata["unreadable"] == 1 and metadata["studies"] == len(detail["study_instance_uids"])
    by_modality = {e["dicom_modality"]: e for e in detail["entries"]}
    ct = by_modality["CT"]
    assert ct["modality"] == "brain CT scan" and ct["error"] is None and ct["model_card_id"] == "MODEL_01"
    assert ct["stage_confidence"]["1"] is not None and ct["stopped_at_stage"] is None
    assert by_modality["CR"]["modality"] == "chest X-ray scan"
    for modality in ("RTPLAN", "SR"):
        assert by_modality[modality]["skipped"].startswith("not an image"), by_modality[modality]
        assert by_modality[modality]["sr_file"] is None
    assert [p["file"] for p in detail["problems"]] == [CORRUPT_NAME]
    assert CORRUPT_NAME in detail["problems"][0]["error"]

    # one routing SR per image series, valid, readable, referencing every slice of the CT series
    sr_path = output / ct["sr_file"]
    assert _dciodvfy_errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    referenced = {item.ReferencedSOPInstanceUID
                  for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    expected = {str(pydicom.dcmread(inputs / "ct" / f"{n}.dcm", stop_before_pixels=True).SOPInstanceUID) for n in CT_SERIES}
    assert referenced == expected
    evaluations = {e.name.meaning: e.value.meaning for g in sr.content.get_image_measurement_groups()
                   for e in g.get_qualitative_evaluations()}
    assert evaluations["Imaging modality (router stage 1)"] == "brain CT scan"
    assert len(list((output / "sr").glob("*.dcm"))) == 3

    lines = (output / "decisions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line)["not_for_clinical_use"] for line in lines)

    # `onevlm summary` reads both files: the counts from metadata.json, the series from series.json
    from onevlm.cli import main

    capsys.readouterr()
    assert main(["summary", str(output)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("5 series: ") and "1 error(s)" in text
    assert f"SR: {ct['sr_file']}" in text and f"unreadable: {detail['problems'][0]['error']}" in text


@pytest.mark.slow
def test_router_app_takes_a_model_folder_with_dash_m(workspace, tmp_path):
    from onevlm.cards import CardRepository
    from onevlm.vlm.synthetic import build_synthetic_model

    cards, inputs, output = workspace
    model = build_synthetic_model("tiny", tmp_path / "model", cards=CardRepository.load(cards))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ONEVLM_CARDS": str(cards)}

    def run(out: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "apps.router_app", "-i", str(inputs), "-o", str(out), "-m", str(model)],
            cwd=REPO_ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=300,
        )

    with ThreadPoolExecutor(2) as pool:  # two processes side by side: most of a run is one core's start-up
        hybrid = pool.submit(run, output)
        pixels_only = pool.submit(run, tmp_path / "pixels-only", ONEVLM_BACKEND="transformers")
        result = hybrid.result()
        second = pixels_only.result()
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / "decisions.jsonl").read_text().splitlines()]
    # a VLM configured: the hybrid router (header first; the VLM's pixels only where the header cannot decide)
    assert records and all(r["backend"]["backend"] == "hybrid" for r in records)
    consulted = [r["stages"][0]["consulted"] for r in records]
    assert all(c in (["header"], ["header", "pixels"]) for c in consulted)
    for record in records:
        first = record["stages"][0]
        assert first["evidence"]["pixels_read"] == ("pixels" in first["consulted"])
        assert record["vlm_calls"] == sum("pixels" in s["consulted"] for s in record["stages"])
    result = second
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "pixels-only" / "decisions.jsonl").read_text().splitlines()]
    assert records and all(r["backend"]["backend"] == "transformers" for r in records)
    assert all(r["stages"][0]["evidence"]["pixels_read"] for r in records)


@pytest.mark.slow
def test_router_app_on_gemma3s_real_vocabulary(solo_runs):
    """``-m`` a model with Gemma 3's real tokenizer, processor and 262,208-row output layer: the default
    (hybrid) router asks it where the header cannot decide (a CT head whose only anatomy is
    BodyPartExamined), and the decision log and the SR name that model and its VLM call."""
    import highdicom as hd

    result, root = solo_runs["gemma3"]  # -i: ct_head_512_j2k.dcm alone; -m: conftest's gemma3_tiny_dir
    output = root / "output"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    [record] = [json.loads(line) for line in (output / "decisions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert record["error"] is None and record["not_for_clinical_use"] is True
    assert record["backend"]["backend"] == "hybrid"
    pixels = record["backend"]["pixels"]
    assert (pixels["backend"], pixels["model_type"], pixels["synthetic"]["tokenizer"]) == ("transformers", "gemma3", "gemma3")
    asked = [stage for stage in record["stages"] if "pixels" in stage["consulted"]]
    assert asked and record["vlm_calls"] == len(asked)
    for stage in asked:  # the VLM was shown the image, in a prompt from Gemma 3's own chat template and tokenizer
        vlm = stage["evidence"]["pixels"]
        assert vlm["pixels_read"] and vlm["engine"] == "fast" and vlm["prompt_tokens"] > 100
    metadata = json.loads((output / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["vlm_calls"] == record["vlm_calls"] and metadata["errors"] == 0

    [entry] = json.loads((output / "series.json").read_text(encoding="utf-8"))["entries"]
    sr_path = output / entry["sr_file"]
    assert _dciodvfy_errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    evaluations = {e.name.meaning: e.value.meaning for g in sr.content.get_image_measurement_groups()
                   for e in g.get_qualitative_evaluations()}
    for stage in asked:
        assert evaluations[f"Evidence consulted, stage {stage['stage']}"] == "Header and image pixels"
    texts = [str(item.TextValue) for item in _walk(sr.ContentSequence) if "TextValue" in item]
    backend_text = next(t for t in texts if t.startswith("backend: "))  # the SR's algorithm parameters
    assert json.loads(backend_text.removeprefix("backend: "))["pixels"]["synthetic"]["tokenizer"] == "gemma3"


def _walk(sequence):
    """Every content item of an SR content sequence, depth first."""
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


@pytest.mark.slow
def test_router_app_fails_on_a_missing_card_folder(solo_runs):
    result, root = solo_runs["missing-cards"]  # ONEVLM_CARDS: root / "no-such-cards", never made
    output = root / "output"
    assert result.returncode != 0
    assert "no-such-cards" in result.stderr
    assert not (output / "metadata.json").exists()


@pytest.mark.slow
def test_router_app_with_the_sites_calibration(workspace, tmp_path):
    """ONEVLM_CALIBRATION (or calibration.json in the -m folder) reaches every output; one fitted for
    another model stops the app at start-up with a message naming the file."""
    import csv

    from onevlm.calibration.site import SiteCalibration
    from onevlm.cli import main

    cards, inputs, output = workspace
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "finding", "card"])
        writer.writerows([(str(inputs / "ct" / f"{n}.dcm"), "brain CT scan", "", "MODEL_01") for n in CT_SERIES]
                         + [(str(inputs / "cr_chest.dcm"), "chest X-ray scan", "", "MODEL_02"),
                            (str(inputs / "mr.dcm"), "Other", "", ""), (str(inputs / "rtplan.dcm"), "None", "", "")])
    calibration_file = tmp_path / "calibration.json"
    assert main(["calibrate", "fit", str(labels), "--cards", str(cards), "--holdout", "0",
                 "-o", str(calibration_file)]) == 0
    calibration = SiteCalibration.load(calibration_file)

    models = tmp_path / "models"  # the MAP's -m folder: no VLM in it, only the site's calibration
    models.mkdir()
    shutil.copy(calibration_file, models / "calibration.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ONEVLM_CARDS": str(cards)}
    env.pop("ONEVLM_CALIBRATION", None)
    data = json.loads(calibration_file.read_text())
    data["identity"]["backend"] = "transformers"
    data.pop("calibration_id")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with ThreadPoolExecutor(3) as pool:  # three processes side by side: most of a run is one core's start-up
        calibrated = pool.submit(_run_app, inputs, output, cards, ONEVLM_CALIBRATION=str(calibration_file))
        from_folder = pool.submit(
            subprocess.run, [sys.executable, "-m", "apps.router_app", "-i", str(inputs), "-o", str(tmp_path / "out2"),
                             "-m", str(models)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        refused = pool.submit(_run_app, inputs, tmp_path / "out3", cards, ONEVLM_CALIBRATION=str(other))
        result, run, refused = calibrated.result(), from_folder.result(), refused.result()

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metadata = json.loads((output / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["calibrated"] is True and metadata["calibration_id"] == calibration.calibration_id
    entries = json.loads((output / "series.json").read_text(encoding="utf-8"))["entries"]
    decided = [e for e in entries if not e["skipped"] and not e["error"]]
    assert decided and all(e["calibrated"] for e in decided)
    # eight labelled inputs are far too few for a 90 % set: the sets are open and the router says review
    assert {e["outcome"] for e in decided} <= {"review", "stopped"}
    assert metadata["needs_review"] is True

    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out2" / "metadata.json").read_text())["calibration_id"] == calibration.calibration_id

    assert refused.returncode != 0
    assert f"{other}: calibration" in refused.stderr and "does not fit this router" in refused.stderr
    assert not (tmp_path / "out3" / "metadata.json").exists()
