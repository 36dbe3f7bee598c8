"""One broker against two, side by side in one run: what the second broker costs.

    bash bench/peers/setup.sh        # once, for wrk
    .venv/bin/python -m bench.brokers [--seconds 15] [--rounds 3] [--concurrency 64]

Each round starts ddml with one broker, then with two (the worker serves both, the gateway
knows both and prefers the first), with the MiniLM worker of bench.compare (max batch 64,
2 torch threads), and runs wrk at --concurrency against the gateway. It prints HTTP req/s and
the brokers' CPU per request (both brokers' CPU time, over the requests answered) per round,
and the two-broker / one-broker ratios of their medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench import compare
from tests.processes import free_port
from worker.models import default_model_path


def start(brokers: int, logdir: Path) -> compare.Running:
    from tests.conftest import Stack

    logdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(logdir)
    frontends, backends = [], []
    for _ in range(brokers):
        stack.start_broker(frontend=f"tcp://127.0.0.1:{free_port()}", backend=f"tcp://127.0.0.1:{free_port()}")
        frontends.append(stack.frontend)
        backends.append(stack.backend)
    stack.start_worker("--model", "minilm", "--device", "cpu", "--max-batch-size", "64", "--torch-threads", "2",
                       broker=",".join(backends))
    stack.frontend = ",".join(frontends)
    _, url = stack.start_gateway()
    running = compare.Running(f"{brokers} broker(s)", url, "/v1/models/minilm/predict", stack=stack)
    compare.wait_ready(running)
    return running


def broker_cpu_s(running: compare.Running) -> list[float]:
    """CPU seconds of each broker, in --broker order (the first carries the traffic)."""
    pids = [p.pid for p in running.stack.processes if p.args[2] == "broker"]
    seconds = compare.cpu_seconds(pids)
    return [seconds[pid] for pid in pids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="ddml-brokers-"))
    bodies = logdir / "bodies.jsonl"
    compare.write_bodies(bodies)
    figures: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for round_index in range(args.rounds):
        for brokers in ((1, 2) if round_index % 2 == 0 else (2, 1)):
            running = start(brokers, logdir / f"{round_index}-{brokers}")
            try:
                compare.run_wrk(running, 16, 3, bodies)  # warm-up
                cpu_before = broker_cpu_s(running)
                result, _ = compare.run_wrk(running, args.concurrency, args.seconds, bodies)
                answered = result["requests"] - result["status_errors"]
                each_us = [(after - before) / max(answered, 1) * 1e6
                           for before, after in zip(cpu_before, broker_cpu_s(running))]
                cpu_us = sum(each_us)
                rate = answered / (result["duration_us"] / 1e6)
                figures[brokers].append((rate, cpu_us))
                print(f"round {round_index + 1}, {brokers} broker(s): {rate:.1f} req/s, broker CPU {cpu_us:.0f} µs "
                      f"per request ({' + '.join(f'{us:.0f}' for us in each_us)}), "
                      f"{result['status_errors'] + result['socket_errors']} errors", flush=True)
            finally:
                running.stop()
    print(f"\n| brokers | req/s per round (c{args.concurrency}) | broker CPU µs/request per round |\n|---|---|---|")
    for brokers, rows in figures.items():
        print(f"| {brokers} | {', '.join(f'{r:.1f}' for r, _ in rows)} (median "
              f"{statistics.median(r for r, _ in rows):.1f}) | {', '.join(f'{c:.0f}' for _, c in rows)} (median "
              f"{statistics.median(c for _, c in rows):.0f}) |")
    one, two = figures[1], figures[2]
    print(f"\ntwo / one: throughput {statistics.median(r for r, _ in two) / statistics.median(r for r, _ in one):.3f}, "
          f"broker CPU per request {statistics.median(c for _, c in two) / statistics.median(c for _, c in one):.3f}")


if __name__ == "__main__":
    main()
