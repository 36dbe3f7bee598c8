"""Issue-2 figures: what ddml adds at low load, and how batches grow at high load.

    .venv/bin/python -m bench.pipeline [--seconds 20] [--requests 200]

Starts a real broker, one minilm worker, one echo worker and the gateway on random ports, then:
1. concurrency 1 against a direct in-process call of the same model (same thread count),
   side by side on the same noisy machine, in two ways: request by request with the paths
   interleaved and 20 ms of quiet before each call (so torch's threads are asleep, as for a
   lone user); then as one client sending back to back (the next request when the reply
   arrives, as wrk -c1 or perf_analyzer at concurrency 1 do), in blocks of --block requests
   per path, the paths taking turns. Median latency of each, the difference, and the batch
   sizes the broker formed;
2. the floors, with no model work at all, back to back: GET /healthz (the HTTP hop alone), and
   the echo model through the broker client and through HTTP;
3. concurrency 64 over HTTP for --seconds: req/s, p50/p99 and the mean batch size.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import requests

from bench.workload import sentences
from gateway.broker_client import BrokerClient
from tests.conftest import Stack
from worker.models import default_model_path
from worker.models.hf_text import HFTextModel

_SETTLE_S = 0.02


def batch_sizes(status: dict, model: str) -> dict[int, int]:
    return {int(k): v for k, v in status["models"].get(model, {}).get("batch_sizes", {}).items()}


def diff(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] - before.get(k, 0)}


def mean_size(sizes: dict[int, int]) -> float:
    batches = sum(sizes.values())
    return sum(k * v for k, v in sizes.items()) / batches if batches else 0.0


def run_back_to_back(paths: dict[str, Callable[[str], object]], blocks: list[list[str]]) -> dict[str, list[float]]:
    """One client sending back to back: each path runs a whole block in turn, the order rotating."""
    names = list(paths)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for index, block in enumerate(blocks):
        for name in names[index % len(names):] + names[:index % len(names)]:
            for text in block:  # the next request as soon as the reply is in
                started = time.perf_counter()
                paths[name](text)
                timings[name].append((time.perf_counter() - started) * 1000)
    return timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=200, help="requests at concurrency 1")
    parser.add_argument("--block", type=int, default=10, help="back-to-back requests per path per turn")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    stack = Stack(Path(tempfile.mkdtemp(prefix="ddml-bench-")))
    try:
        stack.start_broker()
        stack.start_worker("--model", "minilm", "--device", "cpu")
        stack.start_worker("--model", "echo", "--device", "cpu")  # for the floors: no model work at all
        gateway, url = stack.start_gateway()
        client = BrokerClient(stack.frontend)
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)

        direct = HFTextModel(device="cpu", model_path=default_model_path())
        direct.init_model()
        texts = sentences(args.requests + 20, seed=1)
        host, port = url.removeprefix("http://").split(":")

        def post(connection: http.client.HTTPConnection, text: str, model: str = "minilm") -> int:
            """One keep-alive HTTP request with a light client (requests adds about a millisecond)."""
            connection.request("POST", f"/v1/models/{model}/predict", json.dumps({"inputs": [text]}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            return response.status

        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        for text in texts[:20]:  # warm-up, both paths
            direct.predict([text])
            assert post(connection, text) == 200

        before = batch_sizes(client.status(), "minilm")
        paths = {
            "direct": lambda text: direct.predict([text]),
            "http": lambda text: post(connection, text) == 200 or sys.exit("HTTP request failed"),
            "broker": lambda text: client.request("minilm", [text], timeout_s=30),
        }
        names = list(paths)
        interleaved: dict[str, list[float]] = {name: [] for name in paths}
        for index, text in enumerate(texts[20:]):
            # Rotate the order, and let the machine settle between calls: after a forward pass,
            # torch's OpenMP threads spin for a few ms, and whatever ran next in this process
            # would pay for it (the first version of this script charged it all to HTTP).
            for name in names[index % 3:] + names[:index % 3]:
                time.sleep(_SETTLE_S)
                started = time.perf_counter()
                paths[name](text)
                interleaved[name].append((time.perf_counter() - started) * 1000)
        blocks = [texts[20:][k:k + args.block] for k in range(0, args.requests, args.block)]
        back_to_back = run_back_to_back(paths, blocks)
        low = diff(batch_sizes(client.status(), "minilm"), before)
        direct = None  # frees the in-process model before the load phase

        for title, timings in ((f"interleaved request by request, {_SETTLE_S * 1000:.0f} ms quiet before each",
                                interleaved),
                               (f"one client back to back, blocks of {args.block} per path", back_to_back)):
            print(f"\n## Concurrency 1, {title} ({args.requests} requests a path)\n")
            print("| path | p50 ms | p99 ms | added to direct p50 |")
            print("|---|---|---|---|")
            d50 = statistics.median(timings["direct"])
            for name, label in (("direct", "direct model.predict([x])"), ("broker", "ddml via BrokerClient"),
                                ("http", "ddml via HTTP (gateway)")):
                p50 = statistics.median(timings[name])
                print(f"| {label} | {p50:.2f} | {percentile(timings[name], 0.99):.2f} | {p50 - d50:+.2f} ms |")
        print(f"\nbatch sizes at concurrency 1, both ways: {low} (mean {mean_size(low):.2f})")

        # What ddml costs with no model work at all, back to back in rotating blocks: the HTTP hop
        # alone (no broker), and the echo model through the broker client and through HTTP.
        def healthz(_: str) -> None:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()

        floors = {
            "GET /healthz (gunicorn, Falcon and this client; no broker)": healthz,
            "echo model via BrokerClient": lambda text: client.request("echo", [text], timeout_s=30),
            "echo model via HTTP (gateway)":
                lambda text: post(connection, text, "echo") == 200 or sys.exit("HTTP request failed"),
        }
        floor_ms = run_back_to_back(floors, blocks)
        print(f"\n## Floors: no model work, one client back to back ({args.requests} requests a path)\n")
        print("| path | p50 ms | p99 ms |\n|---|---|---|")
        for name, values in floor_ms.items():
            print(f"| {name} | {statistics.median(values):.2f} | {percentile(values, 0.99):.2f} |")

        load_texts = sentences(5000, seed=2)
        stop_at = time.monotonic() + args.seconds
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()

        def load(index: int) -> None:
            own = http.client.HTTPConnection(host, int(port), timeout=60)
            k = index
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                status = post(own, load_texts[k % len(load_texts)])
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                k += args.concurrency
            own.close()

        before = batch_sizes(client.status(), "minilm")
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(load, range(args.concurrency)))
        elapsed = time.monotonic() - started
        high = diff(batch_sizes(client.status(), "minilm"), before)
        print(f"\n## Concurrency {args.concurrency} over HTTP for {args.seconds:.0f} s\n")
        print(f"req/s {len(latencies) / elapsed:.1f}, p50 {percentile(latencies, 0.5):.0f} ms, "
              f"p99 {percentile(latencies, 0.99):.0f} ms, errors {errors[0]}")
        print(f"mean batch size {mean_size(high):.1f} over {sum(high.values())} batches; "
              f"histogram {high}")
        client.close()
    finally:
        stack.stop_all()


if __name__ == "__main__":
    main()
