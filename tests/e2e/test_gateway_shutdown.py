"""Stopping a gateway: an idle one exits at once, broker or no broker; requests in flight finish first."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e

IDLE_EXIT_S = 2.0


def stop_and_time(gateway, signum: int) -> float:
    started_at = time.monotonic()
    gateway.signal(signum)
    gateway.popen.wait(timeout=60)
    return time.monotonic() - started_at


def serve_a_little(url: str) -> requests.Session:
    """A client that keeps its connection open afterwards, as load balancers and Prometheus do."""
    session = requests.Session()
    for _ in range(3):
        reply = session.post(f"{url}/v1/models/echo/predict", json={"inputs": ["x"]}, timeout=10)
        assert reply.status_code == 200
    return session


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("broker_up", [True, False], ids=["broker-up", "broker-gone"])
def test_an_idle_gateway_exits_within_two_seconds(stack, signum, broker_up):
    broker = stack.start_broker()
    worker = stack.start_worker("--model", "echo")
    gateway, url = stack.start_gateway("--workers", "2", "--threads", "8")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway")
    session = serve_a_little(url)
    if not broker_up:
        worker.stop()
        broker.stop()
        assert session.get(f"{url}/readyz", timeout=10).status_code == 503  # the gateway has seen it go

    elapsed_s = stop_and_time(gateway, signum)
    print(f"{signal.Signals(signum).name} to exit, broker {'up' if broker_up else 'gone'}: {elapsed_s:.2f} s")
    assert gateway.popen.returncode == 0, gateway.output()[-3000:]
    assert elapsed_s < IDLE_EXIT_S, gateway.output()[-3000:]


def test_a_request_in_flight_at_sigterm_is_answered_before_the_gateway_exits(stack):
    stack.start_broker()
    stack.start_worker("--model", "echo")
    # A longest deadline of 10 s: gunicorn waits 15 s for requests in flight, where its own default
    # would cut off at 30 s whatever the deadline.
    gateway, url = stack.start_gateway("--workers", "1", "--threads", "4", "--max-request-timeout-ms", "10000")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway")
    replies: list = []
    request = threading.Thread(target=lambda: replies.append(requests.post(
        f"{url}/v1/models/echo/predict", json={"inputs": [{"sleep_s": 3}], "timeout_ms": 8000}, timeout=30)))
    request.start()
    wait_until(lambda: requests.get(f"{url}/v1/status", timeout=5).json()["stats"].get("in_flight_requests"),
               timeout_s=10, what="the request to reach the broker")

    elapsed_s = stop_and_time(gateway, signal.SIGTERM)
    request.join(timeout=30)
    [reply] = replies
    assert reply.status_code == 200 and reply.json()["outputs"] == [{"sleep_s": 3}]
    assert gateway.popen.returncode == 0
    assert 2.0 < elapsed_s < 2.5 + IDLE_EXIT_S  # it waited for the reply, then left at once
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)


def test_the_http_workers_stop_when_the_gateway_master_is_killed(stack):
    """SIGKILLed, the gunicorn master cannot stop its workers: each must see it gone and stop by
    itself, or it serves on for ever as an orphan and keeps the port, so that no new gateway can bind it."""
    import os
    import socket

    stack.start_broker()
    stack.start_worker("--model", "echo")
    gateway, url = stack.start_gateway("--workers", "2", "--threads", "4")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway")
    serve_a_little(url)
    port = int(url.rsplit(":", 1)[1])
    workers = [int(pid) for pid in open(f"/proc/{gateway.pid}/task/{gateway.pid}/children").read().split()]
    assert len(workers) == 2, workers
    os.kill(gateway.pid, signal.SIGKILL)

    def port_free() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) != 0

    try:
        wait_until(port_free, timeout_s=15, what="the orphaned HTTP workers to stop and free the port")
        assert gateway.output().count("is gone; stopping") == 2, gateway.output()[-3000:]
    finally:
        for pid in workers:  # (on failure: no orphan may outlive the test)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
