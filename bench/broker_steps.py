"""The broker's loop alone: the thread CPU that Broker.step() spends per request, in process.

    .venv/bin/python bench/broker_steps.py [--rounds 5] [--before REV]

A Broker over inproc sockets with the real clock, one echo "worker" and N gateway DEALERs
driven from this thread (they answer at once), so that only step() is timed (time.thread_time
around each call: no network, no other process, no I/O thread of libzmq on the path):
- c1: one request at a time, as at wrk -c1: every request takes two wake-ups of its own;
- c64 over 64 DEALERs: 64 requests at once from 64 DEALERs, as a threaded gateway sends them
  (a DEALER per thread), so each reply is a message of its own;
- c64 over 1 DEALER: the same 64 from one DEALER, as a gateway with one DEALER per process
  sends them, so the replies a batch finishes go back together (REPLIES);
- c64 as the async gateway sends: the same 64 from one DEALER as one REQUESTS message, as the
  gateway's event loop sends the requests of one turn (DDML4); a tree whose protocol has no
  REQUESTS sends them as "c64 over 1 DEALER" does, as its gateway would.
Each figure is the best of --repeats runs (the least disturbed by the rest of the machine).
With --before REV, REV's broker (a temporary worktree) and this tree's take turns, each run in
a process of its own with its checkout first on sys.path, and the ratio is printed per round.
Run it as a file (not -m), so that `broker` is imported from the checkout given by PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
CASES = (("c1", 1, 1, 2000, False), ("c64 over 64 DEALERs", 64, 64, 40, False), ("c64 over 1 DEALER", 64, 1, 40, False),
         ("c64 as the async gateway sends", 64, 1, 40, True))


def step_us_per_request(concurrency: int, dealers: int, rounds: int, input_bytes: int = 0,
                        together: bool = False) -> float:
    """Broker.step()'s thread CPU per request, over `rounds` rounds of `concurrency` requests."""
    import zmq

    from broker.broker import Broker
    from broker.config import BrokerConfig
    from ddml_common import protocol

    context = zmq.Context()
    name = uuid.uuid4().hex
    broker = Broker(BrokerConfig(frontend=f"inproc://front-{name}", backend=f"inproc://back-{name}"), context)
    broker.bind()
    worker = context.socket(zmq.DEALER)
    worker.connect(broker.backend_endpoint)
    worker.send(protocol.encode(protocol.Ready(["echo"], 64, 2))[0])
    gateways = []
    for index in range(dealers):
        gateway = context.socket(zmq.DEALER)
        gateway.setsockopt(zmq.IDENTITY, b"g%d" % index)
        gateway.connect(broker.frontend_endpoint)
        gateways.append(gateway)
    for _ in range(5):
        broker.step(10)
    # --input-bytes: one input of that size (an image's tensor, say), answered with a small output, so that
    # the figure is the input's way through the broker.
    payload = [protocol.encode_value(bytes(input_bytes) if input_bytes else "the quick brown fox")]
    spent_s = 0.0
    try:
        for round_index in range(rounds):
            requests = [protocol.Request(f"{round_index}-{index}", "echo", 30_000, payload)
                        for index in range(concurrency)]
            if together and hasattr(protocol, "Requests"):
                gateways[0].send_multipart(protocol.encode(protocol.Requests(requests)))
            else:
                for index, request in enumerate(requests):
                    gateways[index % dealers].send_multipart(protocol.encode(request))
            answered = 0
            give_up_at = time.monotonic() + 30
            while answered < concurrency:
                if time.monotonic() > give_up_at:
                    sys.exit(f"only {answered} of {concurrency} requests answered in 30 s")
                started = time.thread_time()
                broker.step(100)
                spent_s += time.thread_time() - started
                while worker.poll(0):
                    message = protocol.decode(worker.recv_multipart())
                    if isinstance(message, protocol.Batch):
                        outputs = [b"\xc0"] * len(message.inputs) if input_bytes else list(message.inputs)
                        worker.send(protocol.encode(protocol.BatchResult(message.batch_id, outputs))[0])
                    elif isinstance(message, protocol.Heartbeat):
                        worker.send(protocol.encode(protocol.Heartbeat())[0])
                for gateway in gateways:
                    while gateway.poll(0):
                        message = protocol.decode(gateway.recv_multipart())
                        answered += len(message.request_ids) if isinstance(message, protocol.Replies) else 1
    finally:
        for socket in (worker, *gateways):
            socket.close(linger=0)
        broker.close()
        context.term()
    return spent_s / (rounds * concurrency) * 1e6


def measure(repeats: int, input_bytes: int = 0) -> dict[str, float]:
    return {name: min(step_us_per_request(c, d, n if not input_bytes else max(n // 10, 10), input_bytes, together)
                      for _ in range(repeats)) for name, c, d, n, together in CASES}


def in_process_of(tree: Path, repeats: int, input_bytes: int = 0) -> dict[str, float]:
    """measure() in a process of its own that imports the broker of `tree`."""
    output = subprocess.run([sys.executable, str(HERE), "--measure", "--repeats", str(repeats),
                             "--input-bytes", str(input_bytes)], cwd=tree,
                            env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                            timeout=600, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="with --before: rounds, the two taking turns")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the best is kept")
    parser.add_argument("--before", metavar="REV", help="also measure git revision REV's broker, in turns")
    parser.add_argument("--input-bytes", type=int, default=0,
                        help="one input of this many bytes per request (e.g. 602112, a 3x224x224 float32 image); "
                             "default: a short text")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.measure:
        return print(json.dumps(measure(args.repeats, args.input_bytes)))
    if not args.before:
        for name, value in measure(args.repeats, args.input_bytes).items():
            print(f"{name}: {value:.1f} µs of step() per request")
        return
    worktree = Path(tempfile.mkdtemp(prefix="ddml-steps-")) / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                   check=True, capture_output=True)
    try:
        runs: dict[str, list[dict]] = {args.before: [], "this tree": []}
        for round_index in range(args.rounds):
            order = [(args.before, worktree), ("this tree", REPO)]
            for name, tree in order if round_index % 2 == 0 else order[::-1]:
                runs[name].append(in_process_of(tree, args.repeats, args.input_bytes))
                print(f"round {round_index + 1} {name}: " + ", ".join(
                    f"{case} {value:.1f} µs" for case, value in runs[name][-1].items()), flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    print(f"\n| case | {args.before} µs/request | this tree µs/request | this tree ÷ {args.before}, per round |"
          "\n|---|---|---|---|")
    for name, *_ in CASES:
        old = [r[name] for r in runs[args.before]]
        new = [r[name] for r in runs["this tree"]]
        print(f"| {name} | {statistics.median(old):.1f} | {statistics.median(new):.1f} | "
              f"{', '.join(f'{b / a:.2f}' for a, b in zip(old, new))} |")


if __name__ == "__main__":
    main()
