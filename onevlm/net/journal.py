"""The service's state in SQLite: received instances, study groups, the export outbox, counters.

The spool's files are the durable record of what was acknowledged (fsync'd before the ack); the
journal adds what was done with them. It runs in WAL mode with synchronous NORMAL: a crash can
lose its last commits but never corrupt it, and on start :meth:`Journal.recover` rescans the
spool, so nothing acknowledged is forgotten; an export that was sent but whose "sent" mark was
lost is sent again with the same SOP Instance UID (a PACS keeps one copy).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from onevlm.net.journal_schema import bring_up_to_date, check_version
from onevlm.reports.series_figures import SeriesFigures
from onevlm.net.review_answers import ReviewAnswer


COUNTERS = ("received", "duplicates", "quarantined", "refused", "processed", "exported", "export_failures", "failed")


@dataclass(frozen=True)
class ResultVersion:
    """The latest version of one result object: its identity, content digest and earlier versions."""

    result_key: str
    version: int
    sop_instance_uid: str
    content_digest: str
    previous: tuple[tuple[str, str, str, str], ...] = ()


@dataclass(frozen=True)
class GroupRow:
    """A group as the journal knows it: status, instances, first and last arrival, last change."""

    group_key: str
    status: str
    received: int
    first_received: float
    last_received: float
    updated_at: float
    error: str | None


@dataclass(frozen=True)
class DestinationHealth:
    """One destination's outbox: items per status, the last error and when it last sent."""

    name: str
    by_status: dict[str, int]
    last_error: str | None
    last_sent_at: float | None


@dataclass(frozen=True)
class OutboxItem:
    id: int
    group_key: str
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    attempts: int


class Journal:
    """Thread-safe access to the service's SQLite journal."""

    def __init__(self, path: str | Path, migrate: bool = True) -> None:
        """Open (or create) the journal at ``path``.

        Parameters
        ----------
        path:
            The SQLite file.
        migrate:
            Bring an older journal's schema up to this release's (:mod:`onevlm.net.journal_schema`);
            False (readers such as ``onevlm status``) refuses one instead.

        Raises
        ------
        JournalSchemaError
            A journal written by a newer release (left untouched), or an older one with
            ``migrate=False``.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            version = check_version(self._db, self.path, migrate)  # before WAL mode, which would change the file
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            bring_up_to_date(self._db, self.path, version)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _bump(self, db: sqlite3.Connection, name: str, by: int = 1) -> None:
        db.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                   (name, by, by))

    def count(self, name: str, by: int = 1) -> None:
        with self._tx() as db:
            self._bump(db, name, by)

    def heartbeat(self) -> None:
        """A real write (the time, into ``cursors``): raises if the journal cannot be written."""
        with self._tx() as db:
            db.execute("INSERT INTO cursors(name, value) VALUES ('heartbeat', ?) "
                       "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (int(time.time()),))

    # -- receiving ------------------------------------------------------------------------------

    def has_instance(self, sop_uid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone() is not None

    def record_instance(self, sop_uid: str, group_key: str, path: Path, sop_class: str, calling_ae: str,
                        now: float | None = None) -> bool:
        """Record a stored instance; its group (re)opens for receiving. False for a duplicate."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return self._record(db, sop_uid, group_key, path, sop_class, calling_ae, now)

    def record_instances(self, stored: Iterable[tuple[str, str, Path, str]], calling_ae: str) -> set[str]:
        """Record many stored instances (SOP Instance UID, group, path, SOP Class UID) in one transaction,
        as :meth:`record_instance` each; returns their groups."""
        now = time.time()
        groups = set()
        with self._tx() as db:
            for sop_uid, group_key, path, sop_class in stored:
                self._record(db, sop_uid, group_key, path, sop_class, calling_ae, now)
                groups.add(group_key)
        return groups

    def _record(self, db: sqlite3.Connection, sop_uid: str, group_key: str, path: Path, sop_class: str,
                calling_ae: str, now: float) -> bool:
        cur = db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?)",
                         (sop_uid, group_key, str(path), sop_class, calling_ae, now))
        new = cur.rowcount == 1
        self._bump(db, "received" if new else "duplicates")
        db.execute(
            "INSERT INTO groups(group_key, status, last_received, received, updated_at) VALUES (?, 'receiving', ?, ?, ?) "
            "ON CONFLICT(group_key) DO UPDATE SET status = CASE WHEN status IN ('queued', 'processing') "
            "THEN status ELSE 'receiving' END, last_received = ?, received = received + ?, updated_at = ?",
            (group_key, now, int(new), now, now, int(new), now),
        )
        return new

    def instance_paths(self, sop_uids: Sequence[str]) -> dict[str, Path]:
        """The recorded spool paths of those of ``sop_uids`` the journal holds."""
        found: dict[str, Path] = {}
        with self._lock:
            for start in range(0, len(sop_uids), 500):  # SQLite's bound-parameter limit
                chunk = list(sop_uids[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for sop, path in self._db.execute(
                        f"SELECT sop_instance_uid, path FROM instances WHERE sop_instance_uid IN ({marks})", chunk):
                    found[sop] = Path(path)
        return found

    def due_groups(self, idle_seconds: float, now: float | None = None) -> list[str]:
        """Groups idle for ``idle_seconds``: mark them queued and return them."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT group_key FROM groups WHERE status = 'receiving' AND last_received <= ?",
                              (now - idle_seconds,)).fetchall()
            keys = [r[0] for r in rows]
            db.executemany("UPDATE groups SET status = 'queued', updated_at = ? WHERE group_key = ?",
                           [(now, k) for k in keys])
            return keys

    def set_group(self, group_key: str, status: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE groups SET status = ?, error = ?, updated_at = ?, attempts = attempts + ? "
                       "WHERE group_key = ?", (status, error, time.time(), int(status == "processing"), group_key))
            if status == "done":
                self._bump(db, "processed")
            elif status == "failed":
                self._bump(db, "failed")

    def group_received_since(self, group_key: str, since: float) -> bool:
        with self._lock:
            row = self._db.execute("SELECT last_received FROM groups WHERE group_key = ?", (group_key,)).fetchone()
        return bool(row and row[0] > since)

    def recover(self, spool_files: list[tuple[str, Path]]) -> int:
        """After a restart: unfinished groups go back to receiving with a fresh idle timer; files missing
        from the journal (acknowledged, then a crash before the journal write) are recorded, their groups
        too. Returns files added."""
        now = time.time()
        added = 0
        with self._tx() as db:
            # Unfinished groups wait a whole idle time from the restart: a scanner retrying what was not
            # acknowledged lands in the same result instead of a partial one first.
            db.execute("UPDATE groups SET status = 'receiving', last_received = MAX(last_received, ?), updated_at = ? "
                       "WHERE status IN ('queued', 'processing', 'receiving')", (now, now))
            for group_key, path in spool_files:
                cur = db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, '', 'recovered', ?)",
                                 (path.stem, group_key, str(path), now))
                if cur.rowcount:
                    added += 1
                    self._bump(db, "received")
                    db.execute(
                        "INSERT INTO groups(group_key, status, last_received, received, updated_at) "
                        "VALUES (?, 'receiving', ?, 1, ?) ON CONFLICT(group_key) DO UPDATE SET "
                        "status = 'receiving', received = received + 1, last_received = ?, updated_at = ?",
                        (group_key, now, now, now, now),
                    )
        return added

    # -- intake cursors ---------------------------------------------------------------------------

    def cursor(self, name: str) -> int:
        """A durable position (0 before the first record)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, value: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO cursors VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                       (name, int(value)))

    def mark_stable(self, group_key: str) -> None:
        """The intake says the group is complete (Orthanc's StableStudy): due now, not after our idle time."""
        with self._tx() as db:
            db.execute("UPDATE groups SET last_received = 0 WHERE group_key = ? AND status = 'receiving'",
                       (group_key,))

    # -- result versions --------------------------------------------------------------------------

    def result_version(self, result_key: str) -> ResultVersion | None:
        """The latest recorded version of a result object, or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT version, sop_instance_uid, content_digest, previous FROM results "
                                   "WHERE result_key = ?", (result_key,)).fetchone()
        if row is None:
            return None
        return ResultVersion(result_key, int(row[0]), row[1], row[2], tuple(tuple(p) for p in json.loads(row[3])))

    def record_result_versions(self, versions: Iterable[ResultVersion]) -> None:
        """Record result versions once their files are in place (one transaction)."""
        now = time.time()
        with self._tx() as db:
            for v in versions:
                db.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(result_key) DO UPDATE SET "
                           "version = excluded.version, sop_instance_uid = excluded.sop_instance_uid, "
                           "content_digest = excluded.content_digest, previous = excluded.previous, "
                           "updated_at = excluded.updated_at",
                           (v.result_key, v.version, v.sop_instance_uid, v.content_digest,
                            json.dumps([list(p) for p in v.previous]), now))

    def supersede_exports(self, sop_uid: str) -> int:
        """A version amended before it was sent is not sent any more (its successor references it)."""
        with self._tx() as db:
            cur = db.execute("UPDATE outbox SET status = 'superseded' WHERE sop_instance_uid = ? AND status = 'pending'",
                             (sop_uid,))
            return cur.rowcount

    # -- exporting ------------------------------------------------------------------------------

    def enqueue_export(self, group_key: str, destination: str, sop_uid: str, sop_class: str, path: Path,
                       digest: str) -> bool:
        """Queue a result file for a destination; the same content is never queued twice."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT digest FROM outbox WHERE sop_instance_uid = ? AND destination = ?",
                             (sop_uid, destination)).fetchone()
            if row is None:
                db.execute("INSERT INTO outbox(group_key, destination, sop_instance_uid, sop_class_uid, path, digest, "
                           "status, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                           (group_key, destination, sop_uid, sop_class, str(path), digest, now))
                return True
            if row[0] != digest:  # the study grew and its result changed: send the new version
                db.execute("UPDATE outbox SET digest = ?, path = ?, status = 'pending', attempts = 0, "
                           "next_attempt_at = ?, last_error = NULL WHERE sop_instance_uid = ? AND destination = ?",
                           (digest, str(path), now, sop_uid, destination))
                return True
            return False

    def due_exports(self, now: float | None = None, limit: int = 200, destination: str | None = None) -> list[OutboxItem]:
        """Pending items whose next attempt is due, oldest first (of one ``destination``, or all)."""
        now = time.time() if now is None else now
        where, args = ("AND destination = ? ", (destination,)) if destination is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT id, group_key, destination, sop_instance_uid, sop_class_uid, path, attempts FROM outbox "
                f"WHERE status = 'pending' AND next_attempt_at <= ? {where}ORDER BY id LIMIT ?",
                (now, *args, limit)).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], Path(r[5]), r[6]) for r in rows]

    def mark_sent(self, item_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET status = 'sent', sent_at = ?, last_error = NULL WHERE id = ?",
                       (time.time(), item_id))
            self._bump(db, "exported")

    def mark_failed_attempt(self, item_id: int, error: str, retry_at: float | None) -> None:
        """Record a failed send; ``retry_at`` None gives up (status failed)."""
        with self._tx() as db:
            if retry_at is None:
                db.execute("UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ? WHERE id = ?",
                           (error, item_id))
            else:
                db.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                           (retry_at, error, item_id))
            self._bump(db, "export_failures")

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict:
        """Counts for the status command/endpoint."""
        with self._lock:
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            groups = dict(self._db.execute("SELECT status, COUNT(*) FROM groups GROUP BY status").fetchall())
            outbox = dict(self._db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
        return {
            "received": counters.get("received", 0),
            "duplicates": counters.get("duplicates", 0),
            "quarantined": counters.get("quarantined", 0),
            "refused": counters.get("refused", 0),
            "queued": groups.get("receiving", 0) + groups.get("queued", 0) + groups.get("processing", 0),
            "processed": groups.get("done", 0),
            "failed": groups.get("failed", 0) + outbox.get("failed", 0),
            "exported": outbox.get("sent", 0),
            "export_pending": outbox.get("pending", 0),
            "export_superseded": outbox.get("superseded", 0),
            "export_failures": counters.get("export_failures", 0),
            "groups": groups,
            "outbox": outbox,
        }

    # -- series figures (counted over the current results) --------------------------------------

    def record_series_figures(self, group_key: str, figures: Iterable[SeriesFigures]) -> None:
        """Replace the group's series figures with those of the results just written."""
        rows = [(group_key, f.series_instance_uid, f.outcome, f.confidence, int(f.calibrated), f.vlm_calls,
                 int(f.disagreement), int(f.decided), f.error) for f in figures]
        with self._tx() as db:
            db.execute("DELETE FROM series_figures WHERE group_key = ?", (group_key,))
            db.executemany("INSERT OR REPLACE INTO series_figures (group_key, series_instance_uid, outcome, "
                           "confidence, calibrated, vlm_calls, disagreement, decided, error) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def has_series_figures(self, group_key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM series_figures WHERE group_key = ? LIMIT 1",
                                    (group_key,)).fetchone() is not None

    def routing_counts(self) -> dict[str, int]:
        """Over every current result: VLM calls, decided series, those that needed no VLM call, disagreements,
        and series that failed (their image unreadable, routing or writing the result raised).

        A series whose record does not count its VLM calls adds to neither ``vlm_calls`` nor
        ``series_without_vlm``.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(vlm_calls), 0), COALESCE(SUM(decided), 0), "
                "COALESCE(SUM(decided AND vlm_calls = 0), 0), COALESCE(SUM(disagreement), 0), "
                "COALESCE(SUM(error IS NOT NULL OR outcome = 'failed'), 0) FROM series_figures").fetchone()
        return dict(zip(("vlm_calls", "series_decided", "series_without_vlm", "disagreements", "series_failed"),
                        (int(v) for v in row)))

    def outcome_counts(self) -> dict[str, int]:
        """Series of the current results by outcome."""
        with self._lock:
            return dict(self._db.execute("SELECT outcome, COUNT(*) FROM series_figures GROUP BY outcome").fetchall())

    def routed_confidences(self, bounds: Iterable[float]) -> tuple[list[int], int, float]:
        """The routed series' confidences (current results): the count at or under each bound, the count
        and the sum of all."""
        bounds = list(bounds)
        columns = "".join(f"COALESCE(SUM(confidence <= {float(b)!r}), 0), " for b in bounds)
        with self._lock:
            row = self._db.execute(f"SELECT {columns}COUNT(*), COALESCE(SUM(confidence), 0.0) FROM series_figures "
                                   "WHERE outcome IN ('routed', 'routed-set') AND confidence IS NOT NULL").fetchone()
        return [int(v) for v in row[:len(bounds)]], int(row[-2]), float(row[-1])

    def recent_groups(self, limit: int = 200) -> list[GroupRow]:
        """The most recently changed groups, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT g.group_key, g.status, g.received, COALESCE(MIN(i.received_at), g.first_received, g.last_received), "
                "g.last_received, g.updated_at, g.error FROM groups g LEFT JOIN instances i USING (group_key) "
                "GROUP BY g.group_key ORDER BY g.updated_at DESC LIMIT ?", (int(limit),)).fetchall()
        return [GroupRow(*r) for r in rows]

    def group_row(self, group_key: str) -> GroupRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT g.group_key, g.status, g.received, COALESCE(MIN(i.received_at), g.first_received, g.last_received), "
                "g.last_received, g.updated_at, g.error FROM groups g LEFT JOIN instances i USING (group_key) "
                "WHERE g.group_key = ? GROUP BY g.group_key", (group_key,)).fetchone()
        return GroupRow(*row) if row else None

    def studies_per_hour(self, since: float, hours: int) -> list[int]:
        """Groups whose first instance arrived in each hour from ``since`` (``hours`` counts)."""
        with self._lock:
            firsts = self._db.execute("SELECT MIN(received_at) FROM instances GROUP BY group_key "
                                      "HAVING MIN(received_at) >= ?", (since,)).fetchall()
        counts = [0] * hours
        for (first,) in firsts:
            slot = int((first - since) // 3600)
            if 0 <= slot < hours:
                counts[slot] += 1
        return counts

    def export_states(self) -> dict[str, dict[str, int]]:
        """Outbox items per status, per group."""
        with self._lock:
            rows = self._db.execute("SELECT group_key, status, COUNT(*) FROM outbox GROUP BY group_key, status").fetchall()
        states: dict[str, dict[str, int]] = {}
        for group_key, status, count in rows:
            states.setdefault(group_key, {})[status] = count
        return states

    def destination_health(self) -> list[DestinationHealth]:
        """Per destination with outbox items: counts per status, the latest error, the last send."""
        with self._lock:
            counts = self._db.execute("SELECT destination, status, COUNT(*) FROM outbox GROUP BY destination, status").fetchall()
            errors = dict(self._db.execute(
                "SELECT destination, last_error FROM outbox WHERE id IN (SELECT MAX(id) FROM outbox "
                "WHERE last_error IS NOT NULL GROUP BY destination)").fetchall())
            sent = dict(self._db.execute("SELECT destination, MAX(sent_at) FROM outbox GROUP BY destination").fetchall())
        by_destination: dict[str, dict[str, int]] = {}
        for destination, status, count in counts:
            by_destination.setdefault(destination, {})[status] = count
        return [DestinationHealth(name, by_status, errors.get(name), sent.get(name))
                for name, by_status in sorted(by_destination.items())]

    # -- reviews --------------------------------------------------------------------------------

    def record_review(self, answer: ReviewAnswer) -> int:
        """Store a reviewer's answer (kept with every earlier one); returns its row id."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO reviews(group_key, series_instance_uid, kind, card, reviewer, comment, "
                             "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (answer.group_key, answer.series_instance_uid, answer.kind, answer.card, answer.reviewer,
                              answer.comment, answer.recorded_at or time.time()))
            return int(cur.lastrowid)

    def latest_reviews(self) -> dict[tuple[str, str], ReviewAnswer]:
        """The latest answer per (group, series)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT group_key, series_instance_uid, kind, card, reviewer, comment, recorded_at FROM reviews "
                "WHERE id IN (SELECT MAX(id) FROM reviews GROUP BY group_key, series_instance_uid)").fetchall()
        return {(r[0], r[1]): ReviewAnswer(*r) for r in rows}

    def review_history(self, group_key: str) -> list[ReviewAnswer]:
        """Every answer recorded for a group's series, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT group_key, series_instance_uid, kind, card, reviewer, comment, recorded_at FROM reviews "
                "WHERE group_key = ? ORDER BY id", (group_key,)).fetchall()
        return [ReviewAnswer(*r) for r in rows]

    # -- retention (onevlm.net.retention) ----------------------------------------------------------

    def counter(self, name: str) -> int:
        """A durable counter's value (0 before its first count)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def retention_candidates(self, action: str, before: float, limit: int = 500) -> list[str]:
        """Groups a clean-up ``action`` may act on now (their last acknowledgement or change before ``before``
        where the action is timed), the least recently finished first. See :data:`RETENTION_ACTIONS`."""
        where, args = _retention_where(action, before)
        with self._lock:
            rows = self._db.execute(f"SELECT g.group_key FROM groups g WHERE {where} ORDER BY {_FINISHED_AT} LIMIT ?",
                                    (*args, int(limit))).fetchall()
        return [r[0] for r in rows]

    def plan_cleanup(self, group_key: str, action: str, reason: str, before: float, now: float) -> int | None:
        """Record the intent to clean a group up, if it is still eligible (checked in the same transaction).

        Returns the intent's id (kept until :meth:`finish_cleanup`), or ``None`` if the group is not eligible
        any more (an instance arrived, a result is pending again…).
        """
        where, args = _retention_where(action, before)
        with self._tx() as db:
            if db.execute(f"SELECT 1 FROM groups g WHERE g.group_key = ? AND {where}", (group_key, *args)).fetchone() \
                    is None:
                return None
            cur = db.execute("INSERT INTO cleanups(group_key, action, reason, planned_at) VALUES (?, ?, ?, ?)",
                             (group_key, action, reason, now))
            return int(cur.lastrowid)

    def pending_cleanups(self) -> list[tuple[int, str, str, str, float]]:
        """Clean-ups planned and not finished (a crash interrupted them): ``(id, group, action, reason, planned_at)``."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT id, group_key, action, reason, planned_at FROM cleanups ORDER BY id").fetchall()]

    def finish_cleanup(self, cleanup_id: int, group_key: str, action: str, planned_at: float, files: int,
                       freed: int, keep_sops: Iterable[str] = (), record_stage: bool = True) -> None:
        """Close a clean-up: its intent goes, the group's retention stage is recorded (``forget``: its rows go)
        unless the group changed after the clean-up was planned (or ``record_stage`` is False: the clean-up
        left something to do), and the counters count what was removed."""
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM cleanups WHERE id = ?", (cleanup_id,))
            self._bump(db, "retention_removed_files", files)
            self._bump(db, "retention_freed_bytes", freed)
            if not record_stage:
                return
            if action == "forget":
                if db.execute("DELETE FROM groups WHERE group_key = ? AND updated_at <= ?",
                              (group_key, planned_at)).rowcount:
                    db.execute("DELETE FROM outbox WHERE group_key = ?", (group_key,))
                    db.execute("DELETE FROM instances WHERE group_key = ?", (group_key,))
                    db.execute("DELETE FROM series_figures WHERE group_key = ?", (group_key,))
                return
            stage = {"reduce": "reduced", "expire": "expired", "compact": "compacted"}[action]
            updated = db.execute("UPDATE groups SET retention = ?, retention_at = ? WHERE group_key = ? "
                                 "AND updated_at <= ?", (stage, now, group_key, planned_at)).rowcount
            if action == "compact" and updated:
                keep = list(keep_sops)
                db.execute("UPDATE groups SET first_received = COALESCE(first_received, (SELECT MIN(received_at) "
                           "FROM instances WHERE group_key = ?)) WHERE group_key = ?", (group_key, group_key))
                db.execute(f"DELETE FROM instances WHERE group_key = ? AND sop_instance_uid NOT IN "
                           f"({', '.join('?' * len(keep))})", (group_key, *keep))

    def reviewed_series(self, group_key: str) -> set[str]:
        """Series UIDs of a group with a reviewer's answer (their routed image is a calibration label's)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT series_instance_uid FROM reviews WHERE group_key = ?",
                                                   (group_key,)).fetchall()}

    def retention_held(self) -> dict[str, int]:
        """Groups retention may not touch: ``unsent`` (an export gave up: the results never reached a
        destination) and ``unfinished`` (receiving, queued, processing, or exports pending)."""
        with self._lock:
            unsent = self._db.execute("SELECT COUNT(DISTINCT group_key) FROM outbox WHERE status = 'failed'").fetchone()[0]
            unfinished = self._db.execute(
                "SELECT COUNT(*) FROM groups g WHERE g.status IN ('receiving', 'queued', 'processing') OR EXISTS "
                "(SELECT 1 FROM outbox o WHERE o.group_key = g.group_key AND o.status = 'pending')").fetchone()[0]
        return {"unsent": int(unsent), "unfinished": int(unfinished)}

    def sent_count(self, sop_uid: str, destination: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM outbox WHERE sop_instance_uid = ? AND destination = ? "
                                   "AND status = 'sent'", (sop_uid, destination)).fetchone()
        return int(row[0])


#: When a group's results were last acknowledged, or it last changed (whichever is later).
_FINISHED_AT = ("MAX(g.updated_at, COALESCE((SELECT MAX(o.sent_at) FROM outbox o WHERE o.group_key = g.group_key), "
                "0))")
#: Every result of the group reached every destination (none pending, none given up on).
_ALL_SENT = ("NOT EXISTS (SELECT 1 FROM outbox o WHERE o.group_key = g.group_key AND o.status IN ('pending', "
             "'failed'))")
#: The group's recorded retention stage still holds (no status change since it was reached).
_STAGE_HOLDS = "(g.retention IS NOT NULL AND g.retention_at >= g.updated_at)"

#: What each clean-up action may act on (``before``: the cut-off for the timed ones).
RETENTION_ACTIONS = {
    # all results sent (or none to send): the instances shrink to what an amendment needs
    "reduce": (f"g.status = 'done' AND {_ALL_SENT} AND NOT {_STAGE_HOLDS}", False),
    # results_days after the last acknowledgement: instances and result objects go, decision records stay
    "expire": (f"g.status IN ('done', 'failed') AND {_ALL_SENT} AND NOT ({_STAGE_HOLDS} AND g.retention IN "
               f"('expired', 'compacted')) AND {_FINISHED_AT} <= ?", True),
    # journal_days: the per-instance rows of an expired group go
    "compact": (f"g.status IN ('done', 'failed') AND {_STAGE_HOLDS} AND g.retention = 'expired' AND "
                f"{_FINISHED_AT} <= ?", True),
    # records_days: the decision records and the group's rows go
    "forget": (f"g.status IN ('done', 'failed') AND {_STAGE_HOLDS} AND g.retention IN ('expired', 'compacted') AND "
               f"{_FINISHED_AT} <= ?", True),
}


def _retention_where(action: str, before: float) -> tuple[str, tuple]:
    if action not in RETENTION_ACTIONS:
        raise ValueError(f"unknown retention action {action!r}")
    where, timed = RETENTION_ACTIONS[action]
    if not timed:
        return where, ()
    # updated_at <= before first: implied by the finishing time's bound, and answered by groups_by_status
    return f"g.updated_at <= ? AND {where}", (before, before)
