# One image for all three roles; the command chooses: ddml-broker, ddml-worker or ddml-gateway.
#   docker build -t ddml:0.1.0 .                                   # CUDA build of torch (GPU workers)
#   docker build -t ddml:0.1.0-cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1

# torch first, from the index chosen above, so the project's `torch>=2.1` is already satisfied.
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY worker ./worker
COPY gateway ./gateway
RUN pip install . && useradd --uid 10001 --create-home ddml
USER 10001

EXPOSE 5555 5556 8000 9100
CMD ["ddml-gateway", "--broker", "tcp://ddml-broker:5555", "--bind", "0.0.0.0:8000"]
