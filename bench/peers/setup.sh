#!/usr/bin/env bash
# The peers for bench.compare, each in its own virtualenv under bench/.venvs, and wrk.
#   bash bench/peers/setup.sh
# torch is pinned to the local CPU wheel (torch==2.13.0), installed first and named again in
# every later install, so that no peer's dependencies pull a CUDA build or replace it;
# transformers is pinned to the version ddml's .venv has, so every system runs the same model
# code, except for infinity-emb, whose sentence-transformers<4 needs transformers<5.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "run bash scripts/setup.sh first (ddml's .venv)"; exit 1; }
TRANSFORMERS=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
TORCH=torch==2.13.0

make_venv() {  # name, the peer's package, then anything else it needs
    local name=$1 package=$2; shift
    local pip="bench/.venvs/$name/bin/pip"
    [ -x "bench/.venvs/$name/bin/python" ] || "$PYTHON" -m venv "bench/.venvs/$name"
    "$pip" install -q "$TORCH"
    "$pip" install -q "$TORCH" "$@"
    local torch_now shown=${package%%[[=]*}
    shown=${shown//[-_]/[-_]}
    torch_now=$("$pip" list 2>/dev/null | grep -iE "^torch " | tr -s ' ')
    case "$torch_now" in
        "torch 2.13.0"*) ;;
        *) echo "bench/.venvs/$name: torch was replaced ($torch_now)"; exit 1 ;;
    esac
    echo "bench/.venvs/$name: $("$pip" list 2>/dev/null | grep -iE "^($shown|transformers|torch) " | tr -s ' ' | paste -sd, -)"
}

make_venv mosec mosec "transformers==$TRANSFORMERS" numpy
make_venv streamer service-streamer "transformers==$TRANSFORMERS" numpy falcon gunicorn orjson
make_venv infinity "infinity-emb[server,torch]==0.0.78"

if ! command -v wrk >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get install -y wrk
fi
wrk --version 2>&1 | head -1 || true
