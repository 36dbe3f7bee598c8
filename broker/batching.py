"""Batch formation: which waiting inputs go to which worker, and when.

Pure: no sockets, no clock. broker.py calls assign() on every pass of its loop.

The unit of scheduling is one input of one request (a WorkItem), so a request with more
inputs than a worker's max batch size is split across batches and workers; the broker
reassembles the outputs in input order.

Load-aware micro-batching: whenever a worker serving model M is idle and M's queue is not
empty, a batch goes out at once, up to that worker's max batch size. While every worker is
busy, inputs accumulate, so batches grow with load. A busy worker with credit for a second
batch (pipelining) gets it only once a full batch is waiting (see _has_credit), and a worker
that has just finished a batch of n waits briefly for its n clients to come back, when they
are coming back (see _refill_hold_until). Among workers with room, the one with the
fewest inputs in flight wins, then the one with the lowest recent batch latency.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from broker.config import BatchingConfig
from ddml_common.protocol import MAX_MESSAGE_BYTES

_MAX_BATCH_BYTES = MAX_MESSAGE_BYTES // 2  # encoded inputs per batch: a batch message must fit a frame
_REFILL_WAIT_FRACTION = 0.25  # of the last batch's compute time (see Batcher._refill_hold_until)
_REFILL_PACE = 3.0  # returns must keep this multiple of the arrival rate seen during the last batch
_KEPT_EMPTY_LEVELS = 8  # empty priority levels kept per model before they are pruned (priorities are peer-chosen)


@dataclass(eq=False, slots=True)
class PendingRequest:
    gateway_id: bytes  # routing identity of the socket the reply must go to
    request_id: str
    model: str
    inputs: list[bytes]  # encoded inputs, forwarded to workers untouched
    sizes: list[int]  # cost hint per input (0 = unknown)
    priority: int
    enqueued_at: float
    deadline_at: float
    outputs: list[bytes | None] = field(default_factory=list)
    remaining: int = 0  # inputs without an output yet
    queued: int = 0  # inputs waiting in the batcher's queue
    done: bool = False  # replied to; anything still about it is discarded
    nbytes: int = 0  # encoded inputs, in all
    trace: list | None = None  # the caller's [traceparent, tracestate], carried to the worker untouched
    timings: dict | None = None  # asked for (Request.timings): the ms of each stage so far (Reply.timings)
    waits_for_load: bool = False  # enqueued while no worker served its model: a pool worker loads it

    def __post_init__(self) -> None:
        inputs = self.inputs
        count = len(inputs)
        self.outputs = [None] * count
        self.remaining = count
        self.nbytes = len(inputs[0]) if count == 1 else sum(map(len, inputs))

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.gateway_id, self.request_id)


@dataclass(eq=False, slots=True)
class WorkItem:
    request: PendingRequest
    index: int  # position of this input within its request
    enqueued_at: float  # first arrival; a requeued item keeps it, so it is not starved
    attempts: int = 0  # times it was sent to a worker
    isolated: bool = False  # its last batch failed as a whole: run it alone to tell poison from bystander
    lost_on: tuple[bytes, ...] = ()  # workers it was lost with, in order; it runs elsewhere while it can

    @property
    def size(self) -> int:
        sizes = self.request.sizes
        return sizes[self.index] if sizes else 0

    @property
    def nbytes(self) -> int:
        return len(self.request.inputs[self.index])


@dataclass(eq=False, slots=True)
class InFlightBatch:
    batch_id: int
    worker_id: bytes
    model: str
    items: list[WorkItem]
    dispatched_at: float
    deadline_at: float = math.inf  # set by WorkerRegistry.dispatched()
    sent: bool = False  # handed to the socket; until then a lost worker cannot have run it
    pending: int = 0  # inputs not answered yet (a continuous worker answers them a few at a time)
    answered: bytearray | None = None  # per input, 1 once answered; None until a partial result comes

    def __post_init__(self) -> None:
        self.pending = len(self.items)

    @property
    def isolated(self) -> bool:
        """It carries an input that must run alone (a bystander of a failed pass, or a suspect)."""
        return len(self.items) == 1 and self.items[0].isolated

    def unanswered(self) -> list[WorkItem]:
        answered = self.answered
        if answered is None:
            return self.items
        return [item for item, done in zip(self.items, answered) if not done]


@dataclass(frozen=True)
class Dispatch:
    worker_id: bytes
    model: str
    items: list[WorkItem]


class WorkerView(Protocol):
    """What batching needs to know of a worker (broker.workers.WorkerState has it)."""

    worker_id: bytes
    models: frozenset[str]
    max_batch_size: int
    model_max_batch_size: dict[str, int]  # a pool worker's own cap per model, over max_batch_size (max_batch_size_for)
    max_batches: int
    in_flight: dict
    latency_ewma_s: float
    last_batch_size: int  # of the batch it completed last
    last_compute_s: float
    last_completed_at: float
    max_inputs: int  # > 0: continuous batching, credit counted in inputs (see _continuous_room)
    on_probation: bool  # it once overran a batch deadline: it gets work last, until it answers a batch
    suspect_until: float | None  # within its backoff after an overrun: work only if no trusted worker serves the model
    batches_done: int  # batches it answered since it registered (> 0 and not on probation: proven)

    @property
    def in_flight_items(self) -> int: ...


ServesElsewhere = Callable[[str, tuple[bytes, ...]], bool]  # (model, worker ids): does a live worker outside them serve it?


def max_batch_size_for(worker: WorkerView, model: str) -> int:
    """The most inputs of `model` per batch to this worker: a pool worker's own cap for the model, else its one cap."""
    return worker.model_max_batch_size.get(model, worker.max_batch_size)


class Batcher:
    def __init__(self, config: BatchingConfig):
        self._config = config
        # model -> priority -> FIFO of items. Higher priority is served first.
        self._queues: dict[str, dict[int, deque[WorkItem]]] = {}
        self._queued_requests: dict[str, int] = {}  # requests with at least one input waiting
        self._queued_live: dict[str, int] = {}  # inputs waiting whose request is not answered yet
        self._queued_bytes: dict[str, int] = {}  # encoded inputs held in the queues, answered or not
        self._hold_until = math.inf  # the earliest end of a hold (refill or max wait) decided by the last assign()

    def queued_requests(self, model: str) -> int:
        return self._queued_requests.get(model, 0)

    def queued_bytes(self, model: str) -> int:
        return self._queued_bytes.get(model, 0)

    def queued_items(self, model: str) -> int:
        """Inputs waiting whose request is not answered yet. An answered request's inputs stay in the
        queue until a batch skips them, and a model no worker serves forms no batch: counting them made
        STATUS and the pool's demand report show a phantom input, older every second, for ever."""
        return self._queued_live.get(model, 0)

    def oldest_enqueued_at(self, model: str) -> float | None:
        """When the oldest input still waiting for an answer was queued (answered ones at the heads are
        dropped here, as _take drops them)."""
        heads = []
        for queue in self._queues.get(model, {}).values():
            while queue and queue[0].request.done:
                self._queued_bytes[model] -= queue.popleft().nbytes
            if queue:
                heads.append(queue[0].enqueued_at)
        return min(heads) if heads else None

    def is_full(self, model: str, request: PendingRequest) -> bool:
        """Would queueing this request pass the model's bound on waiting requests or bytes?"""
        if self._queued_requests.get(model, 0) >= self._config.max_queue:
            return True
        held = self._queued_bytes.get(model, 0)
        return held > 0 and held + request.nbytes > self._config.max_queue_bytes

    def add(self, request: PendingRequest, now: float) -> None:
        queue = self._queue(request.model, request.priority)
        count = len(request.inputs)
        if count == 1:  # most requests: no generator on the hot path
            queue.append(WorkItem(request, 0, now))
        else:
            queue.extend([WorkItem(request, i, now) for i in range(count)])
        self._count_queued(request, count)
        self._queued_bytes[request.model] = self._queued_bytes.get(request.model, 0) + request.nbytes

    def requeue(self, items: Iterable[WorkItem]) -> None:
        """Put items back at the front of their queues, in their original order."""
        for item in reversed(list(items)):
            if item.request.done:
                continue
            self._queue(item.request.model, item.request.priority).appendleft(item)
            self._count_queued(item.request, 1)
            self._queued_bytes[item.request.model] = self._queued_bytes.get(item.request.model, 0) + item.nbytes

    def forget(self, request: PendingRequest) -> None:
        """The request was answered: its waiting items no longer count (they are skipped later)."""
        if request.queued:
            self._count_queued(request, -request.queued)

    def assign(self, workers: Iterable[WorkerView], now: float,
               serves_elsewhere: ServesElsewhere | None = None,
               proven_elsewhere: ServesElsewhere | None = None) -> list[Dispatch]:
        """Form batches for workers with room, least-loaded first. Mutates only the queues.

        An input lost with a worker runs again elsewhere: never on a worker it was lost with (nor on
        that identity registered again) while serves_elsewhere says another live worker serves its
        model. Such an input waits for that worker rather than return to one it was lost with. Likewise a
        suspect within its backoff (it overran a batch) gets nothing while another worker serves the model.
        A retried input's last attempt goes to a proven worker (one that has answered a batch since it
        registered, and is not on probation) while proven_elsewhere says one serves its model: a worker
        that has shown nothing may be another black hole, and a loss there would fail an innocent input."""
        self._hold_until = math.inf
        if not any(queue for levels in self._queues.values() for queue in levels.values()):
            return []  # most wake-ups under load (a result, a heartbeat): nothing waits, nothing to form
        workers = list(workers)
        added_batches: dict[bytes, int] = {}
        added_items: dict[bytes, int] = {}
        dispatches = []
        # An isolated input waits for a worker that holds nothing. While one waits, the workers that
        # serve its model take no other model's inputs, idle or not, so that one drains for it (a
        # worker may serve several models, a pinned version among them).
        waiting = {model for model, levels in self._queues.items() if self._head_isolated(levels)}
        for model, levels in self._queues.items():
            while any(levels.values()):
                # Holding a part-batch pays only if it can grow: not when the next item travels alone.
                head = self._head(levels)
                isolated = head is not None and head.isolated
                if not isolated:
                    waiting.discard(model)  # its isolated inputs have found workers
                avoid = head.lost_on if isolated and head.lost_on else ()
                if avoid and (serves_elsewhere is None or not serves_elsewhere(model, avoid)):
                    avoid = ()  # only workers it was lost with serve it: one of them it must be
                proven_only = (isolated and 0 < head.attempts and head.attempts + 1 >= self._config.max_attempts
                               and proven_elsewhere is not None and proven_elsewhere(model, avoid))
                queued = math.inf if isolated else sum(len(q) for q in levels.values())
                candidates = [
                    w
                    for w in workers
                    if model in w.models
                    and w.worker_id not in avoid
                    and not (proven_only and (not w.batches_done or w.on_probation))  # last attempt: proven only
                    and not (w.on_probation and (w.in_flight or added_batches.get(w.worker_id)))  # one at a time
                    and not (w.suspect_until is not None and serves_elsewhere is not None
                             and serves_elsewhere(model, (w.worker_id,)))  # held back while another serves
                    and (isolated or not waiting or w.models.isdisjoint(waiting))
                    and (self._continuous_room(w, added_batches.get(w.worker_id, 0),
                                               added_items.get(w.worker_id, 0), isolated) > 0
                         if w.max_inputs else
                         self._has_credit(w, len(w.in_flight) + added_batches.get(w.worker_id, 0), queued,
                                          isolated, max_batch_size_for(w, model)))
                ]
                if not candidates:
                    break
                worker = min(
                    candidates,
                    key=lambda w: (w.on_probation, w.in_flight_items + added_items.get(w.worker_id, 0),
                                   w.latency_ewma_s),
                )
                max_batch_size = max_batch_size_for(worker, model)
                if worker.max_inputs:
                    # Continuous batching: no hold. The worker forms its own passes from what it
                    # holds, so inputs go to it as soon as it has room, a slice at a time (the
                    # next slice may suit another worker better).
                    room = self._continuous_room(worker, added_batches.get(worker.worker_id, 0),
                                                 added_items.get(worker.worker_id, 0), isolated)
                    items = self._take(levels, min(room, max_batch_size))
                    if not items:
                        break
                    added_batches[worker.worker_id] = added_batches.get(worker.worker_id, 0) + 1
                    added_items[worker.worker_id] = added_items.get(worker.worker_id, 0) + len(items)
                    if isolated:  # nothing may join it: count the worker full for this round
                        added_items[worker.worker_id] = worker.max_inputs
                    dispatches.append(Dispatch(worker.worker_id, model, items))
                    continue
                held = len(worker.in_flight) + added_batches.get(worker.worker_id, 0)
                hold_until = self._refill_hold_until(worker, held, queued, levels, now, max_batch_size)
                if hold_until is not None:
                    self._hold_until = min(self._hold_until, hold_until)
                    break
                wait_until = self._wait_until(levels, max_batch_size, now)
                if wait_until is not None:
                    self._hold_until = min(self._hold_until, wait_until)
                    break
                items = self._take(levels, max_batch_size)
                if not items:
                    break
                added_batches[worker.worker_id] = added_batches.get(worker.worker_id, 0) + 1
                added_items[worker.worker_id] = added_items.get(worker.worker_id, 0) + len(items)
                if isolated:  # nothing may join it: count the worker full for this round
                    added_batches[worker.worker_id] = worker.max_batches
                dispatches.append(Dispatch(worker.worker_id, model, items))
        return dispatches

    def next_deadline(self) -> float:
        """When a partial batch that the last assign() held for a worker with room must go out even if
        it has not filled (math.inf if none was held). Inputs that no worker has room for set no
        deadline: a result, a heartbeat or a new worker is what can change that, and each comes with
        a pass of the loop. (A deadline taken from the queue itself would be in the past then, and
        the loop would spin.)"""
        return self._hold_until

    def forget_model(self, model: str) -> bool:
        """Drop a model's queues if they hold nothing live (answered requests' inputs are dropped too).
        False if live inputs remain. The broker calls this for models it stops remembering: model
        names come from workers, and state keyed by them must stay bounded."""
        levels = self._queues.get(model, {})
        if any(not item.request.done for queue in levels.values() for item in queue):
            return False
        self._queues.pop(model, None)
        self._queued_bytes.pop(model, None)
        self._queued_requests.pop(model, None)
        self._queued_live.pop(model, None)
        return True

    # ------------------------------------------------------------------ internals

    def _queue(self, model: str, priority: int) -> deque[WorkItem]:
        levels = self._queues.get(model)
        queue = levels.get(priority) if levels is not None else None
        if queue is not None:  # the hot path: called for every request
            return queue
        levels = self._queues.setdefault(model, {})
        if priority not in levels:
            empty = [p for p, q in levels.items() if not q]
            if len(empty) >= _KEPT_EMPTY_LEVELS:
                for level in empty:
                    del levels[level]
            levels[priority] = deque()
            # Keep levels ordered by priority, highest first, so _take() walks them in order.
            self._queues[model] = dict(sorted(levels.items(), key=lambda kv: -kv[0]))
            levels = self._queues[model]
        return levels[priority]

    def _count_queued(self, request: PendingRequest, delta: int) -> None:
        before = request.queued
        request.queued += delta
        self._queued_live[request.model] = self._queued_live.get(request.model, 0) + delta
        if before == 0 and request.queued > 0:
            self._queued_requests[request.model] = self._queued_requests.get(request.model, 0) + 1
        elif before > 0 and request.queued == 0:
            self._queued_requests[request.model] -= 1

    @staticmethod
    def _has_credit(worker: WorkerView, held_batches: int, queued_items: float, isolated: bool,
                    max_batch_size: int) -> bool:
        """An idle worker takes any batch at once. A worker already computing one takes a second
        (to pipeline) only when a full batch is waiting: handing it a part-batch early would cut
        what arrives next into small batches (at concurrency 64 on a CPU: sizes 1, 4, 59, 1, 4,
        59, ...), while holding it lets it grow until the worker frees up. That bounds the extra
        wait by one batch's compute time.

        An isolated input (its batch failed, or its worker died under it) is quarantined, as on a
        continuous worker: it goes only to an idle worker, which takes nothing more until it is
        answered. A bystander queued behind a poison input that hangs would otherwise be lost with
        that worker a second time, and fail as poison itself (seen in the chaos test)."""
        if held_batches >= worker.max_batches:
            return False
        if isolated:
            return held_batches == 0
        if Batcher._holds_isolated(worker):
            return False
        return held_batches == 0 or queued_items >= max_batch_size

    @staticmethod
    def _holds_isolated(worker: WorkerView) -> bool:
        """The worker runs a quarantined (isolated) input: it takes nothing more until it answers."""
        return any(batch.isolated for batch in worker.in_flight.values())

    @staticmethod
    def _continuous_room(worker: WorkerView, added_batches: int, added_items: int, isolated: bool) -> int:
        """How many more inputs a continuous worker may take now.

        It holds up to max_inputs (about two passes' worth) from any number of batches. An isolated
        input (one whose pass failed, or whose worker died under it) must run alone to tell a poison
        input from its bystanders: it goes only to a worker that holds nothing, and that worker then
        takes nothing more until it is answered."""
        held_items = worker.in_flight_items + added_items
        if Batcher._holds_isolated(worker):
            return 0
        if isolated:
            return 1 if held_items == 0 and added_batches == 0 else 0
        return worker.max_inputs - held_items

    def _refill_hold_until(self, worker: WorkerView, held_batches: int, queued_items: float,
                           levels: dict[int, deque[WorkItem]], now: float, max_batch_size: int) -> float | None:
        """The refill hold: when to stop holding a part-batch for a worker that just went idle, or None.

        Under closed-loop load (N clients, each sending its next request when it gets a reply), the
        n clients of the batch a worker just returned come back over the next 50-150 ms. Dispatching
        before they are back cuts the next batch in two (at concurrency 16 on a CPU, 1 + 15), and
        the cut lasts: two cohorts then take turns (at concurrency 64, batches of about 32, which
        cost 12% more per input than 64). So an idle worker whose last batch held n >= 2 inputs
        waits until n inputs have arrived since it finished (a cohort that was already waiting
        rides along, so two cohorts merge into one batch) or a full batch is waiting, for at most
        _REFILL_WAIT_FRACTION of that batch's compute time, capped by refill_wait_max_s.

        Independent (open-loop) arrivals have no cohort to wait for: holding them only adds
        latency. A returning cohort arrives far faster than requests did while the batch computed;
        independent arrivals keep the same pace. So the hold also ends once the arrivals since the
        batch finished fall behind _REFILL_PACE times the rate seen while it computed. At low load
        (a last batch of 1) nothing waits.
        """
        target = min(worker.last_batch_size, max_batch_size)
        if (held_batches or target < 2 or queued_items >= max_batch_size
                or self._config.refill_wait_max_s <= 0):
            return None
        finished_at = worker.last_completed_at
        started_at = finished_at - worker.last_compute_s
        arrived_since = arrived_during = 0
        for queue in levels.values():  # fewer than max_batch_size items here
            for item in reversed(queue):  # newest first; requeued items sit at the front, older
                if item.enqueued_at >= finished_at:
                    arrived_since += 1
                elif item.enqueued_at >= started_at:
                    arrived_during += 1
                else:
                    break
        if arrived_since >= target:
            return None
        until = finished_at + min(self._config.refill_wait_max_s, _REFILL_WAIT_FRACTION * worker.last_compute_s)
        if arrived_during:
            # When arrived_since + 1 would fall behind the pace: (arrived_since + 1) / (pace × rate).
            until = min(until, finished_at + (arrived_since + 1) * worker.last_compute_s
                        / (_REFILL_PACE * arrived_during))
        return until if now < until else None

    @staticmethod
    def _head(levels: dict[int, deque[WorkItem]]) -> WorkItem | None:
        """The next live item _take() would pop, or None."""
        for queue in levels.values():
            for item in queue:
                if not item.request.done:
                    return item
        return None

    @staticmethod
    def _head_isolated(levels: dict[int, deque[WorkItem]]) -> bool:
        head = Batcher._head(levels)
        return head is not None and head.isolated

    def _wait_until(self, levels: dict[int, deque[WorkItem]], max_batch_size: int, now: float) -> float | None:
        """With max_wait_s set, hold a partial batch until its oldest input has waited that long:
        until when, or None to send it now."""
        if self._config.max_wait_s <= 0:
            return None
        if sum(len(q) for q in levels.values()) >= max_batch_size:
            return None
        until = min(q[0].enqueued_at for q in levels.values() if q) + self._config.max_wait_s
        return until if now < until else None

    def _take(self, levels: dict[int, deque[WorkItem]], max_batch_size: int) -> list[WorkItem]:
        """Pop up to max_batch_size live items, highest priority first, within the token and byte budgets."""
        budget = self._config.max_batch_tokens
        items: list[WorkItem] = []
        longest = 0
        encoded_bytes = 0
        for queue in levels.values():
            while queue and len(items) < max_batch_size:
                item = queue[0]
                if item.request.done:
                    queue.popleft()
                    self._queued_bytes[item.request.model] -= item.nbytes
                    continue
                if item.isolated and items:
                    return items  # an isolated item travels alone, in the next batch
                # Padded cost of the batch if this item joins: every input is padded to the longest.
                longest_if_added = max(longest, item.size)
                if budget and items and longest_if_added * (len(items) + 1) > budget:
                    return items
                item_bytes = len(item.request.inputs[item.index])
                if items and encoded_bytes + item_bytes > _MAX_BATCH_BYTES:
                    return items
                encoded_bytes += item_bytes
                queue.popleft()
                self._queued_bytes[item.request.model] -= item_bytes
                longest = longest_if_added
                item.attempts += 1
                self._count_queued(item.request, -1)
                items.append(item)
                if item.isolated:
                    return items
        return items
