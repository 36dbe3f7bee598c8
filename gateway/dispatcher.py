"""The seed's in-process API, on top of the broker.

    from gateway import Dispatcher
    with Dispatcher(ManagedBertModel, batch_size=64, max_latency=0.01, worker_num=2, cuda_devices=(0,)) as d:
        outputs = d.predict(texts)          # same order, same length
        future = d.submit(texts)            # concurrent.futures.Future of the outputs

It starts a broker on a thread of this process and worker processes (spawned, round-robin over
cuda_devices, or on the CPU when there is no CUDA), all over ipc:// sockets in a private
temporary directory. close(), or leaving the with-block, stops everything.

Several models share the workers by demand:

    with Dispatcher({"bert": ManagedBertModel, "clf": ModelSpec(ManagedClf, min_replicas=1)},
                    batch_size=64, worker_num=2, cuda_devices=(0,), max_models_per_worker=1) as d:
        embeddings = d.predict(texts, model="bert")

Each worker is then a pool worker (worker/embedded_pool.py, docs/placement.md) that starts with no
model and loads, evicts and unloads the models as their demand moves; a request for a model no
worker holds waits, within request_timeout_s, while one loads it.

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
from dataclasses import dataclass, field

import zmq

from broker.broker import Broker
from broker.config import BatchingConfig, BrokerConfig
from ddml_common.repository import MAX_NAME_LEN, Placement
from gateway.broker_client import BrokerClient, BrokerError
from worker.config import WorkerConfig
from worker.embedded_pool import EmbeddedModel, pool_child_main
from worker.models import Manager
from worker.serve import spawn_process, spawn_worker


@dataclass(frozen=True)
class ModelSpec:
    """One model of a several-model Dispatcher, where a bare Manager class is not enough.

    options: keyword arguments of the class's constructor (over the Dispatcher's own **handler_options);
    min_replicas: workers that keep it loaded whatever its demand (0: it loads on its first request);
    max_replicas: most workers that hold it at once (None: all worker_num);
    idle_unload_s: without a request this long, it is unloaded down to min_replicas;
    memory_mb: an estimate of its memory, used until a load measures it (0: unknown).
    """

    handler_class: type
    options: dict = field(default_factory=dict)
    min_replicas: int = 0
    max_replicas: int | None = None
    idle_unload_s: float = 300.0
    memory_mb: float = 0.0


class Dispatcher:
    def __init__(
        self,
        model_cls: type | dict,
        batch_size: int = 64,
        max_latency: float = 0.0,
        worker_num: int = 1,
        cuda_devices: tuple | list | None = None,
        model_name: str | None = None,
        request_timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        log_level: str = "WARNING",
        max_models_per_worker: int | None = None,
        memory_budget_mb: float = 0.0,
        **handler_options,
    ):
        """max_latency (seconds): how long a partial batch may wait to fill (0 = never waits).

        model_cls: a Manager subclass, served as model_name ("model"); or a map of model name to a
        Manager subclass or a ModelSpec, whose models share the workers by demand. Then each worker
        holds at most max_models_per_worker models (None: all of them) within memory_budget_mb
        (0: what its device has), and takes batches of at most batch_size inputs of any model
        (smaller if a class's max_batch_size says so).
        """
        if worker_num < 1:
            raise ValueError(f"worker_num must be >= 1, got {worker_num}")
        models = None
        if isinstance(model_cls, dict):
            if model_name is not None:
                raise ValueError("model_name names the one model of Dispatcher(model_cls); a map names its own")
            models = embedded_models(model_cls, batch_size, worker_num, handler_options)
            max_models = len(models) if max_models_per_worker is None else max_models_per_worker
            if max_models < 1:
                raise ValueError(f"max_models_per_worker must be >= 1, got {max_models}")
            if memory_budget_mb < 0:
                raise ValueError(f"memory_budget_mb must be 0 (what the device has) or more, got {memory_budget_mb}")
        self._models = [m.name for m in models] if models else [model_name or "model"]
        self._timeout_s = request_timeout_s
        # Checked here (a bad batch_size raises ValueError), before anything starts.
        config = WorkerConfig(model=self._models[0], max_batch_size=batch_size,
                              handler_options=handler_options if models is None else {})
        if models is not None:  # a pool worker takes batches that every model of it accepts
            config = dataclasses.replace(config, max_batch_size=min(m.max_batch_size for m in models))
        self._directory = tempfile.mkdtemp(prefix="ddml-")
        frontend = f"ipc://{self._directory}/frontend"
        backend = f"ipc://{self._directory}/backend"
        config = dataclasses.replace(config, broker=backend)
        self._context = zmq.Context()
        self._broker = Broker(
            BrokerConfig(frontend=frontend, backend=backend, batching=BatchingConfig(max_wait_s=max_latency)),
            self._context,
        )
        self._broker.bind()
        self._stop = threading.Event()
        self._broker_thread = threading.Thread(target=self._run_broker, name="ddml-broker", daemon=True)
        self._broker_thread.start()

        devices = [str(d) for d in (cuda_devices or ())]
        threads = max(1, (os.cpu_count() or 1) // worker_num)
        self._workers = []
        self._client = BrokerClient(frontend)
        try:  # a class that cannot be pickled fails the spawn: stop what started
            for index in range(worker_num):
                gpu = devices[index % len(devices)] if devices else None
                child = dataclasses.replace(config, torch_threads=0 if gpu is not None else threads)
                if models is None:
                    self._workers.append(spawn_worker(child, log_level, model_cls, gpu, daemon=True))
                else:
                    self._workers.append(spawn_process(pool_child_main, (child, models, max_models, memory_budget_mb,
                                                                         log_level), gpu, daemon=True))
            if models is None:
                self._wait_for(lambda status: sum(1 for w in status["workers"] if self._models[0] in w["models"])
                               >= worker_num, f"{worker_num} workers did not register", start_timeout_s)
            else:
                self._wait_for(lambda status: pool_ready(status, models, worker_num),
                               f"{worker_num} pool workers did not register, or load every model's min_replicas,",
                               start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _run_broker(self) -> None:
        try:
            self._broker.run(should_stop=self._stop.is_set)
            self._broker.drain(timeout_s=5.0)
        finally:
            self._broker.close(linger_ms=1000)

    def _wait_for(self, ready, what: str, timeout_s: float) -> None:
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            if ready(self._client.status()):
                return
            dead = [p.exitcode for p in self._workers if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"a worker process exited with code {dead[0]} while starting")
            self._stop.wait(0.05)
        raise TimeoutError(f"{what} within {timeout_s} s")

    @property
    def models(self) -> list[str]:
        """The names predict() and submit() take."""
        return list(self._models)

    def _model(self, model: str | None) -> str:
        if model is None:
            if len(self._models) > 1:
                raise ValueError(f"this Dispatcher serves several models: name one ({', '.join(self._models)})")
            return self._models[0]
        if model not in self._models:
            raise ValueError(f"this Dispatcher serves no model {model!r} ({', '.join(self._models)})")
        return model

    def submit(self, batch: list, model: str | None = None) -> Future:
        return self._client.submit(self._model(model), list(batch), timeout_s=self._timeout_s)

    def predict(self, batch: list, model: str | None = None) -> list:
        """Outputs for `batch`, same order and length. Raises BrokerError if the request fails.
        With several models, `model` names which; a model no worker holds is loaded first."""
        return self._client.request(self._model(model), list(batch), timeout_s=self._timeout_s)

    def status(self) -> dict:
        """The broker's STATUS: models (with "replicas" for several models), queues and workers."""
        return self._client.status()

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


def embedded_models(models: dict, batch_size: int, worker_num: int, handler_options: dict) -> list[EmbeddedModel]:
    """The pool workers' models from Dispatcher's map of name -> Manager subclass or ModelSpec; ValueError
    naming the model at fault."""
    if not models:
        raise ValueError("Dispatcher needs at least one model")
    embedded = []
    for name, value in models.items():
        spec = value if isinstance(value, ModelSpec) else ModelSpec(value)
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN or "@" in name or name != name.strip():
            raise ValueError(f"model name {name!r}: 1 to {MAX_NAME_LEN} characters, without '@' or surrounding spaces")
        if not (isinstance(spec.handler_class, type) and issubclass(spec.handler_class, Manager)):
            raise ValueError(f"model {name!r}: expected a Manager subclass or a ModelSpec of one, got {value!r}")
        max_replicas = worker_num if spec.max_replicas is None else spec.max_replicas
        if not 0 <= spec.min_replicas <= max_replicas or max_replicas < 1:
            raise ValueError(f"model {name!r}: needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{spec.min_replicas} and {max_replicas}")
        if not spec.idle_unload_s > 0 or spec.memory_mb < 0:
            raise ValueError(f"model {name!r}: idle_unload_s must be > 0 and memory_mb >= 0")
        largest = getattr(spec.handler_class, "max_batch_size", None) or batch_size
        embedded.append(EmbeddedModel(
            name, spec.handler_class, {**handler_options, **spec.options},
            Placement(spec.min_replicas, max_replicas, float(spec.idle_unload_s), float(spec.memory_mb)),
            min(batch_size, largest)))
    return embedded


def pool_ready(status: dict, models: list[EmbeddedModel], worker_num: int) -> bool:
    """Every pool worker registered, and every model's min_replicas loaded."""
    if sum(1 for w in status["workers"] if "pool" in w) < worker_num:
        return False
    loaded = {name: info.get("replicas", {}).get("loaded", 0) for name, info in status["models"].items()}
    return all(loaded.get(m.name, 0) >= m.placement.min_replicas for m in models)


__all__ = ["Dispatcher", "ModelSpec", "BrokerError"]
