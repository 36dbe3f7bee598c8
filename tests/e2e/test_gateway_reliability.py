"""The HTTP edge under abuse: bad input gets a clear 4xx, the gateway survives, shuts down gracefully,
and many gunicorn processes × threads (with --preload or without) never trip a libzmq assertion."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import socket
import time

import msgpack
import pytest
import requests

from tests.chaos import Tally
from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e




@pytest.fixture
def echo_gateway(stack):
    stack.start_broker()
    stack.start_worker("--model", "echo")
    gateway, url = stack.start_gateway("--workers", "2", "--threads", "8")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    return gateway, url


def post(url: str, body: bytes, content_type: str = "application/json", model: str = "echo"):
    return requests.post(f"{url}/v1/models/{model}/predict", data=body, headers={"Content-Type": content_type},
                         timeout=60)


def cut_short(url: str) -> tuple[int, bytes]:
    """Promise 1000 bytes, send 10, then close our side: a client that died mid-upload."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/models/echo/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"inputs":')
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


def test_bad_http_input_gets_a_4xx_that_says_what_is_wrong_and_the_gateway_survives(echo_gateway):
    gateway, url = echo_gateway
    wait_until(lambda: post(url, b'{"inputs": [1]}', model="nope").status_code == 404, timeout_s=10,
               interval_s=0.2, what="404 once the broker is past its start-up grace")
    cases = [
        ("malformed JSON", post(url, b'{"inputs": [1,'), 400, "malformed JSON"),
        ("malformed msgpack", post(url, b"\xc1\xc1", "application/msgpack"), 400, "malformed msgpack"),
        ("inputs not a list", post(url, b'{"inputs": {"a": 1}}'), 400, "'inputs' must be a list"),
        ("body not an object", post(url, b'"text"'), 400, "must be an object"),
        ("wrong timeout type", post(url, b'{"inputs": [1], "timeout_ms": "soon"}'), 400, "timeout_ms"),
        ("empty list", post(url, b'{"inputs": []}'), 400, "must not be empty"),
        ("100k inputs", post(url, json.dumps({"inputs": list(range(100_000))}).encode()), 400,
         "100000 inputs exceed the limit"),
        ("10 MB string", post(url, json.dumps({"inputs": ["x" * 10_000_000]}).encode()), 400,
         "over the limit of"),
        ("20 MB body", post(url, b" " * (20 << 20)), 413, "exceeds"),
        ("unknown model", post(url, b'{"inputs": [1]}', model="nope"), 404, "no live worker serves model 'nope'"),
        ("wrong content type", post(url, b"<xml/>", "application/xml"), 415, "not supported"),
        ("msgpack ext type", post(url, msgpack.packb({"inputs": [msgpack.ExtType(5, b"x")]}),
                                  "application/msgpack"), 400, "extension type"),
    ]
    for name, response, status, message in cases:
        assert response.status_code == status, (name, response.text[:300])
        assert message in response.json()["error"]["message"], (name, response.text[:300])
    status, raw = cut_short(url)
    assert status in (400, 0), raw[:300]  # 400, or gunicorn closes on a half-sent body: never a crash
    assert gateway.popen.poll() is None
    assert post(url, b'{"inputs": ["still serving"]}').json()["outputs"] == ["still serving"]


def test_gateway_sigterm_finishes_requests_in_flight_then_exits(echo_gateway):
    gateway, url = echo_gateway
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, url, json.dumps({"inputs": [{"sleep_s": 1.0, "n": n}]}).encode())
                   for n in range(4)]
        wait_until(lambda: requests.get(f"{url}/v1/status", timeout=5).json()["stats"]["in_flight_requests"] == 4,
                   timeout_s=10, what="4 requests in flight")
        gateway.signal(signal.SIGTERM)
        responses = [f.result(timeout=30) for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    assert gateway.popen.wait(30) == 0


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_20000_requests_through_many_gunicorn_processes_and_threads(stack, preload):
    stack.start_broker()
    stack.start_worker("--model", "echo", "--max-batch-size", "64")
    flags = ["--workers", "4", "--threads", "16"] + (["--preload"] if preload else [])
    gateway, url = stack.start_gateway(*flags)
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    host, port = url.removeprefix("http://").split(":")
    total, connections = 20_000, 32

    def client(index: int) -> Tally:
        tally = Tally()
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        for n in range(index, total, connections):
            body = json.dumps({"inputs": [f"r{n}"]})
            conn.request("POST", "/v1/models/echo/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            tally.sent += 1
            if response.status == 200 and json.loads(payload)["outputs"] == [f"r{n}"]:
                tally.ok += 1
            elif response.status == 200:
                tally.wrong += 1
            else:
                tally.errors[response.status] += 1
        conn.close()
        return tally

    started_at = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        tallies = list(pool.map(client, range(connections)))
    elapsed = time.monotonic() - started_at
    total_tally = Tally(sent=sum(t.sent for t in tallies), ok=sum(t.ok for t in tallies),
                        wrong=sum(t.wrong for t in tallies),
                        notes={"req_per_s": round(total / elapsed), "gunicorn": " ".join(flags)})
    for t in tallies:
        total_tally.errors.update(t.errors)
    total_tally.record(f"gunicorn 4 procs x 16 threads {'--preload' if preload else ''}")
    assert total_tally.ok == total, total_tally
    log = gateway.output()
    assert "Assertion failed" not in log and "mailbox" not in log
    assert log.count("Booting worker") == 4, "no gunicorn worker may have died and been replaced"
