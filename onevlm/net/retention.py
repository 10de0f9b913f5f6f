"""Retention: what the spool keeps of a finished group, for how long, and a cap on its size.

A group's life in the spool (times count from its results' last acknowledgement by a destination,
or its last change if later; ``retention:`` in the service configuration, :class:`RetentionConfig`):

``reduce``
    Once every result reached every destination (none pending, none given up on) or the group
    stopped without results: each series keeps its *routed* instance whole (what it was routed by,
    a SEG's source, the image of a reviewer's label) and every other instance becomes a
    *header-only copy*: the same header without Pixel Data, marked by a private element. Re-processing
    (an amendment: more instances, another series, a re-sent study) reads every header — the SR's
    evidence lists every instance of the series — and routes each series by the middle one of its
    whole images: an unchanged series has one, the routed instance, so its result is the same (same
    content digest: nothing is sent again); a grown series is routed by a whole image (the earlier
    routed one or a new one), never by a copy without pixels.
``expire`` (``results_days``)
    The instances and the DICOM result objects go; the decision records (``decisions.jsonl``,
    ``series.json``, ``metadata.json``) stay for the operator's page, the decision log and
    ``labels export``, as does the routed instance of a series a reviewer answered.
``compact`` (``journal_days``, once expired)
    The journal's per-instance rows go (the group keeps its first arrival); the per-group rows
    (status, outbox, result versions, reviews) stay.
``forget`` (``records_days``)
    The decision records and the group's rows go; reviews and result versions stay (tiny: the
    labels' history, and the identity an amendment of a very late instance continues from).

A failed group (the pipeline raised) is never reduced (its instances are what a re-run needs) and
expires ``results_days`` after it failed; a group with an export given up on is never touched.

Crash safety: each clean-up is planned in the journal (``cleanups``: group, action, time) in the
same transaction that re-checks the group is eligible, then files are removed one by one (each
removal or header-only replacement atomic: written under ``tmp/``, renamed over), then the intent is
closed together with the group's new stage. A file written after the plan (an instance arriving
meanwhile) is never removed by it. On start the service finishes every open intent before it
listens again; redoing one is harmless (a header-only copy is recognised, a missing file skipped).

Research use only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from onevlm.dicom.header import PRIVATE_CREATOR
from onevlm.net.config import RetentionConfig
from onevlm.net.journal import Journal
from onevlm.net.spool import Spool, folder_bytes, fsync_dir
from onevlm.reports.routing_metadata import DETAIL_FILE
from onevlm.study.outputs import ANNOTATION_FOLDER, SEG_FOLDER, SR_FOLDER

logger = logging.getLogger(__name__)

DAY = 86400.0
#: The private element marking a header-only copy: (0009,xx02) in the ``ONEVLM`` block (xx01 marks a
#: DICOMweb header copy whose pixels stayed on the server: read as an image, this is not). Retention's
#: own copies carry it as (7FE1,xx02) instead: the file cut just before its Pixel Data with the mark
#: appended (group 7FE1 follows the pixels, so nothing before them is re-encoded).
RETENTION_GROUP, RETENTION_ELEMENT = 0x0009, 0x02
TRAILING_GROUP = 0x7FE1
PIXELS_REMOVED = "pixel data removed by retention"
#: A file modified less than this before a clean-up was planned is left alone (file times lag the clock).
FRESH_MARGIN_SECONDS = 1.0
#: Tests only: seconds to pause after each file a clean-up removes (to kill the service mid-way).
TEST_DELAY_ENV = "ONEVLM_TEST_RETENTION_FILE_DELAY"
#: Journal cursor holding how many bytes the spool was over ``max_spool_bytes`` at the last run (0: under).
OVER_CAP_CURSOR = "retention_over_cap_bytes"
RESULT_OBJECT_FOLDERS = (SR_FOLDER, SEG_FOLDER, ANNOTATION_FOLDER)
_BULK_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float / Double Float / Pixel Data


@dataclass
class RetentionRun:
    """What one clean-up run did (counts and bytes only: UIDs go to the per-clean-up log lines)."""

    started_at: float
    seconds: float = 0.0
    resumed: int = 0
    reduced: int = 0
    expired: int = 0
    compacted: int = 0
    forgotten: int = 0
    expired_for_cap: int = 0
    quarantine_files: int = 0
    removed_files: int = 0
    freed_bytes: int = 0
    spool_bytes: int | None = None
    over_cap_bytes: int = 0
    held: dict = field(default_factory=dict)

    @property
    def did_something(self) -> bool:
        return bool(self.resumed or self.reduced or self.expired or self.compacted or self.forgotten
                    or self.quarantine_files or self.removed_files)


#: The pipeline's share of the time while it is busy: retention then works a quarter of the time at most.
BUSY_PAUSE_FACTOR = 3.0
#: The longest pause retention takes after one file while the pipeline is busy.
BUSY_PAUSE_MAX_SECONDS = 0.5
_PLAIN_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


def is_header_only(ds: pydicom.Dataset) -> bool:
    """Whether a dataset is a header-only copy (its Pixel Data removed: by retention or a DICOMweb header copy)."""
    for group in (RETENTION_GROUP, TRAILING_GROUP):
        try:
            value = ds.get_private_item(group, RETENTION_ELEMENT, PRIVATE_CREATOR).value
        except KeyError:
            continue
        if isinstance(value, bytes):  # implicit VR: an element no dictionary knows reads as raw bytes
            value = value.decode("ascii", "replace")
        if str(value).strip() == PIXELS_REMOVED:
            return True
    return False


@functools.lru_cache(maxsize=2)
def _mark(implicit_vr: bool) -> bytes:
    """The (7FE1,xx02) mark, encoded little endian in the file's VR encoding (two constants: built once each)."""
    mark = pydicom.Dataset()
    mark.private_block(TRAILING_GROUP, PRIVATE_CREATOR, create=True).add_new(RETENTION_ELEMENT, "LO", PIXELS_REMOVED)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
    write_dataset(buffer, mark)
    return buffer.getvalue()


def header_only_bytes(path: Path) -> bytes | None:
    """The header-only copy of a spool file, or ``None`` if it is one already.

    The file is parsed up to its Pixel Data (never read); where the dataset is little endian and
    not deflated (native and compressed transfer syntaxes alike) the copy is the file's own bytes
    up to there plus the retention mark, else :func:`header_only_copy` re-encodes it.

    Raises
    ------
    Exception
        Whatever pydicom raises on a file it cannot parse.
    """
    with open(path, "rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        if is_header_only(ds):
            return None
        end = handle.tell()  # pydicom stops at the bulk element's tag (or at the end of the file)
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is not None and syntax.is_little_endian and not syntax.is_deflated:
            handle.seek(0)
            return handle.read(end) + _mark(syntax.is_implicit_VR)
    buffer = DicomBytesIO()
    header_only_copy(ds).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def header_only_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` without its bulk pixel values, marked as retention's copy.

    The rest of the header (UIDs, position, orientation, Instance Number, patient and study
    modules) is kept: it is what grouping and an SR's evidence read. Without Pixel Data the header
    reader sees an object without an image, so a series is routed by one of its whole images.
    """
    for tag in _BULK_TAGS:
        if tag in ds:
            del ds[tag]
    ds.private_block(RETENTION_GROUP, PRIVATE_CREATOR, create=True).add_new(RETENTION_ELEMENT, "LO", PIXELS_REMOVED)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in _PLAIN_SYNTAXES:
        # No pixels left to be compressed (or deflated, or big endian): the header is written plainly.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def retention_status(journal: Journal) -> dict:
    """What the journal says of retention, the service running or not: totals, open clean-ups, the cap, what it holds."""
    return {
        "pending_cleanups": len(journal.pending_cleanups()),
        "removed_files_total": journal.counter("retention_removed_files"),
        "freed_bytes_total": journal.counter("retention_freed_bytes"),
        "over_cap_bytes_last_pass": journal.cursor(OVER_CAP_CURSOR),
        "held": journal.retention_held(),
    }


class Retention:
    """Runs the clean-ups of one spool (see the module's docstring).

    Parameters
    ----------
    config:
        The ``retention:`` section.
    spool, journal:
        The service's spool and journal.
    lock:
        Held around each clean-up that removes files: the service's pipeline lock, so no group is
        processed (its results rewritten, its instances read) while files go.
    busy:
        Whether the pipeline has work now (groups queued or processing). Clean-ups are background
        work: while it does, retention pauses after each file three times as long as the file took
        (at most :data:`BUSY_PAUSE_MAX_SECONDS`), so studies are processed first and the spool is
        still cleaned at a quarter of the pace.
    """

    def __init__(self, config: RetentionConfig, spool: Spool, journal: Journal,
                 lock: threading.Lock | None = None, busy: Callable[[], bool] | None = None) -> None:
        if not isinstance(config, RetentionConfig):
            raise TypeError("config must be a RetentionConfig")
        self.config = config
        self.spool = spool
        self.journal = journal
        self._lock = lock
        self._busy = busy
        self._delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        self.last_run: RetentionRun | None = None

    # -- the service's loop ---------------------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        """Clean up now, then every ``interval_seconds`` until ``stop`` is set; errors are logged, never fatal."""
        while not stop.is_set():
            try:
                self.run_once(stop=stop)
            except Exception:
                logger.exception("event=retention_error")
            if stop.wait(self.config.interval_seconds):
                return

    def status(self) -> dict:
        """The ``retention`` part of ``/status``."""
        run = self.last_run
        return {
            "enabled": self.config.enabled,
            **retention_status(self.journal),
            "max_spool_bytes": self.config.max_spool_bytes,
            "over_cap": bool(run and run.over_cap_bytes),
            "last_run": asdict(run) if run is not None else None,
        }

    # -- one run --------------------------------------------------------------------------------

    def finish_pending(self, run: RetentionRun | None = None) -> int:
        """Finish the clean-ups a crash interrupted (run on start, before the service receives again)."""
        pending = self.journal.pending_cleanups()
        for cleanup_id, group_key, action, reason, planned_at in pending:
            logger.info("event=retention_resume action=%s group=%s planned_at=%.3f", action, group_key, planned_at)
            with self._locked(action):
                files, freed = self._carry_out(cleanup_id, group_key, action, reason, planned_at)
            if run is not None:
                run.removed_files += files
                run.freed_bytes += freed
        return len(pending)

    def run_once(self, now: float | None = None, stop: threading.Event | None = None) -> RetentionRun:
        """One clean-up pass: pending ones, then reduce, expire, compact, forget, quarantine, the cap."""
        now = time.time() if now is None else now
        run = RetentionRun(started_at=now)
        started = time.monotonic()
        run.resumed = self.finish_pending(run)
        config = self.config
        if config.enabled:
            if config.instances_after_sent == "headers":
                run.reduced = self._each("reduce", now, run, stop)
            if config.results_days is not None:
                run.expired = self._each("expire", now - config.results_days * DAY, run, stop)
            if config.journal_days is not None:
                run.compacted = self._each("compact", now - config.journal_days * DAY, run, stop)
            if config.records_days is not None:
                run.forgotten = self._each("forget", now - config.records_days * DAY, run, stop)
            if config.quarantine_days is not None:
                self._quarantine(now - config.quarantine_days * DAY, run)
            if config.max_spool_bytes is not None:
                self._cap(run, stop)
        run.held = self.journal.retention_held()
        run.seconds = time.monotonic() - started
        self.last_run = run
        if run.did_something:
            logger.info("event=retention_run resumed=%d reduced=%d expired=%d expired_for_cap=%d compacted=%d "
                        "forgotten=%d quarantine_files=%d removed_files=%d freed_bytes=%d held_unsent=%d "
                        "seconds=%.2f", run.resumed, run.reduced, run.expired, run.expired_for_cap, run.compacted,
                        run.forgotten, run.quarantine_files, run.removed_files, run.freed_bytes,
                        run.held.get("unsent", 0), run.seconds)
        return run

    def _each(self, action: str, before: float, run: RetentionRun, stop: threading.Event | None,
              reason: str = "schedule", limit: int | None = None) -> int:
        """Apply ``action`` to every eligible group (``limit``: to at most that many); returns how many."""
        seen: set[str] = set()
        acted = 0
        while limit is None or acted < limit:
            fresh = [g for g in self.journal.retention_candidates(action, before) if g not in seen]
            if not fresh:
                break
            for group_key in fresh:
                if (stop is not None and stop.is_set()) or (limit is not None and acted >= limit):
                    return acted
                seen.add(group_key)
                began = time.monotonic()
                with self._locked(action):
                    planned_at = time.time()
                    cleanup_id = self.journal.plan_cleanup(group_key, action, reason, before, planned_at)
                    if cleanup_id is None:  # changed since it was listed (an instance arrived…)
                        continue
                    files, freed = self._carry_out(cleanup_id, group_key, action, reason, planned_at)
                acted += 1
                run.removed_files += files
                run.freed_bytes += freed
                if action != "reduce":  # a reduction gave way after each of its files
                    self._give_way(began)
        return acted

    def _locked(self, action: str):
        # Removing files takes the pipeline's turn. Reducing does not: each copy replaces its file atomically
        # with the same header and the routed instance is never reduced, so a group processed meanwhile reads
        # what it would have read either way (a long study does not hold the pipeline back).
        return self._lock if self._lock is not None and action != "reduce" else nullcontext()

    def _carry_out(self, cleanup_id: int, group_key: str, action: str, reason: str,
                   planned_at: float) -> tuple[int, int]:
        """Do a planned clean-up's file work (idempotent) and close it; returns (files, bytes)."""
        keep: Iterable[str] = ()
        complete = True
        if action == "reduce":
            files, freed, complete = self._reduce(group_key, planned_at)
        elif action == "expire":
            files, freed = self._remove_group_files(group_key, planned_at, records_too=False)
        elif action == "forget":
            files, freed = self._remove_group_files(group_key, planned_at, records_too=True)
        elif action == "compact":
            files, freed = 0, 0
            keep = [p.stem for p in self.spool.group_folder(group_key).glob("*.dcm")]
        else:
            raise ValueError(f"unknown clean-up action {action!r}")
        # a file too fresh to touch: the group stays a candidate and the next pass finishes it
        self.journal.finish_cleanup(cleanup_id, group_key, action, planned_at, files, freed, keep,
                                    record_stage=complete)
        logger.info("event=retention_cleanup action=%s group=%s reason=%s files=%d freed_bytes=%d", action,
                    group_key, reason, files, freed)
        return files, freed

    # -- the file work --------------------------------------------------------------------------

    def _routed_sops(self, group_key: str, series: set[str] | None = None) -> set[str] | None:
        """The routed instance of each series (of ``series`` only, if given); ``None``: no readable record."""
        try:
            detail = json.loads((self.spool.result_folder(group_key) / DETAIL_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return {str(entry["routed_sop_instance_uid"]) for entry in detail.get("entries") or []
                if entry.get("routed_sop_instance_uid")
                and (series is None or entry.get("series_instance_uid") in series)}

    def _old_enough(self, path: Path, planned_at: float) -> os.stat_result | None:
        """The file's stat if it existed before the clean-up was planned (else ``None``: leave it)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st if st.st_mtime < planned_at - FRESH_MARGIN_SECONDS else None

    def _pause(self) -> None:
        if self._delay:
            time.sleep(self._delay)

    def _reduce(self, group_key: str, planned_at: float) -> tuple[int, int, bool]:
        """Header-only copies of every instance but the routed ones: (files, bytes, whether none was too fresh)."""
        keep = self._routed_sops(group_key)
        if keep is None:
            logger.warning("event=retention_kept group=%s reason=no_decision_record (instances kept whole)", group_key)
            return 0, 0, True
        folder = self.spool.group_folder(group_key)
        files = freed = 0
        complete = True
        for path in sorted(folder.glob("*.dcm")):
            if path.stem in keep:
                continue
            st = self._old_enough(path, planned_at)
            if st is None:
                complete = complete and not path.exists()
                continue
            began = time.monotonic()
            try:
                copy = header_only_bytes(path)
            except Exception as exc:  # not readable as DICOM: the pipeline reported it; keep it as it is
                logger.warning("event=retention_kept file=%s group=%s reason=unreadable (%s)", path.name, group_key,
                               type(exc).__name__)
                continue
            if copy is None:
                continue  # done before a crash
            size = self._replace(path, copy, st)
            files += 1
            freed += max(st.st_size - size, 0)
            self._pause()
            self._give_way(began)
        if files:
            fsync_dir(folder)
        return files, freed, complete

    def _give_way(self, began: float) -> None:
        """While the pipeline has work, pause three times as long as the last file took (see ``busy``)."""
        if self._busy is not None and self._busy():
            time.sleep(min((time.monotonic() - began) * BUSY_PAUSE_FACTOR, BUSY_PAUSE_MAX_SECONDS))

    def _replace(self, path: Path, data: bytes, original: os.stat_result) -> int:
        """Write ``data`` over ``path`` atomically (fsync'd under ``tmp/``, then renamed); returns its size.

        The copy keeps the original's times: it stands for an instance received then, not a new arrival.
        """
        tmp = self.spool.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.utime(tmp, ns=(original.st_atime_ns, original.st_mtime_ns))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path.stat().st_size

    def _remove_group_files(self, group_key: str, planned_at: float, records_too: bool) -> tuple[int, int]:
        """``expire``: instances (bar a reviewed series' routed one) and result objects; ``forget``: everything."""
        keep: set[str] = set()
        if not records_too:
            reviewed = self.journal.reviewed_series(group_key)
            keep = (self._routed_sops(group_key, reviewed) or set()) if reviewed else set()
        files = freed = 0
        incoming = self.spool.group_folder(group_key)
        for path in sorted(incoming.glob("*")):
            if path.is_file() and path.stem not in keep:
                files, freed = self._unlink(path, planned_at, files, freed)
        _rmdir(incoming)
        results = self.spool.result_folder(group_key)
        folders = [results / name for name in RESULT_OBJECT_FOLDERS]
        if records_too:
            folders = [p for p in sorted(results.rglob("*"), reverse=True) if p.is_dir()] + [results]
        for folder in folders:
            for path in sorted(folder.glob("*")):
                if path.is_file():
                    files, freed = self._unlink(path, planned_at, files, freed)
            _rmdir(folder)
        return files, freed

    def _unlink(self, path: Path, planned_at: float, files: int, freed: int) -> tuple[int, int]:
        st = self._old_enough(path, planned_at)
        if st is None:
            return files, freed
        try:
            path.unlink()
        except FileNotFoundError:
            return files, freed
        self._pause()
        return files + 1, freed + st.st_size

    def _quarantine(self, before: float, run: RetentionRun) -> None:
        """Quarantined datasets (and their reason files) older than ``before``; a lone reason file too."""
        folder = self.spool.quarantine_dir
        removed = 0
        for path in sorted(folder.glob("*.dcm")):
            try:
                old = path.stat().st_mtime < before
            except FileNotFoundError:
                continue
            if old:
                self._remove_quarantined(path, run)
                removed += 1
        for reason in folder.glob("*.reason.txt"):  # its dataset went, a crash came before it did
            if not reason.with_name(reason.name[:-len(".reason.txt")] + ".dcm").exists():
                reason.unlink(missing_ok=True)
        if removed:
            logger.info("event=retention_quarantine files=%d", removed)

    def _remove_quarantined(self, path: Path, run: RetentionRun) -> int:
        """Remove a quarantined dataset and its reason file; returns the bytes freed."""
        freed = 0
        for item in (path, path.with_suffix(".reason.txt")):
            try:
                freed += item.stat().st_size
                item.unlink()
            except FileNotFoundError:
                pass
        run.quarantine_files += 1
        run.removed_files += 1
        run.freed_bytes += freed
        self.journal.count("retention_removed_files")
        self.journal.count("retention_freed_bytes", freed)
        return freed

    def _cap(self, run: RetentionRun, stop: threading.Event | None) -> None:
        """Over ``max_spool_bytes``: expire the least recently finished groups, then the oldest quarantine."""
        cap = self.config.max_spool_bytes
        assert cap is not None
        size = folder_bytes(self.spool.root)
        while size > cap and (stop is None or not stop.is_set()):
            before = run.freed_bytes
            expired = self._each("expire", float("inf"), run, stop, reason="cap", limit=1)
            if not expired:
                break
            run.expired_for_cap += expired
            size -= run.freed_bytes - before
        if size > cap:
            def mtime(path: Path) -> float:
                try:
                    return path.stat().st_mtime
                except FileNotFoundError:
                    return 0.0

            for path in sorted(self.spool.quarantine_dir.glob("*.dcm"), key=mtime):
                if size <= cap:
                    break
                size -= self._remove_quarantined(path, run)
        size = folder_bytes(self.spool.root)
        run.spool_bytes = size
        run.over_cap_bytes = max(size - cap, 0)
        self.journal.set_cursor(OVER_CAP_CURSOR, run.over_cap_bytes)
        if run.over_cap_bytes:
            held = self.journal.retention_held()
            logger.error("event=retention_over_cap spool_bytes=%d max_spool_bytes=%d over_bytes=%d held_unsent=%d "
                         "held_unfinished=%d: only unfinished or unsent groups and decision records are left; "
                         "the spool keeps growing until a destination takes the results or space is added",
                         size, cap, run.over_cap_bytes, held["unsent"], held["unfinished"])


def _rmdir(path: Path) -> None:
    """Remove an empty folder (one that is not empty, or gone, stays as it is)."""
    try:
        path.rmdir()
    except OSError:
        pass
