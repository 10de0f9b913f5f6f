"""Start-up of the commands a user runs, next to their goals and to ``python -c "import pydicom"`` (the floor).

Each command runs as a fresh process, the commands taking turns (round robin) so that a noisy
moment hits all of them alike; medians of ``--repeat`` runs, after one warm-up run each (warm page
cache; the first run also exports the sentence model to ONNX into the cache folder, reported
separately as "first run ever", with an empty cache folder). ``serve`` is timed from the start of
the process to the first answered C-ECHO.

    python bench/startup_bench.py [--repeat 5] [--warmup 1] [--only NAME] [--list] [--json OUT]

``--warmup 0`` skips the warm-up runs (the "first run ever" run still fills the cache): each command
then runs ``--repeat`` times only, as the test suite's smoke run does; ``--list`` prints the names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "dicom_samples"
BIN = Path(sys.executable).parent


def _onevlm(*args: str) -> list[str]:
    return [str(BIN / "onevlm"), *args]


def _echo_ok(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="ONEVLM")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_serve(work: Path, env: dict[str, str]) -> float:
    """Seconds from process start to the first successful C-ECHO."""
    port = _free_port()
    config = work / "serve.yaml"
    config.write_text(f"spool_dir: {work / 'spool'}\nlistener: {{ae_title: ONEVLM, host: 127.0.0.1, port: {port}}}\n"
                      "grouping: {idle_seconds: 5}\n")
    started = time.perf_counter()
    process = subprocess.Popen(_onevlm("serve", "--config", str(config)), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < 120:
            try:
                if _echo_ok(port):
                    return time.perf_counter() - started
            except (OSError, RuntimeError):
                pass
            if process.poll() is not None:
                raise RuntimeError(f"onevlm serve exited with {process.returncode}")
            time.sleep(0.02)
        raise RuntimeError("onevlm serve did not answer C-ECHO within 120 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def commands(work: Path) -> dict[str, tuple[float, object]]:
    """name -> (goal in seconds, argv or a callable taking the environment)."""
    status_config = work / "status.yaml"
    status_config.write_text(f"spool_dir: {work / 'status-spool'}\n")
    return {
        "python -c 'import pydicom' (floor)": (None, [sys.executable, "-c", "import pydicom"]),
        "onevlm route ct_head_routine_brain.dcm": (3.0, _onevlm("route", str(SAMPLES / "ct_head_routine_brain.dcm"),
                                                                 "--log", str(work / "one.jsonl"))),
        "onevlm route dicom_samples/ (17 files)": (4.0, _onevlm("route", str(SAMPLES), "--log", str(work / "all.jsonl"))),
        "onevlm cards list": (1.0, _onevlm("cards", "list")),
        "onevlm status": (1.0, _onevlm("status", "--config", str(status_config))),
        "onevlm serve -> C-ECHO": (5.0, lambda env: time_serve(work, env)),
        "python -m apps.router_app -i dicom_samples": (10.0, [sys.executable, "-m", "apps.router_app", "-i",
                                                              str(SAMPLES), "-o", str(work / "app"), "-l", "WARN"]),
    }


def run_once(command, env: dict[str, str]) -> float:
    if callable(command):
        return command(env)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):  # route exits 1 when an input failed; none does here
        raise RuntimeError(f"{command[:3]} exited with {result.returncode}: {result.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", action="append", help="run only the commands whose name contains this")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs of each command before timing")
    parser.add_argument("--list", action="store_true", help="print the command names (one a line) and exit")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.list:
        with tempfile.TemporaryDirectory(prefix="onevlm-startup-") as folder:
            print("\n".join(commands(Path(folder))))
        return 0
    work = Path(tempfile.mkdtemp(prefix="onevlm-startup-"))
    cache = work / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ONEVLM_CACHE_DIR": str(cache),
           "PYTHONPATH": str(REPO)}
    try:
        table = commands(work)
        if args.only:
            table = {k: v for k, v in table.items() if any(o in k for o in args.only) or "floor" in k}
        first = run_once(table.get("onevlm route ct_head_routine_brain.dcm", (None, None))[1], env) \
            if "onevlm route ct_head_routine_brain.dcm" in table else None
        for _ in range(args.warmup):
            for _, command in table.values():  # warm-up: page cache, ONNX export, card vectors
                run_once(command, env)
        runs: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(args.repeat):
            for name, (_, command) in table.items():
                runs[name].append(run_once(command, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = statistics.median(runs["python -c 'import pydicom' (floor)"])
    result = {"repeat": args.repeat, "warmup": args.warmup, "cpu_count": os.cpu_count(), "first_run_ever_seconds": first, "commands": {}}
    print(f"start-up, medians of {args.repeat} (round robin, warm cache); floor = python -c 'import pydicom'")
    print(f"{'command':46s} {'median s':>9s} {'goal s':>7s} {'met':>4s} {'x floor':>8s}   runs")
    for name, (goal, _) in table.items():
        median = statistics.median(runs[name])
        met = "" if goal is None else ("yes" if median <= goal else "NO")
        result["commands"][name] = {"median": median, "goal": goal, "met": None if goal is None else median <= goal,
                                    "runs": runs[name]}
        print(f"{name:46s} {median:9.2f} {'' if goal is None else f'{goal:.0f}':>7s} {met:>4s} {median / floor:8.1f}   "
              + ", ".join(f"{r:.2f}" for r in runs[name]))
    if first is not None:
        print(f"first run ever (empty cache: exports MiniLM to ONNX, encodes the card texts): {first:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
