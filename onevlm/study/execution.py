"""Route → execute for a study: each routed series' card runs its task on the series' routed image.

The specialty model answers about the image the router chose for the series (its middle image,
the middle frame of a multi-frame object). Boxes come back in normalised coordinates and are
placed on that image's pixel grid here, ready for the SR, SEG and bulk annotations.

A whole slide is too large to be one patch: a patch classification or grading task runs on up to
:data:`SLIDE_TILES` tissue tiles of level 0 (:data:`SLIDE_TILE_SIZE` pixels, background skipped),
each tile's answer becomes a labelled rectangle (bulk annotations and SR regions), and the
slide's result is the most frequent class with the counts. Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace

from onevlm.cards.repository import CardRepository
from onevlm.imaging.dicom_to_image import load_image
from onevlm.reports.boxes import ImageBox
from onevlm.specialty.execution import EXECUTED, FAILED, SpecialtyModel, SpecialtyResult, not_executable
from onevlm.study.preparation import is_whole_slide_series
from onevlm.study.routing import SeriesRouting, StudyRouting

logger = logging.getLogger(__name__)

#: Tissue tiles (level 0, pixels) a whole slide's patch task runs on.
SLIDE_TILES = 16
SLIDE_TILE_SIZE = 224
#: Task kinds that run tile by tile on a whole slide.
SLIDE_TASK_KINDS = ("classification", "grading")


@dataclass(frozen=True)
class StudyExecution:
    """Per series UID: the specialty results of its routed card(s), and their boxes on the routed image.

    A series routed to one card has one result; one routed to a set has one per card of the set,
    in the set's order.
    """

    results: dict[str, tuple[SpecialtyResult, ...]] = field(default_factory=dict)
    boxes: dict[str, tuple[ImageBox, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutedStudy:
    """A routed study with its specialty results: what the combined app hands to the results writer."""

    routing: StudyRouting
    execution: StudyExecution


def image_boxes(result: SpecialtyResult, routed: SeriesRouting) -> tuple[ImageBox, ...]:
    """The result's normalised boxes in pixel coordinates of the routed image (its frame if multi-frame)."""
    header = routed.routed.header if routed.routed is not None else None
    if not result.boxes or header is None or not header.rows or not header.columns:
        return ()
    frames = int(header.number_of_frames or 1)
    frame = frames // 2 + 1 if frames > 1 else None  # the frame the image was taken from (dicom_to_image)
    return tuple(ImageBox(x0=b.x0 * header.columns, y0=b.y0 * header.rows, x1=b.x1 * header.columns,
                          y1=b.y1 * header.rows, label=name, frame=frame)
                 for b, name in zip(result.boxes, result.box_labels))


def execute_study(model: SpecialtyModel, routing: StudyRouting, cards: CardRepository) -> StudyExecution:
    """Run every routed series' card(s) on the specialty model.

    A series routed to one card runs it; a series routed to a set runs each card of the set. A
    series sent to review, stopped or failed gets no result; a card the deployment cannot run
    gets a ``not-executable`` result with the reason; an image that cannot be decoded gets a
    ``failed`` one. The other series and cards go on.
    """
    results: dict[str, dict[str, SpecialtyResult]] = {}
    boxes: dict[str, list[ImageBox]] = {}
    requests = []
    for entry in routing.series:
        decision = entry.decision
        if decision is None or decision.error is not None or not decision.cards or entry.routed is None:
            continue
        uid = entry.series.series_instance_uid
        series_results = results.setdefault(uid, {})
        image = None
        for card_id in decision.cards:
            try:
                card = cards.get(card_id)
            except KeyError:
                series_results[card_id] = not_executable(card_id, "the card is not in this deployment's card set")
                continue
            task = model.resolve(card)
            if isinstance(task, str):
                series_results[card_id] = not_executable(card.id, task)
                continue
            if is_whole_slide_series(entry.series):
                series_results[card_id], tile_boxes = _run_slide(model, card, task, entry)
                boxes.setdefault(uid, []).extend(tile_boxes)
                continue
            if image is None:
                try:
                    image = load_image(entry.routed)
                except Exception as exc:
                    message = f"{entry.routed.path.name}: {exc}"
                    logger.error("series %s: image for %s: %s", uid, card.id, message)
                    series_results[card_id] = SpecialtyResult(card_id=card.id, status=FAILED, reason=message)
                    continue
            series_results[card_id] = None  # placeholder: keeps the set's order
            requests.append((uid, card, image))
    for (uid, card, _), result in zip(requests, model.execute_many([(c, i) for _, c, i in requests])):
        results[uid][card.id] = result
    by_uid = {entry.series.series_instance_uid: entry for entry in routing.series}
    ordered = {uid: tuple(r for r in per_card.values() if r is not None) for uid, per_card in results.items()}
    for uid, series_results in ordered.items():
        for result in series_results:
            boxes.setdefault(uid, []).extend(image_boxes(result, by_uid[uid]))
            logger.info("series %s: %s", uid, result.summary())
    return StudyExecution(ordered, {uid: tuple(b) for uid, b in boxes.items() if b})


def _run_slide(model: SpecialtyModel, card, task, entry: SeriesRouting) -> tuple[SpecialtyResult, tuple[ImageBox, ...]]:
    """A patch task over a slide's tissue tiles: the most frequent answer, and one labelled box per tile."""
    from onevlm.imaging.wsi import open_slide

    if task.kind not in SLIDE_TASK_KINDS:
        return not_executable(card.id, f"a whole slide runs patch classification or grading tasks only, "
                                       f"and {task.name!r} is a {task.kind} task"), ()
    try:
        with open_slide(entry.routed.path) as slide:
            tiles = list(slide.tiles(SLIDE_TILE_SIZE, level=0, max_tiles=SLIDE_TILES))
    except Exception as exc:
        message = f"{entry.routed.path.name}: cannot read tiles: {exc}"
        logger.error("series %s: %s", entry.series.series_instance_uid, message)
        return SpecialtyResult(card_id=card.id, status=FAILED, reason=message), ()
    if not tiles:
        return not_executable(card.id, "the slide shows no tissue tile to classify"), ()
    answers = model.execute_many([(card, tile.image) for tile in tiles])
    counts = Counter(a.labels[0] if a.executed else a.status for a in answers)
    executed = [a for a in answers if a.executed]
    boxes = tuple(ImageBox(x0=t.x, y0=t.y, x1=t.x + t.width, y1=t.y + t.height, label=a.labels[0])
                  for t, a in zip(tiles, answers) if a.executed)
    if not executed:
        first = answers[0]
        return replace(first, reason=f"no tile answer could be used ({first.reason})", tile_counts=dict(counts)), ()
    top = Counter(a.labels[0] for a in executed).most_common(1)[0][0]
    example = next(a for a in executed if a.labels[0] == top)
    answer = "; ".join(f"{name}: {n} tile(s)" for name, n in counts.most_common())
    result = replace(example, status=EXECUTED, answer=answer, tile_counts=dict(counts),
                     seconds=sum(a.seconds or 0.0 for a in answers))
    return result, boxes
