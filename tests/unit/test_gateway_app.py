"""The Falcon app with a FakeBrokerClient: validation, media types, and the ErrorCode -> HTTP table."""

import asyncio
import json
import struct

import falcon.asgi
import falcon.testing
import msgpack
import orjson
import pytest

from ddml_common.protocol import ErrorCode
from gateway.app import create_app
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from gateway.errors import HTTP_STATUS_BY_CODE, HttpError, errors_as, retry_after
from tests.fakes import Awaitable, FakeBrokerClient

JSON = {"Content-Type": "application/json"}


def client(broker=None, **config) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Awaitable(broker or FakeBrokerClient()), GatewayConfig(**config)))


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
        (b'{"inputs": ["a"], "timeout_ms": -1}', JSON, 400, "'timeout_ms' must be a positive finite number"),
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
    status = HTTP_STATUS_BY_CODE[code]
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    # OpenAI's error shape, which the ddml code and message were always part of.
    assert response.json == {"error": {"message": "why", "type": kind, "param": None, "code": code.value}}
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


def test_json_log_lines_carry_the_ids():
    import json
    import logging

    from ddml_common.cli import JsonFormatter

    record = logging.LogRecord("broker.broker", logging.WARNING, __file__, 1, "worker %s lost", ("ab",), None)
    record.worker_id, record.batch_id = "ab", 7
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "worker ab lost" and line["worker_id"] == "ab" and line["batch_id"] == 7


def nested(depth: int, leaf=0):
    """`leaf` inside `depth` arrays."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def predict(app, body: bytes, content_type: str = "application/json"):
    return app.simulate_post("/v1/models/echo/predict", body=body, headers={"Content-Type": content_type})


def test_inputs_may_nest_up_to_the_bound_and_come_back_whole():
    from gateway.config import MAX_NESTING_DEPTH

    value = nested(MAX_NESTING_DEPTH - 2, "x")  # the body and 'inputs' are two levels
    for body, content_type in [(orjson.dumps({"inputs": [value]}), "application/json"),
                               (msgpack.packb({"inputs": [value]}), "application/msgpack")]:
        response = predict(client(), body, content_type)
        assert response.status_code == 200, response.text
        assert response.json["outputs"] == [value]


@pytest.mark.parametrize("depth", [31, 300, 1100, 100_000])  # + body + 'inputs' > 32; orjson's 1024; msgpack's stack
@pytest.mark.parametrize("content_type", ["application/json", "application/msgpack"])
def test_a_body_nested_deeper_than_the_bound_is_a_400_not_a_500(depth, content_type):
    if content_type == "application/json":
        body = b'{"inputs": [' + b"[" * depth + b"]" * depth + b"]}"
    else:
        body = b"\x81\xa6inputs\x91" + b"\x91" * (depth - 1) + b"\x90"
    broker = FakeBrokerClient()
    response = predict(client(broker), body, content_type)
    assert response.status_code == 400, response.text
    assert response.json["error"]["code"] == "BAD_REQUEST"
    message = response.json["error"]["message"]
    assert "more than 32 levels deep" in message or "depth limit" in message or "StackError" in message
    assert broker.calls == []


@pytest.mark.parametrize("inputs, where", [
    ([["ok", "x" * 41]], "inputs[0][1]"),
    ([{"text": "x" * 41}], "inputs[0]['text']"),
    ([1, {"a": [{"b": "x" * 41}]}], "inputs[1]['a'][0]['b']"),
    ([{"x" * 41: 1}], "a key in inputs[0]"),
    (["ok"] * 20 + ["x" * 41], "inputs[20]"),
])
@pytest.mark.parametrize("content_type", ["application/json", "application/msgpack"])
def test_the_string_limit_holds_for_strings_nested_anywhere_in_the_inputs(inputs, where, content_type):
    body = orjson.dumps({"inputs": inputs}) if content_type == "application/json" else msgpack.packb({"inputs": inputs})
    response = predict(client(max_input_chars=40), body, content_type)
    assert response.status_code == 400
    message = response.json["error"]["message"]
    assert message.startswith(where) and "41 characters, over the limit of 40 (--max-input-chars)" in message
    assert predict(client(max_input_chars=41), body, content_type).status_code == 200


def test_priority_must_be_within_the_protocol_bounds():
    from ddml_common.protocol import MAX_PRIORITY, MIN_PRIORITY

    broker = FakeBrokerClient()
    for priority in (MIN_PRIORITY, MAX_PRIORITY):
        assert predict(client(broker), orjson.dumps({"inputs": ["a"], "priority": priority})).status_code == 200
    assert [call[3] for call in broker.calls] == [MIN_PRIORITY, MAX_PRIORITY]
    for priority in (MIN_PRIORITY - 1, MAX_PRIORITY + 1, 2**63 - 1, -(2**63)):
        response = predict(client(broker), orjson.dumps({"inputs": ["a"], "priority": priority}))
        assert response.status_code == 400
        assert f"from {MIN_PRIORITY} to {MAX_PRIORITY}" in response.json["error"]["message"]
    assert len(broker.calls) == 2


class V2Broker(FakeBrokerClient):
    """A broker whose echo model declares one BYTES input, as a worker's READY would."""

    def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
        status = super().status(timeout_s)
        status["models"]["echo"].update(max_batch_size=8, metadata={  # as the real echo declares it: free-form
            "free_form": True, "inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [-1, 1]}],
            "outputs": [{"name": "OUTPUT", "datatype": "BYTES", "shape": [-1, 1]}],
        })
        return status


def infer(app, header: dict | bytes, binary: bytes = b""):
    head = header if isinstance(header, bytes) else orjson.dumps(header)
    extra = {"Inference-Header-Content-Length": str(len(head))} if binary else {}
    return app.simulate_post("/v2/models/echo/infer", body=head + binary, headers={**JSON, **extra})


def test_v2_header_nested_deeper_than_the_bound_is_a_400():
    app = client(V2Broker())
    ok = {"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1] * 29, "data": nested(29)}]}
    assert infer(app, ok).status_code == 200  # the header, 'inputs' and the tensor are three levels
    for depth in (30, 300, 2000):
        deep = b'{"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1], "data": ' + \
            b"[" * depth + b"0" + b"]" * depth + b"}]}"
        response = infer(app, deep)
        assert response.status_code == 400, response.text
        assert "levels deep" in response.json["error"] or "depth limit" in response.json["error"]
    many_dims = {"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1] * 40, "parameters": {
        "binary_data_size": 4}}]}
    response = infer(app, many_dims, b"\0\0\0\0")
    assert response.status_code == 400 and "40 dimensions, over the limit of 32" in response.json["error"]


def test_v2_string_limit_holds_for_every_bytes_element_json_or_binary():
    app = client(V2Broker(), max_input_chars=40)
    two_per_row = {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 2], "data": ["ok", "x" * 41]}]}
    response = infer(app, two_per_row)
    assert response.status_code == 400 and "over the limit of 40" in response.json["error"]
    binary = b"".join(struct.pack("<I", len(s)) + s for s in (b"ok", b"x" * 41))
    header = {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 2],
                          "parameters": {"binary_data_size": len(binary)}}]}
    response = infer(app, header, binary)
    assert response.status_code == 400
    assert "BYTES element of 41 characters, over the limit of 40" in response.json["error"]
    assert infer(client(V2Broker(), max_input_chars=41), header, binary).status_code == 200


@pytest.mark.parametrize("triton_priority", [0, 1, 2, 9_999, 10_000, 10**6, 2**63 - 1])
def test_v2_priority_maps_into_the_protocol_bounds(triton_priority):
    from ddml_common.protocol import MAX_PRIORITY, MIN_PRIORITY

    broker = V2Broker()
    header = {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}],
              "parameters": {"priority": triton_priority}}
    assert infer(client(broker), header).status_code == 200
    [(_, _, _, priority)] = broker.calls
    assert MIN_PRIORITY <= priority <= MAX_PRIORITY
    assert (priority == 0) == (triton_priority == 0)


def test_http_metric_labels_stay_few_whatever_methods_and_paths_clients_send():
    import random
    import string

    from gateway.metrics import HTTP_REQUESTS, METHODS

    app = create_app(Awaitable(FakeBrokerClient()), GatewayConfig())
    rng = random.Random(7)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def call_all():
        for _ in range(200):
            method = "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 12)))
            path = rng.choice(["/healthz", "/v1/models/m%d/predict" % rng.randrange(10**6),
                               "/x%d" % rng.randrange(10**6)])
            # Called as ASGI directly: the test client's validator refuses unknown methods itself.
            await app(falcon.testing.create_scope(path, method=method), receive, send)

    asyncio.run(call_all())
    labels = {(s.labels["route"], s.labels["method"]) for family in HTTP_REQUESTS.collect() for s in family.samples}
    assert {method for _, method in labels} <= METHODS | {"other"}
    assert not [route for route, _ in labels if route.startswith("/x") or "/models/m" in route]  # templates only
    assert ("unmatched", "other") in labels and ("/v1/models/{model}/predict", "other") in labels


def test_echo_test_directives_are_off_unless_the_worker_flag_or_env_turns_them_on(monkeypatch):
    from worker.__main__ import build_parser as worker_parser
    from worker.__main__ import config_from_args
    from worker.models import InputError, create_handler

    def echo_for(argv: list[str]):
        config = config_from_args(worker_parser().parse_args(["--model", "echo", *argv]))
        return create_handler(config.model, "cpu", echo_test_directives=config.echo_test_directives)

    poison = [{"exit": 3}, {"raise": "boom"}, {"sleep_s": 3600}]
    assert echo_for([]).predict(poison) == poison  # echoed: no exit, no raise, no sleep
    [failed] = echo_for(["--echo-test-directives"]).predict([{"invalid": "why"}])
    assert isinstance(failed, InputError)
    monkeypatch.setenv("DDML_ECHO_TEST_DIRECTIVES", "1")
    with pytest.raises(RuntimeError, match="told to raise"):
        echo_for([]).predict([{"raise": "boom"}])


# -- one error path for every surface ------------------------------------------------------------

V2_INFER = {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]}


@pytest.mark.parametrize("code", list(HTTP_STATUS_BY_CODE))
def test_v2_answers_every_error_code_with_the_same_status_and_retry_after_as_v1(code):
    error = BrokerError(code, "why", retry_after_s=2.5)
    v1 = client(FakeBrokerClient(error=error)).simulate_post("/v1/models/echo/predict", body='{"inputs": ["a"]}',
                                                             headers=JSON)
    v2 = infer(client(V2Broker(error=error)), V2_INFER)
    assert v2.status_code == v1.status_code == HTTP_STATUS_BY_CODE[code]
    assert v2.json == {"error": f"{code.value}: why"}  # v2's shape: the broker's code before its message
    assert v2.headers.get("retry-after") == v1.headers.get("retry-after")
    assert v2.headers.get("retry-after") == ("3" if v2.status_code == 503 else None)  # 2.5 s, rounded up


def test_errors_the_gateway_finds_itself_keep_their_status_and_a_message_that_stands_alone_on_v2():
    app = client(V2Broker())
    unknown = app.simulate_post("/v2/models/nope/infer", body=orjson.dumps(V2_INFER), headers=JSON)
    assert unknown.status_code == 404 and unknown.json == {"error": "no live worker serves model 'nope'"}
    encoded = app.simulate_post("/v2/models/echo/infer", body=b"x", headers={**JSON, "Content-Encoding": "br"})
    assert encoded.status_code == 415
    assert encoded.json == {"error": "Content-Encoding 'br' is not supported (gzip, deflate)"}
    empty = infer(app, {"inputs": []})
    assert empty.status_code == 400 and empty.json == {"error": "an inference request needs a non-empty 'inputs' list"}


@pytest.mark.parametrize("estimate_s, header", [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (2.5, 3), (59.9, 60)])
def test_retry_after_is_the_estimate_rounded_up_to_whole_seconds_and_at_least_one(estimate_s, header):
    assert retry_after(estimate_s) == header


def test_a_new_surface_plugs_its_body_shape_into_the_one_table():
    def tei_body(error: HttpError) -> dict:
        return {"error": error.message, "error_type": error.code.lower()}

    class Resource:
        @errors_as(tei_body)
        async def on_post(self, req, resp):
            raise BrokerError(ErrorCode.OVERLOADED, "queue full", retry_after_s=0.3)

    app = falcon.asgi.App()
    app.add_route("/embed", Resource())
    response = falcon.testing.TestClient(app).simulate_post("/embed")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json == {"error": "queue full", "error_type": "overloaded"}


MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.mark.parametrize("timeout_ms", [float("nan"), float("inf"), float("-inf")])
def test_a_timeout_that_is_not_finite_is_a_400_naming_the_field(timeout_ms):
    """Issue #28: NaN in a msgpack body passed `nan <= 0` and ended in int(nan) in the broker client: a 500."""
    broker = FakeBrokerClient()
    body = msgpack.packb({"inputs": ["a"], "timeout_ms": timeout_ms})
    response = client(broker).simulate_post("/v1/models/echo/predict", body=body, headers=MSGPACK)
    assert response.status_code == 400, response.text
    assert "'timeout_ms' must be a positive finite number" in response.json["error"]["message"]
    assert broker.calls == []


@pytest.mark.parametrize("timeout_us", [float("nan"), float("inf"), -1, "1", True])
def test_a_v2_timeout_that_is_not_a_positive_finite_number_is_a_400_in_v2_shape(timeout_us):
    from gateway.openinference import _schedule
    from gateway.errors import GatewayError
    with pytest.raises(GatewayError, match="parameters.timeout must be a positive finite number"):
        _schedule({"timeout": timeout_us}, GatewayConfig())


def test_the_broker_client_refuses_a_timeout_that_is_not_finite_as_the_callers_error():
    from gateway.broker_client import BrokerClient
    broker = BrokerClient("tcp://127.0.0.1:9")  # never started: the check comes first
    for timeout_s in (float("nan"), float("inf")):
        with pytest.raises(BrokerError) as caught:
            broker.request("m", ["a"], timeout_s=timeout_s)
        assert caught.value.code is ErrorCode.BAD_REQUEST
        with pytest.raises(BrokerError):
            broker.submit("m", ["a"], timeout_s=timeout_s)


@pytest.mark.parametrize("accept", ["application/json", "application/msgpack"])
def test_a_msgpack_timestamp_is_refused_like_every_extension_type_and_never_echoed(accept):
    """Issue #28: msgpack decodes extension type -1 itself, so the ext_hook never saw it: as an input it
    got a 500, and with Accept: msgpack it was echoed back."""
    broker = FakeBrokerClient()
    body = msgpack.packb({"inputs": [msgpack.Timestamp(1, 5)]})
    response = client(broker).simulate_post("/v1/models/echo/predict", body=body,
                                            headers={**MSGPACK, "Accept": accept})
    assert response.status_code == 400, response.content
    assert broker.calls == []
    assert "extension type -1" in response.json["error"]["message"]  # errors are JSON, whatever is accepted


def test_a_v2_shape_whose_element_count_overflows_int64_is_a_400_in_v2_shape_for_every_datatype():
    """Issue #28: [1, 2**32, 2**32] wrapped to 0 elements in numpy: FP32 got a 500 in the wrong shape,
    and BYTES was not checked at all (200)."""
    app = client(V2Broker())
    for datatype in ("FP32", "INT64", "BYTES"):
        for shape in ([1, 2**32, 2**32], [1, 2**64], [2**63, 2**63]):
            for tensor in ({"data": []}, {"parameters": {"binary_data_size": 0}}):
                header = {"inputs": [{"name": "INPUT", "datatype": datatype, "shape": shape, **tensor}]}
                response = infer(app, json.dumps(header).encode())  # (orjson cannot write 2**64)
                assert response.status_code == 400, (datatype, shape, response.text)
                assert set(response.json) == {"error"} and isinstance(response.json["error"], str), response.json


def test_a_v2_bytes_shape_is_checked_against_its_data():
    app = client(V2Broker())
    for shape, data in (([2, 1], ["a"]), ([1, 1], ["a", "b"]), ([0, 1], ["a"])):
        response = infer(app, {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": shape, "data": data}]})
        assert response.status_code == 400 and isinstance(response.json["error"], str), response.text
    binary = struct.pack("<I", 1) + b"a"
    for shape in ([2, 1], [1, 2**32, 2**32]):
        header = {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": shape,
                              "parameters": {"binary_data_size": len(binary)}}]}
        response = infer(app, header, binary)
        assert response.status_code == 400 and isinstance(response.json["error"], str), response.text


def test_a_v2_shape_with_a_bool_is_refused():
    response = infer(client(V2Broker()), {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [True, 1],
                                                      "data": ["a"]}]})
    assert response.status_code == 400 and "non-negative integers" in response.json["error"]


def test_every_error_on_a_v2_route_is_in_v2_shape_falcons_own_and_a_bugs_included(monkeypatch):
    app = client(V2Broker())
    assert infer(app, {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]}
                 ).status_code == 200
    not_found = app.simulate_get("/v2/models/echo/no-such-route")
    assert not_found.status_code == 404 and isinstance(not_found.json["error"], str), not_found.text
    wrong_method = app.simulate_delete("/v2/models/echo/infer")
    assert wrong_method.status_code == 405 and isinstance(wrong_method.json["error"], str), wrong_method.text
    from gateway import openinference

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(openinference, "_rows", broken)
    response = infer(app, {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]})
    assert response.status_code == 500 and response.json == {"error": "INTERNAL: ZeroDivisionError: a bug"}
    v1 = app.simulate_get("/v1/no-such-route")
    assert v1.status_code == 404 and v1.json["error"]["code"] == "NOT_FOUND"


def test_metadata_sent_once_in_status_is_found_for_every_model_that_shares_it():
    from gateway.catalog import Catalog

    class Shared(FakeBrokerClient):
        def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
            status = super().status(timeout_s)
            status["models"] = {"echo": {"workers": 1, "metadata": {"task": "embedding"}},
                                "echo@v1": {"workers": 1, "metadata": {}, "metadata_from": "echo"},
                                "other": {"workers": 1, "metadata": {}, "metadata_from": ""}}
            return status

    catalog = Catalog(Shared())
    assert catalog.metadata("echo@v1") == {"task": "embedding"} == catalog.metadata("echo")
    assert catalog.metadata("other") == {}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/status"])
def test_models_and_status_are_cached_briefly_per_process(path):
    """Issue #28: 8 clients polling /v1/models made the broker build a STATUS for each."""
    class Counting(FakeBrokerClient):
        asked = 0

        def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
            Counting.asked += 1
            return super().status(timeout_s)

    app = client(Counting())
    for _ in range(50):
        assert app.simulate_get(path).status_code == 200
    assert Counting.asked == 1


def test_a_model_name_too_long_for_the_wire_is_a_400_naming_the_clients_field():
    """Issue #28: a 300-character model name got a 400 with param "input" and a message naming the
    wire's internal field Request.model."""
    broker = FakeBrokerClient()
    app = client(broker)
    long_name = "m" * 300
    for response in (
        app.simulate_post(f"/v1/models/{long_name}/predict", body='{"inputs": ["a"]}', headers=JSON),
        app.simulate_post("/v1/embeddings", body=orjson.dumps({"model": long_name, "input": "a"}), headers=JSON),
        app.simulate_post("/v1/rerank", body=orjson.dumps({"model": long_name, "query": "q", "documents": ["a"]}),
                          headers=JSON),
    ):
        assert response.status_code == 400, response.text
        error = response.json["error"]
        assert error["param"] == "model" and "'model' must be 1 to 256 characters, got 300" in error["message"]
        assert "Request." not in error["message"]
    assert broker.calls == []


def test_cohere_routes_under_v2_keep_the_openai_error_shape_not_kserves():
    response = client().simulate_delete("/v2/rerank")
    assert response.status_code == 405 and response.json["error"]["code"] == "METHOD_NOT_ALLOWED", response.text


def test_cohere_embed_with_a_list_as_truncate_is_a_400_not_a_500():
    """Found by tests/e2e/test_hostile_http.py: a list is unhashable, and the lookup of the truncation
    mode raised TypeError (a 500)."""
    response = client().simulate_post("/v1/embed", body=orjson.dumps({"model": "echo", "texts": ["a"], "truncate": []}),
                                      headers=JSON)
    assert response.status_code == 400 and response.json["error"]["param"] == "truncate", response.text
