# onevlm model-card router as a MONAI Deploy application (embedded backend, CPU only).
# Research use only: not for clinical use.
#
#   docker build -t onevlm-router .
#   docker run --rm -v "$PWD/dicom_samples:/var/holoscan/input:ro" -v "$PWD/out:/var/holoscan/output" onevlm-router
#
# ONEVLM_CARDS / ONEVLM_CUTOFFS / ONEVLM_CALIBRATION may be set at run time (-e) to use other cards, cutoffs
# or the site's calibration (or mount calibration.json in the -m folder).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOLOSCAN_INPUT_PATH=/var/holoscan/input \
    HOLOSCAN_OUTPUT_PATH=/var/holoscan/output \
    ONEVLM_CARDS=/opt/onevlm/model_cards \
    ONEVLM_CACHE_DIR=/opt/onevlm/cache

WORKDIR /opt/onevlm

# The CPU torch wheel first, so `pip install .` does not pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY onevlm/ onevlm/
RUN pip install .

# The sentence model's ONNX export, made once at build time (the container's file system may be read-only).
RUN python -c "from onevlm.backends.embedded.text_encoder import TextEncoder; TextEncoder()"

COPY model_cards/ model_cards/
COPY operators/ operators/
COPY apps/ apps/
# MAP manifests (hand-written to the MAP spec: see deploy/README.md) and the app description
COPY deploy/map/app.json deploy/map/pkg.json /etc/holoscan/
COPY app.yaml /var/holoscan/app.yaml

RUN mkdir -p /var/holoscan/input /var/holoscan/output

# holoscan warns about a small stack; `docker run --ulimit stack=33554432` silences it.
ENTRYPOINT ["python", "-m", "apps.router_app", "-i", "/var/holoscan/input", "-o", "/var/holoscan/output"]
