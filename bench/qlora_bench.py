"""QLoRA training throughput: the MedGemma notebook's recipe versus our best configuration.

Both train the same model on the same synthetic, learnable MedMNIST-format task (coloured
shapes) for the same number of samples, one after the other in one process; samples/s and peak
memory are printed side by side, with each run's test accuracy so speed is not bought with
learning. Recipes:

- ``notebook``: eager attention, batch 4, gradient checkpointing, ``modules_to_save`` lm_head +
  embed_tokens (as Google's MedGemma fine-tuning notebook);
- ``fast``: SDPA attention, batch 8, no checkpointing, no ``modules_to_save``.

GPU (device tool; MedGemma-4B shape, bf16 compute, images resized to 896²)::

    python bench/qlora_bench.py --size medgemma-4b-shape --device cuda --samples 256 --json $OUT/qlora.json

CPU smoke check (tiny model)::

    .venv/bin/python bench/qlora_bench.py --size tiny --device cpu --samples 64

Research use only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from onevlm.specialty.datasets.medmnist import read_medmnist  # noqa: E402
from onevlm.specialty.datasets.synthetic import shapes_info, write_shapes_medmnist  # noqa: E402
from onevlm.specialty.tasks import build_examples  # noqa: E402
from onevlm.specialty.prediction import accuracy, predict  # noqa: E402
from onevlm.specialty.training import TrainingSettings, finetune  # noqa: E402
from onevlm.vlm.synthetic import build_synthetic_model  # noqa: E402

RECIPES = {
    "notebook": dict(attn_implementation="eager", batch_size=4, gradient_checkpointing=True,
                     modules_to_save=("lm_head", "embed_tokens")),
    "fast": dict(attn_implementation="sdpa", batch_size=8, gradient_checkpointing=False, modules_to_save=()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--model", help="an existing base model folder instead of a synthetic one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=64, help="training samples per recipe")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = Path(args.model) if args.model else build_synthetic_model(args.size, root / "base",
                                                                         device=args.device if args.device != "auto" else "cpu")
        data = root / "shapes.npz"
        classes = write_shapes_medmnist(data, size=64, per_split=(max(args.samples, 64), 16, 64), seed=0)
        info = shapes_info(classes)
        splits = {s: read_medmnist(data, s, info=info)[1] for s in ("train", "val", "test")}
        examples = {s: build_examples(info, samples, markers="numbers") for s, samples in splits.items()}
        for name, recipe in RECIPES.items():
            steps = max(1, args.samples // recipe["batch_size"])
            settings = TrainingSettings(specialty="bench", device=args.device, quantize="nf4", learning_rate=args.lr,
                                        gradient_accumulation_steps=1, max_steps=steps, checkpoint_every=10**9,
                                        progress=False, **recipe)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = finetune(base, examples["train"], examples["val"], root / f"adapter_{name}", settings)
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            predictions = predict(result.model, result.processor, info, examples["test"])
            results[name] = {"samples": steps * recipe["batch_size"], "seconds": round(seconds, 2),
                             "samples_per_s": round(steps * recipe["batch_size"] / seconds, 3),
                             "peak_gib": None if peak is None else round(peak, 1),
                             "test_accuracy": accuracy(examples["test"], predictions), **{k: str(v) for k, v in recipe.items()}}
            del result
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for name, r in results.items():
        print(f"{name:9s} {r['samples_per_s']:8.2f} samples/s  ({r['samples']} samples in {r['seconds']} s, "
              f"peak {r['peak_gib']} GiB, test accuracy {r['test_accuracy']:.2f})")
    print(f"fast / notebook: {results['fast']['samples_per_s'] / results['notebook']['samples_per_s']:.2f}x "
          "(time includes loading and the final validation of each run)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
