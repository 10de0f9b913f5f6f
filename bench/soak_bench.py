"""Soak test: a compressed hospital day through ``onevlm serve``, with retention on and a PACS that goes down.

A real ``onevlm serve`` subprocess receives (its own listener, or Orthanc as the intake that the service
follows), a real Orthanc is the PACS destination (C-STORE). For ``--minutes`` the bench sends, at a steady
rate, a mix of studies made from the real DICOM files in ``dicom_samples/`` and pydicom-data's CT
``693_UNCR.dcm`` (fresh UIDs each): multi-hundred-slice CT and multi-series MR studies (copies of one slice
with InstanceNumber / ImagePositionPatient varied; compressed sources stay compressed, so the bytes stay
small), radiographs, ultrasound, non-image objects (an ECG waveform, an RT plan, a text SR), duplicates
(instances sent twice in one association, and instances re-sent later), studies that grow later (more
instances of a series: an amended result is expected), and now and then a corrupt object (garbage after a
valid file meta, an instance without a Study Instance UID, a truncated pixel stream), sent raw by pynetdicom.
dcmtk ``storescu`` sends the studies, one association per study, several at once. The PACS is stopped for a
few minutes early in the run (first half) and started again.

Every few seconds it samples the service process (/proc: resident memory, open descriptors, threads), the
spool (``onevlm_spool_bytes`` of ``/metrics``), the journal's size, ``/status`` (export backlog, queues).
It follows the PACS's changes feed and reads each result SR that arrives (study, series, predecessors,
evidence), so each study's latency is: the last instance acknowledged (storescu's association released) →
the PACS holds a result for every series that gets one, minus the grouping timeout.

At the end it checks the goals and writes ``soak.png``, ``soak.csv`` (the samples), ``studies.csv`` and
``summary.json`` under ``--out`` and prints a table with PASS / FAIL:

- nothing acknowledged is lost: every acknowledged SOP Instance UID is in the journal (``journal_days`` outlives
  the run) and, for image series, in the evidence of its series' current SR at the PACS;
- every study exactly one current result per result series (current = no other SR of that series names it as
  a predecessor), none failed; amendments only where the study grew (or where already-acknowledged instances were
  re-sent after the result: README's documented cost, counted apart);
- resident memory, descriptors, threads flat over the second half: median of its last quarter vs. median of its
  first quarter, growth < 10 %;
- spool bytes bounded: below ``retention.max_spool_bytes`` all along, and not growing over the second half: its
  least-squares trend over the second half under 10 % of its mean there (a sawtooth: quarter medians would compare
  two points of one tooth);
- p95 study → result at the PACS, grouping timeout subtracted, ≤ 5 s for studies whose whole wait lies while
  the PACS is up (before it went down, or after the backlog drained);
- the backlog drained within 60 s of the PACS's return (the last outbox row that was pending at the return sent).

    .venv/bin/python bench/soak_bench.py --minutes 30 --intake listener --out bench/soak/run1
    .venv/bin/python bench/soak_bench.py --seconds 60 --scale 0.1 --pacs-down 10 --out /tmp/soak   # a smoke run

Needs dcmtk (storescu) and Debian's orthanc. Research use only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pydicom  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from dicom_peers import (  # noqa: E402
    SAMPLES,
    Pacs,
    ServeProcess,
    journal_query,
    pydicom_file,
    pynetdicom_scu,
    storescu_acknowledged,
    storescu_args,
    wait_until,
    write_service_config,
)
from ohif_support import Orthanc, _die_with_parent, free_port  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
GROWTH_LIMIT = 0.10
P95_GOAL = 5.0
DRAIN_GOAL = 60.0


# --------------------------------------------------------------------------- workload


#: study kind → (share of studies, templates (file names in dicom_samples/ or pydicom-data's), instances)
MIX = {
    "ct": 0.10, "mr": 0.08, "cr": 0.40, "us": 0.20, "ecg": 0.07, "sr": 0.05, "rt": 0.03, "corrupt": 0.012,
}
TEMPLATES = {
    "ct": ["pydicom:693_UNCR.dcm", "ct_pancreas_j2k.dcm", "ct_head_512_j2k.dcm"],
    "mr": ["mr_abdomen_liver.dcm", "mr_small_no_bodypart.dcm"],
    "mr_mf": ["mr_head_enhanced_10frames.dcm"],
    "cr": ["cr_chest_j2k.dcm", "cr_extremity_j2k.dcm"],
    "us": ["us_echocardiogram.dcm", "us_obstetric_rle.dcm", "us_small_parts_j2k.dcm"],
    "ecg": ["ecg_waveform.dcm"],
    "sr": ["sr_simple_image_report.dcm"],
    "rt": ["rt_plan.dcm"],
}
IMAGE_KINDS = {"ct", "mr", "mr_mf", "cr", "us"}


@dataclass
class Study:
    """One study of the workload: what was sent, what was acknowledged, what the PACS holds for it."""

    n: int
    kind: str
    uid: str
    files: list[Path] = field(default_factory=list)
    sop_of: dict[str, str] = field(default_factory=dict)            # file → SOP Instance UID
    series_of: dict[str, str] = field(default_factory=dict)         # SOP → Series Instance UID
    image_series: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)                    # SOP UIDs acknowledged
    refused: int = 0
    scheduled: float = 0.0
    first_ack: float | None = None
    last_ack: float | None = None                                   # the initial send's end (epoch s)
    grew_at: float | None = None                                    # when more instances of a series came
    resent_at: float | None = None                                  # when acknowledged instances were re-sent
    corrupt: str | None = None                                      # garbage | no-study | truncated
    late_files: list[Path] = field(default_factory=list)            # kept for a later re-send
    grow_source: Path | None = None                                 # kept for a later growth


class Workload:
    """Makes studies (files with fresh UIDs) from the real templates; one thread uses it at a time."""

    def __init__(self, folder: Path, scale: float, rng: random.Random) -> None:
        self.folder = folder
        self.scale = scale
        self.rng = rng
        self.templates: dict[str, list[pydicom.Dataset]] = {}
        for kind, names in TEMPLATES.items():
            self.templates[kind] = [self._load(name) for name in names]
        self.count = 0

    @staticmethod
    def _load(name: str) -> pydicom.Dataset:
        path = pydicom_file(name.split(":", 1)[1]) if name.startswith("pydicom:") else SAMPLES / name
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:  # storescu here has no codecs: send them uncompressed
            ds.decompress()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds

    def slices(self, low: int, high: int) -> int:
        return max(2, int(self.rng.randint(low, high) * self.scale))

    def make(self, kind: str) -> Study:
        self.count += 1
        study = Study(self.count, kind, generate_uid())
        folder = self.folder / f"study{self.count:05d}"
        folder.mkdir(parents=True)
        rng = self.rng
        if kind == "ct":
            template = rng.choice(self.templates["ct"])
            total = self.slices(150, 320)
            nseries = rng.choice([1, 1, 2])
            for k in range(nseries):
                self._series(study, folder, template, total // nseries, "CT")
            if rng.random() < 0.3:  # an RT plan in the CT study (a non-image object beside the images)
                self._series(study, folder, self.templates["rt"][0], 1, "RTPLAN")
        elif kind == "mr":
            for k in range(rng.randint(3, 4)):
                self._series(study, folder, rng.choice(self.templates["mr"]), self.slices(30, 60), "MR")
            if rng.random() < 0.5:
                self._series(study, folder, self.templates["mr_mf"][0], 1, "MR")
        elif kind == "cr":
            self._series(study, folder, rng.choice(self.templates["cr"]), rng.randint(1, 3), "CR", position=False)
        elif kind == "us":
            self._series(study, folder, rng.choice(self.templates["us"]), rng.randint(2, 8), "US", position=False)
        elif kind in ("ecg", "sr", "rt"):
            self._series(study, folder, self.templates[kind][0], 1, kind.upper(), position=False)
        elif kind == "corrupt":
            self._corrupt(study, folder)
        return study

    def _series(self, study: Study, folder: Path, ds: pydicom.Dataset, count: int, modality: str,
                position: bool = True) -> str:
        series = generate_uid()
        if "PixelData" in ds:
            study.image_series.add(series)
        ds.StudyInstanceUID = study.uid
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = len({*study.series_of.values()}) + 1
        ds.PatientID = f"SOAK-{study.n % 997}"
        ds.AccessionNumber = f"SOAK{study.n:06d}"
        ds.StudyID = str(study.n)
        origin = list(ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
        for i in range(count):
            sop = generate_uid()
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = i + 1
            if position and "ImagePositionPatient" in ds:
                ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + 1.25 * i]
                if "SliceLocation" in ds:
                    ds.SliceLocation = float(origin[2]) + 1.25 * i
            path = folder / f"{ds.SeriesNumber:02d}_{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.files.append(path)
            study.sop_of[str(path)] = sop
            study.series_of[sop] = series
        return series

    def grow(self, study: Study) -> list[Path]:
        """More instances of one of the study's image series (an amended result is expected)."""
        source = study.grow_source
        series = study.series_of[study.sop_of[str(source)]]
        ds = pydicom.dcmread(source)
        folder = source.parent
        paths = []
        for i in range(self.rng.randint(2, 5)):
            sop = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = 1000 + i
            path = folder / f"grow_{sop[-12:]}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.sop_of[str(path)] = sop
            study.series_of[sop] = series
            paths.append(path)
        return paths

    def _corrupt(self, study: Study, folder: Path) -> None:
        import struct

        what = self.rng.choice(["garbage", "no-study", "truncated"])
        study.corrupt = what
        path = folder / f"corrupt_{what}.dcm"
        if what == "garbage":  # a valid file meta, then a dataset nobody can parse
            meta = pydicom.dataset.FileMetaDataset()
            meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop = generate_uid()
            meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.save_as(path, enforce_file_format=True)
            body = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + bytes(range(1, 5)) + b"\xff" * 60
            path.write_bytes(path.read_bytes() + body)
        elif what == "no-study":
            ds = self.templates["mr"][1]
            ds.StudyInstanceUID = study.uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.save_as(path, enforce_file_format=True)
            copy = pydicom.dcmread(path)
            del copy.StudyInstanceUID
            copy.save_as(path, enforce_file_format=True)
        else:  # the second half of the pixel bytes cut off (a transfer that broke); may be stored and routed
            from damaged_dicom import cut_native_pixels

            self._series(study, folder, self.templates["ct"][0], 1, "CT")
            whole = study.files.pop()
            sop = study.sop_of.pop(str(whole))
            cut_native_pixels(whole, path)
            whole.unlink()
        study.files.append(path)
        study.sop_of[str(path)] = sop
        if what != "truncated":
            study.series_of[sop] = "-"


# --------------------------------------------------------------------------- peers


class IntakeOrthanc(Orthanc):
    """Orthanc as the front door: durable acknowledgement, any calling AE, StableAge = the grouping timeout."""

    AE_TITLE = "INTAKE"

    def __init__(self, workdir: Path, stable_age: int) -> None:
        super().__init__(workdir)
        self.stable_age = stable_age

    def config(self) -> dict:
        return {**super().config(), "Name": "onevlm-soak-intake", "DicomAet": self.AE_TITLE,
                "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True,
                "SyncStorageArea": True, "DicomThreadsCount": 6, "StableAge": self.stable_age}


class Serve(ServeProcess):
    """``onevlm serve`` ready when it says it listens, or follows Orthanc."""

    def start(self, timeout: float = 90) -> "Serve":
        env = {**ENV, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "onevlm", "serve", "--config", str(self.config_path)], stdout=log,
                stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True, preexec_fn=_die_with_parent)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"onevlm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            text = self.log_path.read_text(errors="replace")
            return "onevlm listening as" in text or "onevlm following Orthanc" in text

        wait_until(ready, timeout, 0.1, "onevlm serve to start")
        return self


def http_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def http_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def proc_sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# --------------------------------------------------------------------------- the run


class PacsWatcher(threading.Thread):
    """Follows the PACS's changes; reads each onevlm SR that arrives (its arrival time, evidence, predecessors)."""

    def __init__(self, pacs: Pacs) -> None:
        super().__init__(name="pacs-watcher", daemon=True)
        self.pacs = pacs
        self.since = 0
        self.srs: dict[str, dict] = {}        # SR SOP UID → info
        self.stop = threading.Event()
        self.errors = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 (the PACS is down, or restarting)
                self.errors += 1
            self.stop.wait(0.25)

    def poll(self) -> None:
        while True:
            changes = self.pacs.get_json(f"/changes?since={self.since}&limit=500")
            seen = time.time()
            for change in changes["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.read(change["ID"], seen)
                self.since = change["Seq"]
            if changes.get("Done", True):
                return

    def read(self, orthanc_id: str, seen: float) -> None:
        with urllib.request.urlopen(f"{self.pacs.url}/instances/{orthanc_id}/file", timeout=30) as response:
            ds = pydicom.dcmread(io.BytesIO(response.read()))
        if ds.get("Modality") != "SR" or not str(ds.get("SeriesDescription", "")).startswith("onevlm"):
            return
        evidence: dict[str, set[str]] = {}
        for item in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
            for series in item.get("ReferencedSeriesSequence", []):
                evidence.setdefault(str(series.SeriesInstanceUID), set()).update(
                    str(ref.ReferencedSOPInstanceUID) for ref in series.get("ReferencedSOPSequence", []))
        predecessors = {str(ref.ReferencedSOPInstanceUID) for item in ds.get("PredecessorDocumentsSequence", [])
                        for series in item.get("ReferencedSeriesSequence", [])
                        for ref in series.get("ReferencedSOPSequence", [])}
        with self.lock:
            self.srs.setdefault(str(ds.SOPInstanceUID), {
                "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID), "seen": seen,
                "description": str(ds.get("SeriesDescription", "")), "evidence": evidence,
                "predecessors": predecessors})


class Soak:
    def __init__(self, args: argparse.Namespace, intake: str, out: Path, work: Path) -> None:
        self.args = args
        self.intake = intake
        self.out = out
        self.work = work
        self.rng = random.Random(args.seed)
        self.studies: list[Study] = []
        self.samples: list[dict] = []
        self.events: dict[str, float] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.late: list[tuple[float, str, Study]] = []
        self.late_lock = threading.Lock()
        self.stop_sending = threading.Event()
        self.stop_sampling = threading.Event()
        self.finished = threading.Event()
        self.send_lag: list[float] = []
        self.sent_files = 0
        self.retried = 0
        self.backpressure = 0.0
        self.bench_error: str | None = None
        self.lock = threading.Lock()
        self.outbox_at_return: int | None = None

    # ------------------------------------------------------------------ senders

    def send_job(self, study: Study, files: list[Path], what: str) -> None:
        """One association (storescu), or pynetdicom for a corrupt object; retries what was not acknowledged."""
        pending = list(files)
        for attempt in range(6):
            if not pending:
                break
            if attempt:
                with self.lock:
                    self.retried += len(pending)
                time.sleep(1 + attempt)
            if study.corrupt and what == "initial":
                try:
                    statuses = pynetdicom_scu(self.port, pending, aet="SOAKSCU", called=self.called)
                except ConnectionError:
                    continue
                done = time.time()
                acked = [p for p, s in zip(pending, statuses) if s == 0]
                study.refused += sum(1 for s in statuses if s != 0)
                pending = []  # a refused corrupt object is an expected refusal: not sent again
            else:
                log = self.work / "logs" / f"{study.n}_{what}_{attempt}_{threading.get_ident()}.log"
                with log.open("wb") as handle:
                    # -R: propose only the files' own SOP classes (a retired US class too) and transfer syntax
                    subprocess.run(storescu_args(pending, self.port, "SOAKSCU", self.called, extra=["-R"]),
                                   stdout=subprocess.DEVNULL, stderr=handle, env=ENV, timeout=600)
                done = time.time()
                acked = storescu_acknowledged(log.read_text(errors="replace"))
                acked_set = {str(p) for p in acked}
                pending = [p for p in pending if str(p) not in acked_set]
                log.unlink()
            with self.lock:
                self.sent_files += len(acked)
                for path in acked:
                    study.acked.add(study.sop_of[str(path)])
            if what == "initial" and acked:
                study.first_ack = study.first_ack or done
                study.last_ack = done
        if what == "initial" and study.corrupt is None and pending:
            study.refused += len(pending)

    def sender(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            study, files, what = job
            if what == "initial":
                self.send_lag.append(time.time() - study.scheduled)
            try:
                self.send_job(study, files, what)
            except Exception as exc:  # noqa: BLE001 (a bench thread must not die silently)
                print(f"sender: study {study.n} {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if what == "initial":
                keep = {str(p) for p in [*study.late_files, study.grow_source] if p is not None}
                for path in study.files:
                    if str(path) not in keep:
                        path.unlink(missing_ok=True)

    def scheduler(self, duration: float, interval: float, progress) -> None:
        """Releases one study every ``interval`` seconds (steady), and the late re-sends / growth on time."""
        workload = Workload(self.work / "data", self.args.scale, self.rng)
        mix = {**MIX, "corrupt": self.args.corrupt_share}
        kinds, weights = zip(*mix.items())
        stretch = min(1.0, max(0.1, duration / 600))  # late events come sooner in a short run
        started = time.time()
        next_at = started
        self.events["send_start"] = started
        while time.time() - started < duration and not self.stop_sending.is_set():
            kind = self.rng.choices(kinds, weights)[0]
            study = workload.make(kind)
            files = list(study.files)
            if study.corrupt is None:
                if self.rng.random() < 0.05:  # instances sent twice in one association
                    files += self.rng.sample(study.files, min(len(study.files), self.rng.randint(1, 4)))
                if self.rng.random() < self.args.resend_share:  # acknowledged instances re-sent later (same series, nothing new)
                    study.late_files = self.rng.sample(study.files, min(len(study.files), self.rng.randint(1, 3)))
                    self._later(self.rng.uniform(20, 60) * stretch, "resend", study)
                if study.image_series and kind in ("ct", "mr", "us") and self.rng.random() < self.args.grow_share:
                    study.grow_source = self.rng.choice([p for p in study.files
                                                         if study.series_of[study.sop_of[str(p)]] in study.image_series])
                    self._later(self.rng.uniform(30, 90) * stretch, "grow", study)
            self.studies.append(study)
            delay = next_at - time.time()
            if delay > 0:
                time.sleep(delay)
            while self.jobs.qsize() > 2 * self.args.associations:  # the senders are behind: wait, as a scanner does
                time.sleep(0.1)
                self.backpressure += 0.1
                next_at = time.time()
            study.scheduled = time.time()
            self.jobs.put((study, files, "initial"))
            progress(study)
            next_at += interval * self.rng.uniform(0.5, 1.5)
            self._release_late(workload, time.time())
        self._release_late(workload, float("inf"))
        self.events["send_end"] = time.time()

    def _later(self, delay: float, what: str, study: Study) -> None:
        with self.late_lock:
            self.late.append((time.time() + delay, what, study))

    def _release_late(self, workload: Workload, now: float) -> None:
        with self.late_lock:
            due = [item for item in self.late if item[0] <= now]
            self.late = [item for item in self.late if item[0] > now]
        for at, what, study in due:
            if study.last_ack is None and not study.refused:
                if now != float("inf"):  # its first send has not ended yet: later, never blocking the schedule
                    self._later(5, what, study)
                    continue
                wait_until(lambda: study.last_ack is not None or study.refused, 600, 0.2, "the study's first send")
            if what == "resend":
                study.resent_at = time.time()
                self.jobs.put((study, list(study.late_files), "resend"))
            else:
                paths = workload.grow(study)
                study.grew_at = time.time()
                self.jobs.put((study, paths, "grow"))

    # ------------------------------------------------------------------ sampling and chaos

    def sampler(self) -> None:
        while not self.stop_sampling.is_set():
            row = {"t": time.time()}
            try:
                row.update(proc_sample(self.serve.process.pid))
            except (OSError, KeyError):
                pass
            try:
                status = http_json(f"{self.status_url}/status")
                row.update(export_pending=status["export_pending"], queued=status["queued"],
                           received=status["received"], processed=status["processed"], exported=status["exported"],
                           duplicates=status["duplicates"], quarantined=status["quarantined"],
                           refused=status["refused"], failed=status["failed"])
                text = http_text(f"{self.status_url}/metrics")
                row["spool_mb"] = (metric(text, "onevlm_spool_bytes") or 0) / 1e6
                row["retention_freed_mb"] = (metric(text, "onevlm_retention_freed_bytes_total") or 0) / 1e6
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            journal = self.spool / "journal.sqlite"
            row["journal_mb"] = sum(p.stat().st_size for p in journal.parent.glob("journal.sqlite*")
                                    if p.is_file() and not p.name.endswith(".bak")) / 1e6
            row["pacs_up"] = int(self.pacs_up)
            row["load1"] = float(Path("/proc/loadavg").read_text().split()[0])
            row["sent_files"] = self.sent_files
            self.samples.append(row)
            self.stop_sampling.wait(self.args.sample_seconds)

    def chaos(self, duration: float) -> None:
        """The PACS goes down at ``--pacs-down-at`` of the sending time, for ``--pacs-down`` seconds."""
        if self.args.pacs_down <= 0:
            return
        time.sleep(duration * self.args.pacs_down_at)
        self.events["pacs_down"] = time.time()
        self.pacs_up = False
        self.pacs.stop()
        time.sleep(self.args.pacs_down)
        self.outbox_at_return = journal_query(self.spool, "SELECT COALESCE(MAX(id), 0) FROM outbox")[0][0]
        self.pacs.start()
        self.events["pacs_up"] = time.time()
        self.pacs_up = True
        # Orthanc was started with PR_SET_PDEATHSIG from this thread: it must live as long as the PACS
        self.finished.wait()

    # ------------------------------------------------------------------ main

    def run(self) -> dict:
        args = self.args
        duration = args.seconds if args.seconds else args.minutes * 60
        self.spool = self.work / "spool"
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        idle = args.idle
        results_days = max(args.results_minutes, 0.5) / 1440
        retention = {"enabled": True, "interval_seconds": args.retention_interval, "instances_after_sent": "headers",
                     "results_days": results_days, "quarantine_days": results_days, "journal_days": 1,
                     "records_days": 1, "max_spool_bytes": int(args.max_spool_mb * 1e6)}
        self.pacs = Pacs(self.work / "pacs")
        self.pacs.start()
        self.pacs_up = True
        intake_orthanc = None
        try:
            status_port = free_port()
            overrides = {"grouping": {"by": "study", "idle_seconds": idle}, "status_port": status_port,
                         "retry": {"base_seconds": 1, "max_seconds": args.retry_max, "max_attempts": 10000},
                         "retention": retention, "workers": args.workers,
                         "disk": {"min_free_bytes": 0, "min_free_percent": 0}}
            if self.intake == "orthanc":
                intake_orthanc = IntakeOrthanc(self.work / "intake-orthanc", max(1, round(idle)))
                os.environ["TCP_NODELAY"] = "1"
                intake_orthanc.start()
                overrides["intake"] = {"orthanc": intake_orthanc.url, "poll_seconds": 0.5}
                self.port, self.called = intake_orthanc.dicom_port, IntakeOrthanc.AE_TITLE
                self.grouping_wait = intake_orthanc.stable_age
            config = write_service_config(self.work / "service.yaml", self.spool,
                                          destinations=[self.pacs.destination()],
                                          listener={"max_associations": 16}, **overrides)
            if self.intake == "listener":
                import yaml

                self.port, self.called = yaml.safe_load(config.read_text())["listener"]["port"], "ONEVLM"
                self.grouping_wait = idle
            self.status_url = f"http://127.0.0.1:{status_port}"
            self.serve = Serve(config, self.work / "serve.log").start()
            wait_until(lambda: http_json(f"{self.status_url}/status"), 60, 0.2, "/status")
            self.events["start"] = time.time()
            self.load_before = Path("/proc/loadavg").read_text().split()[:3]
            watcher = PacsWatcher(self.pacs)
            watcher.start()
            sampler = threading.Thread(target=self.sampler, name="sampler", daemon=True)
            sampler.start()
            senders = [threading.Thread(target=self.sender, name=f"sender{k}", daemon=True)
                       for k in range(args.associations)]
            for thread in senders:
                thread.start()
            chaos = threading.Thread(target=self.chaos, args=(duration,), name="chaos", daemon=True)
            chaos.start()
            interval = 60.0 / self.rate()
            progress = self.progress(duration)
            try:
                self.scheduler(duration, interval, progress)
            except Exception as exc:  # noqa: BLE001 (a bench bug must not throw away the run's figures)
                self.events.setdefault("send_end", time.time())
                self.bench_error = f"scheduler: {type(exc).__name__}: {exc}"
                print(self.bench_error, file=sys.stderr)
            for _ in senders:
                self.jobs.put(None)
            for thread in senders:
                thread.join()
            self.events["sent"] = time.time()
            progress.close() if hasattr(progress, "close") else None
            print(f"[{self.intake}] sent; waiting for every result at the PACS ...", flush=True)
            wait_until(lambda: "pacs_up" in self.events or self.args.pacs_down <= 0, 3600, 0.5, "the PACS back")
            self.drain(watcher)
            self.events["end"] = time.time()
            time.sleep(args.sample_seconds)
            self.stop_sampling.set()
            sampler.join()
            watcher.stop.set()
            watcher.join()
            serve_alive = self.serve.process.poll() is None
            self.load_after = Path("/proc/loadavg").read_text().split()[:3]
            self.serve.stop()
            return self.evaluate(watcher, serve_alive)
        finally:
            self.finished.set()
            self.stop_sending.set()
            self.stop_sampling.set()
            if getattr(self, "serve", None) is not None:
                self.serve.stop()
            self.pacs.stop()
            if intake_orthanc is not None:
                intake_orthanc.stop()

    def rate(self) -> float:
        """Studies per minute: ``--rate``, or (auto) the one that makes ``--files-per-second`` on average."""
        if self.args.rate != "auto":
            return float(self.args.rate)
        scale = self.args.scale
        mean_files = {"ct": 235 * scale + 0.3, "mr": 3.5 * 45 * scale + 0.5, "cr": 2, "us": 5, "ecg": 1, "sr": 1,
                      "rt": 1, "corrupt": 1}
        per_study = sum(MIX[k] * max(2, mean_files[k]) for k in MIX) / sum(MIX.values())
        return self.args.files_per_second * 60 / per_study

    def progress(self, duration: float):
        from tqdm import tqdm

        bar = tqdm(total=int(duration), unit="s", desc=f"soak [{self.intake}]",
                   mininterval=2 if sys.stderr.isatty() else 30,
                   disable=not sys.stderr.isatty() and not self.args.progress)
        state = {"last": time.time(), "done": 0}

        def update(study: Study) -> None:
            elapsed = int(time.time() - self.events["send_start"])
            bar.update(max(0, min(int(duration), elapsed) - state["done"]))
            state["done"] = max(state["done"], elapsed)
            last = self.samples[-1] if self.samples else {}
            bar.set_postfix(studies=len(self.studies), files=self.sent_files, rss=f"{last.get('rss_mb', 0):.0f}M",
                            backlog=last.get("export_pending"), pacs="up" if self.pacs_up else "DOWN", refresh=False)
        update.close = bar.close
        return update

    def drain(self, watcher: PacsWatcher) -> None:
        """Wait (``--drain-timeout``) until every study with an acknowledged image series has its results at
        the PACS, nothing is queued and nothing is pending export."""
        def done() -> bool:
            status = http_json(f"{self.status_url}/status")
            if status["queued"] or status["export_pending"]:
                return False
            with watcher.lock:
                have = {(sr["study"]) for sr in watcher.srs.values()}
            return all(s.uid in have for s in self.studies if self.expects_result(s))
        try:
            wait_until(done, self.args.drain_timeout, 1.0, "every result at the PACS")
        except AssertionError as exc:
            print(f"drain: {exc}", file=sys.stderr)
        time.sleep(2)  # a last look at the changes feed

    def expects_result(self, study: Study) -> bool:
        """An acknowledged image series (a truncated image is judged apart: see ``damaged_without_result``)."""
        if study.corrupt == "truncated":
            return False
        return any(study.series_of.get(sop) in study.image_series for sop in study.acked)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, watcher: PacsWatcher, serve_alive: bool) -> dict:
        args = self.args
        journal_sops = {row[0] for row in journal_query(self.spool, "SELECT sop_instance_uid FROM instances")}
        groups = dict(journal_query(self.spool, "SELECT group_key, status FROM groups"))
        srs = watcher.srs
        by_series: dict[tuple[str, str], list[str]] = {}
        for uid, sr in srs.items():
            by_series.setdefault((sr["study"], sr["series"]), []).append(uid)
        down = self.events.get("pacs_down")
        up = self.events.get("pacs_up")
        drained_at = None
        if up is not None and self.outbox_at_return is not None:
            rows = journal_query(self.spool, "SELECT status, sent_at FROM outbox WHERE id <= ? AND destination = 'pacs'",
                                 (self.outbox_at_return,))
            # an amended result replaced before it was sent (superseded) is never sent: not backlog
            pending_at_return = [r for r in rows if (r[1] is None or r[1] >= up) and r[0] != "superseded"]
            sent = [r[1] for r in pending_at_return if r[0] == "sent" and r[1] is not None]
            if all(r[0] == "sent" for r in pending_at_return):
                drained_at = max(sent) if sent else up
            backlog_at_return = len(pending_at_return)
        else:
            backlog_at_return = 0
        recovered = drained_at if drained_at is not None else (up + DRAIN_GOAL if up else None)

        lost, not_journaled, missing_result, several_current, failed_groups = [], [], [], [], []
        evidence_short, unexpected_amend, resend_amend, grown_amend = [], [], [], []
        rows = []
        damaged_without_result, damaged_with_result = [], []
        for study in self.studies:
            if not study.acked:
                continue
            if study.corrupt == "truncated":  # stored (the header parses): does the damaged image get a result?
                has = any(s == study.uid for (s, _) in by_series)
                (damaged_with_result if has else damaged_without_result).append(study.uid)
                not_journaled += [sop for sop in study.acked if sop not in journal_sops]
                continue
            not_journaled += [sop for sop in study.acked if sop not in journal_sops]
            if groups.get(study.uid) not in ("done", None):
                failed_groups.append((study.uid, groups.get(study.uid)))
            result_series = {series: uids for (s, series), uids in by_series.items() if s == study.uid}
            current = {}
            for series, uids in result_series.items():
                named = set().union(*(srs[u]["predecessors"] for u in uids))
                heads = [u for u in uids if u not in named]
                if len(heads) != 1:
                    several_current.append((study.uid, series, len(heads)))
                current[series] = heads
                versions = len(uids)
                if versions > 1:
                    if study.grew_at is not None:
                        grown_amend.append(study.uid)
                    elif study.resent_at is not None:
                        resend_amend.append(study.uid)
                    else:
                        unexpected_amend.append((study.uid, series, versions))
            covered: set[str] = set()
            for heads in current.values():
                for head in heads:
                    for refs in srs[head]["evidence"].values():
                        covered |= refs
            for series in study.image_series:
                acked = {sop for sop in study.acked if study.series_of.get(sop) == series}
                if acked and not acked <= covered:
                    evidence_short.append((study.uid, series, len(acked - covered)))
                    lost += sorted(acked - covered - journal_sops)
            acked_image_series = {study.series_of.get(sop) for sop in study.acked} & study.image_series
            if not acked_image_series <= {ser for refs in (srs[h]["evidence"] for heads in current.values()
                                                            for h in heads) for ser in refs}:
                missing_result.append(study.uid)  # an image series without a result of its own
            elif len(result_series) != len(acked_image_series):
                several_current.append((study.uid, "results", len(result_series), len(acked_image_series)))
            first_seen = [min(srs[u]["seen"] for u in uids) for uids in result_series.values()]
            latency = (max(first_seen) - study.last_ack - self.grouping_wait
                       if first_seen and study.last_ack else None)
            when = "up"
            if down is not None and study.last_ack is not None:
                result_at = max(first_seen) if first_seen else float("inf")
                if not (result_at < down or study.last_ack > (recovered or float("inf"))):
                    when = "down/recovering"
            rows.append({"n": study.n, "kind": study.kind, "study": study.uid, "instances": len(study.acked),
                         "series": len(study.image_series), "results": len(result_series),
                         "versions": sum(len(u) for u in result_series.values()), "last_ack": study.last_ack,
                         "latency_s": latency, "period": when, "grew": study.grew_at is not None,
                         "resent": study.resent_at is not None, "corrupt": study.corrupt or "",
                         "refused": study.refused})

        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            values = sorted(values)
            return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

        up_lat = [r["latency_s"] for r in rows if r["latency_s"] is not None and r["period"] == "up"]
        down_lat = [r["latency_s"] for r in rows if r["latency_s"] is not None and r["period"] != "up"]
        start, end = self.events["send_start"], self.events["sent"]
        half = [s for s in self.samples if start + (end - start) / 2 <= s["t"] <= end]

        def growth(key: str) -> dict:
            values = [(s["t"], s[key]) for s in half if s.get(key) is not None]
            if len(values) < 8:
                return {"measured": False, "samples": len(values)}
            q = len(values) // 4
            first = statistics.median(v for _, v in values[:q])
            last = statistics.median(v for _, v in values[-q:])
            ts, vs = zip(*values)
            slope = statistics.linear_regression(ts, vs).slope if len(set(ts)) > 1 else 0.0
            mean = statistics.fmean(vs)
            return {"measured": True, "samples": len(values), "first_quarter_median": round(first, 2),
                    "last_quarter_median": round(last, 2),
                    "growth": round((last - first) / first, 4) if first else 0.0,
                    "fit_per_hour": round(slope * 3600, 3), "max": round(max(vs), 2),
                    # the fitted trend over the second half, as a share of its mean
                    "trend": round(slope * (ts[-1] - ts[0]) / mean, 4) if mean else 0.0}

        resources = {key: growth(key) for key in ("rss_mb", "fds", "threads", "spool_mb", "journal_mb")}
        spool_max = max((s.get("spool_mb", 0) for s in self.samples), default=0)
        acked_total = sum(len(s.acked) for s in self.studies)
        status_end = next((s for s in reversed(self.samples) if "received" in s), {})
        corrupt = [s for s in self.studies if s.corrupt]
        summary = {
            "intake": self.intake,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.events["start"])),
            "sending_seconds": round(end - start, 1),
            "loadavg_1_5_15": {"before": self.load_before, "after": self.load_after, "cpus": os.cpu_count(),
                               "mean_1min_while_sending": round(statistics.mean(
                                   [s["load1"] for s in self.samples if start <= s["t"] <= end] or [0]), 2)},
            "non_image_only_studies": sum(1 for s in self.studies if s.acked and not self.expects_result(s)),
            "rate_studies_per_min": round(self.rate(), 1),
            "studies": len(self.studies), "studies_acknowledged": sum(1 for s in self.studies if s.acked),
            "instances_acknowledged": acked_total, "files_sent_incl_duplicates": self.sent_files,
            "files_per_second": round(self.sent_files / max(1.0, end - start), 1),
            "send_lag_p95_s": round(pct(self.send_lag, 0.95) or 0, 2),
            "studies_per_min_sent": round(sum(1 for s in self.studies if s.acked) / max(1.0, end - start) * 60, 1),
            "backpressure_seconds": round(self.backpressure, 1),
            "kinds": {k: sum(1 for s in self.studies if s.kind == k) for k in MIX},
            "corrupt": {"sent": len(corrupt), "refused": sum(s.refused for s in corrupt),
                        "accepted": sum(len(s.acked) for s in corrupt),
                        "by_kind": {k: sum(1 for s in corrupt if s.corrupt == k) for k in ("garbage", "no-study", "truncated")}},
            "refused_not_corrupt": sum(s.refused for s in self.studies if not s.corrupt),
            "retried_files": self.retried,
            "grown_studies": sum(1 for s in self.studies if s.grew_at), "resent_studies": sum(1 for s in self.studies if s.resent_at),
            "service_status_end": {k: status_end.get(k) for k in ("received", "duplicates", "quarantined", "refused",
                                                                    "processed", "exported", "export_pending", "failed")},
            "service_alive_at_end": serve_alive,
            "bench_error": self.bench_error,
            "grouping_wait_s": self.grouping_wait,
            "retention": {"results_minutes": args.results_minutes, "interval_seconds": args.retention_interval,
                          "max_spool_mb": args.max_spool_mb},
            "pacs_down": {"at_s": round(down - start, 1) if down else None,
                          "seconds": round(up - down, 1) if down and up else None,
                          "backlog_at_return": backlog_at_return,
                          "drained_after_s": round(drained_at - up, 1) if drained_at and up else None},
            "latency": {"up": {"n": len(up_lat), "p50": pct(up_lat, 0.5), "p95": pct(up_lat, 0.95),
                               "max": max(up_lat, default=None)},
                        "down_or_recovering": {"n": len(down_lat), "p50": pct(down_lat, 0.5), "p95": pct(down_lat, 0.95),
                                               "max": max(down_lat, default=None)}},
            "resources_second_half": resources,
            "spool_max_mb": round(spool_max, 1),
            "srs_at_pacs": len(srs),
            "problems": {"lost": lost[:20], "lost_count": len(lost), "not_journaled": len(not_journaled),
                         "missing_result": missing_result[:20], "missing_result_count": len(missing_result),
                         "several_current": several_current[:20], "evidence_short": evidence_short[:20],
                         "failed_groups": failed_groups[:20], "unexpected_amendments": unexpected_amend[:20]},
            "damaged_images_acknowledged": {"with_result": len(damaged_with_result),
                                            "without_result": damaged_without_result[:20],
                                            "group_status": [groups.get(u) for u in damaged_without_result[:20]]},
            "amendments": {"grown": len(set(grown_amend)), "after_resend": len(set(resend_amend)),
                           "unexpected": len(unexpected_amend)},
        }
        latency_p95 = summary["latency"]["up"]["p95"]
        goals = {
            "nothing acknowledged lost": not lost and not not_journaled and not evidence_short,
            "one current result per study": (not several_current and not missing_result and not failed_groups
                                              and not unexpected_amend),
            "memory flat (2nd half < 10 %)": resources["rss_mb"].get("growth", 1) < GROWTH_LIMIT
            if resources["rss_mb"]["measured"] else None,
            "descriptors flat (2nd half < 10 %)": resources["fds"].get("growth", 1) < GROWTH_LIMIT
            if resources["fds"]["measured"] else None,
            "threads flat (2nd half < 10 %)": resources["threads"].get("growth", 1) < GROWTH_LIMIT
            if resources["threads"]["measured"] else None,
            # the spool is a sawtooth (intake between clean-ups, a study's bytes leaving at once): two quarter
            # medians compare two points of a tooth, so its trend is the least-squares fit over the second half
            "spool bounded by retention": (spool_max <= args.max_spool_mb
                                           and (not resources["spool_mb"]["measured"]
                                                or resources["spool_mb"]["trend"] < GROWTH_LIMIT)),
            "p95 study -> result <= 5 s (PACS up)": latency_p95 is not None and latency_p95 <= P95_GOAL,
            "backlog drained <= 60 s after return": (summary["pacs_down"]["drained_after_s"] is not None
                                                     and summary["pacs_down"]["drained_after_s"] <= DRAIN_GOAL)
            if down else None,
            "service alive": serve_alive,
            "damaged image acknowledged -> a result": not damaged_without_result
            if damaged_with_result or damaged_without_result else None,
        }
        summary["goals"] = {k: ("PASS" if v else "FAIL") if v is not None else "n/a" for k, v in goals.items()}
        self.write(summary, rows)
        return summary

    def write(self, summary: dict, rows: list[dict]) -> None:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for s in self.samples for k in s}, key=lambda k: (k != "t", k))
        with (out / "soak.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, keys)
            writer.writeheader()
            writer.writerows(self.samples)
        with (out / "studies.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, list(rows[0]) if rows else ["n"])
            writer.writeheader()
            writer.writerows(rows)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        self.plot(out / "soak.png", rows)
        shutil.copy(self.work / "serve.log", out / "serve.log") if self.args.keep_log else None

    def plot(self, path: Path, rows: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t0 = self.events["send_start"]
        samples = self.samples
        t = [(s["t"] - t0) / 60 for s in samples]
        panels = [("rss_mb", "resident memory (MB)"), ("fds", "open descriptors"), ("threads", "threads"),
                  ("spool_mb", "spool (MB)"), ("journal_mb", "journal (MB)"), ("export_pending", "export backlog"),
                  ("latency", "study → result at PACS (s, after grouping)"), ("load1", "load average (1 min)")]
        fig, axes = plt.subplots(4, 2, figsize=(11, 10), sharex=True)
        for ax, (key, title) in zip(axes.flat, panels):
            if key == "latency":
                pts = [((r["last_ack"] - t0) / 60, r["latency_s"]) for r in rows if r["latency_s"] is not None]
                if pts:
                    ax.scatter(*zip(*pts), s=4, alpha=0.6)
                ax.axhline(P95_GOAL, color="red", lw=0.8, ls="--")
                ax.set_yscale("symlog", linthresh=10)
            else:
                ax.plot(t, [s.get(key) for s in samples], lw=1)
            if key == "spool_mb":
                ax.axhline(self.args.max_spool_mb, color="red", lw=0.8, ls="--")
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=8)
            if "pacs_down" in self.events and "pacs_up" in self.events:
                ax.axvspan((self.events["pacs_down"] - t0) / 60, (self.events["pacs_up"] - t0) / 60,
                           color="red", alpha=0.12)
            ax.axvline((self.events["sent"] - t0) / 60, color="grey", lw=0.6, ls=":")
        for ax in axes[-1]:
            ax.set_xlabel("minutes (shaded: PACS down; dotted: sending ended)", fontsize=8)
        fig.suptitle(f"onevlm soak, intake {self.intake}, {len(self.studies)} studies", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=70)
        plt.close(fig)


def print_table(summary: dict) -> None:
    lat = summary["latency"]
    res = summary["resources_second_half"]
    print(f"\n== soak [{summary['intake']}] {summary['sending_seconds']:.0f} s sending, {summary['studies']} studies, "
          f"{summary['instances_acknowledged']} instances acknowledged ({summary['files_per_second']} files/s), "
          f"PACS down {summary['pacs_down']['seconds']} s")

    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    for name, period in lat.items():
        print(f"  latency {name:17s} n={period['n']:5d} p50={fmt(period['p50'])} p95={fmt(period['p95'])} "
              f"max={fmt(period['max'])} s")
    for key, r in res.items():
        if r.get("measured"):
            print(f"  {key:11s} 2nd half: first quarter {r['first_quarter_median']}, last quarter "
                  f"{r['last_quarter_median']} ({100 * r['growth']:+.1f} %), fit {r['fit_per_hour']}/h "
                  f"({100 * r.get('trend', 0):+.1f} % over the half), max {r['max']}")
    print(f"  backlog at return {summary['pacs_down']['backlog_at_return']}, drained after "
          f"{summary['pacs_down']['drained_after_s']} s; spool max {summary['spool_max_mb']} MB")
    print(f"  {'goal':42s} result")
    for goal, verdict in summary["goals"].items():
        print(f"  {goal:42s} {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seconds", type=float, default=None, help="sending time in seconds (overrides --minutes)")
    parser.add_argument("--intake", choices=["listener", "orthanc", "both"], default="listener")
    parser.add_argument("--rate", default="auto", help="studies per minute, or auto (from --files-per-second)")
    parser.add_argument("--files-per-second", type=float, default=40.0, help="the mean instance rate for --rate auto")
    parser.add_argument("--scale", type=float, default=1.0, help="scales the CT/MR slice counts (0.1: small studies)")
    parser.add_argument("--associations", type=int, default=3, help="storescu associations at once")
    parser.add_argument("--idle", type=float, default=2.0, help="grouping timeout (s)")
    parser.add_argument("--pacs-down", type=float, default=None, help="seconds the PACS is down (default: 10 %% of the run)")
    parser.add_argument("--pacs-down-at", type=float, default=0.25, help="when, as a fraction of the sending time")
    parser.add_argument("--results-minutes", type=float, default=None, help="retention.results_days, in minutes")
    parser.add_argument("--retention-interval", type=float, default=None)
    parser.add_argument("--max-spool-mb", type=float, default=3000)
    parser.add_argument("--retry-max", type=float, default=5, help="retry.max_seconds (backoff cap)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sample-seconds", type=float, default=5)
    parser.add_argument("--drain-timeout", type=float, default=300)
    parser.add_argument("--corrupt-share", type=float, default=MIX["corrupt"], help="share of corrupt objects")
    parser.add_argument("--resend-share", type=float, default=0.03, help="studies partly re-sent later")
    parser.add_argument("--grow-share", type=float, default=0.04, help="CT/MR/US studies that grow later")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "soak")
    parser.add_argument("--progress", action="store_true", help="a progress bar even without a terminal")
    parser.add_argument("--keep-log", action="store_true", help="copy serve.log to --out")
    args = parser.parse_args()
    duration = args.seconds if args.seconds else args.minutes * 60
    if args.pacs_down is None:
        args.pacs_down = max(10.0, min(300.0, 0.1 * duration))
    if args.results_minutes is None:
        args.results_minutes = max(1.0, duration / 60 / 6)
    if args.retention_interval is None:
        args.retention_interval = max(5.0, min(30.0, duration / 60))
    from onevlm.runtime import configure_runtime

    configure_runtime()
    intakes = ["listener", "orthanc"] if args.intake == "both" else [args.intake]
    summaries = []
    for intake in intakes:
        out = args.out / intake if len(intakes) > 1 else args.out
        with tempfile.TemporaryDirectory(prefix=f"soak-{intake}-") as tmp:
            summary = Soak(args, intake, out, Path(tmp)).run()
        print_table(summary)
        print(f"  written: {out}/soak.png, soak.csv, studies.csv, summary.json")
        summaries.append(summary)
    return 0 if all(v != "FAIL" for s in summaries for v in s["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
