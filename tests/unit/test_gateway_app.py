"""The Falcon app with a FakeBrokerClient: validation, media types, and the ErrorCode -> HTTP table."""

import falcon.testing
import msgpack
import orjson
import pytest

from ddml_common.protocol import ErrorCode
from gateway.app import create_app
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from gateway.errors import HTTP_STATUS_BY_CODE
from tests.fakes import FakeBrokerClient

JSON = {"Content-Type": "application/json"}


def client(broker=None, **config) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(broker or FakeBrokerClient(), GatewayConfig(**config)))


def test_predict_returns_outputs_in_order_as_json():
    response = client().simulate_post("/v1/models/echo/predict", body='{"inputs": ["a", 2, {"c": 3}]}', headers=JSON)
    assert response.status_code == 200
    assert response.json == {"model": "echo", "outputs": ["a", 2, {"c": 3}]}


def test_predict_speaks_msgpack_both_ways():
    body = msgpack.packb({"inputs": ["a", "b"]})
    response = client().simulate_post(
        "/v1/models/echo/predict", body=body,
        headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(response.content) == {"model": "echo", "outputs": ["a", "b"]}


def test_timeout_and_priority_reach_the_broker():
    broker = FakeBrokerClient()
    body = orjson.dumps({"inputs": ["a"], "timeout_ms": 250, "priority": 3})
    client(broker).simulate_post("/v1/models/echo/predict", body=body, headers=JSON)
    assert broker.calls == [("echo", ["a"], 0.25, 3)]


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b"{not json", JSON, 400, "malformed JSON"),
        (b"\xc1", {"Content-Type": "application/msgpack"}, 400, "malformed msgpack"),
        (b'["a"]', JSON, 400, "body must be an object"),
        (b'{"inputs": "a"}', JSON, 400, "'inputs' must be a list"),
        (b'{"inputs": []}', JSON, 400, "must not be empty"),
        (b'{"inputs": ["a"], "timeout_ms": -1}', JSON, 400, "'timeout_ms' must be a positive number"),
        (b'{"inputs": ["a"], "priority": "high"}', JSON, 400, "'priority' must be an integer"),
        (b'{"inputs": [1, 2, 3, 4, 5, 6]}', JSON, 400, "6 inputs exceed the limit of 5"),
        (b'{"inputs": ["' + b"x" * 50 + b'"]}', JSON, 400, "over the limit of 40"),
        (b"x" * 5000, JSON, 413, "exceeds 4096"),
        (b"inputs=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "not supported"),
    ],
)
def test_bad_input_gets_a_4xx_that_says_what_is_wrong(body, headers, status, message):
    response = client(max_inputs=5, max_input_chars=40, max_body_bytes=4096).simulate_post(
        "/v1/models/echo/predict", body=body, headers=headers)
    assert response.status_code == status
    assert message in response.json["error"]["message"]
    assert response.json["error"]["code"]


@pytest.mark.parametrize("code", list(HTTP_STATUS_BY_CODE))
def test_every_error_code_maps_to_its_status_with_a_json_body(code):
    broker = FakeBrokerClient(error=BrokerError(code, "why", retry_after_s=2.5))
    response = client(broker).simulate_post("/v1/models/echo/predict", body='{"inputs": ["a"]}', headers=JSON)
    assert response.status_code == HTTP_STATUS_BY_CODE[code]
    assert response.json == {"error": {"code": code.value, "message": "why"}}
    if response.status_code == 503:
        assert response.headers["retry-after"] == "3"


def test_error_table_has_the_documented_statuses():
    assert HTTP_STATUS_BY_CODE[ErrorCode.BAD_REQUEST] == 400
    assert HTTP_STATUS_BY_CODE[ErrorCode.NO_SUCH_MODEL] == 404
    assert HTTP_STATUS_BY_CODE[ErrorCode.PAYLOAD_TOO_LARGE] == 413
    assert HTTP_STATUS_BY_CODE[ErrorCode.OVERLOADED] == 503
    assert HTTP_STATUS_BY_CODE[ErrorCode.TIMEOUT] == 504
    assert HTTP_STATUS_BY_CODE[ErrorCode.MODEL_ERROR] == 500
    assert set(HTTP_STATUS_BY_CODE) == set(ErrorCode)


def test_unknown_route_is_a_json_404():
    response = client().simulate_get("/nope")
    assert response.status_code == 404 and response.json["error"]["code"] == "NOT_FOUND"


def test_health_ready_and_models():
    assert client().simulate_get("/healthz").json == {"status": "ok"}
    assert client().simulate_get("/readyz").status_code == 200
    assert client(FakeBrokerClient(workers=[])).simulate_get("/readyz").status_code == 503
    unreachable = FakeBrokerClient(error=BrokerError(ErrorCode.UNAVAILABLE, "down"))
    assert client(unreachable).simulate_get("/readyz").status_code == 503
    assert client(unreachable).simulate_get("/healthz").status_code == 200
    models = client().simulate_get("/v1/models").json["models"]
    assert models[0]["name"] == "echo" and models[0]["ready"] and models[0]["workers"][0]["device"] == "cpu"


def test_bearer_auth_guards_everything_but_healthz(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nsecret-one\n\nsecret-two\n")
    app = client(api_key_file=str(tokens))
    body = '{"inputs": ["a"]}'
    missing = app.simulate_post("/v1/models/echo/predict", body=body, headers=JSON)
    wrong = app.simulate_post("/v1/models/echo/predict", body=body,
                              headers={**JSON, "Authorization": "Bearer secret-three"})
    right = app.simulate_post("/v1/models/echo/predict", body=body,
                              headers={**JSON, "Authorization": "Bearer secret-two"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json["error"]["code"] == "UNAUTHORIZED"
    assert app.simulate_get("/healthz").status_code == 200
    assert app.simulate_get("/v1/models").status_code == 401


def test_config_file_then_env_then_flags(tmp_path, monkeypatch):
    from broker.__main__ import build_parser

    config = tmp_path / "ddml.toml"
    config.write_text('[broker]\nmax-queue = 7\nliveness = 9\nmax_wait_ms = 2.5\n[worker]\nmodel = "x"\n')
    monkeypatch.setenv("DDML_LIVENESS", "4")
    args = build_parser().parse_args(["--config", str(config), "--max-wait-ms", "1"])
    assert (args.max_queue, args.liveness, args.max_wait_ms) == (7, 4, 1.0)  # file < env < flag
    config.write_text("[broker]\nno-such-flag = 1\n")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config", str(config)])


def test_example_config_is_valid_for_every_command(monkeypatch):
    from broker.__main__ import build_parser as broker_parser
    from gateway.__main__ import build_parser as gateway_parser
    from gateway.status_cli import build_parser as status_parser
    from tests.processes import REPO
    from worker.__main__ import build_parser as worker_parser

    example = str(REPO / "ddml.example.toml")
    assert broker_parser().parse_args(["--config", example]).metrics_port == 9100
    assert worker_parser().parse_args(["--config", example]).model == "minilm"
    assert gateway_parser().parse_args(["--config", example]).threads == 64
    assert status_parser().parse_args(["--config", example]).broker == "tcp://127.0.0.1:5555"


def test_json_log_lines_carry_the_ids():
    import json
    import logging

    from ddml_common.cli import JsonFormatter

    record = logging.LogRecord("broker.broker", logging.WARNING, __file__, 1, "worker %s lost", ("ab",), None)
    record.worker_id, record.batch_id = "ab", 7
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "worker ab lost" and line["worker_id"] == "ab" and line["batch_id"] == 7
