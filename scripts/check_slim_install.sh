#!/usr/bin/env bash
# Install ddml without extras, as a broker or gateway host (and the Dockerfile's slim target) does,
# into a throwaway virtualenv, and check that the broker, the gateway and ddml-status start
# from it without torch. Prints the environment's installed size. CI runs it (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=$(mktemp -d "${TMPDIR:-/tmp}/ddml-slim.XXXXXX")
source=$(mktemp -d "${TMPDIR:-/tmp}/ddml-slim-src.XXXXXX")
trap 'rm -rf "$venv" "$source"' EXIT
# What the Dockerfile copies, so that no build/ left in this checkout slips into the wheel.
cp -r pyproject.toml README.md ddml_common broker worker gateway "$source"/
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "$source" 2>&1 | grep -v "is ignored" >&2 || true
"$venv/bin/python" - <<'PY'
import importlib.util, sys
for worker_only in ("torch", "transformers", "sentence_transformers", "grpc", "opentelemetry"):
    if importlib.util.find_spec(worker_only) is not None:
        sys.exit(f"check_slim_install: `pip install .` brought {worker_only}")
import broker.broker, broker.health, gateway.gunicorn_conf, gateway.status_cli  # noqa: E401,F401
import gateway.app
gateway.app.get_app()  # what each gunicorn process builds; it connects lazily
PY
for command in ddml-broker ddml-gateway ddml-status ddml-keys; do
  "$venv/bin/$command" --version >/dev/null
done
# The extras' flags refuse in one line, with the extra to install, before gunicorn starts.
for flag in "--grpc-bind 127.0.0.1:0:grpc" "--otlp-endpoint http://127.0.0.1:4318:otel"; do
  set +e; message=$("$venv/bin/ddml-gateway" ${flag%:*} 2>&1); status=$?; set -e
  if [ "$status" != 2 ] || ! grep -q "pip install 'ddml\[${flag##*:}\]'" <<<"$message"; then
    echo "check_slim_install: ddml-gateway ${flag%:*} without its extra: status $status, $message" >&2; exit 1
  fi
done
echo "check_slim_install: broker, gateway and status run without torch; installed size $(du -sh "$venv" | cut -f1)"
