"""docs/openapi.yaml against a live gateway, with schemathesis generating the requests."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import REPO, http_ready, wait_until

pytestmark = pytest.mark.e2e


def test_schemathesis_finds_the_gateway_true_to_its_openapi(stack, tmp_path):
    stack.start_broker()
    stack.start_worker("--model", "echo", "--handler", "tests.handlers:PlainEcho")
    # The management writes need an admin key that schemathesis is not given: each of its calls is refused
    # (401 without a bearer token, 403 with another), which its auth checks verify, and none changes what
    # the workers hold. (Without --admin-key-file every write would be 403, where a missing token must be 401.)
    admin_keys = tmp_path / "admin.keys"
    admin_keys.write_text("an-admin-key-schemathesis-never-sees\n")
    _, url = stack.start_gateway("--workers", "1", "--threads", "8", "--admin-key-file", str(admin_keys))

    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    # not_a_server_error would flag the documented 504 for a deadline of 5e-324 ms; we check
    # for real server errors (500s) ourselves, from the gateway's own metrics, below.
    # /v1/embeddings and /v1/rerank need a text model of their kind, and echo is neither: a
    # schema-valid request naming it gets the documented 400 that says so. A model no worker serves is a
    # 404, or the documented 503 with Retry-After while the broker may still hear from rejoining workers
    # (its first expiry window) or has served that name before (CI once got 503 for model "0": seed 1).
    config = tmp_path / "schemathesis.toml"
    config.write_text('[[operations]]\ninclude-path-regex = "^/v1/(embeddings|rerank)$"\n'
                      '[operations.checks.positive_data_acceptance]\n'
                      'expected-statuses = ["2xx", "400", "401", "403", "404", "503"]\n')
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         str(REPO / "docs" / "openapi.yaml"), "--url", url,
         "--checks", "all", "--exclude-checks", "not_a_server_error", "--request-timeout", "30",
         "--max-examples", "60", "--seed", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    page = requests.get(f"{url}/metrics", timeout=5).text
    statuses = {s.labels["status"]: s.value for f in text_string_to_metric_families(page) for s in f.samples
                if s.name == "ddml_http_requests_total"}
    assert sum(statuses.values()) > 100, "schemathesis should have sent many requests"
    assert statuses.get("500", 0) == 0, statuses
