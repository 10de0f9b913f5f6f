"""MedMNIST v2 ``.npz`` files (Yang et al., Scientific Data 2023): the 2D sets the specialty role uses.

A MedMNIST file holds six arrays: ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels``. Images are uint8, ``(N, H, W)`` for grey sets and
``(N, H, W, 3)`` for colour ones, with ``H == W`` one of 28, 64, 128 or 224 (the MedMNIST+ sizes,
files named ``<flag>.npz`` or ``<flag>_<size>.npz``). Labels are integers ``(N, 1)`` (one class
index) or, for ChestMNIST, ``(N, 14)`` zeros and ones (multi-label).

The image arrays are not read when the split is listed: only their ``.npy`` headers are checked.
The first image loaded of a split maps the member into memory (a file written with ``np.savez``)
or decompresses it once (``np.savez_compressed``), shared by that split's images.

Class names are MedMNIST's own (``medmnist.INFO[flag]['label']``, in index order). Research use only.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from onevlm.specialty.datasets._common import DatasetError, array_to_rgb, check_split, existing_file
from onevlm.specialty.samples import DatasetInfo, LabelledImage

logger = logging.getLogger(__name__)

MEDMNIST_SIZES = (28, 64, 128, 224)

_ORGAN_CLASSES = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                  "lung-left", "lung-right", "pancreas", "spleen")


@dataclass(frozen=True)
class _Spec:
    display: str
    task_type: str
    classes: tuple[str, ...]
    specialty: str
    channels: int
    description: str


_SPECS: dict[str, _Spec] = {
    "bloodmnist": _Spec(
        "BloodMNIST", "classification",
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
         "neutrophil", "platelet"),
        "hematology", 3, "BloodMNIST: peripheral blood smear cell microscopy, 8 cell types."),
    "pathmnist": _Spec(
        "PathMNIST", "classification",
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        "pathology", 3, "PathMNIST: colorectal cancer H&E histology patches (NCT-CRC-HE), 9 tissue types."),
    "octmnist": _Spec(
        "OCTMNIST", "classification",
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        "ophthalmology", 1, "OCTMNIST: retinal optical coherence tomography, 4 diagnoses."),
    "retinamnist": _Spec(
        "RetinaMNIST", "grading", ("0", "1", "2", "3", "4"),
        "ophthalmology", 3,
        "RetinaMNIST: colour fundus photographs graded for diabetic retinopathy severity on the ordinal "
        "scale 0 (no DR) to 4 (proliferative DR); class names are the grades."),
    "tissuemnist": _Spec(
        "TissueMNIST", "classification",
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
         "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
         "Thick Ascending Limb"),
        "pathology", 1, "TissueMNIST: kidney cortex cells, fluorescence microscopy, 8 cell types."),
    "breastmnist": _Spec(
        "BreastMNIST", "classification", ("malignant", "normal, benign"),
        "radiology", 1, "BreastMNIST: breast ultrasound, malignant vs normal or benign."),
    "pneumoniamnist": _Spec(
        "PneumoniaMNIST", "classification", ("normal", "pneumonia"),
        "radiology", 1, "PneumoniaMNIST: paediatric chest X-ray, normal vs pneumonia."),
    "chestmnist": _Spec(
        "ChestMNIST", "multilabel",
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
         "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
        "radiology", 1, "ChestMNIST: frontal chest X-ray (NIH ChestX-ray14), 14 findings, multi-label."),
    "organamnist": _Spec(
        "OrganAMNIST", "classification", _ORGAN_CLASSES,
        "radiology", 1, "OrganAMNIST: abdominal CT, axial view, 11 organs."),
    "organcmnist": _Spec(
        "OrganCMNIST", "classification", _ORGAN_CLASSES,
        "radiology", 1, "OrganCMNIST: abdominal CT, coronal view, 11 organs."),
    "organsmnist": _Spec(
        "OrganSMNIST", "classification", _ORGAN_CLASSES,
        "radiology", 1, "OrganSMNIST: abdominal CT, sagittal view, 11 organs."),
}

MEDMNIST_INFOS: Mapping[str, DatasetInfo] = MappingProxyType({
    flag: DatasetInfo(name=flag, task_type=spec.task_type, class_names=spec.classes, specialty=spec.specialty,
                      description=spec.description)
    for flag, spec in _SPECS.items()
})
"""The supported MedMNIST sets by flag (``bloodmnist`` …): ``DatasetInfo.name`` is the flag."""

MEDMNIST_CHANNELS: Mapping[str, int] = MappingProxyType({flag: spec.channels for flag, spec in _SPECS.items()})
"""Channels of each set's images: 1 (``(N, H, W)`` arrays) or 3 (``(N, H, W, 3)``)."""

MEDMNIST_DISPLAY_NAMES: Mapping[str, str] = MappingProxyType({flag: spec.display for flag, spec in _SPECS.items()})
"""The names the MedMNIST paper uses (``BloodMNIST`` …) by flag."""

_FILE_NAME = re.compile(r"^(?P<flag>[a-z0-9]+mnist)(?:_(?P<size>\d+))?$")


def medmnist_flag_from_filename(path: str | Path) -> tuple[str, int | None]:
    """The MedMNIST flag and size a file name states (``bloodmnist_64.npz`` -> ``("bloodmnist", 64)``).

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.

    Returns
    -------
    tuple of (str, int or None)
        The flag in lower case and the size from a ``_<size>`` suffix, or None without one.

    Raises
    ------
    DatasetError
        If the name is not ``<flag>.npz`` or ``<flag>_<size>.npz``.
    """
    file = Path(path)
    match = _FILE_NAME.match(file.stem.lower()) if file.suffix.lower() == ".npz" else None
    if match is None:
        raise DatasetError(f"{file}: cannot infer the MedMNIST set from the file name (expected e.g. "
                           "bloodmnist.npz or bloodmnist_64.npz); pass name=")
    return match["flag"], int(match["size"]) if match["size"] else None


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int | None  # byte offset of the array data in the .npz when stored uncompressed


def _read_npy_header(stream: Any, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as error:
        raise DatasetError(f"{where}: not a valid .npy array ({error})") from error
    return tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order)


def _member_header(path: Path, archive: zipfile.ZipFile, key: str) -> _Header:
    """The shape and dtype of one array of an ``.npz`` without reading its data.

    The member's size in the zip directory must be the ``.npy`` header plus the array's bytes, so a
    truncated or padded member is caught here rather than read as garbage.
    """
    member = archive.getinfo(f"{key}.npy")
    where = f"{path} [{key}]"
    if member.compress_type == zipfile.ZIP_STORED:
        with path.open("rb") as raw:
            raw.seek(member.header_offset)
            local = raw.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise DatasetError(f"{where}: corrupt zip member header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = member.header_offset + 30 + name_length + extra_length
            raw.seek(start)
            shape, dtype, fortran_order = _read_npy_header(raw, where)
            header_length = raw.tell() - start
            data_offset: int | None = raw.tell()
    else:
        with archive.open(member) as stream:
            shape, dtype, fortran_order = _read_npy_header(stream, where)
            header_length = stream.tell()
        data_offset = None
    if dtype.hasobject:
        raise DatasetError(f"{where}: object arrays are not allowed")
    expected = header_length + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if member.file_size != expected:
        raise DatasetError(f"{where}: the array is truncated or corrupt ({member.file_size} bytes, "
                           f"expected {expected} for shape {shape})")
    return _Header(shape, dtype, fortran_order, data_offset)


class _SplitImages:
    """One split's image array, opened on first use and shared by the split's loaders (picklable)."""

    def __init__(self, path: Path, key: str, header: _Header) -> None:
        self.path = path
        self.key = key
        self.header = header
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "header": self.header}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._array = None
        self._lock = threading.Lock()

    def array(self) -> np.ndarray:
        with self._lock:
            if self._array is None:
                self._array = self._open()
            return self._array

    def _open(self) -> np.ndarray:
        header = self.header
        try:
            if header.data_offset is not None:
                array = np.memmap(self.path, dtype=header.dtype, mode="r", offset=header.data_offset,
                                  shape=header.shape, order="F" if header.fortran_order else "C")
            else:
                with np.load(self.path, allow_pickle=False) as npz:
                    array = npz[self.key]
        except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
            raise DatasetError(f"{self.path} [{self.key}]: cannot read the images ({error})") from error
        if array.shape != header.shape:
            raise DatasetError(f"{self.path} [{self.key}]: image array changed since it was listed")
        return array


@dataclass(frozen=True)
class _NpzImage:
    """Lazy loader of image ``index`` of a split (picklable)."""

    images: _SplitImages
    index: int

    def __call__(self) -> Image.Image:
        return array_to_rgb(self.images.array()[self.index])


def _resolve_info(path: Path, name: str | None, info: DatasetInfo | None) -> tuple[DatasetInfo, int | None]:
    """The dataset's info and the channel count its images must have (None: either)."""
    if info is not None:
        if name is not None and name.lower() != info.name.lower():
            raise DatasetError(f"{path}: name={name!r} disagrees with info.name={info.name!r}")
        if info.task_type not in ("classification", "grading", "multilabel"):
            raise DatasetError(f"{path}: a MedMNIST-format file cannot hold a {info.task_type!r} dataset")
        return info, MEDMNIST_CHANNELS.get(info.name.lower())
    flag = name.lower() if name is not None else medmnist_flag_from_filename(path)[0]
    if flag not in MEDMNIST_INFOS:
        raise DatasetError(f"{path}: unknown MedMNIST set {flag!r} (known: {', '.join(MEDMNIST_INFOS)}); "
                           "pass info= for a custom set in MedMNIST format")
    return MEDMNIST_INFOS[flag], MEDMNIST_CHANNELS[flag]


def _check_images(path: Path, key: str, header: _Header, channels: int | None, stated_size: int | None) -> int:
    shape = header.shape
    if header.dtype != np.uint8:
        raise DatasetError(f"{path} [{key}]: images must be uint8, found {header.dtype}")
    if len(shape) == 3:
        found_channels = 1
    elif len(shape) == 4 and shape[3] == 3:
        found_channels = 3
    else:
        raise DatasetError(f"{path} [{key}]: images must be (N, H, W) grey or (N, H, W, 3) colour, "
                           f"found shape {shape}")
    if shape[1] != shape[2] or shape[1] not in MEDMNIST_SIZES:
        raise DatasetError(f"{path} [{key}]: images must be square, one of {MEDMNIST_SIZES} pixels, "
                           f"found {shape[1]}x{shape[2]}")
    if stated_size is not None and shape[1] != stated_size:
        raise DatasetError(f"{path} [{key}]: the file name says {stated_size} px but the images are {shape[1]} px")
    if channels is not None and found_channels != channels:
        kind = "grey (N, H, W)" if channels == 1 else "colour (N, H, W, 3)"
        raise DatasetError(f"{path} [{key}]: this set's images are {kind}, found shape {shape}")
    return shape[0]


def _check_labels(path: Path, key: str, labels: np.ndarray, count: int, info: DatasetInfo) -> np.ndarray:
    n_classes = len(info.class_names)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DatasetError(f"{path} [{key}]: labels must be integers")
    elif labels.dtype.kind not in "iub":
        raise DatasetError(f"{path} [{key}]: labels must be integers, found {labels.dtype}")
    labels = labels.astype(np.int64)
    multilabel = info.task_type == "multilabel"
    expected = (count, n_classes) if multilabel else (count, 1)
    if labels.shape != expected:
        what = f"(N, {n_classes}) zeros and ones" if multilabel else "(N, 1) class indices"
        raise DatasetError(f"{path} [{key}]: labels must be {what} with N={count} (the image count), "
                           f"found shape {labels.shape}")
    if multilabel:
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise DatasetError(f"{path} [{key}]: multi-label labels must be 0 or 1")
    elif labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{path} [{key}]: labels must be class indices 0..{n_classes - 1}, "
                           f"found {labels.min()}..{labels.max()}")
    return labels


def read_medmnist(path: str | Path, split: str, name: str | None = None, *,
                  info: DatasetInfo | None = None) -> tuple[DatasetInfo, list[LabelledImage]]:
    """Read one split of a MedMNIST ``.npz`` file; images load lazily.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file (e.g. ``bloodmnist.npz``, ``bloodmnist_64.npz``).
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    name : str, optional
        The MedMNIST flag (``"bloodmnist"`` …, any case); inferred from the file name when omitted.
    info : DatasetInfo, optional
        The info of a custom set stored in MedMNIST format (e.g. the synthetic shapes set); it
        gives the class names and the task type (``"multilabel"``: ``(N, C)`` labels).

    Returns
    -------
    tuple of (DatasetInfo, list of LabelledImage)
        The set's info and its images in file order; ``source`` is ``"<file>:<split>_images[<i>]"``.

    Raises
    ------
    DatasetError
        If the file is missing or unreadable, lacks the split's arrays, or its images or labels
        have the wrong dtype, shape or range; the message names the file and the array.
    """
    split = check_split(split)
    file = existing_file(path, "MedMNIST file")
    info, channels = _resolve_info(file, name, info)
    try:
        stated_size = medmnist_flag_from_filename(file)[1]
    except DatasetError:
        stated_size = None
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    try:
        with zipfile.ZipFile(file) as archive:
            members = {m[:-4] for m in archive.namelist() if m.endswith(".npy")}
            missing = [key for key in (images_key, labels_key) if key not in members]
            if missing:
                found = ", ".join(sorted(members)) or "none"
                raise DatasetError(f"{file}: missing array(s) {', '.join(missing)} (a MedMNIST file has "
                                   f"{{train,val,test}}_{{images,labels}}; found {found})")
            header = _member_header(file, archive, images_key)
        with np.load(file, allow_pickle=False) as npz:
            raw_labels = npz[labels_key]
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as error:
        raise DatasetError(f"{file}: not a readable .npz file ({error})") from error
    count = _check_images(file, images_key, header, channels, stated_size)
    labels = _check_labels(file, labels_key, raw_labels, count, info)
    images = _SplitImages(file, images_key, header)
    multilabel = info.task_type == "multilabel"
    samples = [
        LabelledImage(
            dataset=info.name, split=split, load=_NpzImage(images, index),
            labels=tuple(int(c) for c in np.flatnonzero(row)) if multilabel else (int(row[0]),),
            source=f"{file.name}:{images_key}[{index}]")
        for index, row in enumerate(labels)
    ]
    logger.info("%s %s: %d images of %dx%d px", info.name, split, count, header.shape[1], header.shape[2])
    return info, samples
