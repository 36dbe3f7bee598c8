"""The predict route's usual request, answered by GatewayApp itself (gateway/hot_path.py), leaves the
same bytes as when Falcon answers it: status, headers in order, body, log line and metrics; and every
request it does not answer itself reaches Falcon whole. Each request here goes through the ASGI app
twice, once with its own path and once with Falcon's (app.predict = None), and the two are compared."""

from __future__ import annotations

import asyncio
import logging

import falcon.asgi
import pytest
from prometheus_client import REGISTRY

from ddml_common.protocol import ErrorCode
from gateway.app import create_app
from gateway.asgi_server import MAX_HEADER_BYTES
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from gateway.errors import HTTP_STATUS_BY_CODE
from tests.fakes import Awaitable, FakeBrokerClient

PATH = "/v1/models/echo/predict"
ROUTE = "/v1/models/{model}/predict"
JSON = [(b"content-type", b"application/json")]
ID = [(b"x-request-id", b"mine-1")]


def call(app, path: str, body: bytes | list[bytes], headers: list, method: str = "POST") -> list[dict]:
    """The ASGI messages the app sends for one request (a list of bodies: sent in parts)."""
    parts = body if isinstance(body, list) else [body]
    events = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    sent: list[dict] = []
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"127.0.0.1")] + headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}

    async def receive() -> dict:
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def both(broker=None, path=PATH, body=b'{"inputs": ["a", 2, {"c": 3}]}', headers=JSON + ID, config=None,
         own: bool = True) -> list[dict]:
    """The messages of the app's own path and of Falcon's for the same request, asserted equal; with
    own=True, the first must not have reached Falcon (and must have, with own=False)."""
    app = create_app(Awaitable(broker or FakeBrokerClient()), config or GatewayConfig())
    assert app.predict is not None
    reached = []
    falcons = falcon.asgi.App.__call__

    async def spy(self, scope, receive, send):
        reached.append(scope["path"])
        await falcons(self, scope, receive, send)

    falcon.asgi.App.__call__ = spy
    try:
        fast = call(app, path, body, headers)
    finally:
        falcon.asgi.App.__call__ = falcons
    assert bool(reached) is not own, "answered by the wrong path"
    app.predict = None
    assert _made_ids_masked(call(app, path, body, headers)) == _made_ids_masked(fast)
    return fast


def _made_ids_masked(messages: list[dict]) -> list[dict]:
    """The messages, with a made X-Request-ID (32 hex digits: each path makes its own) as "made"."""
    def masked(header):
        name, value = header
        return (name, b"made") if name == b"x-request-id" and len(value) == 32 and value.isalnum() else header
    return [{**m, "headers": [masked(h) for h in m["headers"]]} if "headers" in m else m for m in messages]


def counted(status: int) -> float:
    return REGISTRY.get_sample_value("ddml_http_requests_total", {"route": ROUTE, "method": "POST",
                                                                  "status": str(status)}) or 0.0


def test_an_answer_is_the_same_bytes_in_the_same_order_and_counted_once_each_way():
    before = counted(200)
    start, body = both()
    assert start["status"] == 200
    assert start["headers"] == [(b"content-type", b"application/json"), (b"x-request-id", b"mine-1"),
                                (b"content-length", str(len(body["body"])).encode())]
    assert body["body"] == b'{"model":"echo","outputs":["a",2,{"c":3}]}'
    assert counted(200) == before + 2


def test_the_version_served_comes_back_in_the_same_place():
    start, _ = both(FakeBrokerClient(workers=VERSIONED))
    assert start["headers"][0] == (b"x-model-version", b"7")


def test_a_made_request_id_is_sent_to_the_broker_and_on_the_answer():
    broker = FakeBrokerClient()
    app = create_app(Awaitable(broker), GatewayConfig())
    start, _ = call(app, PATH, b'{"inputs": [1]}', JSON + [(b"accept", b"*/*")])
    made = dict(start["headers"])[b"x-request-id"].decode()
    assert len(made) == 32 and broker.request_ids == [made]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_broker_error_is_answered_as_falcons_handler_answers_it(code):
    status = HTTP_STATUS_BY_CODE[code]
    before = counted(status)
    start, body = both(FakeBrokerClient(error=BrokerError(code, "why", retry_after_s=2.5)))
    assert start["status"] == status and b'"why"' in body["body"]
    assert (b"retry-after", b"3") in start["headers"] if status == 503 else True
    assert counted(status) == before + 2


VERSIONED = [{"worker_id": "ab", "models": ["echo", "echo@7"], "host": "h", "pid": 1, "device": "cpu", "state": "idle",
              "max_batch_size": 8}]


class Failing(FakeBrokerClient):
    def __init__(self, outputs):
        super().__init__(workers=VERSIONED)
        self.outputs = outputs

    def request(self, *args, **kwargs):
        if isinstance(self.outputs, Exception):
            raise self.outputs
        return self.outputs


@pytest.mark.parametrize("outputs", [RuntimeError("a bug"), [object()]], ids=["raises", "unrenderable"])
def test_a_bug_is_a_logged_500_either_way(outputs, caplog):
    with caplog.at_level(logging.WARNING):
        start, body = both(Failing(outputs))
    assert start["status"] == 500 and b'"INTERNAL"' in body["body"]
    # Falcon's 500 after the answer came keeps the version the resource had marked; before it, none
    assert ((b"x-model-version", b"7") in start["headers"]) is not isinstance(outputs, Exception)
    assert sum("unexpected error on POST /v1/models/echo/predict" in r.getMessage() for r in caplog.records) == 2
    assert sum("request mine-1: POST '/v1/models/echo/predict' -> 500" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("path, body, headers", [
    (PATH, b'{"inputs": ["a"]}', JSON + [(b"x-request-id", b"has space")]),  # 400 for the id
    (PATH, b'{"inputs": [', JSON),  # malformed JSON
    (PATH, b'{"inputs": []}', JSON),  # empty inputs
    (PATH, b'{"inputs": ["a"]}', [(b"content-type", b"text/plain")]),  # 415
    (PATH, b"x" * 5000, JSON),  # over --max-body-bytes (set below)
    (PATH, b'{"inputs": ["a"]}', JSON + [(b"content-length", b"99")]),  # cut short
    (PATH, b'{"inputs": ["a"]}', JSON + [(b"content-length", b"x")]),  # not a number
    (PATH, [b'{"inputs": ', b'["a"]}'], JSON),  # the body in two parts
    (PATH, b'{"inputs": ["a"]}', JSON + [(b"accept", b"application/msgpack")]),  # msgpack out
    (PATH, b'{"inputs": ["a"]}', JSON + ID + ID),  # a header twice
    (PATH, b'{"inputs": ["a"]}', JSON + [(b"x-long", b"x" * MAX_HEADER_BYTES)]),  # 431
    ("/v1/models/" + "m" * 300 + "/predict", b'{"inputs": ["a"]}', JSON),  # a name over the wire's limit
    ("/v1/models//predict", b'{"inputs": ["a"]}', JSON),
    ("/v1/models/a/b/predict", b'{"inputs": ["a"]}', JSON),
    ("/v1/models/echo/predict/", b'{"inputs": ["a"]}', JSON),
])
def test_what_it_does_not_answer_itself_reaches_falcon_whole(path, body, headers):
    both(path=path, body=body, headers=headers, config=GatewayConfig(max_body_bytes=4096), own=False)


def test_a_msgpack_body_with_a_json_answer_and_a_traceparent_are_its_own():
    import msgpack

    start, body = both(body=msgpack.packb({"inputs": ["a"]}),
                       headers=[(b"content-type", b"application/msgpack"), *ID,
                                (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
    assert start["status"] == 200 and body["body"] == b'{"model":"echo","outputs":["a"]}'


def test_other_methods_and_routes_and_bearer_tokens_go_to_falcon(tmp_path):
    both(path="/v1/models/echo", headers=[], own=False)
    keys = tmp_path / "keys"
    keys.write_text("secret\n")
    app = create_app(Awaitable(FakeBrokerClient()), GatewayConfig(api_key_file=str(keys)))
    assert app.predict is None
    start, _ = call(app, PATH, b'{"inputs": ["a"]}', JSON)
    assert start["status"] == 401
