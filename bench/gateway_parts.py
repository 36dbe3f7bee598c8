"""The gateway's CPU per request, piece by piece: thread-time microbenchmarks, in one process.

    .venv/bin/python -m bench.gateway_parts [--n 20000] [--repeats 5]
    .venv/bin/python -m bench.gateway_parts --proc [--rounds 2] [--rate 4200]

Each piece runs `--n` times in a loop, timed by this thread's CPU clock (time.thread_time_ns: no
preemption, no other process, no wall clock), `--repeats` times; the median is printed in µs per
request. The request is bench.overhead's: a single-sentence JSON body to /v1/models/echo/predict.

- the Falcon ASGI apps called in a loop as uvicorn calls them (scope, receive, send), on a stub
  broker that answers at once: the bare echo app (bench/peers/echo_app.py), the gateway's app
  (which answers this request itself: gateway/hot_path.py), the same app with every request
  through Falcon (as before that path), and that with no middleware (the difference is the
  middleware's cost);
- the gateway's own steps on their own: JSON parse, validation (model name, body, declared
  tensors), the REQUEST's encode, the REPLY's decode, the reply's render, the HTTP metrics;
- zmq: a DEALER here sending the REQUEST's frames to a ROUTER in another process that answers
  each with the REPLY's frames, 64 in flight: this process's CPU (its zmq I/O thread included,
  so by the process's clock, not the thread's) per round trip, with no Python work but the
  send and receive calls.

What uvicorn and httptools cost (the protocol's parse and write, the event loop, the ASGI task)
is not here: it is the bare ASGI echo's /proc total (bench.overhead) less its app's figure here.
PROMETHEUS_MULTIPROC_DIR is set to a fresh directory, as ddml-gateway does.

--proc gives those totals instead, as bench.overhead does (wrk at c64, this tree's ddml with the
echo worker and the bare ASGI echo side by side, `--rounds` rounds), but with each process's
user and system CPU per request apart; with --rate R, also the bare echo under an open loop of R
req/s (bench.openloop, 8 s), the rate ddml reached: at a lower rate each request carries more of
a server's per-wake-up costs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ddml-parts-metrics-"))

BODY = b'{"inputs": ["The quick brown fox jumps over the lazy dog near the river bank today."]}'
PATH = "/v1/models/echo/predict"
HEADERS = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
           (b"content-length", str(len(BODY)).encode())]


class StubBroker:
    """Answers at once with the inputs (the echo model), without encoding anything."""

    async def request(self, model, inputs, timeout_s, priority=0, request_id_prefix="", timings=None):
        return inputs

    async def status(self, timeout_s=2.0, every_broker=True):
        return {"instance_id": "stub", "models": {"echo": {"workers": 1, "queued_requests": 0, "metadata": {}}},
                "workers": [{"worker_id": "ab", "models": ["echo"], "host": "h", "pid": 1, "device": "cpu",
                             "state": "idle", "max_batch_size": 8}], "stats": {}}


def scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": HEADERS, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "ddml.body_arrived": True}


def asgi_loop(app, path: str, n: int) -> float:
    """µs of this thread's CPU per call of the ASGI app, n calls in one coroutine."""
    message = {"type": "http.request", "body": BODY, "more_body": False}
    statuses = []

    async def receive():
        return message

    async def send(event):
        if event["type"] == "http.response.start":
            statuses.append(event["status"])

    async def run() -> float:
        for _ in range(200):  # warm: caches, the catalog's first fetch
            await app(scope(path), receive, send)
        started = time.thread_time_ns()
        for _ in range(n):
            await app(scope(path), receive, send)
        return (time.thread_time_ns() - started) / n / 1000

    took = asyncio.run(run())
    if set(statuses) != {200}:
        raise SystemExit(f"{path}: statuses {sorted(set(statuses))}")
    return took


def timed(function, n: int) -> float:
    for _ in range(200):
        function()
    started = time.thread_time_ns()
    for _ in range(n):
        function()
    return (time.thread_time_ns() - started) / n / 1000


class _IdContext:
    request_id = "0123456789abcdef0123456789abcdef"  # what RequestIdMiddleware would have set


def _id_request():
    import falcon
    import falcon.asgi

    class Context(falcon.Context, _IdContext):
        pass

    class Request(falcon.asgi.Request):
        context_type = Context

    return Request


def pieces(n: int) -> dict[str, float]:
    import orjson

    from bench.peers import echo_app
    from ddml_common import protocol
    from gateway import app as gateway_app
    from gateway import metrics
    from gateway.broker_client import request_message
    from gateway.catalog import check_model_name
    from gateway.config import GatewayConfig
    from gateway.resources import PredictResource, _JSON_OPTIONS
    from gateway.tensors import check_v1_inputs

    config = GatewayConfig()
    request_type = _id_request()
    figures = {"Falcon ASGI app: bare echo": asgi_loop(echo_app.asgi, "/echo", n)}
    figures["gateway's app (its own predict path), stub broker"] = asgi_loop(
        gateway_app.create_app(StubBroker(), config), PATH, n)
    through_falcon = gateway_app.create_app(StubBroker(), config)
    through_falcon.predict = None  # every request through Falcon's Request, router, middleware and Response
    figures["gateway's app through Falcon, stub broker"] = asgi_loop(through_falcon, PATH, n)
    real_app = gateway_app.GatewayApp
    try:
        gateway_app.GatewayApp = lambda middleware=None, **kwargs: real_app(request_type=request_type, **kwargs)
        bare = gateway_app.create_app(StubBroker(), config)
    finally:
        gateway_app.GatewayApp = real_app
    bare.predict = None
    figures["gateway's app through Falcon, stub broker, no middleware"] = asgi_loop(bare, PATH, n)

    document = orjson.loads(BODY)
    resource = PredictResource(StubBroker(), config, None)
    inputs = document["inputs"]
    metadata = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}],
                "outputs": [{"name": "OUT", "datatype": "BYTES", "shape": [-1, 1]}]}
    figures["JSON parse (orjson.loads)"] = timed(lambda: orjson.loads(BODY), n)
    figures["validation (name, body, declared tensors)"] = timed(
        lambda: (check_model_name("echo"), resource._validate(document), check_v1_inputs("echo", metadata, inputs)), n)
    encoded = [protocol.encode_value(v) for v in inputs]
    message = request_message("0123456789abcdef0123456789abcdef/1234-1", "echo", inputs, encoded, 30.0, 0)
    figures["REQUEST encode (values, message, frames)"] = timed(
        lambda: protocol.encode(request_message("0123456789abcdef0123456789abcdef/1234-1", "echo", inputs,
                                                [protocol.encode_value(v) for v in inputs], 30.0, 0)), n)
    reply_frames = protocol.encode(protocol.Reply(message.request_id, outputs=encoded))
    figures["REPLY decode (frames, values)"] = timed(
        lambda: [protocol.decode_value(o) for r in protocol.replies_of(protocol.decode(reply_frames)) for o in r.outputs], n)
    out = {"model": "echo", "outputs": inputs}
    figures["render (orjson.dumps)"] = timed(lambda: orjson.dumps(out, option=_JSON_OPTIONS,
                                                                  default=protocol.to_jsonable), n)
    children = (metrics.HTTP_REQUESTS.labels(PATH, "POST", "200"), metrics.HTTP_DURATION.labels(PATH, "POST", "200"))
    figures["metrics: counter + histogram per request, multiprocess"] = timed(
        lambda: (children[0].inc(), children[1].observe(0.0012)), n)
    figures["metrics: metrics.count(), flushed every 16 requests"] = count_per_turn(n, 16)
    figures["request state (gateway/requests.py), 64 at a time"] = request_state(n)
    figures["zmq round trip, process CPU incl. I/O thread"] = zmq_round_trip(n, [bytes(f) for f in protocol.encode(message)],
                                                                              [bytes(f) for f in reply_frames])
    return figures


def count_per_turn(n: int, per_turn: int) -> float:
    """metrics.count() on an event loop, `per_turn` requests a loop turn, with the flush() that ends
    each turn: µs of this thread's CPU per request."""
    from gateway import metrics

    async def run(turns: int) -> float:
        started = time.thread_time_ns()
        for _ in range(turns):
            started_at = time.perf_counter()
            for _ in range(per_turn):
                metrics.count(PATH, "POST", 200, started_at)  # (schedules one flush a turn, run below)
            metrics.flush()
        took = time.thread_time_ns() - started
        await asyncio.sleep(0)
        return took / (turns * per_turn) / 1000

    asyncio.run(run(200))
    return asyncio.run(run(max(1, n // per_turn)))


def request_state(n: int, window: int = 64) -> float:
    """The transport's pure core per request: submit, flush (send), the reply, flush (resolve), as
    the async transport drives it at c64: `window` requests a turn."""
    from ddml_common import protocol
    from gateway.links import Links
    from gateway.requests import Requests

    links = Links(["tcp://127.0.0.1:5555"], 3.0)
    links.started(0.0)
    links.heartbeat(0, "i0", 0.0)
    requests = Requests(links, restart_grace_s=3.0)
    message = protocol.Request("r", "echo", timeout_ms=30000, inputs=[b"x"])
    ids = [f"r{i}" for i in range(window)]
    replies = [protocol.Reply(request_id, [b"y"]) for request_id in ids]
    send = lambda instruction: True  # noqa: E731

    def turn() -> None:
        now = time.monotonic()
        for request_id in ids:
            requests.submit(request_id, message, 30.0, now)
        requests.links_changed(now)
        requests.flush(send, now)
        for reply in replies:
            requests.reply(0, reply, now)
        requests.links_changed(now)
        if len(requests.flush(send, now)) != window:
            raise SystemExit("the request state did not resolve every request")

    return timed(turn, max(1, n // window)) / window


def _router(endpoint_queue, reply: list[bytes], n: int) -> None:
    import zmq

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    endpoint_queue.put(port)
    for _ in range(n):
        identity, *_ = router.recv_multipart()
        router.send_multipart([identity, *reply])
    router.close(linger=1000)
    context.term()


def zmq_round_trip(n: int, request: list[bytes], reply: list[bytes], window: int = 64) -> float:
    """This process's CPU (user + system, every thread) per request sent and reply received."""
    import zmq

    ports = multiprocessing.Queue()
    total = n + 1000
    peer = multiprocessing.Process(target=_router, args=(ports, reply, total), daemon=True)
    peer.start()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{ports.get(timeout=30)}")
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)

    def run(count: int) -> None:
        sent = received = 0
        while received < count:
            while sent < count and sent - received < window:
                dealer.send_multipart(request, copy=False)
                sent += 1
            if not poller.poll(10_000):
                raise SystemExit("the ROUTER stopped answering")
            while received < count:
                try:
                    dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                received += 1

    run(1000)
    started = os.times()
    run(n)
    ended = os.times()
    dealer.close(linger=0)
    context.term()
    peer.join(10)
    return ((ended.user - started.user) + (ended.system - started.system)) / n * 1e6


def _user_system_s(pids: list[int]) -> tuple[float, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / ticks, system / ticks


def proc_split(rounds: int, rate: float | None) -> None:
    """wrk at c64 against ddml and the bare ASGI echo in turn; user and system µs per request."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    from bench.compare import write_bodies
    from bench.overhead import LUA, settle, start_bare, start_ddml
    from tests.processes import REPO

    logdir = Path(tempfile.mkdtemp(prefix="ddml-parts-"))
    bodies = logdir / "bodies.jsonl"
    write_bodies(bodies, 1000, seed=3)
    systems = [start_ddml("ddml", REPO, logdir), start_bare("bare ASGI", "uvicorn_worker.UvicornWorker", logdir)]
    try:
        for _ in range(rounds):
            for system in systems:
                pids = system.pids()
                before = {role: _user_system_s(p) for role, p in pids.items()}
                output = subprocess.run(
                    ["wrk", "-t", "2", "-c", "64", "-d", "5s", "--timeout", "30s", "-s", str(LUA), system.url],
                    env={**os.environ, "BENCH_TEXTS": str(bodies), "BENCH_PATH": system.path, "BENCH_INPUTS": "1"},
                    capture_output=True, text=True, timeout=70).stdout
                after = {role: _user_system_s(p) for role, p in pids.items()}
                result = json.loads(re.search(r"BENCH_RESULT (\{.*\})", output).group(1))
                done = max(result["requests"], 1)
                print(f"{system.name}: {done / (result['duration_us'] / 1e6):,.0f} req/s, µs per request: " + ", ".join(
                    f"{role} user {(after[role][0] - before[role][0]) / done * 1e6:.0f} "
                    f"system {(after[role][1] - before[role][1]) / done * 1e6:.0f}" for role in pids), flush=True)
                settle(system)
            if rate:
                echo = systems[1]
                pids = [pid for group in echo.pids().values() for pid in group]
                before = _user_system_s(pids)
                output = subprocess.run([sys.executable, "-m", "bench.openloop", "--url", echo.url + echo.path, "--rate",
                                         str(rate), "--seconds", "8", "--max-connections", "64"],
                                        capture_output=True, text=True, timeout=120).stdout
                after = _user_system_s(pids)
                result = json.loads(output.strip().splitlines()[-1])
                done = max(result["ok"], 1)
                print(f"bare ASGI, open loop at {rate:g} req/s: {result['req_per_s']:,.0f} req/s, µs per request: "
                      f"user {(after[0] - before[0]) / done * 1e6:.0f} system {(after[1] - before[1]) / done * 1e6:.0f}",
                      flush=True)
                settle(echo)
    finally:
        for system in systems:
            system.stop()
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--proc", action="store_true", help="the /proc totals at c64, user and system apart")
    parser.add_argument("--rounds", type=int, default=2, help="with --proc")
    parser.add_argument("--rate", type=float, help="with --proc: the bare echo under an open loop at this rate too")
    args = parser.parse_args()
    if args.proc:
        return proc_split(args.rounds, args.rate)
    rounds = [pieces(args.n) for _ in range(args.repeats)]
    print("\n| piece | µs per request (median) | each repeat |\n|---|---:|---|")
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
