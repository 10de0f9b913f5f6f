"""Retention: a finished group's instances shrink to what an amendment needs, results and records expire on
schedule, the journal is compacted, a spool cap deletes the oldest finished data first, and a kill -9 in the
middle of a clean-up is finished by the next start. Research use only."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_peers import (
    ServeProcess,
    journal_query,
    pydicom_file,
    running_service,
    service_config,
    storescp_node,
    storescu,
    wait_until,
    write_service_config,
)
from conftest import SAMPLES
from onevlm.dicom.header import read_header
from onevlm.net.config import ConfigError, RetentionConfig, parse_config
from onevlm.net.journal import Journal
from onevlm.net.retention import (
    DAY,
    PIXELS_REMOVED,
    TEST_DELAY_ENV,
    Retention,
    header_only_copy,
    is_header_only,
)
from onevlm.net.spool import Spool
from onevlm.reports.routing_metadata import DECISIONS_FILE, DETAIL_FILE, METADATA_FILE
from onevlm.net.review_answers import ReviewAnswer

CT = "CT_small.dcm"


# --------------------------------------------------------------------------- helpers


def ct_series(out: Path, study: str, series: str, count: int, first_number: int = 1, prefix: str = "") -> list[Path]:
    """``count`` copies of a real CT slice in one series, fresh SOP UIDs, Instance Numbers from ``first_number``."""
    ds = pydicom.dcmread(pydicom_file(CT))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(first_number, first_number + count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n
        path = out / f"{prefix}{series[-6:]}_{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def header_only(path: Path) -> bool:
    return is_header_only(pydicom.dcmread(path, stop_before_pixels=True))


def routed_sops(spool: Path, group: str) -> dict[str, str]:
    detail = json.loads((spool / "results" / group / DETAIL_FILE).read_text())
    return {e["series_instance_uid"]: e["routed_sop_instance_uid"] for e in detail["entries"]}


def sr_evidence(path: Path) -> int:
    sr = pydicom.dcmread(path)
    return sum(len(s.ReferencedSOPSequence) for study in sr.CurrentRequestedProcedureEvidenceSequence
               for s in study.ReferencedSeriesSequence)


def age(folder: Path, seconds: float = 3600) -> None:
    """Make every file under ``folder`` look ``seconds`` old (a clean-up leaves files newer than its plan)."""
    past = time.time() - seconds
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


# --------------------------------------------------------------------------- configuration


def test_retention_defaults_and_one_line_errors(tmp_path):
    config = parse_config({"spool_dir": str(tmp_path)}).retention
    assert config == RetentionConfig()
    assert (config.enabled, config.instances_after_sent, config.results_days, config.quarantine_days,
            config.journal_days, config.records_days, config.max_spool_bytes) == (True, "headers", 30, 30, 90, 365,
                                                                                 None)
    built = parse_config({"spool_dir": str(tmp_path), "retention": {
        "results_days": 0, "records_days": None, "journal_days": 7.5, "max_spool_bytes": 10**12,
        "instances_after_sent": "keep", "interval_seconds": 60}}).retention
    assert (built.results_days, built.records_days, built.journal_days, built.max_spool_bytes,
            built.instances_after_sent, built.interval_seconds) == (0.0, None, 7.5, 10**12, "keep", 60.0)
    bad = {
        "results_days": ("'30'", "retention.results_days: '30' must be a number of days >= 0"),
        "quarantine_days": (-1, "retention.quarantine_days: -1 must be a number of days >= 0"),
        "max_spool_bytes": (0, "retention.max_spool_bytes: 0 must be a whole number of bytes > 0"),
        "instances_after_sent": ("none", "retention.instances_after_sent: 'none' must be one of headers, keep"),
        "records_days": (10, "retention.records_days: must be at least results_days"),
        "enabled": ("yes", "retention.enabled: 'yes' must be true or false"),
        "keep_forever": (True, "retention.keep_forever: is not a known setting"),
    }
    for key, (value, message) in bad.items():
        value = "30" if value == "'30'" else value
        with pytest.raises(ConfigError) as caught:
            parse_config({"spool_dir": str(tmp_path), "retention": {key: value}}, source="svc.yaml")
        assert str(caught.value).startswith("svc.yaml: " + message) and "\n" not in str(caught.value), caught.value
    with pytest.raises(ValueError, match="instances_after_sent"):
        RetentionConfig(instances_after_sent="nothing")


def test_the_example_configuration_documents_the_retention_defaults():
    import yaml

    example = Path(__file__).resolve().parents[1] / "config" / "onevlm-service.example.yaml"
    section = yaml.safe_load(example.read_text())["retention"]
    assert parse_config({"spool_dir": "/tmp/x", "retention": section}).retention == RetentionConfig()


# --------------------------------------------------------------------------- header-only copies


def test_a_header_only_copy_keeps_the_header_and_is_never_a_series_image(tmp_path):
    source = ct_series(tmp_path, generate_uid(), generate_uid(), 1)[0]
    copy = tmp_path / "copy.dcm"
    header_only_copy(pydicom.dcmread(source, stop_before_pixels=True)).save_as(copy, enforce_file_format=True)
    original, reduced = read_header(source), read_header(copy)
    # a series is routed by one of its whole images, never by a copy (whose pixels are gone)
    assert not reduced.has_pixel_data and reduced.pixel_data_problem is None
    assert reduced.non_image_kind == "object without pixel data" and original.non_image_kind is None
    for name in ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "sop_class_uid", "modality",
                 "instance_number", "slice_position", "rows", "columns"):
        assert getattr(reduced, name) == getattr(original, name), name
    assert "PixelData" not in pydicom.dcmread(copy) and header_only(copy) and not header_only(source)
    assert copy.stat().st_size < source.stat().st_size / 4
    assert pydicom.dcmread(copy, stop_before_pixels=True).get_private_item(0x0009, 0x02, "ONEVLM").value == \
        PIXELS_REMOVED
    assert pydicom.dcmread(copy).PatientID == pydicom.dcmread(source).PatientID  # the SR copies these modules


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "j2k", "deflated", "enhanced"])
def test_the_header_only_copy_is_the_files_own_header_cut_before_its_pixels(tmp_path, syntax):
    """Retention's copy: the bytes before Pixel Data unchanged plus the mark (no re-encoding), or a re-encoded
    header where the dataset itself is deflated; either way the same header, no pixels, recognised, idempotent."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from onevlm.net.retention import header_only_bytes

    source = tmp_path / "source.dcm"
    if syntax in ("explicit", "implicit", "deflated"):
        ds = pydicom.dcmread(ct_series(tmp_path, generate_uid(), generate_uid(), 1)[0])
        if syntax == "implicit":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        if syntax == "deflated":
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(source, enforce_file_format=True)
    else:
        shutil.copy(SAMPLES / ("cr_chest_j2k.dcm" if syntax == "j2k" else "mr_head_enhanced_10frames.dcm"), source)
    data = header_only_bytes(source)
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(data)
    original, reduced = read_header(source), read_header(copy)
    assert not reduced.has_pixel_data and reduced.pixel_data_problem is None and original.has_pixel_data
    for name in ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "sop_class_uid", "modality",
                 "instance_number", "slice_position", "rows", "columns", "number_of_frames"):
        assert getattr(reduced, name) == getattr(original, name), name
    full = pydicom.dcmread(copy)  # parses to its end
    assert "PixelData" not in full and header_only(copy) and not header_only(source)
    assert full.PatientID == pydicom.dcmread(source).PatientID
    if syntax != "deflated":
        with open(source, "rb") as handle:
            pydicom.dcmread(handle, stop_before_pixels=True)
            head = handle.tell()
        assert data[:head] == source.read_bytes()[:head]  # byte for byte: nothing re-encoded
        mark = full.get_private_item(0x7FE1, 0x02, "ONEVLM").value
        assert (mark.decode().strip() if isinstance(mark, bytes) else mark) == PIXELS_REMOVED
    assert header_only_bytes(copy) is None  # a copy is not copied again
    assert len(data) < min(source.stat().st_size / 2, 16384)  # a header's size: the pixels went


# --------------------------------------------------------------------------- the life of a group (no network)


class FakeSite:
    """A spool and journal with groups written as the service writes them (instances, results, outbox)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = Spool(root / "spool")
        self.journal = Journal(root / "spool" / "journal.sqlite")

    def group(self, count: int = 4, export: str | None = "sent", status: str = "done") -> tuple[str, list[str]]:
        study, series = generate_uid(), generate_uid()
        sops = []
        for path in ct_series(self.root / "data", study, series, count):
            stored = self.spool.store(path.read_bytes())
            self.journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path, stored.sop_class_uid,
                                         "SCANNER")
            sops.append(stored.sop_instance_uid)
        results = self.spool.result_folder(study)
        (results / "sr").mkdir(parents=True)
        sr = results / "sr" / f"{generate_uid()}.dcm"
        sr.write_bytes(b"\0" * 2048)
        (results / DETAIL_FILE).write_text(json.dumps({"entries": [
            {"study_instance_uid": study, "series_instance_uid": series, "routed_sop_instance_uid": sops[count // 2],
             "outcome": "review"}]}))
        (results / DECISIONS_FILE).write_text(json.dumps({"reference": {"series_instance_uid": series}}) + "\n")
        (results / METADATA_FILE).write_text(json.dumps({"outcome": "review"}))
        if export is not None:
            self.journal.enqueue_export(study, "pacs", sr.stem, "1.2.840.10008.5.1.4.1.1.88.34", sr, "d")
            item = self.journal.due_exports(float("inf"))[-1]
            if export == "sent":
                self.journal.mark_sent(item.id)
            elif export == "failed":
                self.journal.mark_failed_attempt(item.id, "refused", None)
        self.journal.set_group(study, status)
        return study, sops

    def files(self, group: str) -> dict[str, bool]:
        """Instance files of a group: SOP UID → header-only."""
        return {p.stem: header_only(p) for p in self.spool.group_folder(group).glob("*.dcm")}

    def retention(self, busy=None, **settings) -> Retention:
        return Retention(RetentionConfig(**settings), self.spool, self.journal, busy=busy)


def test_a_group_shrinks_expires_is_compacted_and_forgotten_on_schedule(tmp_path):
    site = FakeSite(tmp_path)
    reviewed, reviewed_sops = site.group(5)
    plain, plain_sops = site.group(3)
    pending, _ = site.group(3, export="pending")
    unsent, _ = site.group(3, export="failed")
    receiving, _ = site.group(3, export=None, status="receiving")
    series = json.loads((site.spool.result_folder(reviewed) / DETAIL_FILE).read_text())["entries"][0]
    site.journal.record_review(ReviewAnswer(reviewed, series["series_instance_uid"], "not-routable", None, "dr-a",
                                            ""))
    age(site.spool.root)
    retention = site.retention()

    run = retention.run_once()
    assert run.reduced == 2 and run.expired == 0
    kept = series["routed_sop_instance_uid"]
    assert site.files(reviewed) == {sop: sop != kept for sop in reviewed_sops}  # the routed one whole
    for group in (pending, unsent, receiving):  # unsent or unfinished: untouched
        assert not any(site.files(group).values())
    assert run.held == {"unsent": 1, "unfinished": 2}
    assert run.removed_files == 6 and run.freed_bytes > 6 * 3000
    assert retention.run_once().reduced == 0  # done once

    now = time.time()
    age(site.spool.root)
    run = retention.run_once(now=now + 31 * DAY)
    assert run.expired == 2
    assert site.files(plain) == {} and not site.spool.group_folder(plain).exists()
    assert site.files(reviewed) == {kept: False}  # a reviewer's label keeps its image
    for group in (plain, reviewed):
        results = site.spool.result_folder(group)
        assert not (results / "sr").exists()
        assert {p.name for p in results.iterdir()} == {DETAIL_FILE, DECISIONS_FILE, METADATA_FILE}
    from onevlm.dashboard.labels_export import label_rows
    from onevlm.dashboard.study_index import StudyIndex

    index = StudyIndex(site.spool.root)
    assert index.group(plain).series[0].outcome == "review"  # the decision record reads as before
    labels = label_rows(index, site.journal.latest_reviews(), cards=None)
    assert labels.missing_file == 0 and [Path(r[0]).stem for r in labels.rows] == [kept]  # the label's image
    assert site.files(unsent) and site.files(pending)

    first = site.journal.group_row(plain).first_received
    run = retention.run_once(now=now + 91 * DAY)
    assert run.compacted == 2
    rows = dict(journal_query(site.spool.root, "SELECT group_key, COUNT(*) FROM instances GROUP BY group_key"))
    assert plain not in rows and rows[reviewed] == 1  # the kept image's row stays
    assert site.journal.group_row(plain).first_received == first and site.journal.group_row(plain).received == 3
    assert site.journal.status()["exported"] == 2  # the outbox rows (what was sent where) stay

    run = retention.run_once(now=now + 366 * DAY)
    assert run.forgotten == 2
    for group in (plain, reviewed):
        assert not site.spool.result_folder(group).exists() and not site.spool.group_folder(group).exists()
        assert site.journal.group_row(group) is None
    assert [a.kind for a in site.journal.review_history(reviewed)] == ["not-routable"]  # the labels' history stays
    assert site.journal.group_row(unsent).status == "done" and site.files(unsent)
    assert site.journal.pending_cleanups() == []
    assert site.journal.counter("retention_removed_files") >= 6 + 6


def test_clean_ups_ask_whether_the_pipeline_has_work_after_each_file_and_still_finish(tmp_path):
    """Background work: while the pipeline is busy retention pauses after each file (a quarter of the pace), and
    it still gets everything done; with the pipeline idle it never pauses. Series figures of a forgotten group go."""
    site = FakeSite(tmp_path)
    groups = [site.group(4)[0] for _ in range(3)]
    from onevlm.reports.series_figures import SeriesFigures

    for group in groups:
        site.journal.record_series_figures(group, [SeriesFigures(generate_uid(), "review", None, False, 0, False, True)])
    age(site.spool.root)
    asked = []

    def busy() -> bool:
        asked.append(time.monotonic())
        return len(asked) % 2 == 0  # busy every other time it asks

    run = site.retention(busy=busy).run_once()
    assert run.reduced == 3 and run.removed_files == 9
    assert len(asked) == 9  # once per reduced file
    assert all(sum(site.files(g).values()) == 3 for g in groups)
    now = time.time()
    age(site.spool.root)
    run = site.retention(busy=busy).run_once(now=now + 31 * DAY)
    assert run.expired == 3 and len(asked) == 9 + 3  # once per expired group
    assert site.journal.routing_counts()["series_decided"] == 3  # expired: the decision records stay, counted
    site.retention().run_once(now=now + 91 * DAY)
    site.retention().run_once(now=now + 366 * DAY)
    assert not any(site.journal.has_series_figures(g) for g in groups)  # forgotten: no longer counted
    assert site.journal.routing_counts()["series_decided"] == 0


def test_a_late_instance_makes_an_expired_group_live_again(tmp_path):
    site = FakeSite(tmp_path)
    group, _ = site.group(3)
    age(site.spool.root)
    retention = site.retention(results_days=0)
    assert retention.run_once().expired == 1 and site.files(group) == {}
    late = ct_series(tmp_path / "late", group, generate_uid(), 1)[0]
    stored = site.spool.store(late.read_bytes())
    site.journal.record_instance(stored.sop_instance_uid, group, stored.path, stored.sop_class_uid, "SCANNER")
    age(site.spool.root)
    run = retention.run_once()
    assert run.expired == 0 and site.files(group) == {stored.sop_instance_uid: False}  # receiving: untouched
    site.journal.set_group(group, "done")
    age(site.spool.root)
    assert retention.run_once().expired == 1 and site.files(group) == {}


def test_the_spool_cap_removes_the_oldest_finished_data_first_and_never_unsent(tmp_path, caplog):
    site = FakeSite(tmp_path)
    old, _ = site.group(4)
    time.sleep(0.05)
    new, _ = site.group(4)
    unsent, _ = site.group(4, export="failed")
    for n in range(2):
        site.spool.quarantine(b"junk" * 1000, f"reason {n}")
    age(site.spool.root)
    from onevlm.net.spool import folder_bytes

    total = folder_bytes(site.spool.root)
    group_bytes = sum(p.stat().st_size for p in site.spool.group_folder(old).glob("*"))
    cap = total - group_bytes // 2  # one group's instances are enough
    retention = site.retention(instances_after_sent="keep", max_spool_bytes=cap)
    run = retention.run_once()
    assert run.expired_for_cap == 1 and run.over_cap_bytes == 0
    assert site.files(old) == {} and len(site.files(new)) == 4 and len(site.files(unsent)) == 4
    assert site.spool.quarantined() == 2

    retention = site.retention(instances_after_sent="keep", max_spool_bytes=1000)
    with caplog.at_level("ERROR", logger="onevlm.net.retention"):
        run = retention.run_once()
    assert site.files(new) == {} and len(site.files(unsent)) == 4 and site.spool.quarantined() == 0
    assert run.over_cap_bytes > 0 and retention.status()["over_cap"] is True
    assert "event=retention_over_cap" in caplog.text and "held_unsent=1" in caplog.text
    assert site.journal.cursor("retention_over_cap_bytes") == run.over_cap_bytes
    from onevlm.net.metrics import ServiceMetrics

    text = ServiceMetrics(site.journal, site.spool.root, ["pacs"]).exposition()[0].decode()
    figures = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("onevlm_ret")}
    assert figures["onevlm_retention_over_cap_bytes"] == run.over_cap_bytes > 0
    assert figures["onevlm_retention_freed_bytes_total"] == site.journal.counter("retention_freed_bytes") > 8 * 30000
    assert figures["onevlm_retention_removed_files_total"] == 2 * (4 + 1) + 2  # instances + SR, quarantine


def test_old_quarantined_files_go_with_their_reason(tmp_path):
    site = FakeSite(tmp_path)
    old = site.spool.quarantine(b"old", "unparseable")
    age(site.spool.root, 40 * DAY)
    new = site.spool.quarantine(b"new", "unparseable")
    run = site.retention().run_once()
    assert run.quarantine_files == 1 and not old.exists() and not old.with_suffix(".reason.txt").exists()
    assert new.exists() and new.with_suffix(".reason.txt").exists()


def test_a_clean_up_interrupted_is_finished_and_files_newer_than_its_plan_are_kept(tmp_path):
    site = FakeSite(tmp_path)
    group, sops = site.group(5)
    age(site.spool.root)
    planned = time.time()
    cleanup = site.journal.plan_cleanup(group, "expire", "schedule", planned, planned)
    assert cleanup is not None
    (site.spool.group_folder(group) / f"{sops[0]}.dcm").unlink()  # the crash came after the first file
    late = ct_series(tmp_path / "late", group, generate_uid(), 1)[0]
    stored = site.spool.store(late.read_bytes())  # arrived after the plan: never removed by it
    assert site.retention().finish_pending() == 1
    assert site.files(group) == {stored.sop_instance_uid: False}
    assert site.journal.pending_cleanups() == []


def test_instances_too_fresh_to_touch_are_reduced_by_a_later_pass(tmp_path):
    site = FakeSite(tmp_path)
    group, sops = site.group(4)  # written just now: a clean-up planned now leaves them alone
    retention = site.retention()
    run = retention.run_once()
    assert run.removed_files == 0 and not any(site.files(group).values())
    assert journal_query(site.spool.root, "SELECT retention FROM groups") == [(None,)]  # still a candidate
    age(site.spool.root)
    assert retention.run_once().removed_files == 3 and sum(site.files(group).values()) == 3


# --------------------------------------------------------------------------- the service


@pytest.mark.slow
def test_an_amendment_after_the_instances_shrank_reads_the_headers_and_resends_nothing_unchanged(tmp_path):
    """10 instances → SR sent → the series shrinks to its routed instance + 9 header-only copies; a new series
    in the study gets its SR and the first series' SR is not sent again; 5 more instances of the first series
    give an amended SR whose evidence lists all 15, routed by a whole image (kept whole again afterwards)."""
    spool = tmp_path / "spool"
    study, first_series, second_series = generate_uid(), generate_uid(), generate_uid()
    first = ct_series(tmp_path / "data", study, first_series, 10)
    second = ct_series(tmp_path / "data", study, second_series, 2)
    more = ct_series(tmp_path / "data", study, first_series, 5, first_number=11)
    with storescp_node(tmp_path / "storescp", "STORESCP") as node:
        config = service_config(spool, destinations=[node], retention={"interval_seconds": 0.3})
        with running_service(config) as service:
            def reduced() -> bool:
                rows = journal_query(spool, "SELECT retention FROM groups WHERE group_key = ? AND "
                                            "retention_at >= updated_at", (study,))
                return rows == [("reduced",)]

            assert storescu(first, service.listener.port).returncode == 0
            wait_until(lambda: service.status()["exported"] == 1, 60, 0.2, "the first SR sent")
            wait_until(reduced, 30, 0.2, "the instances reduced")
            incoming = spool / "incoming" / study
            routed = routed_sops(spool, study)[first_series]
            shrunk = {p.stem: header_only(p) for p in incoming.glob("*.dcm")}
            assert len(shrunk) == 10 and [sop for sop, h in shrunk.items() if not h] == [routed]
            assert service.status()["retention"]["removed_files_total"] == 9

            assert storescu(second, service.listener.port).returncode == 0
            wait_until(lambda: service.status()["exported"] == 2 and reduced(), 60, 0.2, "the new series' SR")
            time.sleep(0.5)
            assert service.status()["exported"] == 2  # the first series' SR: unchanged, not sent again
            assert journal_query(spool, "SELECT COUNT(*) FROM results WHERE version > 1") == [(0,)]

            assert storescu(more, service.listener.port).returncode == 0
            wait_until(lambda: service.status()["exported"] == 3, 60, 0.2, "the amended SR")
            wait_until(lambda: reduced() and service.status()["retention"]["pending_cleanups"] == 0, 30, 0.2,
                       "the grown series reduced again")
            status = service.status()
            shrunk = {p.stem: header_only(p) for p in incoming.glob("*.dcm")}
        assert status["failed"] == 0 and status["retention"]["over_cap"] is False
        assert len(shrunk) == 17 and sorted(sop for sop, h in shrunk.items() if not h) == sorted(
            routed_sops(spool, study).values())  # one whole instance per series
    amended_by = routed_sops(spool, study)[first_series]
    assert amended_by != routed and pydicom.dcmread(incoming / f"{amended_by}.dcm").pixel_array.shape == (128, 128)
    srs = sorted((tmp_path / "storescp").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(srs) == 3 and sr_evidence(srs[-1]) == 15 and sr_evidence(srs[0]) == 10
    amended = pydicom.dcmread(srs[-1])
    assert amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == pydicom.dcmread(srs[0]).SOPInstanceUID


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_clean_up_is_finished_by_the_next_start(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    study, series = generate_uid(), generate_uid()
    files = ct_series(tmp_path / "data", study, series, 12)
    config = write_service_config(tmp_path / "service.yaml", spool, retention={"interval_seconds": 0.3})
    log = tmp_path / "serve.log"
    monkeypatch.setenv(TEST_DELAY_ENV, "0.4")
    serve = ServeProcess(config, log).start()
    try:
        from dicom_peers import listener_port

        assert storescu(files, listener_port(config)).returncode == 0
        incoming = spool / "incoming" / study

        def mid_way() -> bool:
            if journal_query(spool, "SELECT COUNT(*) FROM cleanups") != [(1,)]:
                return False
            return 2 <= sum(header_only(p) for p in incoming.glob("*.dcm")) <= 8

        wait_until(mid_way, 60, 0.05, lambda: f"the clean-up under way\n{serve.log_tail()}")
        serve.kill()
    finally:
        serve.stop()
    before = {p.stem: header_only(p) for p in incoming.glob("*.dcm")}
    assert len(before) == 12 and 0 < sum(before.values()) < 11  # half done
    assert journal_query(spool, "SELECT action FROM cleanups") == [("reduce",)]
    routed = routed_sops(spool, study)[series]

    monkeypatch.delenv(TEST_DELAY_ENV)
    with ServeProcess(config, log):
        wait_until(lambda: journal_query(spool, "SELECT COUNT(*) FROM cleanups") == [(0,)], 30, 0.1,
                   "the interrupted clean-up finished")
        after = {p.stem: header_only(p) for p in incoming.glob("*.dcm")}
        rows = journal_query(spool, "SELECT status, received, retention FROM groups WHERE group_key = ?", (study,))
    assert after == {sop: sop != routed for sop in before}  # every instance there, the routed one whole
    assert rows == [("done", 12, "reduced")]  # not reopened: the restart's recovery found every file known
    assert journal_query(spool, "SELECT COUNT(*) FROM instances") == [(12,)]
    assert not list((spool / "tmp").iterdir())
    assert (spool / "results" / study / METADATA_FILE).is_file()
    assert "event=retention_resume action=reduce" in log.read_text()
    pydicom.dcmread(incoming / f"{routed}.dcm").pixel_array  # the routed image still decodes


# --------------------------------------------------------------------------- by hand: the CLI and offline status


def test_retention_run_by_hand_on_a_stopped_spool_and_refused_while_a_service_owns_it(tmp_path, capsys):
    """`onevlm retention run` makes one pass over a stopped service's spool; while a service owns the spool (its
    lock) it refuses and says why; `onevlm status` shows retention's totals and the disk's answer offline."""
    import yaml

    from onevlm.cli import main
    from onevlm.net.spool_owner import SpoolBusy, SpoolOwner

    site = FakeSite(tmp_path)
    group, sops = site.group(4)
    age(site.spool.root)
    site.journal.close()
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({"spool_dir": str(site.spool.root), "retention": {"results_days": 30}}))

    service = SpoolOwner(site.spool.root)
    service.acquire()  # as `onevlm serve` holds it
    try:
        assert main(["retention", "run", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert f"PID {os.getpid()}" in err and "the running service cleans up every" in err
        with pytest.raises(SpoolBusy, match="a second service needs it to itself"):
            SpoolOwner(site.spool.root).acquire("a second service")
    finally:
        service.release()
    assert not any(header_only(p) for p in site.spool.group_folder(group).glob("*.dcm"))  # nothing touched

    assert main(["retention", "run", "--config", str(config), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["reduced"] == 1 and run["removed_files"] == 3 and run["freed_bytes"] > 0
    assert sum(header_only(p) for p in site.spool.group_folder(group).glob("*.dcm")) == 3
    assert main(["retention", "run", "--config", str(config)]) == 0
    assert "0 group(s) reduced" in capsys.readouterr().out  # done once

    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["retention"]["removed_files_total"] == 3 and status["retention"]["pending_cleanups"] == 0
    assert status["retention"]["enabled"] is True and status["retention"]["held"] == {"unsent": 0, "unfinished": 0}
    assert status["intake"] == {"accepting": True, "reason": None} and status["processed"] == 1
    assert {"vlm_calls", "series_decided", "series_failed"} <= status.keys()
