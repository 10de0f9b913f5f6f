"""Orthanc intake benchmark: ``intake.fetch: all`` vs ``needed`` side by side, one CT study of many slices.

A CT study (copies of pydicom-data's 512×512 CT ``693_UNCR.dcm``, ≈0.5 MB each, one series, new
UIDs, Instance Numbers and slice positions) is sent by four dcmtk storescu associations
(TCP_NODELAY=1) to a fresh Orthanc with ``SyncStorageArea`` (durable acknowledgement), StableAge
1 s; onevlm's intake follows Orthanc's changes feed (poll 0.1 s) into a fresh spool and journal.
Measured per run:

- ``ack``: Orthanc's acknowledgement rate, files/s (send time of the four associations), with the
  intake running as configured (``needed`` reads every instance's header as it arrives, which costs
  Orthanc some of the CPU it acknowledges with; ``all`` does nothing until the study is stable);
- ``copied_lag``: seconds from the last acknowledgement until every instance is in onevlm's spool
  (a header-only copy or whole), and ``follow`` = instances / (send time + ``copied_lag``), files/s:
  the rate at which the intake takes the study in, to compare with ``ack``;
- ``stable_to_journal``: seconds from Orthanc's StableStudy change (seen by polling its changes
  feed every 20 ms) to every instance in onevlm's journal (the goal: within 2 s);
- ``ack_to_journal``: seconds from the last acknowledgement to every instance in the journal
  (StableAge included); spool bytes and instances stored whole.

Modes alternate; medians are printed as a table and written as JSON. Research use only.

    .venv/bin/python bench/orthanc_intake_bench.py --instances 2000 --repeat 2 --json /tmp/intake.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from ingest_bench import send  # noqa: E402
from onevlm.net.config import OrthancSource  # noqa: E402
from onevlm.net.journal import Journal  # noqa: E402
from onevlm.net.orthanc_intake import OrthancIntake  # noqa: E402
from onevlm.net.spool import Spool, folder_bytes  # noqa: E402

MODES = ("all", "needed")


def make_ct_study(folder: Path, count: int) -> list[Path]:
    """``count`` slices of one CT series: a real 0.5 MB CT with new UIDs, Instance Numbers and positions."""
    source = get_testdata_file("693_UNCR.dcm", download=False)
    if source is None:
        raise SystemExit("pydicom-data is needed (pip install pydicom-data)")
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-125.0, -125.0, round(-500.0 + 0.5 * i, 2)]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        path = folder / f"ct_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def run_once(root: Path, files: list[Path], mode: str) -> dict:
    """One fresh Orthanc + spool: send, then time the intake until the journal holds every instance."""
    from ohif_support import Orthanc

    class Receiver(Orthanc):
        def config(self) -> dict:
            return {**super().config(), "DicomAet": "RECEIVER", "DicomAlwaysAllowStore": True,
                    "DicomCheckCalledAet": False, "SyncStorageArea": True, "DicomThreadsCount": 8,
                    "StableAge": 1}

    shutil.rmtree(root, ignore_errors=True)
    os.environ["TCP_NODELAY"] = "1"  # Orthanc's DICOM server (dcmtk) reads it: see DESIGN.md
    orthanc = Receiver(root / "orthanc").start()
    spool = Spool(root / "spool")
    journal = Journal(root / "spool" / "journal.sqlite")
    stop = threading.Event()
    intake = OrthancIntake(OrthancSource(orthanc.url, poll_seconds=0.1, fetch=mode), spool, journal)
    thread = threading.Thread(target=intake.run, args=(stop,), daemon=True)
    thread.start()
    try:
        seconds = send(files, orthanc.dicom_port, 4)
        acked = time.perf_counter()
        since, stable, copied = 0, None, None
        while stable is None or journal.status()["received"] < len(files):
            if copied is None and intake.pending_instances + journal.status()["received"] >= len(files):
                copied = time.perf_counter()
            if stable is None:
                page = orthanc.get_json(f"/changes?since={since}&limit=1000")
                if any(c["ChangeType"] == "StableStudy" for c in page["Changes"]):
                    stable = time.perf_counter()
                since = page["Last"]
            if time.perf_counter() - acked > 600:
                raise RuntimeError(f"{mode}: stable {stable is not None}, the journal holds "
                                   f"{journal.status()['received']} of {len(files)}")
            time.sleep(0.02)
        done = time.perf_counter()
        copied = done if copied is None else copied
        whole = sum(1 for _, p in spool.scan() if p.stat().st_size > 64 * 1024)
        return {"ack_files_per_s": len(files) / seconds, "copied_lag_s": copied - acked,
                "follow_files_per_s": len(files) / (seconds + copied - acked),
                "stable_to_journal_s": done - stable, "ack_to_journal_s": done - acked,
                "spool_bytes": folder_bytes(spool.incoming), "whole_instances": whole}
    finally:
        stop.set()
        thread.join(60)
        journal.close()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000, help="slices of the CT study (default 2000)")
    parser.add_argument("--repeat", type=int, default=1, help="alternating runs of each mode (default 1)")
    parser.add_argument("--json", help="write the medians here")
    args = parser.parse_args()
    from dcmtk_tools import find_dcmtk
    from onevlm.runtime import configure_runtime

    configure_runtime()  # as `onevlm serve` runs: lenient header reading, quiet third-party logs
    if find_dcmtk("storescu") is None:
        raise SystemExit("dcmtk (storescu) is needed: apt-get install dcmtk")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_ct_study(Path(tmp) / "files", args.instances)
        for _ in range(args.repeat):
            for mode in MODES:
                runs[mode].append(run_once(Path(tmp) / mode, files, mode))
    result: dict = {"instances": args.instances, "repeat": args.repeat, "associations": 4}
    print(f"{args.instances}-slice CT study (0.53 MB files, one series), 4 storescu associations, Orthanc "
          f"SyncStorageArea + StableAge 1 s, intake poll 0.1 s, {args.repeat} alternating run(s), medians")
    print(f"  {'fetch':8s} {'ack files/s':>12s} {'copied lag s':>13s} {'follow files/s':>15s} "
          f"{'stable→journal s':>17s} {'ack→journal s':>14s} {'whole':>6s} {'spool MB':>9s}")
    for mode in MODES:
        median = {key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]}
        result[mode] = {key: round(value, 2) for key, value in median.items()}
        print(f"  {mode:8s} {median['ack_files_per_s']:12.1f} {median['copied_lag_s']:13.2f} "
              f"{median['follow_files_per_s']:15.1f} {median['stable_to_journal_s']:17.2f} "
              f"{median['ack_to_journal_s']:14.2f} {median['whole_instances']:6.0f} {median['spool_bytes'] / 1e6:9.1f}")
    print("  (copied lag: last acknowledgement → every instance in the spool; follow = instances / (send + lag))")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
