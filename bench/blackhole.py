"""The black-hole scenario of issue #28: one good worker, and one that takes batches, heartbeats and
never answers (it registers again at once whenever the broker drops it).

    .venv/bin/python -m bench.blackhole [--seconds 60] [--rate 20] [--compute-s 0.02]

Open-loop load at a fixed rate through BrokerClient.submit, one input per request, against a real
broker (default flags: 1 s heartbeats, 10 s batch deadline floor), a real echo worker and the
black hole (tests/hostile.py), which registers first. Prints requests, ok, errors by code, p50, p99
and max latency, and how many batches (and inputs) the black hole was given. Not part of CI.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.pipeline import percentile
from gateway.broker_client import BrokerClient, BrokerError
from tests.conftest import Stack
from tests.hostile import BlackHole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--compute-s", type=float, default=0.02, help="the good worker's sleep per batch")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline")
    parser.add_argument("--broker-flag", action="append", default=[], help="extra broker flag (repeatable)")
    args = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="ddml-blackhole-")))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    lock = threading.Lock()
    black_hole = None
    try:
        stack.start_broker(*args.broker_flag)
        black_hole = BlackHole(stack.backend, "echo", max_batch_size=8, max_batches=1).start()
        client = BrokerClient(stack.frontend)
        stack.start_worker("--model", "echo", "--max-batch-size", "8")
        while len(client.status()["workers"]) < 2:
            time.sleep(0.1)

        def record(sent_at: float):
            def done(future) -> None:
                latency_s = time.monotonic() - sent_at
                with lock:
                    try:
                        future.result()
                        latencies.append(latency_s)
                    except BrokerError as error:
                        errors[error.code.value] += 1
                        messages[error.message[:120]] += 1
            return done

        total = int(args.seconds * args.rate)
        futures = []
        started_at = time.monotonic()
        for n in range(total):
            send_at = started_at + n / args.rate
            delay_s = send_at - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)
            future = client.submit("echo", [{"n": n, "sleep_s": args.compute_s}], timeout_s=args.timeout_s)
            future.add_done_callback(record(time.monotonic()))
            futures.append(future)
        for future in futures:
            try:
                future.result(timeout=args.timeout_s + 5)
            except Exception:  # counted by the callback
                pass
        latencies.sort()
        p50, p99 = (percentile(latencies, q) if latencies else math.nan for q in (0.50, 0.99))
        print(f"requests {total}, ok {len(latencies)}, errors {dict(errors) or 0}, "
              f"unanswered {total - len(latencies) - sum(errors.values())}")
        print(f"latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
              f"max {(latencies[-1] if latencies else math.nan) * 1000:.1f} ms")
        print(f"black hole: {black_hole.batches} batches ({black_hole.inputs} inputs), "
              f"{black_hole.registrations} registrations, over {args.seconds:.0f} s")
        for message, count in messages.most_common(3):
            print(f"  {count} x {message}")
        client.close()
    finally:
        if black_hole is not None:
            black_hole.close()
        stack.stop_all()


if __name__ == "__main__":
    main()
