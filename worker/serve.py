"""Running workers: one in this process (serve), or several supervised child processes (supervise).

Kept out of __main__ so that spawned children can import child_main under `python -m worker`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Callable

import zmq

from ddml_common import protocol
from ddml_common.cli import configure_logging, stop_on_signals
from worker.config import WorkerConfig
from worker.connection import BrokerConnection, ComputeState
from worker.loop import RESULT_SEND_TIMEOUT_MS, run_continuous, run_counted, run_worker
from worker.models import create_handler

logger = logging.getLogger("worker")

_RESTART_BACKOFF_S = (1.0, 30.0)  # first and largest delay before restarting a dead worker process
_SUPERVISE_TICK_S = 0.2  # how often the supervisor looks at its processes and at the stop flag


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
    handler = load_model(config, device, handler_class)
    max_batch_size = min(config.max_batch_size, handler.max_batch_size or config.max_batch_size)
    # A versioned worker also serves `name@version`, so that a request can pin the version: the
    # broker routes by name, and only this version's workers register that name.
    version = config.model_version or handler.version()
    metadata = handler.metadata()
    if version:
        metadata = {**metadata, "version": version}
    continuous = config.continuous == "on" or (config.continuous == "auto" and handler.continuous)
    max_inputs = lanes = 0
    if continuous:
        lanes = config.compute_lanes or max(1, handler.compute_lanes)
        max_inputs = min(config.max_inputs_held or max_batch_size * config.max_batches, protocol.MAX_ITEMS)
        most_inputs, cost_budget, least_inputs = handler.pass_limits()
        most_inputs = min(most_inputs or max_batch_size, max_inputs)
    ready = protocol.Ready(
        models=[config.model, f"{config.model}@{version}"] if version else [config.model],
        max_batch_size=max_batch_size,
        max_batches=config.max_batches,
        device=_describe_device(device),
        host=socket.gethostname(),
        pid=os.getpid(),
        metadata=metadata,
        max_inputs=max_inputs,
    )
    context = zmq.Context()
    inbox: queue.Queue = queue.Queue()
    state = ComputeState()
    results_endpoint = f"inproc://results-{id(state)}"
    # A batch worker's I/O thread runs a lone short batch itself (BrokerConnection._run_inline).
    inline = None if continuous else functools.partial(run_counted, handler, state=state)
    connection = BrokerConnection(config, context, ready, inbox, results_endpoint, state, handler.describe,
                                  inline=inline)
    io_thread = threading.Thread(target=connection.run, args=(stop.is_set,), name="broker-io", daemon=True)
    io_thread.start()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.SNDTIMEO, RESULT_SEND_TIMEOUT_MS)  # used by a continuous worker's lane 0
    results.connect(results_endpoint)
    served = f"{config.model!r} version {version}" if version else repr(config.model)
    batching = (f"continuous batching: up to {max_inputs} inputs held, passes of at most {most_inputs}"
                + (f" inputs and {cost_budget} padded tokens" if cost_budget else " inputs")
                + (f", {lanes} compute lanes" if lanes > 1 else "")
                if continuous else f"batches of at most {max_batch_size}, {config.max_batches} held")
    print(f"worker ready: serving {served} to {config.broker} (pid {os.getpid()}; {batching})", flush=True)
    try:
        if continuous:
            run_continuous(handler, inbox, results, state, most_inputs, cost_budget, least_inputs, lanes,
                           *_torch_threads())
        else:
            run_worker(handler, inbox, results, state)
    finally:
        io_thread.join(timeout=5)
        results.close(linger=0)
        if io_thread.is_alive():
            logger.warning("broker I/O thread did not stop within 5 s; closing its sockets")
        # destroy(), not term(): term() waits forever for any socket still open, and a worker that
        # has drained must exit. Sockets already closed keep their linger (the last DISCONNECTs).
        context.destroy(linger=0)


def load_model(config: WorkerConfig, device: str, handler_class: type | None = None):
    """Create the handler, load its weights and warm it up. A model that cannot load raises ModelLoadError."""
    print(f"worker: loading model {config.model!r} on {device} ...", flush=True)
    started_at = time.monotonic()
    try:
        if handler_class is not None:
            handler = handler_class(device=device, **config.handler_options)
        else:
            handler = create_handler(config.model, device, config.handler, config.model_path, config.task,
                                     echo_test_directives=config.echo_test_directives, **config.handler_options)
        handler.init_model()
    except (OSError, ValueError) as error:  # no such model, a directory it cannot read, a bad option
        raise ModelLoadError(f"cannot load model {config.model!r}: {error}") from error
    print(f"worker: model {config.model!r} loaded in {time.monotonic() - started_at:.1f} s", flush=True)
    warmup = getattr(handler, "warmup", None)
    if warmup is not None:
        print("worker: warming up ...", flush=True)
        started_at = time.monotonic()
        warmup()
        print(f"worker: warmed up in {time.monotonic() - started_at:.2f} s", flush=True)
    return handler


def _describe_device(device: str) -> str:
    if not device.startswith("cuda"):
        return device
    try:
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # a description only
        return device


def child_main(config: WorkerConfig, log_level: str, handler_class: type | None = None) -> None:
    """Entry point of a spawned worker process. log_level may be "LEVEL:FORMAT"."""
    serve(config, start_child(log_level), handler_class)


def start_child(log_level: str) -> threading.Event:
    """A spawned worker process's first steps: its logging (log_level "LEVEL:FORMAT"), no hub downloads, and
    the Event that SIGTERM and SIGINT set."""
    level, _, log_format = log_level.partition(":")
    configure_logging(level, log_format or "text")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = threading.Event()
    stop_on_signals(stop)
    return stop


def _torch_threads() -> tuple[int, Callable[[int], None] | None]:
    """This process's torch threads and how a compute lane sets its own; (0, None) without torch."""
    torch = sys.modules.get("torch")
    return (torch.get_num_threads(), torch.set_num_threads) if torch is not None else (0, None)


class ModelLoadError(Exception):
    """The model could not be loaded: the worker cannot start. The message says why, in one line."""


def spawn_worker(config: WorkerConfig, log_level: str, handler_class: type | None, gpu: str | None,
                 daemon: bool) -> multiprocessing.Process:
    """Start a worker process (spawn, never fork) that sees only `gpu`, or all devices if None."""
    return spawn_process(child_main, (config, log_level, handler_class), gpu, daemon)


def spawn_process(target: Callable, args: tuple, gpu: str | None, daemon: bool) -> multiprocessing.Process:
    """Start target(*args) in a spawned process (never forked) that sees only `gpu`, or all devices if None."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # inherited at spawn: the child sees only its GPU
    try:
        process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=daemon)
        process.start()
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return process


def device_slots(config: WorkerConfig, num_workers: int, cuda_devices: list[str]) -> list[tuple[str | None, WorkerConfig]]:
    """Each of num_workers processes' GPU (round-robin over cuda_devices; None: the CPU, or every device) and
    config: with a GPU it sees that one GPU as cuda:0; on the CPU it gets its share of the cores."""
    cpu_threads = config.torch_threads or (max(1, (os.cpu_count() or 1) // num_workers) if not cuda_devices else 0)
    slots = []
    for index in range(num_workers):
        gpu = cuda_devices[index % len(cuda_devices)] if cuda_devices else None
        # With a GPU slot the child sees one GPU as cuda:0; "auto" still falls back to the CPU
        # on a host without CUDA, so the same command works on a laptop.
        slots.append((gpu, dataclasses.replace(
            config,
            device=config.device if gpu is None or config.device == "cpu" else "auto",
            torch_threads=cpu_threads,
        )))
    return slots


def supervise(config: WorkerConfig, num_workers: int, cuda_devices: list[str], log_level: str,
              stop: threading.Event, handler_class: type | None = None) -> None:
    """Run num_workers processes, round-robin over cuda_devices, restarting any that dies."""
    supervise_processes([(gpu, functools.partial(spawn_worker, child, log_level, handler_class, gpu, daemon=False))
                         for gpu, child in device_slots(config, num_workers, cuda_devices)], stop)


def supervise_processes(starts: list[tuple[str | None, Callable[[], multiprocessing.Process]]],
                        stop: threading.Event) -> None:
    """Run one process per (gpu, start), each started by start(); restart any that dies, after a backoff
    that doubles up to 30 s (and starts again at 1 s once it has lived a minute). On `stop`, SIGTERM
    them all, so that they drain, and wait for them."""
    slots: list[dict] = [{"gpu": gpu, "start": start, "process": None, "restart_at": 0.0,
                          "backoff_s": _RESTART_BACKOFF_S[0]} for gpu, start in starts]

    def start(slot: dict) -> None:
        process = slot["start"]()
        slot["process"], slot["started_at"] = process, time.monotonic()
        logger.info("started worker process %d (gpu %s)", process.pid, slot["gpu"])

    for slot in slots:
        start(slot)
    # stop.is_set() and a sleep, never stop.wait(): Event.wait() holds the Event's lock across
    # Python calls, and a SIGTERM handled there would wait for that lock for ever (stop_on_signals).
    while True:
        time.sleep(_SUPERVISE_TICK_S)
        if stop.is_set():
            break
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
    logger.info("stopping %d worker process(es)", sum(slot["process"].is_alive() for slot in slots))
    for slot in slots:
        if slot["process"].is_alive():
            os.kill(slot["process"].pid, signal.SIGTERM)
    for slot in slots:
        slot["process"].join(timeout=60)
        if slot["process"].is_alive():
            slot["process"].kill()
