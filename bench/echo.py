"""Echo mode: the broker and its clients alone, with an echo worker (no model).

    .venv/bin/python -m bench.echo [--seconds 10] [--rounds 3] [--window 256] [--curve]
    .venv/bin/python -m bench.echo --raw-clients 3 [--seconds 10] [--window 256]
    .venv/bin/python -m bench.echo --raw-clients 3 --compare-with REV [--rounds 3]

Measures single-input requests/s through the broker from a Python BrokerClient, without HTTP,
keeping --window requests in flight. With --curve it runs a plain-TCP stack and a CurveZMQ
stack in alternating rounds, in one run, and prints the throughput ratio.

With --raw-clients N it measures the broker itself: N client processes, each a bare DEALER that
keeps --window requests in flight (no futures, no threads), so that the load generator costs
as little as Python allows. It reports requests/s and the broker's CPU time per request, read
from /proc: the figure to compare between versions, since req/s on 2 shared cores also
depends on how much CPU the clients and the worker leave the broker.

With --compare-with REV it runs the broker of git revision REV (checked out in a temporary
worktree) and this tree's broker in alternating rounds, in one run, each with the echo worker and
the raw clients of its own tree (the two may speak different protocol versions; each client sends
as its tree's gateway does: one REQUEST per request, or since DDML4 the requests that replace one
message's replies in one REQUESTS), and prints each one's broker CPU per request and the ratio:
before and after a change, side by side on the same noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.compare import cpu_seconds
from ddml_common.keys import ClientKeys
from gateway.broker_client import BrokerClient
from tests.conftest import Stack
from tests.integration.test_security import Keys
from tests.processes import REPO, Process


def throughput(client: BrokerClient, seconds: float, window: int) -> float:
    """Requests per second with `window` requests kept in flight."""
    slots = threading.Semaphore(window)
    done = [0]
    lock = threading.Lock()

    def finished(future) -> None:
        future.result()
        with lock:
            done[0] += 1
        slots.release()

    for _ in range(200):  # warm-up
        client.request("echo", ["warm"], timeout_s=10)
    started_at = time.monotonic()
    stop_at = started_at + seconds
    n = 0
    while time.monotonic() < stop_at:
        slots.acquire()
        client.submit("echo", [n], timeout_s=30).add_done_callback(finished)
        n += 1
    for _ in range(window):
        slots.acquire()
    return done[0] / (time.monotonic() - started_at)


def raw_client(frontend: str, seconds: float, window: int, counts) -> None:
    """One load process: a bare DEALER keeping `window` single-input requests in flight. The requests that
    replace those one message answered go out together, in one REQUESTS message, as the gateway sends the
    requests of one turn of its loop (a protocol without REQUESTS: one REQUEST each, as its gateway did)."""
    import zmq

    from ddml_common import protocol
    from ddml_common.sockets import send_frames

    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(frontend)
    payload = [protocol.encode_value("x" * 16)]
    sent = answered = failed = 0
    together = hasattr(protocol, "Requests")

    def send(count: int) -> None:
        nonlocal sent
        requests = [protocol.Request(str(sent + n + 1), "echo", 30_000, payload) for n in range(count)]
        sent += count
        if together and count > 1:
            send_frames(dealer, protocol.encode(protocol.Requests(requests)), dontwait=False)
            return
        for request in requests:
            send_frames(dealer, protocol.encode(request), dontwait=False)

    send(window)
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        if not dealer.poll(1000):
            continue
        replies = protocol.replies_of(protocol.decode(dealer.recv_multipart()))
        answered += len(replies)
        failed += sum(not reply.ok for reply in replies)
        send(len(replies))
    counts.put((answered, failed))
    dealer.close(linger=0)
    context.term()


_CLIENT = """import json, sys
sys.path.insert(0, {tree!r})
from bench.echo import raw_client
class Counts:
    def put(self, value):
        print(json.dumps(value), flush=True)
raw_client({frontend!r}, {seconds!r}, {window!r}, Counts())
"""


def raw_throughput(clients: int, seconds: float, window: int, source: Path | None = None) -> tuple[float, float]:
    """One round with N raw clients. Returns (requests/s, broker CPU µs per request).
    source: run the broker, the worker and the clients from that checkout instead of this tree (they
    must speak one protocol version)."""
    tree = source or REPO
    stack = Stack(Path(tempfile.mkdtemp(prefix="ddml-echo-")))
    try:
        broker = start_broker(stack, source)
        start_worker(stack, source)
        broker.wait_for_output(r"worker \S+ joined", timeout_s=30)  # registered: requests will find it
        code = _CLIENT.format(tree=str(tree), frontend=stack.frontend, seconds=seconds, window=window)
        processes = [subprocess.Popen([sys.executable, "-c", code], cwd=tree, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(tree)}) for _ in range(clients)]
        time.sleep(1.0)  # the clients import and connect
        cpu_before, started_at = cpu_seconds([broker.pid])[broker.pid], time.monotonic()
        results = [json.loads(process.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1])
                   for process in processes]
        elapsed = time.monotonic() - started_at
        cpu = cpu_seconds([broker.pid])[broker.pid] - cpu_before
        answered = sum(a for a, _ in results)
        failed = sum(f for _, f in results)
        rate, cpu_us = answered / elapsed, cpu / max(answered, 1) * 1e6
        print(f"| {source or 'this tree'} | {clients} raw clients × window {window} | {rate:,.0f} req/s | "
              f"{failed} errors | broker CPU {cpu_us:.1f} µs per request ({cpu / elapsed:.0%} of a core) |",
              flush=True)
        return rate, cpu_us
    finally:
        stack.stop_all()


def start_worker(stack: Stack, source: Path | None) -> Process:
    """An echo worker of this tree, or of another checkout (its own packages first on sys.path)."""
    if source is None:
        return stack.start_worker("--model", "echo", "--max-batch-size", "256")
    code = (f"import sys, runpy; sys.path.insert(0, {str(source)!r}); "
            "runpy.run_module('worker', run_name='__main__', alter_sys=True)")
    worker = Process([sys.executable, "-c", code, "--broker", stack.backend, "--model", "echo", "--max-batch-size",
                      "256"], stack.tmp_path / "worker-base.log")
    stack.processes.append(worker)
    worker.wait_for_output(r"worker ready", timeout_s=120)
    return worker


def start_broker(stack: Stack, source: Path | None) -> Process:
    """The broker of this tree, or of another checkout (its own broker package first on sys.path)."""
    if source is None:
        return stack.start_broker()
    code = (f"import sys, runpy; sys.path.insert(0, {str(source)!r}); "
            "runpy.run_module('broker', run_name='__main__', alter_sys=True)")
    broker = Process([sys.executable, "-c", code, "--frontend", "tcp://127.0.0.1:0", "--backend",
                      "tcp://127.0.0.1:0"], stack.tmp_path / "broker-base.log")
    stack.processes.append(broker)
    match = broker.wait_for_output(r"broker ready frontend=(\S+) backend=(\S+)", timeout_s=30)
    stack.frontend, stack.backend = match.group(1), match.group(2)
    return broker


def compare_brokers(revision: str, clients: int, seconds: float, window: int, rounds: int) -> None:
    worktree = Path(tempfile.mkdtemp(prefix="ddml-base-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), revision],
                   check=True, capture_output=True)
    try:
        base, current = [], []
        for round_index in range(rounds):
            # Alternate which goes first, so neither always runs on a warmer or quieter machine.
            order = [(worktree, base), (None, current)]
            for source, results in order if round_index % 2 == 0 else order[::-1]:
                results.append(raw_throughput(clients, seconds, window, source))
        print(f"\n| broker | req/s per round | CPU µs/request per round | median µs |\n|---|---|---|---|")
        for name, results in ((revision, base), ("this tree", current)):
            print(f"| {name} | {', '.join(f'{r:,.0f}' for r, _ in results)} | "
                  f"{', '.join(f'{c:.1f}' for _, c in results)} | {statistics.median(c for _, c in results):.1f} |")
        ratios = [c / b for (_, b), (_, c) in zip(base, current)]
        print(f"\nCPU per request, this tree / {revision}, per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)


def start(curve: bool, workdir: Path) -> tuple[Stack, BrokerClient]:
    stack = Stack(workdir)
    if curve:
        keys = Keys(workdir)
        stack.start_broker(*keys.broker_flags())
        stack.start_worker("--model", "echo", "--max-batch-size", "256", *keys.client_flags("worker-a"))
        client = BrokerClient(stack.frontend, curve=ClientKeys.load(keys.public("broker"), keys.secret("gateway-a")))
    else:
        stack.start_broker()
        stack.start_worker("--model", "echo", "--max-batch-size", "256")
        client = BrokerClient(stack.frontend)
    while not client.status()["workers"]:
        time.sleep(0.05)
    return stack, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--curve", action="store_true", help="compare plain TCP with CurveZMQ, side by side")
    parser.add_argument("--raw-clients", type=int, default=0, help="measure the broker with N bare DEALER clients")
    parser.add_argument("--compare-with", metavar="REV", default=None,
                        help="with --raw-clients: also run git revision REV's broker, rounds alternating")
    args = parser.parse_args()
    if args.raw_clients and args.compare_with:
        return compare_brokers(args.compare_with, args.raw_clients, args.seconds, args.window, args.rounds)
    if args.raw_clients:
        raw_throughput(args.raw_clients, args.seconds, args.window)
        return
    modes = [False, True] if args.curve else [False]
    results: dict[bool, list[float]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        for mode in modes:
            stack, client = start(mode, Path(tempfile.mkdtemp(prefix="ddml-echo-")))
            try:
                rate = throughput(client, args.seconds, args.window)
                results[mode].append(rate)
                mean_batch = client.status()["models"]["echo"]["mean_batch_size"]
                print(f"round {round_index + 1} {'curve' if mode else 'plain'}: {rate:,.0f} req/s "
                      f"(mean batch {mean_batch})", flush=True)
            finally:
                client.close()
                stack.stop_all()
    print("\n| transport | req/s per round | median |\n|---|---|---|")
    for mode in modes:
        print(f"| {'CurveZMQ' if mode else 'plain TCP'} | {', '.join(f'{r:,.0f}' for r in results[mode])} | "
              f"{statistics.median(results[mode]):,.0f} |")
    if args.curve:
        ratios = [c / p for p, c in zip(results[False], results[True])]
        print(f"\nCurveZMQ / plain, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
