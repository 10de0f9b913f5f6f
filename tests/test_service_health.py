"""``/healthz``, ``/readyz`` and ``/metrics`` of the running service (real listener, real storescu, loopback HTTP)."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from dicom_peers import free_port, make_copies, pydicom_file, running_service, service_config, storescu, wait_until

TOKEN_ENV, TOKEN = "ONEVLM_TEST_METRICS_TOKEN", "metrics-t0ken"


def _get(port: int, path: str, token: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_probes_of_a_working_service(tmp_path):
    spool = tmp_path / "spool"
    port = free_port()
    (study, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=3).items()
    down = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}  # nothing listens there
    config = service_config(spool, status_port=port, destinations=[down], retry={"base_seconds": 30})
    with running_service(config) as service:
        assert _get(port, "/healthz") == (200, "application/json", json.dumps({"ok": True, "problems": []}))
        assert _get(port, "/readyz")[0] == 200
        assert storescu(files, service.listener.port).returncode == 0
        wait_until(lambda: service.status()["processed"] == 1 and service.status()["export_failures"] >= 1, 60, 0.2,
                   "the study processed, a first export attempt failed")
        status, content_type, text = _get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    samples = _samples(text)
    assert samples[("onevlm_instances_total", (("state", "received"),))] == 3
    assert samples[("onevlm_instances_total", (("state", "refused"),))] == 0
    assert samples[("onevlm_groups", (("status", "done"),))] == 1
    assert samples[("onevlm_exports", (("destination", "pacs"), ("status", "pending")))] == 1
    assert samples[("onevlm_exports", (("destination", "pacs"), ("status", "sent")))] == 0
    assert samples[("onevlm_export_failures_total", ())] >= 1
    assert sum(v for (name, _), v in samples.items() if name == "onevlm_series_outcomes") == 1
    assert samples[("onevlm_group_processing_seconds_count", ())] == 1
    assert samples[("onevlm_vlm_calls", ())] == 0  # the embedded router reads no pixels
    assert samples[("onevlm_spool_bytes", ())] > sum(f.stat().st_size for f in files)
    assert 0 < samples[("onevlm_spool_disk_free_bytes", ())] <= samples[("onevlm_spool_disk_total_bytes", ())]
    assert samples[("onevlm_route_confidence_gcount", ())] <= 1
    # the documented alert rules and probes name what the service exposes
    rules = yaml.safe_load((REPO / "deploy" / "service" / "onevlm-alerts.yml").read_text())
    exposed = {name for name, _ in samples}
    for rule in rules["groups"][0]["rules"]:
        for name in re.findall(r"onevlm_\w+", rule["expr"]):
            assert name in exposed, (rule["alert"], name)
    probes = yaml.safe_load((REPO / "deploy" / "service" / "kubernetes-probes.yaml").read_text())
    assert {probes[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")} == {"/healthz", "/readyz"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path):
    """The documented unit passes systemd-analyze verify (its paths pointed at this checkout's)."""
    unit = (REPO / "deploy" / "service" / "onevlm.service").read_text()
    assert "Restart=on-failure" in unit and "onevlm serve --config" in unit
    executable = Path(sys.executable).with_name("onevlm")
    assert executable.is_file()
    (tmp_path / "onevlm.service").write_text(unit.replace("/opt/onevlm/.venv/bin/onevlm", str(executable)))
    run = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "onevlm.service")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "onevlm.service" not in run.stderr, run.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_probes_say_why_a_service_is_not_alive_or_not_ready(tmp_path):
    spool = tmp_path / "spool"
    port = free_port()
    # every disk is "nearly full" below 99.99 % free: ready must fail, alive must not
    with running_service(service_config(spool, status_port=port, disk={"min_free_percent": 99.99})) as service:
        status, _, body = _get(port, "/readyz")
        assert status == 503 and "below disk.min_free_percent 99.99 %" in json.loads(body)["problems"][0]
        assert _get(port, "/healthz")[0] == 200

        class Crash(BaseException):
            """Not an Exception: the assembler's loop does not catch it, and its thread ends."""

        def crash(*_args, **_kwargs):
            raise Crash()

        service.journal.due_groups = crash
        assembler = next(t for t in service._threads if t.name == "onevlm-assembler")
        assembler.join(timeout=10)
        assert not assembler.is_alive()
        status, _, body = _get(port, "/healthz")
        assert status == 503 and json.loads(body)["problems"] == ["thread onevlm-assembler has stopped"]

        def disk_error():
            raise sqlite3.OperationalError("disk I/O error")

        service.journal.heartbeat = disk_error
        problems = json.loads(_get(port, "/healthz")[2])["problems"]
        assert "the journal cannot be written: OperationalError: disk I/O error" in problems
        sent = storescu(make_copies(pydicom_file("CT_small.dcm"), tmp_path / "d", 1, 1).popitem()[1],
                        service.listener.port)
        # the listener still answers; below the disk's free-space bounds it stores nothing new ("out of resources")
        assert "Received Store Response (Refused: OutOfResources)" in sent.stdout + sent.stderr


def test_metrics_follow_the_pages_token_rule_and_probes_need_none(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    port = free_port()
    config = service_config(tmp_path / "spool", status_port=port, dashboard={"host": "0.0.0.0", "token_env": TOKEN_ENV,
                                                                                  "insecure_http": True})
    with running_service(config):
        assert _get(port, "/metrics")[0] == 401
        assert _get(port, "/metrics", "wrong")[0] == 401
        assert _get(port, "/metrics", TOKEN)[0] == 200
        assert _get(port, "/healthz")[0] == 200 and _get(port, "/readyz")[0] == 200


@pytest.mark.parametrize("disk, message", [
    ({"min_free_percent": 100}, r"disk.min_free_percent: 100 must be a number in \[0, 100\)"),
    ({"min_free_bytes": -1}, r"disk.min_free_bytes: -1 must be a whole number of bytes >= 0"),
    ({"min_free_bytes": "2G"}, r"disk.min_free_bytes: '2G' must be a whole number"),
    ({"free": 1}, r"disk.*free"),
])
def test_disk_limits_are_validated(tmp_path, disk, message):
    from onevlm.net.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(service_config(tmp_path / "spool", disk=disk))

