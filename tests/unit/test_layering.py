"""The package boundaries the code promises: workers and gateways never load the broker."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("entry", ["worker.__main__", "worker.connection", "worker.loop", "gateway.app",
                                   "gateway.__main__", "gateway.status_cli", "gateway.gunicorn_conf"])
def test_worker_and_gateway_processes_never_import_the_broker(entry):
    code = (f"import sys, importlib; importlib.import_module({entry!r}); "
            "print(sorted(m for m in sys.modules if m == 'broker' or m.startswith('broker.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{entry} loads {result.stdout.strip()}"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", ["core", "batching", "workers", "config"])
def test_the_broker_decisions_import_neither_zmq_nor_time(module):
    assert not _imports(REPO / "broker" / f"{module}.py") & {"zmq", "time", "socket", "threading", "random"}


@pytest.mark.parametrize("module", ["broker.core", "broker.batching", "broker.workers", "broker.stats"])
def test_the_broker_decisions_load_no_metrics_library_even_through_other_modules(module):
    # In a fresh interpreter, so that whatever the import reaches, at any depth, is in sys.modules.
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prometheus_client', 'zmq') "
            "or m in ('broker.metrics', 'broker.broker', 'broker.health')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{module} loads {result.stdout.strip()}"


def test_ddml_common_depends_on_no_role():
    for path in (REPO / "ddml_common").glob("*.py"):
        assert not _imports(path) & {"broker", "worker", "gateway"}, path.name
