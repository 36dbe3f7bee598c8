"""python -m tests.sim: run seeds of the cluster simulation.

    python -m tests.sim --seed 1234 --verbose     replay one seed, printing every event
    python -m tests.sim --seeds 100000            many seeds; prints totals every 1000 and at the end
    python -m tests.sim --seeds 500 --start 9000  a range
"""

from __future__ import annotations

import argparse
import sys

from tests.sim.world import KNOWN_BUGS, SimFailure, run_seed, run_seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--verbose", action="store_true", help="print every event of the run")
    parser.add_argument("--keep-going", action="store_true", help="report every failing seed, not just the first")
    parser.add_argument("--strict", action="store_true",
                        help=f"fail on the known bugs too ({', '.join(sorted(KNOWN_BUGS))}) instead of counting them")
    args = parser.parse_args(argv)
    tolerate = frozenset() if args.strict else KNOWN_BUGS
    if args.seed is not None:
        try:
            result = run_seed(args.seed, verbose=args.verbose, tolerate=tolerate)
        except SimFailure as failure:
            print(failure, file=sys.stderr)
            return 1
        print(f"seed {result.seed}: ok, {result.steps} events, {result.checks} checks, "
              f"{result.virtual_s:.2f} s simulated, digest {result.digest}, faults {dict(result.faults)}")
        return 0
    failures: list[str] = []
    try:
        totals = run_seeds(args.seeds, args.start, tolerate=tolerate, stop_on_failure=not args.keep_going,
                           failures=failures, progress=lambda t: print(t.summary(), flush=True))
    except SimFailure as failure:
        print(failure, file=sys.stderr)
        return 1
    print(totals.summary())
    for failure in failures:
        print(failure.splitlines()[0], file=sys.stderr)
    if failures:
        print(f"{len(failures)} failing seeds", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
