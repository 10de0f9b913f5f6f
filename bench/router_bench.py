"""Router engine benchmark: images/s through all three stages, naive, fast and graph, in one run.

Every image goes through stage 1 (image + modality list), stage 2 (image) and stage 3 (text
only, the candidates of one modality) with the paper's free-text top-2 decoding, whatever the
answers are (random weights rarely answer in-set, and the benchmark measures the engine, not
the router's early stop). All engines load the same model once; runs alternate
(naive, fast, graph, naive, ...) so machine noise hits them alike; the medians and their ratios
are printed. Every engine must produce the naive reference's answers: the script checks it.

CPU (the goal: fast >= 3x naive with the ``small`` model, word-level and subword tokenizers)::

    .venv/bin/python bench/router_bench.py --size small --images 16 --repeat 3
    .venv/bin/python bench/router_bench.py --size small --tokenizer subword --images 16 --repeat 3

On Gemma 3's real vocabulary (``--tokenizer gemma3``: fetched once by ``onevlm fetch-vocabulary`` into the cache
folder, ``ONEVLM_CACHE_DIR`` or ``--vocabulary-cache``; the output layer then has Gemma 3's 262,208 rows)::

    .venv/bin/python bench/router_bench.py --size small --tokenizer gemma3 --images 8 --batch 4 --repeat 2

GPU (device tool; medgemma-4b-shape, bf16; bench/gpu_check.sh runs it; see bench/RESULTS.md)::

    python bench/router_bench.py --size medgemma-4b-shape --tokenizer gemma3 --device cuda --images 32 --batch 32 --repeat 2

The JSON also holds what one decode step reads (``decode_step_bytes``: every text weight once, the tied
262,208-row output layer included; bench/decode_step.py), the lower bound gpu_check.sh divides by the GPU's
bandwidth, and ``max_p_difference_<engine>``: the largest gap between an engine's shown probabilities and the
naive reference's where their answers agree.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/decode_step.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from onevlm.cards import CardRepository, default_cards_dir  # noqa: E402
from onevlm.inputs import load_input  # noqa: E402
from onevlm.router.backend import StageRequest  # noqa: E402
from onevlm.router.prompts import stage1_prompt, stage2_prompt, stage3_prompt  # noqa: E402
from onevlm.vlm.backend import EngineSettings, TransformersBackend  # noqa: E402
from onevlm.vlm.graph_engine import COMPILE_MODES  # noqa: E402
from onevlm.vlm.loading import LoadOptions, load_model  # noqa: E402
from onevlm.vlm.synthetic import TOKENIZERS, build_synthetic_model  # noqa: E402

from decode_step import decode_step_reads  # noqa: E402  (bench/decode_step.py)


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
    parser = argparse.ArgumentParser(description="router engines side by side (naive, fast, graph), images/s")
    parser.add_argument("--size", default="small", help="synthetic size when --model is not given")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="word",
                        help="tokenizer of the synthetic model (subword: answers in several pieces, as MedGemma's; "
                             "gemma3: Gemma 3's real vocabulary and chat template, fetched once)")
    parser.add_argument("--vocabulary-cache",
                        help="--tokenizer gemma3: the cache folder holding the fetched vocabulary "
                             "(default ONEVLM_CACHE_DIR, else ~/.cache/onevlm)")
    parser.add_argument("--model", help="an existing model folder (default: build the synthetic size)")
    parser.add_argument("--engines", default="naive,fast,graph", help="comma-separated engines; naive is the reference")
    parser.add_argument("--graph-compile", default="auto", choices=COMPILE_MODES,
                        help="graph engine: auto = cuda-graph on CUDA, eager static loop (none) on the CPU")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="images per batch for the fast and graph engines")
    parser.add_argument("--naive-images", type=int, help="images for the naive engine (default: --images); "
                        "its rate is images/s either way, and answers are compared on the common images")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, choices=(0, 1),
                        help="1 (default): one warm-up round per engine before the timed runs (kernels, allocator; "
                             "the graph engine builds its buckets there); 0: none, the first timed run pays for them "
                             "(the test suite's smoke run, which checks answers, not rates)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if "naive" not in names or any(n not in ("naive", "fast", "graph") for n in names):
        parser.error("--engines: naive (the reference) plus any of fast, graph")

    cards = CardRepository.load(default_cards_dir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = (Path(args.model) if args.model
                     else build_synthetic_model(args.size, tmp_path / "model", cards, tokenizer=args.tokenizer,
                                                vocabulary_cache=args.vocabulary_cache))
        t0 = time.perf_counter()
        loaded = load_model(model_dir, LoadOptions(device=args.device, dtype=args.dtype, quantize=args.quantize))
        load_s = time.perf_counter() - t0
        params = sum(p.numel() for p in loaded.model.parameters())
        reads = decode_step_reads(loaded.model)
        engines = {name: TransformersBackend(loaded, EngineSettings(engine=name, graph_compile=args.graph_compile))
                   for name in names}
        paths = synthetic_images(tmp_path, args.images)
        requests = stage_requests(cards)
        # warm-up (kernels, allocator; the graph engine compiles its buckets here): the batch sizes of the runs
        warm: dict[str, float] = {}
        for name, backend in engines.items() if args.warmup else ():
            started = time.perf_counter()
            route_all(backend, paths[:1 if name == "naive" else 2], requests, args.batch)  # naive: always batch 1
            if name != "naive" and min(args.batch, args.images) > 2:  # else that batch size just ran
                route_all(backend, paths[: min(args.batch, args.images)], requests, args.batch)
            warm[name] = time.perf_counter() - started
        rates: dict[str, list[float]] = {name: [] for name in names}
        outputs = {}
        counts = {name: args.images for name in names}
        counts["naive"] = min(args.naive_images or args.images, args.images)
        for name in names:
            if name != "naive":
                engines[name].engine.stats = type(engines[name].engine.stats)()
        for _ in range(args.repeat):
            for name, backend in engines.items():
                started = time.perf_counter()
                outputs[name] = route_all(backend, paths[:counts[name]], requests, 1 if name == "naive" else args.batch)
                rates[name].append(counts[name] / (time.perf_counter() - started))
        stats = {name: engines[name].engine.stats.as_dict() for name in names if name != "naive"}
    common = counts["naive"]

    def texts(name):
        return [[[t for t, _ in s] for s in item] for item in outputs[name][:common]]

    def max_p_difference(name):
        """The largest gap between shown probabilities where the answers agree (None when none agree)."""
        gaps = [abs(p - q) for mine, ref in zip(outputs[name][:common], outputs["naive"][:common])
                for stage, ref_stage in zip(mine, ref) for (t, p), (u, q) in zip(stage, ref_stage) if t == u]
        return round(max(gaps), 4) if gaps else None

    synthetic = loaded.identity.get("synthetic") or {}
    tokenizer = synthetic.get("tokenizer", "?" if args.model else args.tokenizer)
    median = {name: statistics.median(rates[name]) for name in names}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": (f"{args.model} ({tokenizer} tokenizer)" if args.model
                  else f"synthetic {args.size} ({args.tokenizer} tokenizer)"),
        "tokenizer": tokenizer,
        "parameters": params,
        "vocabulary_rows": reads["vocabulary_rows"],
        "output_layer_parameters": reads["output_layer_parameters"],
        "tied_output_layer": reads["tied_output_layer"],
        "decode_step_parameters": reads["decoded_parameters"],
        "decode_step_bytes": reads["decode_step_bytes"],
        "output_layer_share_of_decode_step": round(reads["output_layer_share_of_decode_step"], 4),
        "device": loaded.identity["device"],
        "dtype": loaded.identity["dtype"],
        "quantize": args.quantize,
        "images": args.images,
        "fast_batch": args.batch,
        "repeat": args.repeat,
        "load_seconds": round(load_s, 2),
        "naive_images": counts["naive"],
        "warm_up_seconds": {name: round(v, 2) for name, v in warm.items()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    for name in names:
        result[f"{name}_images_per_s"] = round(median[name], 3)
        if name != "naive":
            result[f"ratio_{name}_over_naive"] = round(median[name] / median["naive"], 2)
            result[f"{name}_engine_stats"] = stats[name]
            result[f"same_answers_{name}"] = texts(name) == texts("naive")
            result[f"max_p_difference_{name}"] = max_p_difference(name)
    if "fast" in names:  # the names earlier results used
        result["same_answers"] = result["same_answers_fast"]
    if "graph" in names:
        result["graph_compile"] = engines["graph"].engine.compile_mode
        result["graph_fallbacks"] = engines["graph"].engine.fallbacks
        result["graph_capture_failures"] = engines["graph"].engine.capture_failures
        if "fast" in names:
            result["ratio_graph_over_fast"] = round(median["graph"] / median["fast"], 2)
    print(f"model {result['model']} ({params / 1e6:.1f} M parameters, output layer {reads['vocabulary_rows']:,} rows) "
          f"on {result['device']} {result['dtype']}, transformers {transformers.__version__}, "
          f"{args.images} images x 3 stages, {args.repeat} alternating runs")
    print(f"  a decode step reads {reads['decode_step_bytes'] / 1e6:,.1f} MB of weights, "
          f"{reads['output_layer_share_of_decode_step']:.1%} of them the output layer")
    for name in names:
        batch = "" if name == "naive" else f", batch {args.batch}"
        extra = "" if name == "naive" else (f"  x{result[f'ratio_{name}_over_naive']} naive, "
                                            f"same answers as naive: {result[f'same_answers_{name}']}, "
                                            f"max p gap {result[f'max_p_difference_{name}']}")
        print(f"  {name:5s}: {median[name]:8.3f} images/s   (runs: {', '.join(f'{r:.3f}' for r in rates[name])}{batch})"
              f"{extra}")
    for name, st in stats.items():
        print(f"  {name} engine: {st['decode_steps']} decode steps, {1000 * st['seconds_per_decode_step']:.2f} ms/step, "
              f"prefill {st['prefill_seconds']:.2f} s, decode {st['decode_seconds']:.2f} s (all runs)")
    if "graph" in names:
        warmed = f"warm-up {warm['graph']:.1f} s" if "graph" in warm else "no warm-up"
        print(f"  graph engine: compile {result['graph_compile']}, {warmed}, "
              f"fallbacks {result['graph_fallbacks']}, capture failures {result['graph_capture_failures']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
