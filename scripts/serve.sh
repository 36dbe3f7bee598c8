#!/usr/bin/env bash
# Quick start: install everything, then serve the default model (all-MiniLM-L6-v2) on
# 127.0.0.1:8000 with a broker, one worker and the gateway. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
BIN=.venv/bin
PORT=${DDML_PORT:-8000}
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped."
}
trap cleanup INT TERM EXIT
$BIN/ddml-broker --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556 & pids+=($!)
$BIN/ddml-worker --broker tcp://127.0.0.1:5556 --model minilm & pids+=($!)
$BIN/ddml-gateway --broker tcp://127.0.0.1:5555 --bind "127.0.0.1:$PORT" & pids+=($!)
echo "waiting for the model to load..."
for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then
    cat <<MSG

ddml is serving all-MiniLM-L6-v2 on http://127.0.0.1:$PORT. Try:

  curl -s -X POST http://127.0.0.1:$PORT/v1/models/minilm/predict \\
       -H 'Content-Type: application/json' -d '{"inputs": ["Hello, world!"]}'

Ctrl-C stops the broker, the worker and the gateway.
MSG
    wait -n "${pids[@]}" || true
    echo "a process exited (or Ctrl-C); stopping the rest" >&2
    exit 1
  fi
  sleep 0.5
done
echo "not ready after 120 s; see the logs above" >&2
exit 1
