"""Every specialty task prompt, in one place and versioned, with the parser of its answer.

One fine-tuned model serves several tasks; the prompt says which. Each task kind turns a
:class:`~onevlm.specialty.samples.LabelledImage` into a :class:`TaskExample` (system turn, user
turn, the exact answer the model is trained to write, and the image) and parses a generated
answer back into a prediction:

``classification``
    Lettered options (``A: adipose`` / ``B: background`` …, as in the MedGemma fine-tuning
    notebook); the answer is the letter. Prediction: class index.
``grading``
    Ordinal options ``0: <name>`` … ``K-1: <name>``; the answer is the grade number.
    Prediction: grade (= class index).
``multilabel``
    The findings are listed; the answer is the names of the present ones, comma-separated in
    index order, or ``none``. Prediction: ``frozenset`` of class indices.
``detection``
    The answer is one object per line, ``<label> [x0, y0, x1, y1]`` with normalised coordinates
    to three decimals (x to the right, y down), in reading order, or ``none``. Prediction: a
    tuple of :class:`~onevlm.specialty.samples.NormalisedBox`.
``region-classification``
    The region is outlined on the image in :data:`REGION_COLOUR` *and* given in the text as a
    box; lettered options; the answer is the letter. Prediction: class index.

Parsers tolerate surrounding whitespace and letter case and nothing else: an answer that does
not follow the format comes back as an :class:`Unparseable` marker, never coerced to the
nearest class.

Option markers
--------------
Letters are the default (``markers="letters"``). ``markers="numbers"`` numbers the options
``1``, ``2``, … instead, for tokenizers that cannot write every letter: the synthetic test
tokenizer has ``A``, ``B`` and ``D`` as tokens but not ``C``, and an answer the tokenizer maps to
``<unk>`` can be neither learnt nor parsed. The marker style is part of the prompt id.

Specialty mixtures (``config/specialties/*.yaml``: dataset, reader kind, task kind, weight per
entry) load with :func:`load_specialty` / :func:`load_specialties`; :func:`derive_task` turns a
detection set into a classification or region-classification one (PolypSet polyp classes).

Each rendered example carries a ``prompt_id`` (task, version, hash of the template, system
prompt and marker style) that goes into the adapter manifest. Change a template: bump
:data:`TASK_PROMPT_VERSION`. Research use only.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

from PIL import Image, ImageDraw

from onevlm.specialty.metrics import match_boxes
from onevlm.specialty.samples import TASK_TYPES, DatasetInfo, LabelledImage, NormalisedBox

TASK_PROMPT_VERSION = "1"

SYSTEM_PROMPT = (
    "You are an expert in medical image analysis. You answer tersely, exactly in the format asked for."
)

#: Option marker styles for the lettered tasks (classification, region classification).
MARKER_STYLES = ("letters", "numbers")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: The outline colour of the region in region-classification images (pure green, RGB).
REGION_COLOUR = (0, 255, 0)
REGION_COLOUR_NAME = "green"

#: The answer of multi-label and detection tasks when nothing is present.
NONE_ANSWER = "none"
#: Decimals of the normalised box coordinates in detection and region prompts.
BOX_DECIMALS = 3
#: IoU a predicted box needs to match a gold box (detection correctness).
IOU_MATCH = 0.5

CLASSIFICATION_TEMPLATE = (
    "Dataset: {dataset}\n"
    "What is the most likely class of this image?\n"
    "{options}\n"
    "Answer with the {marker_word} of the correct option only."
)

GRADING_TEMPLATE = (
    "Dataset: {dataset}\n"
    "Grade this image on the ordinal scale below, from 0 (lowest grade) upwards.\n"
    "{options}\n"
    "Answer with the grade number only."
)

MULTILABEL_TEMPLATE = (
    "Dataset: {dataset}\n"
    "Which of these findings are present in this image?\n"
    "{findings}\n"
    "Answer with the names of all findings present, separated by commas, in the order listed. "
    "If no finding is present, answer only: none"
)

DETECTION_TEMPLATE = (
    "Dataset: {dataset}\n"
    "Find every object of these classes in this image:\n"
    "{classes}\n"
    "Answer with one line per object: the class name, then its box as [x0, y0, x1, y1] in normalised "
    "coordinates (0 to 1, three decimals, x to the right, y down), objects in reading order. "
    "If there is no object, answer only: none"
)

REGION_TEMPLATE = (
    "Dataset: {dataset}\n"
    "The region outlined in {colour} in this image, box [x0, y0, x1, y1] = {box} in normalised "
    "coordinates (x to the right, y down), contains one finding.\n"
    "What is the most likely class of that region?\n"
    "{options}\n"
    "Answer with the {marker_word} of the correct option only."
)

_TEMPLATES = {
    "classification": CLASSIFICATION_TEMPLATE,
    "grading": GRADING_TEMPLATE,
    "multilabel": MULTILABEL_TEMPLATE,
    "detection": DETECTION_TEMPLATE,
    "region-classification": REGION_TEMPLATE,
}
#: Tasks whose options carry letter/number markers (the marker style matters to them).
_OPTION_TASKS = ("classification", "region-classification")


@dataclass(frozen=True)
class Unparseable:
    """A generated answer that does not follow the task's format (counted wrong, never coerced).

    Attributes
    ----------
    reason:
        Why it could not be parsed (names the format rule, not the answer text).
    """

    reason: str

    def __bool__(self) -> bool:  # an unparseable answer is never a truthy prediction
        return False


#: A parsed answer: class index or grade, set of findings, boxes, or the unparseable marker.
Prediction = Union[int, frozenset, tuple, Unparseable]


def is_unparseable(prediction: object) -> bool:
    """Whether ``prediction`` is the :class:`Unparseable` marker."""
    return isinstance(prediction, Unparseable)


@dataclass(frozen=True)
class TaskExample:
    """One rendered training / evaluation example.

    Attributes
    ----------
    info:
        The dataset (name, task, class names).
    split:
        ``train``, ``val`` or ``test``.
    prompt_id:
        ``<task>-v<version>-<hash8>`` of the template that rendered it.
    system, user:
        System and user turn texts (the image goes before the user text).
    answer:
        The exact model answer for the training target.
    load_image:
        Zero-argument callable returning the RGB image the model sees (lazy: datasets are large;
        for region classification the outline is already drawn).
    target:
        The gold answer in prediction form (what :func:`parse_answer` returns for ``answer``).
    target_names:
        Class names of the target (for data summaries; ``("none",)`` when nothing is present).
    markers:
        Option marker style (``letters`` or ``numbers``).
    """

    info: DatasetInfo
    split: str
    prompt_id: str
    system: str
    user: str
    answer: str
    load_image: Callable[[], Image.Image] = field(compare=False, repr=False)
    target: Prediction
    target_names: tuple[str, ...] = ()
    markers: str = "letters"

    @property
    def task(self) -> str:
        """The task kind (the dataset's ``task_type``)."""
        return self.info.task_type

    @property
    def dataset(self) -> str:
        """The dataset name."""
        return self.info.name


# -- prompt ids -------------------------------------------------------------------------------


def _check_markers(markers: str) -> None:
    if markers not in MARKER_STYLES:
        raise ValueError(f"markers must be one of {', '.join(MARKER_STYLES)}, got {markers!r}")


def _check_task(task: str) -> None:
    if task not in TASK_TYPES:
        raise ValueError(f"task must be one of {', '.join(TASK_TYPES)}, got {task!r}")


def prompt_id(task: str, markers: str = "letters") -> str:
    """The identifier of a task's current template.

    Parameters
    ----------
    task:
        One of :data:`~onevlm.specialty.samples.TASK_TYPES`.
    markers:
        Option marker style; part of the id for the lettered tasks only.

    Returns
    -------
    str
        ``<task>-v<TASK_PROMPT_VERSION>-<hash8>`` (``-numbers`` appended for numbered options).
    """
    _check_task(task)
    _check_markers(markers)
    style = markers if task in _OPTION_TASKS else ""
    text = "\x00".join((SYSTEM_PROMPT, _TEMPLATES[task], style, str(REGION_COLOUR) if task == "region-classification" else ""))
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    suffix = f"-{markers}" if task in _OPTION_TASKS and markers != "letters" else ""
    return f"{task}-v{TASK_PROMPT_VERSION}-{digest}{suffix}"


def prompt_ids(markers: str = "letters") -> dict[str, str]:
    """Every task kind's current prompt id."""
    return {task: prompt_id(task, markers) for task in TASK_TYPES}


# -- option markers ---------------------------------------------------------------------------


def option_marker(index: int, markers: str = "letters") -> str:
    """The marker of option ``index`` (``A``, ``B`` … or ``1``, ``2`` …)."""
    _check_markers(markers)
    if index < 0:
        raise ValueError("option index must be >= 0")
    if markers == "letters":
        if index >= len(LETTERS):
            raise ValueError(f"{index + 1} options do not fit the letters A-Z; use markers='numbers'")
        return LETTERS[index]
    return str(index + 1)


def _marker_index(marker: str, markers: str, n: int) -> int | None:
    if markers == "letters":
        if len(marker) != 1 or not marker.isalpha() or marker.upper() not in LETTERS:
            return None
        index = LETTERS.index(marker.upper())
    else:
        if not marker.isdigit():
            return None
        index = int(marker) - 1
    return index if 0 <= index < n else None


def _options(names: Iterable[str], markers: str) -> str:
    return "\n".join(f"{option_marker(i, markers)}: {name}" for i, name in enumerate(names))


def _grades(names: Iterable[str]) -> str:
    return "\n".join(f"{i}: {name}" for i, name in enumerate(names))


def _marker_word(markers: str) -> str:
    return "letter" if markers == "letters" else "number"


# -- validation -------------------------------------------------------------------------------


def validate_info(info: DatasetInfo, markers: str = "letters") -> None:
    """Raise ``ValueError`` unless ``info``'s class names can be written and parsed back.

    Names must be non-blank, single-line and unique ignoring case; multi-label and detection
    names may not contain ``,`` or ``[`` nor be ``none``; letters cover at most 26 options.
    """
    _check_markers(markers)
    folded = [n.strip().casefold() for n in info.class_names]
    for name in info.class_names:
        if not name.strip() or "\n" in name or name != name.strip():
            raise ValueError(f"{info.name}: class name {name!r} must be non-blank, single-line, without outer spaces")
    if len(set(folded)) != len(folded):
        raise ValueError(f"{info.name}: class names must be unique ignoring case")
    if info.task_type in ("multilabel", "detection"):
        for name in info.class_names:
            if "," in name or "[" in name or name.casefold() == NONE_ANSWER:
                raise ValueError(f"{info.name}: {info.task_type} class name {name!r} may not contain ',' or '[' "
                                 f"nor be {NONE_ANSWER!r}")
    if info.task_type in _OPTION_TASKS and markers == "letters" and len(info.class_names) > len(LETTERS):
        raise ValueError(f"{info.name}: {len(info.class_names)} classes do not fit the letters A-Z; use markers='numbers'")


def _check_sample(info: DatasetInfo, sample: LabelledImage) -> None:
    if sample.dataset != info.name:
        raise ValueError(f"sample of dataset {sample.dataset!r} given with dataset info {info.name!r}")
    n = len(info.class_names)
    bad = [label for label in sample.labels if label >= n] + [b.label for b in sample.boxes if b.label >= n]
    if bad:
        raise ValueError(f"{info.name} ({sample.split}): class index {bad[0]} out of range for {n} classes")


def _single_label(info: DatasetInfo, sample: LabelledImage) -> int:
    if len(sample.labels) != 1:
        raise ValueError(f"{info.name} ({sample.split}): a {info.task_type} sample needs exactly one label, "
                         f"got {len(sample.labels)}")
    return sample.labels[0]


# -- boxes ------------------------------------------------------------------------------------


def format_box(box: NormalisedBox) -> str:
    """``[x0, y0, x1, y1]`` with :data:`BOX_DECIMALS` decimals."""
    return "[" + ", ".join(f"{v:.{BOX_DECIMALS}f}" for v in (box.x0, box.y0, box.x1, box.y1)) + "]"


def _rounded(box: NormalisedBox, dataset: str) -> NormalisedBox:
    values = [round(v, BOX_DECIMALS) for v in (box.x0, box.y0, box.x1, box.y1)]
    try:
        return NormalisedBox(*values, label=box.label)
    except ValueError as exc:
        raise ValueError(f"{dataset}: a box narrower than {10 ** -BOX_DECIMALS} cannot be written "
                         f"with {BOX_DECIMALS} decimals") from exc


def _reading_order(boxes: Iterable[NormalisedBox]) -> list[NormalisedBox]:
    return sorted(boxes, key=lambda b: (b.y0, b.x0, b.y1, b.x1, b.label))


def draw_region(image: Image.Image, box: NormalisedBox) -> Image.Image:
    """A copy of ``image`` (RGB) with ``box`` outlined in :data:`REGION_COLOUR`."""
    out = image.convert("RGB")  # convert() always returns a copy
    w, h = out.size
    width = max(1, round(0.01 * max(w, h)))
    x0, y0 = box.x0 * w, box.y0 * h
    x1, y1 = max(x0, box.x1 * w - 1), max(y0, box.y1 * h - 1)
    ImageDraw.Draw(out).rectangle([x0, y0, x1, y1], outline=REGION_COLOUR, width=width)
    return out


def _rgb_loader(sample: LabelledImage) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        return sample.load().convert("RGB")

    return load


def _region_loader(sample: LabelledImage, box: NormalisedBox) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        return draw_region(sample.load(), box)

    return load


# -- building examples ------------------------------------------------------------------------


def _dataset_line(info: DatasetInfo) -> str:
    return f"{info.name} ({info.description.strip()})" if info.description.strip() else info.name


def user_prompt(info: DatasetInfo, markers: str = "letters", region: NormalisedBox | None = None) -> str:
    """The user turn of ``info``'s task, exactly as training examples and inference queries get it.

    Parameters
    ----------
    info:
        The dataset (name, description, class names); its ``task_type`` selects the template.
    markers:
        Option marker style of the lettered tasks.
    region:
        The region of a ``region-classification`` task (required there, refused elsewhere).
    """
    validate_info(info, markers)
    task, names = info.task_type, info.class_names
    if (task == "region-classification") != (region is not None):
        raise ValueError(f"{info.name}: a region is given exactly for region-classification tasks")
    dataset = _dataset_line(info)
    if task == "classification":
        return CLASSIFICATION_TEMPLATE.format(dataset=dataset, options=_options(names, markers),
                                              marker_word=_marker_word(markers))
    if task == "grading":
        return GRADING_TEMPLATE.format(dataset=dataset, options=_grades(names))
    if task == "multilabel":
        return MULTILABEL_TEMPLATE.format(dataset=dataset, findings="\n".join(f"- {n}" for n in names))
    if task == "detection":
        return DETECTION_TEMPLATE.format(dataset=dataset, classes="\n".join(f"- {n}" for n in names))
    return REGION_TEMPLATE.format(dataset=dataset, colour=REGION_COLOUR_NAME, box=format_box(region),
                                  options=_options(names, markers), marker_word=_marker_word(markers))


def build_query(info: DatasetInfo, image: Image.Image, markers: str = "letters",
                region: NormalisedBox | None = None) -> TaskExample:
    """An inference query: the task's prompt for ``image``, with no gold answer.

    The prompt is the one :func:`build_example` renders for training, so a fine-tuned adapter
    sees the text it learnt. ``answer`` is empty and ``target`` is :class:`Unparseable`.

    Parameters
    ----------
    info:
        The task's dataset (as recorded in the adapter manifest).
    image:
        The image to answer about (converted to RGB; for region classification the region is
        drawn on a copy).
    markers:
        Option marker style the adapter was trained with.
    region:
        The region of a region-classification task.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    rgb = image.convert("RGB")
    if region is not None:
        region = _rounded(region, info.name)
    user = user_prompt(info, markers, region)
    shown = draw_region(rgb, region) if region is not None else rgb
    return TaskExample(info=info, split="query", prompt_id=prompt_id(info.task_type, markers), system=SYSTEM_PROMPT,
                       user=user, answer="", load_image=lambda: shown, target=Unparseable("an inference query"),
                       markers=markers)


def build_example(info: DatasetInfo, sample: LabelledImage, markers: str = "letters") -> TaskExample:
    """Render one sample as the prompt and answer of its dataset's task.

    Parameters
    ----------
    info:
        The dataset; its ``task_type`` selects the task kind.
    sample:
        The labelled image (labels are indices into ``info.class_names``).
    markers:
        Option marker style of the lettered tasks (``letters`` or ``numbers``).

    Returns
    -------
    TaskExample
        System and user text, exact answer, lazy image, and the gold prediction.

    Raises
    ------
    ValueError
        If the sample's labels or boxes do not fit the task (e.g. two labels for a single-label
        task, a region sample without exactly one box) or a class name cannot be written.
    """
    validate_info(info, markers)
    _check_sample(info, sample)
    task, names = info.task_type, info.class_names
    load = _rgb_loader(sample)
    region = None
    if task == "classification":
        label = _single_label(info, sample)
        answer, target, target_names = option_marker(label, markers), label, (names[label],)
    elif task == "grading":
        label = _single_label(info, sample)
        answer, target, target_names = str(label), label, (names[label],)
    elif task == "multilabel":
        present = sorted(set(sample.labels))
        answer = ", ".join(names[i] for i in present) if present else NONE_ANSWER
        target = frozenset(present)
        target_names = tuple(names[i] for i in present) or (NONE_ANSWER,)
    elif task == "detection":
        boxes = tuple(_reading_order(_rounded(b, info.name) for b in sample.boxes))
        answer = "\n".join(f"{names[b.label]} {format_box(b)}" for b in boxes) if boxes else NONE_ANSWER
        target, target_names = boxes, tuple(names[b.label] for b in boxes) or (NONE_ANSWER,)
    else:  # region-classification
        if len(sample.boxes) != 1:
            raise ValueError(f"{info.name} ({sample.split}): a region-classification sample needs exactly one box, "
                             f"got {len(sample.boxes)}")
        region = _rounded(sample.boxes[0], info.name)
        if sample.labels and tuple(sample.labels) != (region.label,):
            raise ValueError(f"{info.name} ({sample.split}): the sample's labels disagree with its region's label")
        answer, target, target_names = option_marker(region.label, markers), region.label, (names[region.label],)
        load = _region_loader(sample, region)
    user = user_prompt(info, markers, region)
    pid = prompt_id(task, markers)
    return TaskExample(info=info, split=sample.split, prompt_id=pid, system=SYSTEM_PROMPT, user=user, answer=answer,
                       load_image=load, target=target, target_names=target_names, markers=markers)


def build_examples(info: DatasetInfo, samples: Iterable[LabelledImage], markers: str = "letters") -> list[TaskExample]:
    """:func:`build_example` over ``samples``."""
    return [build_example(info, s, markers) for s in samples]


def derive_task(info: DatasetInfo, samples: Iterable[LabelledImage], task: str,
                name: str | None = None) -> tuple[DatasetInfo, list[LabelledImage]]:
    """Re-label a detection set for another task kind (same images, same class names).

    ``classification``: frames whose boxes all carry one class become single-label samples of
    that class (frames without boxes or with mixed classes are left out). ``region-classification``:
    one sample per box. The dataset's own task returns the samples unchanged, under the new
    name; any other combination raises ``ValueError``.

    Parameters
    ----------
    info:
        The reader's dataset info (e.g. PolypSet, a detection set).
    samples:
        Its samples.
    task:
        The task kind wanted.
    name:
        The derived dataset's name (default ``<name>-<task>``); samples are renamed to it.

    Returns
    -------
    tuple of (DatasetInfo, list of LabelledImage)
    """
    import dataclasses

    _check_task(task)
    if task != info.task_type and not (info.task_type == "detection" and task in _OPTION_TASKS):
        raise ValueError(f"{info.name}: cannot derive a {task} task from a {info.task_type} dataset")
    new_name = name or (info.name if task == info.task_type else f"{info.name}-{task}")
    derived = dataclasses.replace(info, name=new_name, task_type=task)
    out: list[LabelledImage] = []
    for sample in samples:
        if info.task_type == "detection" and task == "classification":
            classes = {b.label for b in sample.boxes}
            if len(classes) == 1:
                out.append(dataclasses.replace(sample, dataset=new_name, labels=(classes.pop(),), boxes=()))
        elif info.task_type == "detection" and task == "region-classification":
            out.extend(dataclasses.replace(sample, dataset=new_name, labels=(b.label,), boxes=(b,))
                       for b in sample.boxes)
        else:
            out.append(dataclasses.replace(sample, dataset=new_name))
    return derived, out


# -- parsing answers --------------------------------------------------------------------------

_OPTION_RE = re.compile(r"\(?([A-Za-z]|\d+)\)?(?:\s*[:.)]\s*(.*))?", re.DOTALL)
_NUMBER = r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))"
_BOX_LINE_RE = re.compile(
    r"(.+?)\s*\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]", re.DOTALL)


def _parse_option(text: str, names: tuple[str, ...], markers: str, zero_based: bool = False) -> Prediction:
    match = _OPTION_RE.fullmatch(text.strip())
    if match is None:
        return Unparseable("not an option marker")
    marker, rest = match.group(1), (match.group(2) or "").strip()
    if zero_based:
        index = int(marker) if marker.isdigit() else None
        index = index if index is not None and index < len(names) else None
    else:
        index = _marker_index(marker, markers, len(names))
    if index is None:
        return Unparseable("option marker out of range or of the wrong style")
    if rest and rest.casefold() != names[index].casefold():
        return Unparseable("option text disagrees with its marker")
    return index


def _name_index(names: tuple[str, ...]) -> dict[str, int]:
    return {n.casefold(): i for i, n in enumerate(names)}


def _parse_multilabel(text: str, names: tuple[str, ...]) -> Prediction:
    stripped = text.strip()
    if stripped.casefold() == NONE_ANSWER:
        return frozenset()
    if not stripped:
        return Unparseable("empty answer")
    lookup = _name_index(names)
    found: set[int] = set()
    for piece in stripped.split(","):
        key = piece.strip().casefold()
        if key not in lookup:
            return Unparseable("a listed finding is not one of the dataset's findings" if key else "empty list item")
        found.add(lookup[key])
    return frozenset(found)


def _parse_detection(text: str, names: tuple[str, ...]) -> Prediction:
    stripped = text.strip()
    if stripped.casefold() == NONE_ANSWER:
        return ()
    lines = [line.strip() for line in stripped.splitlines() if line.strip()]
    if not lines:
        return Unparseable("empty answer")
    lookup = _name_index(names)
    boxes: list[NormalisedBox] = []
    for line in lines:
        match = _BOX_LINE_RE.fullmatch(line)
        if match is None:
            return Unparseable("a line is not '<label> [x0, y0, x1, y1]'")
        label = lookup.get(match.group(1).strip().casefold())
        if label is None:
            return Unparseable("a box label is not one of the dataset's classes")
        values = [float(v) for v in match.group(2, 3, 4, 5)]
        if not all(math.isfinite(v) for v in values):
            return Unparseable("a box coordinate is not finite")
        try:
            boxes.append(NormalisedBox(*values, label=label))
        except ValueError:
            return Unparseable("a box is not within 0..1 with x0 < x1 and y0 < y1")
    return tuple(_reading_order(boxes))


def parse_answer(info: DatasetInfo, text: str, markers: str = "letters") -> Prediction:
    """Parse a generated answer into a prediction of ``info``'s task.

    Parameters
    ----------
    info:
        The dataset whose task produced the answer.
    text:
        The generated text (special tokens already removed).
    markers:
        The option marker style the prompt used.

    Returns
    -------
    Prediction
        Class index (classification, region classification), grade (grading), ``frozenset`` of
        class indices (multilabel), tuple of boxes in reading order (detection), or
        :class:`Unparseable`. Surrounding whitespace and letter case are tolerated; an option
        answer may repeat its option text (``B: background``) only if it matches the marker.
    """
    _check_markers(markers)
    if not isinstance(text, str):
        raise TypeError(f"answer text must be a str, got {type(text).__name__}")
    names, task = info.class_names, info.task_type
    if task in _OPTION_TASKS:
        return _parse_option(text, names, markers)
    if task == "grading":
        return _parse_option(text, names, markers, zero_based=True)
    if task == "multilabel":
        return _parse_multilabel(text, names)
    return _parse_detection(text, names)


# -- correctness ------------------------------------------------------------------------------


def is_correct(task: str, target: Prediction, prediction: Prediction) -> bool:
    """Whether ``prediction`` is right for ``target`` (the example's gold prediction).

    Exact match for options, grades and finding sets; for detection, the same number of boxes
    and a one-to-one matching (greedy by IoU) of same-label boxes at IoU >= :data:`IOU_MATCH`.
    An unparseable prediction is always wrong.
    """
    _check_task(task)
    if is_unparseable(prediction):
        return False
    if task != "detection":
        return prediction == target
    gold, pred = list(target), list(prediction)  # type: ignore[arg-type]
    if len(gold) != len(pred):
        return False
    return match_boxes(gold, pred, IOU_MATCH, same_label=True) == len(gold)


# -- specialty mixtures -----------------------------------------------------------------------

#: Dataset reader kinds a specialty mixture may name (``onevlm.specialty.datasets``).
READER_KINDS = ("medmnist", "polypset", "deeplesion", "idc")
_SPECIALTY_FIELDS = ("specialty", "description", "option_markers", "datasets")
_ENTRY_FIELDS = ("dataset", "reader", "task", "weight", "source", "options")


class SpecialtyConfigError(ValueError):
    """A specialty mixture file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class MixtureEntry:
    """One dataset of a specialty mixture.

    Attributes
    ----------
    dataset:
        The dataset name (unique in the specialty; the name its reader's ``DatasetInfo`` carries).
    reader:
        The reader kind (:data:`READER_KINDS`).
    task:
        The task kind (:data:`~onevlm.specialty.samples.TASK_TYPES`).
    weight:
        Sampling weight of each of its examples relative to the other datasets' (1.0 everywhere:
        plain concatenation; 2.0 draws this dataset's examples twice as often).
    source:
        What the reader reads (e.g. the MedMNIST subset); defaults to ``dataset``.
    options:
        Reader options (passed through to the reader, which validates them).
    """

    dataset: str
    reader: str
    task: str
    weight: float = 1.0
    source: str = ""
    options: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SpecialtyConfig:
    """A specialty: its name, the option marker style, and its dataset mixture."""

    specialty: str
    datasets: tuple[MixtureEntry, ...]
    option_markers: str = "letters"
    description: str = ""

    def dataset_weights(self) -> dict[str, float]:
        """``{dataset: weight}`` (for ``TrainingSettings.dataset_weights``)."""
        return {e.dataset: e.weight for e in self.datasets}

    def entry(self, dataset: str) -> MixtureEntry:
        """The mixture entry of ``dataset`` (``KeyError`` if absent)."""
        for e in self.datasets:
            if e.dataset == dataset:
                return e
        raise KeyError(f"{self.specialty}: no dataset {dataset!r} in the mixture")

    def check_info(self, info: DatasetInfo) -> None:
        """Raise ``ValueError`` unless a reader's ``info`` matches its mixture entry's task."""
        entry = self.entry(info.name)
        if info.task_type != entry.task:
            raise ValueError(f"{self.specialty}: dataset {info.name!r} is configured for {entry.task}, "
                             f"its reader says {info.task_type}")


def _config_error(path: object, where: str, message: str) -> SpecialtyConfigError:
    return SpecialtyConfigError(f"{path}: {where}: {message}")


def _text(obj: dict, key: str, path: object, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise _config_error(path, f"{where}{key}", "missing")
        return ""
    value = obj[key]
    if not isinstance(value, str) or (required and not value.strip()):
        raise _config_error(path, f"{where}{key}", "must be a non-empty string")
    return value.strip()


def parse_specialty(obj: object, path: object = "<specialty>") -> SpecialtyConfig:
    """Validate a specialty mapping (the parsed YAML) into a :class:`SpecialtyConfig`."""
    if not isinstance(obj, dict):
        raise _config_error(path, "top level", "must be a mapping")
    unknown = [k for k in obj if k not in _SPECIALTY_FIELDS]
    if unknown:
        raise _config_error(path, str(unknown[0]), f"unknown field (allowed: {', '.join(_SPECIALTY_FIELDS)})")
    specialty = _text(obj, "specialty", path, "")
    description = _text(obj, "description", path, "", required=False)
    markers = obj.get("option_markers", "letters")
    if markers not in MARKER_STYLES:
        raise _config_error(path, "option_markers", f"must be one of {', '.join(MARKER_STYLES)}, got {markers!r}")
    items = obj.get("datasets")
    if not isinstance(items, list) or not items:
        raise _config_error(path, "datasets", "must be a non-empty list")
    entries: list[MixtureEntry] = []
    for i, item in enumerate(items):
        where = f"datasets[{i}]."
        if not isinstance(item, dict):
            raise _config_error(path, f"datasets[{i}]", "must be a mapping")
        unknown = [k for k in item if k not in _ENTRY_FIELDS]
        if unknown:
            raise _config_error(path, f"{where}{unknown[0]}", f"unknown field (allowed: {', '.join(_ENTRY_FIELDS)})")
        dataset = _text(item, "dataset", path, where)
        reader = _text(item, "reader", path, where)
        if reader not in READER_KINDS:
            raise _config_error(path, f"{where}reader", f"must be one of {', '.join(READER_KINDS)}, got {reader!r}")
        task = _text(item, "task", path, where)
        if task not in TASK_TYPES:
            raise _config_error(path, f"{where}task", f"must be one of {', '.join(TASK_TYPES)}, got {task!r}")
        weight = item.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            raise _config_error(path, f"{where}weight", f"must be a positive number, got {weight!r}")
        source = _text(item, "source", path, where, required=False) or dataset
        options = item.get("options", {})
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise _config_error(path, f"{where}options", "must be a mapping with string keys")
        if any(e.dataset == dataset for e in entries):
            raise _config_error(path, f"{where}dataset", f"duplicate dataset {dataset!r}")
        entries.append(MixtureEntry(dataset, reader, task, float(weight), source, dict(options)))
    return SpecialtyConfig(specialty=specialty, datasets=tuple(entries), option_markers=markers, description=description)


def load_specialty(path: str | os.PathLike[str]) -> SpecialtyConfig:
    """Read and validate a specialty mixture YAML file (``config/specialties/*.yaml``).

    Raises
    ------
    SpecialtyConfigError
        If the file is missing, not YAML, or a field is missing or invalid (the message names
        the file and the field, e.g. ``datasets[2].task``).
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SpecialtyConfigError(f"{file}: specialty file not found")
    try:
        obj = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecialtyConfigError(f"{file}: unreadable YAML: {exc}") from exc
    return parse_specialty(obj, file)


def default_specialties_dir() -> Path:
    """The shipped ``config/specialties`` folder."""
    return Path(__file__).resolve().parents[2] / "config" / "specialties"


def load_specialties(folder: str | os.PathLike[str] | None = None) -> dict[str, SpecialtyConfig]:
    """Every ``*.yaml`` specialty in ``folder`` (default: the shipped ones), by specialty name."""
    root = Path(folder) if folder is not None else default_specialties_dir()
    configs: dict[str, SpecialtyConfig] = {}
    for file in sorted(root.glob("*.yaml")):
        config = load_specialty(file)
        if config.specialty in configs:
            raise SpecialtyConfigError(f"{file}: specialty {config.specialty!r} is defined twice")
        configs[config.specialty] = config
    return configs
