"""The listener service (onevlm.net) against real DICOM peers on loopback: dcmtk echoscu/storescu,
pynetdicom, raw sockets. Each test runs its own in-process Service on a free port (the MiniLM
encoder loads once per session) and stops it, also on failure. Research use only.
"""

from __future__ import annotations

import json
import random
import socket
import sqlite3
import ssl
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from onevlm.net.config import ConfigError, load_config, parse_config

from conftest import REPO, SAMPLES
from dicom_peers import (
    LogRecords,
    echoscu,
    free_port,
    journal_query,
    make_copies,
    make_tls_files,
    pydicom_file,
    pynetdicom_scu,
    running_service,
    service_config,
    storescp_node,
    storescu,
    wait_until,
)

#: Real, uncompressed samples from different studies (storescu sends them as they are).
UNCOMPRESSED = ["ct_head_routine_brain.dcm", "mr_brain_pilot.dcm", "mr_small_no_bodypart.dcm", "rt_plan.dcm",
                "sr_simple_image_report.dcm"]

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def incoming(spool: Path) -> list[Path]:
    return sorted((spool / "incoming").glob("*/*.dcm"))


# --------------------------------------------------------------------------- 1. configuration


@pytest.mark.parametrize(("change", "field"), [
    ({"listener": {"ae_title": "THIS_TITLE_IS_TOO_LONG"}}, "listener.ae_title"),
    ({"listener": {"ae_title": "BACK\\SLASH"}}, "listener.ae_title"),
    ({"listener": {"port": 70000}}, "listener.port"),
    ({"listener": {"port": "11112"}}, "listener.port"),
    ({"listener": {"allowed_calling_ae_titles": ["OK", ""]}}, "listener.allowed_calling_ae_titles"),
    ({"listener": {"max_pdu_bytes": 0}}, "listener.max_pdu_bytes"),
    ({"listenr": {}}, "listenr"),
    ({"listener": {"bind": "0.0.0.0"}}, "listener.bind"),
    ({"grouping": {"by": "patient"}}, "grouping.by"),
    ({"grouping": {"idle_seconds": -1}}, "grouping.idle_seconds"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1"}]}, "destinations[0].port"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 0}]}, "destinations[0].port"),
    ({"retry": {"base_seconds": 0}}, "retry.base_seconds"),
    ({"pipeline": {"backend": "transformers"}}, "pipeline.model_dir"),
    ({"pipeline": {"backend": "magic"}}, "pipeline.backend"),
    ({"status_port": 0}, "status_port"),
])
def test_bad_configuration_names_the_field(tmp_path, change, field):
    data = {"spool_dir": str(tmp_path / "spool"), **change}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, source="test.yaml")
    assert f"test.yaml: {field}:" in str(raised.value)


def test_configuration_files(tmp_path):
    example = load_config(REPO / "config" / "onevlm-service.example.yaml")
    assert example.listener.ae_title == "ONEVLM" and example.destinations[0].ae_title == "ORTHANC"
    assert example.spool_dir.is_absolute()
    missing = tmp_path / "service.yaml"
    missing.write_text("listener: {port: 104}\n")
    with pytest.raises(ConfigError, match="spool_dir: is required"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("listener: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="listener.tls.certificate: .* does not exist"):
        parse_config({"spool_dir": "s", "listener": {"tls": {"certificate": "nope.pem", "private_key": "nope.key"}}},
                     base=tmp_path)


# --------------------------------------------------------------------------- 2. echo and store with dcmtk


def test_echo_and_store_with_dcmtk(tmp_path):
    spool = tmp_path / "spool"
    files = [SAMPLES / name for name in UNCOMPRESSED]
    config = service_config(spool, listener={"allowed_calling_ae_titles": ["STORESCU", "ECHOSCU"]},
                            grouping={"by": "study", "idle_seconds": 60})  # nothing is processed here
    with running_service(config) as service:
        port = service.listener.port
        echo = echoscu(port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert "Received Echo Response (Success)" in echo.stdout + echo.stderr

        sent = storescu(files, port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        for path in files:
            source = pydicom.dcmread(path)
            stored = spool / "incoming" / str(source.StudyInstanceUID) / f"{source.SOPInstanceUID}.dcm"
            assert stored.is_file(), f"{path.name} is not in the spool"
            copy = pydicom.dcmread(stored)
            assert copy.SOPClassUID == source.SOPClassUID
            if "PixelData" in source:
                assert copy.PixelData == source.PixelData
        assert len(incoming(spool)) == len(files)
        rows = dict(journal_query(spool, "SELECT sop_instance_uid, calling_ae FROM instances"))
        assert rows == {str(header(f).SOPInstanceUID): "STORESCU" for f in files}
        status = service.status()
        assert (status["received"], status["duplicates"], status["queued"]) == (len(files), 0, len(files))

        again = storescu(files[:2], port)
        assert again.returncode == 0, again.stdout + again.stderr
        status = service.status()
        assert (status["received"], status["duplicates"]) == (len(files), 2)
        assert len(incoming(spool)) == len(files)
        assert not list((spool / "tmp").iterdir()), "partial writes left behind"
        # one service per spool: a second one on it refuses before it clears or recovers anything
        from onevlm.net.config import parse_config
        from onevlm.net.service import Service
        from onevlm.net.spool_owner import SpoolBusy

        second = Service(parse_config(service_config(spool)))
        try:
            with pytest.raises(SpoolBusy, match="in use by another onevlm process"):
                second.start()
        finally:
            second.journal.close()
        assert len(incoming(spool)) == len(files) and service.status()["received"] == len(files)


# --------------------------------------------------------------------------- 3. who may connect


def test_unknown_calling_and_wrong_called_ae_are_rejected(tmp_path):
    spool = tmp_path / "spool"
    files = [SAMPLES / "ct_head_routine_brain.dcm"]
    config = service_config(spool, listener={"allowed_calling_ae_titles": ["STORESCU"]})
    with running_service(config) as service, LogRecords() as logs:
        port = service.listener.port
        intruder = storescu(files, port, aet="INTRUDER")
        assert intruder.returncode != 0
        assert "Association Rejected" in intruder.stdout + intruder.stderr
        wrong_called = storescu(files, port, called="SOMEONE_ELSE")
        assert wrong_called.returncode != 0
        assert "Association Rejected" in wrong_called.stdout + wrong_called.stderr
        with pytest.raises(ConnectionError):
            pynetdicom_scu(port, files, aet="PYSCU")
        assert incoming(spool) == []
        assert service.status()["received"] == 0
        wait_until(lambda: logs.text().count("event=association_rejected") >= 3, 5, message="three rejections logged")
        assert "calling_ae=INTRUDER" in logs.text()
        # the allowed AE still gets in
        allowed = storescu(files, port)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert len(incoming(spool)) == 1


def test_a_refused_called_ae_title_is_logged_as_the_caller_asked(tmp_path):
    spool = tmp_path / "spool"
    with running_service(service_config(spool)) as service, LogRecords() as logs:
        port = service.listener.port
        with pytest.raises(ConnectionError):
            pynetdicom_scu(port, [SAMPLES / "ct_head_routine_brain.dcm"], aet="PYSCU", called="SOMEONE_ELSE")
        refused = storescu([SAMPLES / "ct_head_routine_brain.dcm"], port, aet="DCMTK_SCU", called="OTHER_NODE")
        assert refused.returncode != 0
        wait_until(lambda: logs.text().count("event=association_rejected") >= 2, 5, message="two rejections logged")
        rejections = [m for m in logs.text().splitlines() if "event=association_rejected" in m]
        # the title each caller asked for, never the listener's own (ONEVLM)
        assert any("calling_ae=PYSCU called_ae=SOMEONE_ELSE" in m for m in rejections)
        assert any("calling_ae=DCMTK_SCU called_ae=OTHER_NODE" in m for m in rejections)
        assert not any("called_ae=ONEVLM" in m for m in rejections)
        assert incoming(spool) == []


def test_address_allow_list_refuses_loopback(tmp_path):
    spool = tmp_path / "spool"
    config = service_config(spool, listener={"allowed_addresses": ["10.255.255.1/32"]})
    with running_service(config) as service, LogRecords() as logs:
        port = service.listener.port
        echo = echoscu(port)
        assert echo.returncode != 0
        refused = storescu([SAMPLES / "ct_head_routine_brain.dcm"], port)
        assert refused.returncode != 0
        assert incoming(spool) == []
        # refused at connect: the socket is closed before any PDU is read
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(1) == b""
        wait_until(lambda: "event=connection_refused address=127.0.0.1" in logs.text(), 5,
                   message="the refusal in the log")


# --------------------------------------------------------------------------- 4. bad and oversized instances


def _unparseable_file(folder: Path) -> Path:
    """Valid file meta (CT Image Storage, explicit VR LE) followed by a dataset pydicom cannot read."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = folder / "unparseable.dcm"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    # a sequence of undefined length whose first item does not start with an item tag
    body = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + bytes(range(1, 5)) + b"\xff" * 60
    path.write_bytes(path.read_bytes() + body)
    return path


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_unparseable_datasets_are_quarantined(tmp_path):
    spool = tmp_path / "spool"
    no_study = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    garbage = _unparseable_file(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 (OSError or struct.error, depending on the read path)
        pydicom.dcmread(garbage, stop_before_pixels=True)
    with running_service(service_config(spool)) as service, LogRecords() as logs:
        statuses = pynetdicom_scu(service.listener.port, [no_study, garbage])
        assert statuses == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
        assert incoming(spool) == []
        quarantined = sorted((spool / "quarantine").glob("*.dcm"))
        reasons = sorted((spool / "quarantine").glob("*.reason.txt"))
        assert len(quarantined) == len(reasons) == 2
        assert "Study Instance UID" in reasons[0].read_text()
        assert "cannot parse the dataset" in reasons[1].read_text()
        assert all("calling AE PYSCU" in r.read_text() for r in reasons)
        assert quarantined[1].read_bytes()[-76:] == garbage.read_bytes()[-76:]  # the dataset as received
        status = service.status()
        assert (status["quarantined"], status["quarantine_files"], status["received"]) == (2, 2, 0)
        assert logs.text().count("event=quarantined") == 2
        # a good instance after the bad ones is stored
        assert pynetdicom_scu(service.listener.port, [SAMPLES / "mr_brain_pilot.dcm"]) == [SUCCESS]
        assert len(incoming(spool)) == 1


def test_too_large_instance_is_refused(tmp_path):
    spool = tmp_path / "spool"
    small = SAMPLES / "mr_brain_pilot.dcm"  # 16x16 pixels
    large = pydicom_file("CT_small.dcm")  # 128x128 pixels, ~39 kB
    config = service_config(spool, listener={"max_instance_bytes": 20_000})
    with running_service(config) as service:
        assert pynetdicom_scu(service.listener.port, [large, small]) == [OUT_OF_RESOURCES, SUCCESS]
        assert [p.stem for p in incoming(spool)] == [str(header(small).SOPInstanceUID)]
        status = service.status()
        assert (status["refused"], status["received"], status["quarantined"]) == (1, 1, 0)
        sent = storescu([large], service.listener.port)  # dcmtk reports the failure status too
        assert "Received Store Response (Refused: OutOfResources)" in sent.stdout + sent.stderr
        assert service.status()["refused"] == 2


# --------------------------------------------------------------------------- 5. garbage on the port


def _associate_rq_prefix() -> bytes:
    """The first bytes of an A-ASSOCIATE-RQ announcing 300 bytes, of which only the AE titles follow."""
    return (struct.pack(">BBIHH", 0x01, 0x00, 300, 0x0001, 0x0000) + b"ONEVLM".ljust(16) + b"STORESCU".ljust(16))


def test_garbage_on_the_port_leaves_the_service_up(tmp_path):
    spool = tmp_path / "spool"
    rng = random.Random(20240611)
    with running_service(service_config(spool, listener={"network_timeout_seconds": 5})) as service:
        port = service.listener.port
        for size in (1, 6, 64, 4096, 65536):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                try:
                    sock.sendall(rng.randbytes(size))
                    sock.settimeout(0.5)
                    sock.recv(1024)  # an A-ABORT, the connection closed, or nothing (waiting for more)
                except OSError:
                    pass
        # a PDU of a valid type whose length is absurd, then close
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFF0) + b"\x00\x01\x00\x00")
        # a partial A-ASSOCIATE-RQ, then close
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(_associate_rq_prefix())
        # connections that say nothing (or half a PDU) and stay open must not block others
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        half = socket.create_connection(("127.0.0.1", port), timeout=5)
        half.sendall(_associate_rq_prefix())
        try:
            echo = echoscu(port)
            assert echo.returncode == 0, echo.stdout + echo.stderr
            sent = storescu([SAMPLES / "ct_head_routine_brain.dcm"], port)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        finally:
            idle.close()
            half.close()
        assert len(incoming(spool)) == 1
        status = service.status()
        assert (status["received"], status["quarantined"]) == (1, 0)
        assert list((spool / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- 6. TLS


def _client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _within(seconds: float, call):
    """``call()`` in a daemon thread; fail (instead of hanging) if it takes longer than ``seconds``."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"no answer within {seconds} s: the listener is blocked")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_tls_listener(tmp_path):
    spool = tmp_path / "spool"
    tls = make_tls_files(tmp_path / "tls")
    config = service_config(spool, listener={"tls": {"certificate": str(tls["cert"]), "private_key": str(tls["key"]),
                                                     "require": True}, "network_timeout_seconds": 5})
    sample = SAMPLES / "ct_head_routine_brain.dcm"
    with running_service(config) as service:
        port = service.listener.port
        statuses = pynetdicom_scu(port, [sample], tls=_client_context(tls["ca"]), echo=True)
        assert statuses == [SUCCESS, SUCCESS]
        assert [p.stem for p in incoming(spool)] == [str(header(sample).SOPInstanceUID)]

        # plain associations are refused
        plain = storescu([SAMPLES / "mr_brain_pilot.dcm"], port)
        assert plain.returncode != 0
        assert echoscu(port).returncode != 0
        with pytest.raises(ConnectionError):
            pynetdicom_scu(port, echo=True)
        # a client that does not trust our certificate does not get in either
        with pytest.raises(ConnectionError):
            pynetdicom_scu(port, echo=True, tls=ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
        # a TCP connection that never starts the TLS handshake must not block the others
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            assert _within(10, lambda: pynetdicom_scu(port, echo=True, tls=_client_context(tls["ca"]))) == [SUCCESS]
        assert len(incoming(spool)) == 1
        assert service.status()["received"] == 1


def test_tls_listener_with_client_certificates(tmp_path):
    spool = tmp_path / "spool"
    tls = make_tls_files(tmp_path / "tls")
    config = service_config(spool, listener={"tls": {"certificate": str(tls["cert"]), "private_key": str(tls["key"]),
                                                     "ca_certificates": str(tls["ca"])},
                                             "network_timeout_seconds": 5})
    with running_service(config) as service:
        port = service.listener.port
        # our server certificate was signed by the CA, so it serves as a client certificate as well
        assert pynetdicom_scu(port, echo=True, tls=_client_context(tls["ca"], tls["cert"], tls["key"])) == [SUCCESS]
        with pytest.raises(ConnectionError):  # no client certificate
            pynetdicom_scu(port, echo=True, tls=_client_context(tls["ca"]))


# --------------------------------------------------------------------------- processing and export give-up


def test_study_is_processed_and_failed_export_gives_up(tmp_path):
    """A study goes idle, is routed into an SR under results/, and its export to a node that is
    not there is retried, then given up and counted."""
    spool = tmp_path / "spool"
    studies = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=3)
    (study_uid, files), = studies.items()
    dead = {"name": "nowhere", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": _closed_port()}
    config = service_config(spool, destinations=[dead], retry={"base_seconds": 0.1, "max_seconds": 0.2,
                                                                "max_attempts": 3})
    with running_service(config) as service:
        sent = storescu(files, service.listener.port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: service.status()["failed"] == 1, 60, message="the export to be given up")
        status = service.status()
        assert (status["received"], status["processed"], status["exported"]) == (3, 1, 0)
        assert status["export_failures"] == 3 and status["export_pending"] == 0
    srs = list((spool / "results" / study_uid / "sr").glob("*.dcm"))
    assert len(srs) == 1
    sr = header(srs[0])
    assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR"
    assert str(sr.SeriesDescription).startswith("onevlm routing")
    rows = journal_query(spool, "SELECT sop_instance_uid, status, attempts, last_error FROM outbox")
    assert [(r[0], r[1], r[2]) for r in rows] == [(str(sr.SOPInstanceUID), "failed", 3)]
    assert "NOWHERE" in rows[0][3]


def _closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


# --------------------------------------------------------------------------- restart recovery


def test_restart_recovers_the_spool_and_requeues_only_changed_results(tmp_path):
    """State a crash leaves behind: a partial write in tmp/, an acknowledged file the journal never
    recorded, a group caught mid-processing. After a restart the partial write is gone, the file
    is recorded, both groups are processed again (after a whole idle time from the restart). The SR
    whose study did not change keeps its SOP Instance UID and is not queued again (same digest); the
    grown study's SR is amended: a new SOP Instance UID naming the first as its predecessor, queued in
    place of the first, which never reached the PACS (superseded)."""
    spool = tmp_path / "spool"
    unchanged, grown = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=2, per_study=3).items()
    dead = {"name": "nowhere", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": _closed_port()}
    config = service_config(spool, destinations=[dead], retry={"base_seconds": 300, "max_seconds": 300,
                                                                "max_attempts": 1000})
    with running_service(config) as service:
        sent = storescu(unchanged[1] + grown[1][:2], service.listener.port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: service.status()["processed"] == 2 and service.status()["export_failures"] == 2, 60,
                   message="both studies processed and their exports tried once")
    before = dict(journal_query(spool, "SELECT group_key, sop_instance_uid || ' ' || digest FROM outbox"))

    # the crash: a write that never finished, an instance stored but not journaled, a group mid-processing
    (spool / "tmp" / "0123abcd.part").write_bytes(b"DICM half a dataset")
    late = grown[1][2]
    (spool / "incoming" / grown[0] / f"{header(late).SOPInstanceUID}.dcm").write_bytes(late.read_bytes())
    db = sqlite3.connect(spool / "journal.sqlite")
    db.execute("UPDATE groups SET status = 'processing' WHERE group_key = ?", (unchanged[0],))
    db.commit()
    db.close()

    with running_service(config) as service:
        assert list((spool / "tmp").iterdir()) == []
        assert service.status()["received"] == 6
        wait_until(lambda: dict(journal_query(spool, "SELECT group_key, attempts FROM groups")) ==
                   {unchanged[0]: 2, grown[0]: 2} and service.status()["processed"] == 2, 60,
                   message="both groups processed a second time")
        time.sleep(0.5)
        rows = journal_query(spool, "SELECT group_key, sop_instance_uid, digest, status FROM outbox ORDER BY id")
        status = service.status()
    after = {group: [r[1:] for r in rows if r[0] == group] for group in (unchanged[0], grown[0])}
    first_uid, first_digest = before[unchanged[0]].split()
    assert after[unchanged[0]] == [(first_uid, first_digest, "pending")], "an unchanged SR was queued again"
    (old_uid, _, old_status), (new_uid, _, new_status) = after[grown[0]]
    assert old_uid == before[grown[0]].split()[0] and old_status == "superseded"
    assert new_uid != old_uid and new_status == "pending", "the grown study's amended SR was not queued"
    assert status["export_failures"] == 3  # the unchanged SR waits for its retry; the amended one was tried at once
    assert status["export_superseded"] == 1
    sr = pydicom.dcmread(next((spool / "results" / grown[0] / "sr").glob("*.dcm")))
    assert sr.SOPInstanceUID == new_uid
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == old_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {item.ReferencedSOPInstanceUID for item in evidence} == {str(header(p).SOPInstanceUID) for p in grown[1]}


def test_several_listener_processes_share_the_port(tmp_path):
    """listener.processes: 2 — two processes on one port (SO_REUSEPORT) store into one spool."""
    from dicom_peers import storescu_popen

    studies = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "copies", studies=4, per_study=10)
    config = service_config(tmp_path / "spool", listener={"processes": 2}, grouping={"by": "study", "idle_seconds": 60})
    with running_service(config) as service:
        assert len(service._listener_processes) == 1 and service._listener_processes[0].is_alive()
        senders = [storescu_popen(paths, service.listener.port, tmp_path / f"storescu{i}.log")
                   for i, paths in enumerate(studies.values())]
        for sender in senders:
            assert sender.wait(timeout=120) == 0
        expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for ps in studies.values() for p in ps}
        stored = {p.stem for p in incoming(tmp_path / "spool")}
        assert stored == expected and len(expected) == 40
        assert service.status()["received"] == 40  # both processes write the one journal
        child = service._listener_processes[0]
    assert not child.is_alive()  # stopped with the service


def test_json_log_lines_carry_the_event_fields():
    import json
    import logging

    from onevlm.net.log_format import JsonFormatter

    record = logging.LogRecord("onevlm.net.listener", logging.INFO, __file__, 1,
                               "event=stored sop=%s group=%s calling_ae=%s", ("1.2.3", "1.2", "SCANNER"), None)
    line = json.loads(JsonFormatter().format(record))
    assert (line["event"], line["sop"], line["group"], line["calling_ae"]) == ("stored", "1.2.3", "1.2", "SCANNER")
    assert line["level"] == "INFO" and line["time"].endswith("Z")


# --------------------------------------------------------------------------- review cases


def test_review_cases_also_go_to_the_review_destination(tmp_path):
    """A destination with ``role: review`` receives the SRs of the series the router sent to review, and
    only those; the PACS receives every SR (each says its outcome)."""
    spool = tmp_path / "spool"
    review_case = SAMPLES / "mr_small_no_bodypart.dcm"  # brain / kidney MRI tie at stage 1
    routed_case = SAMPLES / "ct_head_routine_brain.dcm"  # the brain CT cards as a set
    with storescp_node(tmp_path / "pacs", "PACS") as pacs, storescp_node(tmp_path / "review", "REVIEW") as review:
        config = service_config(spool, destinations=[pacs, {**review, "role": "review"}])
        with running_service(config) as service:
            sent = storescu([review_case, routed_case], service.listener.port)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            wait_until(lambda: service.status()["exported"] == 3, 60, message="3 SRs exported (2 PACS, 1 review)")
    in_pacs = [pydicom.dcmread(p) for p in sorted((tmp_path / "pacs").glob("*"))]
    in_review = [pydicom.dcmread(p) for p in sorted((tmp_path / "review").glob("*"))]
    assert len(in_pacs) == 2 and len(in_review) == 1
    (sr,) = in_review
    assert sr.StudyInstanceUID == pydicom.dcmread(review_case, stop_before_pixels=True).StudyInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED"
    texts = [item.TextValue for item in sr.ContentSequence[-1].ContentSequence[0].ContentSequence
             if item.ValueType == "TEXT"]
    assert any("requires human review: stage 1 tie: brain MRI scan" in t for t in texts), texts
    meta = json.loads(next((spool / "results").glob(f"{sr.StudyInstanceUID}/metadata.json")).read_text())
    assert meta["outcome"] == "review" and meta["needs_review"] is True


def test_a_review_destination_role_is_validated(tmp_path):
    bad = service_config(tmp_path / "spool", destinations=[{"name": "r", "ae_title": "R", "host": "127.0.0.1",
                                                            "port": 104, "role": "reviewer"}])
    with pytest.raises(ConfigError, match=r"destinations\[0\].role.*'reviewer' must be one of results, review"):
        parse_config(bad)


def test_a_restart_gives_unfinished_groups_a_fresh_idle_timer(tmp_path):
    """After kill -9 a scanner retries what was not acknowledged: the group must wait a whole idle time from the
    restart, so the retry lands in the same result instead of a partial one being processed first."""
    from onevlm.net.journal import Journal

    journal = Journal(tmp_path / "journal.sqlite")
    long_ago = time.time() - 3600
    for group, status in (("g-processing", "processing"), ("g-queued", "queued"), ("g-receiving", "receiving"),
                          ("g-done", "done")):
        journal._db.execute("INSERT INTO groups(group_key, status, last_received, received, updated_at) "
                            "VALUES (?, ?, ?, 1, ?)", (group, status, long_ago, long_ago))
    journal._db.commit()
    journal.recover([])
    assert journal.due_groups(idle_seconds=5) == []  # nothing is due right after the restart
    later = time.time() + 6
    assert sorted(journal.due_groups(idle_seconds=5, now=later)) == ["g-processing", "g-queued", "g-receiving"]
    journal.close()


def test_dicomweb_destinations_are_validated(tmp_path, monkeypatch):
    spool = tmp_path / "spool"

    def parse(destination):
        return parse_config(service_config(spool, destinations=[destination]))

    monkeypatch.setenv("ONEVLM_TEST_TOKEN", "t0ken")
    parsed = parse({"name": "vna", "dicomweb": "https://vna.example/dicom-web/", "auth": "bearer",
                    "token_env": "ONEVLM_TEST_TOKEN"}).destinations[0]
    assert parsed.dicomweb == "https://vna.example/dicom-web" and parsed.auth.kind == "bearer"
    assert parse({"name": "open", "dicomweb": "http://127.0.0.1:8042/dicom-web"}).destinations[0].auth.kind == "none"
    assert parsed.timeout_seconds == 30.0
    assert parse({"name": "v", "dicomweb": "http://x/dicom-web", "timeout_seconds": 5}).destinations[0].timeout_seconds == 5
    cases = [
        ({"name": "v", "dicomweb": "http://x/dicom-web", "timeout_seconds": 0},
         r"destinations\[0\].timeout_seconds.*must be a positive number"),
        ({"name": "v", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "timeout_seconds": "slow"},
         r"destinations\[0\].timeout_seconds.*must be a positive number"),
        ({"name": "v", "dicomweb": "ftp://x/dicom-web"}, r"destinations\[0\].dicomweb.*http:// or https://"),
        ({"name": "v", "dicomweb": "http://x/dicom-web", "auth": "digest"}, r"destinations\[0\].auth.*'digest'"),
        ({"name": "v", "dicomweb": "http://x/dicom-web", "auth": "basic", "username": "u"},
         r"destinations\[0\].password_env.*required with auth: basic"),
        ({"name": "v", "dicomweb": "http://x/dicom-web", "auth": "bearer", "token_env": "ONEVLM_NO_SUCH_VARIABLE"},
         r"destinations\[0\].token_env.*ONEVLM_NO_SUCH_VARIABLE is not set"),
        ({"name": "v", "dicomweb": "http://x/dicom-web", "port": 104}, r"destinations\[0\].port.*does not apply"),
        ({"name": "v", "ae_title": "PACS", "host": "127.0.0.1"}, r"destinations\[0\].port.*is required"),
    ]
    for destination, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse(destination)


def test_the_orthanc_intake_is_validated(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    parsed = parse_config(service_config(spool, intake={"orthanc": "http://127.0.0.1:8042/", "poll_seconds": 0.5}))
    assert parsed.intake.url == "http://127.0.0.1:8042" and parsed.intake.poll_seconds == 0.5
    assert parse_config(service_config(spool)).intake is None  # the embedded listener by default
    for intake, message in (({"orthanc": "127.0.0.1:8042"}, r"intake.orthanc.*http"),
                            ({"orthanc": "http://x", "password_env": "ONEVLM_NO_SUCH_VARIABLE"},
                             r"intake.password_env.*ONEVLM_NO_SUCH_VARIABLE is not set"),
                            ({"orthanc": "http://x", "poll": 1}, r"intake.*poll")):
        with pytest.raises(ConfigError, match=message):
            parse_config(service_config(spool, intake=intake))
