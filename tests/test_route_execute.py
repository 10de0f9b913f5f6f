"""Route -> execute: the specialty model (one base, every adapter) runs the card the router chose.

The base is the synthetic tiny VLM; its adapters are trained here with ``onevlm finetune`` (NF4
QLoRA on CPU): a radiology adapter on MedMNIST-format BreastMNIST and ChestMNIST files whose
labels are all "malignant" and "no finding", so 40 steps teach it fixed answers we can check
(a learnt answer, not a hard-coded one: the base model with the adapter disabled does not give
it), a pathology adapter on IDC-style patches that are all "IDC negative" (for the whole-slide tiles), and a
hematology adapter (two steps on random BloodMNIST-format data) to switch to. The
router is the embedded default on the real ``dicom_samples``. Their headers name no finding, so
each routes to its modality's cards as a set, and every executable card of the set runs: the chest
CR's set holds MODEL_89 (ChestMNIST findings), the small-parts US (given Body Part Examined
BREAST here: the sample's own header leaves a four-way ultrasound tie, a review case) the breast
ultrasound set with MODEL_19 (BreastMNIST), both run by the radiology adapter; the brain CT's cards
name no specialty task. Research use only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from conftest import REPO, SAMPLES
from dicom_validation import dciodvfy_errors
from onevlm.cards import CardRepository, default_cards_dir
from onevlm.cli import main as onevlm_main
from onevlm.reports import coding
from onevlm.specialty.execution import (
    EXECUTED,
    NOT_EXECUTABLE,
    SpecialtyModel,
    find_adapters,
    parse_result,
)
from onevlm.specialty.manifest import MANIFEST_NAME, ManifestError
from onevlm.specialty.datasets.synthetic import write_idc_patches, write_medmnist_npz
from onevlm.specialty.samples import DatasetInfo, LabelledImage, NormalisedBox
from onevlm.specialty.tasks import build_example, build_query, is_unparseable, load_specialties
from onevlm.router.outcome import RouteOutcome
from onevlm.study.execution import StudyExecution, execute_study, image_boxes
from onevlm.study.outputs import write_study_outputs
from onevlm.study.routing import route_study
from onevlm.vlm.loading import ModelLoadError
from onevlm.vlm.synthetic import build_synthetic_model

pytestmark = pytest.mark.slow

CHEST = "cr_chest_j2k.dcm"
BREAST_US = "us_small_parts_j2k.dcm"
BRAIN_CT = "ct_head_routine_brain.dcm"


# -- prompts: inference asks exactly what training taught ---------------------------------------


@pytest.mark.parametrize("task", ["classification", "grading", "multilabel", "detection"])
def test_a_query_has_the_training_prompt_of_its_task(task):
    from PIL import Image

    info = DatasetInfo("demo", task, ("alpha", "beta", "gamma"), "pathology", "a demo set")
    image = Image.new("L", (20, 10), 128)
    labels = () if task == "detection" else (1,)
    boxes = (NormalisedBox(0.1, 0.2, 0.5, 0.6, 2),) if task == "detection" else ()
    example = build_example(info, LabelledImage("demo", "test", lambda: image, labels, boxes), "numbers")
    query = build_query(info, image, "numbers")
    assert (query.system, query.user, query.prompt_id) == (example.system, example.user, example.prompt_id)
    assert query.answer == "" and is_unparseable(query.target)
    assert query.load_image().mode == "RGB" and query.load_image().size == (20, 10)


def test_a_region_query_needs_its_region_and_draws_it():
    from PIL import Image

    info = DatasetInfo("lesions", "region-classification", ("bone", "lung"), "radiology")
    image = Image.new("RGB", (50, 50), (0, 0, 0))
    with pytest.raises(ValueError, match="region"):
        build_query(info, image)
    query = build_query(info, image, region=NormalisedBox(0.2, 0.2, 0.6, 0.6, 0))
    assert "[0.200, 0.200, 0.600, 0.600]" in query.user
    assert (0, 255, 0) in {query.load_image().getpixel((x, 10)) for x in range(50)}


def test_shipped_cards_execute_tasks_of_the_shipped_mixtures():
    cards = CardRepository.load(default_cards_dir())
    mixtures = load_specialties()
    executable = [c for c in cards if c.execute is not None]
    assert len(executable) >= 13
    kinds = {"classification": "classification", "grading": "grading", "multilabel-classification": "multilabel",
             "detection": "detection"}
    for card in executable:
        entries = {e.dataset: e for e in mixtures[card.execute.specialty].datasets}
        assert card.execute.task in entries, f"{card.id}: {card.execute}"
        assert entries[card.execute.task].task == kinds[card.task_type], card.id


# -- adapters trained here ------------------------------------------------------------------------


def _finetune(specialty_yaml: Path, data: Path, base: Path, out: Path, steps: int) -> Path:
    code = onevlm_main(["finetune", "--specialty", str(specialty_yaml), "--data", str(data), "--model", str(base),
                        "--out", str(out), "--max-steps", str(steps), "--lr", "3e-3", "--device", "cpu",
                        "--no-progress", "--checkpoint-every", "0", "--batch-size", "8", "--grad-accum", "1",
                        "--no-gradient-checkpointing", "--max-val-examples", "8"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("route-execute")
    base = build_synthetic_model("tiny", root / "base")
    data = root / "data"
    data.mkdir()
    per_split = (32, 4, 4)
    write_medmnist_npz(data / "breastmnist.npz", "breastmnist", per_split=per_split, fixed_labels=(0,))  # malignant
    write_medmnist_npz(data / "chestmnist.npz", "chestmnist", per_split=per_split, fixed_labels=())  # no finding
    write_medmnist_npz(data / "bloodmnist.npz", "bloodmnist", per_split=(16, 4, 4), seed=1)
    radiology = root / "radiology.yaml"
    radiology.write_text("specialty: radiology\ndescription: test adapter\noption_markers: numbers\ndatasets:\n"
                         "  - {dataset: breastmnist, reader: medmnist, task: classification}\n"
                         "  - {dataset: chestmnist, reader: medmnist, task: multilabel}\n")
    write_idc_patches(data / "IDC", n_patients=8, per_class=(6, 0))  # every patch "IDC negative": learnt below
    pathology = root / "pathology.yaml"
    pathology.write_text("specialty: pathology\ndescription: test adapter\noption_markers: numbers\ndatasets:\n"
                         "  - {dataset: idc, reader: idc, task: classification}\n")
    hematology = root / "hematology.yaml"
    hematology.write_text("specialty: hematology\ndescription: test adapter\noption_markers: numbers\ndatasets:\n"
                          "  - {dataset: bloodmnist, reader: medmnist, task: classification}\n")
    adapters = root / "models" / "adapters"
    _finetune(radiology, data, base, adapters / "radiology", 40)
    _finetune(hematology, data, base, adapters / "hematology", 2)
    _finetune(pathology, data, base, adapters / "pathology", 30)
    (root / "models" / "base").symlink_to(base, target_is_directory=True)
    return {"base": base, "adapters": adapters, "models": root / "models", "root": root}


@pytest.fixture(scope="module")
def specialty_model(models) -> SpecialtyModel:
    return SpecialtyModel.from_folders(models["base"], [models["adapters"]],
                                       device="cpu", quantize="nf4")


@pytest.fixture(scope="module")
def cards() -> CardRepository:
    return CardRepository.load(default_cards_dir())


def _image(name: str):
    from onevlm.imaging.dicom_to_image import dicom_to_image

    return dicom_to_image(SAMPLES / name)


def test_one_base_carries_every_adapter_and_switches_per_request(specialty_model, cards):
    model = specialty_model
    assert model.specialties == ("hematology", "pathology", "radiology")
    assert set(model.model.peft_config) == {"hematology", "pathology", "radiology"}
    breast = model.execute(cards.get("MODEL_19"), _image(BREAST_US))
    assert model.model.active_adapter == "radiology"
    assert breast.status == EXECUTED and breast.labels == ("malignant",) and breast.answer == "1"
    assert breast.specialty == "radiology" and breast.task == "breastmnist" and breast.adapter["dir"] == "radiology"

    blood = model.execute(cards.get("MODEL_95"), _image(BREAST_US))
    assert model.model.active_adapter == "hematology"
    assert blood.task == "bloodmnist" and blood.status in (EXECUTED, "unparseable")
    if blood.status == EXECUTED:
        assert blood.labels[0] in model.tasks[("hematology", "bloodmnist")].info.class_names

    again = model.execute(cards.get("MODEL_19"), _image(BREAST_US))
    assert again.answer == breast.answer and model.model.active_adapter == "radiology"

    chest = model.execute(cards.get("MODEL_89"), _image(CHEST))
    assert chest.status == EXECUTED and chest.labels == () and chest.answer == "none"
    assert "no finding present" in chest.summary()

    # the adapter, not the base, gives the answer
    with model.model.disable_adapter():
        base = model.execute(cards.get("MODEL_19"), _image(BREAST_US))
    assert base.answer != "1"


def test_the_router_shares_the_specialty_base_with_adapters_off(specialty_model, cards, models):
    """One VLM in two roles: routing on the shared base answers exactly as a separately loaded base."""
    from onevlm.inputs.routing_input import load_input
    from onevlm.router import Router
    from onevlm.specialty.shared_base import SharedBaseRouterBackend
    from onevlm.vlm.backend import TransformersBackend

    items = [load_input(SAMPLES / name) for name in (CHEST, BREAST_US, BRAIN_CT)]
    shared = Router(cards, SharedBaseRouterBackend(specialty_model))
    separate = Router(cards, TransformersBackend.from_options(str(models["base"]), device="cpu", quantize="nf4"))

    def answers(decisions):
        return [[(s.stage, s.chosen, round(s.confidence, 4)) for s in d.stages] for d in decisions]

    routed = shared.route_many(items)
    assert all(d.error is None for d in routed)
    assert answers(routed) == answers(separate.route_many(items))
    assert routed[0].backend["shared_with_specialty_adapters"] == ["hematology", "pathology", "radiology"]
    # the adapters are back on for the specialty role
    assert specialty_model.execute(cards.get("MODEL_19"), _image(BREAST_US)).labels == ("malignant",)


def test_cards_that_cannot_run_here_say_why(specialty_model, cards):
    model = specialty_model
    reasons = {
        "MODEL_03": "names no specialty task",
        "MODEL_93": "no ophthalmology adapter is loaded here",
        "MODEL_38": "not trained on task 'pathmnist'",
        "MODEL_90": "not trained on task 'pneumoniamnist'",
    }
    for card_id, reason in reasons.items():
        result = model.execute(cards.get(card_id), _image(CHEST))
        assert result.status == NOT_EXECUTABLE and reason in result.reason
        assert result.summary().startswith(f"{card_id} is not executable here")
    grading = replace(cards.get("MODEL_19"), task_type="grading")
    assert "does not fit" in model.resolve(grading)
    task = model.tasks[("radiology", "breastmnist")]
    model.tasks[("radiology", "breastmnist")] = replace(task, prompt_id="classification-v0-00000000-numbers")
    try:
        assert "with prompt classification-v0-00000000-numbers" in model.resolve(cards.get("MODEL_19"))
    finally:
        model.tasks[("radiology", "breastmnist")] = task


def test_adapters_must_fit_the_base_and_be_unique(models, tmp_path):
    other = tmp_path / "radiology-copy"
    shutil.copytree(models["adapters"] / "radiology", other)
    with pytest.raises(ManifestError, match="second adapter for specialty 'radiology'"):
        SpecialtyModel(models["base"], [models["adapters"] / "radiology", other])
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["base_model"]["fingerprint"] = "0" * 16
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="radiology-copy.*another base model"):
        SpecialtyModel(models["base"], [other])
    with pytest.raises(ModelLoadError, match="no-such-model"):
        SpecialtyModel(tmp_path / "no-such-model", [models["adapters"] / "radiology"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no adapter"):
        find_adapters(tmp_path / "empty")
    assert [p.name for p in find_adapters(models["adapters"])] == ["hematology", "pathology", "radiology"]


# -- a study: route, execute, report ---------------------------------------------------------------


def copy_samples(folder: Path, names=(CHEST, BREAST_US, BRAIN_CT, "ecg_waveform.dcm")) -> Path:
    """The samples, the small-parts US told to be a breast examination (its header names no anatomy)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == BREAST_US:
            ds = pydicom.dcmread(SAMPLES / name)
            ds.BodyPartExamined = "BREAST"
            ds.save_as(folder / name)
        else:
            shutil.copy(SAMPLES / name, folder / name)
    return folder


def routed_to(decision, card_id: str):
    """The decision as if the router had routed it to ``card_id`` alone."""
    return replace(decision, outcome=RouteOutcome("routed", (card_id,), confidence=decision.outcome.stages[0].p))


@pytest.fixture(scope="module")
def routed_samples(embedded_router, tmp_path_factory):
    return route_study(embedded_router, [copy_samples(tmp_path_factory.mktemp("samples") / "in")])


def _results(execution, uid) -> dict:
    return {r.card_id: r for r in execution.results[uid]}


def _by_file(routing):
    return {entry.series.members[0].path.name: entry for entry in routing.series}


def _sr_items(path: Path) -> list[tuple[str, str]]:
    ds = pydicom.dcmread(path)
    out = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if "ConceptCodeSequence" in item:
                out.append((name, item.ConceptCodeSequence[0].CodeMeaning))
            elif "TextValue" in item:
                out.append((name, item.TextValue))
            elif "MeasuredValueSequence" in item:
                out.append((name, str(item.MeasuredValueSequence[0].NumericValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_study_results_go_into_the_routing_srs(specialty_model, cards, routed_samples, tmp_path):
    """Each series is routed to its modality's cards as a set; every executable card of the set runs."""
    execution = execute_study(specialty_model, routed_samples, cards)
    series = _by_file(routed_samples)
    uid = {name: entry.series.series_instance_uid for name, entry in series.items()}
    assert all(series[name].decision.outcome.outcome == "routed-set" for name in (CHEST, BREAST_US, BRAIN_CT))
    breast_results = _results(execution, uid[BREAST_US])
    assert list(breast_results) == ["MODEL_19", "MODEL_20", "MODEL_21"]  # in the set's order
    assert breast_results["MODEL_19"].labels == ("malignant",)
    assert breast_results["MODEL_20"].status == NOT_EXECUTABLE
    assert _results(execution, uid[CHEST])["MODEL_89"].status == EXECUTED
    assert _results(execution, uid[CHEST])["MODEL_90"].status == NOT_EXECUTABLE  # no pneumoniamnist training
    assert {r.status for r in execution.results[uid[BRAIN_CT]]} == {NOT_EXECUTABLE}
    assert uid["ecg_waveform.dcm"] not in execution.results  # not an image: never routed
    assert not execution.boxes

    outputs = write_study_outputs(routed_samples, tmp_path, cards, execution=execution)
    meta = outputs.metadata
    assert meta["executed"] == 2 and meta["routed_sets"] == 3
    entries = {e["input"]: e for e in outputs.detail["entries"]}
    assert entries[BREAST_US]["executions"][0]["labels"] == ["malignant"]
    assert {e["status"] for e in entries[BRAIN_CT]["executions"]} == {NOT_EXECUTABLE}
    records = [json.loads(line) for line in outputs.decisions_file.read_text().splitlines()]
    assert sum(1 for r in records for e in r.get("executions") or () if e["status"] == EXECUTED) == 2

    breast = _sr_items(outputs.sr_files[uid[BREAST_US]])
    assert ("Specialty model execution", "Executed by the specialty model") in breast
    assert ("Specialty task", "radiology/breastmnist") in breast
    assert ("Class (specialty model)", "Malignant") in breast
    label = next(v for _, v in breast if v.startswith("onevlm route:"))
    assert "-> one of 3 cards: MODEL_19, MODEL_20, MODEL_21 (route confidence " in label
    assert label.endswith("uncalibrated); MODEL_19 result: malignant; MODEL_20 not executable here; "
                          "MODEL_21 not executable here")
    chest = _sr_items(outputs.sr_files[uid[CHEST]])
    assert ("Finding present (specialty model)", coding.NO_FINDING_PRESENT.meaning) in chest
    brain = _sr_items(outputs.sr_files[uid[BRAIN_CT]])
    assert ("Specialty model execution", "Model card not executable here") in brain
    assert any("MODEL_03 is not executable here: the card names no specialty task" in v for _, v in brain)
    for name in (BREAST_US, CHEST, BRAIN_CT):
        sr = pydicom.dcmread(outputs.sr_files[uid[name]])
        assert sr.VerificationFlag == "UNVERIFIED"
        assert dciodvfy_errors(outputs.sr_files[uid[name]]) == [], name


def test_detected_boxes_become_sr_regions_and_a_seg(specialty_model, routed_samples, cards, tmp_path):
    """A detection answer, parsed by the real parser, placed on the routed image, written as SR + SEG."""
    from onevlm.specialty.execution import AdapterTask

    info = DatasetInfo("polypset", "detection", ("adenomatous", "hyperplastic"), "gastroenterology")
    task = AdapterTask("gastroenterology", info, "letters", "detection-v1-test")
    answer = "hyperplastic [0.100, 0.200, 0.400, 0.500]\nadenomatous [0.500, 0.500, 0.900, 0.800]"
    result = parse_result("MODEL_33", task, answer, 0.1, {"dir": "gastroenterology"})
    assert result.status == EXECUTED and result.box_labels == ("hyperplastic", "adenomatous")
    entry = _by_file(routed_samples)[CHEST]
    boxes = image_boxes(result, entry)
    header = entry.routed.header
    assert boxes[0].x0 == pytest.approx(0.1 * header.columns) and boxes[0].y1 == pytest.approx(0.5 * header.rows)
    uid = entry.series.series_instance_uid
    outputs = write_study_outputs(routed_samples, tmp_path, cards,
                                  execution=StudyExecution({uid: (result,)}, {uid: boxes}))
    seg = pydicom.dcmread(outputs.box_files[uid])
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["hyperplastic", "adenomatous"]
    items = _sr_items(outputs.sr_files[uid])
    assert ("Regions found (specialty model)", "2") in items or ("Regions found (specialty model)", "2.0") in items
    assert ("Comment", "Finding: hyperplastic") in items
    assert dciodvfy_errors(outputs.sr_files[uid]) == []
    assert dciodvfy_errors(outputs.box_files[uid]) == []


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory) -> Path:
    from wsi_fixtures import dicomize, make_pyramid_tiff

    root = tmp_path_factory.mktemp("slide")
    dicomize(make_pyramid_tiff(root / "slide.tiff"), root / "dicom")
    return root / "dicom"


def test_a_whole_slide_runs_its_patch_task_on_tissue_tiles(specialty_model, cards, embedded_router, dicom_slide,
                                                          tmp_path):
    """The synthetic slide routes to a breast histopathology card; as MODEL_12 (IDC patches) it runs tile by tile."""
    import highdicom as hd

    from onevlm.study.execution import SLIDE_TILE_SIZE, SLIDE_TILES
    from onevlm.study.routing import StudyRouting

    routing = route_study(embedded_router, [dicom_slide])
    (entry,) = routing.series
    assert entry.decision.modality == "breast histopathology (H&E) scan"
    as_idc = StudyRouting((replace(entry, decision=routed_to(entry.decision, "MODEL_12")),))
    execution = execute_study(specialty_model, as_idc, cards)
    uid = entry.series.series_instance_uid
    (result,) = execution.results[uid]
    assert result.specialty == "pathology" and result.task == "idc"
    assert 1 <= sum(result.tile_counts.values()) <= SLIDE_TILES
    names = set(specialty_model.tasks[("pathology", "idc")].info.class_names)
    assert set(result.tile_counts) <= names | {"unparseable"}
    assert result.status == EXECUTED and result.labels == (specialty_model.tasks[("pathology", "idc")].info.class_names[0],)
    assert "tissue tiles" in result.summary()
    boxes = execution.boxes[uid]
    assert len(boxes) == sum(n for name, n in result.tile_counts.items() if name in names)
    assert all(b.x1 - b.x0 <= SLIDE_TILE_SIZE and b.label in names for b in boxes)
    outputs = write_study_outputs(as_idc, tmp_path, cards, execution=execution)
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(outputs.box_files[uid]))
    assert sum(len(g.get_graphic_data(coordinate_type="2D")) for g in ann.get_annotation_groups()) == len(boxes)
    errors = dciodvfy_errors(outputs.box_files[uid]) + dciodvfy_errors(outputs.sr_files[uid])
    assert [e for e in errors if "CommonZCoordinateValue" not in e] == []


def test_a_whole_slide_refuses_non_patch_tasks(specialty_model, cards, embedded_router, dicom_slide):
    from onevlm.study.routing import StudyRouting

    (entry,) = route_study(embedded_router, [dicom_slide]).series
    as_chest = StudyRouting((replace(entry, decision=routed_to(entry.decision, "MODEL_89")),))
    (result,) = execute_study(specialty_model, as_chest, cards).results[entry.series.series_instance_uid]
    assert result.status == NOT_EXECUTABLE and "patch classification or grading tasks only" in result.reason


# -- the MONAI Deploy app and the listener service ---------------------------------------------------


def _app_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


def _gemma3_models(gemma3_tiny_dir: Path, folder: Path) -> Path:
    """``folder / "models"`` for the app's -m: the tiny model on Gemma 3's real vocabulary as the base, and a QLoRA
    radiology adapter trained on it (breast ultrasound, every training image malignant)."""
    base = folder / "models" / "base"
    base.parent.mkdir(parents=True)
    base.symlink_to(gemma3_tiny_dir, target_is_directory=True)
    data = folder / "data"
    data.mkdir()
    write_medmnist_npz(data / "breastmnist.npz", "breastmnist", per_split=(32, 4, 4), fixed_labels=(0,))
    radiology = folder / "radiology.yaml"
    radiology.write_text("specialty: radiology\ndescription: test adapter\noption_markers: numbers\ndatasets:\n"
                         "  - {dataset: breastmnist, reader: medmnist, task: classification}\n")
    _finetune(radiology, data, base, folder / "models" / "adapters" / "radiology", 40)
    return folder / "models"


@pytest.fixture(scope="module")
def app_runs(models, tmp_path_factory, request) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The app's runs of the four tests below on the trained models, started side by side (each is a process of
    its own, as a site starts the app; most of a run is one core's start-up): name -> (the run, its folder).

    The "gemma3" run's models (``_gemma3_models``) are made first; without Gemma 3's vocabulary that run is left
    out and its test fails saying why."""
    root = tmp_path_factory.mktemp("route-execute-app")
    default = copy_samples(root / "default" / "in")
    (default / "broken.dcm").write_bytes(b"DICM but not really")
    both = copy_samples(root / "both-roles" / "in", (CHEST, BREAST_US))
    (root / "missing-adapter").mkdir()
    runs = {  # name -> (-i, -m, the run's environment, timeout)
        "default": (default, models["models"], _app_env(ONEVLM_SPECIALTY_QUANTIZE="nf4", ONEVLM_DEVICE="cpu"), 600),
        "both-roles": (both, models["models"], _app_env(ONEVLM_BACKEND="transformers", ONEVLM_SPECIALTY_QUANTIZE="nf4",
                                                        ONEVLM_DEVICE="cpu"), 600),
        "missing-adapter": (SAMPLES, models["models"],
                            _app_env(ONEVLM_ADAPTERS=str(root / "missing-adapter" / "nowhere")), 300),
    }
    try:
        gemma3_tiny_dir = request.getfixturevalue("gemma3_tiny_dir")
    except pytest.fail.Exception as missing:  # the vocabulary is not fetched: only the gemma3 test fails
        gemma3_missing = missing
    else:
        gemma3_missing = None
        runs["gemma3"] = (copy_samples(root / "gemma3" / "in", (CHEST, BREAST_US)),
                          _gemma3_models(gemma3_tiny_dir, root / "gemma3"),
                          _app_env(ONEVLM_SPECIALTY_QUANTIZE="nf4", ONEVLM_DEVICE="cpu"), 600)

    def run(name: str) -> subprocess.CompletedProcess:
        inputs, models_folder, env, timeout = runs[name]
        out = root / name if name == "missing-adapter" else root / name / "out"
        return subprocess.run([sys.executable, "-m", "apps.route_execute_app", "-i", str(inputs), "-o", str(out),
                               "-m", str(models_folder)], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env=env)

    with ThreadPoolExecutor(len(runs)) as pool:
        started = {name: pool.submit(run, name) for name in runs}
        done = {name: (future.result(), root / name) for name, future in started.items()}
    if gemma3_missing is not None:
        done["gemma3"] = (gemma3_missing, root / "gemma3")
    return done


def test_route_execute_app_end_to_end(app_runs):
    run, folder = app_runs["default"]
    out = folder / "out"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    detail = json.loads((out / "series.json").read_text())
    entries = {e["input"]: e for e in detail["entries"]}
    assert meta["executed"] == 2 and meta["routed_sets"] == 3 and meta["outcome"] == "failed"  # broken.dcm
    assert entries[BREAST_US]["executions"][0]["labels"] == ["malignant"]
    assert entries[CHEST]["executions"][0]["status"] == EXECUTED
    assert {e["status"] for e in entries[BRAIN_CT]["executions"]} == {NOT_EXECUTABLE}
    assert entries["ecg_waveform.dcm"]["skipped"] and entries["ecg_waveform.dcm"]["executions"] == []
    assert [p["file"] for p in detail["problems"]] == ["broken.dcm"] and meta["unreadable"] == 1
    assert len(list((out / "sr").glob("*.dcm"))) == 3


def test_route_execute_app_with_the_vlm_in_both_roles(app_runs):
    """ONEVLM_BACKEND=transformers: the router is the specialty model's base (random tiny VLM: any card)."""
    run, folder = app_runs["both-roles"]
    out = folder / "out"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["error"] is None for r in records)
    assert all(r["backend"]["shared_with_specialty_adapters"] == ["hematology", "pathology", "radiology"]
               for r in records)
    for record in records:
        assert [e["card_id"] for e in record.get("executions") or ()] == record["cards"]


@pytest.mark.slow
def test_route_execute_app_on_gemma3s_real_vocabulary(app_runs):
    """The specialty role on the tiny model with Gemma 3's real vocabulary and processor: a QLoRA adapter trained
    here (breast ultrasound, every training image malignant; ``_gemma3_models``) executes through the app (run in
    ``app_runs``: CHEST and BREAST_US), where the same base also routes (the hybrid router, pixels read where the
    header does not settle the route)."""
    run, folder = app_runs["gemma3"]
    if isinstance(run, BaseException):  # conftest.gemma3_vocabulary's failure: how to fetch the vocabulary
        raise run
    adapter = folder / "models" / "adapters" / "radiology"
    assert json.loads((adapter / MANIFEST_NAME).read_text())["results"]["val_accuracy"] == 1.0

    out = folder / "out"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = {Path(r["input"]).name: r for r in map(json.loads, (out / "decisions.jsonl").read_text().splitlines())}
    assert all(r["error"] is None for r in records.values())
    pixels = records[BREAST_US]["backend"]["pixels"]
    assert pixels["synthetic"]["tokenizer"] == "gemma3" and pixels["shared_with_specialty_adapters"] == ["radiology"]
    assert sum(r["vlm_calls"] for r in records.values()) >= 1  # the real-vocabulary VLM was asked
    entries = {e["input"]: e for e in json.loads((out / "series.json").read_text())["entries"]}
    breast = entries[BREAST_US]["executions"]
    assert breast and breast[0]["status"] == EXECUTED and breast[0]["labels"] == ["malignant"]
    assert len(list((out / "sr").glob("*.dcm"))) == 2


def test_route_execute_app_refuses_a_missing_adapter_folder(app_runs):
    run, folder = app_runs["missing-adapter"]
    assert run.returncode != 0
    assert f"{folder / 'nowhere'}: adapter folder not found" in run.stdout + run.stderr


def test_listener_service_runs_route_execute(models, tmp_path):
    from dicom_peers import running_service, service_config, storescu, wait_until
    from onevlm.net.config import ConfigError, parse_config

    spool = tmp_path / "spool"
    pipeline = {"backend": "embedded", "specialty": {"base_model_dir": str(models["base"]),
                                                      "adapters": [str(models["adapters"])], "quantize": "nf4",
                                                      "device": "cpu"}}
    config = service_config(spool, pipeline=pipeline)
    broken = service_config(spool, pipeline={"specialty": {"base_model_dir": str(tmp_path), "adapters": []}})
    with pytest.raises(ConfigError, match="pipeline.specialty.base_model_dir.*no config.json"):
        parse_config(broken)
    shared = parse_config(service_config(spool, pipeline={**pipeline, "backend": "transformers"}))
    assert shared.pipeline.model_dir is None and shared.pipeline.specialty.base_model_dir == models["base"]
    with pytest.raises(ConfigError, match="pipeline.model_dir.*shares the base model"):
        parse_config(service_config(spool, pipeline={"backend": "transformers"}))
    source = tmp_path / "us.dcm"
    ds = pydicom.dcmread(SAMPLES / BREAST_US)
    ds.BodyPartExamined = "BREAST"
    ds.decompress()
    ds.save_as(source)
    with running_service(config) as service:
        sent = storescu([source], service.listener.port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        results = spool / "results"
        metadata = wait_until(lambda: next(results.glob("*/metadata.json"), None), 120, 0.5,
                              "the study's results")
        meta = json.loads(metadata.read_text())
        detail = json.loads((metadata.parent / meta["detail_file"]).read_text())
    assert meta["executed"] == 1 and meta["cards"] == "MODEL_19,MODEL_20,MODEL_21"
    assert detail["entries"][0]["cards"] == ["MODEL_19", "MODEL_20", "MODEL_21"]
    assert detail["entries"][0]["executions"][0]["labels"] == ["malignant"]
    sr = next(metadata.parent.glob("sr/*.dcm"))
    assert ("Class (specialty model)", "Malignant") in _sr_items(sr)


def test_route_execute_app_calibrated_hybrid_turns_a_card_set_into_one_card(models, specialty_model, cards, tmp_path):
    """A calibrated hybrid router: where the header decides the modality and the pixels the finding, the
    head CTs go to one card (MODEL_04, the stroke card) instead of the four brain CT cards by header alone."""
    import csv

    from onevlm.backends import create_backend
    from onevlm.router.site_calibration import calibrate_from_labels
    from onevlm.specialty.shared_base import SharedBaseRouterBackend
    from scripted_vlm import scripted_router_calls

    script = {"brain CT scan": 0.6, "acute ischemic stroke": 0.35}
    inputs = copy_samples(tmp_path / "in", (BRAIN_CT, "ct_head_512_j2k.dcm"))

    def run_app(name: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "tests" / "scripted_app.py"), "apps.route_execute_app",
                               "-i", str(inputs), "-o", str(tmp_path / name), "-m", str(models["models"])],
                              capture_output=True, text=True, timeout=600, cwd=REPO,
                              env=_app_env(ONEVLM_SPECIALTY_QUANTIZE="nf4", ONEVLM_DEVICE="cpu", **extra))

    # the header-alone run needs no calibration: it runs (its own process) while the calibration is fitted here
    pool = ThreadPoolExecutor(2)
    embedded = pool.submit(run_app, "embedded", ONEVLM_BACKEND="embedded", ONEVLM_TEST_SCRIPTED_ANSWERS="{}")
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "finding", "card"])
        for _ in range(12):
            writer.writerow([str(SAMPLES / BRAIN_CT), "brain CT scan", "acute ischemic stroke", "MODEL_04"])
            writer.writerow([str(SAMPLES / "ct_head_512_j2k.dcm"), "brain CT scan", "acute ischemic stroke", "MODEL_04"])
        for _ in range(6):
            writer.writerow([str(SAMPLES / "nm_whole_body_j2k.dcm"), "Other", "", ""])
            writer.writerow([str(SAMPLES / "rt_plan.dcm"), "None", "", ""])
    with pool:
        backend = create_backend("hybrid", cards, pixel_backend=SharedBaseRouterBackend(specialty_model))
        with scripted_router_calls(script):
            calibration = calibrate_from_labels(labels, cards, backend, risk=0.2, holdout=0.0)
        assert calibration.fusion is not None and calibration.identity["backend"] == "hybrid"
        calibration_file = calibration.save(tmp_path / "calibration.json")
        hybrid = pool.submit(run_app, "hybrid", ONEVLM_CALIBRATION=str(calibration_file),
                             ONEVLM_TEST_SCRIPTED_ANSWERS=json.dumps(script))
        runs = {}
        for name, future in (("hybrid", hybrid), ("embedded", embedded)):
            run = future.result()
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            runs[name] = {e["input"]: e for e in json.loads((tmp_path / name / "series.json").read_text())["entries"]}
    for input_name in (BRAIN_CT, "ct_head_512_j2k.dcm"):
        alone, hybrid = runs["embedded"][input_name], runs["hybrid"][input_name]
        assert alone["outcome"] == "routed-set" and alone["cards"] == ["MODEL_01", "MODEL_02", "MODEL_03", "MODEL_04"]
        assert hybrid["outcome"] == "routed" and hybrid["cards"] == ["MODEL_04"] and hybrid["calibrated"]
        assert hybrid["consulted"][1] == ["header", "pixels"]  # the finding is the pixels'
    # the routine head CT's header decides the modality: its one VLM call is stage 2's
    assert runs["hybrid"][BRAIN_CT]["consulted"][0] == ["header"] and runs["hybrid"][BRAIN_CT]["vlm_calls"] == 1
    assert runs["hybrid"]["ct_head_512_j2k.dcm"]["vlm_calls"] == 2
