#!/usr/bin/env bash
# The prepared device run for the lent H200 (device tool), about 8 minutes. From a session with a
# device lent, first here:  make device-wheels   (bitsandbytes + pydicom wheels into .device/; the
# GPU image has torch, transformers 5.17, pillow and pyyaml)
# then:  run(command="bash bench/gpu_check.sh", carry=[".device"], timeout_s=590)
# Results land in $OUT (json + log); copy the figures into bench/RESULTS.md with the date.
set -euo pipefail
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
time python -c "from onevlm.vlm.synthetic import build_synthetic_model as b; b('medgemma-4b-shape', '$MODEL', device='cuda')"

# single stream: naive on 3 images, fast batch 1 on 8
python bench/router_bench.py --model "$MODEL" --device cuda --images 8 --naive-images 3 --batch 1 --repeat 1 \
  --json "$OUT/single_stream.json"
# batched: fast with 32 images per batch (naive on 3 images for the ratio)
python bench/router_bench.py --model "$MODEL" --device cuda --images 64 --naive-images 3 --batch 32 --repeat 1 \
  --json "$OUT/batched32.json"
# NF4: one quantised load + route (time to load is in the json)
python bench/router_bench.py --model "$MODEL" --device cuda --quantize nf4 --images 8 --naive-images 1 --batch 8 \
  --repeat 1 --json "$OUT/nf4.json"

python - "$OUT" <<'PY'
import json, sys, pathlib
# decode floor: bf16 weights streamed once per step at ~4.3 TB/s (H200 HBM3e)
out = pathlib.Path(sys.argv[1])
for name in ("single_stream", "batched32", "nf4"):
    r = json.loads((out / f"{name}.json").read_text())
    weights_gb = r["parameters"] * (0.5 if r["quantize"] == "nf4" else 2) / 1e9
    floor = weights_gb / 4300.0
    step = r["fast_engine_stats"]["seconds_per_decode_step"]
    print(f"{name}: fast {r['fast_images_per_s']} img/s, naive {r['naive_images_per_s']} img/s, "
          f"ratio {r['ratio_fast_over_naive']}x, same answers {r['same_answers']}, load {r['load_seconds']} s, "
          f"decode step {1000 * step:.1f} ms vs floor {1000 * floor:.2f} ms ({floor / step:.1%} of floor)")
PY
