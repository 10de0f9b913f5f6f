"""The whole loop on loopback: scanner → onevlm listener → router → SR → PACS.

Starts a PACS stand-in (a Storage SCP that keeps what it receives) and the onevlm service,
sends ``dicom_samples/`` by C-STORE as a scanner would, waits until every study is processed
and its routing SRs are in the PACS, prints a summary per study, and stops everything.
Research use only: nothing here is for clinical use.

    .venv/bin/python demo/pacs_loop.py [--samples dicom_samples] [--idle 1.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onevlm.runtime import configure_runtime  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=str(Path(__file__).resolve().parents[1] / "dicom_samples"))
    parser.add_argument("--idle", type=float, default=1.0, help="grouping timeout (s)")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_runtime()

    import pydicom

    from onevlm.net.config import ListenerConfig, parse_config
    from onevlm.net.journal import Journal
    from onevlm.net.listener import Listener
    from onevlm.net.sender import send_files
    from onevlm.net.service import Service
    from onevlm.net.spool import Spool
    from onevlm.reports.routing_metadata import DETAIL_FILE

    with tempfile.TemporaryDirectory(prefix="onevlm-demo-") as tmp:
        root = Path(tmp)
        pacs_spool, pacs_journal = Spool(root / "pacs"), Journal(root / "pacs" / "journal.sqlite")
        pacs = Listener(ListenerConfig(ae_title="PACS", port=free_port()), pacs_spool, pacs_journal)
        pacs.start()
        config = parse_config({
            "spool_dir": str(root / "onevlm"),
            "listener": {"ae_title": "ONEVLM", "port": free_port(), "allowed_calling_ae_titles": ["SCANNER"]},
            "grouping": {"idle_seconds": args.idle},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        })
        print("starting the onevlm service (loads the embedded router)...", flush=True)
        service = Service(config)
        service.start()
        try:
            files = sorted(p for p in Path(args.samples).iterdir() if p.suffix == ".dcm")
            started = time.time()
            results = send_files(files, "127.0.0.1", service.listener.port, "ONEVLM", "SCANNER")
            acked = sum(r.ok for r in results)
            print(f"scanner sent {len(files)} file(s); {acked} acknowledged by onevlm (stored durably first)")
            deadline = time.time() + args.timeout
            while time.time() < deadline:
                status = service.status()
                if status["received"] >= acked and status["queued"] == 0 and status["export_pending"] == 0:
                    break
                time.sleep(0.2)
            status = service.status()
            in_pacs = {path.stem for path in pacs_spool.incoming.glob("*/*.dcm")}
            print(f"done in {time.time() - started:.1f} s: {status['processed']} studies processed, "
                  f"{status['exported']} result object(s) exported, {len(in_pacs)} in the PACS, "
                  f"{status['failed']} failed  [research use only, not for clinical use]")
            for folder in sorted(service.spool.results.iterdir()):
                detail = json.loads((folder / DETAIL_FILE).read_text())  # per series; metadata.json is flat
                print(f"study {folder.name}")
                for e in detail["entries"]:
                    if e["skipped"]:
                        line = f"skipped ({e['skipped']})"
                    elif e["error"]:
                        line = f"ERROR: {e['error']}"
                    else:
                        if e["outcome"] == "review":
                            target = f"REVIEW ({e['reasons'][0] if e['reasons'] else 'see the decision log'})"
                        elif e["cards"]:
                            kind = "set " if e["outcome"] == "routed-set" else ""
                            calibrated = "calibrated" if e["calibrated"] else "uncalibrated"
                            target = f"{kind}{', '.join(e['cards'])} (route confidence {e['confidence']:.2f}, {calibrated})"
                        else:
                            target = f"no card ({e['stop_reason']})"
                        sr_uid = None
                        if e["sr_file"]:
                            sr_uid = str(pydicom.dcmread(folder / e["sr_file"], stop_before_pixels=True).SOPInstanceUID)
                        received = "SR in PACS" if sr_uid in in_pacs else "SR NOT in PACS"
                        shown = "" if e["outcome"] == "review" else f"{e['modality']} -> "
                        line = f"{shown}{target}; {received}"
                    print(f"  {e['dicom_modality']:6s} {str(e['input'])[:32]:32s} {line}")
            return 0 if status["failed"] == 0 and status["export_pending"] == 0 else 1
        finally:
            service.stop()
            pacs.stop()
            pacs_journal.close()


if __name__ == "__main__":
    sys.exit(main())
