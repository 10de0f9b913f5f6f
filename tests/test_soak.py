"""The soak bench (``bench/soak_bench.py``) run very short: a real ``onevlm serve`` (its own listener) with
retention on, a real Orthanc as the PACS stopped for a few seconds mid-run, dcmtk storescu sending a mixed,
small workload with duplicates, re-sends, growing studies and corrupt objects.

Only the correctness goals are asserted (nothing acknowledged lost, one current result per result series and
one per image series, the backlog drained after the PACS returned, the service alive) and that the resource
figures were measured; growth over 30 s means nothing. Both intakes: onevlm's own listener, and Orthanc
receiving the C-STOREs with onevlm following its changes (headers read as instances arrive). Research use only.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dicom_peers import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("intake", ["listener", "orthanc"])
def test_a_short_soak_loses_nothing_and_drains_after_the_pacs_returns(tmp_path, intake):
    out = tmp_path / "soak"
    command = [sys.executable, str(REPO / "bench" / "soak_bench.py"), "--intake", intake, "--seconds", "30",
               "--scale", "0.05", "--rate", "40", "--pacs-down", "8", "--pacs-down-at", "0.3",
               "--sample-seconds", "1", "--drain-timeout", "60", "--results-minutes", "0.5",
               "--retention-interval", "5", "--corrupt-share", "0.15", "--resend-share", "0.2", "--grow-share", "0.3",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert (out / "summary.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    goals = summary["goals"]
    problems = json.dumps(summary["problems"], indent=1)
    assert goals["nothing acknowledged lost"] == "PASS", problems
    assert goals["one current result per study"] == "PASS", problems
    assert goals["backlog drained <= 60 s after return"] == "PASS", summary["pacs_down"]
    assert goals["service alive"] == "PASS"
    assert "PASS" in done.stdout and "nothing acknowledged lost" in done.stdout  # the table was printed

    assert summary["studies_acknowledged"] >= 10 and summary["instances_acknowledged"] >= 30
    assert summary["problems"]["lost_count"] == 0 and summary["problems"]["missing_result_count"] == 0
    assert summary["service_status_end"]["export_pending"] == 0 and summary["service_status_end"]["failed"] == 0
    assert summary["pacs_down"]["seconds"] >= 8 and summary["pacs_down"]["drained_after_s"] is not None
    assert summary["latency"]["up"]["n"] > 0
    # every corrupt object was either refused (an expected refusal) or stored and then has its result
    corrupt = summary["corrupt"]
    assert corrupt["refused"] + corrupt["accepted"] == corrupt["sent"]
    assert summary["refused_not_corrupt"] == 0
    for key in ("rss_mb", "fds", "threads", "spool_mb", "journal_mb"):  # measured, not judged on 30 s
        assert summary["resources_second_half"][key]["measured"], key
    for name in ("soak.png", "soak.csv", "studies.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
