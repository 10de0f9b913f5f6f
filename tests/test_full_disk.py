"""A full disk loses nothing, on a real small file system.

Below the free-space bounds (``disk.min_free_bytes`` / ``disk.min_free_percent``) the listener answers
C-STORE 0xA700 (associations and C-ECHO still answered), ``/status`` and ``/readyz`` say why, what was
acknowledged stays, complete studies wait (no half-written results), and everything resumes by itself
when space returns; a write that hits ENOSPC leaves no partial file and no journal row.

Nothing here mocks the free-space call: each test gets a real tmpfs of a few MiB, mounted in a private
mount namespace (``unshare -rm``, as root), and fills it with real files. The test process itself cannot
mount, so a scenario runs in a child process inside the namespace (the tmpfs goes with its last process),
or ``onevlm serve`` runs there and the test reaches its file system through ``/proc/PID/root``.
Research use only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SAMPLES = REPO / "dicom_samples"
if str(TESTS) not in sys.path:  # the scenarios import this module in a child process
    sys.path.insert(0, str(TESTS))

from dicom_peers import (  # noqa: E402
    ServeProcess,
    echoscu,
    free_port,
    listener_port,
    make_copies,
    pynetdicom_scu,
    service_config,
    spool_files,
    wait_until,
    write_service_config,
)

MiB = 1024 * 1024
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
#: A real MR image of 321 KB: a few of them take a visible part of a small disk.
IMAGE = SAMPLES / "mr_abdomen_liver.dcm"


# --------------------------------------------------------------------------- a real small disk


def in_small_disk(mount: Path, size: str, argv: list[str]) -> list[str]:
    """``argv`` run in a private mount namespace in which ``mount`` is a fresh tmpfs of ``size`` (e.g. ``16m``).

    ``unshare`` without ``--fork`` and ``exec``: the process started is the one that runs ``argv``.
    """
    return ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"', "sh",
            size, str(mount), *argv]


def _small_disks_unavailable() -> str | None:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "util-linux's unshare or nsenter is missing"
    with tempfile.TemporaryDirectory() as folder:
        try:
            probe = subprocess.run(in_small_disk(Path(folder), "1m", ["true"]), capture_output=True, text=True,
                                   timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare -rm cannot run: {exc}"
    if probe.returncode != 0:
        return f"unshare -rm + mount tmpfs fails here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def small_disks() -> None:
    """Skip (saying why) where a private tmpfs cannot be mounted; here and in CI it can."""
    reason = _small_disks_unavailable()
    if reason:
        pytest.skip(f"no real small file system for this test: {reason}")


def total_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_blocks * stats.f_frsize


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def fill(folder: Path, leave: int = 0, name: str = "filler.bin") -> Path:
    """Write a real file into ``folder`` until its file system has about ``leave`` bytes free (0: until ENOSPC)."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\xa5" * MiB
        while True:
            room = free_bytes(folder) - leave
            if leave and room < 4096:
                break
            size = min(len(block), room) if leave else len(block)
            try:
                os.write(fd, block[:max(size, 4096)])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if leave or len(block) == 4096:
                    break
                block = block[:4096]  # the last pages, one at a time
    finally:
        os.close(fd)
    return path


def run_scenario(tmp_path: Path, name: str, size: str = "16m", timeout: float = 120) -> str:
    """Run this module's function ``name(disk, work)`` in a child inside a namespace with a fresh tmpfs ``disk``.

    ``work`` (``tmp_path``) is on the ordinary disk. The child's assertions are the test's: a failure shows its
    traceback and log.
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    code = ("import pathlib, sys; sys.path.insert(0, sys.argv[3]); import test_full_disk as t; "
            f"t.{name}(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))")
    done = subprocess.run(in_small_disk(disk, size, [sys.executable, "-c", code, str(disk), str(tmp_path),
                                                     str(TESTS)]),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"scenario {name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


class _Logs(logging.Handler):
    """The ``onevlm`` log messages of a scenario."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._lock_ = threading.Lock()
        logging.getLogger("onevlm").addHandler(self)
        logging.getLogger("onevlm").setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_:
            self.messages.append(record.getMessage())

    def count(self, text: str) -> int:
        with self._lock_:
            return sum(text in message for message in self.messages)


def sop_uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# --------------------------------------------------------------------------- scenarios (run inside the namespace)


def scenario_spool_and_guard(disk: Path, work: Path) -> None:
    from onevlm.net.config import DiskConfig
    from onevlm.disk_full import is_disk_full
    from onevlm.net.disk_space import DiskGuard
    from onevlm.net.spool import Spool, SpoolError

    assert total_bytes(disk) == 16 * MiB  # a real 16 MiB file system, ours alone
    logs = _Logs()
    spool = Spool(disk / "spool")
    guard = DiskGuard(spool.root, DiskConfig(min_free_bytes=4 * MiB, min_free_percent=0), max_age_seconds=0,
                      hold_seconds=0.5)
    files = [p for paths in make_copies(IMAGE, work / "data", 1, 3).values() for p in paths]
    assert guard.problem() is None and guard.state().accepting
    first = spool.store(files[0].read_bytes())

    filler = fill(disk, leave=2 * MiB)
    reason = guard.problem()
    assert reason is not None and "below disk.min_free_bytes 4,194,304" in reason, reason
    assert guard.problem() == reason and not guard.state().accepting
    more = fill(disk, leave=1 * MiB, name="more.bin")
    assert guard.problem() != reason  # other figures, the same state: not logged again
    more.unlink()
    assert logs.count("event=intake_paused") == 1  # once per change of state, not per question

    # The disk fills between the check and the write: ENOSPC mid-write leaves nothing behind.
    rest = fill(disk, 0, "rest.bin")
    assert free_bytes(disk) < IMAGE.stat().st_size
    with pytest.raises(SpoolError) as raised:
        spool.store(files[1].read_bytes())
    assert is_disk_full(raised.value), raised.value
    assert list(spool.tmp.iterdir()) == [], "a partial file stayed in the spool's tmp folder"
    assert [p.name for p in spool.incoming.glob("*/*.dcm")] == [first.path.name]
    guard.note_full(raised.value, "storing an instance")
    assert "storing an instance failed, the spool's disk is full" in guard.problem()

    rest.unlink()
    filler.unlink()
    time.sleep(0.6)  # the hold after ENOSPC
    assert guard.problem() is None and guard.state().accepting
    assert logs.count("event=intake_resumed") == 1
    second = spool.store(files[1].read_bytes())
    assert second.path.read_bytes() == files[1].read_bytes()


def scenario_listener_enospc(disk: Path, work: Path) -> None:
    from onevlm.net.config import DiskConfig, parse_config
    from onevlm.net.disk_space import DiskGuard
    from onevlm.net.journal import Journal
    from onevlm.net.listener import Listener
    from onevlm.net.spool import Spool

    assert total_bytes(disk) == 16 * MiB
    logs = _Logs()
    config = parse_config(service_config(disk / "spool", port=free_port()))
    spool, journal = Spool(config.spool_dir), Journal(config.journal_path)  # the journal shares the small disk
    # No free-space bounds: only the failed write itself can refuse here (the check-then-write race).
    guard = DiskGuard(config.spool_dir, DiskConfig(min_free_bytes=0, min_free_percent=0), hold_seconds=1.0)
    listener = Listener(config.listener, spool, journal, disk_guard=guard)
    listener.start()
    try:
        files = [p for paths in make_copies(IMAGE, work / "data", 1, 3).values() for p in paths]
        uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files]
        assert pynetdicom_scu(listener.port, files[:1]) == [SUCCESS]

        filler = fill(disk, 0)
        assert free_bytes(disk) < IMAGE.stat().st_size
        # the first write fails with ENOSPC, the second is refused during the hold without writing
        assert pynetdicom_scu(listener.port, files[1:], echo=True) == [SUCCESS, OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        assert list(spool.tmp.iterdir()) == [], "a partial file stayed in the spool"
        assert {p.stem for p in spool.incoming.glob("*/*.dcm")} == {uids[0]}
        assert [journal.has_instance(u) for u in uids] == [True, False, False]
        assert logs.count("event=store_failed") == 1 and logs.count("event=intake_paused") == 1

        filler.unlink()
        wait_until(guard.accepting, 10, 0.1, "the listener to accept again")
        assert pynetdicom_scu(listener.port, files[1:]) == [SUCCESS, SUCCESS]
        assert all(journal.has_instance(u) for u in uids)
        assert {p.stem for p in spool.incoming.glob("*/*.dcm")} == set(uids)
        for path, uid in zip(files, uids):
            stored = next(spool.incoming.glob(f"*/{uid}.dcm"))
            assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(path).PixelData
    finally:
        listener.stop()
        journal.close()


def scenario_results_wait_for_space(disk: Path, work: Path) -> None:
    from onevlm.net.config import DiskConfig, parse_config
    from onevlm.net.disk_space import DiskGuard
    from onevlm.net.journal import Journal
    from onevlm.net.processor import GroupProcessor
    from onevlm.net.service import build_router
    from onevlm.net.spool import Spool

    assert total_bytes(disk) == 16 * MiB
    config = parse_config({"spool_dir": str(disk / "spool")})
    spool = Spool(config.spool_dir)
    journal = Journal(work / "journal.sqlite")  # off the small disk: only the results' writing meets ENOSPC here
    router, cards = build_router(config)
    (group,) = make_copies(SAMPLES / "ct_head_routine_brain.dcm", work / "data", 1, 1).values()
    stored = spool.store(group[0].read_bytes())
    journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path, stored.sop_class_uid, "TEST")
    key = stored.group_key

    # 1. the disk fills up for real while the group's results are written: the group stays pending
    no_bounds = DiskGuard(spool.root, DiskConfig(min_free_bytes=0, min_free_percent=0), hold_seconds=0)
    processor = GroupProcessor(router, cards, spool, journal, (), disk_guard=no_bounds)
    filler = fill(disk, 0)
    journal.set_group(key, "queued")
    processor.process(key)
    row = journal.group_row(key)
    assert row.status == "receiving", row
    assert "waiting for disk space" in row.error and "disk is full" in row.error, row.error
    assert list(spool.results.iterdir()) == [], "a half-written result stayed"
    status = journal.status()
    assert (status["processed"], status["failed"]) == (0, 0)
    assert journal.due_groups(0) == [key]  # pending: the assembler hands it out again

    # 2. below the free-space bounds the group is not even started
    bounded = DiskGuard(spool.root, DiskConfig(min_free_bytes=8 * MiB, min_free_percent=0))
    filler.unlink()
    filler = fill(disk, leave=4 * MiB)
    GroupProcessor(router, cards, spool, journal, (), disk_guard=bounded).process(key)
    row = journal.group_row(key)
    assert row.status == "receiving" and "below disk.min_free_bytes 8,388,608" in row.error, row
    assert list(spool.results.iterdir()) == []

    # 3. space returns: the same group is processed, its results whole
    filler.unlink()
    assert journal.due_groups(0) == [key]
    processor.process(key)
    row = journal.group_row(key)
    assert row.status == "done" and row.error is None, row
    final = spool.result_folder(key)
    assert sorted(p.name for p in spool.results.iterdir()) == [key]  # no staging folder left
    metadata = json.loads((final / "metadata.json").read_text())
    assert metadata["series"] == 1
    for sr in (final / "sr").glob("*.dcm"):
        assert pydicom.dcmread(sr).Modality == "SR"
    journal.close()


def scenario_orthanc_intake_waits(disk: Path, work: Path) -> None:
    import requests

    from onevlm.net.config import DiskConfig, parse_config
    from onevlm.net.disk_space import DiskGuard
    from onevlm.net.journal import Journal
    from onevlm.net.orthanc_intake import CURSOR, OrthancIntake
    from onevlm.net.spool import Spool

    assert total_bytes(disk) == 16 * MiB
    orthanc = json.loads((work / "orthanc.json").read_text())
    logs = _Logs()
    config = parse_config(service_config(disk / "spool", intake={"orthanc": orthanc["url"], "poll_seconds": 0.2}))
    spool, journal = Spool(config.spool_dir), Journal(config.journal_path)

    def held_by_orthanc() -> int:
        return int(requests.get(f"{orthanc['url']}/statistics", timeout=30).json()["CountInstances"])

    # 1. below the bounds: nothing is copied, the changes position stays, Orthanc keeps the instances
    bounded = DiskGuard(spool.root, DiskConfig(min_free_bytes=8 * MiB, min_free_percent=0), max_age_seconds=0)
    filler = fill(disk, leave=4 * MiB)
    assert OrthancIntake(config.intake, spool, journal, disk_guard=bounded).poll_once() == 0
    # (the changes before the StableStudy are passed: they copy nothing)
    assert journal.cursor(CURSOR) < orthanc["stable_seq"] and spool.scan() == [] and journal.status()["received"] == 0
    assert held_by_orthanc() == orthanc["instances"]
    assert logs.count("event=intake_paused") == 1

    # 2. no bounds, the disk really full: the copy fails (ENOSPC), nothing partial stays, the position stays
    unbounded = DiskGuard(spool.root, DiskConfig(min_free_bytes=0, min_free_percent=0), hold_seconds=0)
    filler.unlink()
    filler = fill(disk, 0)
    with pytest.raises(OSError):
        OrthancIntake(config.intake, spool, journal, disk_guard=unbounded).poll_once()
    assert journal.cursor(CURSOR) < orthanc["stable_seq"] and spool.scan() == [] and list(spool.tmp.iterdir()) == []

    # 3. space returns: the next poll copies the study, and only then the position moves
    filler.unlink()
    intake = OrthancIntake(config.intake, spool, journal, disk_guard=bounded)
    assert intake.poll_once() == orthanc["instances"]
    assert journal.cursor(CURSOR) >= orthanc["stable_seq"] and {p.stem for _, p in spool.scan()} == set(orthanc["sops"])
    assert all(journal.has_instance(sop) for sop in orthanc["sops"])
    assert logs.count("event=intake_resumed") == 1
    journal.close()


# --------------------------------------------------------------------------- the tests


def test_the_guard_and_the_spool_on_a_really_full_disk(tmp_path, small_disks):
    run_scenario(tmp_path, "scenario_spool_and_guard")


def test_enospc_mid_write_answers_a700_and_leaves_no_file_or_journal_row(tmp_path, small_disks):
    run_scenario(tmp_path, "scenario_listener_enospc")


@pytest.mark.slow
def test_a_result_that_cannot_be_written_stays_pending(tmp_path, small_disks):
    run_scenario(tmp_path, "scenario_results_wait_for_space")


@pytest.mark.slow
def test_the_orthanc_intake_stops_copying_and_resumes(tmp_path, small_disks):
    from dicom_peers import Pacs, storescu

    (_, files), = make_copies(IMAGE, tmp_path / "data", 1, 3).items()
    with Pacs(tmp_path / "pacs") as pacs:
        assert storescu(files, pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
        stable = wait_until(lambda: [c["Seq"] for c in pacs.get_json("/changes?limit=100")["Changes"]
                                     if c["ChangeType"] == "StableStudy"], 30, 0.2, "Orthanc's StableStudy")
        (tmp_path / "orthanc.json").write_text(json.dumps({"url": pacs.url, "instances": len(files),
                                                            "stable_seq": stable[0],
                                                            "sops": sorted(sop_uids(files))}))
        run_scenario(tmp_path, "scenario_orthanc_intake_waits")
        assert pacs.count_instances() == len(files)  # Orthanc kept them all along


class SmallDiskServe(ServeProcess):
    """``onevlm serve`` in its own mount namespace, in which ``mount`` is a fresh tmpfs of ``size``."""

    def __init__(self, config_path: Path, log_path: Path, mount: Path, size: str) -> None:
        super().__init__(config_path, log_path)
        self.mount = mount
        self.size = size

    def command(self) -> list[str]:
        return in_small_disk(self.mount, self.size, super().command())

    def journal_query(self, spool: Path, sql: str) -> list[list]:
        """Read the service's journal in its namespace (``nsenter``): SQLite resolves the /proc/PID/root link,
        so it cannot open the file from outside."""
        code = ("import json, sqlite3, sys; db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True, timeout=30); "
                "print(json.dumps(db.execute(sys.argv[2]).fetchall()))")
        done = subprocess.run(["nsenter", "-t", str(self.process.pid), "-U", "-m", "--preserve-credentials",
                               sys.executable, "-c", code, str(spool / "journal.sqlite"), sql],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def seen(self, path: Path) -> Path:
        """``path`` as the service sees it (inside its namespace), reached from outside through /proc."""
        return Path(f"/proc/{self.process.pid}/root") / path.relative_to("/")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _status(port: int) -> dict:
    code, body = _get(port, "/status")
    assert code == 200, body
    return json.loads(body)


def _accepting_metric(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    code, body = _get(port, "/metrics")
    assert code == 200, body
    return next(s.value for f in text_string_to_metric_families(body) for s in f.samples
                if s.name == "onevlm_intake_accepting")


@pytest.mark.slow
def test_a_full_disk_loses_nothing(tmp_path, small_disks):
    """The real service on a real 24 MiB disk: filled below ``disk.min_free_bytes``, then freed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    spool = mount / "spool"  # exists inside the service's namespace only
    http = free_port()
    idle = 3.0
    config = write_service_config(tmp_path / "service.yaml", spool, status_port=http,
                                  grouping={"by": "study", "idle_seconds": idle},
                                  disk={"min_free_bytes": 8 * MiB, "min_free_percent": 0})
    port = listener_port(config)
    (first_study, first), = make_copies(IMAGE, tmp_path / "first", 1, 3).items()
    (later_study, later), = make_copies(IMAGE, tmp_path / "later", 1, 4).items()

    with SmallDiskServe(config, tmp_path / "serve.log", mount, "24m") as serve:
        disk, inside = serve.seen(mount), serve.seen(spool)
        assert total_bytes(disk) == 24 * MiB
        assert _status(http)["intake"]["accepting"] is True and _accepting_metric(http) == 1

        assert pynetdicom_scu(port, first) == [SUCCESS] * 3
        sent_at = time.monotonic()
        filler = fill(disk, leave=4 * MiB)

        # Within a second (the free space is measured at most every second) the service says why it refuses.
        state = wait_until(lambda: (s := _status(http))["intake"]["accepting"] is False and s, 10, 0.1,
                           "/status to say the intake is paused")
        assert "below disk.min_free_bytes 8,388,608" in state["intake"]["reason"], state
        code, body = _get(http, "/readyz")
        assert code == 503 and any("below disk.min_free_bytes" in p for p in json.loads(body)["problems"]), body
        assert _accepting_metric(http) == 0

        # New associations and C-ECHO are answered; every C-STORE is refused "out of resources".
        assert pynetdicom_scu(port, later, echo=True) == [SUCCESS] + [OUT_OF_RESOURCES] * 4
        echo = echoscu(port)
        assert echo.returncode == 0 and "Received Echo Response (Success)" in echo.stdout + echo.stderr

        state = _status(http)
        assert state["refused"] == 4 and state["intake"]["refused_since"] == 4
        # What was acknowledged is kept (spool and journal); nothing refused was written, not even partly.
        assert spool_files(inside) == sop_uids(first)
        assert {r[0] for r in serve.journal_query(spool, "SELECT sop_instance_uid FROM instances")} == sop_uids(first)
        assert list((inside / "tmp").iterdir()) == []

        # The first study became complete while the disk was full: it waits, pending, no result written.
        time.sleep(max(0.0, sent_at + idle + 1.5 - time.monotonic()))
        assert _status(http)["groups"] == {"receiving": 1}
        assert not (inside / "results" / first_study).exists()

        log = serve.log_path.read_text(errors="replace")
        assert log.count("event=intake_paused") == 1, log
        assert log.count("event=refused reason=disk_space") == 1, log  # then counted, not logged

        # Space returns: intake resumes by itself, the refused instances go through when sent again.
        filler.unlink()
        wait_until(lambda: _status(http)["intake"]["accepting"], 10, 0.1, "the intake to resume")
        assert _get(http, "/readyz")[0] == 200 and _accepting_metric(http) == 1
        assert pynetdicom_scu(port, later) == [SUCCESS] * 4
        wait_until(lambda: _status(http)["groups"] == {"done": 2}, 60, 0.2, lambda: f"both studies processed: "
                   f"{_status(http)['groups']}\n{serve.log_tail()}")
        assert spool_files(inside) == sop_uids(first) | sop_uids(later)
        assert ({r[0] for r in serve.journal_query(spool, "SELECT sop_instance_uid FROM instances")}
                == sop_uids(first) | sop_uids(later))
        for study in (first_study, later_study):
            assert json.loads((inside / "results" / study / "metadata.json").read_text())["series"] == 1
        log = serve.log_path.read_text(errors="replace")
        assert log.count("event=intake_resumed refused_while_paused=4") == 1, log


@pytest.mark.slow
def test_every_listener_process_refuses_and_resumes(tmp_path, small_disks):
    """``listener.processes: 3``: the kernel spreads associations over three processes; each has its own guard."""
    mount = tmp_path / "disk"
    mount.mkdir()
    http = free_port()
    config = write_service_config(tmp_path / "service.yaml", mount / "spool", status_port=http,
                                  listener={"processes": 3}, grouping={"by": "study", "idle_seconds": 60},
                                  disk={"min_free_bytes": 8 * MiB, "min_free_percent": 0})
    port = listener_port(config)
    files = [p for paths in make_copies(IMAGE, tmp_path / "data", 1, 9).values() for p in paths]
    with SmallDiskServe(config, tmp_path / "serve.log", mount, "24m") as serve:
        filler = fill(serve.seen(mount), leave=4 * MiB)
        time.sleep(1.2)  # every process measures the free space again within a second
        # one association per instance: they land on different processes
        assert [pynetdicom_scu(port, [f])[0] for f in files] == [OUT_OF_RESOURCES] * len(files)
        assert _status(http)["refused"] == len(files)  # the journal's counter, shared by the processes
        assert spool_files(serve.seen(mount / "spool")) == set()

        filler.unlink()
        time.sleep(1.2)
        assert [pynetdicom_scu(port, [f])[0] for f in files] == [SUCCESS] * len(files)
        assert spool_files(serve.seen(mount / "spool")) == sop_uids(files)
        # the extra processes refused too (their log lines carry their process ID; 9 associations over 3
        # processes all landing on the service's own would be a 1 in 20,000 chance)
        refusing = set(re.findall(r"onevlm\.net\.listener(\[\d+\])?: event=refused reason=disk_space",
                                  serve.log_path.read_text()))
        assert refusing - {""}, serve.log_tail()

