"""Turn each series into the input the router sees: its representative image, decoded if needed.

Non-image series (SR, RT plan, ECG…) are recognised and skipped. When the backend looks at
pixels, the representative image is decoded here, once, so a series whose pixels cannot be
decoded (or whose pixel data was cut short) gets an error naming the file while the rest of the
study goes on. Whole-slide series
are shown to the router as a thumbnail of the slide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

from onevlm.imaging.dicom_to_image import load_image
from onevlm.imaging.series import InputProblem, SeriesGroup
from onevlm.inputs.routing_input import RoutingInput

logger = logging.getLogger(__name__)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
THUMBNAIL_SIDE = 1024


@dataclass(frozen=True)
class PreparedSeries:
    """A series with the input to route (``item``), or why it is skipped or failed."""

    series: SeriesGroup
    item: RoutingInput | None = None
    skipped: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class PreparedStudy:
    """Prepared series plus the files of the study that could not be read at all."""

    series: tuple[PreparedSeries, ...]
    problems: tuple[InputProblem, ...] = ()


def is_whole_slide_series(series: SeriesGroup) -> bool:
    return any(m.header.sop_class_uid == WSI_SOP_CLASS for m in series.members)


def slide_input(series: SeriesGroup) -> RoutingInput:
    """The slide's level-0 instance, carrying a thumbnail of the whole slide as its image."""
    from onevlm.imaging.wsi import open_slide

    level0 = max(series.images, key=lambda m: (m.header.rows or 0) * (m.header.columns or 0))
    with open_slide(level0.path) as slide:
        thumbnail = slide.thumbnail(max_side=THUMBNAIL_SIDE)
    return replace(level0, image=thumbnail)


def prepare_series(groups: Sequence[SeriesGroup], decode_pixels: bool) -> list[PreparedSeries]:
    """Prepare every series; ``decode_pixels`` when the router's backend reads the image.

    A series with an instance whose Pixel Data is cut short (see
    :attr:`~onevlm.dicom.header.DicomHeader.pixel_data_problem`) gets that error, naming the file.
    """
    prepared = []
    for series in groups:
        kind = series.non_image_kind
        if kind is not None:
            logger.info("series %s skipped: %s (%d instance(s))", series.series_instance_uid, kind, len(series.members))
            prepared.append(PreparedSeries(series, skipped=f"not an image: {kind}"))
            continue
        damaged = [m for m in series.members if m.header.pixel_data_problem]
        if damaged:
            # An instance cut short in transfer: the series is incomplete, whichever image routes it.
            more = f" (and {len(damaged) - 1} more file(s) of the series)" if len(damaged) > 1 else ""
            message = f"{damaged[0].path.name}: {damaged[0].header.pixel_data_problem}{more}"
            logger.error("series %s: %s", series.series_instance_uid, message)
            prepared.append(PreparedSeries(series, item=damaged[0], error=message))
            continue
        try:
            if is_whole_slide_series(series):
                item = slide_input(series)
            else:
                item = series.representative()
                if decode_pixels:
                    item = replace(item, image=load_image(item))
        except Exception as exc:
            message = f"{series.representative().path.name}: {exc}"
            logger.error("series %s: %s", series.series_instance_uid, message)
            prepared.append(PreparedSeries(series, item=series.representative(), error=message))
            continue
        prepared.append(PreparedSeries(series, item=item))
    return prepared
