"""The journal's schema version: new journals, a spool from the release before versions, a newer journal refused."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from onevlm.net.journal import Journal
from onevlm.net.journal_schema import SCHEMA_V1, SCHEMA_VERSION, JournalSchemaError


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


def _version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def _old_spool(path: Path) -> None:
    """A journal as the release before schema versions wrote it: its tables, rows in each, no user_version."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO instances VALUES ('1.2.3.1', '1.2.3.4', '/spool/a/1.dcm', '1.2.840.10008.5.1.4.1.1.2', "
               "'SCANNER', 100.0)")
    db.execute("INSERT INTO groups(group_key, status, last_received, received, updated_at) "
               "VALUES ('1.2.3.4', 'done', 100.0, 1, 101.0)")
    db.execute("INSERT INTO outbox(group_key, destination, sop_instance_uid, sop_class_uid, path, digest, status, "
               "next_attempt_at) VALUES ('1.2.3.4', 'pacs', '1.2.3.9', '1.2.840.10008.5.1.4.1.1.88.34', "
               "'/spool/results/sr.dcm', 'abc', 'pending', 0)")
    db.execute("INSERT INTO counters VALUES ('received', 1)")
    db.execute("INSERT INTO reviews(group_key, series_instance_uid, kind, card, reviewer, comment, recorded_at) "
               "VALUES ('1.2.3.4', '1.2.3', 'card', 'MODEL_01', 'dr-a', '', 102.0)")
    db.close()


def test_a_new_journal_has_this_releases_schema(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.close()
    assert _version(tmp_path / "journal.db") == SCHEMA_VERSION == 4
    assert {"instances_by_group", "outbox_due", "outbox_by_group"} <= _indexes(tmp_path / "journal.db")
    Journal(tmp_path / "journal.db").close()  # reopening changes nothing
    assert not list(tmp_path.glob("*.bak"))


def test_a_spool_from_the_release_before_is_migrated_on_start_and_nothing_is_lost(tmp_path, caplog):
    path = tmp_path / "journal.db"
    _old_spool(path)
    assert _version(path) == 0 and not _indexes(path)
    with pytest.raises(JournalSchemaError, match="version 1 is older than this release's 4; start the service once"):
        Journal(path, migrate=False)  # a reader (onevlm status) does not migrate
    assert _version(path) == 0
    with caplog.at_level("INFO", logger="onevlm.net.journal_schema"):
        journal = Journal(path)
    try:
        assert journal.status()["received"] == 1 and journal.status()["export_pending"] == 1
        assert journal.group_row("1.2.3.4").status == "done" and journal.group_row("1.2.3.4").first_received == 100.0
        assert [item.sop_instance_uid for item in journal.due_exports(now=1.0)] == ["1.2.3.9"]
        assert [a.card for a in journal.review_history("1.2.3.4")] == ["MODEL_01"]
    finally:
        journal.close()
    assert _version(path) == 4 and {"instances_by_group", "outbox_due", "outbox_by_group", "groups_by_status"} <= _indexes(path)
    backup = tmp_path / "journal.db.v1.bak"
    with sqlite3.connect(backup) as db:  # the copy taken before migrating: version 1, every row
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert "schema version 1, migrating to 4" in caplog.text and "migrated to schema version 4" in caplog.text


def test_a_version_2_journal_gets_the_retention_columns_and_keeps_its_rows(tmp_path):
    """Version 3 adds per group its first arrival and retention stage, and the clean-ups' intent table."""
    path = tmp_path / "journal.db"
    _old_spool(path)
    db = sqlite3.connect(path, isolation_level=None)
    from onevlm.net.journal_schema import MIGRATIONS

    MIGRATIONS[2](db)  # the release before this one: version 2
    db.execute("PRAGMA user_version = 2")
    db.close()
    journal = Journal(path)
    try:
        row = journal.group_row("1.2.3.4")
        assert (row.status, row.received, row.first_received) == ("done", 1, 100.0)
        assert journal.pending_cleanups() == [] and journal.status()["export_pending"] == 1
        # a pending export holds the group back from every clean-up
        assert journal.retention_candidates("reduce", 0.0) == []
    finally:
        journal.close()
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(groups)")}
        assert {"first_received", "retention", "retention_at"} <= columns
        assert db.execute("SELECT retention FROM groups").fetchall() == [(None,)]
        assert db.execute("SELECT COUNT(*) FROM cleanups").fetchone() == (0,)
    db.close()
    assert _version(path) == 4 and (tmp_path / "journal.db.v2.bak").is_file()


def test_a_journal_from_a_newer_release_is_refused_untouched(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(JournalSchemaError, match=f"version {SCHEMA_VERSION + 1} was written by a newer onevlm.*"
                                                 "left untouched"):
        Journal(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert _version(path) == SCHEMA_VERSION + 1


def test_the_service_and_status_say_why_in_one_line(tmp_path, capsys):
    from onevlm.cli import main

    spool = tmp_path / "spool"
    spool.mkdir()
    _old_spool(spool / "journal.sqlite")
    config = tmp_path / "service.yaml"
    config.write_text(f"spool_dir: {spool}\nlistener: {{host: 127.0.0.1, port: 11112}}\n")
    assert main(["status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "start the service once to migrate it" in err and len(err.splitlines()) == 1


def test_a_version_3_journal_gets_series_figures_and_the_service_fills_them_from_the_results_once(tmp_path):
    """Version 4 keeps per series what /status and /metrics count; a migrated journal's are read from the
    results folders once (the service's start), not at every scrape."""
    import json

    from onevlm.dashboard.study_index import BACKFILL_CURSOR, backfill_series_figures
    from onevlm.net.journal_schema import MIGRATIONS

    path = tmp_path / "journal.db"
    _old_spool(path)
    db = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[2](db)
    MIGRATIONS[3](db)
    db.execute("PRAGMA user_version = 3")
    db.close()
    results = tmp_path / "results" / "1.2.3.4"
    results.mkdir(parents=True)
    entries = [{"study_instance_uid": "1.2.3.4", "series_instance_uid": "1.2.3.5", "outcome": "routed",
                "cards": ["MODEL_01"], "confidence": 0.9, "calibrated": False, "vlm_calls": 0, "disagreement": None},
               {"study_instance_uid": "1.2.3.4", "series_instance_uid": "1.2.3.6", "outcome": "failed",
                "error": "pixel data cut short", "vlm_calls": None}]
    (results / "series.json").write_text(json.dumps({"entries": entries}))
    (results / "metadata.json").write_text(json.dumps({"outcome": "routed", "cards": "MODEL_01"}))
    record = {"reference": {"series_instance_uid": "1.2.3.5"}, "error": None, "vlm_calls": 0, "stages": []}
    (results / "decisions.jsonl").write_text(json.dumps(record) + "\n")
    journal = Journal(path)
    try:
        assert journal.routing_counts() == dict.fromkeys(
            ("vlm_calls", "series_decided", "series_without_vlm", "disagreements", "series_failed"), 0)
        assert backfill_series_figures(journal, tmp_path) == 1
        assert journal.routing_counts() == {"vlm_calls": 0, "series_decided": 1, "series_without_vlm": 1,
                                            "disagreements": 0, "series_failed": 1}
        assert journal.outcome_counts() == {"routed": 1, "failed": 1}
        assert journal.routed_confidences([0.5, 0.95]) == ([0, 1], 1, 0.9)
        assert journal.cursor(BACKFILL_CURSOR) == 1
        assert backfill_series_figures(journal, tmp_path) == 0  # once: a later start reads no folder
    finally:
        journal.close()
    assert _version(path) == 4
