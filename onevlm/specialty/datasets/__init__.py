"""Dataset readers of the specialty role: MedMNIST v2, PolypSet, DeepLesion and IDC patches.

Each reader returns ``(DatasetInfo, list[LabelledImage])`` for one split, with images loading
lazily; :mod:`onevlm.specialty.datasets.synthetic` writes small sets in the same formats.
Bad input raises :class:`DatasetError` naming the file. Research use only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from onevlm.specialty.datasets._common import DatasetError
from onevlm.specialty.datasets.deeplesion import DEEPLESION_INFO, read_deeplesion
from onevlm.specialty.datasets.idc_patches import IDC_INFO, idc_split_of, read_idc_patches
from onevlm.specialty.datasets.medmnist import MEDMNIST_INFOS, read_medmnist
from onevlm.specialty.datasets.polypset import POLYPSET_INFO, read_polypset
from onevlm.specialty.samples import DatasetInfo, LabelledImage

KNOWN_DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({
    **MEDMNIST_INFOS,
    POLYPSET_INFO.name: POLYPSET_INFO,
    DEEPLESION_INFO.name: DEEPLESION_INFO,
    IDC_INFO.name: IDC_INFO,
})
"""Every dataset a reader knows, by ``DatasetInfo.name`` (``bloodmnist`` … ``polypset``, ``deeplesion``, ``idc``)."""

READERS: Mapping[str, Callable[..., tuple[DatasetInfo, list[LabelledImage]]]] = MappingProxyType({
    "medmnist": read_medmnist,
    "polypset": read_polypset,
    "deeplesion": read_deeplesion,
    "idc": read_idc_patches,
})
"""The reader of each dataset kind."""


def read_dataset(kind: str, path: str | Path, split: str, **options: Any) -> tuple[DatasetInfo, list[LabelledImage]]:
    """Read one split of a dataset of the given kind.

    Parameters
    ----------
    kind : str
        ``"medmnist"`` (a ``.npz`` file), ``"polypset"``, ``"deeplesion"`` or ``"idc"`` (folders);
        any case.
    path : str or Path
        The file or root folder.
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    **options
        Passed to the reader (e.g. ``name=`` or ``info=`` for MedMNIST, ``missing=`` for DeepLesion,
        ``fractions=`` for IDC).

    Returns
    -------
    tuple of (DatasetInfo, list of LabelledImage)
        The dataset's info and the split's samples.

    Raises
    ------
    DatasetError
        If the kind is unknown or the reader finds bad input.
    """
    reader = READERS.get(kind.lower())
    if reader is None:
        raise DatasetError(f"unknown dataset kind {kind!r} (known: {', '.join(READERS)})")
    return reader(path, split, **options)


__all__ = [
    "DEEPLESION_INFO",
    "IDC_INFO",
    "KNOWN_DATASETS",
    "MEDMNIST_INFOS",
    "POLYPSET_INFO",
    "READERS",
    "DatasetError",
    "idc_split_of",
    "read_dataset",
    "read_deeplesion",
    "read_idc_patches",
    "read_medmnist",
    "read_polypset",
]
