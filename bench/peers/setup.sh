#!/usr/bin/env bash
# The peers for bench.compare, each in its own virtualenv under bench/.venvs, and wrk.
#   bash bench/peers/setup.sh
# torch is pinned to the local CPU wheel (torch==2.13.0) and installed first, so that no peer's
# dependencies pull a CUDA build; transformers is pinned to the version ddml's .venv has, so
# every system runs the same model code.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "run bash scripts/setup.sh first (ddml's .venv)"; exit 1; }
TRANSFORMERS=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")

make_venv() {
    local name=$1; shift
    [ -x "bench/.venvs/$name/bin/python" ] || "$PYTHON" -m venv "bench/.venvs/$name"
    "bench/.venvs/$name/bin/pip" install -q torch==2.13.0
    "bench/.venvs/$name/bin/pip" install -q "transformers==$TRANSFORMERS" numpy "$@"
    echo "bench/.venvs/$name: $("bench/.venvs/$name/bin/pip" list 2>/dev/null | grep -iE "^($1|service.streamer|mosec) " | tr -s ' ')"
}

make_venv mosec mosec
make_venv streamer service-streamer falcon gunicorn orjson

if ! command -v wrk >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get install -y wrk
fi
wrk --version 2>&1 | head -1 || true
