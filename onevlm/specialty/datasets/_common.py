"""What the dataset readers share: the error type, argument checks and lazy image loaders.

The loaders are small picklable callables (not closures) so that a list of
:class:`~onevlm.specialty.samples.LabelledImage` can be handed to worker processes.
Research use only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from onevlm.specialty.samples import SPLITS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the message names the file and the problem."""


def check_split(split: str) -> str:
    """Return ``split`` if it is one of ``train``, ``val``, ``test``.

    Parameters
    ----------
    split : str
        The requested split.

    Returns
    -------
    str
        The same split.

    Raises
    ------
    DatasetError
        If the split is not known.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def check_per_split(per_split: tuple[int, int, int]) -> tuple[int, int, int]:
    """Validate a ``(train, val, test)`` count triple (non-negative integers)."""
    if len(per_split) != 3 or any(not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0
                                  for n in per_split):
        raise ValueError(f"per_split must be three non-negative integers (train, val, test), got {per_split!r}")
    return (int(per_split[0]), int(per_split[1]), int(per_split[2]))


def existing_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a :class:`Path` if it is an existing folder, else raise :class:`DatasetError`."""
    folder = Path(path)
    if not folder.exists():
        raise DatasetError(f"{folder}: {what} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {what} must be a folder, found a file")
    return folder


def existing_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a :class:`Path` if it is an existing file, else raise :class:`DatasetError`."""
    file = Path(path)
    if not file.exists():
        raise DatasetError(f"{file}: {what} does not exist")
    if not file.is_file():
        raise DatasetError(f"{file}: {what} must be a file, found a folder")
    return file


def child_dir(parent: Path, names: tuple[str, ...]) -> Path | None:
    """The sub-folder of ``parent`` whose name matches one of ``names`` ignoring case (first by ``names`` order)."""
    by_lower: dict[str, Path] = {}
    for child in sorted(parent.iterdir()):
        if child.is_dir():
            by_lower.setdefault(child.name.lower(), child)
    for name in names:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    return None


def open_rgb(path: Path) -> Image.Image:
    """Read an image file fully and return it as RGB; unreadable files raise :class:`DatasetError`."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: image file does not exist") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read the image ({error})") from error


@dataclass(frozen=True)
class FileImage:
    """Lazy loader of one image file as RGB (picklable)."""

    path: Path

    def __call__(self) -> Image.Image:
        return open_rgb(self.path)


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """A uint8 ``(H, W)`` grey or ``(H, W, 3)`` colour array as an RGB PIL image."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array).convert("RGB")
    return Image.fromarray(array)
