"""Slow clients cost the gateway no threads and delay nobody (issue #28): hundreds of connections
that trickle their headers a byte every 1 to 2 s, beside a normal client; and the head and body
read timeouts, each a 408 that closes the connection.

Real processes: a broker, an echo worker and a one-process gateway (one event loop for every
connection); the trickling connections come from another process (bench/slow_clients.py), so
that their work does not land on the measuring client.
"""

from __future__ import annotations

import socket
import time

import pytest

from bench.slow_clients import latencies_s, percentile_ms, start_trickling, stop_trickling
from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.integration

TRICKLING = 300
REQUESTS = 300
ALLOWED_P99_DELAY_MS = 100.0


@pytest.fixture
def gateway(stack):
    stack.start_broker()
    stack.start_worker("--model", "echo")
    _, url = stack.start_gateway("--workers", "1", "--header-timeout-s", "3", "--body-timeout-s", "3")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway")
    return url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (recv with a timeout)."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_hundreds_of_trickling_connections_do_not_delay_a_normal_request(stack, gateway, tmp_path):
    latencies_s(gateway, 50)  # warm-up
    without = latencies_s(gateway, REQUESTS)
    log = tmp_path / "trickle.log"
    trickler = start_trickling(gateway, TRICKLING, log)
    try:
        beside = latencies_s(gateway, REQUESTS)
        assert http_ready(gateway)  # the gateway still answers its probes
    finally:
        counts = stop_trickling(trickler, log)
    p99_without, p99_beside = percentile_ms(without, 0.99), percentile_ms(beside, 0.99)
    print(f"normal request p50/p99: {percentile_ms(without, 0.5):.1f}/{p99_without:.1f} ms alone, "
          f"{percentile_ms(beside, 0.5):.1f}/{p99_beside:.1f} ms beside {TRICKLING} trickling connections "
          f"({counts['408']} 408s to them)")
    assert p99_beside <= p99_without + ALLOWED_P99_DELAY_MS


def _late_answer(url: str, sent: bytes) -> tuple[bytes, bytes, float]:
    """Send part of a request and no more: the head and body of the answer, and when it came."""
    with _connect(url) as sock:
        started_at = time.monotonic()
        sock.sendall(sent)
        answer = _answer(sock)
        elapsed_s = time.monotonic() - started_at
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"x-request-id: " in head.lower()
    return head, body, elapsed_s


def test_a_request_head_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(gateway):
    _, body, elapsed_s = _late_answer(gateway, b"POST /v1/models/echo/predict HTTP/1.1\r\nHost: x\r\n")
    assert b'"REQUEST_TIMEOUT"' in body and b"--header-timeout-s" in body
    assert 2.5 < elapsed_s < 8.0  # --header-timeout-s 3


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(gateway):
    _, body, elapsed_s = _late_answer(gateway, b"POST /v1/models/echo/predict HTTP/1.1\r\nHost: x\r\n"
                                               b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                                               b'{"inputs": ')  # 11 of 100 bytes
    assert b'"REQUEST_TIMEOUT"' in body and b"--body-timeout-s" in body
    assert 2.5 < elapsed_s < 8.0  # --body-timeout-s 3


def test_an_idle_connection_is_closed_without_an_answer(gateway):
    with _connect(gateway) as sock:
        assert _answer(sock) == b""  # closed by the keep-alive or head timeout, whichever comes first
