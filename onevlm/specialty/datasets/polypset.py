"""PolypSet-style colonoscopy polyp detection folders (Li et al. 2021), Pascal VOC annotations.

Accepted layout (folder names match ignoring case)::

    ROOT/
      <split>/                 train | val | test  (also: training, train2019; valid, validation, val2019;
                               testing, test2019)
        Images/                (also: Image, JPEGImages) the frames: *.jpg, *.jpeg, *.png, directly
                               or in sub-folders (e.g. one per video)
        Annotations/           (also: Annotation) one Pascal VOC file per annotated frame, at the
                               frame's relative path with the suffix .xml (Images/3/12.jpg ->
                               Annotations/3/12.xml; file-name case is ignored)

Each VOC file has ``<size><width>W</width><height>H</height></size>`` (optional: without it, or
with zeros, the frame's own size is read) and one ``<object>`` per polyp with
``<name>adenomatous</name>`` or ``<name>hyperplastic</name>`` (any case; ``adenoma`` and
``hyperplasia`` are taken too) and ``<bndbox><xmin/><ymin/><xmax/><ymax/></bndbox>`` in pixels.
Boxes are normalised by the size (``x / width``, ``y / height``) and must lie inside the image.
A frame without an annotation file, or with one without objects, shows no polyp (no boxes).
``labels`` of a frame are the classes of its boxes, sorted. Research use only.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from onevlm.specialty.datasets._common import (
    IMAGE_SUFFIXES,
    DatasetError,
    FileImage,
    check_split,
    child_dir,
    existing_dir,
)
from onevlm.specialty.samples import DatasetInfo, LabelledImage, NormalisedBox

logger = logging.getLogger(__name__)

POLYPSET_INFO = DatasetInfo(
    name="polypset", task_type="detection", class_names=("adenomatous", "hyperplastic"),
    specialty="gastroenterology",
    description="PolypSet (Li et al. 2021): colonoscopy frames with boxed polyps, adenomatous or hyperplastic.")

SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training", "train2019"),
    "val": ("val", "valid", "validation", "val2019"),
    "test": ("test", "testing", "test2019"),
}
IMAGE_FOLDERS = ("Images", "Image", "JPEGImages")
ANNOTATION_FOLDERS = ("Annotations", "Annotation")
_CLASS_ALIASES = {"adenomatous": 0, "adenoma": 0, "hyperplastic": 1, "hyperplasia": 1}


def _number(element: ET.Element, tag: str, xml_path: Path) -> float:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{xml_path}: <{element.tag}> lacks <{tag}>")
    try:
        return float(child.text.strip())
    except ValueError as error:
        raise DatasetError(f"{xml_path}: <{tag}> is not a number: {child.text.strip()!r}") from error


def _image_size(image_path: Path, xml_path: Path) -> tuple[float, float]:
    try:
        with Image.open(image_path) as image:
            return float(image.width), float(image.height)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{xml_path}: no <size> and the image {image_path} cannot be read ({error})") from error


def parse_voc(xml_path: Path, image_path: Path) -> tuple[NormalisedBox, ...]:
    """The polyps of one Pascal VOC file as normalised boxes.

    Parameters
    ----------
    xml_path : Path
        The annotation file.
    image_path : Path
        The frame it annotates (read only when the file gives no usable ``<size>``).

    Returns
    -------
    tuple of NormalisedBox
        One box per ``<object>``, labelled 0 (adenomatous) or 1 (hyperplastic), in file order.

    Raises
    ------
    DatasetError
        If the XML is malformed, an object lacks its name or box, the class is unknown, or a box is
        empty or outside the image; the message names the file.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as error:
        raise DatasetError(f"{xml_path}: not a readable Pascal VOC XML file ({error})") from error
    objects = root.findall("object")
    if not objects:
        return ()
    size = root.find("size")
    width = height = 0.0
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width, height = _number(size, "width", xml_path), _number(size, "height", xml_path)
    if width <= 0 or height <= 0:
        width, height = _image_size(image_path, xml_path)
    boxes = []
    for number, obj in enumerate(objects, start=1):
        name_element = obj.find("name")
        name = (name_element.text or "").strip().lower() if name_element is not None else ""
        if name not in _CLASS_ALIASES:
            raise DatasetError(f"{xml_path}: object {number} has class {name!r}; expected one of "
                               f"{', '.join(POLYPSET_INFO.class_names)}")
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{xml_path}: object {number} lacks <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box, tag, xml_path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if not (0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height):
            raise DatasetError(f"{xml_path}: object {number} box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) is empty "
                               f"or outside the {width:g}x{height:g} image")
        boxes.append(NormalisedBox(xmin / width, ymin / height, xmax / width, ymax / height,
                                   _CLASS_ALIASES[name]))
    return tuple(boxes)


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files under ``folder`` by lower-case relative path without suffix."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes:
            key = path.relative_to(folder).with_suffix("").as_posix().lower()
            if key in found:
                raise DatasetError(f"{path}: two files share the name {key!r} in {folder} (e.g. .jpg and .png)")
            found[key] = path
    return found


def read_polypset(root: str | Path, split: str) -> tuple[DatasetInfo, list[LabelledImage]]:
    """Read one split of a PolypSet-style folder; images load lazily.

    Parameters
    ----------
    root : str or Path
        The folder holding the split folders (see the module docstring for the layout).
    split : str
        ``"train"``, ``"val"`` or ``"test"``.

    Returns
    -------
    tuple of (DatasetInfo, list of LabelledImage)
        :data:`POLYPSET_INFO` and one sample per frame (sorted by path) with its boxes;
        ``source`` is the frame's path relative to ``root``.

    Raises
    ------
    DatasetError
        If the root, split, image or annotation folder is missing, or an annotation is malformed.
    """
    split = check_split(split)
    base = existing_dir(root, "PolypSet root folder")
    split_dir = child_dir(base, SPLIT_FOLDERS[split])
    if split_dir is None:
        raise DatasetError(f"{base}: no {split} folder (looked for {', '.join(SPLIT_FOLDERS[split])}, any case)")
    images_dir = child_dir(split_dir, IMAGE_FOLDERS)
    annotations_dir = child_dir(split_dir, ANNOTATION_FOLDERS)
    if images_dir is None:
        raise DatasetError(f"{split_dir}: no image folder (looked for {', '.join(IMAGE_FOLDERS)}, any case)")
    if annotations_dir is None:
        raise DatasetError(f"{split_dir}: no annotation folder (looked for {', '.join(ANNOTATION_FOLDERS)}, "
                           "any case)")
    images = _files(images_dir, IMAGE_SUFFIXES)
    annotations = _files(annotations_dir, (".xml",))
    samples = []
    unannotated = 0
    for key, image_path in images.items():
        xml_path = annotations.get(key)
        if xml_path is None:
            unannotated += 1
            boxes: tuple[NormalisedBox, ...] = ()
        else:
            boxes = parse_voc(xml_path, image_path)
        samples.append(LabelledImage(
            dataset=POLYPSET_INFO.name, split=split, load=FileImage(image_path),
            labels=tuple(sorted({box.label for box in boxes})), boxes=boxes,
            source=image_path.relative_to(base).as_posix()))
    orphans = len(set(annotations) - set(images))
    if orphans:
        logger.warning("polypset %s: %d annotation file(s) without a frame were ignored", split, orphans)
    logger.info("polypset %s: %d frames, %d with polyps, %d without an annotation file", split, len(samples),
                sum(1 for s in samples if s.boxes), unannotated)
    return POLYPSET_INFO, samples
