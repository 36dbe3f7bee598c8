"""Soak: load for a long time while workers are killed, stopped and restarted at random.

    .venv/bin/python -m bench.soak [--minutes 10] [--workers 3] [--concurrency 16]

Prints the same figures as the chaos tests (sent, ok, errors by code, lost, duplicated, wrong),
the chaos actions taken, and the broker's memory over time. Not part of CI.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

from gateway.broker_client import BrokerClient
from tests.chaos import Load, rss_bytes
from tests.conftest import Stack

HB = ("--heartbeat-interval-ms", "200")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    stack = Stack(Path(tempfile.mkdtemp(prefix="ddml-soak-")))
    flags = ("--model", "echo", "--max-batch-size", "16", *HB)
    actions: Counter[str] = Counter()
    memory: list[tuple[float, float]] = []
    try:
        broker = stack.start_broker(*HB)
        workers = [stack.start_worker(*flags) for _ in range(args.workers)]
        client = BrokerClient(stack.frontend, heartbeat_interval_s=0.2)
        while len(client.status()["workers"]) < args.workers:
            time.sleep(0.1)
        started_at = time.monotonic()
        end_at = started_at + args.minutes * 60
        next_memory_at = started_at
        with Load(client, concurrency=args.concurrency, timeout_s=10, extra={"sleep_s": 0.005}) as load:
            while time.monotonic() < end_at:
                now = time.monotonic()
                if now >= next_memory_at:
                    memory.append((now - started_at, rss_bytes(broker.pid) / 2**20))
                    next_memory_at += 30
                time.sleep(rng.uniform(3, 10))
                victim = rng.choice(workers)
                action = rng.choice(["sigkill", "sigterm", "sigstop"])
                actions[action] += 1
                if action == "sigstop":
                    victim.signal(signal.SIGSTOP)
                    time.sleep(rng.uniform(1, 3))
                    victim.signal(signal.SIGCONT)
                    continue
                if action == "sigkill":
                    victim.kill()
                else:
                    victim.stop()
                workers.remove(victim)
                workers.append(stack.start_worker(*flags))
            tally = load.stop()
        memory.append((time.monotonic() - started_at, rss_bytes(broker.pid) / 2**20))
        status = client.status()
        client.close()
    finally:
        stack.stop_all()
    errors = ", ".join(f"{k} {v}" for k, v in sorted(tally.errors.items())) or "0"
    print(f"\n## Soak: {args.minutes:g} min, {args.workers} echo workers, concurrency {args.concurrency}\n")
    print("| sent | ok | errors | lost | duplicated | wrong | chaos actions | redispatched |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {tally.sent} | {tally.ok} | {errors} | {tally.lost} | {tally.duplicated} | {tally.wrong} | "
          f"{dict(actions)} | {status['models']['echo']['redispatched']} |")
    print("\nbroker RSS over time (MiB): " + ", ".join(f"{t:.0f}s {m:.1f}" for t, m in memory))


if __name__ == "__main__":
    main()
