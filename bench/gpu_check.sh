#!/usr/bin/env bash
# The prepared device run for the lent GPU (device tool; H200 or H100: the floor uses the card's
# bandwidth), about 10 minutes. From a session with a device lent, first here:  make device-wheels
#   (bitsandbytes + pydicom wheels into .device/wheels, and
# Gemma 3's verified vocabulary packed as .device/vocabulary.tgz: the GPU machine cannot download it; the
# GPU image has torch, transformers 5.17, pillow and pyyaml; what travels stays under the 64 MiB limit:
# wheels 45.5 MB + vocabulary 5.5 MB (gzip of 34.5 MB) + the tree 4.3 MB = 52.8 MiB, on 2026-12-06)
# then:  run(command="bash bench/gpu_check.sh", carry=[".device"], timeout_s=590)
# Results land in $OUT (json + log), written after each step so a cut-off run still reports; the last
# step writes $OUT/summary.json (torch / transformers / bitsandbytes versions, the GPU, every figure);
# copy the figures into bench/RESULTS.md with the date, the machine and this command.
#
# Steps, most important first (each bounded by `timeout`, a failed step does not stop the others):
#   1. single stream: naive vs fast vs graph (CUDA-graph capture of the static decode step), batch 1
#   2. batch 32: the same three engines
#   3. NF4: one quantised load + route, the three engines
#   4. graph with torch.compile mode=reduce-overhead (inductor kernels + CUDA graphs), batch 1
#   5. QLoRA: notebook recipe vs ours (bench/qlora_bench.py)
# The model is MedGemma-4B-it's architecture with random weights on Gemma 3's real vocabulary and chat
# template (tokenizer 'gemma3': 262,208-row output layer, tied to the input embedding), so prompts and
# answers have the real model's token counts.
#
# Decode floor: what one decode step reads (router_bench's JSON decode_step_bytes, from
# bench/decode_step.py: every text weight once, the tied 262,208 x 2560 output layer in full, one
# embedding row, no vision tower: 7.76 GB in bf16) over the GPU's peak memory bandwidth.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/onevlm-gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

pip install -q --no-deps .device/wheels/*.whl
python - <<'PY'
import torch, transformers, bitsandbytes
print("torch", torch.__version__, "transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__)
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY

# Gemma 3's vocabulary, carried (make device-wheels): unpacked into this run's cache folder, checked (size, sha256)
export ONEVLM_CACHE_DIR=/tmp/onevlm-cache
mkdir -p "$ONEVLM_CACHE_DIR"
tar -xzf .device/vocabulary.tgz -C "$ONEVLM_CACHE_DIR" \
  && python -c "from onevlm.vlm.gemma3_vocabulary import require_vocabulary as r; print('vocabulary', r())" \
  || { echo "no verified Gemma 3 vocabulary in .device/vocabulary.tgz: run 'make device-wheels' here first"; exit 1; }

MODEL=/tmp/medgemma-4b-shape
time python -c "from onevlm.vlm.synthetic import build_synthetic_model as b; b('medgemma-4b-shape', '$MODEL', device='cuda', tokenizer='gemma3', vocabulary_cache='$ONEVLM_CACHE_DIR')" \
  || { echo "model build failed"; exit 1; }

bench() {  # name, seconds, router_bench arguments...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" python bench/router_bench.py --model "$MODEL" --device cuda --repeat 1 --json "$OUT/$name.json" "$@" \
    || echo "== $name: failed or cut off (exit $?)"
}
bench single_stream 150 --images 8 --naive-images 3 --batch 1 --engines naive,fast,graph --graph-compile cuda-graph
bench batched32 150 --images 64 --naive-images 3 --batch 32 --engines naive,fast,graph --graph-compile cuda-graph
bench nf4 120 --quantize nf4 --images 8 --naive-images 1 --batch 8 --engines naive,fast,graph --graph-compile cuda-graph
bench compiled_single_stream 200 --images 8 --naive-images 1 --batch 1 --engines naive,fast,graph \
  --graph-compile reduce-overhead

echo "== qlora"
timeout 150 python bench/qlora_bench.py --model "$MODEL" --device cuda --samples 256 --json "$OUT/qlora.json" \
  || echo "== qlora: failed or cut off (exit $?)"

python - "$OUT" <<'PY'
import json, os, sys, pathlib, time
import torch, transformers
try:
    import bitsandbytes
    bnb = bitsandbytes.__version__
except ImportError:
    bnb = None
# peak memory bandwidth (bytes/s) by GPU name; GPU_BANDWIDTH_TBS overrides
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
out = pathlib.Path(sys.argv[1])
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
bandwidth = (float(os.environ["GPU_BANDWIDTH_TBS"]) * 1e12 if os.environ.get("GPU_BANDWIDTH_TBS")
             else next((b for key, b in BANDWIDTH.items() if key in gpu), 4.8e12))
summary = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "torch": torch.__version__,
           "transformers": transformers.__version__, "bitsandbytes": bnb, "bandwidth_bytes_per_s": bandwidth,
           "steps": {}}
print(f"on {gpu}: torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb}; "
      f"floor = decode-step bytes / {bandwidth / 1e12:.2f} TB/s")
for name in ("single_stream", "batched32", "nf4", "compiled_single_stream"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name}: no result")
        summary["steps"][name] = None
        continue
    r = json.loads(path.read_text())
    floor = r["decode_step_bytes"] / bandwidth  # seconds: every weight a decode step reads, once (bench/decode_step.py)
    step_summary = {"tokenizer": r.get("tokenizer"), "vocabulary_rows": r.get("vocabulary_rows"),
                    "transformers": r.get("transformers"), "quantize": r["quantize"], "dtype": r["dtype"],
                    "decode_step_bytes": r["decode_step_bytes"], "floor_ms": round(1000 * floor, 3),
                    "naive_images_per_s": r["naive_images_per_s"], "load_seconds": r["load_seconds"]}
    line = [f"{name}: naive {r['naive_images_per_s']} img/s, load {r['load_seconds']} s, decode step reads "
            f"{r['decode_step_bytes'] / 1e9:.2f} GB ({r['output_layer_share_of_decode_step']:.1%} output layer, "
            f"{r['vocabulary_rows']:,} rows)"]
    for engine in ("fast", "graph"):
        if f"{engine}_images_per_s" not in r:
            continue
        step = r[f"{engine}_engine_stats"]["seconds_per_decode_step"]
        step_summary[engine] = {"images_per_s": r[f"{engine}_images_per_s"],
                                "ratio_over_naive": r[f"ratio_{engine}_over_naive"],
                                "same_answers": r[f"same_answers_{engine}"],
                                "max_p_difference": r.get(f"max_p_difference_{engine}"),
                                "decode_step_ms": round(1000 * step, 3), "share_of_floor": round(floor / step, 4)}
        line.append(f"{engine} {r[f'{engine}_images_per_s']} img/s (x{r[f'ratio_{engine}_over_naive']} naive, same answers "
                    f"{r[f'same_answers_{engine}']}, max p gap {r.get(f'max_p_difference_{engine}')}), decode step "
                    f"{1000 * step:.2f} ms vs floor {1000 * floor:.2f} ms ({floor / step:.1%} of floor)")
    if "graph_compile" in r:
        step_summary["graph_compile"] = r["graph_compile"]
        step_summary["graph_fallbacks"] = r["graph_fallbacks"]
        step_summary["graph_capture_failures"] = r["graph_capture_failures"]
        line.append(f"graph: {r['graph_compile']}, warm-up {r['warm_up_seconds'].get('graph')} s, "
                    f"fallbacks {r['graph_fallbacks']}, capture failures {r['graph_capture_failures']}")
    summary["steps"][name] = step_summary
    print("\n  ".join(line))
qlora = out / "qlora.json"
summary["qlora"] = json.loads(qlora.read_text()) if qlora.exists() else None
print("qlora:", qlora.read_text() if qlora.exists() else "no result")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
