"""The durable spool: a received instance is on disk (fsync'd, atomically renamed) before it is acknowledged.

Layout under ``spool_dir``::

    incoming/<group key>/<SOP Instance UID>.dcm   acknowledged instances, by study (or series)
    quarantine/<time>_<n>.dcm + .reason.txt        datasets we could not understand
    results/<group key>/                           what the pipeline wrote for a group
    tmp/                                           partial writes (never read; cleared at start)
"""

from __future__ import annotations

import ctypes
import functools
import io
import itertools
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import pydicom

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"^[0-9.]{1,64}$")
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]


class SpoolError(OSError):
    """An instance could not be stored (disk full, permissions…)."""


class KnownInstance(Protocol):
    """Part 10 bytes and the UIDs the caller knows they hold (a header-only copy it encoded)."""

    encoded: bytes
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class StoredInstance:
    """What the spool knows about an acknowledged instance."""

    path: Path
    group_key: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@functools.lru_cache(maxsize=1)
def _syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # Linux (glibc 2.14+)
    except (AttributeError, OSError):
        return None


def sync_files(folder: Path, files: Sequence[Path]) -> None:
    """Make ``files`` (written in ``folder``'s filesystem) durable.

    One ``syncfs(2)`` on the filesystem where there is one: a batch of small files (header-only
    copies) costs one flush instead of one per file, which on a loaded 2-core machine is the
    difference between ≈ 0.2 ms and ≈ 3 ms per file. Elsewhere each file is fsync'd.
    """
    syncfs = _syncfs()
    if syncfs is not None and files:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a file created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (files removed while counting are skipped)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _uid(value: object, name: str) -> str:
    text = str(value or "").strip()
    if not _SAFE.match(text):
        raise ValueError(f"{name} {text!r} is not a valid UID")
    return text


class Spool:
    """Durable storage of received instances and of the pipeline's results.

    Parameters
    ----------
    root:
        The spool folder (created if missing).
    group_by:
        ``study`` or ``series``: the key received instances are grouped under.
    """

    def __init__(self, root: str | Path, group_by: str = "study") -> None:
        if group_by not in ("study", "series"):
            raise ValueError("group_by must be 'study' or 'series'")
        self.root = Path(root)
        self.group_by = group_by
        self.incoming = self.root / "incoming"
        self.quarantine_dir = self.root / "quarantine"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        for folder in (self.incoming, self.quarantine_dir, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def clear_partial_writes(self) -> int:
        """Remove leftovers of writes a crash interrupted (they were never acknowledged)."""
        leftovers = list(self.tmp.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True) if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        return len(leftovers)

    def _write_tmp(self, data: bytes) -> Path:
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            # A disk that filled mid-write (ENOSPC) leaves no partial file behind, and no space held.
            path.unlink(missing_ok=True)
            raise
        return path

    def store(self, encoded: bytes) -> StoredInstance:
        """Store one encoded instance (DICOM Part 10 bytes) durably and return where it went.

        Raises
        ------
        ValueError
            If the bytes are not a DICOM dataset with Study/Series/SOP UIDs (the caller
            quarantines and refuses it).
        SpoolError
            If writing failed (the caller answers "out of resources").
        """
        try:
            # Parse the header from memory first: what cannot be understood is never written here.
            ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True, specific_tags=HEADER_TAGS)
            study = _uid(ds.get("StudyInstanceUID"), "Study Instance UID")
            series = _uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            sop = _uid(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID"), "SOP Instance UID")
            sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
        except Exception as exc:
            raise ValueError(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc
        return self.store_known(encoded, study, series, sop, sop_class)

    def placement(self, study: str, series: str, sop: str, sop_class: str) -> StoredInstance:
        """Where an instance with these UIDs goes in the spool (nothing is written). Raises ``ValueError``
        for an unsafe UID."""
        study, series, sop = _uid(study, "Study Instance UID"), _uid(series, "Series Instance UID"), \
            _uid(sop, "SOP Instance UID")
        group = study if self.group_by == "study" else series
        return StoredInstance(self.incoming / group / f"{sop}.dcm", group, study, series, sop, sop_class)

    def store_known(self, encoded: bytes, study: str, series: str, sop: str, sop_class: str) -> StoredInstance:
        """Store Part 10 bytes whose UIDs the caller already knows, as :meth:`store`.

        Raises ``ValueError`` for an unsafe UID, :class:`SpoolError` when writing failed.
        """
        target = self.placement(study, series, sop, sop_class)
        try:
            tmp = self._write_tmp(encoded)
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool: {exc}") from exc
        try:
            target.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target.path)  # atomic: a reader sees the whole file or none
            fsync_dir(target.path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(f"cannot move the instance into the spool: {exc}") from exc
        return target

    def store_batch(self, items: Sequence[KnownInstance]) -> list[StoredInstance]:
        """Store many instances whose UIDs the caller knows, durably, as :meth:`store_known` each.

        All are written first, then made durable together (:func:`sync_files`: one ``syncfs``
        where the system has it, not a flush per small file), then moved into place and their
        folders fsync'd: the spool only ever holds complete files. Raises ``ValueError`` for an
        unsafe UID (before anything is written), :class:`SpoolError` when writing failed (nothing
        of the batch is left in the temporary folder; what was moved into place already is complete).
        """
        targets = [self.placement(i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid, i.sop_class_uid)
                   for i in items]
        staged: list[Path] = []
        moved = 0
        try:
            for item in items:
                staged.append(self.tmp / f"{uuid.uuid4().hex}.part")
                staged[-1].write_bytes(item.encoded)
            sync_files(self.tmp, staged)
            for path, target in zip(staged, targets):
                target.path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target.path)  # atomic: a reader sees the whole file or none
                moved += 1
            for folder in {target.path.parent for target in targets}:
                fsync_dir(folder)
        except OSError as exc:
            for path in staged[moved:]:
                path.unlink(missing_ok=True)
            raise SpoolError(f"cannot write to the spool: {exc}") from exc
        return targets

    def quarantine(self, encoded: bytes, reason: str) -> Path:
        """Keep an unparseable dataset with a reason file beside it (for a person to look at)."""
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}_{os.getpid()}_{next(self._counter)}"
        path = self.quarantine_dir / f"{stem}.dcm"
        note = self.quarantine_dir / f"{stem}.reason.txt"
        try:
            path.write_bytes(encoded)
            note.write_text(reason + "\n", encoding="utf-8")
        except OSError:  # a full disk: no half-kept file (the caller refuses, the sender keeps the dataset)
            path.unlink(missing_ok=True)
            note.unlink(missing_ok=True)
            raise
        return path

    def group_folder(self, group_key: str) -> Path:
        return self.incoming / group_key

    def result_folder(self, group_key: str) -> Path:
        return self.results / group_key

    def scan(self) -> list[tuple[str, Path]]:
        """Every acknowledged instance on disk as ``(group key, path)`` (used to recover after a crash)."""
        return [(p.parent.name, p) for p in sorted(self.incoming.glob("*/*.dcm"))]

    def quarantined(self) -> int:
        return len(list(self.quarantine_dir.glob("*.dcm")))
