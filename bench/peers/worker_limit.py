"""The in-process best: ddml's own worker code, with no server around it. Prints one JSON line.

    python -m bench.peers.worker_limit [--concurrency 1,16,64] [--seconds 5] [-- WORKER FLAGS]

The handler a `ddml-worker --model minilm --device cpu --torch-threads 2` builds (the same flags,
parsed by the worker's own parser; more after `--`), run by the worker's compute side
(worker.loop.run_continuous: its compute lanes, unpadded passes, prepare() on the intake thread),
fed by a closed loop of N clients, each a single-sentence batch put straight in the compute
inbox and replaced as soon as its result comes back: no HTTP, no gateway, no broker, no
broker I/O thread. Its inputs/s at concurrency N is what ddml could serve at cN if serving cost
nothing; bench.compare prints it as a limit row and the ratio of ddml's req/s to it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import statistics
import threading
import time

import zmq

from bench.workload import sentences
from ddml_common import protocol
from worker.link import ComputeState, ResultTag, WorkBatch
from worker.loop import run_continuous

TEXTS_SEED = 2  # bench.compare's: the sentences wrk sends


def build_handler(flags: list[str]):
    """The handler, lanes and pass limits a worker with these flags would run (worker/serve.py's)."""
    from worker.__main__ import build_parser, config_from_args
    from worker.models import create_handler
    from worker.models.hf_text import set_torch_threads

    config = config_from_args(build_parser().parse_args(["--broker", "tcp://127.0.0.1:1", *flags]))
    if config.torch_threads:
        set_torch_threads(config.torch_threads)
    handler = create_handler(config.model, config.device or "cpu", config.handler, config.model_path, config.task,
                             **config.handler_options)
    handler.init_model()
    if getattr(handler, "warmup", None) is not None:
        handler.warmup()
    lanes = config.compute_lanes or max(1, handler.compute_lanes)
    max_batch_size = min(config.max_batch_size, handler.max_batch_size or config.max_batch_size)
    max_inputs = min(config.max_inputs_held or max_batch_size * config.max_batches, protocol.MAX_ITEMS)
    most_inputs, cost_budget, least_inputs = handler.pass_limits()
    return handler, lanes, (min(most_inputs or max_batch_size, max_inputs), cost_budget, least_inputs)


def closed_loop(handler, lanes: int, limits: tuple[int, int, int], concurrency: int, seconds: float,
                texts: list[str]) -> dict:
    """Inputs/s and latency of `concurrency` clients, each sending its next sentence when answered."""
    import torch

    context = zmq.Context()
    endpoint = f"inproc://worker-limit-{concurrency}"
    answers = context.socket(zmq.PULL)
    answers.bind(endpoint)
    results = context.socket(zmq.PUSH)
    results.connect(endpoint)
    inbox: queue.Queue = queue.Queue()
    batch_ids = itertools.count(1)
    next_text = itertools.cycle(texts)
    sent_at: dict[int, float] = {}
    latencies_ms: list[float] = []
    counted = {"answered": 0, "seconds": 0.0, "cpu_s": 0.0}

    def submit() -> None:
        batch_id = next(batch_ids)
        sent_at[batch_id] = time.perf_counter()
        inbox.put(WorkBatch(batch_id, [next(next_text)], request_ids=[str(batch_id)]))

    def clients() -> None:
        """The closed loop, on its own thread: run_continuous's lane 0 must be the main thread."""
        try:
            for _ in range(concurrency):
                submit()
            started_at, cpu_from_s = time.perf_counter(), time.process_time()
            stop_at = started_at + seconds
            while (now := time.perf_counter()) < stop_at:
                if not answers.poll(1000):
                    continue
                tag = ResultTag.decode(answers.recv_multipart()[0])
                latencies_ms.append((time.perf_counter() - sent_at.pop(tag.batch_id)) * 1000)
                counted["answered"] += tag.answered
                submit()
            counted["seconds"] = now - started_at
            counted["cpu_s"] = time.process_time() - cpu_from_s  # all this process's threads: lanes, intake, us
        finally:
            inbox.put(None)  # run_continuous returns

    most_inputs, cost_budget, least_inputs = limits
    thread = threading.Thread(target=clients, name="clients")
    thread.start()
    run_continuous(handler, inbox, results, ComputeState(), most_inputs, cost_budget, least_inputs, lanes,
                   torch.get_num_threads(), torch.set_num_threads)
    thread.join()
    results.close(linger=0)
    answers.close(linger=0)
    context.term()
    # Its CPU, as cores and per input: what ddml's processes together are compared with (bench.compare).
    return {"items_per_s": counted["answered"] / counted["seconds"], "p50_ms": statistics.median(latencies_ms),
            "cpu_cores": counted["cpu_s"] / counted["seconds"],
            "cpu_ms_per_input": counted["cpu_s"] * 1000 / max(1, counted["answered"]),
            "p99_ms": statistics.quantiles(latencies_ms, n=100)[98] if len(latencies_ms) > 1 else latencies_ms[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64", help="closed-loop clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency")
    parser.add_argument("flags", nargs="*", help="worker flags (after --), on top of the defaults",
                        default=[])
    args = parser.parse_args()
    flags = ["--model", "minilm", "--device", "cpu", "--torch-threads", "2", *args.flags]
    handler, lanes, limits = build_handler(flags)
    texts = sentences(5000, seed=TEXTS_SEED)
    closed_loop(handler, lanes, limits, 16, min(2.0, args.seconds), texts)  # warm-up: both lanes, every size
    out = {"lanes": lanes, "pass_limits": list(limits), "flags": flags, "unpadded": not handler.padded}
    out["closed"] = {int(c): closed_loop(handler, lanes, limits, int(c), args.seconds, texts)
                     for c in args.concurrency.split(",")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
