"""Echo mode: the broker and its clients alone, with an echo worker (no model).

    .venv/bin/python -m bench.echo [--seconds 10] [--rounds 3] [--window 256] [--curve]

Measures single-input requests/s through the broker from a Python BrokerClient, without HTTP,
keeping --window requests in flight. With --curve it runs a plain-TCP stack and a CurveZMQ
stack in alternating rounds, in one run, and prints the throughput ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from broker.curve import ClientKeys
from gateway.broker_client import BrokerClient
from tests.conftest import Stack
from tests.integration.test_security import Keys


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
    args = parser.parse_args()
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
