"""Whole-slide images (DICOM VL Whole Slide Microscopy, pyramidal TIFF/SVS) to images.

A slide is far too large for a VLM: the router sees a :meth:`WholeSlide.thumbnail`, the specialty
model sees :class:`Tile` images cut from one pyramid level. DICOM slides are read with
``wsidicom``, TIFF/SVS files with ``tiffslide``; both sit behind the :class:`WholeSlide` base class
so callers never branch on the format.

Tissue detection (``tiles(tissue_only=True)``) is deliberately simple: a pixel counts as tissue
when its HSV saturation is at least :data:`TISSUE_MIN_SATURATION` and its brightness (HSV value)
is at least :data:`TISSUE_MIN_VALUE`; a tile is kept when at least ``min_tissue_fraction`` of its
pixels are tissue. Glass background is bright and grey (low saturation), stained tissue is
coloured, and black padding or scanner borders are dark, so all but stained tissue is skipped.

Logs carry file names and DICOM UIDs only, never patient attributes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.uid import VLWholeSlideMicroscopyImageStorage

logger = logging.getLogger(__name__)

WSI_SOP_CLASS_UID = str(VLWholeSlideMicroscopyImageStorage)
"""SOP Class UID of the DICOM VL Whole Slide Microscopy Image (1.2.840.10008.5.1.4.1.1.77.1.6)."""

TISSUE_MIN_SATURATION = 20
"""Minimum HSV saturation (0-255) of a tissue pixel; glass background is near 0."""
TISSUE_MIN_VALUE = 30
"""Minimum HSV value (brightness, 0-255) of a tissue pixel; excludes black padding and borders."""
DEFAULT_MIN_TISSUE_FRACTION = 0.1
"""Share of tissue pixels a tile needs to be kept when ``tissue_only`` is set."""

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "ImageType"]


class WholeSlideError(ValueError):
    """A slide could not be opened or read; the message names the file and the problem."""


@dataclass(frozen=True)
class Tile:
    """One tile of a slide.

    ``x``/``y`` are the tile's top-left corner in level-0 pixels (column, row), whatever ``level``
    it was read from; ``width``/``height`` are the size of ``image`` in pixels of ``level``
    (smaller than the tile size only at the right and bottom edges of the slide).
    """

    x: int
    y: int
    level: int
    width: int
    height: int
    image: Image.Image

    def __post_init__(self) -> None:
        if self.x < 0 or self.y < 0:
            raise ValueError(f"tile origin must be non-negative, got ({self.x}, {self.y})")
        if self.level < 0:
            raise ValueError(f"tile level must be non-negative, got {self.level}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"tile size must be positive, got {self.width}x{self.height}")
        if self.image.size != (self.width, self.height):
            raise ValueError(f"tile image is {self.image.size}, expected {(self.width, self.height)}")


def tissue_fraction(image: Image.Image) -> float:
    """Share of pixels in ``image`` that look like stained tissue.

    Parameters
    ----------
    image : PIL.Image.Image
        Tile or region, any mode Pillow can convert to HSV via RGB.

    Returns
    -------
    float
        Fraction in [0, 1] of pixels with saturation >= :data:`TISSUE_MIN_SATURATION` and
        value >= :data:`TISSUE_MIN_VALUE` (HSV, 0-255 scale).
    """
    hsv = np.asarray(_to_rgb(image).convert("HSV"))
    if hsv.size == 0:
        return 0.0
    mask = (hsv[..., 1] >= TISSUE_MIN_SATURATION) & (hsv[..., 2] >= TISSUE_MIN_VALUE)
    return float(mask.mean())


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas are outside the scanned region: show them as glass (white).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class WholeSlide(ABC):
    """An opened whole-slide image; use :func:`open_slide` to get one.

    Subclasses provide the pyramid geometry and a region reader; tiling, thumbnails and tissue
    detection are shared here. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._closed = False

    # -- what a format must provide -------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, level 0 (full resolution) first."""

    @property
    @abstractmethod
    def mpp(self) -> float | None:
        """Microns per pixel at level 0 (mean of x and y), or ``None`` if the file lacks it."""

    @property
    @abstractmethod
    def reference(self) -> dict[str, str]:
        """Identifiers for logs: file name and, for DICOM, Study/Series/SOP Instance UIDs."""

    @abstractmethod
    def _read(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        """Read a region given in pixels *of ``level``*, fully inside the level."""

    @abstractmethod
    def _thumbnail(self, max_side: int) -> Image.Image:
        """A thumbnail no larger than ``max_side`` on either side."""

    @abstractmethod
    def _close(self) -> None:
        """Release file handles."""

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The file or folder the slide was opened from."""
        return self._path

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""
        width0, height0 = self.dimensions
        return tuple((width0 / w + height0 / h) / 2.0 for w, h in self.level_dimensions)

    @property
    def source_dataset(self) -> pydicom.Dataset | None:
        """The level-0 VOLUME instance's header (DICOM slides only; ``None`` otherwise)."""
        return None

    def thumbnail(self, max_side: int = 1024) -> Image.Image:
        """Return an RGB overview of the whole slide for routing.

        Parameters
        ----------
        max_side : int, default 1024
            Upper bound for the thumbnail's width and height; the aspect ratio is kept.

        Returns
        -------
        PIL.Image.Image
            RGB image whose longer side is at most ``max_side``.

        Raises
        ------
        ValueError
            If ``max_side`` is not positive.
        WholeSlideError
            If the slide's pixels cannot be read.
        """
        if not isinstance(max_side, int) or max_side <= 0:
            raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
        self._check_open()
        try:
            image = _to_rgb(self._thumbnail(max_side))
        except WholeSlideError:
            raise
        except Exception as exc:
            raise WholeSlideError(f"{self._path.name}: cannot read thumbnail: {type(exc).__name__}: {exc}") from exc
        if max(image.size) > max_side:
            image = image.copy()
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return image

    def tiles(
        self,
        tile_size: int = 224,
        level: int = 0,
        stride: int | None = None,
        max_tiles: int | None = None,
        tissue_only: bool = True,
        *,
        min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
    ) -> Iterator[Tile]:
        """Iterate over tiles of one pyramid level, row by row.

        Parameters
        ----------
        tile_size : int, default 224
            Tile width and height in pixels of ``level``. Tiles at the right and bottom edges
            are cut to the slide and may be smaller.
        level : int, default 0
            Pyramid level index (0 = full resolution).
        stride : int, optional
            Step between tile origins in pixels of ``level``; defaults to ``tile_size``
            (no overlap).
        max_tiles : int, optional
            Stop after yielding this many tiles.
        tissue_only : bool, default True
            Skip tiles whose :func:`tissue_fraction` is below ``min_tissue_fraction``.
        min_tissue_fraction : float, default 0.1
            Threshold for ``tissue_only``, in [0, 1].

        Yields
        ------
        Tile
            RGB tile with its level-0 origin.

        Raises
        ------
        ValueError
            For a non-positive size or stride, a level out of range, or a bad threshold.
        WholeSlideError
            If a region cannot be read.
        """
        stride = tile_size if stride is None else stride
        for name, value in (("tile_size", tile_size), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(level, int) or not 0 <= level < self.level_count:
            raise ValueError(f"level must be in [0, {self.level_count - 1}], got {level!r}")
        if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles < 0):
            raise ValueError(f"max_tiles must be a non-negative integer or None, got {max_tiles!r}")
        if not 0.0 <= min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}")
        self._check_open()
        return self._iter_tiles(tile_size, level, stride, max_tiles, tissue_only, min_tissue_fraction)

    def _iter_tiles(self, tile_size: int, level: int, stride: int, max_tiles: int | None,
                    tissue_only: bool, min_fraction: float) -> Iterator[Tile]:
        level_width, level_height = self.level_dimensions[level]
        downsample = self.level_downsamples[level]
        yielded = skipped = 0
        for y in range(0, level_height, stride):
            for x in range(0, level_width, stride):
                if max_tiles is not None and yielded >= max_tiles:
                    logger.debug("%s: stopped at max_tiles=%d", self._path.name, max_tiles)
                    return
                width, height = min(tile_size, level_width - x), min(tile_size, level_height - y)
                image = self._read_checked(level, x, y, width, height)
                if tissue_only and tissue_fraction(image) < min_fraction:
                    skipped += 1
                    continue
                yielded += 1
                yield Tile(x=round(x * downsample), y=round(y * downsample), level=level,
                           width=width, height=height, image=image)
        logger.debug("%s: level %d gave %d tiles, skipped %d as background",
                     self._path.name, level, yielded, skipped)

    def _level_file(self, level: int) -> str:
        """Name of the file holding ``level``, for error messages."""
        return self._path.name

    def _read_checked(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        try:
            image = _to_rgb(self._read(level, x, y, width, height))
        except Exception as exc:
            raise WholeSlideError(
                f"{self._level_file(level)}: cannot read level {level} region at ({x}, {y}) size "
                f"{width}x{height}: {type(exc).__name__}: {exc}") from exc
        if image.size != (width, height):
            raise WholeSlideError(f"{self._level_file(level)}: level {level} region at ({x}, {y}) came "
                                  f"back {image.size}, expected {(width, height)}")
        return image

    def _probe(self) -> None:
        """Decode the last pixel of every level (usually its last tile in the file), so that
        truncated or corrupt files fail at open time rather than mid-way through tiling."""
        for level, (width, height) in enumerate(self.level_dimensions):
            if width <= 0 or height <= 0:
                raise WholeSlideError(f"{self._level_file(level)}: level {level} has no pixels ({width}x{height})")
            self._read_checked(level, width - 1, height - 1, 1, 1)

    def _check_open(self) -> None:
        if self._closed:
            raise WholeSlideError(f"{self._path.name}: slide is closed")

    def close(self) -> None:
        """Release the underlying file handles; further reads raise :class:`WholeSlideError`."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> WholeSlide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path.name!r}, dimensions={self.dimensions}, levels={self.level_count})"


class TiffWholeSlide(WholeSlide):
    """A pyramidal TIFF/SVS slide read with ``tiffslide``."""

    def __init__(self, path: Path, slide: Any) -> None:
        super().__init__(path)
        self._slide = slide
        axes = slide.properties.get("tiffslide.series-axes")
        if axes not in ("YXS", "CYX", "YX"):
            raise WholeSlideError(f"{path.name}: unsupported TIFF image axes {axes!r}")
        self._levels = tuple((int(w), int(h)) for w, h in slide.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._levels

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def mpp(self) -> float | None:
        mpp_x = self._slide.properties.get("tiffslide.mpp-x")
        mpp_y = self._slide.properties.get("tiffslide.mpp-y")
        values = [float(v) for v in (mpp_x, mpp_y) if v]
        return sum(values) / len(values) if values else None

    @property
    def reference(self) -> dict[str, str]:
        return {"file": self._path.name, "format": "tiff"}

    def _probe(self) -> None:
        # tifffile reads tiles past the end of a truncated file as zeros without complaint, so
        # check that every level's tile byte ranges lie inside the file before decoding any.
        tiff = self._slide.ts_tifffile
        file_size = tiff.filehandle.size
        series = tiff.series[self._slide.properties["tiffslide.series-index"]]
        for index, level in enumerate(series.levels):
            page = level.keyframe
            ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts)]
            if ends and max(ends) > file_size:
                raise WholeSlideError(f"{self._path.name}: truncated: level {index} tile data ends at byte "
                                      f"{max(ends)} but the file has {file_size} bytes")
        super()._probe()

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        # tiffslide takes the location in level-0 pixels and maps it back with int(base / ds);
        # pick the level-0 value that maps back to exactly (x, y), so non-integer downsamples
        # (common in SVS) cannot shift the tile grid by a pixel.
        downsample = float(self._slide.level_downsamples[level])
        location = (_level0_coordinate(x, downsample), _level0_coordinate(y, downsample))
        array = np.asarray(self._slide.read_region(location, level, (width, height), as_array=True))
        if array.dtype != np.uint8:
            raise WholeSlideError(f"{self._path.name}: {array.dtype} samples are not supported")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        return Image.fromarray(np.ascontiguousarray(array))

    def _thumbnail(self, max_side: int) -> Image.Image:
        return self._slide.get_thumbnail((max_side, max_side))

    def _close(self) -> None:
        self._slide.close()


def _level0_coordinate(value: int, downsample: float) -> int:
    """The level-0 coordinate that tiffslide maps (``int(base / downsample)``) back to ``value``."""
    base = round(value * downsample)
    while int(base / downsample) < value:
        base += 1
    while base > 0 and int(base / downsample) > value:
        base -= 1
    return base


class DicomWholeSlide(WholeSlide):
    """A DICOM VL Whole Slide Microscopy Image read with ``wsidicom``."""

    def __init__(self, path: Path, wsi: Any, base_file: Path, level_files: list[str]) -> None:
        super().__init__(path)
        self._wsi = wsi
        self._pyramid = wsi.levels
        self._levels = tuple((int(lvl.size.width), int(lvl.size.height)) for lvl in self._pyramid.levels)
        self._base_file = base_file
        self._level_files = {level: files for level, files in enumerate(level_files)}
        try:
            self._source = pydicom.dcmread(base_file, stop_before_pixels=True)
        except Exception as exc:
            raise WholeSlideError(f"{base_file.name}: cannot read level-0 header: {exc}") from exc

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._levels

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        # wsidicom levels are dyadic: pyramid number n means a downsample of exactly 2**n, which
        # is also how it maps coordinates (level sizes may round, e.g. 1001 -> 500).
        return tuple(2.0 ** lvl.level for lvl in self._pyramid.levels)

    @property
    def mpp(self) -> float | None:
        try:
            mpp = self._pyramid.base_level.mpp
        except Exception:  # wsidicom raises when Pixel Spacing is absent
            return None
        if mpp is None:
            return None
        return (float(mpp.width) + float(mpp.height)) / 2.0

    @property
    def reference(self) -> dict[str, str]:
        return {
            "file": self._base_file.name,
            "format": "dicom",
            "StudyInstanceUID": str(self._source.StudyInstanceUID),
            "SeriesInstanceUID": str(self._source.SeriesInstanceUID),
            "SOPInstanceUID": str(self._source.SOPInstanceUID),
        }

    @property
    def source_dataset(self) -> pydicom.Dataset:
        """Header (no pixel data) of the level-0 VOLUME instance, to reference in annotations."""
        return self._source

    def _level_file(self, level: int) -> str:
        return self._level_files.get(level) or self._path.name

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        # wsidicom addresses levels by their pyramid number (log2 of the downsample), not by
        # list position, and takes the location in pixels of that level.
        pyramid_level = self._pyramid.levels[level].level
        return self._wsi.read_region((x, y), pyramid_level, (width, height))

    def _thumbnail(self, max_side: int) -> Image.Image:
        return self._wsi.read_thumbnail((max_side, max_side))

    def _close(self) -> None:
        self._wsi.close()


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """The few header attributes we route on, or ``None`` for a file that is not DICOM."""
    try:
        if not is_dicom(path):
            return None
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    except Exception:  # a header pydicom cannot parse at all: not a DICOM file we can use
        return None


def _wsi_files(folder: Path, series_uid: str | None = None) -> dict[Path, pydicom.Dataset]:
    """WSI instances in ``folder`` (optionally of one series), keyed by path."""
    found: dict[Path, pydicom.Dataset] = {}
    for candidate in sorted(folder.iterdir()):
        if not candidate.is_file():
            continue
        header = _dicom_header(candidate)
        if header is None or str(header.get("SOPClassUID", "")) != WSI_SOP_CLASS_UID:
            continue
        if series_uid is not None and str(header.get("SeriesInstanceUID", "")) != series_uid:
            continue
        found[candidate] = header
    return found


def _open_dicom(path: Path, files: dict[Path, pydicom.Dataset]) -> DicomWholeSlide:
    from wsidicom import WsiDicom

    try:
        wsi = WsiDicom.open(list(files))
    except Exception as exc:
        raise WholeSlideError(f"{path.name}: cannot open DICOM whole slide: {type(exc).__name__}: {exc}") from exc
    try:
        name_by_uid = {str(h.get("SOPInstanceUID", "")): p.name for p, h in files.items()}
        level_files = [", ".join(sorted(name_by_uid.get(str(ds.SOPInstanceUID), "?") for ds in level.datasets))
                       for level in wsi.levels.levels]
        base_uid = str(wsi.levels.base_level.datasets[0].SOPInstanceUID)
        base_file = next(p for p, h in files.items() if str(h.get("SOPInstanceUID", "")) == base_uid)
        slide = DicomWholeSlide(path, wsi, base_file, level_files)
        slide._probe()
    except WholeSlideError:
        wsi.close()
        raise
    except Exception as exc:
        wsi.close()
        raise WholeSlideError(f"{path.name}: invalid DICOM whole slide: {type(exc).__name__}: {exc}") from exc
    logger.info("opened DICOM slide %s: %d levels, level 0 %dx%d, SOP Instance %s",
                path.name, slide.level_count, *slide.dimensions, base_uid)
    return slide


def _open_tiff(path: Path) -> TiffWholeSlide:
    import tiffslide

    try:
        handle = tiffslide.TiffSlide(path)
    except Exception as exc:
        raise WholeSlideError(f"{path.name}: not a DICOM whole slide or a readable TIFF/SVS file: "
                              f"{type(exc).__name__}: {exc}") from exc
    try:
        slide = TiffWholeSlide(path, handle)
        slide._probe()
    except WholeSlideError:
        handle.close()
        raise
    except Exception as exc:
        handle.close()
        raise WholeSlideError(f"{path.name}: corrupt or unsupported TIFF/SVS: {type(exc).__name__}: {exc}") from exc
    logger.info("opened TIFF slide %s: %d levels, level 0 %dx%d", path.name, slide.level_count, *slide.dimensions)
    return slide


def open_slide(path: str | Path) -> WholeSlide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : str or pathlib.Path
        One of: a folder holding the DICOM instances of one VL Whole Slide Microscopy Image;
        one instance file of such a slide (the instances of the same series in its folder are
        used); or a pyramidal TIFF/SVS file.

    Returns
    -------
    WholeSlide
        The opened slide; close it (or use it as a context manager) when done.

    Raises
    ------
    WholeSlideError
        If the path does not exist, is DICOM but not a whole slide, or is corrupt or of an
        unsupported format. The message names the file.
    """
    path = Path(path)
    if path.is_dir():
        files = _wsi_files(path)
        if not files:
            raise WholeSlideError(f"{path.name}: folder holds no DICOM VL Whole Slide Microscopy instances")
        return _open_dicom(path, files)
    if not path.is_file():
        raise WholeSlideError(f"{path.name}: no such file or folder")
    header = _dicom_header(path)
    if header is not None:
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class != WSI_SOP_CLASS_UID:
            raise WholeSlideError(f"{path.name}: DICOM SOP Class {sop_class or '(missing)'} is not "
                                  f"VL Whole Slide Microscopy Image ({WSI_SOP_CLASS_UID})")
        series_uid = str(header.get("SeriesInstanceUID", ""))
        files = _wsi_files(path.parent, series_uid) or {path: header}
        return _open_dicom(path, files)
    return _open_tiff(path)


def is_whole_slide(path: str | Path) -> bool:
    """Tell whether ``path`` is a whole-slide image :func:`open_slide` should be used for.

    Parameters
    ----------
    path : str or pathlib.Path
        A file, or a folder of DICOM files.

    Returns
    -------
    bool
        True for a DICOM file (or a folder holding one) of SOP Class VL Whole Slide Microscopy
        Image (1.2.840.10008.5.1.4.1.1.77.1.6), or a TIFF/SVS file that ``tiffslide`` opens with
        more than one pyramid level. False otherwise, including unreadable files.
    """
    path = Path(path)
    if path.is_dir():
        return any(
            (header := _dicom_header(p)) is not None and str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS_UID
            for p in path.iterdir() if p.is_file()
        )
    if not path.is_file():
        return False
    header = _dicom_header(path)
    if header is not None:
        return str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS_UID
    import tiffslide

    try:
        with tiffslide.TiffSlide(path) as slide:
            return slide.level_count > 1
    except Exception:  # not a TIFF, or one tiffslide cannot parse: not a slide for us
        return False
