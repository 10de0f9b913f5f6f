"""Every benchmark in bench/ still runs: each script at its smallest size, its JSON checked.

These are not measurements (sizes far too small, and timing in tests proves nothing); they keep the
scripts behind bench/RESULTS.md from rotting between the sessions that run them for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcmtk_tools import find_dcmtk

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def run_bench_here(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``run_bench`` in this process: the script runs as ``__main__`` (``runpy``) with ``args`` as its command line.

    For the scripts whose start-up is mostly importing torch, transformers and peft (seconds each time on a small
    machine), which this test session has imported already. What a script may change in the process (command line,
    import path, environment, thread count, random states) is put back afterwards; its exit status is checked as
    ``run_bench`` checks the subprocess's, and its standard output is returned.
    """
    import contextlib
    import io
    import random
    import runpy

    import numpy as np
    import torch

    path = REPO / "bench" / script
    saved = (sys.argv[:], sys.path[:], dict(os.environ), torch.get_num_threads(), torch.get_rng_state(),
             np.random.get_state(), random.getstate())
    out = io.StringIO()
    try:
        sys.argv = [str(path), *args]
        os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as stop:
                assert stop.code in (None, 0), f"{script} exited with {stop.code}:\n{out.getvalue()[-2000:]}"
    finally:
        argv, path_list, environ, threads, torch_rng, np_rng, py_rng = saved
        sys.argv[:] = argv
        sys.path[:] = path_list
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
    return out.getvalue()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_ingest_bench_runs_every_receiver(tmp_path):
    if find_dcmtk("storescu") is None or find_dcmtk("storescp") is None:
        pytest.fail("dcmtk (storescu, storescp) is needed: apt-get install dcmtk")
    out = tmp_path / "ingest.json"
    run_bench("ingest_bench.py", "--files", "6", "--repeat", "1", "--json", str(out))
    rates = json.loads(out.read_text())
    receivers = ["onevlm", "onevlm x2 processes", "orthanc (onevlm intake)", "storescp", "pynetdicom-default",
                 "pynetdicom-ceiling"]
    assert sorted(rates) == sorted([f"{r}_{a}" for r in receivers for a in (1, 4)] + ["orthanc_intake_lag_seconds"])
    assert all(positive(v) for v in rates.values()), rates


def test_latency_bench_gets_an_sr_into_orthanc(tmp_path):
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        pytest.fail("Orthanc is needed: apt-get install orthanc")
    out = tmp_path / "latency.json"
    run_bench("latency_bench.py", "--studies", "2", "--slices", "2", "--idle", "0.5", "--json", str(out))
    latency = json.loads(out.read_text())
    assert latency["n"] == 2
    assert 0 < latency["p50"] <= latency["p90"] <= latency["max"]


def test_embedded_router_bench_reports_every_stage():
    stdout = run_bench("embedded_router_bench.py", "--repeat", "1")
    for stage in (1, 2, 3):
        assert f"stage {stage}:" in stdout
    assert "ratio batch8/batch1" in stdout


def test_multi_adapter_bench_shares_the_base(tmp_path):
    out = tmp_path / "multi.json"
    run_bench_here("multi_adapter_bench.py", "--size", "tiny", "--adapters", "2", "--requests", "2", "--repeat", "1",
                   "--json", str(out))
    result = json.loads(out.read_text())
    assert len(result["adapters"]) == 2
    memory = result["memory_bytes"]
    # One base plus two adapters must take less than two whole models.
    assert memory["one base + adapters"] < memory["separate models"]
    assert positive(result["seconds_per_request"]["switching"]) and positive(result["seconds_per_request"]["grouped"])


def test_qlora_bench_runs_both_recipes(tmp_path):
    out = tmp_path / "qlora.json"
    run_bench_here("qlora_bench.py", "--size", "tiny", "--samples", "8", "--json", str(out))
    result = json.loads(out.read_text())
    for recipe in ("notebook", "fast"):
        assert result[recipe]["samples"] == 8
        assert positive(result[recipe]["samples_per_s"])


def test_calibration_bench_reports_every_alpha(tmp_path):
    out = tmp_path / "calibration.json"
    run_bench("calibration_bench.py", "--cal", "60", "--test", "100", "--repeats", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert sorted(result["sets"]) == ["0.05", "0.1", "0.2"]
    for figures in result["sets"].values():
        assert 0 <= figures["coverage_mean"] <= 1 and figures["mean_set_size"] >= 0
        assert figures["ece_before"] >= 0 and positive(figures["temperature_mean"])
    assert set(result["selective"]) >= {"share_routed_mean", "certified_repeats"}


def test_startup_bench_times_every_command(tmp_path):
    out = tmp_path / "startup.json"
    listed = run_bench("startup_bench.py", "--list").splitlines()
    # one timed run of each command, no warm-up round (the "first run ever" run fills the cache)
    run_bench("startup_bench.py", "--repeat", "1", "--warmup", "0", "--json", str(out), timeout=600)
    result = json.loads(out.read_text())
    names = set(result["commands"])
    assert names == set(listed) and result["warmup"] == 0
    assert {"onevlm route dicom_samples/ (17 files)", "onevlm serve -> C-ECHO", "onevlm status",
            "python -m apps.router_app -i dicom_samples"} <= names
    assert all(len(c["runs"]) == 1 for c in result["commands"].values())
    assert all(positive(c["median"]) for c in result["commands"].values())
    assert positive(result["first_run_ever_seconds"])


def test_fusion_bench_compares_the_three_routers(tmp_path):
    out = tmp_path / "fusion.json"
    run_bench("fusion_bench.py", "--series", "150", "--repeats", "1", "--alphas", "0.2", "--json", str(out))
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert sorted(summary) == ["goals@0.2", "header@0.2", "hybrid@0.2", "pixels@0.2"]
    assert summary["header@0.2"]["vlm_calls"] == 0 and summary["pixels@0.2"]["vlm_calls"] > 0
    for router in ("header", "pixels", "hybrid"):
        entry = summary[f"{router}@0.2"]
        assert 0 <= entry["risk"] <= 1 and abs(entry["one_card"] + entry["routed_set"] + entry["review"]) <= 1
    assert all(run["fusion"] for run in results["runs"] if run["router"] == "hybrid")


def test_vocabulary_facts_on_gemma3s_real_vocabulary(tmp_path):
    from conftest import gemma3_vocabulary

    out = tmp_path / "facts.json"
    env_cache = str(gemma3_vocabulary())  # the vocabulary's cache, not this session's own
    run_bench_here("vocabulary_facts.py", "--json", str(out), env={"ONEVLM_CACHE_DIR": env_cache})
    facts = json.loads(out.read_text())
    assert facts["vocabulary"] == 262_145 and facts["prompt_tokens"]["image_tokens"] == 256
    assert facts["prompt_tokens"]["stage1"] > facts["prompt_tokens"]["stage2"] > 256
    ids = facts["answers"]["card_ids"]
    assert ids["n"] == ids["share_first_token"] and ids["min"] >= 4  # MODEL, _, digits: every ID starts alike
    layer = facts["output_layer_4b"]
    assert 4.2e9 < layer["parameters"] < 4.4e9 and layer["output_layer_parameters"] == 262_208 * 2560
    # a decode step (bench/decode_step.py, gpu_check.sh's floor): the text weights with the tied output layer in full,
    # one embedding row, no vision tower
    assert layer["decode_step_bytes_bf16"] == 2 * (layer["text_parameters"] + 2560) == 7_760_531_456
    assert round(layer["output_layer_share_of_decode_step_bytes"], 3) == 0.173


def test_router_bench_engines_agree_on_gemma3s_real_vocabulary(tmp_path):
    """The router bench's one smoke run: on the real vocabulary (the subword model's engines are tested in
    tests/test_vlm_subword.py)."""
    from conftest import gemma3_vocabulary

    out = tmp_path / "router.json"
    run_bench_here("router_bench.py", "--size", "tiny", "--tokenizer", "gemma3",
                   "--vocabulary-cache", str(gemma3_vocabulary()), "--images", "2", "--naive-images", "1",
                   "--repeat", "1", "--warmup", "0", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["tokenizer"] == "gemma3" and result["vocabulary_rows"] == 262_208 and result["tied_output_layer"]
    # fast and graph batch both images; the naive reference (one image at a time) answers the first only, on which
    # the answers are compared (engines on many images: tests/test_vlm_subword.py, on this vocabulary too)
    assert (result["images"], result["naive_images"], result["fast_batch"]) == (2, 1, 8)
    assert result["same_answers_fast"] is True and result["same_answers_graph"] is True
    assert result["max_p_difference_fast"] <= 2e-3 and result["max_p_difference_graph"] <= 2e-3
    for engine in ("naive", "fast", "graph"):
        assert positive(result[f"{engine}_images_per_s"])
    assert result["fast_engine_stats"]["decode_steps"] > 0 and result["graph_engine_stats"]["decode_steps"] > 0
    assert result["graph_compile"] == "none" and result["graph_fallbacks"] == 0  # CPU default: eager static loop
    # what a decode step reads (the GPU floor's numerator): every text weight once, the tied output layer included
    tiny_hidden = 64
    assert result["output_layer_parameters"] == 262_208 * tiny_hidden
    assert result["output_layer_parameters"] < result["decode_step_parameters"] < result["parameters"]
    bytes_per_weight = {"float32": 4, "bfloat16": 2}[result["dtype"]]
    assert result["decode_step_bytes"] == bytes_per_weight * result["decode_step_parameters"]
    assert result["transformers"] and result["warm_up_seconds"] == {}  # --warmup 0: answers checked, not rates


def test_page_bench_serves_both_releases_on_one_spool(tmp_path):
    out = tmp_path / "page.json"
    # HEAD as "before": a clone need not hold the release the README's figures compare with
    stdout = run_bench("page_bench.py", "--studies", "3", "--rounds", "1", "--clients", "2", "--before", "HEAD",
                       "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["pages"]) == {"overview", "studies", "studies-1000", "decision", "review", "calibration",
                                    "status"}
    for figures in result["pages"].values():
        assert positive(figures["before"]["median_ms"]) and positive(figures["after"]["median_ms"])
    assert positive(result["throughput_per_s"]["before"]) and positive(result["throughput_per_s"]["after"])
    assert "after/before p50" in stdout
