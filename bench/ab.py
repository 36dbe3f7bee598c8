"""A/B of ddml settings in one run: alternate two broker, worker or gateway configurations, same load.

    .venv/bin/python -m bench.ab --a "--refill-wait-max-ms 0" --b "" [--role broker] [--rounds 2]
    .venv/bin/python -m bench.ab --role gateway --a "--workers 1" --b "--workers 2" --concurrency 1,16,64

Each round starts ddml with A, runs wrk at each concurrency, stops it, then does the same with
B, so both see the same machine. Prints req/s, p50, p99 and the mean batch per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench import compare
from worker.models import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="flags of configuration A")
    parser.add_argument("--b", required=True, help="flags of configuration B")
    parser.add_argument("--role", choices=("broker", "worker", "gateway"), default="broker")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", default="16,64")
    args = parser.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="ddml-ab-"))
    bodies = logdir / "bodies.jsonl"
    compare.write_bodies(bodies)
    variable = f"BENCH_DDML_{args.role.upper()}_FLAGS"
    rows: dict[tuple[str, int], list[compare.Point]] = {}
    for round_index in range(args.rounds):
        for label, flags in (("A", args.a), ("B", args.b)):
            os.environ[variable] = flags if args.role != "worker" else (flags or "--torch-threads 2")
            running = compare.start("ddml", logdir / f"{round_index}{label}", str(default_model_path()))
            try:
                compare.run_wrk(running, 16, 3, bodies)  # warm-up
                for concurrency in map(int, args.concurrency.split(",")):
                    point = compare.measure(running, concurrency, args.seconds, bodies)
                    rows.setdefault((label, concurrency), []).append(point)
                    print(f"round {round_index + 1} {label} c{concurrency}: {point.req_per_s:.1f} req/s, "
                          f"p50 {point.p50_ms:.0f} ms, p99 {point.p99_ms:.0f} ms, mean batch {point.mean_batch:.1f}",
                          flush=True)
            finally:
                running.stop()
    print(f"\nA = {args.role} `{args.a}`, B = {args.role} `{args.b}`\n")
    print("| config | concurrency | req/s per round | p99 ms per round | mean batch per round |\n|---|---|---|---|---|")
    for (label, concurrency), points in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {label} | {concurrency} | {', '.join(f'{p.req_per_s:.1f}' for p in points)} "
              f"(median {statistics.median(p.req_per_s for p in points):.1f}) | "
              f"{', '.join(f'{p.p99_ms:.0f}' for p in points)} | {', '.join(f'{p.mean_batch:.1f}' for p in points)} |")


if __name__ == "__main__":
    main()
