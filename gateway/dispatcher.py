"""The seed's in-process API, on top of the broker.

    from gateway import Dispatcher
    with Dispatcher(ManagedBertModel, batch_size=64, max_latency=0.01, worker_num=2, cuda_devices=(0,)) as d:
        outputs = d.predict(texts)          # same order, same length
        future = d.submit(texts)            # concurrent.futures.Future of the outputs

It starts a broker on a thread of this process and worker processes (spawned, round-robin over
cuda_devices, or on the CPU when there is no CUDA), all over ipc:// sockets in a private
temporary directory. close(), or leaving the with-block, stops everything.

This is the one module of gateway/ that reaches into broker/ and worker/ beyond the protocol:
composing them locally is its whole job.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future

import zmq

from broker.broker import Broker
from broker.config import BatchingConfig, BrokerConfig
from gateway.broker_client import BrokerClient, BrokerError
from worker.config import WorkerConfig
from worker.serve import spawn_worker


class Dispatcher:
    def __init__(
        self,
        model_cls: type,
        batch_size: int = 64,
        max_latency: float = 0.0,
        worker_num: int = 1,
        cuda_devices: tuple | list | None = None,
        model_name: str = "model",
        request_timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        log_level: str = "WARNING",
        **handler_options,
    ):
        """max_latency (seconds): how long a partial batch may wait to fill (0 = never waits)."""
        if worker_num < 1:
            raise ValueError(f"worker_num must be >= 1, got {worker_num}")
        self._model = model_name
        self._timeout_s = request_timeout_s
        self._directory = tempfile.mkdtemp(prefix="ddml-")
        frontend = f"ipc://{self._directory}/frontend"
        backend = f"ipc://{self._directory}/backend"
        self._context = zmq.Context()
        self._broker = Broker(
            BrokerConfig(frontend=frontend, backend=backend, batching=BatchingConfig(max_wait_s=max_latency)),
            self._context,
        )
        self._broker.bind()
        self._stop = threading.Event()
        self._broker_thread = threading.Thread(target=self._run_broker, name="ddml-broker", daemon=True)
        self._broker_thread.start()

        config = WorkerConfig(broker=backend, model=model_name, max_batch_size=batch_size,
                              handler_options=handler_options)
        devices = [str(d) for d in (cuda_devices or ())]
        threads = max(1, (os.cpu_count() or 1) // worker_num)
        self._workers = []
        for index in range(worker_num):
            gpu = devices[index % len(devices)] if devices else None
            child = dataclasses.replace(config, torch_threads=0 if gpu is not None else threads)
            self._workers.append(spawn_worker(child, log_level, model_cls, gpu, daemon=True))
        self._client = BrokerClient(frontend)
        try:
            self._wait_for_workers(worker_num, start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _run_broker(self) -> None:
        try:
            self._broker.run(should_stop=self._stop.is_set)
            self._broker.drain(timeout_s=5.0)
        finally:
            self._broker.close(linger_ms=1000)

    def _wait_for_workers(self, count: int, timeout_s: float) -> None:
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            if sum(1 for w in self._client.status()["workers"] if self._model in w["models"]) >= count:
                return
            dead = [p.exitcode for p in self._workers if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"a worker process exited with code {dead[0]} while starting")
            self._stop.wait(0.05)
        raise TimeoutError(f"{count} workers did not register within {timeout_s} s")

    def submit(self, batch: list) -> Future:
        return self._client.submit(self._model, list(batch), timeout_s=self._timeout_s)

    def predict(self, batch: list) -> list:
        """Outputs for `batch`, same order and length. Raises BrokerError if the request fails."""
        return self._client.request(self._model, list(batch), timeout_s=self._timeout_s)

    def close(self) -> None:
        for process in self._workers:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker drains and says DISCONNECT
        for process in self._workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self._client.close()
        self._stop.set()
        self._broker_thread.join(timeout=10)
        self._context.term()
        shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["Dispatcher", "BrokerError"]
