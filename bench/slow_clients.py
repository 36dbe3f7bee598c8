"""Slow clients against the gateway: a normal request's latency beside connections that trickle
their request heads a byte every 1 to 2 s (issues #28 and #25).

    .venv/bin/python -m bench.slow_clients                       # its own broker, echo worker and gateway
    .venv/bin/python -m bench.slow_clients --counts 0,300,1000 --requests 1000
    .venv/bin/python -m bench.slow_clients --url http://127.0.0.1:8000    # a gateway already running

For each count it starts a separate process that keeps that many connections trickling (each
reconnects when the gateway answers 408 at --header-timeout-s, as a slow client would), waits
until all are open, then times sequential requests (`POST /v1/models/echo/predict`, one input,
one kept-alive connection) and prints p50, p99 and the largest, with how many 408s the trickling
connections got meanwhile. Without --url it starts a broker, an echo worker and a gateway with
--workers 1 (one event loop carries every connection), and raises its file descriptor limit to
fit the connections. `--trickle N --url URL` is the trickling process itself.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
HEAD = (b"POST /v1/models/echo/predict HTTP/1.1\r\nHost: ddml\r\nContent-Type: application/json\r\n"
        b"X-Slow: " + b"s" * 200 + b"\r\n\r\n")  # never finished: 1 byte in 1 to 2 s
BODY = b'{"inputs": ["hello"]}'
OPEN_BATCH = 100  # connections opened at once, so that the listen backlog never overflows


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


# ---------------------------------------------------------------------- the trickling process


async def _trickle_one(host: str, port: int, opened: asyncio.Event, counts: dict) -> None:
    first = True
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(1.0)
            continue
        if first:
            counts["open"] += 1
            first = False
            if counts["open"] >= counts["wanted"]:
                opened.set()
        try:
            for index in range(len(HEAD)):
                writer.write(HEAD[index:index + 1])
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(4096), random.uniform(1.0, 2.0))
                except TimeoutError:
                    continue
                if answer.startswith(b"HTTP/1.1 408"):
                    counts["408"] += 1
                break  # answered or closed: a slow client comes back
        except OSError:
            pass
        finally:
            writer.close()


async def _trickle(url: str, count: int) -> None:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    counts = {"wanted": count, "open": 0, "408": 0, "refused": 0}
    opened = asyncio.Event()
    tasks = []
    for start in range(0, count, OPEN_BATCH):
        tasks += [asyncio.create_task(_trickle_one(host, port, opened, counts))
                  for _ in range(min(OPEN_BATCH, count - start))]
        await asyncio.sleep(0.05)
    await opened.wait()
    print(f"trickling {count}", flush=True)
    while True:  # until the parent ends this process; it reads the last line for the counts
        await asyncio.sleep(0.5)
        print(f"counts 408={counts['408']} refused={counts['refused']}", flush=True)


def start_trickling(url: str, count: int, log_path: Path, timeout_s: float = 120.0) -> subprocess.Popen:
    """A process keeping `count` connections trickling; returns once all are open."""
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "bench.slow_clients", "--trickle", str(count), "--url", url],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    give_up_at = time.monotonic() + timeout_s
    while f"trickling {count}" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > give_up_at:
            process.kill()
            raise RuntimeError(f"the trickling process did not open {count} connections:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return process


def stop_trickling(process: subprocess.Popen, log_path: Path) -> dict:
    """End the trickling process; the counts it last printed."""
    process.kill()
    process.wait(10)
    found = re.findall(r"counts 408=(\d+) refused=(\d+)", log_path.read_text(errors="replace"))
    return {"408": int(found[-1][0]), "refused": int(found[-1][1])} if found else {"408": 0, "refused": 0}


# ---------------------------------------------------------------------- the normal requests


def latencies_s(url: str, requests: int, timeout_s: float = 30.0) -> list[float]:
    """Sequential predict requests on one kept-alive connection: each one's seconds."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    headers = {"Content-Type": "application/json"}
    times = []
    try:
        for _ in range(requests):
            started_at = time.perf_counter()
            connection.request("POST", "/v1/models/echo/predict", body=BODY, headers=headers)
            response = connection.getresponse()
            response.read()
            times.append(time.perf_counter() - started_at)
            if response.status != 200:
                raise RuntimeError(f"a normal request got {response.status}")
    finally:
        connection.close()
    return times


def percentile_ms(times_s: list[float], fraction: float) -> float:
    ordered = sorted(times_s)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


# ---------------------------------------------------------------------- a stack of its own


def _start_stack(logdir: Path, gateway_flags: list[str]) -> tuple[list[subprocess.Popen], str]:
    def spawn(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        path = logdir / f"{name}.log"
        process = subprocess.Popen([sys.executable, "-m", *args], stdout=open(path, "wb"), stderr=subprocess.STDOUT,
                                   cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        return process, path

    def wait_for(path: Path, pattern: str) -> re.Match:
        give_up_at = time.monotonic() + 120
        while time.monotonic() < give_up_at:
            found = re.search(pattern, path.read_text(errors="replace"))
            if found:
                return found
            time.sleep(0.1)
        raise RuntimeError(f"{path.name}: no {pattern!r}:\n{path.read_text(errors='replace')[-2000:]}")

    broker, broker_log = spawn("broker", "broker", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0")
    frontend, backend = wait_for(broker_log, r"broker ready frontend=(\S+) backend=(\S+)").groups()
    worker, worker_log = spawn("worker", "worker", "--broker", backend, "--model", "echo")
    wait_for(worker_log, "worker ready")
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway, _ = spawn("gateway", "gateway", "--broker", frontend, "--bind", f"127.0.0.1:{port}", "--workers", "1",
                       *gateway_flags)
    url = f"http://127.0.0.1:{port}"
    give_up_at = time.monotonic() + 120
    while True:
        try:
            latencies_s(url, 1, timeout_s=5)
            break
        except (OSError, RuntimeError, http.client.HTTPException):
            if time.monotonic() > give_up_at:
                raise
            time.sleep(0.2)
    return [gateway, worker, broker], url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gateway (default: start a stack of its own)")
    parser.add_argument("--counts", default="0,300,1000", help="trickling connections, comma-separated")
    parser.add_argument("--requests", type=int, default=1000, help="normal requests timed at each count")
    parser.add_argument("--gateway-flags", default="", help="more flags for the gateway it starts")
    parser.add_argument("--trickle", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    raise_fd_limit(max(counts + [args.trickle or 0]) * 2 + 1024)  # inherited by the gateway it starts
    if args.trickle is not None:
        asyncio.run(_trickle(args.url, args.trickle))
        return
    logdir = Path(tempfile.mkdtemp(prefix="ddml-slow-clients-"))
    processes, url = ([], args.url) if args.url else _start_stack(logdir, args.gateway_flags.split())
    try:
        latencies_s(url, 200)  # warm-up
        print("| trickling connections | normal requests | p50 ms | p99 ms | max ms | 408s to tricklers |")
        print("|---:|---:|---:|---:|---:|---:|")
        for count in counts:
            trickler = start_trickling(url, count, logdir / f"trickle-{count}.log") if count else None
            times = latencies_s(url, args.requests)
            refused = stop_trickling(trickler, logdir / f"trickle-{count}.log") if trickler else {"408": 0}
            print(f"| {count} | {len(times)} | {percentile_ms(times, 0.5):.2f} | {percentile_ms(times, 0.99):.2f} | "
                  f"{max(times) * 1000:.2f} | {refused['408']} |", flush=True)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    print(f"\nlogs: {logdir}")


if __name__ == "__main__":
    main()
