"""The journal's schema, its version (SQLite's ``PRAGMA user_version``) and the migrations between versions.

A spool outlives releases: the next release may change a table, and meets journals written by
this one. Each journal records its schema version; on start the service migrates an older journal
step by step (each step one transaction, the version bumped in the same transaction, a copy of the
journal taken first) and refuses a newer one untouched.

History
-------
1. The tables as first released (journals from before versions were recorded read 0 and have
   exactly these tables: they are version 1).
2. Indexes for the lookups that scan as the journal grows: instances by group (a study's page, its
   amendments, first arrival), the outbox by status and due time (the exporter's poll) and by group.
3. Retention (:mod:`onevlm.net.retention`): per group its first arrival (kept when the per-instance rows
   are compacted away), its retention stage and when it was reached; ``cleanups``, the durable intent
   of a clean-up in progress (written before any file is removed, deleted once it is done); groups by
   status and last change (the clean-up's poll).
4. ``series_figures``: per routed series of the current results, what ``/status``, ``/metrics`` and the
   overview count (outcome, confidence, VLM calls, disagreement, error), written with each group's
   results, so a scrape reads an aggregate instead of every results folder. A migrated journal's
   rows are filled from the results folders once, on the service's next start
   (:func:`onevlm.dashboard.study_index.backfill_series_figures`).

Research use only.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

#: The tables of version 1 (kept as written then: migrations start from here).
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    group_key TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT,
    calling_ae TEXT,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    group_key TEXT PRIMARY KEY,
    status TEXT NOT NULL,            -- receiving | queued | processing | done | failed
    last_received REAL NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_key TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    status TEXT NOT NULL,            -- pending | sent | failed | superseded (amended before it was sent)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL);  -- e.g. Orthanc's changes
CREATE TABLE IF NOT EXISTS results (  -- the latest version of each result object (SR, SEG, annotations)
    result_key TEXT PRIMARY KEY,     -- group | kind | result series UID
    version INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    content_digest TEXT NOT NULL,
    previous TEXT NOT NULL,          -- JSON: earlier versions [[study, series, class, instance], ...]
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (  -- reviewers' answers (labels); append-only, the latest per series counts
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_key TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    kind TEXT NOT NULL,              -- card | none-of-these | not-routable
    card TEXT,
    reviewer TEXT NOT NULL,
    comment TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
"""


def _statements(script: str) -> list[str]:
    """The script's statements one by one (``executescript`` would commit the open transaction first)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements


def _create_v1(db: sqlite3.Connection) -> None:
    for statement in _statements(SCHEMA_V1):
        db.execute(statement)


def _add_lookup_indexes(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX IF NOT EXISTS instances_by_group ON instances (group_key, received_at)")
    db.execute("CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at)")
    db.execute("CREATE INDEX IF NOT EXISTS outbox_by_group ON outbox (group_key)")


def _add_retention(db: sqlite3.Connection) -> None:
    # first_received: MIN(instances.received_at) once the group's instance rows are compacted away.
    # retention: NULL | reduced | expired | compacted, valid while retention_at >= updated_at (any later
    # status change, e.g. an instance arriving after the clean-up, makes the group a live one again).
    db.execute("ALTER TABLE groups ADD COLUMN first_received REAL")
    db.execute("ALTER TABLE groups ADD COLUMN retention TEXT")
    db.execute("ALTER TABLE groups ADD COLUMN retention_at REAL")
    db.execute("""CREATE TABLE IF NOT EXISTS cleanups (  -- a clean-up planned and not yet finished (crash-safe intent)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_key TEXT NOT NULL,
    action TEXT NOT NULL,            -- reduce | expire | forget
    reason TEXT NOT NULL,            -- schedule | cap
    planned_at REAL NOT NULL         -- files written after this are never removed by it
)""")
    db.execute("CREATE INDEX IF NOT EXISTS groups_by_status ON groups (status, updated_at)")


def _add_series_figures(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS series_figures (  -- one row per series of a group's current results
    group_key TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    outcome TEXT NOT NULL,           -- routed | routed-set | review | stopped | skipped | failed
    confidence REAL,
    calibrated INTEGER NOT NULL,
    vlm_calls INTEGER,               -- NULL: the record does not say
    disagreement INTEGER NOT NULL,   -- 1: header and image disagree
    decided INTEGER NOT NULL,        -- 1: the router reached a decision (no error)
    error TEXT,
    PRIMARY KEY (group_key, series_instance_uid)
)""")
    db.execute("CREATE INDEX IF NOT EXISTS series_figures_by_outcome ON series_figures (outcome)")


#: Version n → the step from n - 1 to n (run inside one transaction).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    2: _add_lookup_indexes,
    3: _add_retention,
    4: _add_series_figures,
}
SCHEMA_VERSION = max(MIGRATIONS)


class JournalSchemaError(RuntimeError):
    """The journal's schema cannot be used by this release (newer, or older where migrating is not allowed)."""


def schema_version(db: sqlite3.Connection) -> int:
    """The journal's schema version; 1 for a journal written before versions were recorded."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and _has_tables(db):
        return 1
    return version


def _has_tables(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances'").fetchone() is not None


def check_version(db: sqlite3.Connection, path: Path, migrate: bool) -> int:
    """Refuse a journal this release cannot use, before anything is written to it.

    Returns
    -------
    int
        The journal's version (0: a new, empty journal).

    Raises
    ------
    JournalSchemaError
        For a newer journal, or an older one when ``migrate`` is False.
    """
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise JournalSchemaError(
            f"{path}: journal schema version {version} was written by a newer onevlm (this release reads up to "
            f"version {SCHEMA_VERSION}); upgrade onevlm or give this release a spool of its own — the journal was "
            "left untouched")
    if 0 < version < SCHEMA_VERSION and not migrate:
        raise JournalSchemaError(
            f"{path}: journal schema version {version} is older than this release's {SCHEMA_VERSION}; start the "
            "service once to migrate it (a copy is kept next to it)")
    return version


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def bring_up_to_date(db: sqlite3.Connection, path: Path, version: int) -> None:
    """Create a new journal at :data:`SCHEMA_VERSION`, or migrate an older one step by step.

    Each step runs in one ``BEGIN IMMEDIATE`` transaction that also sets ``user_version``, so a
    crash leaves the journal at the last completed version; the version is read again inside the
    transaction, so two processes opening one spool migrate it once. Before the first step the
    journal is copied to ``<journal>.v<N>.bak`` (SQLite's online backup). ``version`` is what
    :func:`check_version` found (0: a new journal).
    """
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        with _transaction(db):
            if schema_version(db) == 0:
                _create_v1(db)
                for step in range(2, SCHEMA_VERSION + 1):
                    MIGRATIONS[step](db)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return
    backup = path.with_name(f"{path.name}.v{version}.bak")
    copy = sqlite3.connect(backup)
    try:
        db.backup(copy)
    finally:
        copy.close()
    logger.info("journal %s: schema version %d, migrating to %d (copy kept at %s)", path, version, SCHEMA_VERSION,
                backup.name)
    for step in range(version + 1, SCHEMA_VERSION + 1):
        with _transaction(db):
            if schema_version(db) < step:
                MIGRATIONS[step](db)
                db.execute(f"PRAGMA user_version = {step}")
        logger.info("journal %s: migrated to schema version %d", path, step)
