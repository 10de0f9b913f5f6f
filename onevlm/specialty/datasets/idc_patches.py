"""IDC breast histopathology patches (Janowczyk & Madabhushi 2016; Kaggle "breast-histopathology-images").

Accepted layout::

    ROOT/
      <patient_id>/            one folder per patient (any name; the real set uses numbers)
        0/*.png                non-IDC tissue patches (50x50 px in the real set)
        1/*.png                invasive ductal carcinoma patches

Folders of ``ROOT`` without a ``0`` or ``1`` sub-folder are ignored; if ``ROOT`` has no patient
folder but exactly one sub-folder that does (the Kaggle archive's ``IDC_regular_ps50_idx5``),
that one is used.

The set has no official split. Patients are split deterministically so that none is in two splits
(patches of one patient are strongly correlated): a patient's number is the first 8 bytes of
``SHA-256("onevlm-idc:" + patient_id)`` as a big-endian integer divided by 2**64, and it goes to
train below ``fractions[0]`` (0.7), to val below ``fractions[0] + fractions[1]`` (0.8), else to
test. The rule depends on the patient id alone, so adding patients never moves others.
Research use only.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from onevlm.specialty.datasets._common import IMAGE_SUFFIXES, DatasetError, FileImage, check_split, existing_dir
from onevlm.specialty.samples import SPLITS, DatasetInfo, LabelledImage

logger = logging.getLogger(__name__)

IDC_INFO = DatasetInfo(
    name="idc", task_type="classification", class_names=("non-IDC tissue", "invasive ductal carcinoma"),
    specialty="pathology",
    description="IDC (Janowczyk & Madabhushi 2016): breast cancer whole-slide H&E patches, IDC vs non-IDC.")

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
_SALT = "onevlm-idc:"
_CLASS_FOLDERS = ("0", "1")


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
                         f"got {fractions!r}")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def idc_split_of(patient_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split a patient belongs to under the documented hash rule.

    Parameters
    ----------
    patient_id : str
        The patient folder's name.
    fractions : tuple of three floats
        Train, val and test shares, summing to 1.

    Returns
    -------
    str
        ``"train"``, ``"val"`` or ``"test"``.
    """
    train, val, _ = _check_fractions(fractions)
    digest = hashlib.sha256((_SALT + patient_id).encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    if position < train:
        return SPLITS[0]
    if position < train + val:
        return SPLITS[1]
    return SPLITS[2]


def _is_patient(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_dir() for name in _CLASS_FOLDERS)


def _patient_folders(base: Path) -> list[Path]:
    subfolders = sorted(p for p in base.iterdir() if p.is_dir())
    patients = [p for p in subfolders if _is_patient(p)]
    if not patients and len(subfolders) == 1:
        nested = sorted(p for p in subfolders[0].iterdir() if _is_patient(p))
        if nested:
            logger.info("idc: using the single nested folder %s", subfolders[0].name)
            return nested
    if not patients:
        raise DatasetError(f"{base}: no patient folder (a folder with a 0/ or 1/ sub-folder of patches)")
    ignored = len(subfolders) - len(patients)
    if ignored:
        logger.info("idc: %d folder(s) without 0/ or 1/ were ignored", ignored)
    return patients


def read_idc_patches(root: str | Path, split: str, *, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
                     ) -> tuple[DatasetInfo, list[LabelledImage]]:
    """Read one patient-disjoint split of an IDC patch folder; patches load lazily.

    Parameters
    ----------
    root : str or Path
        The folder of patient folders (see the module docstring).
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    fractions : tuple of three floats
        Train, val and test shares of patients for :func:`idc_split_of` (default 0.7, 0.1, 0.2).

    Returns
    -------
    tuple of (DatasetInfo, list of LabelledImage)
        :data:`IDC_INFO` and the split's patches sorted by path, label 0 (non-IDC) or 1 (IDC);
        ``source`` is ``"<patient_id>/<class>/<file>"``.

    Raises
    ------
    DatasetError
        If the root does not exist or holds no patient folder.
    """
    split = check_split(split)
    fractions = _check_fractions(fractions)
    base = existing_dir(root, "IDC patch root folder")
    samples: list[LabelledImage] = []
    patients = 0
    for patient in _patient_folders(base):
        if idc_split_of(patient.name, fractions) != split:
            continue
        patients += 1
        for label, class_name in enumerate(_CLASS_FOLDERS):
            folder = patient / class_name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    samples.append(LabelledImage(
                        dataset=IDC_INFO.name, split=split, load=FileImage(path), labels=(label,),
                        source=f"{patient.name}/{class_name}/{path.name}"))
    positives = sum(1 for s in samples if s.labels == (1,))
    logger.info("idc %s: %d patients, %d patches (%d IDC)", split, patients, len(samples), positives)
    return IDC_INFO, samples
