"""Throughput of the embedded router on dicom_samples/ (CPU), batch size 1 versus 8, in one run.

Usage::

    .venv/bin/python bench/embedded_router_bench.py [--repeat 5]

Runs alternate between the two settings so machine noise hits both alike; prints inputs/s for
each, their ratio, and the mean seconds per stage. Research use only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from onevlm.backends.embedded import EmbeddedBackend  # noqa: E402
from onevlm.cards import CardRepository, default_cards_dir  # noqa: E402
from onevlm.inputs import discover_files  # noqa: E402
from onevlm.router import Router  # noqa: E402
from onevlm.router.runner import route_files  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "dicom_samples"


def run_once(router: Router, files: list[Path], batch_size: int) -> tuple[float, dict[int, list[float]]]:
    per_stage: dict[int, list[float]] = {1: [], 2: [], 3: []}
    started = time.perf_counter()
    for decision in route_files(router, files, batch_size=batch_size, progress=False):
        for stage in decision.stages:
            per_stage[stage.stage].append(stage.seconds)
    return time.perf_counter() - started, per_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cards = CardRepository.load(default_cards_dir())
    router = Router(cards, EmbeddedBackend(cards))
    files = discover_files([SAMPLES])
    run_once(router, files, 8)  # warm-up: loads MiniLM and fills the caption cache
    results: dict[int, list[float]] = {1: [], 8: []}
    stages: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for _ in range(args.repeat):
        for batch in (1, 8):
            seconds, per_stage = run_once(router, files, batch)
            results[batch].append(len(files) / seconds)
            for k, v in per_stage.items():
                stages[k].extend(v)
    print(f"embedded router, {len(files)} files from dicom_samples/, {args.repeat} alternating runs")
    for batch, rates in results.items():
        print(f"  batch {batch}: {statistics.median(rates):7.1f} inputs/s (median; min {min(rates):.1f}, max {max(rates):.1f})")
    print(f"  ratio batch8/batch1: {statistics.median(results[8]) / statistics.median(results[1]):.2f}")
    for k, v in stages.items():
        if v:
            print(f"  stage {k}: {1000 * statistics.mean(v):.2f} ms per input that reached it (n={len(v)})")


if __name__ == "__main__":
    main()
