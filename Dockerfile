# Two images from one file; the command picks the role.
#
#   slim    ddml-broker, ddml-gateway, ddml-status: no torch (`pip install ddml`)
#   worker  ddml-worker with torch and transformers (`ddml[worker,minilm]`), CUDA or CPU torch
#
#   docker build --target slim   -t ddml:0.1.0-slim .
#   docker build --target worker -t ddml-worker:0.1.0-cuda .   # PyPI's torch is the CUDA build (GPU hosts)
#   docker build --target worker -t ddml-worker:0.1.0-cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Each has a HEALTHCHECK. The slim image's asks DDML_HEALTHCHECK_URL: the gateway's /healthz by
# default; for a broker, run it with --metrics-port 9100 and DDML_HEALTHCHECK_URL=http://127.0.0.1:9100/healthz
# (the loop's own liveness). The worker image's checks that the worker touched its health file
# (DDML_WORKER_HEALTH_FILE) within the last 30 s, which it does every heartbeat while the broker
# answers and no batch is stuck.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --create-home ddml
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ddml_common ./ddml_common
COPY broker ./broker
COPY worker ./worker
COPY gateway ./gateway


FROM base AS worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
# torch first, from the index chosen above, so that the [worker] extra's torch>=2.1 is already met.
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}" \
 && pip install '.[worker,minilm]'
ENV HF_HUB_OFFLINE=1 DDML_WORKER_HEALTH_FILE=/tmp/ddml-worker-healthy
USER 10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, sys, time; sys.exit(time.time() - os.path.getmtime(os.environ['DDML_WORKER_HEALTH_FILE']) > 30)"]
CMD ["ddml-worker", "--broker", "tcp://ddml-broker:5556", "--model", "minilm"]


# Last, so that a plain `docker build .` makes the small image.
FROM base AS slim
RUN pip install . && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
ENV DDML_HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
USER 10001
EXPOSE 5555 5556 8000 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['DDML_HEALTHCHECK_URL'], timeout=2)"]
CMD ["ddml-gateway", "--broker", "tcp://ddml-broker:5555", "--bind", "0.0.0.0:8000"]
