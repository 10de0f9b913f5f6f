"""Fine-tuning throughput: transformers' ``Trainer`` (what ``finetune`` runs now) against the old hand-written loop.

Both train the same base model (NF4 QLoRA, the same LoRA settings, batch and accumulation) on the
same synthetic colour-shape task for the same number of optimizer steps, alternating in one process,
``--repeats`` times each; the figure is training samples per second of the training loop alone
(model loading, saving and validation excluded: ``Trainer``'s own ``train_runtime`` for the new
path, the loop's wall time for the old one). The old loop is kept here, as it was before the move
(commit ae04eff, ``onevlm/specialty/training.py``), as the reference: every micro-batch's mean loss
divided by the accumulation steps, logits of every position.

CPU smoke model (the word tokenizer) and the real Gemma 3 vocabulary (262,208 output rows)::

    .venv/bin/python bench/trainer_bench.py --size tiny --steps 12 --repeats 3
    .venv/bin/python bench/trainer_bench.py --size tiny --tokenizer gemma3 --steps 12 --repeats 3

Research use only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from onevlm.specialty.datasets.medmnist import read_medmnist  # noqa: E402
from onevlm.specialty.datasets.synthetic import shapes_info, write_shapes_medmnist  # noqa: E402
from onevlm.specialty.encoding import ExampleEncoder, image_token_id, move_batch  # noqa: E402
from onevlm.specialty.tasks import build_examples  # noqa: E402
from onevlm.specialty.training import TrainingSettings, _DataStream, _prepare_model, finetune  # noqa: E402
from onevlm.vlm.loading import LoadOptions, load_model  # noqa: E402
from onevlm.vlm.synthetic import build_synthetic_model  # noqa: E402


def old_loop(base: Path, examples, settings: TrainingSettings) -> float:
    """The pre-Trainer loop's training part; returns its seconds."""
    torch.manual_seed(settings.seed)
    loaded = load_model(base, LoadOptions(device="cpu", dtype="fp32", quantize=settings.quantize,
                                          attn_implementation=settings.attn_implementation))
    encoder = ExampleEncoder(loaded.processor, image_token_id(loaded.model))
    model = _prepare_model(loaded, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    stream = _DataStream(len(examples), settings.batch_size, settings.seed, None)
    accum = settings.gradient_accumulation_steps
    model.train()
    started = time.perf_counter()
    for step in range(settings.max_steps):
        for micro in range(accum):
            batch = move_batch(encoder.training_batch([examples[i] for i in stream.batch(step * accum + micro)]),
                               "cpu", torch.float32)
            loss = model(**batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--tokenizer", default="word", choices=("word", "subword", "gemma3"))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    settings = TrainingSettings(specialty="bench", device="cpu", quantize="nf4", batch_size=args.batch,
                                gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=1e-3,
                                checkpoint_every=0, gradient_checkpointing=False, progress=False, log_every=10**6)
    samples = args.steps * args.batch * args.accum
    seconds: dict[str, list[float]] = {"old loop": [], "Trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_synthetic_model(args.size, root / "base", tokenizer=args.tokenizer)
        data = root / "shapes.npz"
        classes = write_shapes_medmnist(data, size=64, per_split=(max(samples, 64), 8, 8), seed=0)
        info = shapes_info(classes)
        train = build_examples(info, read_medmnist(data, "train", info=info)[1], markers="numbers")
        for repeat in range(args.repeats):
            order = ("old loop", "Trainer") if repeat % 2 == 0 else ("Trainer", "old loop")
            for name in order:
                if name == "old loop":
                    seconds[name].append(old_loop(base, train, settings))
                else:
                    result = finetune(base, train, [], root / f"adapter-{repeat}", settings)
                    seconds[name].append(result.manifest.results["train_seconds"])
                print(f"repeat {repeat + 1}: {name:8s} {samples / seconds[name][-1]:7.2f} samples/s", flush=True)
    rates = {name: samples / statistics.median(values) for name, values in seconds.items()}
    print(f"\n{args.size} model, {args.tokenizer} tokenizer, NF4 QLoRA on the CPU, {args.steps} steps of "
          f"{args.batch} x {args.accum} examples, median of {args.repeats}:")
    for name, rate in rates.items():
        print(f"  {name:8s} {rate:7.2f} samples/s")
    print(f"  Trainer / old loop: {rates['Trainer'] / rates['old loop']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "samples_per_s": rates},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
