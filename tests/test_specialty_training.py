"""Specialty tasks (prompts, parsers, mixtures) and QLoRA fine-tuning on the synthetic tiny model.

Everything is built offline: images are coloured shapes drawn with PIL, the model is
``build_synthetic_model("tiny")`` (a Gemma 3 with 64-wide layers and a word-level tokenizer).
The tiny tokenizer has ``A``, ``B`` and ``D`` as tokens but not ``C``, so training here uses
numbered options (``markers="numbers"``: ``1``–``4`` are tokens); letters are exercised by the
prompt and parser tests.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from onevlm.specialty.manifest import MANIFEST_NAME, ManifestError, read_manifest, validate_manifest
from onevlm.specialty.samples import DatasetInfo, LabelledImage, NormalisedBox
from onevlm.specialty.tasks import (
    NONE_ANSWER,
    REGION_COLOUR,
    TASK_PROMPT_VERSION,
    SpecialtyConfigError,
    Unparseable,
    build_example,
    build_examples,
    derive_task,
    is_correct,
    is_unparseable,
    load_specialties,
    load_specialty,
    parse_answer,
    prompt_id,
    prompt_ids,
)
from onevlm.specialty.encoding import IGNORE_INDEX, ExampleEncoder, unrepresentable_answers
from onevlm.specialty.prediction import accuracy, load_finetuned, predict
from onevlm.specialty.training import TrainingSettings, _DataStream, finetune, latest_checkpoint
from onevlm.vlm.loading import LoadOptions, fingerprint, load_model

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
COLOUR_INFO = DatasetInfo("colours", "classification", tuple(COLOURS), "test", "synthetic coloured shapes")

INFOS = {
    "classification": DatasetInfo("tissue", "classification", ("adipose", "background", "debris", "lymphocytes"), "pathology"),
    "grading": DatasetInfo("retina", "grading", ("no DR", "mild", "moderate", "severe", "proliferative"), "ophthalmology"),
    "multilabel": DatasetInfo("chest", "multilabel", ("atelectasis", "cardiomegaly", "effusion", "pleural thickening"),
                              "radiology"),
    "detection": DatasetInfo("polyps", "detection", ("adenomatous", "hyperplastic"), "gastroenterology"),
    "region-classification": DatasetInfo("lesions", "region-classification", ("bone", "liver", "lung", "soft tissue"),
                                         "radiology"),
}


# -- synthetic data ---------------------------------------------------------------------------


def shape_image(colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A filled rectangle, ellipse or triangle of ``colour`` (jittered) on a dark background, 28–32 px."""
    r = random.Random(seed)
    size = r.randint(28, 32)
    background = tuple(r.randint(0, 40) for _ in range(3))
    fill = tuple(max(0, min(255, c + r.randint(-20, 20))) for c in colour)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    m = r.randint(1, 4)
    kind = r.randrange(3)
    if kind == 0:
        draw.rectangle([m, m, size - 1 - m, size - 1 - m], fill=fill)
    elif kind == 1:
        draw.ellipse([m, m, size - 1 - m, size - 1 - m], fill=fill)
    else:
        draw.polygon([(size // 2, m), (m, size - 1 - m), (size - 1 - m, size - 1 - m)], fill=fill)
    return image


def colour_samples(split: str, n: int, offset: int, dataset: str = "colours") -> list[LabelledImage]:
    """``n`` shapes cycling through the four colours (label = colour index)."""
    colours = list(COLOURS.values())

    def loader(label: int, seed: int):
        return lambda: shape_image(colours[label], seed)

    return [LabelledImage(dataset, split, loader(i % 4, offset + i), (i % 4,), source=f"shape-{offset + i}")
            for i in range(n)]


def plain_sample(dataset: str, labels=(), boxes=(), split: str = "train") -> LabelledImage:
    return LabelledImage(dataset, split, lambda: Image.new("RGB", (40, 30), (60, 60, 60)), tuple(labels), tuple(boxes))


def sample_for(task: str) -> LabelledImage:
    name = INFOS[task].name
    if task in ("classification", "grading"):
        return plain_sample(name, (2,))
    if task == "multilabel":
        return plain_sample(name, (3, 0))
    if task == "detection":
        return plain_sample(name, boxes=(NormalisedBox(0.5, 0.6, 0.9, 0.95, 1), NormalisedBox(0.1234, 0.1, 0.3, 0.4, 0)))
    return plain_sample(name, boxes=(NormalisedBox(0.2, 0.25, 0.6, 0.7, 2),))


@pytest.fixture(scope="session")
def tiny_dir(word_tiny_dir) -> Path:
    return word_tiny_dir  # conftest: the same build test_specialty_cli.py fine-tunes


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return load_model(tiny_dir, LoadOptions(device="cpu")).processor


# -- prompts and parsers ----------------------------------------------------------------------


def test_prompt_ids_are_versioned_per_task_and_marker_style():
    ids = prompt_ids()
    assert set(ids) == set(INFOS)
    assert len(set(ids.values())) == len(ids)
    for task, pid in ids.items():
        assert pid.startswith(f"{task}-v{TASK_PROMPT_VERSION}-")
    assert prompt_id("classification", "numbers") != ids["classification"]
    assert prompt_id("grading", "numbers") == ids["grading"]  # grades are numbers whatever the style
    with pytest.raises(ValueError, match="task"):
        prompt_id("segmentation")


@pytest.mark.parametrize("task", list(INFOS))
@pytest.mark.parametrize("markers", ["letters", "numbers"])
def test_every_task_round_trips(task, markers):
    info = INFOS[task]
    ex = build_example(info, sample_for(task), markers)
    assert ex.task == task and ex.prompt_id == prompt_id(task, markers) and ex.system and ex.user
    assert parse_answer(info, ex.answer, markers) == ex.target
    assert parse_answer(info, f"  {ex.answer.upper()} \n", markers) == ex.target  # whitespace and case
    assert parse_answer(info, ex.answer.lower(), markers) == ex.target
    assert is_correct(task, ex.target, parse_answer(info, ex.answer, markers))
    image = ex.load_image()
    assert image.mode == "RGB" and image.size == (40, 30)


def test_answers_follow_the_documented_formats():
    cls = build_example(INFOS["classification"], sample_for("classification"))
    assert cls.answer == "C" and "A: adipose\nB: background\nC: debris\nD: lymphocytes" in cls.user
    assert "Answer with the letter" in cls.user
    num = build_example(INFOS["classification"], sample_for("classification"), markers="numbers")
    assert num.answer == "3" and "1: adipose\n2: background" in num.user
    grade = build_example(INFOS["grading"], sample_for("grading"))
    assert grade.answer == "2" and "0: no DR\n1: mild\n2: moderate" in grade.user and grade.target == 2
    multi = build_example(INFOS["multilabel"], sample_for("multilabel"))
    assert multi.answer == "atelectasis, pleural thickening" and multi.target == frozenset({0, 3})
    empty = build_example(INFOS["multilabel"], plain_sample("chest"))
    assert empty.answer == NONE_ANSWER and empty.target == frozenset() and empty.target_names == ("none",)
    det = build_example(INFOS["detection"], sample_for("detection"))
    # reading order (top first), three decimals
    assert det.answer == "adenomatous [0.123, 0.100, 0.300, 0.400]\nhyperplastic [0.500, 0.600, 0.900, 0.950]"
    assert build_example(INFOS["detection"], plain_sample("polyps")).answer == NONE_ANSWER
    region = build_example(INFOS["region-classification"], sample_for("region-classification"))
    assert region.answer == "C" and "[0.200, 0.250, 0.600, 0.700]" in region.user and "green" in region.user


def test_region_is_drawn_on_the_image_in_the_fixed_colour():
    info = INFOS["region-classification"]
    sample = LabelledImage("lesions", "val", lambda: Image.new("L", (100, 100), 50), (),
                           (NormalisedBox(0.2, 0.3, 0.6, 0.8, 1),))
    ex = build_example(info, sample)
    image = ex.load_image()
    assert image.mode == "RGB"
    assert image.getpixel((20, 50)) == REGION_COLOUR  # left edge
    assert image.getpixel((40, 30)) == REGION_COLOUR  # top edge
    assert image.getpixel((40, 50)) == (50, 50, 50)  # inside untouched
    assert image.getpixel((5, 5)) == (50, 50, 50)
    assert sample.load().mode == "L"  # the sample's own image is not modified


@pytest.mark.parametrize("task, text", [
    ("classification", "E"),  # out of range
    ("classification", "1"),  # wrong marker style
    ("classification", "B: debris"),  # marker and option text disagree
    ("classification", "adipose"),  # the name alone is not an answer
    ("classification", "A or B"),
    ("classification", ""),
    ("grading", "5"),
    ("grading", "-1"),
    ("grading", "A"),
    ("grading", "2.5"),
    ("multilabel", "atelectasis, pneumonia"),
    ("multilabel", "atelectasis,"),
    ("multilabel", ""),
    ("multilabel", "none, effusion"),
    ("detection", "adenomatous 0.1, 0.1, 0.2, 0.2"),
    ("detection", "adenomatous [0.1, 0.1, 0.2]"),
    ("detection", "adenomatous [0.3, 0.1, 0.2, 0.2]"),  # x0 > x1
    ("detection", "adenomatous [0.1, 0.1, 0.2, 1.5]"),  # outside the image
    ("detection", "polyp [0.1, 0.1, 0.2, 0.2]"),  # unknown label
    ("detection", "adenomatous [0.1, 0.1, 0.2, 0.2]\ngarbage"),
    ("detection", ""),
    ("region-classification", "Z"),
])
def test_parsers_never_coerce(task, text):
    prediction = parse_answer(INFOS[task], text)
    assert is_unparseable(prediction) and isinstance(prediction, Unparseable) and not prediction
    assert not is_correct(task, 0, prediction)


def test_parsers_tolerate_whitespace_case_and_matching_option_text():
    info = INFOS["classification"]
    for text in ("B", " b ", "B: background", "b: BACKGROUND", "(B)", "B."):
        assert parse_answer(info, text) == 1, text
    assert parse_answer(info, "2", "numbers") == 1
    assert parse_answer(INFOS["grading"], "3: severe") == 3
    assert parse_answer(INFOS["multilabel"], " Effusion ,atelectasis ") == frozenset({0, 2})
    assert parse_answer(INFOS["multilabel"], "NONE") == frozenset()
    boxes = parse_answer(INFOS["detection"], "\n Hyperplastic [ 0.5,0.6, 0.9 , 0.95 ]\n\nadenomatous [0.1, 0.1, 0.3, 0.4]\n")
    assert [b.label for b in boxes] == [0, 1]  # reading order
    assert parse_answer(INFOS["detection"], " None ") == ()


def test_detection_correctness_matches_boxes_by_iou():
    gold = (NormalisedBox(0.1, 0.1, 0.3, 0.3, 0), NormalisedBox(0.5, 0.5, 0.9, 0.9, 1))
    close = (NormalisedBox(0.52, 0.5, 0.9, 0.92, 1), NormalisedBox(0.11, 0.1, 0.3, 0.31, 0))
    assert is_correct("detection", gold, close)
    assert not is_correct("detection", gold, close[:1])  # missing box
    assert not is_correct("detection", gold, (close[0], NormalisedBox(0.11, 0.1, 0.3, 0.31, 1)))  # wrong label
    assert not is_correct("detection", gold, (close[0], NormalisedBox(0.6, 0.6, 0.7, 0.7, 0)))  # poor overlap
    assert is_correct("detection", (), ())


def test_build_example_rejects_samples_that_do_not_fit_the_task():
    with pytest.raises(ValueError, match="exactly one label"):
        build_example(INFOS["classification"], plain_sample("tissue", (0, 1)))
    with pytest.raises(ValueError, match="out of range"):
        build_example(INFOS["classification"], plain_sample("tissue", (4,)))
    with pytest.raises(ValueError, match="exactly one box"):
        build_example(INFOS["region-classification"], plain_sample("lesions", (1,)))
    with pytest.raises(ValueError, match="dataset"):
        build_example(INFOS["classification"], plain_sample("other", (0,)))
    bad = DatasetInfo("bad", "multilabel", ("a, b", "c"), "radiology")
    with pytest.raises(ValueError, match="may not contain"):
        build_example(bad, plain_sample("bad", (0,)))
    many = DatasetInfo("many", "classification", tuple(f"class {i}" for i in range(27)), "radiology")
    with pytest.raises(ValueError, match="letters"):
        build_example(many, plain_sample("many", (0,)))
    assert build_example(many, plain_sample("many", (26,)), markers="numbers").answer == "27"


def test_derive_task_turns_detection_into_classification_and_regions():
    info = INFOS["detection"]
    samples = [sample_for("detection"), plain_sample("polyps", boxes=(NormalisedBox(0.1, 0.1, 0.2, 0.2, 1),)),
               plain_sample("polyps")]
    cls_info, cls = derive_task(info, samples, "classification")
    assert cls_info.name == "polyps-classification" and cls_info.task_type == "classification"
    assert [s.labels for s in cls] == [(1,)]  # mixed-class and empty frames are left out
    region_info, regions = derive_task(info, samples, "region-classification", name="polyp-regions")
    assert region_info.name == "polyp-regions" and len(regions) == 3
    assert all(build_example(region_info, s).answer in "AB" for s in regions)
    with pytest.raises(ValueError, match="cannot derive"):
        derive_task(INFOS["classification"], [], "detection")


# -- specialty mixtures -----------------------------------------------------------------------


def test_shipped_specialty_mixtures():
    specialties = load_specialties()
    expected = {
        "gastroenterology": {"polypset": ("polypset", "detection"), "polypset-classification": ("polypset", "classification")},
        "hematology": {"bloodmnist": ("medmnist", "classification")},
        "ophthalmology": {"octmnist": ("medmnist", "classification"), "retinamnist": ("medmnist", "grading")},
        "pathology": {"tissuemnist": ("medmnist", "classification"), "pathmnist": ("medmnist", "classification"),
                      "idc": ("idc", "classification")},
        "radiology": {"breastmnist": ("medmnist", "classification"),
                      "deeplesion": ("deeplesion", "region-classification"),
                      "organamnist": ("medmnist", "classification"), "organcmnist": ("medmnist", "classification"),
                      "organsmnist": ("medmnist", "classification"),
                      "pneumoniamnist": ("medmnist", "classification"), "chestmnist": ("medmnist", "multilabel")},
    }
    assert set(specialties) == set(expected)
    for name, datasets in expected.items():
        config = specialties[name]
        assert {e.dataset: (e.reader, e.task) for e in config.datasets} == datasets
        assert all(e.weight > 0 for e in config.datasets) and config.option_markers == "letters"
        assert set(config.dataset_weights()) == set(datasets)
    assert specialties["gastroenterology"].entry("polypset-classification").source == "polypset"


@pytest.mark.parametrize("body, field", [
    ("specialty: x\ndatasets:\n  - {dataset: a, reader: medmnist, task: segmentation}\n", "datasets[0].task"),
    ("specialty: x\ndatasets:\n  - {dataset: a, reader: medmnist, task: grading, weight: 0}\n", "datasets[0].weight"),
    ("specialty: x\ndatasets:\n  - {dataset: a, reader: medmnist, task: grading}\n"
     "  - {dataset: b, reader: dicom, task: grading}\n", "datasets[1].reader"),
    ("specialty: x\ndatasets:\n  - {dataset: a, task: grading}\n", "datasets[0].reader"),
    ("specialty: x\ndatasets:\n  - {dataset: a, reader: idc, task: classification, colour: red}\n", "datasets[0].colour"),
    ("specialty: x\ndatasets:\n  - {dataset: a, reader: idc, task: classification}\n"
     "  - {dataset: a, reader: idc, task: classification}\n", "datasets[1].dataset"),
    ("specialty: x\ndatasets: []\n", "datasets"),
    ("datasets:\n  - {dataset: a, reader: idc, task: classification}\n", "specialty"),
    ("specialty: x\noption_markers: roman\ndatasets:\n  - {dataset: a, reader: idc, task: classification}\n",
     "option_markers"),
])
def test_specialty_validation_names_the_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(SpecialtyConfigError, match=rf"bad\.yaml: {re.escape(field)}"):
        load_specialty(path)


def test_specialty_check_info():
    config = load_specialties()["gastroenterology"]
    derived, _ = derive_task(DatasetInfo("polypset", "detection", ("adenomatous", "hyperplastic"), "gastroenterology"),
                             [], "classification")
    config.check_info(derived)
    with pytest.raises(ValueError, match="configured for classification"):
        config.check_info(DatasetInfo("polypset-classification", "detection", ("a",), "gastroenterology"))


# -- encoding ---------------------------------------------------------------------------------


def test_labels_mask_everything_but_the_answer(tiny_dir, processor):
    from transformers import AutoConfig

    image_token_id = AutoConfig.from_pretrained(tiny_dir).image_token_id
    encoder = ExampleEncoder(processor, image_token_id)
    tok = processor.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    examples = build_examples(COLOUR_INFO, colour_samples("train", 3, 0), markers="numbers")
    multi = build_example(INFOS["multilabel"], sample_for("multilabel"))  # a longer answer
    for ex in [*examples, multi]:
        enc = encoder.encode(ex)
        n = enc.prompt_length
        assert len(enc.input_ids) == len(enc.labels) == len(enc.token_type_ids)
        assert all(label == IGNORE_INDEX for label in enc.labels[:n])
        assert list(enc.labels[n:]) == list(enc.input_ids[n:])
        assert enc.input_ids[-1] == end_of_turn and enc.labels[-1] == end_of_turn
        assert tok.decode(list(enc.input_ids[n:-1])) == tok.decode(tok(ex.answer, add_special_tokens=False)["input_ids"])
        # token_type_ids: 1 exactly on the image tokens (all in the prompt), 0 over the appended answer
        assert [int(i == image_token_id) for i in enc.input_ids] == list(enc.token_type_ids)
        assert sum(enc.token_type_ids) == 4 and not any(enc.token_type_ids[n:])
        tokens = tok.convert_ids_to_tokens(list(enc.input_ids[:n]))
        assert tokens[:2] == ["<bos>", "<start_of_turn>"] and tokens[-3:] == ["<start_of_turn>", "▁model", "\n"]
    batch = encoder.training_batch([*examples, multi])
    widths = {t.shape for k, t in batch.items() if k != "pixel_values"}
    assert len(widths) == 1  # ids, mask, types and labels share one shape
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["token_type_ids"][pad] == 0).all()
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) == torch.tensor(
        [len(encoder.answer_ids(ex.answer)) for ex in [*examples, multi]])).all()
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    gen = encoder.generation_batch(examples)
    assert gen["input_ids"].shape == gen["token_type_ids"].shape and (gen["attention_mask"][:, -1] == 1).all()


def test_answers_the_tokenizer_cannot_write_are_refused(tiny_dir, processor, tmp_path):
    letters = build_examples(COLOUR_INFO, colour_samples("train", 4, 0))
    assert unrepresentable_answers(processor.tokenizer, letters) == {"colours": ["C"]}  # no "C" token
    numbers = build_examples(COLOUR_INFO, colour_samples("train", 4, 0), markers="numbers")
    assert unrepresentable_answers(processor.tokenizer, numbers) == {}
    with pytest.raises(ValueError, match="cannot be written exactly"):
        finetune(tiny_dir, letters, [], tmp_path / "never", TrainingSettings(specialty="test", device="cpu"))


def test_data_stream_is_deterministic_and_weighted():
    a, b = _DataStream(10, 4, 0, None), _DataStream(10, 4, 0, None)
    first = [a.batch(k) for k in range(5)]
    assert first == [b.batch(k) for k in range(5)]
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))  # an epoch is a permutation
    assert b.batch(3) == first[3]  # random access: a resumed run sees the same batches
    weighted = _DataStream(100, 50, 0, [10.0] * 10 + [0.1] * 90)
    drawn = weighted.batch(0) + weighted.batch(1)
    assert sum(i < 10 for i in drawn) > 50  # 10 heavy examples dominate


def test_settings_are_validated():
    with pytest.raises(ValueError, match="quantize"):
        TrainingSettings(specialty="x", quantize="int8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainingSettings(specialty="x", batch_size=0)
    with pytest.raises(ValueError, match="specialty"):
        TrainingSettings(specialty=" ")
    with pytest.raises(ValueError, match="dataset_weights"):
        TrainingSettings(specialty="x", dataset_weights={"a": -1.0})
    defaults = TrainingSettings(specialty="x")
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.target_modules) == (16, 16, 0.05,
                                                                                                      "all-linear")
    assert defaults.quantize == "nf4"


# -- QLoRA: a few NF4 steps, checkpoint, resume, manifest -------------------------------------


def _fast_settings(**changes) -> TrainingSettings:
    base = dict(specialty="test", quantize="nf4", device="cpu", batch_size=4, gradient_accumulation_steps=2,
                max_steps=4, learning_rate=1e-3, checkpoint_every=2, keep_checkpoints=5,
                gradient_checkpointing=False, eval_batch_size=8, log_every=1, progress=False)
    base.update(changes)
    return TrainingSettings(**base)


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def nf4_run(tiny_dir, tmp_path_factory):
    """Four NF4 QLoRA steps with checkpoints at 2 and 4 (and the manifest)."""
    train = build_examples(COLOUR_INFO, colour_samples("train", 24, 0), markers="numbers")
    val = build_examples(COLOUR_INFO, colour_samples("val", 8, 5000), markers="numbers")
    out = tmp_path_factory.mktemp("nf4-run")
    result = finetune(tiny_dir, train, val, out, _fast_settings())
    return train, val, out, result


def test_nf4_qlora_trains_and_checkpoints(nf4_run):
    import bitsandbytes as bnb

    _, _, out, result = nf4_run
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    assert latest_checkpoint(out)[0] == 4
    base = result.model.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())  # really 4-bit
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 16, 0.05)
    losses = [loss for _, loss in result.manifest.results["loss_history"]]
    assert len(losses) == 4 and all(loss == loss and loss > 0 for loss in losses)


def test_manifest_records_base_tasks_data_settings_and_results(nf4_run, tiny_dir):
    train, val, out, result = nf4_run
    manifest = read_manifest(out)
    assert manifest == result.manifest
    assert manifest.base_model["fingerprint"] == fingerprint(tiny_dir)
    assert manifest.base_model["model_type"] == "gemma3" and manifest.base_model["quantize"] == "nf4"
    assert manifest.specialty == "test" and manifest.prompt_version == TASK_PROMPT_VERSION
    assert manifest.tasks == [{"dataset": "colours", "task": "classification",
                               "prompt_id": prompt_id("classification", "numbers"), "markers": "numbers",
                               "class_names": list(COLOURS), "description": COLOUR_INFO.description}]
    assert manifest.data == {"colours": {
        "train": {"examples": 24, "classes": {name: 6 for name in COLOURS}},
        "val": {"examples": 8, "classes": {name: 2 for name in COLOURS}},
    }}
    assert manifest.training["lora_r"] == 16 and manifest.training["quantize"] == "nf4"
    assert manifest.training["max_steps"] == 4 and manifest.training["total_steps"] == 4
    results = manifest.results
    assert results["steps"] == 4 and results["resumed_from"] is None
    assert results["train_loss"] > 0 and results["val_loss"] > 0
    assert 0.0 <= results["val_accuracy"] <= 1.0 and results["val_examples"] == 8
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert "shape-" not in json.dumps(raw)  # no sample identifiers in the manifest
    del raw["results"]["val_loss"]
    with pytest.raises(ManifestError, match="results.val_loss"):
        validate_manifest(raw)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw["base_model"].pop("fingerprint")
    with pytest.raises(ManifestError, match="base_model.fingerprint"):
        validate_manifest(raw)


def test_resume_continues_from_the_last_checkpoint(nf4_run, tiny_dir, tmp_path):
    train, val, out, result = nf4_run
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")  # "crashed" after 2
    resumed = finetune(tiny_dir, train, val, run, _fast_settings(), resume=True)
    assert resumed.manifest.results["resumed_from"] == 2 and resumed.manifest.results["steps"] == 4
    assert latest_checkpoint(run)[0] == 4
    # steps 3-4 replayed with the same data, optimizer state and dropout RNG: the same adapter
    uninterrupted, again = _adapter_weights(out), _adapter_weights(run)
    assert uninterrupted.keys() == again.keys()
    for key in uninterrupted:
        torch.testing.assert_close(again[key], uninterrupted[key], rtol=1e-5, atol=1e-6)
    history = result.manifest.results["loss_history"]
    again_history = resumed.manifest.results["loss_history"]
    assert [s for s, _ in again_history] == [s for s, _ in history] == [1, 2, 3, 4]
    assert [v for _, v in again_history] == pytest.approx([v for _, v in history], rel=1e-5)
    with pytest.raises(ValueError, match="learning_rate"):
        finetune(tiny_dir, train, val, run, _fast_settings(learning_rate=5e-4), resume=True)
    # a checkpoint cut off before its checkpoint.json (written last) is not one to resume from
    (run / "checkpoints" / "checkpoint-4" / "checkpoint.json").unlink()
    assert latest_checkpoint(run)[0] == 2


def test_the_loss_weighs_every_answer_token_of_the_accumulated_step_alike(tiny_dir, tmp_path):
    """One step accumulating a one-token classification answer and a long multilabel answer: its loss is the mean
    over all their answer tokens (as transformers' Trainer since 4.46), not the mean of the two micro-batch means
    (the old loop's), and TensorBoard events are written when asked."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from onevlm.specialty.answer_loss import answer_loss_sum

    short = build_examples(COLOUR_INFO, colour_samples("train", 1, 0), markers="numbers")[0]
    long = build_example(INFOS["multilabel"], sample_for("multilabel"))
    settings = _fast_settings(quantize="none", batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                              lora_dropout=0.0, checkpoint_every=0, tensorboard=True)
    result = finetune(tiny_dir, [short, long], [], tmp_path / "adapter", settings)
    logged = result.manifest.results["loss_history"][0][1]

    # step 1 runs the base model's function (LoRA's B starts at zero): the reference is the base model
    base = load_model(tiny_dir, LoadOptions(device="cpu", dtype="fp32"))
    encoder = ExampleEncoder(base.processor, base.model.config.image_token_id)
    sums, counts = [], []
    for example in (short, long):
        batch = encoder.training_batch([example])
        labels = batch.pop("labels")
        with torch.no_grad():
            summed, count = answer_loss_sum(base.model, batch, labels)
            # the logits kept at the answer positions only give transformers' own loss over the whole sequence
            assert float(summed) / count == pytest.approx(float(base.model(**batch, labels=labels).loss), rel=1e-5)
        sums.append(float(summed))
        counts.append(count)
    assert counts[1] >= 3 * counts[0]
    token_mean = sum(sums) / sum(counts)
    mean_of_means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    assert logged == pytest.approx(token_mean, rel=1e-4)
    assert logged != pytest.approx(mean_of_means, rel=1e-3)  # what the old loop reported (and trained on)

    events = EventAccumulator(str(tmp_path / "adapter" / "runs"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([logged], rel=1e-5)


# -- the learning proof -----------------------------------------------------------------------


def _option_accuracy(model, processor, examples) -> float:
    """Accuracy of the first answer token restricted to the option markers (chance: 25 %)."""
    encoder = ExampleEncoder(processor, model.config.image_token_id)
    options = [processor.tokenizer.convert_tokens_to_ids(f"▁{i}") for i in range(1, 5)]
    batch = encoder.generation_batch(examples)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, options]
    return float((logits.argmax(-1) == torch.tensor([ex.target for ex in examples])).float().mean())


@pytest.mark.slow
def test_qlora_learns_a_four_class_colour_task(tiny_dir, tmp_path):
    """NF4 QLoRA on CPU takes the random tiny model from chance to >= 90 % test accuracy."""
    train = build_examples(COLOUR_INFO, colour_samples("train", 256, 0), markers="numbers")
    val = build_examples(COLOUR_INFO, colour_samples("val", 40, 100_000), markers="numbers")
    test = build_examples(COLOUR_INFO, colour_samples("test", 100, 200_000), markers="numbers")

    # baseline on a separately loaded model (a 4-bit model that ran inference on CPU cannot train)
    base = load_model(tiny_dir, LoadOptions(device="cpu", quantize="nf4"))
    before = accuracy(test, predict(base.model, base.processor, COLOUR_INFO, test, max_new_tokens=4, batch_size=50))
    before_options = _option_accuracy(base.model, base.processor, test)
    del base

    settings = TrainingSettings(specialty="test", quantize="nf4", device="cpu", batch_size=16,
                                gradient_accumulation_steps=1, max_steps=120, learning_rate=3e-3, warmup_ratio=0.05,
                                checkpoint_every=60, gradient_checkpointing=False, eval_batch_size=50, log_every=20,
                                progress=True)
    started = time.monotonic()
    result = finetune(tiny_dir, train, val, tmp_path / "adapter", settings)
    seconds = time.monotonic() - started
    after = accuracy(test, predict(result.model, result.processor, COLOUR_INFO, test, batch_size=50))

    reloaded = load_finetuned(tmp_path / "adapter", options=LoadOptions(device="cpu", quantize="nf4"))
    after_reload = accuracy(test, predict(reloaded.model, reloaded.processor, COLOUR_INFO, test, batch_size=50))
    logger.info("learning proof (NF4 QLoRA, CPU): test accuracy %.2f before (options-restricted %.2f), %.2f after "
                "%d steps in %.1f s (%.2f reloaded); val accuracy %.2f, train loss %.4f",
                before, before_options, after, settings.max_steps, seconds, after_reload,
                result.manifest.results["val_accuracy"], result.manifest.results["train_loss"])
    assert before <= 0.5 and before_options <= 0.5  # about chance (a random model rarely even answers a number)
    assert after >= 0.9
    assert after_reload >= 0.9
    assert result.manifest.results["val_accuracy"] >= 0.9
