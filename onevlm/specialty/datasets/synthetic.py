"""Small synthetic datasets in exactly the formats the readers accept, for tests and demos.

Nothing here is real data: pixels are noise or drawn shapes, and DeepLesion patient fields are
made up. :func:`write_shapes_medmnist` writes a *learnable* MedMNIST-format set (a filled shape
whose colour and form give the class) for proving that fine-tuning learns. Research use only.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from onevlm.specialty.datasets._common import check_per_split
from onevlm.specialty.datasets.deeplesion import DEEPLESION_COLUMNS, HU_OFFSET
from onevlm.specialty.datasets.medmnist import MEDMNIST_CHANNELS, MEDMNIST_INFOS, MEDMNIST_SIZES
from onevlm.specialty.datasets.polypset import POLYPSET_INFO
from onevlm.specialty.samples import SPLITS, DatasetInfo, NormalisedBox

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (235, 235, 235), "magenta": (220, 50, 220), "cyan": (40, 220, 220), "orange": (245, 140, 20),
}
SHAPE_FORMS = ("circle", "square", "triangle", "cross", "diamond")
DEFAULT_SHAPE_CLASSES = ("red circle", "green square", "blue triangle", "yellow cross")

# HU values of the synthetic DeepLesion slices: outside the body, body, lesion.
AIR_HU = -1000
BODY_HU = 40
LESION_HU = 150
_WINDOWS = ((-175.0, 275.0), (-1350.0, 150.0), (-160.0, 240.0))


def _split_counts(per_split: tuple[int, int, int]) -> dict[str, int]:
    return dict(zip(SPLITS, check_per_split(per_split), strict=True))


def _save_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:  # a handle keeps numpy from appending .npz to other suffixes
        save: Callable[..., None] = np.savez_compressed if compressed else np.savez
        save(handle, **arrays)
    return path


def _single_labels(rng: np.random.Generator, count: int, n_classes: int) -> np.ndarray:
    """Class indices with every class present when ``count >= n_classes``, shuffled."""
    labels = np.arange(count) % n_classes if count >= n_classes else rng.integers(0, n_classes, count)
    return rng.permutation(labels).astype(np.uint8).reshape(count, 1)


def write_medmnist_npz(path: str | Path, name: str, size: int = 28, per_split: tuple[int, int, int] = (16, 4, 4),
                       seed: int = 0, *, compressed: bool = True, fixed_labels: tuple[int, ...] | None = None) -> Path:
    """Write a random but valid MedMNIST ``.npz`` for one of the supported sets.

    Parameters
    ----------
    path : str or Path
        The file to write (name it ``<flag>.npz`` or ``<flag>_<size>.npz`` for name inference).
    name : str
        The MedMNIST flag, e.g. ``"bloodmnist"`` or ``"chestmnist"`` (any case).
    size : int
        Image side: 28, 64, 128 or 224.
    per_split : tuple of three ints
        Images in train, val and test.
    seed : int
        Random seed.
    compressed : bool
        ``np.savez_compressed`` (as MedMNIST ships) or plain ``np.savez``.
    fixed_labels : tuple of int, optional
        Give every image these labels instead of random ones: one class index for a single-label
        set, the findings present for ChestMNIST (``()``: no finding). A set whose answer never
        changes is what a few training steps can learn (tests, demos).

    Returns
    -------
    Path
        The written file. With random labels, single-label splits with at least as many images
        as classes hold every class; ChestMNIST splits of two or more images start with a
        no-finding row and a row with two findings.
    """
    flag = name.lower()
    if flag not in MEDMNIST_INFOS:
        raise ValueError(f"unknown MedMNIST set {name!r} (known: {', '.join(MEDMNIST_INFOS)})")
    if size not in MEDMNIST_SIZES:
        raise ValueError(f"size must be one of {MEDMNIST_SIZES}, got {size}")
    info = MEDMNIST_INFOS[flag]
    channels = MEDMNIST_CHANNELS[flag]
    n_classes = len(info.class_names)
    if fixed_labels is not None:
        fixed_labels = tuple(fixed_labels)
        if any(not 0 <= label < n_classes for label in fixed_labels) or (
                info.task_type != "multilabel" and len(fixed_labels) != 1):
            raise ValueError(f"fixed_labels {fixed_labels!r} do not fit {flag} ({n_classes} classes, "
                             f"{info.task_type})")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in _split_counts(per_split).items():
        shape = (count, size, size) if channels == 1 else (count, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if fixed_labels is not None:
            labels = np.zeros((count, n_classes if info.task_type == "multilabel" else 1), dtype=np.uint8)
            if info.task_type == "multilabel":
                labels[:, list(fixed_labels)] = 1
            else:
                labels[:] = fixed_labels[0]
        elif info.task_type == "multilabel":
            labels = (rng.random((count, n_classes)) < 0.15).astype(np.uint8)
            if count >= 2:
                labels[0] = 0
                labels[1] = 0
                labels[1, [0, n_classes - 1]] = 1
        else:
            labels = _single_labels(rng, count, n_classes)
        arrays[f"{split}_labels"] = labels
    return _save_npz(Path(path), arrays, compressed)


def _parse_shape_class(name: str) -> tuple[tuple[int, int, int], str]:
    parts = name.lower().split()
    if len(parts) != 2 or parts[0] not in SHAPE_COLOURS or parts[1] not in SHAPE_FORMS:
        raise ValueError(f"shape class {name!r} must be '<colour> <form>' with colour one of "
                         f"{', '.join(SHAPE_COLOURS)} and form one of {', '.join(SHAPE_FORMS)}")
    return SHAPE_COLOURS[parts[0]], parts[1]


def _draw_shape(draw: ImageDraw.ImageDraw, form: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int]) -> None:
    if form == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif form == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif form == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif form == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # cross
        arm = r / 2.5
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=colour)


def shapes_info(classes: tuple[str, ...] = DEFAULT_SHAPE_CLASSES, name: str = "shapesmnist",
                specialty: str = "synthetic") -> DatasetInfo:
    """The :class:`DatasetInfo` of a set written by :func:`write_shapes_medmnist`.

    Parameters
    ----------
    classes : tuple of str
        The class names the set was written with.
    name : str
        The dataset name.
    specialty : str
        The specialty to file it under.

    Returns
    -------
    DatasetInfo
        A classification set; pass it as ``info=`` to :func:`~onevlm.specialty.datasets.read_medmnist`.
    """
    for class_name in classes:
        _parse_shape_class(class_name)
    return DatasetInfo(name=name, task_type="classification", class_names=tuple(classes), specialty=specialty,
                       description="Synthetic shapes: one filled shape on a dark background; colour and form "
                                   "give the class.")


def write_shapes_medmnist(path: str | Path, classes: tuple[str, ...] = DEFAULT_SHAPE_CLASSES, size: int = 28,
                          per_split: tuple[int, int, int] = (200, 40, 40), seed: int = 0, *,
                          compressed: bool = True) -> tuple[str, ...]:
    """Write a learnable MedMNIST-format colour set: the class is visually obvious.

    Each image is a dark noisy background with one filled shape whose colour and form are the
    class's (``"red circle"``: a red disc), with jittered position, size and colour. Classes are
    balanced within each split.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file to write.
    classes : tuple of str
        Class names ``"<colour> <form>"``; colours from :data:`SHAPE_COLOURS`, forms from
        :data:`SHAPE_FORMS`; at least two, unique.
    size : int
        Image side: 28, 64, 128 or 224.
    per_split : tuple of three ints
        Images in train, val and test.
    seed : int
        Random seed.
    compressed : bool
        ``np.savez_compressed`` or plain ``np.savez``.

    Returns
    -------
    tuple of str
        The class names in label order (``shapes_info(names)`` gives the dataset info).
    """
    classes = tuple(classes)
    if len(classes) < 2 or len(set(c.lower() for c in classes)) != len(classes):
        raise ValueError(f"shape classes must be at least two unique names, got {classes!r}")
    specs = [_parse_shape_class(c) for c in classes]
    if len(set(specs)) != len(specs):
        raise ValueError(f"shape classes must draw differently, got {classes!r}")
    if size not in MEDMNIST_SIZES:
        raise ValueError(f"size must be one of {MEDMNIST_SIZES}, got {size}")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in _split_counts(per_split).items():
        labels = rng.permutation(np.arange(count) % len(classes)).astype(np.uint8)
        images = np.empty((count, size, size, 3), dtype=np.uint8)
        for index, label in enumerate(labels):
            background = rng.integers(0, 35, (size, size, 1), dtype=np.uint8).repeat(3, axis=2)
            image = Image.fromarray(background)
            colour, form = specs[label]
            red, green, blue = (int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
            r = size * rng.uniform(0.18, 0.3)
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            _draw_shape(ImageDraw.Draw(image), form, float(cx), float(cy), float(r), (red, green, blue))
            images[index] = np.asarray(image)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(count, 1)
    _save_npz(Path(path), arrays, compressed)
    return classes


def _voc_xml(file_name: str, width: int, height: int,
             objects: list[tuple[str, tuple[int, int, int, int]]]) -> ET.ElementTree:
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "filename").text = file_name
    size = ET.SubElement(annotation, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    for name, (xmin, ymin, xmax, ymax) in objects:
        obj = ET.SubElement(annotation, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, tag).text = str(value)
    return ET.ElementTree(annotation)


def write_polypset(root: str | Path, per_split: tuple[int, int, int] = (4, 2, 2), size: tuple[int, int] = (160, 128),
                   seed: int = 0) -> dict[str, list[tuple[str, tuple[NormalisedBox, ...]]]]:
    """Write a PolypSet-style folder: ``ROOT/<split>/Images/*.jpg`` and ``ROOT/<split>/Annotations/*.xml``.

    In each split, frame 0 has no annotation file (no polyp), frame 1 two polyps (one per
    class), the others one polyp of a random class. Polyps are pink ellipses filling their boxes.

    Parameters
    ----------
    root : str or Path
        The folder to write into (created).
    per_split : tuple of three ints
        Frames in train, val and test.
    size : tuple of two ints
        Frame width and height in pixels (at least 32 each).
    seed : int
        Random seed.

    Returns
    -------
    dict
        Per split, ``(source, boxes)`` for each frame in file order: ``source`` the frame's path
        relative to ``root`` (as the reader reports it), ``boxes`` the written boxes normalised.
    """
    width, height = size
    if width < 32 or height < 32:
        raise ValueError(f"frame size must be at least 32x32, got {size}")
    rng = np.random.default_rng(seed)
    base = Path(root)
    written: dict[str, list[tuple[str, tuple[NormalisedBox, ...]]]] = {}
    for split, count in _split_counts(per_split).items():
        images_dir, annotations_dir = base / split / "Images", base / split / "Annotations"
        images_dir.mkdir(parents=True, exist_ok=True)
        annotations_dir.mkdir(parents=True, exist_ok=True)
        written[split] = []
        for index in range(count):
            labels = [] if index == 0 else [0, 1] if index == 1 else [int(rng.integers(0, 2))]
            objects = []
            for label in labels:
                box_w = int(rng.integers(width // 8, width // 3))
                box_h = int(rng.integers(height // 8, height // 3))
                xmin = int(rng.integers(1, width - box_w))
                ymin = int(rng.integers(1, height - box_h))
                objects.append((label, (xmin, ymin, xmin + box_w, ymin + box_h)))
            background = np.empty((height, width, 3), dtype=np.uint8)
            background[...] = (150, 60, 50)
            background = np.clip(background + rng.integers(-25, 26, background.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(background)
            draw = ImageDraw.Draw(image)
            for _, box in objects:
                draw.ellipse(box, fill=(230, 150, 150))
            file_name = f"{index:04d}.jpg"
            image.save(images_dir / file_name, quality=90)
            if objects:
                tree = _voc_xml(file_name, width, height,
                                [(POLYPSET_INFO.class_names[label], box) for label, box in objects])
                tree.write(annotations_dir / f"{index:04d}.xml", encoding="utf-8", xml_declaration=True)
            boxes = tuple(NormalisedBox(x0 / width, y0 / height, x1 / width, y1 / height, label)
                          for label, (x0, y0, x1, y1) in objects)
            written[split].append((f"{split}/Images/{file_name}", boxes))
    return written


@dataclass(frozen=True)
class WrittenLesion:
    """One row :func:`write_deeplesion` wrote (what a test compares the reader's output with)."""

    split: str
    line: int
    file_name: str
    box: tuple[float, float, float, float]
    lesion_type: int
    window: tuple[float, float]
    size: int


def write_deeplesion(root: str | Path, per_split: tuple[int, int, int] = (4, 2, 2), size: int = 64,
                     seed: int = 0) -> list[WrittenLesion]:
    """Write a DeepLesion-style folder: ``DL_info.csv`` (all columns) and 16-bit key slices.

    Slices (``size`` x ``size``, stored as ``HU + 32768``) show air (:data:`AIR_HU`) around a
    body disc (:data:`BODY_HU`) with lesion boxes filled with :data:`LESION_HU`. Each split has
    ``per_split`` lesions on their own slices; the first train slice, when there is one, carries a
    second lesion (two rows, one file), and one extra train row has lesion type -1 (the reader
    skips it). Patient fields are fake.

    Parameters
    ----------
    root : str or Path
        The folder to write into (created).
    per_split : tuple of three ints
        Labelled lesions in train, val and test (the extra second lesion and the -1 row come on top).
    size : int
        Slice side in pixels (at least 32; the real set's is 512).
    seed : int
        Random seed.

    Returns
    -------
    list of WrittenLesion
        Every row written, in CSV order (``line`` is the CSV line, the header being line 1).
    """
    if size < 32:
        raise ValueError(f"slice size must be at least 32, got {size}")
    rng = np.random.default_rng(seed)
    base = Path(root)
    images_dir = base / "Images_png"
    rows: list[dict[str, str]] = []
    written: list[WrittenLesion] = []
    patient = 0
    for split_code, (split, count) in enumerate(_split_counts(per_split).items(), start=1):
        for index in range(count):
            patient += 1
            slice_number = int(rng.integers(10, 120))
            folder = f"{patient:06d}_01_01"
            file_name = f"{folder}_{slice_number:03d}.png"
            types = [int(rng.integers(1, 9))]
            if split == "train" and index == 0:
                types += [int(rng.integers(1, 9)), -1]
            yy, xx = np.mgrid[0:size, 0:size]
            hu = np.full((size, size), AIR_HU, dtype=np.int32)
            hu[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2] = BODY_HU
            for lesion_type in types:
                side = float(rng.uniform(size / 10, size / 5))
                x0, y0 = (float(v) for v in rng.uniform(size * 0.2, size * 0.8 - side, 2))
                box = (round(x0, 3), round(y0, 3), round(x0 + side, 3), round(y0 + side, 3))
                hu[int(np.ceil(box[1])):int(box[3]), int(np.ceil(box[0])):int(box[2])] = LESION_HU
                window = _WINDOWS[int(rng.integers(0, len(_WINDOWS)))]
                rows.append(_lesion_row(file_name, patient, slice_number, box, lesion_type, window, size,
                                        split_code, rng))
                written.append(WrittenLesion(split, len(rows) + 1, file_name, box, lesion_type, window, size))
            (images_dir / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray((hu + HU_OFFSET).astype(np.uint16)).save(images_dir / folder / f"{slice_number:03d}.png")
    base.mkdir(parents=True, exist_ok=True)
    with (base / "DL_info.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=DEEPLESION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return written


def _lesion_row(file_name: str, patient: int, slice_number: int, box: tuple[float, float, float, float],
                lesion_type: int, window: tuple[float, float], size: int, split_code: int,
                rng: np.random.Generator) -> dict[str, str]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    long_axis = (x0 + 5, cy, x1 - 5, cy)
    short_axis = (cx, y0 + 5, cx, y1 - 5)

    def numbers(values: tuple[float, ...]) -> str:
        return ", ".join(f"{v:g}" for v in values)

    return {
        "File_name": file_name, "Patient_index": str(patient), "Study_index": "1", "Series_ID": "1",
        "Key_slice_index": str(slice_number),
        "Measurement_coordinates": numbers(long_axis + short_axis),
        "Bounding_boxes": numbers(box),
        "Lesion_diameters_Pixel_": numbers((x1 - x0 - 10, y1 - y0 - 10)),
        "Normalized_lesion_location": numbers(tuple(round(float(v), 4) for v in rng.uniform(0, 1, 3))),
        "Coarse_lesion_type": str(lesion_type), "Possibly_noisy": "0",
        "Slice_range": numbers((slice_number - 2, slice_number + 2)),
        "Spacing_mm_px_": "0.703125, 0.703125, 5", "Image_size": f"{size}, {size}",
        "DICOM_windows": numbers(window), "Patient_gender": str(rng.choice(["M", "F"])),
        "Patient_age": str(int(rng.integers(20, 90))), "Train_Val_Test": str(split_code),
    }


def write_idc_patches(root: str | Path, n_patients: int = 12, per_class: tuple[int, int] = (3, 2), size: int = 50,
                      seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write an IDC-style patch folder: ``ROOT/<patient_id>/{0,1}/*.png``.

    Patches are noisy pink (class 0) or purple (class 1) squares named like the real set's
    (``<patient>_idx5_x<x>_y<y>_class<c>.png``).

    Parameters
    ----------
    root : str or Path
        The folder to write into (created).
    n_patients : int
        Patient folders, with made-up numeric ids.
    per_class : tuple of two ints
        Patches of class 0 and class 1 per patient.
    size : int
        Patch side in pixels.
    seed : int
        Random seed.

    Returns
    -------
    dict of str to (int, int)
        Per patient id, the patches written of class 0 and class 1.
    """
    if n_patients < 1 or size < 1 or len(per_class) != 2 or min(per_class) < 0:
        raise ValueError("n_patients and size must be positive and per_class two non-negative counts")
    rng = np.random.default_rng(seed)
    ids = sorted(str(v) for v in rng.choice(np.arange(8000, 17000), n_patients, replace=False))
    tints = ((235, 170, 200), (150, 80, 170))
    for patient in ids:
        for label, count in enumerate(per_class):
            folder = Path(root) / patient / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(np.array(tints[label]) + rng.integers(-30, 31, (size, size, 3)), 0, 255)
                x, y = 50 * (index + 1), 50 * (label + 1)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    folder / f"{patient}_idx5_x{x}_y{y}_class{label}.png")
    return {patient: (per_class[0], per_class[1]) for patient in ids}


def write_specialty_data(config, out_dir: str | Path, per_split: tuple[int, int, int] = (16, 4, 4),
                         seed: int = 0) -> list[Path]:
    """Write a synthetic copy of every dataset a specialty mixture reads, where ``--data`` looks for it.

    MedMNIST sets become ``<flag>.npz``; PolypSet, DeepLesion and the IDC patches become the
    folders ``PolypSet/``, ``DeepLesion/`` and ``IDC/`` (the conventional names the data
    sources search for). A dataset already written (a derived entry reads the same source) is
    written once.

    Parameters
    ----------
    config : onevlm.specialty.tasks.SpecialtyConfig
        The mixture.
    out_dir : str or Path
        The data folder (created).
    per_split : tuple of three ints
        MedMNIST images, PolypSet frames or DeepLesion slices in train, val and test (IDC: patients
        are split by the reader; ``per_split[0]`` patients are written).
    seed : int
        Random seed.

    Returns
    -------
    list of Path
        The files and folders written.

    Raises
    ------
    ValueError
        For a MedMNIST entry that is not one of the supported flags (a custom set: write it with
        :func:`write_shapes_medmnist` or your own data).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_per_split(per_split)
    written: list[Path] = []
    done: set[tuple[str, str]] = set()
    for entry in config.datasets:
        key = (entry.reader, entry.source.lower())
        if key in done:
            continue
        done.add(key)
        if entry.reader == "medmnist":
            if entry.source.lower() not in MEDMNIST_INFOS:
                raise ValueError(f"{entry.source}: not a MedMNIST set this generator knows "
                                 f"({', '.join(sorted(MEDMNIST_INFOS))})")
            written.append(write_medmnist_npz(out / f"{entry.source.lower()}.npz", entry.source, per_split=per_split,
                                              seed=seed))
        elif entry.reader == "polypset":
            write_polypset(out / "PolypSet", per_split=per_split, seed=seed)
            written.append(out / "PolypSet")
        elif entry.reader == "deeplesion":
            write_deeplesion(out / "DeepLesion", per_split=per_split, seed=seed)
            written.append(out / "DeepLesion")
        else:  # idc
            write_idc_patches(out / "IDC", n_patients=max(3, per_split[0]), seed=seed)
            written.append(out / "IDC")
    return written
