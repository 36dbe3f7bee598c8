"""The management API's refusals leave through the one error table (gateway/errors.py) with a named code,
in the shape of their surface: OpenAI's on /v1, KServe v2's `{"error": "..."}` on /v2/repository."""

import falcon.testing
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import HttpError, _falcon_http_error, server_refusal
from tests.fakes import Awaitable, FakeBrokerClient

ADMIN = {"Authorization": "Bearer admin-token", "Content-Type": "application/json"}


@pytest.fixture
def app(tmp_path) -> falcon.testing.TestClient:
    keys = tmp_path / "admin.keys"
    keys.write_text("admin-token\n")
    # FakeBrokerClient's one worker is a fixed worker (started with --model echo): no pool worker lists echo.
    return falcon.testing.TestClient(create_app(Awaitable(FakeBrokerClient()), GatewayConfig(admin_key_file=str(keys))))


def test_scaling_a_model_only_fixed_workers_serve_is_a_409_named_conflict(app):
    response = app.simulate_put("/v1/models/echo/replicas", body='{"max": 2}', headers=ADMIN)
    assert response.status_code == 409, response.text
    error = response.json["error"]
    assert error["code"] == "CONFLICT" and "fixed workers" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_unloading_a_model_only_fixed_workers_serve_is_a_409_in_kserves_shape(app):
    response = app.simulate_post("/v2/repository/models/echo/unload", headers=ADMIN)
    assert response.status_code == 409, response.text
    assert set(response.json) == {"error"} and "fixed workers" in response.json["error"]


def test_a_409_from_falcon_or_the_server_carries_the_conflict_code_not_a_made_up_one():
    assert _falcon_http_error(falcon.HTTPConflict(description="taken")) == HttpError(409, "CONFLICT", "taken",
                                                                                      from_gateway=True)
    assert b'"code":"CONFLICT"' in server_refusal(409, "Conflict", "taken")


@pytest.mark.parametrize("method, path", [("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/echo/load"),
                                          ("POST", "/v2/repository/models/echo/unload")])
def test_an_error_raised_before_a_repository_route_runs_is_in_kserves_shape_too(app, method, path):
    """Found by schemathesis (tests/e2e/test_openapi.py): the request-id middleware's 400 on /v2/repository
    came in OpenAI's shape, the routes' own errors in KServe v2's."""
    response = app.simulate_request(method, path, headers={**ADMIN, "X-Request-ID": ""})
    assert response.status_code == 400, response.text
    assert set(response.json) == {"error"} and "X-Request-ID" in response.json["error"]
    wrong_method = app.simulate_request("DELETE", path)
    assert wrong_method.status_code == 405 and isinstance(wrong_method.json["error"], str), wrong_method.text
