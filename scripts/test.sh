#!/usr/bin/env bash
# Run the whole test suite (unit, integration, e2e) after installing what it needs.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# KServe's own client runs in a venv of its own: the kserve package brings about 430 MB (FastAPI,
# pandas, the Kubernetes client), and its generated protobuf clashes with tritonclient's in one
# process. tests/e2e/test_grpc.py runs it through $KSERVE_PYTHON (about a minute to install, once).
kserve_spec="kserve>=0.21,<1"
if [ "$(cat .venv-kserve/.installed 2>/dev/null)" != "$kserve_spec" ]; then
  echo "test: installing $kserve_spec into .venv-kserve for its gRPC client test..." >&2
  "${PYTHON:-python3}" -m venv .venv-kserve
  .venv-kserve/bin/python -m pip install --quiet "$kserve_spec" 2>&1 | grep -v "is ignored" >&2 || true
  .venv-kserve/bin/python -c "import kserve" && echo "$kserve_spec" > .venv-kserve/.installed
fi
export KSERVE_PYTHON="${KSERVE_PYTHON:-$PWD/.venv-kserve/bin/python}"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
