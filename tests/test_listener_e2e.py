"""End to end: scanner (dcmtk storescu, ``onevlm send``) → onevlm listener service → PACS (Orthanc).

Each test starts its own peers on loopback with free ports and stops them, also on failure:
Orthanc as the destination PACS, the service in-process or as ``onevlm serve`` (a real child
process, configured by a YAML file the test writes). Test data are copies of real CT images
with fresh UIDs. Research use only.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from conftest import SAMPLES
from dicom_peers import (
    ONEVLM,
    REPO,
    Pacs,
    ServeProcess,
    SilentServer,
    journal_query,
    journal_status,
    listener_port,
    make_copies,
    onevlm_status,
    pydicom_file,
    running_service,
    service_config,
    spool_files,
    storescp_node,
    storescu,
    storescu_acknowledged,
    storescu_popen,
    wait_until,
    write_service_config,
)

pytestmark = pytest.mark.slow


def series_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in paths}


def sr_evidence_studies(pacs: Pacs, orthanc_id: str) -> set[str]:
    """Study UIDs the SR's Current Requested Procedure Evidence references (read from the stored file)."""
    import io
    import urllib.request

    with urllib.request.urlopen(f"{pacs.url}/instances/{orthanc_id}/file", timeout=30) as response:
        sr = pydicom.dcmread(io.BytesIO(response.read()))
    return {str(item.StudyInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence}


def all_routing_srs_arrived(pacs: Pacs, expected: dict[str, int]):
    """``pacs.routing_srs()`` once every study has (at least) its expected number of routing SRs."""
    found = pacs.routing_srs()
    if all(len(found.get(study, [])) >= count for study, count in expected.items()):
        return found
    return None


# --------------------------------------------------------------------------- 7. scanner → service → PACS


def test_scanner_to_service_to_pacs_with_onevlm_serve(tmp_path):
    spool = tmp_path / "spool"
    studies = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=3, per_study=6, series_per_study=2)
    j2k = SAMPLES / "ct_head_512_j2k.dcm"  # JPEG 2000: storescu cannot send it without codecs, onevlm send can
    j2k_header = pydicom.dcmread(j2k, stop_before_pixels=True)
    expected = {study: len(series_uids(paths)) for study, paths in studies.items()}
    expected[str(j2k_header.StudyInstanceUID)] = 1
    total = sum(len(p) for p in studies.values()) + 1

    with Pacs(tmp_path / "pacs") as pacs:
        config = write_service_config(tmp_path / "service.yaml", spool, destinations=[pacs.destination()],
                                      listener={"allowed_calling_ae_titles": ["STORESCU", "SCANNER1"]})
        serve = ServeProcess(config, tmp_path / "serve.log")
        with serve:
            port = listener_port(config)
            sent = storescu([p for paths in studies.values() for p in paths], port)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert len(storescu_acknowledged(sent.stdout + sent.stderr)) == total - 1
            send = subprocess.run([*ONEVLM, "send", str(j2k), "--to", f"ONEVLM@127.0.0.1:{port}", "--aet", "SCANNER1"],
                                  capture_output=True, text=True, timeout=120, cwd=REPO)
            assert send.returncode == 0, send.stdout + send.stderr
            assert "sent 1 of 1" in send.stdout

            found = wait_until(lambda: all_routing_srs_arrived(pacs, expected), 120, 0.5,
                               lambda: f"the routing SRs in Orthanc ({serve.log_tail()})")
            for study, count in expected.items():
                srs = found[study]
                assert len(srs) == count, f"study {study}: {len(srs)} SRs for {count} image series"
                for sr in srs:
                    assert sr["SeriesDescription"].startswith("onevlm routing")
                    assert sr_evidence_studies(pacs, sr["OrthancID"]) == {study}
            assert set(found) == set(expected), "an SR for a study nobody sent"
            assert spool_files(spool) == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                          for paths in studies.values() for p in paths} | {str(j2k_header.SOPInstanceUID)}

            wait_until(lambda: journal_status(config)["exported"] == sum(expected.values()), 30,
                       message="the exports to be recorded")
            status = onevlm_status(config)
            assert status["received"] == total and status["duplicates"] == 0
            assert status["processed"] == len(expected) and status["failed"] == 0
            assert status["export_pending"] == 0 and status["quarantine_files"] == 0
        assert serve.process.returncode == 0, serve.log_tail()  # SIGTERM: a clean stop
        assert "event=exported" in serve.log_path.read_text()

    # `onevlm status` reads the journal with the service stopped, too (indented JSON without --json)
    shown = subprocess.run([*ONEVLM, "status", "--config", str(config)], capture_output=True, text=True, timeout=60,
                           cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["exported"] == sum(expected.values())
    assert "\n  " in shown.stdout


# --------------------------------------------------------------------------- 8. concurrency


def test_concurrent_associations(tmp_path):
    spool = tmp_path / "spool"
    studies = make_copies(pydicom_file("693_UNCR.dcm"), tmp_path / "data", studies=4, per_study=52)
    files = [p for paths in studies.values() for p in paths]
    senders = 4
    # every sender sends a quarter of every study, so all four studies receive on four associations at once
    shares = [[p for paths in studies.values() for p in paths[k::senders]] for k in range(senders)]
    with Pacs(tmp_path / "pacs") as pacs:
        config = service_config(spool, destinations=[pacs.destination()], grouping={"by": "study", "idle_seconds": 2})
        with running_service(config) as service:
            port = service.listener.port
            started = time.monotonic()
            processes = [storescu_popen(share, port, tmp_path / f"storescu{k}.log") for k, share in enumerate(shares)]
            try:
                codes = [p.wait(timeout=180) for p in processes]
            finally:
                for p in processes:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            seconds = time.monotonic() - started
            logs = [(tmp_path / f"storescu{k}.log").read_text() for k in range(senders)]
            assert codes == [0] * senders, "\n".join(log[-2000:] for log in logs)
            acknowledged = [p for log in logs for p in storescu_acknowledged(log)]
            assert sorted(acknowledged) == sorted(files)
            print(f"{len(files)} instances on {senders} associations in {seconds:.1f} s")

            assert spool_files(spool) == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                          for p in files}
            journaled = journal_query(spool, "SELECT group_key, COUNT(*) FROM instances GROUP BY group_key")
            assert dict(journaled) == {study: len(paths) for study, paths in studies.items()}
            assert service.status()["received"] == len(files)

            found = wait_until(lambda: all_routing_srs_arrived(pacs, {s: 1 for s in studies}), 120, 0.5,
                               "one routing SR per study in Orthanc")
            wait_until(lambda: service.status()["exported"] == len(studies), 30, message="exports recorded")
            time.sleep(1.5)  # anything sent twice would arrive now
            found = pacs.routing_srs()
            assert {study: len(srs) for study, srs in found.items()} == {study: 1 for study in studies}
            assert pacs.count_instances() == len(studies)
            status = service.status()
            assert (status["processed"], status["exported"], status["export_pending"], status["failed"]) == \
                (len(studies), len(studies), 0, 0)
            sent = journal_query(spool, "SELECT COUNT(*) FROM outbox WHERE status = 'sent'")[0][0]
            assert sent == len(studies)
            attempts = dict(journal_query(spool, "SELECT group_key, attempts FROM groups"))
            exported = dict(journal_query(spool, "SELECT name, value FROM counters"))["exported"]
            if all(a == 1 for a in attempts.values()):  # each study processed once: each SR sent once
                assert exported == len(studies)


def _spool_paths(spool: Path) -> list[Path]:
    return sorted((spool / "incoming").glob("*/*.dcm"))


# --------------------------------------------------------------------------- 9. crash safety


def test_kill_9_mid_burst_loses_nothing_acknowledged(tmp_path):
    spool = tmp_path / "spool"
    studies = make_copies(pydicom_file("693_UNCR.dcm"), tmp_path / "data", studies=3, per_study=50)
    files = [p for paths in studies.values() for p in paths]
    uid_of = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    with Pacs(tmp_path / "pacs") as pacs:
        config = write_service_config(tmp_path / "service.yaml", spool, destinations=[pacs.destination()],
                                      grouping={"by": "study", "idle_seconds": 1})
        port = listener_port(config)
        serve = ServeProcess(config, tmp_path / "serve.log")
        burst = None
        try:
            serve.start()
            burst = storescu_popen(files, port, tmp_path / "burst.log")
            # One association stores in order: an instance lands in the spool before it is acknowledged,
            # so at the kill the last one or two in the spool may still lack their acknowledgement.
            wait_until(lambda: len(spool_files(spool)) >= 42 or burst.poll() is not None, 60, 0.02,
                       "42 instances in the spool")
            serve.kill()
            assert burst.wait(timeout=60) != 0, "storescu finished before the kill: nothing was tested"
            acknowledged = storescu_acknowledged((tmp_path / "burst.log").read_text())
            assert 40 <= len(acknowledged) < len(files)
            on_disk = spool_files(spool)
            missing = {uid_of[p] for p in acknowledged} - on_disk
            assert not missing, f"{len(missing)} acknowledged instances are not in the spool after kill -9"

            print(f"killed after {len(acknowledged)} acknowledged, {len(on_disk)} in the spool, "
                  f"{len(journal_query(spool, 'SELECT 1 FROM instances'))} journaled")
            serve.start()  # recovery: partial writes cleared, unjournaled files recorded
            again = storescu(files, port, timeout=180)  # resend everything; duplicates are fine
            assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]

            found = wait_until(lambda: all_routing_srs_arrived(pacs, {s: 1 for s in studies}), 120, 0.5,
                               lambda: f"one routing SR per study in Orthanc ({serve.log_tail()})")
            wait_until(lambda: (lambda s: s["processed"] == len(studies) and s["export_pending"] == 0)(
                journal_status(config)), 60, 0.5, "every study processed and exported")
            time.sleep(1.5)
            found = pacs.routing_srs()
        finally:
            if burst is not None and burst.poll() is None:
                burst.kill()
                burst.wait()
            serve.stop()

        assert spool_files(spool) == set(uid_of.values())
        assert {uid_of[p] for p in acknowledged} <= spool_files(spool)
        for path in _spool_paths(spool):  # every file in the spool is whole
            ds = pydicom.dcmread(path)
            assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8, path.name
        assert list((spool / "tmp").iterdir()) == []
        status = onevlm_status(config)
        assert status["received"] == len(files)
        assert status["processed"] == len(studies) and status["failed"] == 0 and status["queued"] == 0
        groups = dict(journal_query(spool, "SELECT group_key, status FROM groups"))
        assert groups == {study: "done" for study in studies}
        assert {study: len(srs) for study, srs in found.items()} == {study: 1 for study in studies}
        sr_uids = [sr["SOPInstanceUID"] for sr in pacs.sr_instances()]
        assert len(sr_uids) == len(set(sr_uids)) == len(studies), Counter(sr_uids)
        assert pacs.count_instances() == len(studies)
        attempts = dict(journal_query(spool, "SELECT group_key, attempts FROM groups"))
        exported = dict(journal_query(spool, "SELECT name, value FROM counters"))["exported"]
        if all(a == 1 for a in attempts.values()):  # each study processed once: each SR sent once
            assert exported == len(studies)


# --------------------------------------------------------------------------- 10. export retry


def test_export_retries_until_the_pacs_comes_up(tmp_path):
    spool = tmp_path / "spool"
    studies = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=4)
    (study_uid, files), = studies.items()
    pacs = Pacs(tmp_path / "pacs")  # ports chosen, not started yet: the destination is down
    config = service_config(spool, destinations=[pacs.destination()],
                            retry={"base_seconds": 0.2, "max_seconds": 1, "max_attempts": 1000})
    try:
        with running_service(config) as service:
            sent = storescu(files, service.listener.port)
            assert sent.returncode == 0, sent.stdout + sent.stderr

            def failing() -> bool:
                rows = journal_query(spool, "SELECT status, attempts, last_error FROM outbox")
                return len(rows) == 1 and rows[0][0] == "pending" and rows[0][1] >= 3

            wait_until(failing, 60, 0.2, "three failed export attempts")
            status = service.status()
            assert status["export_pending"] == 1 and status["exported"] == 0
            assert status["export_failures"] >= 3 and status["processed"] == 1
            (error,), = journal_query(spool, "SELECT last_error FROM outbox")
            assert "PACS" in error

            pacs.start()
            found = wait_until(lambda: all_routing_srs_arrived(pacs, {study_uid: 1}), 60, 0.3, "the SR in Orthanc")
            wait_until(lambda: service.status()["exported"] == 1, 30, message="the export to be recorded")
            status = service.status()
            assert status["export_pending"] == 0 and status["failed"] == 0
            (attempts, state), = journal_query(spool, "SELECT attempts, status FROM outbox")
            assert state == "sent" and attempts >= 3
            assert len(found[study_uid]) == 1
            assert pacs.count_instances() == 1
    finally:
        pacs.stop()


# --------------------------------------------------------------------------- 11. amended results


def _sr_files(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]


def _evidence_count(sr: pydicom.Dataset) -> int:
    return sum(len(series.ReferencedSOPSequence) for study in sr.CurrentRequestedProcedureEvidenceSequence
               for series in study.ReferencedSeriesSequence)


def test_a_grown_study_gets_an_amended_sr_with_a_new_uid(tmp_path):
    """10 instances, their SR; 5 more of the same series: a second SR in the same series with a new SOP Instance
    UID naming the first as its predecessor, both in the PACS (Orthanc keeps the first copy of a UID, so a
    re-sent UID would leave the partial result there); sending everything again changes nothing."""
    spool = tmp_path / "spool"
    (study_uid, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=15).items()
    with Pacs(tmp_path / "pacs") as pacs, storescp_node(tmp_path / "storescp", "STORESCP") as storescp:
        config = service_config(spool, destinations=[pacs.destination(), storescp])
        with running_service(config) as service:
            assert storescu(files[:10], service.listener.port).returncode == 0
            wait_until(lambda: service.status()["exported"] == 2, 60, 0.2, "the first SR at both destinations")
            assert storescu(files[10:], service.listener.port).returncode == 0
            wait_until(lambda: service.status()["exported"] == 4, 60, 0.2, "the amended SR at both destinations")
            assert storescu(files, service.listener.port).returncode == 0  # all again: duplicates, same content
            wait_until(lambda: service.status()["duplicates"] >= 15 and service.status()["queued"] == 0, 60, 0.2,
                       "the duplicates processed")
            time.sleep(1.0)
            status = service.status()
        assert status["exported"] == 4 and status["export_pending"] == 0 and status["failed"] == 0
        in_orthanc = pacs.routing_srs()[study_uid]
        assert len(in_orthanc) == 2
        first, second = sorted(_sr_files(tmp_path / "storescp"), key=_evidence_count)
    assert {first.SOPInstanceUID, second.SOPInstanceUID} == {sr["SOPInstanceUID"] for sr in in_orthanc}
    assert first.SOPInstanceUID != second.SOPInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID
    assert (_evidence_count(first), _evidence_count(second)) == (10, 15)
    assert "PredecessorDocumentsSequence" not in first
    (predecessor,) = second.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == study_uid
    (series,) = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (first.SOPClassUID, first.SOPInstanceUID)
    assert second.CompletionFlag == "COMPLETE" and second.VerificationFlag == "UNVERIFIED"
    assert dciodvfy_errors_of(second) == []
    versions = journal_query(spool, "SELECT version, sop_instance_uid FROM results")
    assert versions == [(2, second.SOPInstanceUID)]


def dciodvfy_errors_of(dataset: pydicom.Dataset) -> list[str]:
    from dicom_validation import dciodvfy_errors

    path = Path(f"/tmp/onevlm-amended-{dataset.SOPInstanceUID}.dcm")
    dataset.save_as(path, enforce_file_format=True)
    try:
        return dciodvfy_errors(path)
    finally:
        path.unlink()


# --------------------------------------------------------------------------- 12. DICOMweb (STOW-RS) destination


class AuthenticatedPacs(Pacs):
    """Orthanc with HTTP basic authentication on its REST and DICOMweb API."""

    USER, PASSWORD = "onevlm", "stow-secret"

    def config(self) -> dict:
        return {**super().config(), "AuthenticationEnabled": True, "RegisteredUsers": {self.USER: self.PASSWORD}}

    def get_json(self, path: str):
        import base64
        import urllib.request

        request = urllib.request.Request(self.url + path)
        token = base64.b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def test_results_go_to_a_dicomweb_destination_by_stow_rs(tmp_path, monkeypatch):
    """A `dicomweb:` destination with basic auth (password from the environment): the SR arrives in Orthanc's
    DICOMweb store once; a wrong password is a failed attempt that is retried, not a lost result."""
    monkeypatch.setenv("ONEVLM_TEST_STOW_PASSWORD", AuthenticatedPacs.PASSWORD)
    monkeypatch.setenv("ONEVLM_TEST_WRONG_PASSWORD", "not-it")
    spool = tmp_path / "spool"
    (study_uid, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=3).items()
    with AuthenticatedPacs(tmp_path / "pacs") as pacs:
        root = f"{pacs.url}/dicom-web"
        good = {"name": "vna", "dicomweb": root, "auth": "basic", "username": pacs.USER,
                "password_env": "ONEVLM_TEST_STOW_PASSWORD"}
        wrong = {"name": "wrong", "dicomweb": root, "auth": "basic", "username": pacs.USER,
                 "password_env": "ONEVLM_TEST_WRONG_PASSWORD"}
        config = service_config(spool, destinations=[good, wrong],
                                retry={"base_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 3})
        with running_service(config) as service:
            assert storescu(files, service.listener.port).returncode == 0
            wait_until(lambda: service.status()["exported"] == 1 and service.status()["failed"] == 1, 60, 0.2,
                       "the SR stored by STOW-RS, the wrong password given up after 3 attempts")
            status = service.status()
        found = pacs.routing_srs()
    assert list(found) == [study_uid] and len(found[study_uid]) == 1
    assert status["export_failures"] == 3
    rows = journal_query(spool, "SELECT destination, status, attempts, last_error FROM outbox ORDER BY destination")
    assert [(r[0], r[1]) for r in rows] == [("vna", "sent"), ("wrong", "failed")]
    assert "HTTP 401" in rows[1][3] and root in rows[1][3]


def test_a_stow_rs_request_to_a_server_that_never_answers_ends_at_the_timeout_without_retries(tmp_path):
    from onevlm.net.config import Destination
    from onevlm.net.stow import stow_files

    with SilentServer() as server:
        destination = Destination(name="dead", dicomweb=server.url, timeout_seconds=1.0)
        started = time.monotonic()
        with pytest.raises(OSError, match=f"{server.url}: STOW-RS request failed: .*Timeout"):
            stow_files([pydicom_file("CT_small.dcm")], destination)
        assert time.monotonic() - started < 5
        assert len(server.accepted) == 1  # one attempt: the outbox, not the client, retries


def test_a_dead_stow_rs_destination_does_not_hold_back_the_pacs(tmp_path):
    """One exporter per destination: while every STOW-RS request to a hung server waits out its 8 s timeout,
    the C-STORE PACS gets each study's SR within seconds of its processing."""
    spool = tmp_path / "spool"
    studies = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=2, per_study=2)
    with SilentServer() as dead, Pacs(tmp_path / "pacs") as pacs:
        config = service_config(spool, destinations=[
            {"name": "dead-vna", "dicomweb": dead.url, "timeout_seconds": 8}, pacs.destination()],
            retry={"base_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 100})
        with running_service(config) as service:
            for files in studies.values():
                assert storescu(files, service.listener.port).returncode == 0
            wait_until(lambda: all_routing_srs_arrived(pacs, {uid: 1 for uid in studies}), 60, 0.2,
                       "both SRs in the PACS")
            arrived = time.monotonic()
            wait_until(lambda: dead.accepted, 30, 0.1, "a STOW-RS attempt on the hung server")
            # the PACS has the SRs; the exporter records that right after its C-STORE returns
            outbox = "SELECT destination, status FROM outbox ORDER BY destination"
            wait_until(lambda: sorted(journal_query(spool, outbox))[2:] == [("pacs", "sent")] * 2, 10, 0.1,
                       "the PACS's outbox rows marked sent")
            rows = journal_query(spool, outbox)
        # both SRs reached the PACS before the first request to the hung server could have timed out
        assert arrived - dead.accepted[0] < 8
        assert sorted(rows) == [("dead-vna", "pending")] * 2 + [("pacs", "sent")] * 2


# --------------------------------------------------------------------------- 13. DICOMweb source


def test_route_a_study_straight_from_a_dicomweb_archive(tmp_path, capsys):
    """`onevlm route https://.../dicom-web/studies/UID[/series/UID]`: QIDO-RS lists, WADO-RS fetches metadata only
    (the embedded backend reads no pixels), and the answers equal routing the same files from disk."""
    from dicomweb_client.api import DICOMwebClient

    from onevlm.cli import main
    from onevlm.inputs.dicomweb_source import DicomWebReference, fetch

    names = ["ct_head_routine_brain.dcm", "mr_brain_pilot.dcm", "rt_plan.dcm"]
    with Pacs(tmp_path / "pacs") as pacs:
        root = f"{pacs.url}/dicom-web"
        DICOMwebClient(url=root).store_instances([pydicom.dcmread(SAMPLES / n) for n in names])
        ct = pydicom.dcmread(SAMPLES / names[0], stop_before_pixels=True)
        study_ref = f"{root}/studies/{ct.StudyInstanceUID}"
        series_ref = f"{study_ref}/series/{ct.SeriesInstanceUID}"

        headers = fetch(DicomWebReference.parse(series_ref), tmp_path / "fetched", metadata_only=True)
        assert [p.name for p in headers] == [f"{ct.SOPInstanceUID}.dcm"]
        header = pydicom.dcmread(headers[0])
        assert "PixelData" not in header and header.Rows == ct.Rows and header.Modality == "CT"
        from onevlm.dicom.header import pixels_left_on_server

        assert pixels_left_on_server(header) == f"{series_ref}/instances/{ct.SOPInstanceUID}"

        assert main(["route", series_ref, "--json", "--log", str(tmp_path / "web.jsonl")]) == 0
        (web,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert main(["route", str(SAMPLES / names[0]), "--json", "--log", str(tmp_path / "disk.jsonl")]) == 0
        (disk,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for key in ("outcome", "cards", "confidence", "modality", "pipeline_card_id"):
            assert web[key] == disk[key], key
        assert web["reference"]["sop_instance_uid"] == str(ct.SOPInstanceUID)

        missing = f"{root}/studies/1.2.3.4.5.6.7"
        assert main(["route", missing, "--log", str(tmp_path / "x.jsonl")]) == 2
        assert f"{missing}: no instances there" in capsys.readouterr().err

        # a site's labels may name archive instances: evaluate and calibrate fetch them the same way
        labels = tmp_path / "labels.csv"
        rows = []
        for name, modality in zip(names, ["brain CT scan", "brain MRI scan", "None"]):
            ds = pydicom.dcmread(SAMPLES / name, stop_before_pixels=True)
            rows.append(f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                        f"{ds.SOPInstanceUID},{modality},,{'' if modality == 'None' else '?'}")
        labels.write_text("path,modality,finding,card\n" + "\n".join(rows) + "\n")
        assert main(["router", "evaluate", str(labels), "-o", str(tmp_path / "eval")]) == 0
        summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
        assert summary["n"] == 3 and summary["baseline"]["failed"] == 0
        assert summary["baseline"]["stage_accuracy"]["1"]["accuracy"] == 1.0
        assert main(["calibrate", "fit", str(labels), "--holdout", "0", "-o", str(tmp_path / "cal.json")]) == 0
        assert json.loads((tmp_path / "cal.json").read_text())["fitted"]["inputs"] == 3
        capsys.readouterr()


# --------------------------------------------------------------------------- 14. Orthanc as the intake


def test_orthanc_as_the_intake_follows_its_changes_and_writes_results_back(tmp_path):
    """The scanner sends to Orthanc; onevlm follows Orthanc's changes (StableStudy), routes the study, and writes
    its SR back into Orthanc by STOW-RS. A restart resumes at the durable position (nothing processed twice); more
    instances of the study later give an amended SR; onevlm's own SR coming back is never an input."""
    spool = tmp_path / "spool"
    (study_uid, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=5).items()
    with Pacs(tmp_path / "pacs") as pacs:
        config = service_config(spool, intake={"orthanc": pacs.url, "poll_seconds": 0.2},
                                destinations=[{"name": "orthanc", "dicomweb": f"{pacs.url}/dicom-web"}])
        with running_service(config) as service:
            assert service.listener is None
            assert storescu(files[:3], pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
            found = wait_until(lambda: all_routing_srs_arrived(pacs, {study_uid: 1}), 60, 0.3,
                               "the routing SR written back into Orthanc")
            wait_until(lambda: service.status()["exported"] == 1, 30, 0.2, "the export recorded")
            time.sleep(2.5)  # Orthanc's StableAge passes again for the SR it received: it must not be an input
            first = service.status()
        assert first["received"] == 3 and first["processed"] == 1 and first["exported"] == 1
        assert len(found[study_uid]) == 1
        position = journal_query(spool, "SELECT value FROM cursors WHERE name = 'orthanc-changes'")[0][0]
        assert position > 0

        with running_service(config) as service:  # restart: resumes after the position, nothing twice
            time.sleep(1.5)
            assert service.status()["processed"] == 1 and service.status()["received"] == 3
            assert storescu(files[3:], pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
            wait_until(lambda: all_routing_srs_arrived(pacs, {study_uid: 2}), 60, 0.3, "the amended SR in Orthanc")
            status = service.status()
        assert status["received"] == 5 and status["exported"] == 2 and status["failed"] == 0
        srs = pacs.routing_srs()[study_uid]
        assert len({sr["SOPInstanceUID"] for sr in srs}) == 2
