#!/usr/bin/env bash
# The prepared device run for the lent H200 (device tool), about 10 minutes. From a session with a
# device lent, first here:  make device-wheels   (bitsandbytes + pydicom wheels into .device/; the
# GPU image has torch, transformers 5.17, pillow and pyyaml)
# then:  run(command="bash bench/gpu_check.sh", carry=[".device"], timeout_s=590)
# Results land in $OUT (json + log), written after each step so a cut-off run still reports; copy the
# figures into bench/RESULTS.md with the date, the machine and this command.
#
# Steps, most important first (each bounded by `timeout`, a failed step does not stop the others):
#   1. single stream: naive vs fast vs graph (CUDA-graph capture of the static decode step), batch 1
#   2. batch 32: the same three engines
#   3. NF4: one quantised load + route, the three engines
#   4. graph with torch.compile mode=reduce-overhead (inductor kernels + CUDA graphs), batch 1
#   5. QLoRA: notebook recipe vs ours (bench/qlora_bench.py)
# The model is MedGemma-4B-it's architecture with random weights and the subword tokenizer, so answers
# span several tokens as a real model's do.
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

MODEL=/tmp/medgemma-4b-shape
time python -c "from onevlm.vlm.synthetic import build_synthetic_model as b; b('medgemma-4b-shape', '$MODEL', device='cuda', tokenizer='subword')" \
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
import json, sys, pathlib
# decode floor: the weights streamed once per step at ~4.8 TB/s (H200 HBM3e peak)
out = pathlib.Path(sys.argv[1])
for name in ("single_stream", "batched32", "nf4", "compiled_single_stream"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name}: no result")
        continue
    r = json.loads(path.read_text())
    weights_gb = r["parameters"] * (0.5 if r["quantize"] == "nf4" else 2) / 1e9
    floor = weights_gb / 4800.0
    line = [f"{name}: naive {r['naive_images_per_s']} img/s, load {r['load_seconds']} s"]
    for engine in ("fast", "graph"):
        if f"{engine}_images_per_s" not in r:
            continue
        step = r[f"{engine}_engine_stats"]["seconds_per_decode_step"]
        line.append(f"{engine} {r[f'{engine}_images_per_s']} img/s (x{r[f'ratio_{engine}_over_naive']} naive, same answers "
                    f"{r[f'same_answers_{engine}']}), decode step {1000 * step:.2f} ms vs floor {1000 * floor:.2f} ms "
                    f"({floor / step:.1%} of floor)")
    if "graph_compile" in r:
        line.append(f"graph: {r['graph_compile']}, warm-up {r['warm_up_seconds'].get('graph')} s, "
                    f"fallbacks {r['graph_fallbacks']}, capture failures {r['graph_capture_failures']}")
    print("\n  ".join(line))
qlora = out / "qlora.json"
print("qlora:", qlora.read_text() if qlora.exists() else "no result")
PY
