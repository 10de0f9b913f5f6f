"""Retention's header-only copies: re-encoding the header with pydicom vs cutting the file's own bytes, side by side.

Builds one spool per way with the same finished groups (CT slices from a real sample, decompressed
to 512x512 16-bit: ≈ 0.5 MB each), then times one retention pass (reduce: every instance but the
routed one becomes a header-only copy, fsync'd and renamed over it) and the expiry after it, with
:class:`onevlm.net.retention.Retention` as the service runs it. The "re-encode" way is the release
before (``header_only_copy`` + ``save_as``), put in place of :func:`header_only_bytes` for its run.

    .venv/bin/python bench/retention_bench.py --groups 4 --instances 100 --repeat 2

Research use only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pydicom  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from onevlm.net import retention as retention_module  # noqa: E402
from onevlm.net.config import RetentionConfig  # noqa: E402
from onevlm.net.journal import Journal  # noqa: E402
from onevlm.net.retention import DAY, Retention  # noqa: E402
from onevlm.net.spool import Spool  # noqa: E402
from onevlm.reports.routing_metadata import DECISIONS_FILE, DETAIL_FILE, METADATA_FILE  # noqa: E402

SAMPLE = ROOT / "dicom_samples" / "ct_head_512_j2k.dcm"


def reencoded_copy(path: Path) -> bytes | None:
    """The release before: parse the header, delete the pixels, encode it again with pydicom."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if retention_module.is_header_only(ds):
        return None
    buffer = DicomBytesIO()
    retention_module.header_only_copy(ds).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build(root: Path, template: pydicom.Dataset, groups: int, instances: int) -> tuple[Spool, Journal]:
    spool = Spool(root / "spool")
    journal = Journal(root / "spool" / "journal.sqlite")
    for _ in range(groups):
        study, series = generate_uid(), generate_uid()
        sops = []
        for n in range(instances):
            ds = template.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = n + 1
            buffer = DicomBytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            stored = spool.store(buffer.getvalue())
            journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path, stored.sop_class_uid, "BENCH")
            sops.append(stored.sop_instance_uid)
        results = spool.result_folder(study)
        results.mkdir(parents=True)
        (results / DETAIL_FILE).write_text(json.dumps({"entries": [
            {"study_instance_uid": study, "series_instance_uid": series, "routed_sop_instance_uid": sops[instances // 2],
             "outcome": "review"}]}))
        (results / DECISIONS_FILE).write_text("")
        (results / METADATA_FILE).write_text(json.dumps({"outcome": "review"}))
        journal.set_group(study, "done")
    past = time.time() - 3600  # older than the clean-up's plan
    for path in (root / "spool").rglob("*.dcm"):
        os.utime(path, (past, past))
    return spool, journal


def run_way(way: str, template: pydicom.Dataset, groups: int, instances: int) -> dict:
    original = retention_module.header_only_bytes
    if way == "re-encode":
        retention_module.header_only_bytes = reencoded_copy
    try:
        with tempfile.TemporaryDirectory(prefix=f"retention-bench-{way}-") as tmp:
            spool, journal = build(Path(tmp), template, groups, instances)
            retention = Retention(RetentionConfig(), spool, journal)
            started = time.perf_counter()
            run = retention.run_once()
            reduce_s = time.perf_counter() - started
            started = time.perf_counter()
            expired = retention.run_once(now=time.time() + 31 * DAY)
            expire_s = time.perf_counter() - started
            journal.close()
    finally:
        retention_module.header_only_bytes = original
    files = run.removed_files
    return {"way": way, "files": files, "reduce_s": reduce_s, "files_per_s": files / reduce_s,
            "freed_mb": run.freed_bytes / 1e6, "expire_s": expire_s, "expired_groups": expired.expired}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--instances", type=int, default=100, help="instances per group")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    template = pydicom.dcmread(SAMPLE)
    template.decompress()
    template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rows = []
    for _ in range(args.repeat):  # interleaved: both ways see the same machine
        for way in ("re-encode", "cut"):
            rows.append(run_way(way, template, args.groups, args.instances))
    print(f"{args.groups} groups x {args.instances} CT instances ({SAMPLE.name} decompressed, "
          f"{len(template.PixelData) / 1e6:.2f} MB of pixels each), medians of {args.repeat}")
    print(f"{'way':10} {'files':>6} {'reduce s':>9} {'files/s':>8} {'freed MB':>9} {'expire s':>9}")
    summary = {}
    for way in ("re-encode", "cut"):
        mine = [r for r in rows if r["way"] == way]
        med = {k: statistics.median(r[k] for r in mine) for k in ("files", "reduce_s", "files_per_s", "freed_mb",
                                                                   "expire_s")}
        summary[way] = med
        print(f"{way:10} {med['files']:6.0f} {med['reduce_s']:9.2f} {med['files_per_s']:8.1f} {med['freed_mb']:9.1f} "
              f"{med['expire_s']:9.2f}")
    print(f"cut / re-encode: {summary['cut']['files_per_s'] / summary['re-encode']['files_per_s']:.2f}x the files/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
