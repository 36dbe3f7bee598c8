#!/usr/bin/env bash
# The GPU check (issue 4), for a lent device machine: one prepared run of at most 8 minutes.
#   bash bench/gpu_check.sh            # from the repository root, with .venv carried over
# It measures the in-process limit on cuda:0 (float16, batch sizes up to 256, padded and
# length-sorted) and ddml (gateway + broker + one worker on cuda:0, max batch 256; continuous
# batching, the default for the text models, holding up to 512 inputs) at concurrency 64 and 256
# with wrk, and bulk requests of 32 and 256 inputs, and prints bench.compare's table. Peers are
# not run here (so neither is the open loop, whose rates are shares of the best peer's). First,
# bench.unpadded: padded against unpadded passes on the GPU, in process (at most a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA in this torch'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }
# Passes without padding (--unpadded on; off by default on a GPU), in process, against padded ones.
timeout 60 "$PY" -m bench.unpadded --device cuda:0 --sizes 1,16,64,256 --passes 10 || true
export BENCH_DDML_WORKER_FLAGS="--device cuda:0 --max-batch-size 256 --max-inputs-held 512"
timeout 420 "$PY" -m bench.compare --systems ddml --workloads closed,bulk --concurrency 64,256 --seconds 20 \
    --limit-seconds 4 \
    --device cuda:0 --batch-sizes 1,16,64,128,256
