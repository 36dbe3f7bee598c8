"""Hostile HTTP input, round two (issue #28), through a real gateway, broker and echo worker.

- every route, Hypothesis-generated JSON and msgpack bodies, valid and invalid: never a 500;
- each failure of the issue, replayed: NaN timeouts, msgpack timestamps (at the gateway and, sent
  past it on the wire, at the worker), v2 shapes that overflow, a 300-character model name, one
  READY that inflated every STATUS, and gunicorn's own refusals (JSON, with X-Request-ID).
"""

from __future__ import annotations

import json
import math
import socket
import struct

import msgpack
import pytest
import requests
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from ddml_common import protocol
from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e

MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.fixture(scope="module")
def gateway(module_stack):
    module_stack.start_broker("--heartbeat-interval-ms", "200")
    # Without test directives: {"raise": ...} is an input like any other, so a 500 is never the model's.
    module_stack.start_worker("--model", "echo", "--heartbeat-interval-ms", "200", echo_test_directives=False)
    _, url = module_stack.start_gateway("--workers", "1", "--threads", "8")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway")
    return url


# ------------------------------------------------------------------ bodies

# Edge values where a number is meant, and msgpack's extension types (a JSON body skips them).
edges = st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 0.5, 1.5, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -2**63,
                         "5", None, True, [], {}])
extensions = (st.builds(msgpack.Timestamp, st.integers(-2**33, 2**34), st.integers(0, 999_999_999))
              | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20) | edges
           | extensions)
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)
numbers = edges | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=3)
inputs = st.lists(st.text(max_size=8) | values, min_size=1, max_size=4)  # mostly well-formed: the checks after it run
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["INPUT", "TEXT", "x"]) | st.text(max_size=4),
     "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "BOOL", "FP16", "nope"]),
     "shape": st.lists(st.integers(-1, 2**64) | st.sampled_from([1, 2, 2**32, 2**63]) | edges, min_size=1,
                       max_size=4) | values},
    optional={"data": values | st.lists(st.text(max_size=4) | st.floats(), max_size=4),
              "parameters": st.dictionaries(st.sampled_from(["binary_data_size"]), numbers)})
predict_body = (st.fixed_dictionaries({"inputs": inputs}, optional={"timeout_ms": numbers, "priority": numbers,
                                                                     "truncate": values})
                | st.fixed_dictionaries({}, optional={"inputs": values, "timeout_ms": values}) | values)
embeddings_body = (st.fixed_dictionaries({"model": st.sampled_from(["echo", "m" * 300, ""]) | values,
                                          "input": inputs | values},
                                         optional={"encoding_format": st.sampled_from(["float", "base64"]) | values,
                                                   "dimensions": numbers}) | values)
rerank_body = (st.fixed_dictionaries({"model": st.sampled_from(["echo", "m" * 300]) | values,
                                      "query": st.text(max_size=8) | values, "documents": inputs | values},
                                     optional={"top_n": numbers, "return_documents": values}) | values)
infer_body = st.fixed_dictionaries({"inputs": st.lists(tensor, min_size=1, max_size=2)}, optional={
    "parameters": st.fixed_dictionaries({}, optional={"timeout": numbers, "priority": numbers,
                                                      "binary_data_output": values}),
    "id": values, "outputs": values}) | values

tei_body = (st.fixed_dictionaries({"inputs": inputs | st.text(max_size=8) | values},
                                  optional={"query": values, "texts": inputs | values, "truncate": values,
                                            "normalize": values, "model": values, "ids": values,
                                            "sentences": values, "source_sentence": values})
            | values)
cohere_body = (st.fixed_dictionaries({"model": st.sampled_from(["echo", "m" * 300]) | values},
                                     optional={"texts": inputs | values, "query": values, "documents": values,
                                               "top_n": numbers, "input_type": values, "embedding_types": values,
                                               "truncate": values})
               | values)
ROUTES = [("/v1/models/echo/predict", predict_body), ("/v1/models/" + "m" * 300 + "/predict", predict_body),
          ("/v1/embeddings", embeddings_body), ("/v1/rerank", rerank_body), ("/v2/models/echo/infer", infer_body),
          ("/v1/embed", cohere_body), ("/v2/embed", cohere_body), ("/v2/rerank", cohere_body),
          *((f"{prefix}/{route}", tei_body) for prefix in ("", "/tei/echo")
            for route in ("embed", "embed_all", "embed_sparse", "predict", "rerank", "similarity", "tokenize",
                          "decode", "invocations"))]


def encoded(body, as_msgpack: bool) -> tuple[bytes, dict] | None:
    try:
        if as_msgpack:
            return msgpack.packb(body, use_bin_type=True), MSGPACK
        return json.dumps(body, allow_nan=True).encode(), {"Content-Type": "application/json"}
    except (TypeError, ValueError, OverflowError):  # not representable (an int past 64 bits in msgpack)
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(route=st.sampled_from(ROUTES).flatmap(lambda r: st.tuples(st.just(r[0]), r[1])), as_msgpack=st.booleans())
def test_no_body_on_any_route_gets_a_500_from_the_echo_model(gateway, route, as_msgpack):
    path, body = route
    request = encoded(body, as_msgpack)
    if request is None:
        return
    data, headers = request
    response = requests.post(f"{gateway}{path}", data=data, headers=headers, timeout=30)
    # A deadline of a microsecond may pass (504), and a full queue may refuse (503): neither is a 500.
    assert response.status_code < 500 or response.status_code in (503, 504), (
        path, body, response.status_code, response.text[:500])
    assert response.headers.get("X-Request-ID")
    if response.status_code >= 400:
        assert response.json()["error"], response.text  # a JSON error, in the route's own shape


# ------------------------------------------------------------------ each failure of the issue, replayed


def test_a_nan_or_infinite_timeout_is_a_400(gateway):
    for timeout_ms in (math.nan, math.inf, -math.inf):
        response = requests.post(f"{gateway}/v1/models/echo/predict", timeout=10, headers=MSGPACK,
                                 data=msgpack.packb({"inputs": ["a"], "timeout_ms": timeout_ms}))
        assert response.status_code == 400, response.text
        assert "'timeout_ms' must be a positive finite number" in response.json()["error"]["message"]


def test_a_msgpack_timestamp_is_refused_and_never_echoed(gateway):
    for accept in ("application/json", "application/msgpack"):
        response = requests.post(f"{gateway}/v1/models/echo/predict", timeout=10,
                                 headers={**MSGPACK, "Accept": accept},
                                 data=msgpack.packb({"inputs": [msgpack.Timestamp(1, 5)]}))
        assert response.status_code == 400, response.content
        assert "extension type -1" in response.json()["error"]["message"]


def test_a_msgpack_timestamp_sent_past_the_gateway_is_refused_by_the_worker(module_stack, gateway):
    """A client on the broker's frontend can send any item frame: the worker must refuse the timestamp."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(module_stack.frontend)
        stamped = msgpack.packb(msgpack.Timestamp(1, 5))
        dealer.send_multipart(protocol.encode(protocol.Request("ts-1", "echo", 5000, inputs=[stamped])))
        assert dealer.poll(10_000), "no reply"
        reply = protocol.decode(dealer.recv_multipart())
        assert isinstance(reply, protocol.Reply) and reply.request_id == "ts-1"
        assert reply.error_code == "BAD_REQUEST" and "extension type -1" in reply.error_message, reply
    finally:
        dealer.close()
        context.term()


def test_a_v2_shape_that_overflows_is_a_400_in_v2_shape_for_every_datatype(gateway):
    for datatype in ("FP32", "BYTES"):
        for tensor in ({"data": []}, {"parameters": {"binary_data_size": 4}}):
            header = json.dumps({"inputs": [{"name": "INPUT", "datatype": datatype, "shape": [1, 2**32, 2**32],
                                             **tensor}]}).encode()
            binary = struct.pack("<I", 0) if "parameters" in tensor else b""
            response = requests.post(f"{gateway}/v2/models/echo/infer", data=header + binary, timeout=10,
                                     headers={"Content-Type": "application/json",
                                              "Inference-Header-Content-Length": str(len(header))})
            assert response.status_code == 400, (datatype, tensor, response.status_code, response.text)
            assert isinstance(response.json()["error"], str), response.text


def test_a_300_character_model_name_is_a_400_naming_model(gateway):
    long_name = "m" * 300
    for response in (
        requests.post(f"{gateway}/v1/models/{long_name}/predict", json={"inputs": ["a"]}, timeout=10),
        requests.post(f"{gateway}/v1/embeddings", json={"model": long_name, "input": "a"}, timeout=10),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "model" and "Request.model" not in error["message"], error


def test_gunicorns_own_refusals_are_json_with_a_request_id(gateway):
    host, port = gateway.removeprefix("http://").split(":")
    for raw, status in ((b"NOT HTTP AT ALL\r\n\r\n", 400),
                        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
                        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414)):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(raw)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} "), answer[:300]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers["content-type"] == "application/json" and headers["x-request-id"], headers
        error = json.loads(body)["error"]
        assert error["code"] and error["message"], error


def test_one_ready_with_64_models_and_1_mb_of_metadata_does_not_inflate_status(module_stack, gateway):
    before = len(requests.get(f"{gateway}/v1/status", timeout=10).content)
    metadata = {"inputs": [{"name": f"t{i}", "doc": "x" * 1000} for i in range(1000)]}  # about 1 MB
    context = zmq.Context()
    rogue = context.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        rogue.connect(module_stack.backend)
        ready = protocol.Ready([f"rogue-{i}" for i in range(protocol.MAX_MODELS)], max_batch_size=1,
                               metadata=metadata)
        rogue.send_multipart(protocol.encode(ready))
        rogue.send_multipart(protocol.encode(protocol.Heartbeat()))

        def status_with_rogue() -> int:
            response = requests.get(f"{gateway}/v1/status", timeout=10)
            return len(response.content) if "rogue-0" in response.json()["models"] else 0

        size = wait_until(status_with_rogue, timeout_s=15, what="the rogue's models in /v1/status")
        assert size < before + 2 * len(json.dumps(metadata)), (before, size)  # once, not 64 times
        models = requests.get(f"{gateway}/v1/models", timeout=10)
        assert models.status_code == 200 and len(models.content) < 2 * len(json.dumps(metadata))
    finally:
        rogue.send_multipart(protocol.encode(protocol.Disconnect("bye")))
        rogue.close(linger=1000)
        context.term()
