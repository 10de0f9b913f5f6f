"""One input to route: a DICOM instance or an ordinary image file, with what we know about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from PIL import Image, UnidentifiedImageError

from onevlm.dicom.header import DicomHeader, DicomReadError, is_dicom_file, read_dicom

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


class InputError(ValueError):
    """An input cannot be routed. The message names the input and the problem."""


@dataclass(frozen=True)
class RoutingInput:
    """A file to route.

    Attributes
    ----------
    path:
        The file as the user named it.
    kind:
        ``"dicom"`` or ``"image"`` (PNG/JPEG/TIFF…).
    header:
        The DICOM header evidence (``None`` for ordinary images).
    hint:
        Optional user statement of the modality, used for ordinary images.
    image:
        The image to show a VLM when it is not simply the file's pixels (e.g. a whole-slide
        thumbnail); ``None``: the backend reads the file.
    dataset:
        The DICOM dataset as parsed once by :func:`load_input` (large values, Pixel Data among
        them, still on disk): the image is decoded from it, never by parsing the file again.
        ``None`` for ordinary images, or where a caller let it go to save memory.
    """

    path: Path
    kind: str
    header: DicomHeader | None = None
    hint: str | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    dataset: pydicom.Dataset | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("dicom", "image"):
            raise ValueError(f"kind must be 'dicom' or 'image', got {self.kind!r}")
        if self.kind == "dicom" and self.header is None:
            raise ValueError("a DICOM input needs its header")

    @property
    def reference(self) -> dict:
        """How logs name this input: file name and UIDs, never patient data."""
        ref = {"file": self.path.name, "path": str(self.path), "kind": self.kind}
        if self.header is not None:
            ref.update(
                sop_instance_uid=self.header.sop_instance_uid,
                series_instance_uid=self.header.series_instance_uid,
                study_instance_uid=self.header.study_instance_uid,
                sop_class_uid=self.header.sop_class_uid,
            )
        return ref


def load_input(path: str | Path, hint: str | None = None) -> RoutingInput:
    """Identify ``path`` as DICOM or an image and read its header.

    Raises
    ------
    InputError
        If the file is missing, empty, corrupt, or neither DICOM nor an image. The message
        names the file as given (``path``, relative if it was) and says the problem in the
        user's terms; a DICOM file whose Pixel Data is cut short is not an error here (see
        :attr:`DicomHeader.pixel_data_problem`; the router refuses it).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    if is_dicom_file(path):
        header, dataset = _parse(path)
        return RoutingInput(path=path, kind="dicom", header=header, hint=hint, dataset=dataset)
    if path.suffix.lower() == ".dcm":
        # No Part 10 preamble: an old archive's file (read it forced) or no DICOM at all.
        header, dataset = _parse(path, force=True)
        return RoutingInput(path=path, kind="dicom", header=header, hint=hint, dataset=dataset)
    if path.suffix.lower() in IMAGE_SUFFIXES or _is_image(path):
        try:
            with Image.open(path) as image:
                image.verify()
        except UnidentifiedImageError as exc:
            # PIL's text repeats the path: say it once, in the user's terms.
            raise InputError(f"{path}: not a readable image (unknown format or corrupt)") from exc
        except (OSError, SyntaxError) as exc:
            raise InputError(f"{path}: corrupt image ({exc})") from exc
        return RoutingInput(path=path, kind="image", hint=hint)
    # DICOM without the Part 10 preamble still happens (old archives): try it last.
    try:
        header, dataset = read_dicom(path, force=True)
    except DicomReadError as exc:
        raise InputError(f"{path}: neither a DICOM file nor a supported image") from exc
    return RoutingInput(path=path, kind="dicom", header=header, hint=hint, dataset=dataset)


def _parse(path: Path, force: bool = False) -> tuple[DicomHeader, pydicom.Dataset]:
    try:
        return read_dicom(path, force=force)
    except DicomReadError as exc:
        # Forced reading of a file that is not DICOM fails in arbitrary ways: say what it is.
        problem = "not a DICOM file" if force else exc.problem
        raise InputError(f"{path}: {problem}") from exc


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False
