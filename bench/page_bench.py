"""The operator's page before and after Starlette + uvicorn + Jinja2, side by side on one 500-study journal.

Builds a spool as the service leaves it: ``--studies`` studies (copies of the repository's
``dicom_samples`` with new UIDs), each stored, journaled and processed by the service's default
router (header evidence + MiniLM), results written. Then serves that one spool twice with
``onevlm dashboard``'s code, each in its own process:

- ``before``: the package as of ``--before`` (default: the last commit on ``http.server`` with
  f-string pages), extracted with ``git archive``;
- ``after``: this working tree.

Requests alternate between the two, page by page (overview, study list, a study's decision page,
review queue, calibration health, ``/status``), ``--rounds`` times each, on a fresh connection each
(as a browser opening a page), then ``--clients`` concurrent clients for the throughput. Medians,
p95 and the after/before ratios are printed and written as JSON. Research use only.

    .venv/bin/python bench/page_bench.py --studies 500 --rounds 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "95a149c"
SAMPLES = ("ct_head_routine_brain.dcm", "mr_small_no_bodypart.dcm", "mr_brain_pilot.dcm", "cr_chest_j2k.dcm",
           "us_echocardiogram.dcm", "ct_pancreas_j2k.dcm", "mr_abdomen_liver.dcm")

# Imports onevlm from the tree named by ONEVLM_TREE (the editable install's finder is dropped).
TREE = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    tree = os.environ["ONEVLM_TREE"]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ and "editable" not in repr(f)]
    sys.path.insert(0, tree)
    import onevlm
    assert onevlm.__file__.startswith(tree), onevlm.__file__
""")
# Builds the spool with that tree's service code (the older release cannot read a newer journal; the newer
# one migrates the older, as the service does on start).
BUILD = TREE + textwrap.dedent("""
    sys.path.insert(0, sys.argv[3])
    import page_bench
    page_bench.build_spool(Path(sys.argv[1]), int(sys.argv[2]))
""")
# Serves one spool with that tree and prints the port.
SERVER = TREE + textwrap.dedent("""
    from onevlm.net.config import load_config
    from onevlm.dashboard.standalone import open_dashboard
    server, journal = open_dashboard(load_config(sys.argv[1]), 0)
    if hasattr(server, "start"):
        server.start(); port = server.port
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start(); port = server.server_address[1]
    print(port, flush=True)
    sys.stdin.read()
""")


def build_spool(root: Path, studies: int) -> tuple[Path, list[str]]:
    """A processed spool of ``studies`` studies; returns the config file and the group keys."""
    import pydicom
    from pydicom.uid import generate_uid
    from tqdm import tqdm

    from onevlm.net.config import parse_config
    from onevlm.net.journal import Journal
    from onevlm.net.processor import GroupProcessor
    from onevlm.net.service import build_router
    from onevlm.net.spool import Spool

    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "service.yaml"
    config_file.write_text(f"spool_dir: {root / 'spool'}\n")
    config = parse_config({"spool_dir": str(root / "spool")})
    spool, journal = Spool(config.spool_dir), Journal(config.journal_path)
    router, cards = build_router(config)
    processor = GroupProcessor(router, cards, spool, journal, ())
    sources = [pydicom.dcmread(REPO / "dicom_samples" / name) for name in SAMPLES]
    keys = []
    for n in tqdm(range(studies), desc="processing studies", unit="study"):
        dataset = sources[n % len(sources)].copy()
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        from io import BytesIO

        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        stored = spool.store(buffer.getvalue())
        journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path, stored.sop_class_uid, "BENCH")
        journal.set_group(stored.group_key, "queued")
        processor.process(stored.group_key)
        keys.append(stored.group_key)
    journal.close()
    (root / "keys.json").write_text(json.dumps(keys))
    return config_file, keys


class Served:
    """One tree's page over the spool, in its own process."""

    def __init__(self, name: str, tree: Path, config_file: Path) -> None:
        self.name = name
        env = {**os.environ, "ONEVLM_TREE": str(tree), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(config_file)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            raise SystemExit(f"{name}: the page did not start")
        self.port = int(line)

    def get(self, path: str) -> float:
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        if response.status != 200 or not body:
            raise SystemExit(f"{self.name}: GET {path} answered {response.status}")
        return time.perf_counter() - started

    def close(self) -> None:
        self.process.stdin.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare with")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="onevlm-page-bench-") as tmp:
        root = Path(tmp)
        old_tree = root / "before"
        old_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "onevlm", "model_cards"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        # one spool of processed studies, written by the older release; a copy migrated by this one
        env = {**os.environ, "ONEVLM_TREE": str(old_tree), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", BUILD, str(root / "before-site"), str(args.studies),
                        str(Path(__file__).parent)], env=env, check=True, cwd=old_tree)
        shutil.copytree(root / "before-site", root / "after-site")
        for name in ("before-site", "after-site"):
            (root / name / "service.yaml").write_text(f"spool_dir: {root / name / 'spool'}\n")
        from onevlm.net.journal import Journal

        Journal(root / "after-site" / "spool" / "journal.sqlite").close()  # migrated as the service does
        keys = json.loads((root / "before-site" / "keys.json").read_text())
        servers = [Served("before", old_tree, root / "before-site" / "service.yaml"),
                   Served("after", REPO, root / "after-site" / "service.yaml")]
        paths = {"overview": "/", "studies": "/studies", "studies-1000": "/studies?limit=1000",
                 "decision": f"/studies/{keys[len(keys) // 2]}", "review": "/review", "calibration": "/calibration",
                 "status": "/status"}
        figures: dict = {"studies": args.studies, "rounds": args.rounds, "before": args.before, "pages": {}}
        try:
            for server in servers:  # warm-up: index built, charts cached, templates compiled
                for path in paths.values():
                    server.get(path)
            for page, path in paths.items():
                times = {s.name: [] for s in servers}
                for _ in range(args.rounds):
                    for server in servers:
                        times[server.name].append(server.get(path))
                figures["pages"][page] = {name: {"median_ms": 1000 * statistics.median(t),
                                                 "p95_ms": 1000 * percentile(t, 0.95)} for name, t in times.items()}
            throughput = {}
            for server in servers * 2:  # alternate twice, keep each one's better run
                requests = [p for p in ("/", "/studies", "/review", "/status") for _ in range(args.rounds)]
                started = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(server.get, requests))
                rate = len(requests) / (time.perf_counter() - started)
                throughput[server.name] = max(rate, throughput.get(server.name, 0.0))
            figures["throughput_per_s"] = throughput
        finally:
            for server in servers:
                server.close()

    print(f"{args.studies} studies; {args.rounds} requests per page each; fresh connection per request")
    print(f"{'page':14} {'before ms (p50/p95)':>22} {'after ms (p50/p95)':>22} {'after/before p50':>17}")
    for page, result in figures["pages"].items():
        b, a = result["before"], result["after"]
        print(f"{page:14} {b['median_ms']:>10.1f} / {b['p95_ms']:<9.1f} {a['median_ms']:>10.1f} / "
              f"{a['p95_ms']:<9.1f} {a['median_ms'] / b['median_ms']:>16.2f}x")
    t = figures["throughput_per_s"]
    print(f"{args.clients} concurrent clients: before {t['before']:.1f} req/s, after {t['after']:.1f} req/s "
          f"({t['after'] / t['before']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
