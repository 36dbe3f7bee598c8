"""The Kubernetes manifests validate against a pinned Kubernetes version, strictly."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.processes import REPO

KUBERNETES_VERSION = "1.31.0"
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))


def test_manifests_validate_strictly_against_a_pinned_kubernetes():
    assert MANIFESTS
    run = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
         *map(str, MANIFESTS)],
        capture_output=True, text=True, timeout=120,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "INFO" in run.stdout and "ERROR" not in run.stdout


def test_workers_ask_for_a_gpu_and_every_container_has_probes_and_requests():
    documents = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    assert set(deployments) == {"ddml-broker", "ddml-gateway", "ddml-worker"}
    worker = deployments["ddml-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for deployment in deployments.values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"] and container["resources"]["requests"]
        assert container["command"][0] == deployment["metadata"]["name"]  # one image, role by command
    gateway = deployments["ddml-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert any(d["kind"] == "HorizontalPodAutoscaler" for d in documents)
