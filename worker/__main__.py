"""`ddml-worker` / `python -m worker`: serve one model to a broker, from any host.

With --num-workers N (or --cuda-devices), this process becomes a supervisor: it spawns N
worker processes round-robin over the devices (each sees only its GPU), restarts any that
dies, and forwards SIGTERM so they drain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time

import zmq

from broker import protocol
from broker.cli import Parser, configure_logging
from worker.config import WorkerConfig
from worker.connection import BrokerConnection, ComputeState
from worker.loop import run_worker
from worker.models import create_handler

logger = logging.getLogger("worker")

_RESTART_BACKOFF_S = (1.0, 30.0)  # first and largest delay before restarting a dead worker process


def build_parser() -> Parser:
    parser = Parser("ddml-worker", "Serve a model to a ddml broker. Run as many as you like, on any host.")
    parser.add_argument("--broker", default="tcp://127.0.0.1:5556", help="the broker's backend endpoint")
    parser.add_argument("--model", default="minilm",
                        help="model name clients ask for; built in: minilm (all-MiniLM-L6-v2), echo")
    parser.add_argument("--handler", default=None,
                        help="serve your own class: package.module:ClassName, a subclass of worker.Manager")
    parser.add_argument("--model-path", default=None, help="serve a local Hugging Face model directory")
    parser.add_argument("--task", default="embedding", choices=["embedding", "classification"],
                        help="what the --model-path model does")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, or cuda:N")
    parser.add_argument("--cuda-devices", default="",
                        help="comma-separated GPU indices to spread --num-workers over, e.g. 0,1")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="worker processes to run (>1 or --cuda-devices: supervised, restarted on death)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most inputs per batch")
    parser.add_argument("--max-batches", type=int, default=2,
                        help="batches held at once; 2 receives the next while one computes")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per input for built-in text models")
    parser.add_argument("--heartbeat-interval-ms", type=float, default=1000.0, help="heartbeat period")
    parser.add_argument("--liveness", type=int, default=3,
                        help="silent broker intervals before reconnecting")
    parser.add_argument("--watchdog-s", type=float, default=300.0,
                        help="exit (so a supervisor restarts us) if one batch computes longer than this")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads per process; 0 = cores / processes on the CPU")
    return parser


def config_from_args(args) -> WorkerConfig:
    options = {"max_length": args.max_length} if not args.handler and args.model != "echo" else {}
    return WorkerConfig(
        broker=args.broker,
        model=args.model,
        handler=args.handler,
        model_path=args.model_path,
        task=args.task,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_batches=args.max_batches,
        heartbeat_interval_s=args.heartbeat_interval_ms / 1000,
        liveness=args.liveness,
        watchdog_s=args.watchdog_s,
        torch_threads=args.torch_threads,
        handler_options=options,
    )


def resolve_device(config: WorkerConfig) -> str:
    if config.device != "auto":
        return config.device
    if config.model == "echo" and not config.model_path and not config.handler:
        return "cpu"
    try:
        from worker.models.hf_text import cuda_device_count

        return "cuda:0" if cuda_device_count() > 0 else "cpu"
    except ImportError:
        return "cpu"


def serve(config: WorkerConfig, stop: threading.Event, handler_class: type | None = None) -> None:
    """Load the model, connect, and serve until `stop` is set; then drain and return.

    handler_class, when given, is used instead of config.handler (the in-process Dispatcher
    passes the user's class object, which may live in a script's __main__).
    """
    device = resolve_device(config)
    if config.torch_threads:
        from worker.models.hf_text import set_torch_threads

        set_torch_threads(config.torch_threads)
    if handler_class is not None:
        handler = handler_class(device=device, **config.handler_options)
    else:
        handler = create_handler(config.model, device, config.handler, config.model_path, config.task,
                                 **config.handler_options)
    print(f"worker: loading model {config.model!r} on {device} ...", flush=True)
    started_at = time.monotonic()
    handler.init_model()
    print(f"worker: model loaded in {time.monotonic() - started_at:.1f} s", flush=True)
    max_batch_size = min(config.max_batch_size, handler.max_batch_size or config.max_batch_size)
    ready = protocol.Ready(
        models=[config.model],
        max_batch_size=max_batch_size,
        max_batches=config.max_batches,
        device=_describe_device(device),
        host=socket.gethostname(),
        pid=os.getpid(),
    )
    context = zmq.Context()
    inbox: queue.Queue = queue.Queue()
    state = ComputeState()
    results_endpoint = f"inproc://results-{id(state)}"
    connection = BrokerConnection(config, context, ready, inbox, results_endpoint, state, handler.describe)
    io_thread = threading.Thread(target=connection.run, args=(stop.is_set,), name="broker-io", daemon=True)
    io_thread.start()
    results = context.socket(zmq.PUSH)
    results.connect(results_endpoint)
    print(f"worker ready: serving {config.model!r} to {config.broker} (pid {os.getpid()})", flush=True)
    try:
        run_worker(handler, inbox, results, state)
    finally:
        io_thread.join(timeout=5)
        results.close(linger=0)
        context.term()


def _describe_device(device: str) -> str:
    if not device.startswith("cuda"):
        return device
    try:
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # a description only
        return device


def child_main(config: WorkerConfig, log_level: str, handler_class: type | None = None) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(config, stop, handler_class)


def supervise(config: WorkerConfig, num_workers: int, cuda_devices: list[str], log_level: str,
              stop: threading.Event, handler_class: type | None = None) -> None:
    """Run num_workers processes, round-robin over cuda_devices, restarting any that dies."""
    spawn = multiprocessing.get_context("spawn")
    cpu_threads = config.torch_threads or (max(1, (os.cpu_count() or 1) // num_workers) if not cuda_devices else 0)
    slots: list[dict] = []
    for index in range(num_workers):
        gpu = cuda_devices[index % len(cuda_devices)] if cuda_devices else None
        # With a GPU slot the child sees one GPU as cuda:0; "auto" still falls back to the CPU
        # on a host without CUDA, so the same command works on a laptop.
        child_config = dataclasses.replace(
            config,
            device=config.device if gpu is None or config.device == "cpu" else "auto",
            torch_threads=cpu_threads,
        )
        slots.append({"gpu": gpu, "config": child_config, "process": None, "restart_at": 0.0,
                      "backoff_s": _RESTART_BACKOFF_S[0]})

    def start(slot: dict) -> None:
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if slot["gpu"] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = slot["gpu"]  # the child sees only its GPU
        try:
            process = spawn.Process(target=child_main, args=(slot["config"], log_level, handler_class), daemon=False)
            process.start()
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        slot["process"], slot["started_at"] = process, time.monotonic()
        logger.info("started worker process %d (gpu %s)", process.pid, slot["gpu"])

    for slot in slots:
        start(slot)
    while not stop.wait(0.5):
        now = time.monotonic()
        for slot in slots:
            process = slot["process"]
            if process.is_alive():
                if now - slot["started_at"] > 60:
                    slot["backoff_s"] = _RESTART_BACKOFF_S[0]
                continue
            if slot["restart_at"] == 0.0:
                slot["restart_at"] = now + slot["backoff_s"]
                logger.warning("worker process %d exited with %s; restarting in %.0f s",
                               process.pid, process.exitcode, slot["backoff_s"])
            elif now >= slot["restart_at"]:
                slot["restart_at"] = 0.0
                slot["backoff_s"] = min(slot["backoff_s"] * 2, _RESTART_BACKOFF_S[1])
                start(slot)
    for slot in slots:
        if slot["process"].is_alive():
            os.kill(slot["process"].pid, signal.SIGTERM)
    for slot in slots:
        slot["process"].join(timeout=60)
        if slot["process"].is_alive():
            slot["process"].kill()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = config_from_args(args)
    except ValueError as error:
        sys.exit(f"ddml-worker: {error}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cuda_devices = [d.strip() for d in args.cuda_devices.split(",") if d.strip()]
    if args.num_workers > 1 or cuda_devices:
        supervise(config, max(args.num_workers, 1), cuda_devices, args.log_level, stop)
    else:
        serve(config, stop)
    logger.info("worker stopped: %s", json.dumps({"model": config.model}))


if __name__ == "__main__":
    main()
