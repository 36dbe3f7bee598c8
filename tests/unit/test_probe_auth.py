"""--api-key-file guards the API, not the probes: Kubernetes and Prometheus send no token by default."""

from __future__ import annotations

import falcon.testing
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.fakes import Awaitable, FakeBrokerClient

TOKEN = {"Authorization": "Bearer secret-one"}


@pytest.fixture
def tokens(tmp_path) -> str:
    path = tmp_path / "tokens"
    path.write_text("secret-one\n")
    return str(path)


def client(**config) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Awaitable(FakeBrokerClient()), GatewayConfig(**config)))


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"])
def test_probes_and_metrics_answer_without_a_token(tokens, path):
    assert client(api_key_file=tokens).simulate_get(path).status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/v1/status", "/v2/models/echo"])
def test_the_api_still_needs_a_token(tokens, path):
    app = client(api_key_file=tokens)
    assert app.simulate_get(path).status_code == 401
    assert app.simulate_get(path, headers=TOKEN).status_code != 401


def test_protect_metrics_puts_metrics_behind_the_token_but_never_the_probes(tokens):
    app = client(api_key_file=tokens, protect_metrics=True)
    assert app.simulate_get("/metrics").status_code == 401
    assert app.simulate_get("/metrics", headers=TOKEN).status_code == 200
    assert app.simulate_get("/readyz").status_code == app.simulate_get("/healthz").status_code == 200
