"""Prometheus metrics from the broker and the gateway (parsed with prometheus_client), and ddml-status."""

from __future__ import annotations

import http.client
import random
import string
import subprocess
import sys

import pytest
import requests

from tests.processes import REPO, free_port, http_ready, scrape, value, wait_until

pytestmark = pytest.mark.e2e


def test_metrics_move_as_requests_flow_and_status_shows_the_cluster(stack):
    metrics_port = free_port()
    stack.start_broker("--metrics-port", str(metrics_port), "--heartbeat-interval-ms", "200")
    worker = stack.start_worker("--model", "echo", "--heartbeat-interval-ms", "200")
    _, url = stack.start_gateway("--workers", "2", "--threads", "8")
    broker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    wait_until(lambda: value(scrape(broker_metrics), "ddml_workers", model="echo", state="idle") == 1, 10,
               what="the worker in the broker's gauges")
    before_broker, before_gateway = scrape(broker_metrics), scrape(f"{url}/metrics")
    for n in range(60):
        assert requests.post(f"{url}/v1/models/echo/predict", json={"inputs": [n, n + 1]}, timeout=10).ok
    assert requests.post(f"{url}/v1/models/echo/predict", json={"inputs": [{"raise": "x"}]}, timeout=10).status_code == 500

    def moved():
        after = scrape(broker_metrics)
        return (value(after, "ddml_requests_total", model="echo", outcome="ok")
                - value(before_broker, "ddml_requests_total", model="echo", outcome="ok")) == 60 and \
            value(after, "ddml_worker_inputs_total") >= 121 and after
    after = wait_until(moved, 10, what="broker counters to move")
    assert value(after, "ddml_requests_total", model="echo", outcome="MODEL_ERROR") >= 1
    assert value(after, "ddml_batch_size_count", model="echo") - value(before_broker, "ddml_batch_size_count",
                                                                         model="echo") >= 61
    assert value(after, "ddml_batch_size_sum", model="echo") - value(before_broker, "ddml_batch_size_sum",
                                                                       model="echo") >= 121
    assert value(after, "ddml_queue_wait_seconds_count", model="echo") >= 121
    assert value(after, "ddml_batch_latency_seconds_count", model="echo") >= 61
    assert value(after, "ddml_worker_info", host=worker_host(after)) == 1
    assert value(after, "ddml_queue_depth", model="echo") == 0

    gateway_after = scrape(f"{url}/metrics")  # any gunicorn process answers for all of them
    route = "/v1/models/{model}/predict"
    ok = value(gateway_after, "ddml_http_requests_total", route=route, method="POST", status="200") - \
        value(before_gateway, "ddml_http_requests_total", route=route, method="POST", status="200")
    assert ok == 60
    assert value(gateway_after, "ddml_http_requests_total", route=route, method="POST", status="500") >= 1
    assert value(gateway_after, "ddml_http_request_duration_seconds_count", route=route, method="POST") >= 61

    # Methods and paths clients make up must not become label values (one series each, forever).
    # (The HTTP parser refuses a method it does not know with 400 before the app sees it; one it knows
    # that is not a usual one, as PURGE or PROPFIND, reaches the app and is counted as "other".)
    rng = random.Random(3)
    for n in range(60):
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12))) if n > 1 else ("PURGE", "PROPFIND")[n]
        path = rng.choice([f"/nope/{n}", f"/v1/models/m{n}/predict", "/healthz"])
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        connection.request(method, path)
        assert connection.getresponse().status in (400, 404, 405)
        connection.close()
    series = [dict(ls) for (n, ls) in scrape(f"{url}/metrics") if n == "ddml_http_requests_total"]
    methods, routes = {s["method"] for s in series}, {s["route"] for s in series}
    assert methods <= {"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "other"}, methods
    assert "other" in methods and "unmatched" in routes
    assert not [r for r in routes if "/nope/" in r or "/models/m" in r], routes

    output = subprocess.run([sys.executable, "-m", "gateway.status_cli", "--broker", stack.frontend],
                            capture_output=True, text=True, timeout=30, cwd=REPO).stdout
    print(output)
    assert "WORKER" in output and "MEAN-BATCH" in output and str(worker.pid) in output and "echo" in output


def worker_host(samples: dict) -> str:
    return next(dict(labels)["host"] for (name, labels) in samples if name == "ddml_worker_info")
