"""The broker's side port: /healthz follows the loop itself, and a broken /metrics never fails it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
import zmq

from broker.broker import Broker
from broker.config import BrokerConfig
from broker.health import HealthServer
from tests.fakes import FakeClock


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def broker_and_health():
    context = zmq.Context()
    clock = FakeClock()
    name = uuid.uuid4().hex
    broker = Broker(BrokerConfig(frontend=f"inproc://f-{name}", backend=f"inproc://b-{name}"), context, clock=clock)
    broker.bind()
    health = HealthServer("127.0.0.1", 0, broker.metrics.registry,
                          loop_age_s=lambda: clock() - broker.last_step_at, stall_timeout_s=5.0)
    health.start()
    yield broker, clock, f"http://127.0.0.1:{health.port}"
    health.close()
    broker.close()
    context.term()


def test_healthz_fails_once_the_loop_stops_passing_and_recovers_when_it_runs_again(broker_and_health):
    broker, clock, base = broker_and_health
    broker.step(0)
    status, body = get(base + "/healthz")
    assert status == 200 and json.loads(body)["live"] is True
    clock.advance(6.0)  # the loop has not passed for longer than the stall timeout
    status, body = get(base + "/healthz")
    assert status == 503 and json.loads(body) == {"live": False, "loop_age_s": 6.0}
    broker.step(0)
    assert get(base + "/healthz")[0] == 200


def test_a_metrics_collector_that_raises_fails_metrics_but_not_health(broker_and_health):
    broker, _, base = broker_and_health
    broker.step(0)
    status, body = get(base + "/metrics")
    assert status == 200 and b"ddml_requests" in body

    class Broken:
        def collect(self):
            raise RuntimeError("collector bug")

    broker.metrics.registry.register(Broken())
    assert get(base + "/metrics")[0] == 500
    assert get(base + "/healthz")[0] == 200
