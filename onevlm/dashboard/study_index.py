"""What the pipeline decided for each group, read from its results folder for the pages, a bounded number cached.

The service writes ``results/<group>/`` atomically (``metadata.json`` last, after
``series.json`` and ``decisions.jsonl``): a group is read again only when its ``metadata.json``
changed, so the page stays cheap while the service processes. The pages show recent groups (and
whichever one a person opens): the cache keeps the :data:`CACHE_GROUPS` most recently read, so a
service running for a year holds no more than a few pages' worth. Counts over *every* result
(``/status``, ``/metrics``) come from the journal's series figures, written with each result, not
from here. The hybrid router's figures (VLM calls, header/image disagreements) are read from the
decision records, with ``series.json``'s keys as a fallback; records written before they existed
count as unknown. Research use only.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from onevlm.reports.routing_metadata import DECISIONS_FILE, DETAIL_FILE, METADATA_FILE
from onevlm.reports.series_figures import SeriesFigures

logger = logging.getLogger(__name__)

#: Outcomes a reviewer is asked about (a routed single card can be reviewed from its decision page).
REVIEW_OUTCOMES = ("review", "routed-set")
#: Journal cursor: 1 once the results folders written before the journal kept series figures were counted.
BACKFILL_CURSOR = "series_figures_backfilled"
#: How many parsed groups the index keeps (least recently read go first): above the pages' longest list.
CACHE_GROUPS = 1024


@dataclass(frozen=True)
class SeriesCase:
    """One routed series: its outcome and the decision record behind it.

    ``candidates`` are the cards a reviewer is offered first: the routed cards, then stage 3's
    ranked answers (without ``None``). ``instance_path`` is the spool file of the routed instance.
    ``vlm_calls`` is the series' VLM calls over all stages (``None``: a record from before the
    count existed); ``disagreement`` says in words where header and image contradict each other.
    """

    group_key: str
    study_instance_uid: str
    series_instance_uid: str
    dicom_modality: str
    outcome: str
    cards: tuple[str, ...]
    confidence: float | None
    calibrated: bool
    modality: str | None
    finding: str | None
    reasons: tuple[str, ...]
    candidates: tuple[str, ...]
    executions: tuple[Mapping[str, Any], ...]
    instance_path: Path | None
    decision: Mapping[str, Any] | None
    error: str | None
    vlm_calls: int | None = None
    disagreement: str | None = None

    @property
    def decided(self) -> bool:
        """Whether the router reached a decision (a record without an error)."""
        return self.decision is not None and not self.decision.get("error") and not self.error

    def figures(self) -> SeriesFigures:
        """What the journal counts of this series (for results written before the journal kept them)."""
        error = self.error or (self.decision or {}).get("error")
        return SeriesFigures(self.series_instance_uid, self.outcome, self.confidence, self.calibrated,
                             self.vlm_calls, bool(self.disagreement), self.decided, str(error) if error else None)


@dataclass(frozen=True)
class GroupResult:
    """A processed group: the study-level outcome (``metadata.json``) and its series."""

    group_key: str
    outcome: str
    cards: tuple[str, ...]
    confidence: float | None
    calibrated: bool
    calibration_id: str | None
    series: tuple[SeriesCase, ...]
    written_at: float

    @property
    def disagreements(self) -> int:
        """Series whose header and image disagree."""
        return sum(1 for case in self.series if case.disagreement)

    @property
    def vlm_calls(self) -> int | None:
        """VLM calls over the group's series (``None`` when no series' record counts them)."""
        known = [case.vlm_calls for case in self.series if case.vlm_calls is not None]
        return sum(known) if known else None


def _candidates(decision: Mapping[str, Any] | None, cards: tuple[str, ...]) -> tuple[str, ...]:
    ranked = list(cards)
    for stage in (decision or {}).get("stages") or []:
        if stage.get("stage") == 3:
            probs = stage.get("distribution") or {c["answer"]: c["p"] for c in stage.get("candidates") or []}
            ranked += [a for a, _ in sorted(probs.items(), key=lambda item: -item[1])]
    return tuple(dict.fromkeys(a for a in ranked if a and a not in ("None", "Other")))


def _vlm_calls(decision: Mapping[str, Any] | None, entry: Mapping[str, Any]) -> int | None:
    value = (decision or {}).get("vlm_calls", entry.get("vlm_calls"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _disagreement(decision: Mapping[str, Any] | None, entry: Mapping[str, Any]) -> str | None:
    record = decision or {}
    for text in (record.get("disagreement"), (record.get("route") or {}).get("disagreement"),
                 entry.get("disagreement")):
        if isinstance(text, str) and text.strip():
            return text
    return None


def read_group(folder: Path, incoming: Path) -> GroupResult:
    """Parse one results folder (``metadata.json``, ``series.json``, ``decisions.jsonl``).

    Raises
    ------
    OSError, ValueError
        If a file is missing or not JSON.
    """
    metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    detail = json.loads((folder / DETAIL_FILE).read_text(encoding="utf-8"))
    decisions: dict[str, dict] = {}
    log = folder / DECISIONS_FILE
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                uid = (record.get("reference") or {}).get("series_instance_uid")
                if uid:
                    decisions[uid] = record
    series = []
    for entry in detail.get("entries") or []:
        decision = decisions.get(entry["series_instance_uid"])
        cards = tuple(entry.get("cards") or ())
        sop = entry.get("routed_sop_instance_uid")
        series.append(SeriesCase(
            group_key=folder.name,
            study_instance_uid=entry["study_instance_uid"],
            series_instance_uid=entry["series_instance_uid"],
            dicom_modality=entry.get("dicom_modality") or "",
            outcome=entry["outcome"],
            cards=cards,
            confidence=entry.get("confidence"),
            calibrated=bool(entry.get("calibrated")),
            modality=entry.get("modality"),
            finding=entry.get("finding"),
            reasons=tuple(entry.get("reasons") or ()),
            candidates=_candidates(decision, cards),
            executions=tuple(entry.get("executions") or ()),
            instance_path=(incoming / folder.name / f"{sop}.dcm") if sop else None,
            decision=decision,
            error=entry.get("error"),
            vlm_calls=_vlm_calls(decision, entry),
            disagreement=_disagreement(decision, entry),
        ))
    return GroupResult(
        group_key=folder.name,
        outcome=str(metadata.get("outcome", "")),
        cards=tuple(c for c in str(metadata.get("cards", "")).split(",") if c),
        confidence=metadata.get("confidence"),
        calibrated=bool(metadata.get("calibrated")),
        calibration_id=metadata.get("calibration_id"),
        series=tuple(series),
        written_at=(folder / METADATA_FILE).stat().st_mtime,
    )


class StudyIndex:
    """The groups' results under a spool, each parsed once per version of its ``metadata.json``.

    Thread-safe: the page's request threads share one index. At most ``cache_groups`` parsed
    groups are kept (the least recently read go first), and a group whose results folder is gone
    (retention forgot it) leaves the cache when it is next asked for.
    """

    def __init__(self, spool_dir: str | Path, cache_groups: int = CACHE_GROUPS) -> None:
        if cache_groups < 1:
            raise ValueError("cache_groups must be at least 1")
        self.results = Path(spool_dir) / "results"
        self.incoming = Path(spool_dir) / "incoming"
        self.cache_groups = cache_groups
        self._cache: OrderedDict[str, tuple[int, GroupResult]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many parsed groups are cached now."""
        with self._lock:
            return len(self._cache)

    def group(self, group_key: str) -> GroupResult | None:
        """The group's result, or ``None`` while it has none (not processed yet, forgotten, or unreadable)."""
        folder = self.results / group_key
        try:
            stamp = (folder / METADATA_FILE).stat().st_mtime_ns
        except OSError:
            with self._lock:
                self._cache.pop(group_key, None)
            return None
        with self._lock:
            cached = self._cache.get(group_key)
            if cached is not None and cached[0] == stamp:
                self._cache.move_to_end(group_key)
                return cached[1]
        try:
            result = read_group(folder, self.incoming)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("event=dashboard_unreadable_result group=%s error=%s", group_key, type(exc).__name__)
            return None
        with self._lock:
            self._cache[group_key] = (stamp, result)
            self._cache.move_to_end(group_key)
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        return result

    def group_keys(self) -> list[str]:
        """Every group with a results folder."""
        return sorted(p.name for p in self.results.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.results.is_dir() else []


def backfill_series_figures(journal, spool_dir: str | Path) -> int:
    """Give every results folder the journal has no series figures for its figures (once per journal).

    A journal migrated from before it kept them (schema version 4) counts nothing until then; the
    service runs this on start. Each folder is parsed once and not cached. Returns how many groups
    were filled; a journal cursor records that it ran.
    """
    if journal.cursor(BACKFILL_CURSOR):
        return 0
    index = StudyIndex(spool_dir, cache_groups=1)
    filled = 0
    for key in index.group_keys():
        if journal.has_series_figures(key):
            continue
        try:
            figures = [case.figures() for case in read_group(index.results / key, index.incoming).series]
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("event=series_figures_unreadable group=%s error=%s", key, type(exc).__name__)
            continue
        journal.record_series_figures(key, figures)
        filled += 1
    journal.set_cursor(BACKFILL_CURSOR, 1)
    if filled:
        logger.info("event=series_figures_backfilled groups=%d", filled)
    return filled
