"""End-to-end latency: a study received by the onevlm listener → its routing SR stored in Orthanc.

The embedded router on CPU. Each round sends one study (a CT series of a few slices, fresh UIDs)
with ``onevlm``'s SCU, then polls Orthanc's REST API until the SR of that study is there. The
latency is counted from the last acknowledged instance, minus the grouping timeout (the time
the service waits to be sure the study is complete); p50 and p90 are printed.

    .venv/bin/python bench/latency_bench.py --studies 10 --idle 1.0

Needs Debian's orthanc (the PACS). Research use only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from ohif_support import Orthanc, free_port  # noqa: E402
from onevlm.net.config import parse_config  # noqa: E402
from onevlm.net.sender import send_files  # noqa: E402
from onevlm.net.service import Service  # noqa: E402
from onevlm.runtime import configure_runtime  # noqa: E402


class PacsOrthanc(Orthanc):
    """Orthanc accepting C-STORE from anyone (loopback only)."""

    def config(self) -> dict:
        config = super().config()
        config.update(DicomAet="PACS", DicomAlwaysAllowStore=True, DicomCheckCalledAet=False)
        return config


def make_study(folder: Path, slices: int) -> tuple[str, list[Path]]:
    """A CT study of ``slices`` instances (a real CT slice, fresh UIDs)."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for i in range(slices):
        source.StudyInstanceUID, source.SeriesInstanceUID = study, series
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        source.InstanceNumber = i + 1
        path = folder / f"{i}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def sr_in_orthanc(pacs: Orthanc, study_uid: str) -> bool:
    found = pacs.post_json("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
    return bool(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--idle", type=float, default=1.0, help="grouping timeout (s)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    configure_runtime()
    latencies = []
    with tempfile.TemporaryDirectory() as tmp, PacsOrthanc(Path(tmp) / "orthanc") as pacs:
        config = parse_config({
            "spool_dir": str(Path(tmp) / "spool"),
            "listener": {"port": free_port()},
            "grouping": {"idle_seconds": args.idle},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
        })
        service = Service(config)
        service.start()
        try:
            for n in range(args.studies + 1):  # the first round warms up (caches, first association)
                study, files = make_study(Path(tmp) / f"study{n}", args.slices)
                results = send_files(files, "127.0.0.1", service.listener.port, "ONEVLM", "SCANNER")
                acked = time.perf_counter()
                if not all(r.ok for r in results):
                    raise RuntimeError("the listener did not acknowledge every instance")
                deadline = acked + 60
                while not sr_in_orthanc(pacs, study):
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"no SR for study {study} in Orthanc after 60 s")
                    time.sleep(0.02)
                if n:
                    latencies.append(time.perf_counter() - acked - args.idle)
        finally:
            service.stop()
    latencies.sort()
    p50 = statistics.median(latencies)
    p90 = latencies[min(len(latencies) - 1, int(round(0.9 * (len(latencies) - 1))))]
    print(f"{args.studies} studies of {args.slices} CT slices, grouping timeout {args.idle} s, embedded router, CPU")
    print(f"  received -> SR in Orthanc, after the grouping timeout: p50 {p50:.2f} s, p90 {p90:.2f} s, "
          f"max {latencies[-1]:.2f} s  (goal: p50 <= 2 s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"p50": p50, "p90": p90, "max": latencies[-1], "n": len(latencies)}) + "\n")


if __name__ == "__main__":
    main()
