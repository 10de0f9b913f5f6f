"""Helpers for the listener-service tests: DICOM peers on loopback (dcmtk, Orthanc as a PACS,
``onevlm serve`` as a subprocess), test data with fresh UIDs, service configurations, TLS files.

Every peer binds to loopback on a free port and is stopped by a context manager, also when a
test fails; child processes get SIGTERM if the test process itself dies. Research use only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pydicom
import pytest
import yaml
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dcmtk_tools import find_dcmtk
from ohif_support import Orthanc, _die_with_parent, free_port, stop_process

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "dicom_samples"
ONEVLM = [sys.executable, "-m", "onevlm"]


# --------------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2,
               message: str | Callable[[], str] = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` s.

    Exceptions a poll raises (a peer not answering yet) count as "not yet"; the last one is
    shown if the deadline passes. ``message`` (or what it returns, called then) says what was awaited.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 (a poll that fails is a poll that is not done)
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------- test data


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise RuntimeError(f"pydicom test file {name} is not installed (pydicom-data is a dev dependency)")
    return Path(path)


def make_copies(source: str | Path, out_dir: Path, studies: int, per_study: int, series_per_study: int = 1,
                prefix: str = "") -> dict[str, list[Path]]:
    """Copies of a real, uncompressed image with fresh Study/Series/SOP Instance UIDs.

    Returns ``{study UID: [paths]}`` (files in sending order, a study's instances together). Each
    study gets ``series_per_study`` series sharing its ``per_study`` instances round-robin.
    """
    source = Path(source)
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, list[Path]] = {}
    for s in range(studies):
        study_uid = generate_uid()
        series_uids = [generate_uid() for _ in range(series_per_study)]
        ds.StudyInstanceUID = study_uid
        ds.StudyID = f"{s + 1}"
        ds.AccessionNumber = f"ACC{s + 1:04d}"
        ds.PatientID = f"ONEVLM-TEST-{s + 1}"
        paths = []
        for i in range(per_study):
            ds.SeriesInstanceUID = series_uids[i % series_per_study]
            ds.SeriesNumber = i % series_per_study + 1
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i // series_per_study + 1
            path = out_dir / f"{prefix}s{s:02d}_{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        result[study_uid] = paths
    return result


# --------------------------------------------------------------------------- dcmtk


def dcmtk_tool(name: str) -> str:
    """dcmtk's program ``name`` (see :func:`dcmtk_tools.find_dcmtk`); the test fails without it."""
    path = find_dcmtk(name)
    if path is None:
        pytest.fail(f"dcmtk's {name} is missing: install the Debian package dcmtk (.ci/run does)")
    return path


def _dcmtk_env() -> dict[str, str]:
    # dcmtk reads TCP_NODELAY from the environment: without it each C-STORE waits for a delayed ACK.
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu_args(files: Sequence[Path], port: int, aet: str = "STORESCU", called: str = "ONEVLM",
                  extra: Sequence[str] = ()) -> list[str]:
    return [dcmtk_tool("storescu"), "-v", "-aet", aet, "-aec", called, "-ta", "10", "-to", "10", *extra,
            "127.0.0.1", str(port), *[str(f) for f in files]]


def storescu(files: Sequence[Path], port: int, aet: str = "STORESCU", called: str = "ONEVLM",
             extra: Sequence[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """Run dcmtk ``storescu -v`` (one association for all files) and wait for it."""
    return subprocess.run(storescu_args(files, port, aet, called, extra), capture_output=True, text=True,
                          timeout=timeout, env=_dcmtk_env())


def storescu_popen(files: Sequence[Path], port: int, log: Path, aet: str = "STORESCU", called: str = "ONEVLM",
                   extra: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``storescu -v`` in the background (own process group), its log going to ``log``.

    The log (stderr) says what was sent and answered; stdout carries only progress dots.
    """
    with log.open("wb") as handle:
        return subprocess.Popen(storescu_args(files, port, aet, called, extra), stdout=subprocess.DEVNULL,
                                stderr=handle, env=_dcmtk_env(), start_new_session=True,
                                preexec_fn=_die_with_parent)


_SENDING = re.compile(r"Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"Received Store Response \((.+?)\)")


def storescu_acknowledged(output: str) -> list[Path]:
    """The files ``storescu -v`` output says were answered with Success, in sending order."""
    acknowledged = []
    current: Path | None = None
    for line in output.splitlines():
        sending = _SENDING.search(line)
        if sending:
            current = Path(sending.group(1))
            continue
        response = _RESPONSE.search(line)
        if response and current is not None:
            if response.group(1).strip() == "Success":
                acknowledged.append(current)
            current = None
    return acknowledged


def echoscu(port: int, aet: str = "ECHOSCU", called: str = "ONEVLM", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk_tool("echoscu"), "-v", "-aet", aet, "-aec", called, "-ta", "10", "-to", "10", "127.0.0.1",
                           str(port)], capture_output=True, text=True, timeout=timeout, env=_dcmtk_env())


# --------------------------------------------------------------------------- the PACS


class Pacs(Orthanc):
    """Orthanc as the destination PACS: accepts C-STORE (and C-ECHO) from any calling AE, called AE ``PACS``.

    REST answers on loopback only; DICOMweb stays on (the base class checks for the plugin).
    """

    AE_TITLE = "PACS"

    def config(self) -> dict:
        return {
            **super().config(),
            "Name": "onevlm-test-pacs",
            "DicomAet": self.AE_TITLE,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "DicomThreadsCount": 4,
        }

    def destination(self, name: str = "pacs", port: int | None = None) -> dict:
        """This PACS as an entry of the service configuration's ``destinations``."""
        return {"name": name, "ae_title": self.AE_TITLE, "host": "127.0.0.1", "port": port or self.dicom_port}

    def sr_instances(self) -> list[dict]:
        """Every SR instance Orthanc holds, as simplified tags (SOPInstanceUID, StudyInstanceUID...)."""
        found = []
        for series in self.get_json("/series?expand"):
            if series.get("MainDicomTags", {}).get("Modality") != "SR":
                continue
            for instance_id in series.get("Instances", []):
                tags = self.get_json(f"/instances/{instance_id}/simplified-tags")
                tags["OrthancID"] = instance_id
                found.append(tags)
        return found

    def routing_srs(self) -> dict[str, list[dict]]:
        """onevlm routing SRs by the Study Instance UID they belong to."""
        by_study: dict[str, list[dict]] = {}
        for tags in self.sr_instances():
            if str(tags.get("SeriesDescription", "")).startswith("onevlm routing"):
                by_study.setdefault(tags["StudyInstanceUID"], []).append(tags)
        return by_study

    def count_instances(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])


# --------------------------------------------------------------------------- the service


def service_config(spool: Path, port: int = 0, destinations: Iterable[dict] = (), **overrides: Any) -> dict:
    """A service configuration (as parsed YAML) for tests: loopback, short idle time, fast retries.

    ``overrides`` replace top-level keys; ``listener`` is merged key by key.
    """
    listener = {"ae_title": "ONEVLM", "host": "127.0.0.1", "port": port or free_port(),
                "allowed_calling_ae_titles": [], "allowed_addresses": [], "network_timeout_seconds": 20}
    listener.update(overrides.pop("listener", {}))
    config = {
        "spool_dir": str(spool),
        "listener": listener,
        "grouping": {"by": "study", "idle_seconds": 0.5},
        "destinations": list(destinations),
        "retry": {"base_seconds": 0.5, "max_seconds": 2, "max_attempts": 50},
        "workers": 1,
    }
    config.update(overrides)
    return config


def write_service_config(path: Path, spool: Path, port: int = 0, destinations: Iterable[dict] = (),
                         **overrides: Any) -> Path:
    """Write :func:`service_config` as YAML to ``path`` (for ``onevlm serve --config``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(service_config(spool, port, destinations, **overrides), sort_keys=False))
    return path


def listener_port(config_path: Path) -> int:
    """The listener port a configuration file names."""
    return int(yaml.safe_load(config_path.read_text())["listener"]["port"])


@contextlib.contextmanager
def running_service(data: dict, base: Path | None = None) -> Iterator[Any]:
    """An in-process :class:`onevlm.net.service.Service` from a config mapping, stopped on exit."""
    from onevlm.net.config import parse_config
    from onevlm.net.service import Service

    service = Service(parse_config(data, base=base))
    service.start()
    try:
        yield service
    finally:
        service.stop()


class ServeProcess:
    """``onevlm serve --config FILE`` as a child process (own process group), output to a log file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "ServeProcess":
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                preexec_fn=_die_with_parent,
            )

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"onevlm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            return "onevlm listening as" in self.log_path.read_text(errors="replace")[start:]

        try:
            wait_until(ready, timeout, 0.1, "onevlm serve to listen")
        except BaseException:
            self.stop()
            raise
        return self

    def command(self) -> list[str]:
        """The argv that starts the service (a subclass may wrap it, e.g. in a namespace)."""
        return [*ONEVLM, "serve", "--config", str(self.config_path)]

    def kill(self) -> None:
        """SIGKILL, no clean-up: a crash."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def onevlm_status(config_path: Path) -> dict:
    """``onevlm status --config FILE --json``, parsed."""
    import json

    done = subprocess.run([*ONEVLM, "status", "--config", str(config_path), "--json"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def journal_status(config_path: Path) -> dict:
    """The status counts, read in-process from the journal (what ``onevlm status`` prints, faster)."""
    from onevlm.net.config import load_config
    from onevlm.net.service import read_status

    return read_status(load_config(config_path))


def journal_query(spool: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    """Read the service journal (``spool/journal.sqlite``) directly, read-only."""
    db = sqlite3.connect(f"file:{spool / 'journal.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def spool_files(spool: Path) -> set[str]:
    """SOP Instance UIDs of the acknowledged instances in the spool (file names)."""
    return {p.stem for p in (spool / "incoming").glob("*/*.dcm")}


# --------------------------------------------------------------------------- TLS


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed, made with the openssl CLI.

    Returns paths ``ca`` (certificate), ``ca_key``, ``cert`` and ``key`` (the server's).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / file for name, file in
             (("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "server.pem"), ("key", "server.key"))}
    csr = folder / "server.csr"
    ext = folder / "server.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\n"
                   "keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth, clientAuth\n")

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=onevlm test CA",
            "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(files["key"]),
            "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey", str(files["ca_key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(files["cert"]))
    return files


# --------------------------------------------------------------------------- log capture


class LogRecords:
    """Collect the service's log messages (any thread) while a ``with`` block runs."""

    def __init__(self, logger_name: str = "onevlm.net") -> None:
        import logging

        self.logger = logging.getLogger(logger_name)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        records = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                with records._lock:
                    records.messages.append(record.getMessage())

        self.handler = Handler(level=logging.DEBUG)
        self._level = self.logger.level

    def __enter__(self) -> "LogRecords":
        import logging

        self.logger.addHandler(self.handler)
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._level)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.messages)


# --------------------------------------------------------------------------- pynetdicom SCU


def pynetdicom_scu(port: int, items: Sequence[Any] = (), aet: str = "PYSCU", called: str = "ONEVLM",
                   tls: Any = None, echo: bool = False, timeout: float = 20) -> list[int]:
    """One association with pynetdicom: an optional C-ECHO, then a C-STORE of each item.

    ``items`` are Datasets or Part 10 file paths (a path is sent byte for byte after its file
    meta, so a dataset pydicom cannot parse can be sent too). ``tls`` is an ``ssl.SSLContext``.
    Returns the status codes (the echo's first); raises ``ConnectionError`` if no association.
    """
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    if echo:
        ae.add_requested_context(Verification)
    for item in items:
        meta = item.file_meta if isinstance(item, pydicom.Dataset) else read_file_meta_info(item)
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(tls, "127.0.0.1") if tls is not None else None)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called}@127.0.0.1:{port}")
    statuses = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go byte for byte, never decoded and re-encoded
    try:
        if echo:
            statuses.append(int(assoc.send_c_echo().Status))
        for item in items:
            status = assoc.send_c_store(item)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return statuses


@contextlib.contextmanager
def storescp_node(out_dir: Path, ae_title: str) -> Iterator[dict]:
    """dcmtk ``storescp`` on a free loopback port storing what it receives in ``out_dir``.

    Yields the node as an entry of the service configuration's ``destinations`` (name = the AE
    title in lower case); stopped on exit.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen([dcmtk_tool("storescp"), "-aet", ae_title, "-od", str(out_dir), "+uf", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_dcmtk_env())
    try:
        wait_until(lambda: subprocess.run([dcmtk_tool("echoscu"), "-aec", ae_title, "127.0.0.1", str(port)],
                                          capture_output=True, timeout=10).returncode == 0,
                   20, message=f"storescp {ae_title} listening")
        yield {"name": ae_title.lower(), "ae_title": ae_title, "host": "127.0.0.1", "port": port}
    finally:
        process.terminate()
        process.wait(timeout=10)


class SilentServer:
    """A TCP server on loopback that accepts connections and never answers (a hung DICOMweb or DICOM peer).

    ``accepted`` holds the time of each accepted connection; the sockets stay open until :meth:`close`.
    """

    def __init__(self) -> None:
        import socket

        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.accepted: list[float] = []
        self._held: list[Any] = []
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self._held.append(connection)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self._socket.close()
        for connection in self._held:
            connection.close()

    def __enter__(self) -> "SilentServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
