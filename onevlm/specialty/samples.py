"""What every dataset reader yields and every task prompt and trainer consumes.

A :class:`LabelledImage` is one image with its labels (class indices into the dataset's class
names) and, for detection sets, its boxes in normalised coordinates. :class:`DatasetInfo` says
what the labels mean and which task the dataset serves. Research use only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

TASK_TYPES = ("classification", "grading", "multilabel", "detection", "region-classification")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class NormalisedBox:
    """A box in normalised image coordinates (0..1; x to the right, y down) with a class index."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: int

    def __post_init__(self) -> None:
        if not (0.0 <= self.x0 < self.x1 <= 1.0 and 0.0 <= self.y0 < self.y1 <= 1.0):
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) must satisfy 0 <= x0 < x1 <= 1, "
                             "0 <= y0 < y1 <= 1")
        if self.label < 0:
            raise ValueError("box label must be a class index >= 0")


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's identity: name, task, class names (in label-index order) and specialty."""

    name: str
    task_type: str
    class_names: tuple[str, ...]
    specialty: str
    description: str = ""

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)}, got {self.task_type!r}")
        if len(self.class_names) < 1 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{self.name}: class names must be non-empty and unique")


@dataclass(frozen=True)
class LabelledImage:
    """One training or evaluation example.

    ``load`` returns the RGB image (images load lazily: datasets are large). ``labels`` are class
    indices: one for single-label tasks, the positives for multi-label ones (may be empty: no
    finding). ``boxes`` are the objects of detection sets; ``source`` names the file and index.
    """

    dataset: str
    split: str
    load: Callable[[], Image.Image] = field(compare=False, repr=False)
    labels: tuple[int, ...] = ()
    boxes: tuple[NormalisedBox, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if any(label < 0 for label in self.labels):
            raise ValueError("labels are class indices >= 0")
