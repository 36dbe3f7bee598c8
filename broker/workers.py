"""The worker registry: who is connected, what each serves, what each holds, when each expires.

Pure: no sockets, no clock. broker.py feeds it events with `now` and carries out what it returns.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from broker.batching import InFlightBatch
from broker.config import HeartbeatConfig
from ddml_common.protocol import Ready, document_size

_LATENCY_EWMA_WEIGHT = 0.2  # weight of the newest batch in the recent-latency average
_RECENT_BATCHES = 64  # compute times kept per worker, for its p50
# A new registration's latency until its first result: pessimistic, so that it is not preferred over
# workers that have shown what they do (at 0 it would win every tie, a black hole included).
_LATENCY_PRIOR_S = 1.0
_OFFENCES_KEPT = 4096  # identities whose overrun batches are remembered (identities are peer-chosen)
_SUSPECT_BACKOFF_MAX_S = 600.0  # the longest a worker that overran batches is kept from new work


@dataclass
class Offences:
    """What a worker identity did wrong, kept across its registrations."""

    overruns: int = 0  # times it lost batches it was sent: past their deadline, silent, or its link or READY anew
    suspect_until: float = -math.inf  # no new work for it before then


@dataclass
class WorkerState:
    worker_id: bytes  # ZeroMQ routing identity
    models: frozenset[str]
    max_batch_size: int
    max_batches: int  # batches it may hold at once
    device: str
    host: str
    pid: int
    registered_at: float
    last_seen_at: float
    expires_at: float  # last message + interval × liveness
    heartbeat_due_at: float  # when the broker next heartbeats it
    in_flight: dict[int, InFlightBatch] = field(default_factory=dict)  # by batch_id
    latency_ewma_s: float = 0.0  # recent compute time per batch; 0 until the first result
    batches_done: int = 0
    items_done: int = 0
    stats: dict = field(default_factory=dict)  # the worker's own figures, from its heartbeats
    draining: bool = False  # it asked for no more batches (graceful shutdown)
    metadata: dict = field(default_factory=dict)  # the model's tensors in and out, from READY
    metadata_size: int = 0  # protocol.document_size(metadata): what it costs a STATUS
    recent_compute_s: deque = field(default_factory=lambda: deque(maxlen=_RECENT_BATCHES))
    last_batch_size: int = 0  # of the batch it completed last (batching's refill hold)
    last_compute_s: float = 0.0
    last_completed_at: float = -math.inf
    peer_key: bytes | None = None  # the CURVE public key it registered with; only that key may speak for it
    registration: int = 0  # the worker's count of its READYs, from its heartbeats; echoed when we drop it
    saturated: bool = False  # it handed a batch back BUSY (full with another broker's work) and has not spoken since

    max_inputs: int = 0  # > 0: continuous batching (it holds up to this many inputs, from any number of batches)
    # It overran a batch deadline: no new work before then while a trusted worker serves its models (None:
    # not held back). The batcher decides that (Batcher.assign); alone, a suspect still serves, on probation.
    suspect_until: float | None = None
    on_probation: bool = False  # it overran a batch deadline: one batch at a time, and last choice, until it answers
    pool: dict = field(default_factory=dict)  # a pool worker's Ready.pool (id, catalog, limits); empty: a fixed one
    # A pool worker's own cap per model (Ready.pool's max_batch); a model not in it gets max_batch_size.
    model_max_batch_size: dict[str, int] = field(default_factory=dict)
    holdings: dict = field(default_factory=dict)  # a pool worker's latest Heartbeat.pool (held, loading, failed)

    @property
    def in_flight_items(self) -> int:
        return sum(batch.pending for batch in self.in_flight.values())

    @property
    def has_room(self) -> bool:
        if self.draining or self.saturated:
            return False
        if self.on_probation and self.in_flight:
            return False
        if self.max_inputs:
            return self.in_flight_items < self.max_inputs
        return len(self.in_flight) < self.max_batches

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "busy" if self.in_flight else "idle"

    def describe(self, now: float) -> dict:
        return {
            "worker_id": self.worker_id.hex(),
            "models": sorted(self.models),
            "host": self.host,
            "pid": self.pid,
            "device": self.device,
            "state": self.state,
            "max_batch_size": self.max_batch_size,
            "in_flight_batches": len(self.in_flight),
            "in_flight_items": self.in_flight_items,
            "max_inputs": self.max_inputs,
            "batches": self.batches_done,
            "items": self.items_done,
            "latency_ewma_ms": round(self.latency_ewma_s * 1000, 3) if self.batches_done else 0.0,
            "on_probation": self.on_probation,
            "p50_batch_latency_ms": round(statistics.median(self.recent_compute_s) * 1000, 3)
            if self.recent_compute_s else 0.0,
            "last_heartbeat_age_s": round(now - self.last_seen_at, 3),
            "uptime_s": round(now - self.registered_at, 3),
            "stats": self.stats,
            **({"pool": {"id": self.pool["id"], "held_mb": self.holdings.get("held", {}),
                         "loading": self.holdings.get("loading", []), "failed": self.holdings.get("failed", {}),
                         "max_models": self.pool["max_models"], "budget_mb": self.pool["budget_mb"]}}
               if self.pool else {}),
        }


class WorkerRegistry:
    def __init__(self, config: HeartbeatConfig):
        self._config = config
        self._workers: dict[bytes, WorkerState] = {}
        self._served: frozenset[str] | None = None  # models some worker serves; None: recompute
        # By identity, oldest first, bounded: a re-registration must not wipe a worker's record.
        self._offences: OrderedDict[bytes, Offences] = OrderedDict()

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self):
        return iter(self._workers.values())

    def get(self, worker_id: bytes) -> WorkerState | None:
        return self._workers.get(worker_id)

    def register(self, worker_id: bytes, ready: Ready, now: float,
                 peer_key: bytes | None = None) -> WorkerState | None:
        """Add a worker. Returns the state it replaces, if it was already registered."""
        previous = self._workers.pop(worker_id, None)
        self._served = None
        models = frozenset(ready.models)
        offences = self._offences.get(worker_id)
        worker = self._workers[worker_id] = WorkerState(
            worker_id=worker_id,
            models=models,
            max_batch_size=ready.max_batch_size,
            max_batches=ready.max_batches,
            device=ready.device,
            host=ready.host,
            pid=ready.pid,
            registered_at=now,
            last_seen_at=now,
            expires_at=now + self._config.expiry_s,
            heartbeat_due_at=now,
            metadata=ready.metadata,
            metadata_size=document_size(ready.metadata) if ready.metadata else 0,
            peer_key=peer_key,
            max_inputs=ready.max_inputs,
            pool=ready.pool,
            model_max_batch_size=dict(ready.pool.get("max_batch", {})),
            latency_ewma_s=max([_LATENCY_PRIOR_S] + [w.latency_ewma_s for w in self._workers.values()
                                                     if w.batches_done and not w.models.isdisjoint(models)]),
        )
        if offences is not None:
            worker.on_probation = True
            worker.suspect_until = offences.suspect_until if offences.suspect_until > now else None
        return previous

    def heard_from(self, worker_id: bytes, now: float) -> WorkerState | None:
        """Any message is a sign of life. Returns None for a worker that is not registered."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.last_seen_at = now
            worker.expires_at = now + self._config.expiry_s
            worker.saturated = False
        return worker

    def set_holdings(self, worker: WorkerState, holdings: dict) -> bool:
        """A pool worker's heartbeat: the models it holds now are the models it serves. True if what it
        holds, loads or failed to load changed."""
        changed = (holdings.get("held", {}).keys() != worker.holdings.get("held", {}).keys()
                   or holdings.get("loading") != worker.holdings.get("loading")
                   or holdings.get("failed", {}).keys() != worker.holdings.get("failed", {}).keys())
        worker.holdings = holdings
        models = frozenset(holdings.get("held", ()))
        if models != worker.models:
            worker.models = models
            self._served = None
        return changed

    def remove(self, worker_id: bytes) -> WorkerState | None:
        self._served = None
        return self._workers.pop(worker_id, None)

    def with_room(self, now: float = -math.inf) -> list[WorkerState]:
        """Workers that may take a batch now (a suspect among them: see suspect_until). A suspect whose
        backoff has ended is no longer held back; it stays on probation until it answers."""
        for worker in self._workers.values():
            if worker.suspect_until is not None and worker.suspect_until <= now:
                worker.suspect_until = None
        return [w for w in self._workers.values() if w.has_room]

    def serves_elsewhere(self, model: str, worker_ids: tuple[bytes, ...]) -> bool:
        """Whether a live worker other than these serves the model (not draining, nor held back as a suspect)."""
        return any(model in w.models and w.worker_id not in worker_ids and not w.draining
                   and w.suspect_until is None for w in self._workers.values())

    def proven_elsewhere(self, model: str, worker_ids: tuple[bytes, ...]) -> bool:
        """Whether a worker other than these, which has answered a batch since it registered and is
        trusted (neither on probation nor a suspect, nor draining), serves the model."""
        return any(model in w.models and w.worker_id not in worker_ids and w.batches_done and not w.on_probation
                   and not w.draining and w.suspect_until is None for w in self._workers.values())

    def offences(self, worker_id: bytes) -> Offences | None:
        return self._offences.get(worker_id)

    def record_offence(self, worker_id: bytes, now: float) -> None:
        """The worker lost batches it was sent (expire() records an overrun or a silence itself; the core
        records a link lost, or a registration anew, while it held some): hold it back for a backoff that doubles
        with each offence, from the batch timeout floor. The record outlives its registration, within a bound."""
        offences = self._offences.pop(worker_id, None) or Offences()
        self._offences[worker_id] = offences  # the most recent offender last
        offences.overruns += 1
        backoff_s = min(_SUSPECT_BACKOFF_MAX_S,
                        self._config.batch_timeout_floor_s * 2.0 ** min(offences.overruns - 1, 30))
        offences.suspect_until = now + backoff_s
        current = self._workers.get(worker_id)
        if current is not None:  # registered again already (a READY is how the loss came to light)
            current.on_probation = True
            current.suspect_until = offences.suspect_until
        while len(self._offences) > _OFFENCES_KEPT:
            self._offences.popitem(last=False)

    def serves(self, model: str) -> bool:
        if self._served is None:  # asked once per request; recomputed only when workers come or go
            self._served = frozenset(m for w in self._workers.values() for m in w.models)
        return model in self._served

    def dispatched(self, batch: InFlightBatch, now: float) -> None:
        worker = self._workers.get(batch.worker_id)
        assert worker is not None and worker.has_room, "dispatch to an unknown or full worker: this is a bug"
        worker.in_flight[batch.batch_id] = batch
        batch.deadline_at = now + self.batch_timeout_s(worker)

    def batch_timeout_s(self, worker: WorkerState) -> float:
        """How long a batch may run before the broker takes it away."""
        measured_s = worker.latency_ewma_s if worker.batches_done else 0.0  # not the prior
        return max(
            self._config.batch_timeout_floor_s,
            self._config.batch_timeout_factor * measured_s * worker.max_batches,
        )

    def refused(self, worker_id: bytes, batch_id: int) -> InFlightBatch | None:
        """The worker handed a batch back unrun (BUSY): it has no room until it next speaks."""
        worker = self._workers.get(worker_id)
        batch = worker.in_flight.pop(batch_id, None) if worker is not None else None
        if batch is not None:
            worker.saturated = True
        return batch

    def answered(self, batch: InFlightBatch, now: float) -> None:
        """A continuous worker answered some of a batch's inputs: it is making progress, so the
        batch's deadline starts again (it may have waited behind the inputs the worker held)."""
        worker = self._workers.get(batch.worker_id)
        if worker is not None:
            batch.deadline_at = now + self.batch_timeout_s(worker)
            worker.on_probation = False  # it answered: trusted again

    def completed(self, worker_id: bytes, batch_id: int, compute_s: float,
                  now: float = -math.inf) -> InFlightBatch | None:
        """A result arrived. None if the batch is unknown (late, or from a worker we gave up on)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return None
        batch = worker.in_flight.pop(batch_id, None)
        if batch is None:
            return None
        worker.latency_ewma_s = (
            compute_s
            if worker.batches_done == 0  # the first measurement replaces the prior
            else (1 - _LATENCY_EWMA_WEIGHT) * worker.latency_ewma_s + _LATENCY_EWMA_WEIGHT * compute_s
        )
        worker.batches_done += 1
        worker.items_done += len(batch.items)
        worker.recent_compute_s.append(compute_s)
        worker.last_batch_size, worker.last_compute_s, worker.last_completed_at = len(batch.items), compute_s, now
        worker.on_probation = False  # it answered: trusted again (its record stays, for the next backoff)
        return batch

    def expire(self, now: float) -> list[WorkerState]:
        """Remove and return workers that went silent, or that sit on a batch past its deadline."""
        dead = []
        for worker in self._workers.values():
            overran = any(b.deadline_at <= now for b in worker.in_flight.values())
            silent = worker.expires_at <= now
            # An offence: it lost what it was sent (fell silent holding batches, as a black hole that
            # is SIGSTOPped does, or let one pass its deadline).
            if overran or (silent and any(b.sent for b in worker.in_flight.values())):
                self.record_offence(worker.worker_id, now)
            if overran or silent:
                dead.append(worker)
        for worker in dead:
            del self._workers[worker.worker_id]
            self._served = None
        return dead

    def due_for_heartbeat(self, now: float) -> list[WorkerState]:
        due = [w for w in self._workers.values() if w.heartbeat_due_at <= now]
        for worker in due:
            worker.heartbeat_due_at = now + self._config.interval_s
        return due

    def next_deadline(self) -> float:
        """The earliest time at which expire() or due_for_heartbeat() has something to do."""
        deadline = math.inf
        for worker in self._workers.values():
            deadline = min(deadline, worker.expires_at, worker.heartbeat_due_at)
            if worker.suspect_until is not None:
                deadline = min(deadline, worker.suspect_until)
            for batch in worker.in_flight.values():
                deadline = min(deadline, batch.deadline_at)
        return deadline
