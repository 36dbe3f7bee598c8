"""BrokerCore: everything the broker decides, as a pure state machine. No sockets, no clock.

Events go in: frames from a peer (`on_frames`), a send that failed (reported by `flush`), and
the passing of time (`on_tick`). What to send comes out, through `flush(send)`. broker/broker.py
is the shell that owns the sockets; tests/sim/ drives this same class with a simulated network
and a virtual clock. Every message kind is handled here, in one place:

    from a gateway:  REQUEST -> _on_request     HEARTBEAT -> answered at once   STATUS_REQUEST -> _status
                     REQUESTS -> _on_request for each (an entry decode() refused: BAD_REQUEST)
    from a worker:   READY -> _on_ready         HEARTBEAT -> _on_worker_heartbeat
                     BATCH_RESULT -> _on_batch_result                DISCONNECT -> _lose_worker

Every accepted request gets exactly one reply: outputs, or an error (TIMEOUT at its deadline,
WORKER_LOST after too many attempts, ...). Results that arrive for a request already answered,
or for a batch the broker took away from a worker, are discarded.

No message can stop the loop: one that does not decode is counted as `malformed`; one that
decodes but cannot be applied is refused and counted; and a handler that raises (a bug) is
counted as `internal_errors` and logged with the message kind, and the broker goes on.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from broker.batching import Batcher, InFlightBatch, PendingRequest, WorkItem, max_batch_size_for
from broker.config import BrokerConfig
from broker.pool import (can_load, catalog, demand_report, overrides_to_wire, pool_workers, replicas, take_overrides,
                         unloaded_refusal)
from broker.pool_events import PoolEventRing
from broker.stats import BrokerSnapshot, ModelStats
from broker.workers import WorkerRegistry, WorkerState
from ddml_common import protocol
from ddml_common.pool_events import EventKind
from ddml_common.protocol import ErrorCode

logger = logging.getLogger("broker.broker")

_REPLIES_MAX_BYTES = 16 << 20  # outputs per REPLIES message; larger sets go in several
_STATUS_METADATA_BUDGET = 4 * protocol.MAX_DOCUMENT_SIZE  # models' metadata in one STATUS, in all
_MAX_REMEMBERED_MODELS = 1024  # models once served but served no longer, remembered for 503 rather than 404
_WORKER_INPUT_CODES = frozenset((ErrorCode.BAD_REQUEST.value, ErrorCode.MODEL_ERROR.value))  # a worker's own; others: MODEL_ERROR
# Refusals a peer causes at will (a flood of unknown model names, say): logged rate-limited, not a line each.
_REFUSALS = frozenset((ErrorCode.NO_SUCH_MODEL, ErrorCode.BAD_REQUEST, ErrorCode.UNAVAILABLE))
_REPLY_STAT = {"ok": "replies_ok", **{code.value: f"replies_{code.value.lower()}" for code in ErrorCode}}


class Peer(enum.IntEnum):
    GATEWAY = 0  # on the frontend
    WORKER = 1  # on the backend


@dataclass(slots=True)
class Send:
    """An instruction for the shell: send `message` to `peer_id` on the socket of `peer`."""

    peer: Peer
    peer_id: bytes
    message: protocol.Message
    batch: InFlightBatch | None = None  # with a BATCH message: the batch it carries


SendFn = Callable[[Send], bool]  # performs a send; False if the peer is gone or not reading


class BrokerCore:
    def __init__(self, config: BrokerConfig, instance_id: str, now: float):
        self._config = config
        self.instance_id = instance_id
        self._workers = WorkerRegistry(config.heartbeat)
        self._batcher = Batcher(config.batching)
        self._requests: dict[tuple[bytes, str], PendingRequest] = {}
        self._outbox: dict[bytes, list[PendingRequest]] = {}  # successes to reply to, by gateway
        self._sends: list[Send] = []  # what flush() hands to the shell
        self._deadlines: list[tuple[float, int, tuple[bytes, str]]] = []  # heap
        self._sequence = itertools.count()
        # Batch ids start where the last instance's are unlikely to be: a worker may still answer a
        # batch of the instance before a restart, and must never answer this one's by mistake.
        self._batch_ids = itertools.count((zlib.crc32(instance_id.encode()) << 20) + 1)
        self._model_stats: dict[str, ModelStats] = {}  # models some worker serves or once served
        self._rollouts: dict[str, frozenset[str]] = {}  # model -> the versions we last warned it is served at
        self._overrides: dict = {}  # model -> the operator's placement.Override (broker/pool.py)
        self.stats: Counter[str] = Counter()  # broker-wide counters, reported in STATUS
        self.draining = False
        self._started_at = now
        self._pool_events = PoolEventRing()  # pool workers' latest loads and unloads, for STATUS

    # ------------------------------------------------------------------ events in

    def on_frames(self, peer: Peer, peer_id: bytes, frames: list[bytes], now: float,
                  peer_key: bytes | None = None) -> None:
        """One message from a peer. peer_key: the CURVE public key it authenticated with, if any.

        Never raises: whatever a peer sends, the loop goes on."""
        try:
            message = protocol.decode(frames)
        except protocol.VersionMismatch as error:
            self._count_malformed(peer, peer_id, error)
            self._sends.append(Send(peer, peer_id, protocol.Error(ErrorCode.BAD_VERSION.value, str(error))))
            return
        except protocol.DecodeError as error:
            self._count_malformed(peer, peer_id, error)
            if peer is Peer.GATEWAY:
                self._refuse_malformed_request(peer_id, frames, error, now)
            return
        try:
            if peer is Peer.WORKER:
                self._on_worker_message(peer_id, message, now, peer_key)
            else:
                self._on_gateway_message(peer_id, message, now)
        except Exception:  # a bug in a handler must never end the broker
            self.stats["internal_errors"] += 1
            if throttled(self.stats["internal_errors"]):
                logger.exception("internal error handling %s from %s %s (%d so far)", type(message).__name__,
                                 peer.name.lower(), peer_id.hex(), self.stats["internal_errors"])

    def on_tick(self, now: float) -> None:
        """Timers: time out requests, expire workers, heartbeat workers, dispatch batches."""
        try:
            self._expire_requests(now)
            for worker in self._workers.expire(now):  # an overrun is recorded as an offence there
                self._lose_worker(worker, "missed heartbeats or overran a batch deadline", now, offence=False)
                self._sends.append(Send(Peer.WORKER, worker.worker_id,
                                        protocol.Disconnect("expired: send READY", worker.registration)))
            report = None
            for worker in self._workers.due_for_heartbeat(now):
                heartbeat = protocol.Heartbeat(self.instance_id)
                if worker.pool:  # a pool worker plans placement from what every broker reports (broker/pool.py)
                    heartbeat.demand = report = report or self._demand_report(now)
                self._sends.append(Send(Peer.WORKER, worker.worker_id, heartbeat))
            for dispatch in self._batcher.assign(self._workers.with_room(now), now, self._workers.serves_elsewhere,
                                                 self._workers.proven_elsewhere):
                self._dispatch(dispatch.worker_id, dispatch.model, dispatch.items, now)
        except Exception:
            self.stats["internal_errors"] += 1
            if throttled(self.stats["internal_errors"]):
                logger.exception("internal error in the broker's timers (%d so far)", self.stats["internal_errors"])

    def flush(self, send: SendFn, now: float, not_tried: Callable[[Send], None] | None = None) -> None:
        """Hand every pending message to `send`, in order. A batch that cannot be sent is not lost:
        its worker is dropped and the batch goes back to the queue unrun. Later messages to a worker
        whose send failed are not tried (they would reach a peer the broker has just forgotten); each
        goes to `not_tried`, so that the shell counts it as dropped, for the same reason as the first."""
        self._flush_replies()
        failed_workers: set[bytes] = set()
        while self._sends:
            sends, self._sends = self._sends, []
            for instruction in sends:
                if instruction.peer is Peer.WORKER and instruction.peer_id in failed_workers:
                    delivered = False
                    if not_tried is not None:
                        not_tried(instruction)
                else:
                    delivered = send(instruction)
                if delivered:
                    if instruction.batch is not None:
                        instruction.batch.sent = True
                else:
                    if instruction.peer is Peer.WORKER:
                        failed_workers.add(instruction.peer_id)
                    self._on_send_failed(instruction, now)
            self._flush_replies()

    def forget_worker(self, worker_id: bytes, reason: str, now: float) -> None:
        """The shell dropped a worker (its key was revoked, or it is no longer authorised)."""
        self._lose_worker(self._workers.remove(worker_id), reason, now)

    def workers_with_keys(self) -> list[tuple[bytes, bytes | None]]:
        """(worker_id, CURVE key) of every registered worker, for the shell's key reloads."""
        return [(w.worker_id, w.peer_key) for w in self._workers]

    def start_drain(self) -> None:
        """Stop accepting requests; those held are still answered."""
        self.draining = True

    def abandon_all(self, now: float) -> None:
        """The end of a drain: fail what is still held, and tell every worker the broker is going."""
        for request in list(self._requests.values()):
            self._finish(request, now, ErrorCode.UNAVAILABLE, "broker shut down before this request finished")
        for worker in self._workers:
            self._sends.append(Send(Peer.WORKER, worker.worker_id, protocol.Disconnect("broker shutting down")))

    # ------------------------------------------------------------------ queries

    @property
    def in_flight_requests(self) -> int:
        return len(self._requests)

    def next_wake_at(self) -> float:
        """The next heartbeat, expiry, request deadline or batch deadline (math.inf if none)."""
        return min(
            self._workers.next_deadline(),
            self._batcher.next_deadline(),
            self._deadlines[0][0] if self._deadlines else math.inf,
        )

    def status(self, request_id: str, now: float) -> protocol.Status:
        status = self.describe(now).status(request_id)
        status.overrides = overrides_to_wire(self._overrides)
        return status

    def describe(self, now: float) -> BrokerSnapshot:
        """Every figure the broker reports, copied: for STATUS, and for the shell's /metrics."""
        models, histograms = {}, {}
        shared: dict[int, str] = {}  # id of a metadata document -> the model whose entry carries it
        metadata_budget = _STATUS_METADATA_BUDGET
        pool = pool_workers(self._workers)
        for name in sorted({m for w in self._workers for m in w.models} | set(self._model_stats) | catalog(pool)):
            oldest = self._batcher.oldest_enqueued_at(name)
            serving = [w for w in self._workers if name in w.models]
            stats = self._stats_for(name)
            source = next((w for w in serving if w.metadata), None)
            metadata_from = shared.get(id(source.metadata)) if source is not None else None
            if source is not None and metadata_from is None:
                if source.metadata_size <= metadata_budget:
                    metadata_budget -= source.metadata_size
                    shared[id(source.metadata)] = name
                else:
                    metadata_from = ""  # over the budget: left out
            models[name] = {
                "workers": len(serving),
                "max_batch_size": max((max_batch_size_for(w, name) for w in serving), default=0),
                # A READY's metadata goes into STATUS once, whatever number of models it names: the
                # entries of its other models name the entry that carries it (gateway/catalog.py
                # reads it there). Past a budget in total, metadata is left out ("metadata_from": "").
                "metadata": source.metadata if source is not None and metadata_from is None else {},
                **({} if metadata_from is None else {"metadata_from": metadata_from}),
                "queued_requests": self._batcher.queued_requests(name),
                "queued_items": self._batcher.queued_items(name),
                "queued_bytes": self._batcher.queued_bytes(name),
                "oldest_wait_s": round(now - oldest, 3) if oldest is not None else 0.0,
                "items_per_s": round(stats.items_per_s(now), 3),
                **stats.describe(),
                **({"replicas": replicas(list(self._workers), name, self._overrides)} if pool else {}),
            }
            histograms[name] = stats.histograms()
        return BrokerSnapshot(
            instance_id=self.instance_id,
            models=models,
            workers=[w.describe(now) for w in self._workers],
            stats={**self.stats, "in_flight_requests": len(self._requests)},
            histograms=histograms,
            pool_events=self._pool_events.describe(now),
        )

    # ------------------------------------------------------------------ handlers

    def _on_gateway_message(self, gateway_id: bytes, message: protocol.Message, now: float) -> None:
        match message:
            case protocol.Request():
                self._on_request(gateway_id, message, now)
            case protocol.Requests():
                for request in message.requests:
                    self._on_request(gateway_id, request, now)
                for request_id, why in message.refused:
                    self._count_malformed(Peer.GATEWAY, gateway_id, why)
                    if request_id:
                        self._refuse_malformed_id(gateway_id, request_id, why)
            case protocol.Heartbeat():
                self._sends.append(Send(Peer.GATEWAY, gateway_id, protocol.Heartbeat(self.instance_id)))
            case protocol.StatusRequest():
                if message.overrides:
                    self._take_overrides(message.overrides, now)
                self._sends.append(Send(Peer.GATEWAY, gateway_id, self.status(message.request_id, now)))
            case _:
                self._unexpected(Peer.GATEWAY, gateway_id, message)

    def _on_worker_message(self, worker_id: bytes, message: protocol.Message, now: float,
                           peer_key: bytes | None) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None and worker.peer_key != peer_key:
            # Another key behind a registered worker's identity: never let it act for that worker.
            self._refuse(Peer.WORKER, worker_id, message, "its key differs from the one it registered with")
            return
        if isinstance(message, protocol.Ready):
            self._on_ready(worker_id, message, now, peer_key)
            return
        if self._workers.heard_from(worker_id, now) is None:
            if isinstance(message, protocol.BatchResult):
                self.stats["late_results"] += 1  # we gave up on this worker and re-dispatched its work
            elif isinstance(message, protocol.Heartbeat):
                # A worker we do not know (we expired it, or we restarted): make it register again.
                # Echo its registration, so that it can ignore answers to messages older than its READY.
                # Only heartbeats prompt this: they carry the registration, and a worker sends one every
                # interval. An answer to a late result could not say which registration it answers, and
                # one that reached a worker after it had registered again would make it register twice,
                # losing the batch it had just been given.
                self._sends.append(Send(Peer.WORKER, worker_id,
                                        protocol.Disconnect("unknown worker: send READY", message.registration)))
            return
        match message:
            case protocol.Heartbeat():
                self._on_worker_heartbeat(worker_id, message, now)
            case protocol.BatchResult():
                self._on_batch_result(worker_id, message, now)
            case protocol.Disconnect():
                self._lose_worker(self._workers.remove(worker_id), f"disconnected: {message.reason}", now)
            case _:
                self._unexpected(Peer.WORKER, worker_id, message)

    def _on_request(self, gateway_id: bytes, request: protocol.Request, now: float) -> None:
        key = (gateway_id, request.request_id)
        if key in self._requests:
            # Replying would confuse it with the original: drop it, the original still gets its reply.
            self.stats["duplicate_requests"] += 1
            if throttled(self.stats["duplicate_requests"]):
                logger.warning("gateway %s reused request id %r; dropped", gateway_id.hex(), request.request_id,
                               extra={"request_id": request.request_id})
            return
        self.stats["requests"] += 1
        model = request.model
        pending = PendingRequest(
            gateway_id, request.request_id, model, request.inputs, request.sizes, request.priority,
            enqueued_at=now, deadline_at=now + request.timeout_ms / 1000, trace=request.trace or None,
            timings={} if request.timings else None,
        )
        if self.draining:
            return self._finish(pending, now, ErrorCode.UNAVAILABLE, "broker is shutting down")
        if request.instance_id and request.instance_id != self.instance_id:
            # Meant for a broker instance that died: the client has already given up on it.
            return self._finish(pending, now, ErrorCode.UNAVAILABLE,
                                f"sent to broker instance {request.instance_id}, which restarted")
        if not request.inputs:
            return self._finish(pending, now, ErrorCode.BAD_REQUEST, "a request needs at least one input")
        refusal = unloaded_refusal(self._overrides, self._workers, model) if self._overrides else None
        if refusal is not None:
            return self._finish(pending, now, ErrorCode.UNAVAILABLE, refusal, retry_after_ms=5000)
        if not self._workers.serves(model):
            loadable = can_load(self._workers, model)  # a pool worker may load it: the request waits for that
            if loadable is not None and not loadable[0]:
                return self._finish(pending, now, ErrorCode.UNAVAILABLE, loadable[1], retry_after_ms=5000)
            if loadable is None:
                starting = now - self._started_at < self._config.heartbeat.expiry_s  # workers still rejoining
                if starting or model in self._model_stats:  # served before: its workers are restarting, most likely
                    return self._finish(pending, now, ErrorCode.UNAVAILABLE,
                                        f"no live worker serves model {model!r} right now", retry_after_ms=1000)
                return self._finish(pending, now, ErrorCode.NO_SUCH_MODEL, f"no live worker serves model {model!r}")
            self._wake_pool(model, now)
            pending.waits_for_load = True
        if request.timeout_ms <= 0:
            return self._finish(pending, now, ErrorCode.TIMEOUT, "deadline passed before the broker saw the request")
        if self._batcher.is_full(model, pending):
            return self._finish(
                pending, now, ErrorCode.OVERLOADED,
                f"model {model!r} has {self._batcher.queued_requests(model)} requests "
                f"({self._batcher.queued_bytes(model)} bytes) waiting",
                retry_after_ms=self._retry_after_ms(model, now),
            )
        self._requests[key] = pending
        heapq.heappush(self._deadlines, (pending.deadline_at, next(self._sequence), key))
        self._batcher.add(pending, now)

    def _on_ready(self, worker_id: bytes, ready: protocol.Ready, now: float, peer_key: bytes | None) -> None:
        previous = self._workers.register(worker_id, ready, now, peer_key)
        for model in ready.models:
            self._stats_for(model)  # remembered, so that while its workers restart it is 503, not 404
        self._prune_model_stats()
        self._warn_of_rollouts(ready.models)
        if previous is not None:
            self._lose_worker(previous, "registered again", now)
        logger.info(
            "worker %s joined: models %s, device %s, host %s, pid %d, max batch %d",
            worker_id.hex(), ",".join(ready.models), ready.device, ready.host, ready.pid, ready.max_batch_size,
            extra={"worker_id": worker_id.hex()},
        )

    def _warn_of_rollouts(self, models: list[str]) -> None:
        """Once per rollout: a model that live workers serve at more than one version (a worker with a
        version registers `name` and `name@version`)."""
        served: dict[str, set[str]] = {}  # name -> the versions live workers serve it at
        for worker in self._workers:
            for model in worker.models:
                name, _, version = model.partition("@")
                if version:
                    served.setdefault(name, set()).add(version)
        for name in {m.partition("@")[0] for m in models if "@" in m}:
            versions = frozenset(served.get(name, ()))
            if len(versions) > 1 and self._rollouts.get(name) != versions:
                self._rollouts[name] = versions
                logger.warning("model %s is served at %d versions: %s (a rollout?); unpinned requests go to any "
                               "of them", name, len(versions), ", ".join(sorted(versions)), extra={"model": name})
        for name in [n for n in self._rollouts if len(served.get(n, ())) <= 1]:
            del self._rollouts[name]  # one version left: the next rollout warns again

    def _on_worker_heartbeat(self, worker_id: bytes, heartbeat: protocol.Heartbeat, now: float) -> None:
        worker = self._workers.get(worker_id)
        worker.stats = heartbeat.stats
        worker.registration = heartbeat.registration
        if heartbeat.pool and worker.pool and heartbeat.pool.get("overrides"):
            self._take_overrides(heartbeat.pool["overrides"], now)  # a restarted broker learns them back
        if heartbeat.pool and worker.pool and self._workers.set_holdings(worker, heartbeat.pool):
            self._hasten_pool_heartbeats(now)  # every pool worker plans from the change now, not an interval late
            for model in [*heartbeat.pool.get("failed", ()), *self._unloaded_models()]:
                self._fail_unloadable(model, now)
        if heartbeat.pool.get("events") and worker.pool:
            self._on_pool_events(worker, heartbeat.pool["events"], now)
        if heartbeat.draining:
            if not worker.draining:
                logger.info("worker %s is draining; no more batches go to it", worker_id.hex(),
                            extra={"worker_id": worker_id.hex()})
            worker.draining = True
            # Every batch we sent before this acknowledgement reaches the worker before it (FIFO pipe).
            self._sends.append(Send(Peer.WORKER, worker_id, protocol.Heartbeat(self.instance_id, draining=True)))

    def _on_batch_result(self, worker_id: bytes, result: protocol.BatchResult, now: float) -> None:
        worker = self._workers.get(worker_id)
        batch = worker.in_flight.get(result.batch_id)
        if batch is None:  # late, or forged: counted, and logged rate-limited (a worker may send a flood)
            self.stats["late_results"] += 1
            if throttled(self.stats["late_results"]):
                logger.warning("discarded result for unknown batch %d from worker %s (%d so far)", result.batch_id,
                               worker_id.hex(), self.stats["late_results"],
                               extra={"batch_id": result.batch_id, "worker_id": worker_id.hex()})
            return
        if result.errors and any(error.code == ErrorCode.BATCH_FAILED.value for error in result.errors):
            self.stats["batches_failed_whole"] += 1  # predict() broke its contract (the worker logged it)
        if result.indices:
            self._on_partial_result(worker, batch, result, now)
            return
        if batch.answered is not None:  # it answered part of this batch already: the rest must come in parts too
            self.stats["malformed_results"] += 1
            self._fail_unanswered(batch, "worker sent a whole result for a batch it had answered in part", now)
            return
        if result.errors and len(result.errors) == len(batch.items) and all(
                error.code == ErrorCode.BUSY.value for error in result.errors):
            # Full with another broker's batches: not run, so back to the front of the queue as it was.
            self._workers.refused(worker_id, result.batch_id)
            self.stats["batches_refused_busy"] += 1
            self._requeue_unrun(batch.items)
            return
        # A worker cannot have computed longer than the batch was out; a larger claim would inflate
        # its batch deadline (which scales with its recent latency) without bound.
        compute_s = min(result.compute_ms / 1000, max(0.0, now - batch.dispatched_at))
        self._workers.completed(worker_id, result.batch_id, compute_s, now)
        stats = self._stats_for(batch.model)
        stats.record_completion(len(batch.items), now)
        stats.batch_latency.observe(now - batch.dispatched_at)
        size = len(batch.items)
        errors = {error.index: error for error in result.errors}
        if len(result.outputs) != size or any(not 0 <= index < size for index in errors):
            self.stats["malformed_results"] += 1
            message = (f"worker returned {len(result.outputs)} outputs and errors at "
                       f"{sorted(errors)[:8]} for {size} inputs")
            errors = {i: protocol.InputFailure(i, ErrorCode.MODEL_ERROR.value, message) for i in range(size)}
        whole_batch_failed = size > 1 and len(errors) == size and all(
            error.code == ErrorCode.MODEL_ERROR.value for error in errors.values()
        )
        if whole_batch_failed:
            # One input may have broken the batch for all: run each alone, so only the culprit fails.
            self._retry_isolated(batch.items, f"its batch failed: {errors[0].message}", now)
            return
        out_ms = (now - batch.dispatched_at) * 1000
        for position, item in enumerate(batch.items):
            if item.request.done:
                continue
            if item.request.timings is not None:
                _note_worker_times(item.request.timings, result, out_ms)
            error = errors.get(position)  # (a malformed result has errors for all, and maybe no outputs)
            self._answer(item, b"" if error else result.outputs[position], error, now, "batch")

    def _on_partial_result(self, worker: WorkerState, batch: InFlightBatch, result: protocol.BatchResult,
                           now: float) -> None:
        """A continuous worker answered some inputs of a batch (those of one forward pass).

        Each answered input's request is finished as soon as it has all its outputs, so a request
        never waits for the rest of the batch it travelled in. An input whose pass failed as a whole
        (PASS_FAILED) runs again alone, within --max-attempts; other errors are its own."""
        size = len(batch.items)
        if any(index >= size for index in result.indices):
            self.stats["malformed_results"] += 1
            self._fail_unanswered(batch, f"worker answered inputs {max(result.indices)} of a batch of {size}", now)
            return
        if batch.answered is None:
            batch.answered = bytearray(size)
        answered = batch.answered
        errors = {error.index: error for error in result.errors}
        rerun = []
        fresh = 0
        for k, position in enumerate(result.indices):
            if answered[position]:
                self.stats["duplicate_outputs"] += 1
                continue
            answered[position] = 1
            fresh += 1
            item = batch.items[position]
            if item.request.done:
                continue
            error = errors.get(k)
            if error is not None and error.code == ErrorCode.PASS_FAILED.value:
                rerun.append((item, error.message))
                continue
            if item.request.timings is not None:
                _note_worker_times(item.request.timings, result, (now - batch.dispatched_at) * 1000)
            self._answer(item, result.outputs[k], error, now, "pass")
        batch.pending -= fresh
        self._stats_for(batch.model).record_completion(fresh, now)
        for item, why in rerun:
            self._retry_isolated([item], f"its forward pass failed: {why}", now)
        if batch.pending > 0:
            self._workers.answered(batch, now)
            return
        compute_s = max(0.0, now - batch.dispatched_at)  # dispatch to last answer: what its deadline must cover
        self._workers.completed(worker.worker_id, batch.batch_id, compute_s, now)
        self._stats_for(batch.model).batch_latency.observe(compute_s)

    def _answer(self, item: WorkItem, output: bytes, error: protocol.InputFailure | None, now: float,
                shared: str) -> None:
        """One input's answer from a worker: its output, or its own error, which fails its request."""
        request = item.request
        if error is not None:
            code = ErrorCode(error.code) if error.code in _WORKER_INPUT_CODES else ErrorCode.MODEL_ERROR
            alone = f" (run alone, after its {shared} failed)" if item.isolated else ""
            self._finish(request, now, code, f"input {item.index}{alone}: {error.message}"[:4096])
            return
        if request.outputs[item.index] is None:
            request.remaining -= 1
        request.outputs[item.index] = output
        if request.remaining == 0:
            self._finish(request, now)

    def _fail_unanswered(self, batch: InFlightBatch, message: str, now: float) -> None:
        """A worker's result for this batch makes no sense: its unanswered inputs fail, and the batch is done."""
        for item in batch.unanswered():
            self._finish(item.request, now, ErrorCode.MODEL_ERROR, f"input {item.index}: {message}"[:4096])
        self._workers.completed(batch.worker_id, batch.batch_id, max(0.0, now - batch.dispatched_at), now)

    # ------------------------------------------------------------------ actions

    def _dispatch(self, worker_id: bytes, model: str, items: list[WorkItem], now: float) -> None:
        batch = InFlightBatch(next(self._batch_ids), worker_id, model, items, dispatched_at=now)
        self._workers.dispatched(batch, now)
        stats = self._stats_for(model)
        stats.record_dispatch(len(items))
        queue_wait = stats.queue_wait
        timed = False
        for item in items:
            waited_s = now - item.enqueued_at
            queue_wait.observe(waited_s)
            if item.request.waits_for_load:  # its first input out: how long it waited for a replica
                item.request.waits_for_load = False
                stats.cold_start_wait.observe(now - item.request.enqueued_at)
            timings = item.request.timings
            if timings is not None:  # asked for: the longest any of its inputs waited
                timed = True
                timings["queue_ms"] = max(timings.get("queue_ms", 0.0), waited_s * 1000)
        message = protocol.Batch(
            batch_id=batch.batch_id,
            model=model,
            request_ids=[item.request.request_id for item in items],
            timeout_ms=min(int((batch.deadline_at - now) * 1000), protocol.MAX_DURATION_MS),
            inputs=[item.request.inputs[item.index] for item in items],
            # The trace of each traced request, and how long its input queued here (the worker's span of it).
            traces={item.request.request_id: [*item.request.trace, int((now - item.enqueued_at) * 1000)]
                    for item in items if item.request.trace},
            timed=timed,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("batch %d of %d inputs to worker %s", batch.batch_id, len(items), worker_id.hex(),
                         extra={"batch_id": batch.batch_id, "worker_id": worker_id.hex(), "model": model,
                                "request_id": ",".join(message.request_ids)})
        self._sends.append(Send(Peer.WORKER, worker_id, message, batch))

    def _on_send_failed(self, instruction: Send, now: float) -> None:
        if instruction.peer is Peer.GATEWAY:
            return  # the gateway went away or stopped reading; its replies are lost with it (counted by the shell)
        self._lose_worker(self._workers.remove(instruction.peer_id), "unreachable", now)

    def _lose_worker(self, worker: WorkerState | None, reason: str, now: float, offence: bool = True) -> None:
        """A worker is gone: its inputs run again (alone, if their batch had company), or fail. Losing
        batches it was sent is an offence (a flapping link loses them as a black hole does)."""
        if worker is None:
            return
        if offence and any(batch.sent for batch in worker.in_flight.values()):
            self._workers.record_offence(worker.worker_id, now)
        lost = worker.in_flight_items
        logger.warning("worker %s lost (%s) with %d inputs in flight", worker.worker_id.hex(), reason, lost,
                       extra={"worker_id": worker.worker_id.hex(), "batch_id": ",".join(map(str, worker.in_flight))})
        self.stats["workers_lost"] += 1
        unsent = []
        for batch in worker.in_flight.values():
            if batch.sent:  # of a continuous worker's batch, only the inputs it had not answered
                self._retry_isolated(batch.unanswered(), f"a worker running it was lost ({reason})", now,
                                     code=ErrorCode.WORKER_LOST, lost_on=worker.worker_id)
            else:  # never delivered, so never run: back to the front of the queue as it was
                unsent.extend(batch.items)
        self._requeue_unrun(unsent)
        worker.in_flight.clear()

    def _requeue_unrun(self, items: list[WorkItem]) -> None:
        """Items that were taken for a batch but never ran: their attempt does not count."""
        for item in items:
            item.attempts -= 1
        self._batcher.requeue(items)

    def _retry_isolated(self, items: list[WorkItem], why: str, now: float,
                        code: ErrorCode = ErrorCode.MODEL_ERROR, lost_on: bytes | None = None) -> None:
        """Requeue the items of a failed batch to run one per batch, or fail those tried enough.

        Running each alone, rather than bisecting, keeps every input at --max-attempts executions
        (2 by default) while still telling a poison input from the bystanders in its batch.

        lost_on: the worker the items were lost with. They run again elsewhere while another worker
        serves their model (Batcher.assign), so a worker that loses every batch (a black hole, a
        wedged model) cannot make innocent inputs fail; and an input is called poison only when it
        was lost with distinct workers, or with the only worker that could take it.
        """
        retry = []
        max_attempts = self._config.batching.max_attempts
        for item in items:
            if item.request.done:
                continue
            again = lost_on in item.lost_on  # lost with it before, so no other worker could take it
            if lost_on is not None and not again:
                item.lost_on += (lost_on,)
            if item.attempts >= max_attempts:
                self._finish(item.request, now, code, self._exhausted_message(item, why, again)[:1000])
            else:
                item.isolated = True
                retry.append(item)
                self._stats_for(item.request.model).redispatched += 1
        self._batcher.requeue(retry)

    def _exhausted_message(self, item: WorkItem, why: str, again: bool) -> str:
        """Why an input that ran --max-attempts times fails, naming the workers it was lost with.
        Poison only if it was lost with two distinct workers, or with the only one that could take it."""
        workers = [worker_id.hex() for worker_id in item.lost_on]
        if len(workers) > 1:
            where = f"lost with {len(workers)} distinct workers: {', '.join(workers)}"
        elif again:
            where = (f"lost with worker {workers[0]}, the only worker that could take it "
                     f"(serving model {item.request.model!r})")
        else:
            where = f"lost with worker {workers[0]}" if workers else ""
        poison = item.isolated and (len(workers) != 1 or again)
        alone = " when run alone: it looks like a poison input" if poison else (" when run alone" if item.isolated else "")
        return "; ".join(filter(None, (f"input {item.index} failed {item.attempts} times{alone}",
                                       f"last time {why}", where)))

    def _expire_requests(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, key = heapq.heappop(self._deadlines)
            request = self._requests.get(key)
            if request is not None and request.deadline_at <= now:
                self._finish(request, now, ErrorCode.TIMEOUT, "deadline passed before the request finished")
        if len(self._deadlines) > 4 * len(self._requests) + 1024:
            # Entries of answered requests linger until their deadline; compact them away.
            self._deadlines = [entry for entry in self._deadlines if entry[2] in self._requests]
            heapq.heapify(self._deadlines)

    def _finish(self, request: PendingRequest, now: float, code: ErrorCode | None = None, message: str = "",
                retry_after_ms: int = 0) -> None:
        """Send the request's one reply (a success via the outbox) and forget it."""
        if request.done:
            return
        request.done = True
        self._requests.pop(request.key, None)
        self._batcher.forget(request)
        outcome = "ok" if code is None else code.value
        self.stats[_REPLY_STAT[outcome]] += 1
        if request.model in self._model_stats:  # unknown names must not grow state
            self._model_stats[request.model].outcomes[outcome] += 1
        if code is None:
            # Sent by _flush_replies(), together with the other requests of this gateway that the
            # same batch result finished.
            self._outbox.setdefault(request.gateway_id, []).append(request)
            return
        if code in _REFUSALS:  # a peer's doing, and it may flood: counted (replies_*), logged rate-limited
            count = self.stats[_REPLY_STAT[outcome]]
            if throttled(count):
                logger.info("request %s refused: %s %s (%d so far)", request.request_id, code.value, message[:200],
                            count, extra={"request_id": request.request_id, "model": request.model[:64]})
        elif code is not ErrorCode.OVERLOADED:
            logger.info("request %s failed: %s %s", request.request_id, code.value, message,
                        extra={"request_id": request.request_id, "model": request.model})
        reply = protocol.Reply(
            request.request_id, error_code=code.value, error_message=message, retry_after_ms=retry_after_ms
        )
        self._sends.append(Send(Peer.GATEWAY, request.gateway_id, reply))

    def _flush_replies(self) -> None:
        """Queue the successful replies that _finish() held: one message per gateway, not per request."""
        if not self._outbox:
            return
        for gateway_id, finished in self._outbox.items():
            start, size = 0, 0
            for end, request in enumerate(finished, 1):
                size += sum(map(len, request.outputs))
                if size >= _REPLIES_MAX_BYTES or end == len(finished):
                    chunk = finished[start:end]
                    if len(chunk) == 1:
                        message = protocol.Reply(chunk[0].request_id, outputs=chunk[0].outputs)
                        if chunk[0].timings:
                            message.timings = chunk[0].timings
                    else:
                        message = protocol.Replies([r.request_id for r in chunk], [r.outputs for r in chunk])
                        message.timings = {r.request_id: r.timings for r in chunk if r.timings}
                    self._sends.append(Send(Peer.GATEWAY, gateway_id, message))
                    start, size = end, 0
        self._outbox.clear()

    def _retry_after_ms(self, model: str, now: float) -> int:
        """How long until the queue has drained enough to take a request, at the recent rate."""
        rate = self._stats_for(model).items_per_s(now)
        backlog = self._batcher.queued_items(model)
        if rate <= 0:
            return 1000
        return max(100, min(60_000, math.ceil(backlog / rate * 1000)))

    # ------------------------------------------------------------------ pool workers (broker/pool.py)

    def _wake_pool(self, model: str, now: float) -> None:
        """A request waits for a pool worker to load its model: on the first one, heartbeat the pool
        workers at once, so that they plan from it now, not at the next interval (so too when a pool
        worker's holdings change: two workers that plan from views apart could take the same load)."""
        self._stats_for(model)  # reported in STATUS while it waits
        if self._batcher.queued_items(model) == 0:
            self._hasten_pool_heartbeats(now)

    def _hasten_pool_heartbeats(self, now: float) -> None:
        for worker in pool_workers(self._workers):
            worker.heartbeat_due_at = min(worker.heartbeat_due_at, now)

    def _take_overrides(self, wire: dict, now: float) -> None:
        """The operator's overrides, from a gateway or a pool worker: merged by version; a change reaches
        every pool worker at once."""
        self._overrides, changed = take_overrides(self._overrides, wire)
        if changed:
            self._hasten_pool_heartbeats(now)
            for model in self._unloaded_models():
                self._fail_unloadable(model, now)  # what waits for a load that will not come

    def _unloaded_models(self) -> list[str]:
        """Models the operator unloaded: once no worker serves one, what waits for it is refused."""
        return [model for model, override in self._overrides.items() if override.unloaded]

    def _fail_unloadable(self, model: str, now: float) -> None:
        """A load failed: if no worker serves the model and none may still load it, what waits for it
        gets UNAVAILABLE now, with the reason, rather than TIMEOUT at its deadline."""
        if self._workers.serves(model) or not self._batcher.queued_items(model):
            return
        refusal = unloaded_refusal(self._overrides, self._workers, model)
        loadable = can_load(self._workers, model) if refusal is None else (False, refusal)
        if loadable is None or loadable[0]:
            return
        for request in [r for r in self._requests.values() if r.model == model]:
            if refusal is None or request.queued == request.remaining:  # (a drained replica answers what it runs)
                self._finish(request, now, ErrorCode.UNAVAILABLE, loadable[1], retry_after_ms=5000)

    def _on_pool_events(self, worker: WorkerState, events: list[dict], now: float) -> None:
        """A pool worker's latest events: each new one goes into the ring (STATUS) and is counted (/metrics)."""
        for entry in self._pool_events.ingest(worker.pool["id"], worker.host, worker.pool["catalog"], events, now):
            event = entry.event
            stats = self._stats_for(event.model)
            if event.kind is EventKind.LOADED:
                stats.pool_loads[(event.reason_label, "ok")] += 1
                stats.load_seconds.observe(event.seconds)
            elif event.kind is EventKind.LOAD_FAILED:
                stats.pool_loads[(event.reason_label, "failed")] += 1
            elif event.kind is EventKind.UNLOAD:
                stats.pool_unloads[event.reason_label] += 1

    def _demand_report(self, now: float) -> dict:
        def oldest_wait_s(model: str) -> float:
            oldest = self._batcher.oldest_enqueued_at(model)
            return 0.0 if oldest is None else max(0.0, now - oldest)

        def rate_per_s(model: str) -> float:
            stats = self._model_stats.get(model)
            return stats.items_per_s(now) if stats is not None else 0.0

        return demand_report(list(self._workers), self._batcher.queued_items, oldest_wait_s, rate_per_s,
                             self._overrides)

    # ------------------------------------------------------------------ bookkeeping

    def _count_malformed(self, peer: Peer, peer_id: bytes, error: protocol.DecodeError | str) -> None:
        self.stats["malformed"] += 1
        if throttled(self.stats["malformed"]):
            logger.warning("dropped malformed message from %s %s: %s (%d so far)", peer.name.lower(),
                           peer_id.hex(), error, self.stats["malformed"])

    def _refuse_malformed_request(self, gateway_id: bytes, frames: list[bytes], error: protocol.DecodeError,
                                  now: float) -> None:
        """A REQUEST (or REQUESTS) that does not decode, but whose request ids can be read: answer each
        BAD_REQUEST now, rather than leave its sender waiting for its deadline."""
        for request_id in protocol.request_ids_of(frames):
            self._refuse_malformed_id(gateway_id, request_id, error)

    def _refuse_malformed_id(self, gateway_id: bytes, request_id: str, error: protocol.DecodeError | str) -> None:
        """BAD_REQUEST for a request that did not decode. Never for an id still in flight: that would be a
        second reply to another request."""
        if (gateway_id, request_id) in self._requests:
            return
        self.stats[_REPLY_STAT[ErrorCode.BAD_REQUEST.value]] += 1
        self._sends.append(Send(Peer.GATEWAY, gateway_id, protocol.Reply(
            request_id, error_code=ErrorCode.BAD_REQUEST.value, error_message=f"malformed request: {error}"[:4096])))

    def _refuse(self, peer: Peer, peer_id: bytes, message: protocol.Message, why: str) -> None:
        self.stats["refused"] += 1
        if throttled(self.stats["refused"]):
            logger.warning("refused %s from %s %s: %s (%d so far)", type(message).__name__, peer.name.lower(),
                           peer_id.hex(), why, self.stats["refused"])

    def _unexpected(self, peer: Peer, peer_id: bytes, message: protocol.Message) -> None:
        self._refuse(peer, peer_id, message, "a message of that kind is not expected from it")

    def _stats_for(self, model: str) -> ModelStats:
        stats = self._model_stats.get(model)
        if stats is None:
            stats = self._model_stats[model] = ModelStats()
        return stats

    def _prune_model_stats(self) -> None:
        """Forget the oldest models that no worker serves, past a bound: READYs name models freely."""
        excess = len(self._model_stats) - _MAX_REMEMBERED_MODELS
        if excess <= 0:
            return
        for model in [m for m in self._model_stats if not self._workers.serves(m)][:excess]:
            if self._batcher.forget_model(model):  # not while inputs of it still wait for their deadline
                del self._model_stats[model]  # and with it, its series in /metrics


def _note_worker_times(timings: dict, result: protocol.BatchResult, out_ms: float) -> None:
    """A timed request's figures from the result that answered one of its inputs: the longest any of
    its inputs was prepared and ran. A worker cannot have taken longer than the batch was out (out_ms)."""
    prepare_ms, forward_ms = min(result.prepare_ms, out_ms), min(result.compute_ms, out_ms)
    if prepare_ms > timings.get("prepare_ms", 0.0):
        timings["prepare_ms"] = prepare_ms
    if forward_ms > timings.get("forward_ms", 0.0):
        timings["forward_ms"] = forward_ms


def throttled(count: int) -> bool:
    """Log the first ten occurrences, then every hundredth, so a flood cannot fill the disk."""
    return count <= 10 or count % 100 == 0
