"""Pool workers: `ddml-worker --pool --repository FILE [--max-models N] [--memory-budget-mb M]`.

A pool worker starts with no model. It registers its catalog (every model of the repository) and
its limits, and loads and unloads models as placement decides (docs/placement.md):

- the I/O thread (worker/connection.py) hands each broker's demand report to PoolState and puts
  the worker's holdings on every heartbeat, at once when they change;
- the placement thread (Placer) merges the reports, runs the pure policy
  (ddml_common/placement.py) and performs the actions that name this worker: a load runs there,
  off the I/O thread, so heartbeats go on; an unload drains first;
- the compute thread (run_pool_batches) runs each batch on the handler of its model; a batch of a
  model not held here goes back BUSY, unrun, and the broker requeues it.

A failed load is reported (Heartbeat.pool's `failed`, with its reason) and does not end the worker.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import zmq

from ddml_common import protocol
from ddml_common.cli import Parser, stop_on_signals
from ddml_common.placement import (Action, Kind, Override, PlacementPolicy, PoolWorker, merge_overrides, merge_reports,
                                   overrides_from_wire, overrides_to_wire)
from ddml_common.pool_events import EventKind, EventLog
from ddml_common.protocol import ErrorCode
from ddml_common.repository import Repository, RepositoryError, load_repository
from worker.config import WorkerConfig
from worker.connection import BrokerConnection, ComputeState
from worker.link import WorkBatch
from worker.loop import RESULT_SEND_TIMEOUT_MS, SIGNAL_CHECK_S, push_result, run_and_push
from worker.serve import (_describe_device, device_slots, load_model, resolve_device, spawn_process, start_child,
                          supervise_processes)

logger = logging.getLogger(__name__)

# Flags of the process, not of a model: a repository's model table may not set them.
_PROCESS_FLAGS = frozenset((
    "model", "broker", "pool", "repository", "max-models", "memory-budget-mb", "device", "cuda-devices",
    "num-workers", "supervise", "max-batches", "continuous", "max-inputs-held", "compute-lanes", "model-version",
    "heartbeat-interval-ms", "liveness", "watchdog-s", "health-file", "curve-server-key", "curve-secret-key",
    "torch-threads", "otlp-endpoint", "config", "log-level", "log-format",
))
_PLAN_EVERY_S = 0.25  # the placement thread plans at least this often, and whenever a report arrives
_REPORT_TTL_INTERVALS = 3  # a broker's report older than this many heartbeat intervals is left out


def model_flags(parser: Parser) -> frozenset[str]:
    """The worker flags a model table may set: those that describe a model (T2's --input/--output too)."""
    names = {max(a.option_strings, key=len).removeprefix("--") for a in parser.settable_actions().values()}
    return frozenset(names - _PROCESS_FLAGS)


def flag_argv(flags: dict[str, Any]) -> list[str]:
    """A model table's worker flags as a command line: true is the flag alone, false leaves it out,
    an array repeats it."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            for item in value if isinstance(value, list) else [value]:
                argv += [f"--{key}", str(item)]
    return argv


def model_configs(repository: Repository, base: WorkerConfig,
                  parse: Callable[[list[str]], WorkerConfig]) -> dict[str, WorkerConfig]:
    """Each model's WorkerConfig, its flags checked by the worker's own parser (parse)."""
    configs = {}
    for name, entry in repository.models.items():
        own = parse(["--model", name, *flag_argv(entry.flags)])
        configs[name] = dataclasses.replace(own, broker=base.broker, device=base.device,
                                            torch_threads=base.torch_threads)
    return configs


# ---------------------------------------------------------------------------- state


@dataclass
class Replica:
    handler: Any
    memory_mb: float
    in_use: int = 0  # batches of it computing now


class PoolState:
    """What a pool worker holds, shared by its three threads under one lock; the I/O thread's hooks
    (PoolHooks) are holdings(), held_models(), take_changed() and on_demand()."""

    def __init__(self, pool_id: str, catalog: list[str], max_models: int, budget_mb: float, report_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.pool_id = pool_id
        self.catalog = frozenset(catalog)
        self.max_models = max_models
        self.budget_mb = budget_mb
        self._report_ttl_s = report_ttl_s
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}
        self._announced: set[str] = set()  # held and offered to the brokers (not draining)
        self._loading: set[str] = set()
        self._reserved: set[str] = set()  # to load once the models it evicts for them are drained
        self._failed: dict[str, str] = {}
        self._reports: dict[int, tuple[float, dict]] = {}  # link -> (when, demand report)
        self._overrides: dict[str, Override] = {}  # the operator's, merged by version from every report
        self._changed = False
        self.report_arrived = threading.Event()
        self.events = EventLog(ttl_s=report_ttl_s, clock=clock)  # on every heartbeat while recent (ddml-status)
        self.counts = {"pool_loads": 0, "pool_load_failures": 0, "pool_unloads": 0, "pool_evictions": 0,
                       "pool_busy_refusals": 0, "pool_load_s_total": 0.0}

    # ------------------------------------------------------------------ I/O thread

    def holdings(self) -> dict:
        events = self.events.wire()
        with self._lock:
            holdings = {"held": {m: round(self._replicas[m].memory_mb, 3) for m in sorted(self._announced)},
                        "loading": sorted(self._loading | self._reserved), "failed": dict(self._failed),
                        **({"events": events} if events else {})}
            if self._overrides:  # back to every broker: one that restarted learns them from us
                holdings["overrides"] = overrides_to_wire(self._overrides)
            return holdings

    def held_models(self) -> list[str]:
        with self._lock:
            return sorted(self._announced)

    def take_changed(self) -> bool:
        with self._lock:
            changed, self._changed = self._changed, False
            return changed

    def on_demand(self, link: int, demand: dict, now: float) -> None:
        with self._lock:
            self._reports[link] = (now, demand)
            self._take_overrides(demand.get("overrides"))
        self.report_arrived.set()

    def _take_overrides(self, wire: Any) -> None:
        """Merge a report's overrides by version (under the lock); a newer one goes on the next heartbeat,
        and clears an earlier failure to load its model here, so that the operator's load tries again."""
        merged = merge_overrides(self._overrides, overrides_from_wire(wire))
        if merged != self._overrides:
            for model in [m for m, o in merged.items() if self._overrides.get(m) != o and not o.unloaded]:
                self._failed.pop(model, None)
            self._overrides = merged
            self._changed = True

    def overrides(self) -> dict[str, Override]:
        with self._lock:
            return dict(self._overrides)

    # ------------------------------------------------------------------ compute thread

    def acquire(self, model: str) -> Any | None:
        """The handler for a batch of `model`, or None if it is not held (the batch goes back BUSY)."""
        with self._lock:
            replica = self._replicas.get(model)
            if replica is None:
                self.counts["pool_busy_refusals"] += 1
                return None
            replica.in_use += 1
            return replica.handler

    def release(self, model: str) -> None:
        with self._lock:
            self._replicas[model].in_use -= 1

    # ------------------------------------------------------------------ placement thread

    def reports(self, now: float) -> list[dict]:
        with self._lock:
            return [report for at, report in self._reports.values() if now - at <= self._report_ttl_s]

    def reported_as_it_is(self, now: float) -> bool:
        """Whether every broker's recent report that lists this worker shows what it holds and loads as it
        knows them. Until then it does not act on a plan: the others plan from those same reports, and
        one that had already heard of its latest load chose as though it were done, so that both took
        the next model (a second replica over max-replicas, found by tests/integration/test_pool.py's
        two-broker test; tests/unit/test_placement_views.py). A broker reports a change at once."""
        with self._lock:
            claims = (set(self._announced), self._loading | self._reserved)
            for at, report in self._reports.values():
                pool = report.get("pool") if now - at <= self._report_ttl_s else None
                entry = pool.get(self.pool_id) if isinstance(pool, dict) else None
                if isinstance(entry, dict) and (_names(entry.get("held")), _names(entry.get("loading"))) != claims:
                    return False
            return True

    def me(self) -> PoolWorker:
        with self._lock:
            return PoolWorker(self.pool_id, self.catalog,
                              {m: self._replicas[m].memory_mb for m in self._announced},
                              frozenset(self._loading | self._reserved), frozenset(self._failed), self.max_models,
                              self.budget_mb)

    def used_mb(self) -> float:
        with self._lock:
            return sum(r.memory_mb for r in self._replicas.values())

    def reserve(self, model: str) -> None:
        """Announce a load that waits for evictions to drain: as loading, so that no other worker takes it."""
        with self._lock:
            self._reserved.add(model)
            self._changed = True

    def cancel_reservation(self, model: str) -> None:
        with self._lock:
            self._reserved.discard(model)
            self._changed = True

    def begin_load(self, model: str, need_mb: float) -> str:
        """Announce the load; "" if it may start, else why not (a plan never takes us past our limits)."""
        with self._lock:
            self._reserved.discard(model)
            self._changed = True
            if model in self._replicas or model in self._loading:
                return f"model {model!r} is held or loading already"
            if model in self._overrides and self._overrides[model].unloaded:  # since the plan (its evictions drained)
                return f"model {model!r} is unloaded by operator"
            if len(self._replicas) + len(self._loading) + 1 > self.max_models:
                return f"--max-models {self.max_models} reached"
            used_mb = sum(r.memory_mb for r in self._replicas.values())
            if self.budget_mb and used_mb + need_mb > self.budget_mb:
                return f"{need_mb:.0f} MB more would exceed --memory-budget-mb {self.budget_mb:.0f} ({used_mb:.0f} used)"
            self._loading.add(model)
            return ""

    def finish_load(self, model: str, handler: Any, memory_mb: float, load_s: float) -> None:
        with self._lock:
            self._loading.discard(model)
            self._failed.pop(model, None)
            self._replicas[model] = Replica(handler, memory_mb)
            self._announced.add(model)
            self.counts["pool_loads"] += 1
            self.counts["pool_load_s_total"] += load_s
            self._changed = True

    def fail_load(self, model: str, why: str) -> None:
        with self._lock:
            self._loading.discard(model)
            self._failed[model] = why[:protocol.MAX_TEXT_LEN]
            self.counts["pool_load_failures"] += 1
            self._changed = True

    def begin_unload(self, model: str, evicted: bool) -> bool:
        """Stop offering the model (the brokers send no more of its batches). False if not held."""
        with self._lock:
            if model not in self._announced:
                return False
            self._announced.discard(model)
            self.counts["pool_evictions" if evicted else "pool_unloads"] += 1
            self._changed = True
            return True

    def acknowledged(self, model: str, since_at: float, now: float) -> bool:
        """Whether every broker that reports to us has heard that we stopped offering `model`: each fresh
        link has sent, since `since_at`, a report whose entry for us does not hold it. A broker sends its
        batches and its reports down one link in order, so its batches of the model are here before that
        report; a broker's report that no longer names it ends the drain before its fixed cap."""
        with self._lock:
            for at, report in self._reports.values():
                if now - at > self._report_ttl_s:
                    continue  # a broker gone silent: the cap bounds its drain
                pool = report.get("pool")
                entry = pool.get(self.pool_id) if isinstance(pool, dict) else None
                held = entry.get("held") if isinstance(entry, dict) else None
                if at < since_at or (isinstance(held, dict) and model in held):
                    return False
            return True

    def finish_unload(self, model: str) -> Any | None:
        """Drop the replica if no batch of it computes; returns its handler, or None to try later."""
        with self._lock:
            replica = self._replicas.get(model)
            if replica is None or replica.in_use:
                return None
            del self._replicas[model]
            return replica.handler

    def figures(self) -> dict:
        with self._lock:
            used_mb = sum(r.memory_mb for r in self._replicas.values())
            return {**self.counts, "pool_models_held": len(self._replicas), "pool_models_loading": len(self._loading),
                    "pool_memory_used_mb": round(used_mb, 3), "pool_memory_budget_mb": self.budget_mb}


PoolHooks = PoolState  # what worker/connection.py calls


# ---------------------------------------------------------------------------- placement thread


class Placer:
    """Plans from the merged reports and performs this worker's part: loads, and drained unloads."""

    def __init__(self, state: PoolState, policy: PlacementPolicy, configs: dict[str, WorkerConfig], device: str,
                 drain_s: float, clock: Callable[[], float] = time.monotonic):
        self._state, self._policy, self._configs, self._device = state, policy, configs, device
        self._drain_s = drain_s
        self._clock = clock

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._state.report_arrived.wait(_PLAN_EVERY_S)
            self._state.report_arrived.clear()
            try:
                self.step(self._clock(), stopping)
            except Exception:  # a bug here must not end the worker: it keeps serving what it holds
                logger.exception("placement step failed")

    def step(self, now: float, stopping: threading.Event) -> None:
        state = self._state
        if not state.reported_as_it_is(now):
            return  # the next report, sent as soon as a broker hears this worker's change, plans again
        view = merge_reports(state.reports(now), own=state.me(), overrides=state.overrides())
        mine = first_load(a for a in self._policy.plan(view, now) if a.pool_id == state.pool_id)
        if mine and mine[-1].kind is Kind.LOAD:
            state.reserve(mine[-1].model)  # announced now, not after the evictions for it have drained
        for action in mine:
            if stopping.is_set():
                return
            logger.info("placement: %s %s (%s)", action.kind.value, action.model, action.reason,
                        extra={"model": action.model})
            if action.kind is Kind.UNLOAD:
                self._unload(action.model, evicted=action.reason.startswith("evicted"), stopping=stopping,
                             reason=action.reason)
            elif action is mine[0] or load_still_wanted(state, self._policy, action.model, self._clock()):
                need_mb = max(view.workers[state.pool_id].held.get(action.model, 0.0),
                              self._policy.specs[action.model].memory_mb)
                self._load(action.model, need_mb, reason=action.reason)
            else:
                state.cancel_reservation(action.model)
                logger.info("placement: load of %s given up: others took it while its evictions drained",
                            action.model, extra={"model": action.model})

    def _unload(self, model: str, evicted: bool, stopping: threading.Event, reason: str = "") -> None:
        """Drain: stop offering the model, let batches already sent to us finish, then unload."""
        if not self._state.begin_unload(model, evicted):
            return
        reason = reason or ("evicted" if evicted else "idle")
        began_at = self._clock()
        self._state.events.record(EventKind.UNLOAD, model, reason)
        # Batches the brokers sent before they heard of it: until each says it no longer counts the model
        # here, at most drain_s (a broker that fell silent).
        while not stopping.is_set() and (now := self._clock()) - began_at < self._drain_s \
                and not self._state.acknowledged(model, began_at, now):
            stopping.wait(0.02)
        while (handler := self._state.finish_unload(model)) is None and not stopping.is_set():
            stopping.wait(0.05)  # a batch of it still computes
        del handler
        gc.collect()
        _empty_cuda_cache(self._device)
        self._state.events.record(EventKind.UNLOADED, model, reason, self._clock() - began_at)
        logger.info("unloaded model %s (%s)", model, "evicted" if evicted else "idle", extra={"model": model})

    def _load(self, model: str, need_mb: float, reason: str = "demand") -> None:
        why = self._state.begin_load(model, need_mb)
        if why:
            logger.warning("placement asked for model %s, not loaded: %s", model, why, extra={"model": model})
            return
        before_mb = _memory_mb(self._device)
        started_at = self._clock()
        self._state.events.record(EventKind.LOAD, model, reason)
        try:
            handler = load_model(self._configs[model], self._device)
        except Exception as error:  # ModelLoadError (bad files), out of memory, a handler that raises
            logger.exception("loading model %s failed", model, extra={"model": model})
            self._state.events.record(EventKind.LOAD_FAILED, model, reason, self._clock() - started_at,
                                      error=f"{type(error).__name__}: {error}")  # first: on the heartbeat it prompts
            self._state.fail_load(model, f"{type(error).__name__}: {error}")
            return
        measured_mb = max(0.0, _memory_mb(self._device) - before_mb)
        estimate_mb = self._policy.specs[model].memory_mb
        on_cuda = self._device.startswith("cuda")
        memory_mb = measured_mb if on_cuda or not estimate_mb else estimate_mb
        load_s = self._clock() - started_at
        self._state.events.record(EventKind.LOADED, model, reason, load_s)  # first: on the heartbeat it prompts
        self._state.finish_load(model, handler, memory_mb, load_s)
        logger.info("model %s loaded in %.2f s (%.1f MB)", model, load_s, memory_mb, extra={"model": model})


def _names(value: Any) -> set[str]:
    """The model names of a report's held map or loading list (a broker's report is read defensively)."""
    return {m for m in value if isinstance(m, str)} if isinstance(value, (dict, list)) else set()


def load_still_wanted(state: PoolState, policy: PlacementPolicy, model: str, now: float) -> bool:
    """Whether a load that waited for its evictions to drain may begin: the view now, not the plan's,
    leaves room under the model's max-replicas (PlacementPolicy.room_left)."""
    view = merge_reports(state.reports(now), own=state.me(), overrides=state.overrides())
    return policy.room_left(view, state.pool_id, model)


def first_load(actions: Iterable[Action]) -> list[Action]:
    """A worker's part of a plan, up to its first load: the evictions for it, then the load. A plan may
    give a worker several loads (ddml_common/placement.py); the next plan, which sees the first one
    under way, says where the others go."""
    taken: list[Action] = []
    for action in actions:
        taken.append(action)
        if action.kind is Kind.LOAD:
            break
    return taken


def _memory_mb(device: str) -> float:
    """The GPU memory torch has allocated on `device`; on the CPU, this process's resident set."""
    if device.startswith("cuda") and "torch" in sys.modules:
        torch = sys.modules["torch"]
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _empty_cuda_cache(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def device_memory_mb(device: str) -> float:
    """What the device has: the GPU's memory, or the host's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(device).total_memory / 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (OSError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------- compute thread


def run_pool_batches(state: PoolState, inbox: queue.Queue, results: zmq.Socket, compute: ComputeState,
                     clock: Callable[[], float] = time.monotonic) -> None:
    """Run each batch on its model's handler until the I/O thread puts None in the inbox."""
    while True:
        try:
            batch: WorkBatch | None = inbox.get(timeout=SIGNAL_CHECK_S)
        except queue.Empty:
            continue
        if batch is None:
            return
        handler = state.acquire(batch.model)
        if handler is None:  # not held here (any more): the broker requeues it unrun
            push_result(results, batch, protocol.BatchResult.failed(
                batch.batch_id, len(batch.inputs), ErrorCode.BUSY,
                f"model {batch.model!r} is not loaded on this pool worker"))
            continue
        try:
            run_and_push(handler, batch, results, compute, clock)
        finally:
            state.release(batch.model)


# ---------------------------------------------------------------------------- process


def run_pool(parser: Parser, args: Any, base: WorkerConfig, stop: threading.Event,
             parse: Callable[[list[str]], WorkerConfig]) -> None:
    """`ddml-worker --pool`: check the repository and the flags, then serve until `stop`."""
    if not args.repository:
        parser.fail("--pool needs --repository FILE")
    if args.max_models < 1:
        parser.fail(f"--max-models must be at least 1, got {args.max_models}")
    if args.memory_budget_mb < 0:
        parser.fail(f"--memory-budget-mb must be 0 (what the device has) or more, got {args.memory_budget_mb}")
    try:
        repository = load_repository(args.repository, model_flags(parser))
    except RepositoryError as error:
        parser.fail(str(error))
    configs = model_configs(repository, base, parse)
    stop_on_signals(stop)
    cuda_devices = [d.strip() for d in args.cuda_devices.split(",") if d.strip()]
    if not (args.supervise or args.num_workers > 1 or cuda_devices):
        serve_pool(base, repository, configs, args.max_models, args.memory_budget_mb, stop)
        return
    # One pool worker per process, supervised as fixed workers are (worker/serve.py), at least one per GPU:
    # each with its own pool id, device and budget (--memory-budget-mb, or its share of what its device has).
    log_level = f"{args.log_level}:{args.log_format}"
    slots = device_slots(base, max(args.num_workers, len(cuda_devices), 1), cuda_devices)
    starts = []
    for gpu, child in slots:
        child_configs = {name: dataclasses.replace(c, device=child.device, torch_threads=child.torch_threads)
                         for name, c in configs.items()}
        sharing = sum(1 for other, _ in slots if other == gpu)  # processes on this device (the CPU: all)
        child_args = (child, repository, child_configs, args.max_models, args.memory_budget_mb, log_level, sharing)
        starts.append((gpu, functools.partial(spawn_process, pool_process_main, child_args, gpu, daemon=False)))
    supervise_processes(starts, stop)


def pool_process_main(config: WorkerConfig, repository: Repository, configs: dict[str, WorkerConfig],
                      max_models: int, budget_mb: float, log_level: str, sharing: int) -> None:
    """Entry point of a supervised pool worker process (run_pool): serve until SIGTERM, then drain."""
    serve_pool(config, repository, configs, max_models, budget_mb, start_child(log_level), sharing)


def serve_pool(config: WorkerConfig, repository: Repository, configs: dict[str, WorkerConfig], max_models: int,
               budget_mb: float, stop: threading.Event, sharing: int = 1) -> None:
    """Serve as one pool worker until `stop`. budget_mb 0: what the device has, split among the `sharing`
    pool workers on it."""
    device = resolve_device(config)
    if config.torch_threads:  # --torch-threads, as serve() honours it
        from worker.models.hf_text import set_torch_threads

        set_torch_threads(config.torch_threads)
    budget_mb = budget_mb or device_memory_mb(device) / sharing
    pool_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
    catalog = sorted(repository.models)
    state = PoolState(pool_id, catalog, max_models, budget_mb,
                      report_ttl_s=_REPORT_TTL_INTERVALS * config.heartbeat_interval_s)
    # Each model's own --max-batch-size ("max_batch"); max_batch_size, the smallest, is for a broker that
    # predates the map (it then caps every model at it).
    ready = protocol.Ready(
        models=[], max_batch_size=min(c.max_batch_size for c in configs.values()), max_batches=config.max_batches,
        device=_describe_device(device), host=socket.gethostname(), pid=os.getpid(),
        pool={"id": pool_id, "catalog": catalog, "max_models": max_models, "budget_mb": round(budget_mb, 3),
              "max_batch": {name: configs[name].max_batch_size for name in catalog},
              "placement": {name: [e.placement.min_replicas, e.placement.max_replicas]
                            for name, e in repository.models.items()}},
    )
    context = zmq.Context()
    inbox: queue.Queue = queue.Queue()
    compute = ComputeState()
    results_endpoint = f"inproc://results-{id(compute)}"
    connection = BrokerConnection(config, context, ready, inbox, results_endpoint, compute, state.figures,
                                  pool=state)
    io_thread = threading.Thread(target=connection.run, args=(stop.is_set,), name="broker-io", daemon=True)
    placer = Placer(state, PlacementPolicy({name: e.placement for name, e in repository.models.items()}), configs,
                    device, drain_s=2 * config.heartbeat_interval_s)
    placing = threading.Thread(target=placer.run, args=(stop,), name="placement", daemon=True)
    io_thread.start()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.SNDTIMEO, RESULT_SEND_TIMEOUT_MS)
    results.connect(results_endpoint)
    placing.start()
    print(f"worker ready: pool {pool_id} of {len(catalog)} models, at most {max_models} held and "
          f"{budget_mb:.0f} MB, to {config.broker} (pid {os.getpid()})", flush=True)
    try:
        run_pool_batches(state, inbox, results, compute)
    finally:
        stop.set()
        io_thread.join(timeout=5)
        placing.join(timeout=5)
        results.close(linger=0)
        context.destroy(linger=0)
