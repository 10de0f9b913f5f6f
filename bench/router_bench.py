"""Router engine benchmark: images/s through all three stages, naive versus fast, in one run.

Every image goes through stage 1 (image + modality list), stage 2 (image) and stage 3 (text
only, the candidates of one modality) with the paper's free-text top-2 decoding, whatever the
answers are (random weights rarely answer in-set, and the benchmark measures the engine, not
the router's early stop). Both engines load the same model once; runs alternate
(naive, fast, naive, fast, ...) so machine noise hits both alike; the medians and their ratio
are printed. Both engines must produce the same answers: the script checks it.

CPU (the issue's goal: fast >= 3x naive with the ``small`` model)::

    .venv/bin/python bench/router_bench.py --size small --images 16 --repeat 3

GPU (device tool; medgemma-4b-shape, bf16; see bench/RESULTS.md)::

    python bench/router_bench.py --size medgemma-4b-shape --device cuda --images 32 --batch 32 --repeat 2
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from onevlm.cards import CardRepository, default_cards_dir  # noqa: E402
from onevlm.inputs import load_input  # noqa: E402
from onevlm.router.backend import StageRequest  # noqa: E402
from onevlm.router.prompts import stage1_prompt, stage2_prompt, stage3_prompt  # noqa: E402
from onevlm.vlm.backend import EngineSettings, TransformersBackend  # noqa: E402
from onevlm.vlm.loading import LoadOptions, load_model  # noqa: E402
from onevlm.vlm.synthetic import build_synthetic_model  # noqa: E402


def synthetic_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct random RGB images (varied sizes) as PNG files."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(200, 600)), int(rng.integers(200, 600))
        path = folder / f"image_{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def stage_requests(cards: CardRepository) -> list[StageRequest]:
    modality = "brain CT scan"
    candidates = cards.by_modality(modality)
    return [
        StageRequest(1, stage1_prompt(cards.modalities), (*cards.modalities, "None", "Other")),
        StageRequest(2, stage2_prompt(), (*cards.findings, "Normal")),
        StageRequest(3, stage3_prompt(modality, "Normal", [(c.id, c.task_caption) for c in candidates]),
                     (*(c.id for c in candidates), "None"), cards=candidates, modality=modality, finding="Normal"),
    ]


def route_all(backend: TransformersBackend, paths: list[Path], requests: list[StageRequest], batch: int) -> list:
    """All three stages for every image; returns the answers (to compare engines)."""
    backend._features.clear()
    backend._pixels.clear()
    answers = []
    for start in range(0, len(paths), batch):
        items = [load_input(p) for p in paths[start:start + batch]]
        per_item = [[] for _ in items]
        for request in requests:
            for i, response in enumerate(backend.answer(items, [request] * len(items))):
                per_item[i].append([(c.text, round(c.p, 4)) for c in response.candidates])
        answers.extend(per_item)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description="naive vs fast router engine, images/s")
    parser.add_argument("--size", default="small", help="synthetic size when --model is not given")
    parser.add_argument("--model", help="an existing model folder (default: build the synthetic size)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="images per batch for the fast engine")
    parser.add_argument("--naive-images", type=int, help="images for the naive engine (default: --images); "
                        "its rate is images/s either way, and answers are compared on the common images")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    cards = CardRepository.load(default_cards_dir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = Path(args.model) if args.model else build_synthetic_model(args.size, tmp_path / "model", cards)
        t0 = time.perf_counter()
        loaded = load_model(model_dir, LoadOptions(device=args.device, dtype=args.dtype, quantize=args.quantize))
        load_s = time.perf_counter() - t0
        params = sum(p.numel() for p in loaded.model.parameters())
        engines = {name: TransformersBackend(loaded, EngineSettings(engine=name)) for name in ("naive", "fast")}
        paths = synthetic_images(tmp_path, args.images)
        requests = stage_requests(cards)
        # warm-up (kernels, allocator) on two images, both engines
        for backend in engines.values():
            route_all(backend, paths[:2], requests, args.batch)
        rates: dict[str, list[float]] = {"naive": [], "fast": []}
        outputs = {}
        counts = {"naive": min(args.naive_images or args.images, args.images), "fast": args.images}
        engines["fast"].engine.stats = type(engines["fast"].engine.stats)()
        for _ in range(args.repeat):
            for name, backend in engines.items():
                started = time.perf_counter()
                outputs[name] = route_all(backend, paths[:counts[name]], requests, args.batch if name == "fast" else 1)
                rates[name].append(counts[name] / (time.perf_counter() - started))
        stats = engines["fast"].engine.stats.as_dict()
    common = counts["naive"]
    same = [[[t for t, _ in s] for s in item] for item in outputs["naive"][:common]] == \
        [[[t for t, _ in s] for s in item] for item in outputs["fast"][:common]]
    naive, fast = statistics.median(rates["naive"]), statistics.median(rates["fast"])
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or f"synthetic {args.size}",
        "parameters": params,
        "device": loaded.identity["device"],
        "dtype": loaded.identity["dtype"],
        "quantize": args.quantize,
        "images": args.images,
        "fast_batch": args.batch,
        "repeat": args.repeat,
        "load_seconds": round(load_s, 2),
        "naive_images_per_s": round(naive, 3),
        "fast_images_per_s": round(fast, 3),
        "ratio_fast_over_naive": round(fast / naive, 2),
        "same_answers": same,
        "naive_images": counts["naive"],
        "fast_engine_stats": stats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"model {result['model']} ({params / 1e6:.1f} M parameters) on {result['device']} {result['dtype']}, "
          f"{args.images} images x 3 stages, {args.repeat} alternating runs")
    print(f"  naive: {naive:8.3f} images/s   (runs: {', '.join(f'{r:.3f}' for r in rates['naive'])})")
    print(f"  fast : {fast:8.3f} images/s   (runs: {', '.join(f'{r:.3f}' for r in rates['fast'])}, batch {args.batch})")
    print(f"  ratio fast/naive: {fast / naive:.2f}x   same answers in both engines: {same}")
    print(f"  fast engine: {stats['decode_steps']} decode steps, {1000 * stats['seconds_per_decode_step']:.2f} ms/step, "
          f"prefill {stats['prefill_seconds']:.2f} s, decode {stats['decode_seconds']:.2f} s (all runs)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
