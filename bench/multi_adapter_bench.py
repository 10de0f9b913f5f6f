"""Route -> execute: one base with every specialty adapter versus one model per specialty.

Builds a synthetic base model and K LoRA adapters (r 16, all linear layers; random weights, as
QLoRA would leave them after training, with an ``onevlm_adapter.json`` each), loads them into
one :class:`onevlm.specialty.execution.SpecialtyModel`, and measures side by side in one run:

- memory: parameter bytes of the one base + K adapters, against K separate fine-tuned models
  (K copies of the base, each with its adapter);
- latency per request (one classification query, greedy answer): the same requests, one per
  specialty in turn, either interleaved (an adapter switch before every request) or grouped by
  specialty (one switch per specialty), alternately, medians over ``--repeat`` rounds (the same
  requests give the same answers, so only the switching differs); and ``set_adapter`` alone.

CPU::

    .venv/bin/python bench/multi_adapter_bench.py --size small --adapters 5 --requests 10 --repeat 3

Research use only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from onevlm.cards import CardRepository, default_cards_dir  # noqa: E402
from onevlm.cards.schema import ExecuteSpec  # noqa: E402
from onevlm.specialty.execution import SpecialtyModel  # noqa: E402
from onevlm.specialty.manifest import AdapterManifest, base_model_entry, write_manifest  # noqa: E402
from onevlm.specialty.tasks import TASK_PROMPT_VERSION, prompt_id  # noqa: E402
from onevlm.vlm.loading import LoadOptions, load_model  # noqa: E402
from onevlm.vlm.synthetic import build_synthetic_model  # noqa: E402

SPECIALTIES = ("gastroenterology", "hematology", "ophthalmology", "pathology", "radiology", "dermatology")
CLASSES = ["normal", "abnormal", "benign", "malignant"]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write_adapters(base_dir: Path, out: Path, names: list[str], device: str) -> list[Path]:
    """K random LoRA adapters on ``base_dir`` with their manifests (one classification task each)."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(base_dir, LoadOptions(device=device, quantize="none"))
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    folders = []
    for name in names:
        model = get_peft_model(loaded.model, config, adapter_name=name)
        with torch.no_grad():  # peft starts B at zero (a no-op adapter); a trained one is not
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.normal_(std=0.02)
        folder = out / name
        model.save_pretrained(str(folder), selected_adapters=[name])
        nested = folder / name  # peft saves a named adapter in a subfolder
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(folder / item.name)
            nested.rmdir()
        loaded.model = model.unload()  # the clean base again for the next adapter
        manifest = AdapterManifest(
            specialty=name, base_model=base_model_entry(loaded.identity),
            tasks=[{"dataset": f"{name}-bench", "task": "classification", "markers": "numbers",
                    "prompt_id": prompt_id("classification", "numbers"), "class_names": CLASSES,
                    "description": "benchmark task (random adapter)"}],
            prompt_version=TASK_PROMPT_VERSION, data={}, training={"quantize": "none", "note": "random, benchmark"},
            results={"steps": 0, "train_loss": None, "val_loss": None, "val_accuracy": None})
        write_manifest(folder, manifest)
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--model", help="an existing base model folder instead of a synthetic one")
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10, help="requests per round and mode")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not 2 <= args.adapters <= len(SPECIALTIES):
        raise SystemExit(f"--adapters must be 2..{len(SPECIALTIES)}")
    names = list(SPECIALTIES[:args.adapters])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = Path(args.model) if args.model else build_synthetic_model(args.size, root / "base")
        folders = write_adapters(base, root / "adapters", names, args.device)
        model = SpecialtyModel(base, folders, device=args.device, quantize="none", batch_size=1)
        template = CardRepository.load(default_cards_dir()).get("MODEL_95")
        cards = {name: dataclasses.replace(template, execute=ExecuteSpec(name, f"{name}-bench")) for name in names}
        image = Image.effect_noise((224, 224), 64).convert("RGB")

        base_bytes = param_bytes(model.model.get_base_model()) - sum(
            p.numel() * p.element_size() for k, p in model.model.named_parameters() if "lora_" in k)
        adapter_bytes = {name: sum(p.numel() * p.element_size() for k, p in model.model.named_parameters()
                                   if "lora_" in k and f".{name}." in k) for name in names}
        shared = base_bytes + sum(adapter_bytes.values())
        separate = sum(base_bytes + adapter_bytes[name] for name in names)

        model.execute(cards[names[0]], image)  # warm-up
        interleaved = [names[i % len(names)] for i in range(args.requests)]
        orders = {"switching": interleaved, "grouped": sorted(interleaved, key=names.index)}
        times: dict[str, list[float]] = {mode: [] for mode in orders}
        for _ in range(args.repeat):
            for mode, order in orders.items():
                started = time.perf_counter()
                for name in order:
                    model.execute(cards[name], image)
                times[mode].append((time.perf_counter() - started) / len(order))
        switch = []
        for i in range(20):
            started = time.perf_counter()
            model.model.set_adapter(names[i % len(names)])
            switch.append(time.perf_counter() - started)
        model._active = None  # the bench switched behind the model's back

    per = {mode: statistics.median(values) for mode, values in times.items()}
    result = {
        "size": args.size, "adapters": names, "device": args.device,
        "memory_bytes": {"one base + adapters": shared, "separate models": separate, "base": base_bytes,
                         "adapter (each)": adapter_bytes[names[0]]},
        "memory_ratio_separate_over_shared": separate / shared,
        "seconds_per_request": per, "runs": times,
        "switch_overhead_ratio": per["switching"] / per["grouped"],
        "set_adapter_ms_median": 1000 * statistics.median(switch),
    }
    mb = 1 / 2**20
    print(f"{args.adapters} specialty adapters on one {args.size} base ({args.device}, fp32)")
    print(f"  memory: one base + adapters {shared * mb:.1f} MiB vs separate models {separate * mb:.1f} MiB "
          f"({result['memory_ratio_separate_over_shared']:.2f}x); base {base_bytes * mb:.1f} MiB, "
          f"adapter {adapter_bytes[names[0]] * mb:.2f} MiB each")
    print(f"  per request: adapter switched every request {1000 * per['switching']:.1f} ms, grouped by specialty "
          f"{1000 * per['grouped']:.1f} ms (ratio {result['switch_overhead_ratio']:.3f}); "
          f"set_adapter alone {result['set_adapter_ms_median']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
