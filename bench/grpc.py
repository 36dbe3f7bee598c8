"""KServe v2 over gRPC against HTTP binary, and the cost of tracing on the gateway, side by side in one run.

    .venv/bin/python -m bench.grpc [--seconds 10] [--rounds 2] [--model-path DIR]
    .venv/bin/python -m bench.grpc --tracing [--before /path/to/other/checkout] [--seconds 10] [--rounds 2]

Default: one stack (broker, one worker, a gateway with --grpc-bind); the same inference request (one
BYTES input, a sentence; --model-path serves that model, else the echo worker) through
tritonclient.grpc and through tritonclient.http with binary tensors, the two taking turns in each
round: latency (p50, p99) at concurrency 1, then throughput at concurrency 64 (4 client processes
of 16 threads, each thread with its own client).

--tracing: the gateway's CPU time per request on the HTTP path (POST /v1/models/echo/predict, one
input, from bench.openloop at concurrency 64) for gateways side by side: this tree without
--otlp-endpoint, this tree with it (to a local collector that accepts and drops the spans; every
request then gets a span and a new trace, as bench.openloop sends no traceparent), and, with --before, the gateway of another checkout (e.g. main's),
each round running every gateway in turn. CPU is the gateway's whole process tree (gunicorn master
and workers), from /proc.
"""

from __future__ import annotations

import argparse
import http.server
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.compare import cpu_seconds, descendants
from tests.conftest import Stack
from tests.processes import REPO, free_port, http_ready, wait_until

SENTENCE = "the quick brown fox jumps over the lazy dog while the model server batches requests"


# ----------------------------------------------------------------------------- gRPC against HTTP binary

def _client_loop(kind: str, address: str, model: str, threads: int, seconds: float, results) -> None:
    """One client process: `threads` threads, each with its own client, calling until the time is up."""
    import numpy as np

    if kind == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    data = np.array([[SENTENCE.encode()]], dtype=object)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start_at = time.monotonic() + 0.5  # every thread built its client before the clock starts
    stop_at = start_at + seconds

    def run() -> None:
        client = client_module.InferenceServerClient(address)
        tensor = client_module.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        mine, failed = [], 0
        client.infer(model, [tensor])  # warm the connection
        while time.monotonic() < start_at:
            time.sleep(0.001)
        while True:
            began = time.perf_counter()
            if time.monotonic() >= stop_at:
                break
            try:
                client.infer(model, [tensor])
                mine.append(time.perf_counter() - began)
            except Exception:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put((latencies, errors[0]))


def load(kind: str, address: str, model: str, concurrency: int, seconds: float) -> dict:
    processes = 1 if concurrency < 16 else 4
    context = multiprocessing.get_context("spawn")  # grpc and fork do not mix
    results = context.Queue()
    children = [context.Process(target=_client_loop,
                                args=(kind, address, model, concurrency // processes, seconds, results))
                for _ in range(processes)]
    for child in children:
        child.start()
    latencies, errors = [], 0
    for _ in children:
        got, failed = results.get(timeout=seconds + 120)
        latencies.extend(got)
        errors += failed
    for child in children:
        child.join(timeout=30)
    latencies.sort()
    return {"req_per_s": len(latencies) / seconds, "errors": errors,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan")}


def grpc_against_http(args, workdir: Path) -> None:
    stack = Stack(workdir)
    try:
        stack.start_broker()
        if args.model_path:
            stack.start_worker("--model", "bench", "--model-path", args.model_path)
            model = "bench"
        else:
            stack.start_worker("--model", "echo", "--max-batch-size", "256")
            model = "echo"
        grpc_address = f"127.0.0.1:{free_port()}"
        gateway, url = stack.start_gateway("--grpc-bind", grpc_address, *args.gateway_flags.split())
        gateway.wait_for_output("grpc ready", timeout_s=60)
        wait_until(lambda: http_ready(url, f"/v2/models/{model}/ready"), timeout_s=120, what="the model ready")
        addresses = {"grpc": grpc_address, "http": url.removeprefix("http://")}
        rows: dict[tuple[str, int], list[dict]] = {}
        for round_index in range(args.rounds):
            for concurrency in (1, 64):
                order = ("grpc", "http") if round_index % 2 == 0 else ("http", "grpc")
                for kind in order:
                    point = load(kind, addresses[kind], model, concurrency, args.seconds)
                    rows.setdefault((kind, concurrency), []).append(point)
                    print(f"round {round_index + 1} {kind} c{concurrency}: {point['req_per_s']:.1f} req/s, "
                          f"p50 {point['p50_ms']:.2f} ms, p99 {point['p99_ms']:.2f} ms, errors {point['errors']}",
                          flush=True)
        print(f"\nmodel {model}, one BYTES input of {len(SENTENCE)} characters a request, {args.seconds:g} s a run\n")
        print("| path | concurrency | req/s per round (median) | p50 ms per round | p99 ms per round | errors |")
        print("|---|---|---|---|---|---|")
        for (kind, concurrency), points in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            label = "gRPC (tritonclient.grpc)" if kind == "grpc" else "HTTP binary (tritonclient.http)"
            column = {key: ", ".join(f"{p[key]:.{digits}f}" for p in points)
                      for key, digits in (("req_per_s", 1), ("p50_ms", 2), ("p99_ms", 2))}
            median = statistics.median(p["req_per_s"] for p in points)
            print(f"| {label} | {concurrency} | {column['req_per_s']} ({median:.1f}) | {column['p50_ms']} | "
                  f"{column['p99_ms']} | {sum(p['errors'] for p in points)} |")
    finally:
        stack.stop_all()


# ----------------------------------------------------------------------------- the cost of tracing

class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def tracing_cost(args, workdir: Path) -> None:
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    collector = f"http://127.0.0.1:{sink.server_address[1]}"
    stack = Stack(workdir)
    gateways: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        stack.start_broker()
        stack.start_worker("--model", "echo", "--max-batch-size", "256")
        # With --otlp-endpoint every request gets a span (a new trace when it brings no traceparent;
        # bench.openloop sends none) that is exported, and its context goes to the broker and worker.
        configs = [("this tree, no tracing", REPO, []),
                   ("this tree, --otlp-endpoint", REPO, ["--otlp-endpoint", collector])]
        if args.before:
            configs.insert(0, (f"before ({args.before})", Path(args.before), []))
        for index, (name, source, flags) in enumerate(configs):
            port = free_port()
            # Its own directory as cwd: `python -m` and gunicorn put the cwd first on sys.path.
            process = subprocess.Popen([sys.executable, "-m", "gateway", "--broker", stack.frontend, "--bind",
                                        f"127.0.0.1:{port}", "--workers", "1", *flags], cwd=source,
                                       env={**os.environ, "PYTHONPATH": str(source)},
                                       stdout=open(workdir / f"gateway-{index}.log", "wb"), stderr=subprocess.STDOUT)
            gateways[name] = (process, f"http://127.0.0.1:{port}")
        for name, (process, url) in gateways.items():
            wait_until(lambda: http_ready(url), timeout_s=120, what=f"gateway {name}")
        rows: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            names = list(gateways)
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                process, url = gateways[name]
                pids = descendants([process.pid])
                before = sum(cpu_seconds(pids).values())
                result = subprocess.run(
                    [sys.executable, "-m", "bench.openloop", "--url", f"{url}/v1/models/echo/predict",
                     "--concurrency", "64", "--seconds", str(args.seconds), "--inputs", "1"],
                    cwd=REPO, capture_output=True, text=True, check=True)
                used = sum(cpu_seconds(descendants([process.pid])).values()) - before
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                per_request_ms = 1000 * used / max(1, figures["ok"])
                rows.setdefault(name, []).append(per_request_ms)
                print(f"round {round_index + 1} {name}: {figures['ok']} ok, {figures.get('req_per_s', 0):.1f} req/s, "
                      f"gateway CPU {per_request_ms:.3f} ms/request", flush=True)
        print(f"\nHTTP POST /v1/models/echo/predict, one input, concurrency 64, {args.seconds:g} s a run\n")
        print("| gateway | CPU ms/request per round | median |\n|---|---|---|")
        for name, values in rows.items():
            print(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")
    finally:
        for process, _ in gateways.values():
            process.terminate()
            process.wait(timeout=60)
        stack.stop_all()
        sink.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-path", default=None, help="serve this model instead of the echo worker")
    parser.add_argument("--gateway-flags", default="--workers 1 --threads 128 --grpc-threads 64")
    parser.add_argument("--tracing", action="store_true", help="measure the gateway's CPU per request with and "
                                                                "without tracing instead")
    parser.add_argument("--before", default=None, help="with --tracing: another checkout's gateway too")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ddml-bench-grpc-"))
    (tracing_cost if args.tracing else grpc_against_http)(args, workdir)


if __name__ == "__main__":
    main()
