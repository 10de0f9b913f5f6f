"""Ingest benchmark: files/s for 0.5 MB CT images sent by dcmtk storescu, side by side.

Receivers, each on loopback, each fed by the same storescu (TCP_NODELAY=1):

- ``onevlm``: our listener (spool with fsync + atomic rename, SQLite journal) — durable; also with
  ``listener.processes: 2`` (two processes on one port, SO_REUSEPORT);
- ``storescp``: dcmtk's storescp writing to disk (``--fork`` for several associations) — no fsync;
- ``pynetdicom-default``: a plain pynetdicom Storage SCP as its documentation shows it
  (decode the dataset, ``save_as``), Nagle's algorithm left on;
- ``pynetdicom-ceiling``: pynetdicom configured as our listener (TCP_NODELAY, 1 MiB PDUs) whose
  handler answers Success and stores nothing: the most any pynetdicom Storage SCP can receive
  on this machine, an upper bound for ours.

Runs alternate between receivers, over one association and over four at once; medians and the
ratios are printed. Research use only.

    .venv/bin/python bench/ingest_bench.py --files 200 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from onevlm.net.journal import Journal  # noqa: E402
from onevlm.net.listener import Listener  # noqa: E402
from onevlm.net.spool import Spool  # noqa: E402
from dcmtk_tools import find_dcmtk  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_files(folder: Path, count: int) -> list[Path]:
    """``count`` copies of a real 512×512 CT (≈0.5 MB, uncompressed), each a new instance."""
    source = get_testdata_file("693_UNCR.dcm", download=False)
    if source is None:
        raise SystemExit("pydicom-data is needed (pip install pydicom-data)")
    ds = pydicom.dcmread(source)
    study = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = ds.SeriesInstanceUID if i % 50 else generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"ct_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class OnevlmReceiver:
    """Our listener (spool + journal; no pipeline), ``processes`` processes on one port."""

    def __init__(self, work: Path, processes: int = 1) -> None:
        self.work = work
        self.processes = processes
        self.name = "onevlm" if processes == 1 else f"onevlm x{processes} processes"

    def __enter__(self):
        from onevlm.net.config import parse_config
        from onevlm.net.listener_process import start_listener_processes

        shutil.rmtree(self.work, ignore_errors=True)
        self.port = free_port()
        config = parse_config({"spool_dir": str(self.work / "spool"),
                               "listener": {"ae_title": "RECEIVER", "port": self.port, "max_associations": 8,
                                            "processes": self.processes}})
        self.spool = Spool(config.spool_dir)
        self.journal = Journal(config.journal_path)
        self.listener = Listener(config.listener, self.spool, self.journal, reuse_port=self.processes > 1)
        self.listener.start()
        self.children, self.stop = start_listener_processes(config, self.processes - 1) if self.processes > 1 else ([], None)
        return self

    def __exit__(self, *exc):
        self.listener.stop()
        if self.stop is not None:
            self.stop.set()
            for child in self.children:
                child.join(10)
        self.journal.close()

    def received(self) -> int:
        return self.journal.status()["received"]


class OrthancIntakeReceiver:
    """Orthanc as the front door (durable acknowledgement: ``SyncStorageArea``), onevlm following its changes.

    The rate is Orthanc's (what the scanner sees); ``intake_seconds`` is how long after the last
    acknowledgement onevlm's journal held every file (Orthanc's StableAge of 1 s included).
    """

    name = "orthanc (onevlm intake)"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.intake_seconds: list[float] = []

    def __enter__(self):
        from ohif_support import Orthanc
        from onevlm.net.config import OrthancSource
        from onevlm.net.orthanc_intake import OrthancIntake

        class Receiver(Orthanc):
            def config(self) -> dict:
                return {**super().config(), "DicomAet": "RECEIVER", "DicomAlwaysAllowStore": True,
                        "DicomCheckCalledAet": False, "SyncStorageArea": True, "DicomThreadsCount": 8,
                        "StableAge": 1}

        shutil.rmtree(self.work, ignore_errors=True)
        os.environ["TCP_NODELAY"] = "1"  # Orthanc's DICOM server (dcmtk) reads it: see DESIGN.md
        self.orthanc = Receiver(self.work / "orthanc").start()
        self.port = self.orthanc.dicom_port
        self.spool = Spool(self.work / "spool")
        self.journal = Journal(self.work / "spool" / "journal.sqlite")
        self.stop = threading.Event()
        intake = OrthancIntake(OrthancSource(self.orthanc.url, poll_seconds=0.1), self.spool, self.journal)
        self.thread = threading.Thread(target=intake.run, args=(self.stop,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        self.journal.close()
        self.orthanc.stop()

    def received(self) -> int:
        stored = int(self.orthanc.get_json("/statistics")["CountInstances"])
        started = time.perf_counter()
        while self.journal.status()["received"] < stored and time.perf_counter() - started < 300:
            time.sleep(0.05)
        self.intake_seconds.append(time.perf_counter() - started)
        return min(stored, self.journal.status()["received"])


class StorescpReceiver:
    name = "storescp"

    def __init__(self, work: Path) -> None:
        self.work = work

    def __enter__(self):
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.port = free_port()
        self.process = subprocess.Popen([find_dcmtk("storescp"), "--fork", "-aet", "RECEIVER", "-od", str(self.work), str(self.port)],
                                        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=10)

    def received(self) -> int:
        return len(list(self.work.glob("*")))


class PynetdicomDefaultReceiver:
    name = "pynetdicom-default"

    def __init__(self, work: Path) -> None:
        self.work = work

    def __enter__(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.port = free_port()
        ae = AE(ae_title="RECEIVER")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 8
        folder = self.work

        def handle_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
        return self

    def __exit__(self, *exc):
        self.server.shutdown()

    def received(self) -> int:
        return len(list(self.work.glob("*.dcm")))


class PynetdicomCeilingReceiver:
    """pynetdicom set up as our listener, with a C-STORE handler that stores nothing (not durable)."""

    name = "pynetdicom-ceiling"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0

    def __enter__(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from onevlm.net.listener import AssociationServer

        self.count = 0
        self.port = free_port()
        ae = AE(ae_title="RECEIVER")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = 8
        ae.maximum_pdu_size = 1_048_576

        lock = threading.Lock()

        def handle_store(event):
            with lock:  # four associations, four threads
                self.count += 1
            return 0x0000

        self.server = ae.make_server(("127.0.0.1", self.port), evt_handlers=[(evt.EVT_C_STORE, handle_store)],
                                     server_class=AssociationServer)
        ae._servers.append(self.server)  # as AE.start_server does: association counting and shutdown
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()

    def received(self) -> int:
        return self.count


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def send(files: list[Path], port: int, associations: int) -> float:
    """Seconds for ``associations`` storescu processes to send ``files`` between them."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    processes = [subprocess.Popen([find_dcmtk("storescu"), "-aet", "BENCH", "-aec", "RECEIVER", "127.0.0.1", str(port), *map(str, chunk)],
                                  env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for chunk in chunks]
    errors = [p.communicate()[1] for p in processes]
    seconds = time.perf_counter() - started
    for p, err in zip(processes, errors):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-orthanc", dest="orthanc", action="store_false",
                        help="leave out Orthanc as the intake (it needs the Debian packages orthanc, orthanc-dicomweb)")
    args = parser.parse_args()
    from onevlm.runtime import configure_runtime

    configure_runtime()  # as `onevlm serve` runs: lenient header reading, quiet third-party logs
    if find_dcmtk("storescu") is None or find_dcmtk("storescp") is None:
        raise SystemExit("dcmtk (storescu, storescp) is needed: apt-get install dcmtk")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_files(root / "files", args.files)
        receivers = [OnevlmReceiver(root / "onevlm"), OnevlmReceiver(root / "onevlm2", processes=2),
                     StorescpReceiver(root / "storescp"), PynetdicomDefaultReceiver(root / "pynetdicom"),
                     PynetdicomCeilingReceiver(root / "ceiling")]
        if args.orthanc:
            receivers.insert(2, OrthancIntakeReceiver(root / "orthanc"))
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeat):
            for associations in (1, 4):
                for receiver in receivers:
                    with receiver as running:
                        seconds = send(files, running.port, associations)
                        got = running.received()
                    if got != len(files):
                        raise RuntimeError(f"{receiver.name}: {got} of {len(files)} files stored")
                    rates.setdefault((receiver.name, associations), []).append(len(files) / seconds)
    size = os.path.getsize(get_testdata_file("693_UNCR.dcm", download=False)) / 1e6
    print(f"{args.files} CT files of {size:.2f} MB each, storescu with TCP_NODELAY=1, {args.repeat} alternating runs")
    result = {}
    for associations in (1, 4):
        ours = statistics.median(rates[("onevlm", associations)])
        print(f"  {associations} association(s):")
        for receiver in receivers:
            median = statistics.median(rates[(receiver.name, associations)])
            result[f"{receiver.name}_{associations}"] = round(median, 1)
            print(f"    {receiver.name:20s} {median:7.1f} files/s   onevlm / this = {ours / median:5.2f}")
    for receiver in receivers:
        if isinstance(receiver, OrthancIntakeReceiver):
            lag = statistics.median(receiver.intake_seconds)
            result["orthanc_intake_lag_seconds"] = round(lag, 2)
            print(f"  Orthanc intake: every file in onevlm's journal {lag:.2f} s (median) after the last "
                  f"acknowledgement (Orthanc's StableAge 1 s included)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
