"""The worker's links to its brokers, as a pure state machine: events in, instructions out.

`WorkerLinks` decides everything worker/connection.py used to decide next to its sockets:
- per broker: READY (or, while the model still computes a batch that broker took away, READY
  once it is done), a heartbeat every interval, a new registration when the broker says
  DISCONNECT (unless it answers a READY older than our latest), a fresh socket after the broker
  has been silent for `liveness` intervals (ddml_common/liveness.py);
- capacity: the worker, not the brokers, owns it. A batch that would take the worker past
  --max-batches (a continuous worker: --max-inputs-held), from all brokers together, goes back
  unrun, every input BUSY, and that broker is heartbeated as soon as a slot frees;
- epochs: when a broker forgets us (DISCONNECT, or a fresh socket) the link's epoch moves on.
  What we held from it is dropped if not started, and results of the older epoch are dropped,
  not sent: the broker re-dispatched those inputs, and one that restarted numbers its batches
  afresh, so such a result could be taken for the answer to a new batch;
- drain: on stop, ask every broker for no more batches, finish what is held, DISCONNECT, exit.

Pure, in Dask's worker_state_machine.py way: no sockets, no threads, no clock. Every event
takes `now` (monotonic seconds) and, where it matters, whether the model is computing (`busy`).
The shell (worker/connection.py in a worker, tests/sim/peers.py in the simulator) performs the
instructions in order. A `Forget` must be answered with `forgotten()`, naming the batches the
shell took back out of the compute thread's inbox.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ddml_common import protocol
from ddml_common.liveness import Liveness
from ddml_common.protocol import ErrorCode

logger = logging.getLogger(__name__)

BatchKey = tuple[int, int]  # (link epoch, batch id): a batch as the worker holds it


@dataclass
class WorkBatch:
    """A batch as the compute thread sees it: decoded inputs, plus inputs that failed to decode."""

    batch_id: int
    inputs: list  # decoded values; None where decoding failed
    errors: dict[int, str] = field(default_factory=dict)  # index -> why it could not be decoded
    request_ids: list[str] = field(default_factory=list)  # one per input: the request it belongs to, for logs
    link: int = 0  # which broker sent it (an index into --broker)
    epoch: int = 0  # the link's epoch when it came: a batch of an older epoch was forgotten
    traces: dict = field(default_factory=dict)  # traced requests only: the Batch's traces (ddml_common/tracing.py)
    received_ns: int = 0  # wall clock when it came (set by the shell), for the broker-queue span of a traced request
    forward_ns: int = 0  # wall clock when its forward pass began
    spans: object = None  # a continuous worker's tracing.HeldSpans for its traced requests, when exporting
    timed: bool = False  # a request of it asked for its timings: its results carry prepare_ms
    prepare_ms: float = 0.0  # the time prepare() took for it (a continuous worker's), when timed
    model: str = ""  # the model it is for (a pool worker holds several)

    def tag(self, answered: int) -> bytes:
        """The frame the compute thread puts before a result that answers `answered` of its inputs."""
        return ResultTag(self.link, self.batch_id, answered, self.epoch).encode()


@dataclass(frozen=True, slots=True)
class ResultTag:
    """Where a result goes, how many inputs it answers, and the link epoch its batch came in.
    Travels between the worker's own threads only, as "link:batch:answered:epoch"."""

    link: int
    batch_id: int
    answered: int
    epoch: int

    def encode(self) -> bytes:
        return f"{self.link}:{self.batch_id}:{self.answered}:{self.epoch}".encode()

    @classmethod
    def decode(cls, frame: bytes) -> ResultTag:
        return cls(*map(int, frame.split(b":")))


# The I/O thread runs a lone batch itself (worker/connection.py) once this many batches in a row
# each computed in less than INLINE_BELOW_S: handing it to the compute thread and its result back
# costs two thread wake-ups, as much as a cheap model's whole batch.
INLINE_AFTER_BATCHES = 8
INLINE_BELOW_S = 0.005


@dataclass
class ComputeState:
    """Shared between the thread that computes a batch (writes) and the I/O thread (reads). Only
    one thread computes batches at a time: the compute thread, or the I/O thread for a lone one."""

    busy_since: float | None = None  # monotonic start of the batch (or earliest pass) being computed
    batches: int = 0
    items: int = 0
    compute_s: float = 0.0
    short_streak: int = 0  # whole batches in a row that computed in less than INLINE_BELOW_S
    # link index -> its epoch. The I/O thread sets it when a broker forgot us (it re-dispatched
    # what we held); a continuous compute thread then drops that link's inputs it has not started.
    link_epochs: dict[int, int] = field(default_factory=dict)

    def computed(self, inputs: int, compute_s: float) -> None:
        """A whole batch of `inputs` has computed in `compute_s`: count it."""
        self.batches += 1
        self.items += inputs
        self.compute_s += compute_s
        self.short_streak = self.short_streak + 1 if compute_s < INLINE_BELOW_S else 0

    @property
    def batches_are_short(self) -> bool:
        """The model's recent batches were all short: one more may run on the I/O thread."""
        return self.short_streak >= INLINE_AFTER_BATCHES

    def figures(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_latency_ms": round(self.compute_s / self.batches * 1000, 3) if self.batches else 0.0,
        }


def decode_batch(batch: protocol.Batch, link: int = 0, epoch: int = 0) -> WorkBatch:
    """A batch off the wire, as the compute thread takes it: an input that does not decode is
    answered BAD_REQUEST by itself, and the rest still run."""
    inputs, errors = [], {}
    for index, item in enumerate(batch.inputs):
        try:
            inputs.append(protocol.decode_value(item))
        except protocol.DecodeError as error:
            inputs.append(None)
            errors[index] = f"input could not be decoded: {error}"
    return WorkBatch(batch.batch_id, inputs, errors, request_ids=list(batch.request_ids), link=link, epoch=epoch,
                     traces=batch.traces, timed=batch.timed, model=batch.model)


# ---------------------------------------------------------------------------- instructions


@dataclass(frozen=True, slots=True)
class Send:
    """Send this message to the broker of `link`."""

    link: int
    message: protocol.Message


@dataclass(frozen=True, slots=True)
class Forward:
    """Send a result the compute thread encoded (frames as they go) to the broker of `link`."""

    link: int
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Compute:
    """Hand this batch to the compute thread."""

    link: int
    epoch: int
    batch: protocol.Batch


@dataclass(frozen=True, slots=True)
class Forget:
    """The broker of `link` forgot us: take its batches out of the compute thread's inbox, tell a
    continuous compute thread the link's new `epoch`, on a fresh socket if `reconnect` (a fresh
    identity: never reuse one across incarnations), then call forgotten()."""

    link: int
    epoch: int
    reconnect: bool


@dataclass(frozen=True, slots=True)
class Exit:
    """Drained: every broker has been told DISCONNECT. The I/O loop ends."""


Instruction = Send | Forward | Compute | Forget | Exit


# ---------------------------------------------------------------------------- state


@dataclass
class Link:
    """One broker, as this worker sees it."""

    index: int
    endpoint: str
    liveness: Liveness
    registrations: int = 0  # READY messages sent; > 1 means we registered again
    register_when_idle: bool = False
    holding: dict[BatchKey, int] = field(default_factory=dict)  # -> inputs not yet answered
    epoch: int = 0  # moves on when the broker forgets us
    drain_acknowledged: bool = False
    refused: bool = False  # we handed it a batch back BUSY: tell it as soon as we have room
    reconnecting: bool = False  # a Forget(reconnect=True) awaits forgotten()


@dataclass
class LinkCounters:
    """What the worker tells the brokers about its links, in every heartbeat."""

    refused_batches: int = 0  # batches handed back BUSY because we already held our most
    peak_batches_held: int = 0  # the most batches held at once, from all brokers together
    peak_inputs_held: int = 0  # the most inputs held at once (continuous batching)
    stale_results: int = 0  # results dropped: their broker had forgotten us since their batch came


class WorkerLinks:
    """Every broker link of one worker, and what it holds from them."""

    def __init__(self, endpoints: list[str], ready: protocol.Ready, heartbeat_interval_s: float, liveness: int):
        self.ready = ready
        self.interval_s = heartbeat_interval_s
        silent_after_s = heartbeat_interval_s * liveness
        self.links = [Link(index, endpoint, Liveness(silent_after_s)) for index, endpoint in enumerate(endpoints)]
        self.counters = LinkCounters()
        self.heartbeat_due_at = float("inf")  # the first connected() makes it due at once
        self.draining = False

    # ------------------------------------------------------------------ figures

    @property
    def outstanding(self) -> int:
        """Batches held, not all of whose inputs are answered."""
        return sum(len(link.holding) for link in self.links)

    @property
    def held_inputs(self) -> int:
        return sum(sum(link.holding.values()) for link in self.links)

    @property
    def registrations(self) -> int:
        return sum(link.registrations for link in self.links)

    def figures(self) -> dict:
        """The link figures every heartbeat carries."""
        counters = self.counters
        figures = {"refused_batches": counters.refused_batches, "peak_batches_held": counters.peak_batches_held,
                   "stale_results": counters.stale_results}
        if self.ready.max_inputs:
            figures["peak_inputs_held"] = counters.peak_inputs_held
        return figures

    def heard_recently(self, now: float) -> bool:
        """Some broker answered within its silence window (the health file's first condition)."""
        return any(link.liveness.heard_recently(now) for link in self.links)

    def next_wake_at(self) -> float:
        return self.heartbeat_due_at

    # ------------------------------------------------------------------ events

    def connected(self, index: int, now: float, busy: bool) -> list[Instruction]:
        """The shell opened the link's first socket."""
        link = self.links[index]
        link.liveness.connected(now)
        self.heartbeat_due_at = min(self.heartbeat_due_at, now)
        return self._register(link, busy)

    def on_message(self, index: int, message: protocol.Message, now: float, busy: bool) -> list[Instruction]:
        """A decoded message from the broker of `index`."""
        link = self.links[index]
        link.liveness.heard(now)
        match message:
            case protocol.Batch():
                return self._on_batch(link, message)
            case protocol.Heartbeat():
                if link.liveness.instance(message.instance_id):
                    logger.info("broker %s restarted (instance %s)", link.endpoint, message.instance_id)
                link.drain_acknowledged |= message.draining
            case protocol.Disconnect():
                if message.registration and message.registration < link.registrations:
                    return []  # it answers a message sent before our latest READY: stale
                logger.info("broker %s asked us to register again: %s", link.endpoint, message.reason)
                return [self._forget(link, reconnect=False)]
            case protocol.Error():
                logger.error("broker %s refused our message: %s %s", link.endpoint, message.code, message.message)
            case _:
                logger.warning("unexpected %s from broker %s", type(message).__name__, link.endpoint)
        return []

    def heard(self, index: int, now: float) -> None:
        """Something came from the broker of `index` that did not decode: it still lives."""
        self.links[index].liveness.heard(now)

    def forgotten(self, index: int, dropped: list[BatchKey], now: float, busy: bool) -> list[Instruction]:
        """The shell performed a Forget: `dropped` are the batches it took out of the inbox."""
        link = self.links[index]
        for key in dropped:
            link.holding.pop(key, None)
        if self.ready.max_inputs:
            # A continuous compute thread drops this link's inputs it has not started when it sees
            # the new epoch; nothing it holds needs to be waited for. (A batch worker waits for the
            # batch it is computing before it registers again: _register.)
            link.holding.clear()
        if link.reconnecting:
            link.reconnecting = False
            link.liveness.connected(now)
        return self._register(link, busy)

    def on_result(self, tag: ResultTag, frames: list[bytes]) -> list[Instruction]:
        """The compute thread answered `tag.answered` inputs of a batch."""
        link = self.links[tag.link]
        key = (tag.epoch, tag.batch_id)
        left = link.holding.get(key)
        if left is not None:
            if left > tag.answered:
                link.holding[key] = left - tag.answered
            else:
                del link.holding[key]
        if tag.epoch != link.epoch:
            self.counters.stale_results += 1  # the broker forgot us since: see _forget
            return []
        instructions: list[Instruction] = [Forward(link.index, frames)]
        for other in self.links:
            if other.refused:  # a slot is free: the broker we turned away may send again
                other.refused = False
                instructions.append(self._heartbeat(other))
        return instructions

    def on_tick(self, now: float, busy: bool, stopping: bool) -> list[Instruction]:
        """After every poll: drain, heartbeats, registrations put off, silent brokers."""
        instructions: list[Instruction] = []
        if stopping and not self.draining:
            self.draining = True
            self.heartbeat_due_at = now  # announce it at once
            logger.info("draining: finishing %d batches in hand", self.outstanding)
        if now >= self.heartbeat_due_at:
            instructions.extend(self._heartbeat(link) for link in self.links)
            self.heartbeat_due_at = now + self.interval_s
        if self.draining and self.outstanding == 0 and all(
                link.drain_acknowledged or link.liveness.silent(now) for link in self.links):
            instructions.extend(Send(link.index, protocol.Disconnect("worker shutting down")) for link in self.links)
            logger.info("drained; disconnected from %d broker(s)", len(self.links))
            instructions.append(Exit())
            return instructions
        for link in self.links:
            if link.register_when_idle and not busy:
                instructions.extend(self._register(link, busy))
            if link.liveness.silent(now) and not link.reconnecting:
                logger.warning("broker %s silent for %.1f s; reconnecting", link.endpoint,
                               now - link.liveness.seen_at)
                instructions.append(self._forget(link, reconnect=True))
        return instructions

    # ------------------------------------------------------------------ decisions

    def _on_batch(self, link: Link, batch: protocol.Batch) -> list[Instruction]:
        max_inputs = self.ready.max_inputs
        size = len(batch.inputs)
        if self.held_inputs + size > max_inputs if max_inputs else self.outstanding >= self.ready.max_batches:
            # Another broker filled us first: hand it back unrun, and say when we have room.
            self.counters.refused_batches += 1
            link.refused = True
            held = f"{self.held_inputs} inputs" if max_inputs else f"{self.outstanding} batches"
            return [Send(link.index, protocol.BatchResult.failed(batch.batch_id, size, ErrorCode.BUSY,
                                                                 f"worker holds {held} already"))]
        link.holding[(link.epoch, batch.batch_id)] = size
        counters = self.counters
        counters.peak_batches_held = max(counters.peak_batches_held, self.outstanding)
        counters.peak_inputs_held = max(counters.peak_inputs_held, self.held_inputs)
        return [Compute(link.index, link.epoch, batch)]

    def _forget(self, link: Link, reconnect: bool) -> Forget:
        link.epoch += 1
        link.reconnecting = reconnect
        return Forget(link.index, link.epoch, reconnect)

    def _register(self, link: Link, busy: bool) -> list[Instruction]:
        """READY, unless the model is still busy with a batch the broker took away from us: then
        wait until it returns (or the watchdog ends us), so no new work queues behind it."""
        if busy and link.holding:
            link.register_when_idle = True
            return []
        link.register_when_idle = False
        link.registrations += 1
        return [Send(link.index, self.ready)]

    def _heartbeat(self, link: Link) -> Send:
        """Stats are the shell's to fill in (figures()), with the compute thread's and the handler's."""
        return Send(link.index, protocol.Heartbeat(draining=self.draining, registration=link.registrations))
