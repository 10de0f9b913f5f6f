"""Start-up and console hygiene: what a command imports, prints, and how many threads it uses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLES

HEAVY = ("torch", "transformers", "sentence_transformers", "peft", "bitsandbytes", "monai", "sklearn")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **env})


def test_the_embedded_path_imports_no_heavy_library(tmp_path):
    code = ("import sys; from onevlm.cli import main; "
            f"code = main(['route', {str(SAMPLES / 'ct_head_routine_brain.dcm')!r}, '--json', '--log', "
            f"{str(tmp_path / 'log.jsonl')!r}]); "
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(code)")
    _run(code)  # the first route of a cache folder exports MiniLM to ONNX (torch): once, not measured here
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    for command in (["cards", "list"], ["status", "--config", str(tmp_path / "missing.yaml")]):
        result = _run("import sys; from onevlm.cli import main; main(%r); "
                      "print('HEAVY', sorted(m for m in %r if m in sys.modules))" % (command, HEAVY))
        assert "HEAVY []" in result.stdout, (command, result.stdout[-500:], result.stderr[-500:])


def test_a_routing_command_prints_no_warning(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onevlm", "route", str(SAMPLES / "ct_head_routine_brain.dcm"),
                             str(SAMPLES / "rt_plan.dcm"), "--log", str(tmp_path / "log.jsonl")],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0
    assert result.stderr == "", result.stderr


@pytest.mark.slow
def test_the_app_ends_without_holoscan_noise(tmp_path):
    result = subprocess.run([sys.executable, "-m", "apps.router_app", "-i", str(SAMPLES), "-o", str(tmp_path / "out"),
                             "-l", "WARN"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    for noise in ("deadlock", "cudaGetDeviceCount", "CUDA driver version"):
        assert noise not in output, output[-2000:]
    assert (tmp_path / "out" / "metadata.json").is_file()


def test_threads_are_chosen_and_validated():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ONEVLM_THREADS")}
    result = subprocess.run([sys.executable, "-c", "from onevlm.runtime import configure_runtime; import os; "
                             "configure_runtime(threads=1); print(os.environ['ONEVLM_THREADS'], "
                             "os.environ['OMP_NUM_THREADS']); import torch; print(torch.get_num_threads())"],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.stdout.split() == ["1", "1", "1"], result.stderr[-1000:]
    default = subprocess.run([sys.executable, "-c", "from onevlm.runtime import cpu_threads; print(cpu_threads())"],
                             capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert int(default.stdout) == max(1, (os.cpu_count() or 1) - 1)
    bad = subprocess.run([sys.executable, "-m", "onevlm", "cards", "list"], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={**env, "ONEVLM_THREADS": "many"})
    assert bad.returncode == 2 and "ONEVLM_THREADS must be a positive integer, got 'many'" in bad.stderr
    zero = subprocess.run([sys.executable, "-m", "onevlm", "--threads", "0", "cards", "list"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
    assert zero.returncode == 2 and "must be >= 1" in zero.stderr


def test_a_truncated_file_is_reported_once(tmp_path):
    from damaged_dicom import cut_last_fragment

    damaged = tmp_path / "cut.dcm"
    cut_last_fragment(SAMPLES / "ct_head_512_j2k.dcm", damaged)
    result = subprocess.run([sys.executable, "-m", "onevlm", "route", str(damaged), "--log", str(tmp_path / "l.jsonl")],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {damaged}: pixel data truncated: 66271 of 132530 bytes"], result.stderr
