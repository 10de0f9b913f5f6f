"""Dataset readers of the specialty role, on synthetic data written in each format."""

from __future__ import annotations

import csv
import importlib.util
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onevlm.specialty.datasets import (
    KNOWN_DATASETS,
    DatasetError,
    idc_split_of,
    read_dataset,
    read_deeplesion,
    read_idc_patches,
    read_medmnist,
    read_polypset,
    synthetic,
)
from onevlm.specialty.datasets.deeplesion import DEEPLESION_COLUMNS, LESION_TYPES
from onevlm.specialty.datasets.medmnist import MEDMNIST_CHANNELS, MEDMNIST_INFOS
from onevlm.specialty.samples import SPLITS

PER_SPLIT = (16, 4, 6)

SPECIALTIES = {
    "bloodmnist": "hematology", "pathmnist": "pathology", "tissuemnist": "pathology", "idc": "pathology",
    "octmnist": "ophthalmology", "retinamnist": "ophthalmology", "breastmnist": "radiology",
    "pneumoniamnist": "radiology", "chestmnist": "radiology", "organamnist": "radiology",
    "organcmnist": "radiology", "organsmnist": "radiology", "deeplesion": "radiology",
    "polypset": "gastroenterology",
}


def _assert_close_boxes(found, expected) -> None:
    assert len(found) == len(expected)
    for a, b in zip(found, expected, strict=True):
        assert a.label == b.label
        assert (a.x0, a.y0, a.x1, a.y1) == pytest.approx((b.x0, b.y0, b.x1, b.y1), abs=1e-9)


def _rewrite_npz(source: Path, target: Path, change) -> Path:
    with np.load(source) as npz:
        arrays = {key: npz[key] for key in npz.files}
    change(arrays)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        np.savez(handle, **arrays)
    return target


# ---------------------------------------------------------------- registry


def test_known_datasets_cover_every_reader_with_the_papers_specialties() -> None:
    assert set(KNOWN_DATASETS) == set(SPECIALTIES)
    for name, info in KNOWN_DATASETS.items():
        assert info.name == name
        assert info.specialty == SPECIALTIES[name], name
    assert KNOWN_DATASETS["retinamnist"].task_type == "grading"
    assert KNOWN_DATASETS["chestmnist"].task_type == "multilabel"
    assert KNOWN_DATASETS["polypset"].task_type == "detection"
    assert KNOWN_DATASETS["polypset"].class_names == ("adenomatous", "hyperplastic")
    assert KNOWN_DATASETS["deeplesion"].task_type == "region-classification"
    assert KNOWN_DATASETS["idc"].class_names == ("non-IDC tissue", "invasive ductal carcinoma")


def test_read_dataset_rejects_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        read_dataset("mnist", tmp_path, "train")


# ---------------------------------------------------------------- MedMNIST


@pytest.mark.parametrize("flag", sorted(MEDMNIST_INFOS))
def test_medmnist_round_trip(tmp_path: Path, flag: str) -> None:
    path = synthetic.write_medmnist_npz(tmp_path / f"{flag}.npz", flag, per_split=PER_SPLIT, seed=3)
    n_classes = len(MEDMNIST_INFOS[flag].class_names)
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for split, count in zip(SPLITS, PER_SPLIT, strict=True):
        info, samples = read_dataset("medmnist", path, split)
        assert info is KNOWN_DATASETS[flag]
        assert len(samples) == count
        assert all(s.dataset == flag and s.split == split for s in samples)
        assert all(0 <= label < n_classes for s in samples for label in s.labels)
        if info.task_type != "multilabel":
            assert all(len(s.labels) == 1 for s in samples)
            assert [s.labels[0] for s in samples] == arrays[f"{split}_labels"][:, 0].tolist()
            if count >= n_classes:
                assert {s.labels[0] for s in samples} == set(range(n_classes))
        image = samples[-1].load()
        assert image.mode == "RGB" and image.size == (28, 28)
        pixels = np.asarray(image)
        stored = arrays[f"{split}_images"][-1]
        if MEDMNIST_CHANNELS[flag] == 1:
            assert (pixels == stored[..., None]).all()
        else:
            assert (pixels == stored).all()


def test_chestmnist_is_multilabel(tmp_path: Path) -> None:
    path = synthetic.write_medmnist_npz(tmp_path / "chestmnist.npz", "chestmnist", per_split=(20, 4, 4))
    info, samples = read_medmnist(path, "train")
    assert info.task_type == "multilabel" and len(info.class_names) == 14
    assert samples[0].labels == ()  # no finding
    assert samples[1].labels == (0, 13)  # atelectasis and hernia
    with np.load(path) as npz:
        rows = npz["train_labels"]
    assert [s.labels for s in samples] == [tuple(np.flatnonzero(row).tolist()) for row in rows]


@pytest.mark.parametrize(("flag", "size", "compressed"), [("bloodmnist", 64, False), ("octmnist", 128, True),
                                                           ("retinamnist", 224, False)])
def test_medmnist_larger_sizes_and_storage(tmp_path: Path, flag: str, size: int, compressed: bool) -> None:
    path = synthetic.write_medmnist_npz(tmp_path / f"{flag}_{size}.npz", flag, size=size, per_split=(3, 2, 2),
                                        compressed=compressed)
    info, samples = read_medmnist(path, "test")
    assert info.name == flag and len(samples) == 2
    assert samples[1].load().size == (size, size)
    assert samples[1].source == f"{flag}_{size}.npz:test_images[1]"


def test_medmnist_name_can_be_given_and_samples_pickle(tmp_path: Path) -> None:
    path = synthetic.write_medmnist_npz(tmp_path / "my_copy.npz", "PneumoniaMNIST", per_split=(2, 2, 2))
    with pytest.raises(DatasetError, match="my_copy.npz"):
        read_medmnist(path, "train")
    info, samples = read_medmnist(path, "train", name="PneumoniaMNIST")
    assert info.name == "pneumoniamnist"
    first = np.asarray(samples[0].load())
    clone = pickle.loads(pickle.dumps(samples[0]))
    assert (np.asarray(clone.load()) == first).all()


def test_medmnist_bad_inputs_name_the_file(tmp_path: Path) -> None:
    good = synthetic.write_medmnist_npz(tmp_path / "bloodmnist.npz", "bloodmnist", per_split=(8, 8, 8))

    def drop_val_labels(arrays):
        del arrays["val_labels"]

    missing = _rewrite_npz(good, tmp_path / "a" / "bloodmnist.npz", drop_val_labels)
    with pytest.raises(DatasetError, match=r"a/bloodmnist\.npz.*val_labels"):
        read_medmnist(missing, "val")
    read_medmnist(missing, "train")  # the other splits are still readable

    wide = _rewrite_npz(good, tmp_path / "b" / "bloodmnist.npz",
                        lambda arrays: arrays.update(train_labels=np.zeros((8, 2), np.uint8)))
    with pytest.raises(DatasetError, match=r"b/bloodmnist\.npz \[train_labels\].*\(N, 1\).*\(8, 2\)"):
        read_medmnist(wide, "train")

    out_of_range = _rewrite_npz(good, tmp_path / "c" / "bloodmnist.npz",
                                lambda arrays: arrays["test_labels"].__setitem__((0, 0), 8))
    with pytest.raises(DatasetError, match=r"c/bloodmnist\.npz \[test_labels\].*0\.\.7"):
        read_medmnist(out_of_range, "test")

    grey = _rewrite_npz(good, tmp_path / "d" / "bloodmnist.npz",
                        lambda arrays: arrays.update(train_images=arrays["train_images"][..., 0]))
    with pytest.raises(DatasetError, match=r"d/bloodmnist\.npz \[train_images\].*colour"):
        read_medmnist(grey, "train")

    odd_size = _rewrite_npz(good, tmp_path / "e" / "bloodmnist.npz",
                            lambda arrays: arrays.update(train_images=arrays["train_images"][:, :20, :20]))
    with pytest.raises(DatasetError, match=r"e/bloodmnist\.npz.*square"):
        read_medmnist(odd_size, "train")

    renamed = tmp_path / "bloodmnist_64.npz"
    renamed.write_bytes(good.read_bytes())
    with pytest.raises(DatasetError, match=r"bloodmnist_64\.npz.*64 px.*28 px"):
        read_medmnist(renamed, "train")

    not_zip = tmp_path / "pathmnist.npz"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"pathmnist\.npz"):
        read_medmnist(not_zip, "train")
    with pytest.raises(DatasetError, match=r"nothere\.npz.*does not exist"):
        read_medmnist(tmp_path / "nothere.npz", "train")
    with pytest.raises(DatasetError, match="unknown MedMNIST set"):
        read_medmnist(good, "train", name="dermamnistx")
    with pytest.raises(DatasetError, match="split"):
        read_medmnist(good, "validation")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_medmnist_truncated_image_array_is_caught(tmp_path: Path, compression: int) -> None:
    path = synthetic.write_medmnist_npz(tmp_path / "bloodmnist.npz", "bloodmnist", per_split=(4, 2, 2))
    broken = tmp_path / "broken" / "bloodmnist.npz"
    broken.parent.mkdir()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w", compression) as target:
        for member in source.namelist():
            data = source.read(member)
            target.writestr(member, data[:200] if member == "train_images.npy" else data)
    with pytest.raises(DatasetError, match=r"broken/bloodmnist\.npz \[train_images\]: the array is truncated"):
        read_medmnist(broken, "train")
    _, samples = read_medmnist(broken, "val")  # the intact splits still read
    assert samples[0].load().size == (28, 28)


def test_shapes_set_is_medmnist_format_and_visually_learnable(tmp_path: Path) -> None:
    classes = synthetic.write_shapes_medmnist(tmp_path / "shapesmnist.npz", per_split=(40, 8, 40), seed=1)
    assert classes == synthetic.DEFAULT_SHAPE_CLASSES
    info = synthetic.shapes_info(classes)
    with pytest.raises(DatasetError, match="pass info="):
        read_medmnist(tmp_path / "shapesmnist.npz", "train")
    _, train = read_dataset("medmnist", tmp_path / "shapesmnist.npz", "train", info=info)
    assert len(train) == 40 and sorted(s.labels[0] for s in train) == sorted(list(range(4)) * 10)
    _, test = read_medmnist(tmp_path / "shapesmnist.npz", "test", info=info)
    # a nearest-colour rule on the brightest pixels classifies every test image: the class is obvious
    palette = np.array([synthetic.SHAPE_COLOURS[name.split()[0]] for name in classes], float)
    for sample in test:
        pixels = np.asarray(sample.load(), float).reshape(-1, 3)
        shape = pixels[pixels.max(axis=1) > 100].mean(axis=0)
        assert int(np.argmin(((palette - shape) ** 2).sum(axis=1))) == sample.labels[0]
    with pytest.raises(ValueError, match="purple"):
        synthetic.write_shapes_medmnist(tmp_path / "x.npz", classes=("purple circle", "red square"))


def test_medmnist_class_names_match_the_medmnist_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the medmnist package is not installed (optional: pip install medmnist)")
    info_file = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    monkeypatch.setenv("HOME", str(tmp_path))  # its info.py makes ~/.medmnist on import
    module_spec = importlib.util.spec_from_file_location("_medmnist_info_for_test", info_file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    task_types = {"multi-class": "classification", "binary-class": "classification",
                  "ordinal-regression": "grading", "multi-label, binary-class": "multilabel"}
    for flag, info in MEDMNIST_INFOS.items():
        official = module.INFO[flag]
        labels = official["label"]
        assert info.class_names == tuple(labels[str(i)] for i in range(len(labels))), flag
        assert info.task_type == task_types[official["task"]], flag
        assert MEDMNIST_CHANNELS[flag] == official["n_channels"], flag


# ---------------------------------------------------------------- PolypSet


def test_polypset_round_trip(tmp_path: Path) -> None:
    written = synthetic.write_polypset(tmp_path / "polyps", per_split=(5, 2, 3), size=(160, 128), seed=2)
    for split, count in zip(SPLITS, (5, 2, 3), strict=True):
        info, samples = read_dataset("polypset", tmp_path / "polyps", split)
        assert info.task_type == "detection"
        assert len(samples) == count
        assert [s.source for s in samples] == [source for source, _ in written[split]]
        for sample, (_, boxes) in zip(samples, written[split], strict=True):
            _assert_close_boxes(sample.boxes, boxes)
            assert sample.labels == tuple(sorted({b.label for b in boxes}))
        assert samples[0].boxes == () and samples[0].labels == ()  # no annotation file: no polyp
        assert {b.label for b in samples[1].boxes} == {0, 1}
        image = samples[1].load()
        assert image.mode == "RGB" and image.size == (160, 128)


def test_polypset_folder_names_are_case_insensitive_and_sizes_may_come_from_the_image(tmp_path: Path) -> None:
    root = tmp_path / "polyps"
    written = synthetic.write_polypset(root, per_split=(3, 1, 1))
    (root / "train").rename(root / "TRAIN")
    (root / "TRAIN" / "Images").rename(root / "TRAIN" / "images")
    (root / "TRAIN" / "Annotations").rename(root / "TRAIN" / "annotation")
    xml = root / "TRAIN" / "annotation" / "0001.xml"
    text = xml.read_text()
    xml.write_text(text[:text.index("<size>")] + text[text.index("</size>") + len("</size>"):])  # no <size>
    _, samples = read_polypset(root, "train")
    assert len(samples) == 3
    _assert_close_boxes(samples[1].boxes, written["train"][1][1])


def test_polypset_bad_inputs_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "polyps"
    synthetic.write_polypset(root, per_split=(3, 2, 2))
    xml = root / "train" / "Annotations" / "0002.xml"
    original = xml.read_text()
    start = original.index("<xmax>") + len("<xmax>")
    xml.write_text(original[:start] + "161" + original[original.index("</xmax>"):])
    with pytest.raises(DatasetError, match=r"0002\.xml: object 1 box .*outside the 160x128 image"):
        read_polypset(root, "train")
    xml.write_text(original.replace("<name>adenomatous</name>", "<name>serrated</name>")
                   .replace("<name>hyperplastic</name>", "<name>serrated</name>"))
    with pytest.raises(DatasetError, match=r"0002\.xml: object 1 has class 'serrated'"):
        read_polypset(root, "train")
    xml.write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"0002\.xml: not a readable Pascal VOC"):
        read_polypset(root, "train")
    (root / "val" / "Annotations").rename(root / "val" / "labels")
    with pytest.raises(DatasetError, match=r"val: no annotation folder"):
        read_polypset(root, "val")
    with pytest.raises(DatasetError, match=r"absent: PolypSet root folder does not exist"):
        read_polypset(tmp_path / "absent", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no test folder"):
        read_polypset(tmp_path / "empty", "test")


# ---------------------------------------------------------------- DeepLesion


def _windowed(hu: float, window: tuple[float, float]) -> int:
    low, high = window
    return int(np.rint((min(max(hu, low), high) - low) / (high - low) * 255))


def test_deeplesion_round_trip_with_windowing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "deeplesion"
    written = synthetic.write_deeplesion(root, per_split=(4, 2, 3), size=64, seed=5)
    for split, count in zip(SPLITS, (4, 2, 3), strict=True):
        info, samples = read_dataset("deeplesion", root, split)
        expected = [w for w in written if w.split == split and w.lesion_type != -1]
        assert len(samples) == len(expected) == count + (1 if split == "train" else 0)
        for sample, lesion in zip(samples, expected, strict=True):
            assert sample.source == f"DL_info.csv:row{lesion.line}"
            assert sample.labels == (lesion.lesion_type - 1,)
            assert info.class_names[sample.labels[0]] == LESION_TYPES[lesion.lesion_type - 1]
            x0, y0, x1, y1 = lesion.box
            (box,) = sample.boxes
            assert box.label == lesion.lesion_type - 1
            assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((x0 / 64, y0 / 64, x1 / 64, y1 / 64))
            image = sample.load()
            assert image.mode == "RGB" and image.size == (64, 64)
            pixels = np.asarray(image)
            assert (pixels[..., 0] == pixels[..., 2]).all()
            centre = pixels[int((y0 + y1) / 2), int((x0 + x1) / 2), 0]
            assert centre == _windowed(synthetic.LESION_HU, lesion.window)
            assert pixels[0, 0, 0] == _windowed(synthetic.AIR_HU, lesion.window)
            assert pixels[32, 4, 0] == _windowed(synthetic.BODY_HU, lesion.window)
    train = [w for w in written if w.split == "train"]
    assert train[0].file_name == train[1].file_name  # two lesions on one slice, two samples
    messages = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("onevlm"))
    assert "1 unknown type" in messages
    assert "000001" not in messages and "Patient" not in messages and "_01_01" not in messages


def test_deeplesion_bad_inputs(tmp_path: Path) -> None:
    root = tmp_path / "deeplesion"
    written = synthetic.write_deeplesion(root, per_split=(2, 1, 1))
    csv_path = root / "DL_info.csv"
    original = csv_path.read_text()

    parsed = list(csv.reader(original.splitlines()))
    columns = parsed[0]
    keep = [i for i, c in enumerate(columns) if c != "DICOM_windows"]
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows([[row[i] for i in keep] for row in parsed])
    with pytest.raises(DatasetError, match=r"DL_info\.csv: missing column\(s\) DICOM_windows"):
        read_deeplesion(root, "train")
    csv_path.write_text(original)

    val_folder, val_file = written[-2].file_name.rsplit("_", 1)
    assert written[-2].split == "val"
    (root / "Images_png" / val_folder / val_file).unlink()
    with pytest.raises(DatasetError, match=r"DL_info\.csv line \d+: the key-slice PNG") as raised:
        read_deeplesion(root, "val")
    assert val_folder not in str(raised.value)  # the path (it starts with the patient index) is not named
    _, none = read_deeplesion(root / "DL_info.csv", "val", missing="skip")
    assert none == []

    test_folder, test_file = written[-1].file_name.rsplit("_", 1)
    test_slice = root / "Images_png" / test_folder / test_file
    Image.new("L", (64, 64)).save(test_slice)  # 8-bit: not a DeepLesion slice
    _, samples = read_deeplesion(root, "test")
    with pytest.raises(DatasetError, match=r"must be 16-bit greyscale"):
        samples[0].load()

    csv_path.write_text(original.replace(",3\n", ",4\n"))
    with pytest.raises(DatasetError, match=r"DL_info\.csv line \d+: Train_Val_Test must be 1, 2 or 3"):
        read_deeplesion(root, "train")
    csv_path.write_text(original.replace('"-175, 275"', '"275, -175"').replace('"-1350, 150"', '"150, -1350"')
                        .replace('"-160, 240"', '"240, -160"'))
    with pytest.raises(DatasetError, match=r"DICOM_windows must be 'low, high'"):
        read_deeplesion(root, "train")
    with pytest.raises(DatasetError, match=r"nowhere: DeepLesion root folder does not exist"):
        read_deeplesion(tmp_path / "nowhere", "train")
    assert set(DEEPLESION_COLUMNS) == set(columns)


# ---------------------------------------------------------------- IDC patches


def test_idc_splits_are_patient_disjoint_and_complete(tmp_path: Path) -> None:
    root = tmp_path / "idc"
    written = synthetic.write_idc_patches(root, n_patients=20, per_class=(3, 2), size=50, seed=4)
    patients_by_split: dict[str, set[str]] = {}
    total = 0
    for split in SPLITS:
        info, samples = read_dataset("idc", root, split)
        assert info.specialty == "pathology"
        patients = {s.source.split("/")[0] for s in samples}
        patients_by_split[split] = patients
        assert all(idc_split_of(p) == split for p in patients)
        for sample in samples:
            assert sample.labels == (int(sample.source.split("/")[1]),)
            assert sample.source.endswith(f"class{sample.labels[0]}.png")
        for patient in patients:
            assert sum(s.source.startswith(patient + "/") for s in samples) == sum(written[patient])
        total += len(samples)
        if samples:
            image = samples[0].load()
            assert image.mode == "RGB" and image.size == (50, 50)
    assert total == sum(sum(counts) for counts in written.values())
    assert set().union(*patients_by_split.values()) == set(written)
    assert not (patients_by_split["train"] & patients_by_split["val"])
    assert not (patients_by_split["train"] & patients_by_split["test"])
    assert not (patients_by_split["val"] & patients_by_split["test"])


def test_idc_split_rule_is_deterministic_and_near_70_10_20() -> None:
    splits = [idc_split_of(str(n)) for n in range(8000, 12000)]
    assert splits == [idc_split_of(str(n)) for n in range(8000, 12000)]
    shares = [splits.count(s) / len(splits) for s in SPLITS]
    assert shares == pytest.approx([0.7, 0.1, 0.2], abs=0.03)
    assert {idc_split_of(str(n), fractions=(1.0, 0.0, 0.0)) for n in range(100)} == {"train"}
    with pytest.raises(ValueError, match="summing to 1"):
        idc_split_of("1", fractions=(0.5, 0.1, 0.1))


def test_idc_nested_archive_folder_and_bad_roots(tmp_path: Path) -> None:
    written = synthetic.write_idc_patches(tmp_path / "download" / "IDC_regular_ps50_idx5", n_patients=6)
    total = sum(len(read_idc_patches(tmp_path / "download", split)[1]) for split in SPLITS)
    assert total == sum(sum(c) for c in written.values())
    with pytest.raises(DatasetError, match=r"missing: IDC patch root folder does not exist"):
        read_idc_patches(tmp_path / "missing", "train")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"flat: no patient folder"):
        read_idc_patches(tmp_path / "flat", "train")


def test_medmnist_writer_fixed_labels(tmp_path: Path) -> None:
    write_medmnist_npz = synthetic.write_medmnist_npz
    blood = write_medmnist_npz(tmp_path / "bloodmnist.npz", "bloodmnist", per_split=(6, 2, 2), fixed_labels=(3,))
    _, samples = read_medmnist(blood, "train")
    assert [s.labels for s in samples] == [(3,)] * 6
    chest = write_medmnist_npz(tmp_path / "chestmnist.npz", "chestmnist", per_split=(4, 1, 1), fixed_labels=(0, 5))
    _, samples = read_medmnist(chest, "val")
    assert [tuple(sorted(s.labels)) for s in samples] == [(0, 5)]
    for bad in ((8,), (0, 1), ()):
        with pytest.raises(ValueError, match="fixed_labels"):
            write_medmnist_npz(tmp_path / "x.npz", "bloodmnist", fixed_labels=bad)
