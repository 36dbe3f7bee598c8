"""The worker's links to its brokers.

BrokerConnection runs on its own I/O thread and owns one DEALER per broker (`--broker A,B`
names several: every broker is equal, and the worker serves them all), so heartbeats keep
flowing while the model computes on the main thread. For each broker it:
- sends READY, then a heartbeat every interval (carrying the worker's figures);
- decodes incoming batches and hands them to the compute thread through `inbox`;
- forwards results, which the compute thread pushes over an inproc socket;
- registers again when the broker says DISCONNECT (it forgot us, or restarted);
- reconnects on a fresh socket when the broker goes silent for `liveness` intervals;
- ends the process if one batch computes longer than the watchdog allows (a hung model),
  so that a supervisor can restart it;
- on stop, drains: asks the broker for no more batches, finishes what it holds, says
  DISCONNECT and returns.

The worker, not the brokers, owns its capacity. Each broker may send it up to --max-batches
batches; when a batch arrives while the worker already holds --max-batches (from any broker),
it hands the batch straight back unrun (every input BUSY), and that broker sends it nothing
more until the worker next speaks: the worker heartbeats it as soon as a batch finishes. So two
brokers never make a worker hold more than --max-batches, and neither leaves it idle.
"""

from __future__ import annotations

import logging
import os
import queue
import socket as socketlib
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from ddml_common.keys import ClientKeys
from ddml_common.sockets import new_socket, send_frames
from worker.config import WorkerConfig

logger = logging.getLogger(__name__)

_WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: a supervisor should restart us
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol mismatch (is CURVE on at both ends, with the right server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused (is our public key authorised on the broker?)",
}


@dataclass
class WorkBatch:
    """A batch as the compute thread sees it: decoded inputs, plus inputs that failed to decode."""

    batch_id: int
    inputs: list  # decoded values; None where decoding failed
    errors: dict[int, str] = field(default_factory=dict)  # index -> why it could not be decoded
    request_ids: list[str] = field(default_factory=list)  # one per input: the request it belongs to, for logs
    link: int = 0  # which broker sent it (an index into --broker)
    epoch: int = 0  # the link's epoch when it came: a batch of an older epoch was forgotten (see ComputeState)
    traces: dict = field(default_factory=dict)  # traced requests only: the Batch's traces (ddml_common/tracing.py)
    received_ns: int = 0  # wall clock when it came, for the broker-queue span of a traced request
    forward_ns: int = 0  # wall clock when its forward pass began

    def tag(self, answered: int) -> bytes:
        """The frame the compute thread puts before a result that answers `answered` of its inputs,
        so the I/O thread knows where it goes, how much the worker still holds, and whether the
        broker still wants it (the epoch)."""
        return f"{self.link}:{self.batch_id}:{answered}:{self.epoch}".encode()


@dataclass
class _Link:
    """One broker, as this worker sees it."""

    index: int
    endpoint: str
    socket: zmq.Socket | None = None
    monitor: zmq.Socket | None = None  # handshake failures of socket, for the operator
    seen_at: float = -float("inf")  # the last message from the broker, or the last (re)connect
    heard_at: float = -float("inf")  # the last message from the broker (reconnects do not count)
    instance_id: str = ""
    registrations: int = 0  # READY messages sent; > 1 means we re-registered
    register_when_idle: bool = False
    holding: dict[tuple[int, int], int] = field(default_factory=dict)  # (epoch, batch id) -> inputs not yet answered
    epoch: int = 0  # bumped when the broker forgets us: what we held from it before is dropped, or its results
    drain_acknowledged: bool = False
    refused: bool = False  # we handed it a batch back as BUSY: tell it as soon as we have room


@dataclass
class ComputeState:
    """Shared between the compute thread (writes) and the I/O thread (reads)."""

    busy_since: float | None = None  # monotonic start of the batch being computed
    batches: int = 0
    items: int = 0
    compute_s: float = 0.0
    results_sent: int = 0
    # link index -> its epoch. The I/O thread bumps it when a broker forgot us (it re-dispatched
    # what we held); a continuous compute thread then drops that link's inputs it has not started.
    link_epochs: dict[int, int] = field(default_factory=dict)

    def figures(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_latency_ms": round(self.compute_s / self.batches * 1000, 3) if self.batches else 0.0,
        }


class BrokerConnection:
    def __init__(
        self,
        config: WorkerConfig,
        context: zmq.Context,
        ready: protocol.Ready,
        inbox: queue.Queue,
        results_endpoint: str,
        state: ComputeState,
        describe: Callable[[], dict] = dict,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._config = config
        self._context = context
        self._ready = ready
        self._inbox = inbox
        self._results_endpoint = results_endpoint
        self._state = state
        self._describe = describe
        self._clock = clock
        self._keys = ClientKeys.from_files(config.curve_server_key, config.curve_secret_key)
        self._links = [_Link(index, endpoint) for index, endpoint in enumerate(broker_endpoints(config.broker))]
        self.refused_batches = 0  # batches handed back BUSY because we already held --max-batches
        self.peak_batches_held = 0  # the most batches held at once, from all brokers together
        self.peak_inputs_held = 0  # the most inputs held at once (continuous batching)
        self.stale_results = 0  # results dropped: their broker had forgotten us since their batch came
        self._warned_figures = False

    @property
    def broker_instance_id(self) -> str:
        return self._links[0].instance_id

    @property
    def registrations(self) -> int:
        return sum(link.registrations for link in self._links)

    def run(self, should_stop: Callable[[], bool]) -> None:
        """The I/O thread's body. Returns after a graceful drain; puts None in the inbox on exit."""
        results = self._context.socket(zmq.PULL)
        results.bind(self._results_endpoint)
        try:
            self._serve(results, should_stop)
        finally:
            self._inbox.put(None)
            results.close(linger=0)
            for link in self._links:
                if link.socket is not None:
                    self._close_socket(link, linger=1000)

    def _serve(self, results: zmq.Socket, should_stop: Callable[[], bool]) -> None:
        interval_s = self._config.heartbeat_interval_s
        now = self._clock()
        for link in self._links:
            self._connect(link, now)
        heartbeat_due_at = now
        drain_requested = False
        while True:
            poller = zmq.Poller()
            poller.register(results, zmq.POLLIN)
            for link in self._links:
                poller.register(link.socket, zmq.POLLIN)
                poller.register(link.monitor, zmq.POLLIN)
            wait_ms = max(0, min(heartbeat_due_at - self._clock(), interval_s) * 1000)
            ready = dict(poller.poll(wait_ms))
            now = self._clock()
            if results in ready:
                self._forward_results(results)
            for link in self._links:
                if link.socket in ready:
                    self._receive(link, now)
                if link.monitor in ready:
                    self._log_handshake_failures(link)
            if should_stop() and not drain_requested:
                drain_requested = True
                heartbeat_due_at = now  # announce it at once
                logger.info("draining: finishing %d batches in hand", self._outstanding)
            if now >= heartbeat_due_at:
                for link in self._links:
                    self._heartbeat(link, draining=drain_requested)
                heartbeat_due_at = now + interval_s
                self._touch_health_file(now)
            if drain_requested and self._outstanding == 0 and all(
                    link.drain_acknowledged or self._broker_silent(link, now) for link in self._links):
                for link in self._links:
                    self._send(link, protocol.Disconnect("worker shutting down"))
                logger.info("drained; disconnected from %d broker(s)", len(self._links))
                return
            for link in self._links:
                if link.register_when_idle and self._state.busy_since is None:
                    self._register(link)
                if self._broker_silent(link, now):
                    logger.warning("broker %s silent for %.1f s; reconnecting", link.endpoint, now - link.seen_at)
                    self._connect(link, now)
            self._watchdog(now)

    @property
    def _outstanding(self) -> int:
        """Batches held, not all of whose inputs are answered."""
        return sum(len(link.holding) for link in self._links)

    @property
    def _held_inputs(self) -> int:
        return sum(sum(link.holding.values()) for link in self._links)

    def _heartbeat(self, link: _Link, draining: bool = False) -> None:
        self._send(link, protocol.Heartbeat(stats=self._figures(), draining=draining,
                                            registration=link.registrations))

    def _connect(self, link: _Link, now: float) -> None:
        """A fresh DEALER with a fresh identity (never reuse one across incarnations), then READY."""
        if link.socket is not None:
            self._close_socket(link, linger=0)
            self._forget_batches(link)
        identity = f"{socketlib.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}".encode()
        sock = new_socket(self._context, zmq.DEALER, identity=identity, reconnect_ivl_max_ms=2000)
        if self._keys is not None:
            self._keys.apply(sock)
        link.monitor = sock.get_monitor_socket(sum(_HANDSHAKE_FAILURES))
        sock.connect(link.endpoint)
        link.socket = sock
        link.seen_at = now
        self._register(link)

    def _close_socket(self, link: _Link, linger: int) -> None:
        link.socket.disable_monitor()
        link.monitor.close(linger=0)
        link.socket.close(linger=linger)

    def _log_handshake_failures(self, link: _Link) -> None:
        while link.monitor.poll(0):
            event = recv_monitor_message(link.monitor)["event"]
            logger.error("broker %s refused our handshake: %s", link.endpoint, _HANDSHAKE_FAILURES.get(event, event))

    def _register(self, link: _Link) -> None:
        """Send READY, unless the model is still busy with a batch the broker took away from us:
        then wait until it returns (or the watchdog ends us), so no new work queues behind it."""
        if self._state.busy_since is not None and link.holding:
            link.register_when_idle = True
            return
        link.register_when_idle = False
        link.registrations += 1
        self._send(link, self._ready)

    def _forget_batches(self, link: _Link) -> None:
        """The broker forgot us and re-dispatched what we held: drop its batches not yet started."""
        kept = []
        while True:
            try:
                batch = self._inbox.get_nowait()
            except queue.Empty:
                break
            if batch is not None and batch.link == link.index:
                link.holding.pop((batch.epoch, batch.batch_id), None)
            else:
                kept.append(batch)  # another broker's, or the end marker: never ours to drop
        for batch in kept:
            self._inbox.put(batch)
        # Results of batches from before are dropped, not sent (_forward_results): the broker has
        # re-dispatched them, and one that restarted numbers its batches afresh, so such a result
        # could be taken for the answer to a new batch.
        link.epoch += 1
        self._state.link_epochs[link.index] = link.epoch
        if self._ready.max_inputs:
            # A continuous compute thread holds inputs beyond the inbox: it drops this link's that
            # it has not started when it sees the new epoch. Nothing it holds needs to be waited
            # for. (A batch worker waits for the batch it is computing before it registers again.)
            link.holding.clear()

    def _broker_silent(self, link: _Link, now: float) -> bool:
        return now - link.seen_at > self._config.heartbeat_interval_s * self._config.liveness

    def _receive(self, link: _Link, now: float) -> None:
        """Handle what one broker sent."""
        while True:
            try:
                frames = link.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            link.seen_at = link.heard_at = now
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker %s: %s", link.endpoint, error)
                continue
            match message:
                case protocol.Batch():
                    self._on_batch(link, message)
                case protocol.Heartbeat():
                    if message.instance_id != link.instance_id:
                        if link.instance_id:
                            logger.info("broker %s restarted (instance %s)", link.endpoint, message.instance_id)
                        link.instance_id = message.instance_id
                    link.drain_acknowledged |= message.draining
                case protocol.Disconnect():
                    if message.registration and message.registration < link.registrations:
                        continue  # it answers a message sent before our latest READY: stale
                    logger.info("broker %s asked us to register again: %s", link.endpoint, message.reason)
                    self._forget_batches(link)
                    self._register(link)
                case protocol.Error():
                    logger.error("broker %s refused our message: %s %s", link.endpoint, message.code, message.message)
                case _:
                    logger.warning("unexpected %s from broker %s", type(message).__name__, link.endpoint)

    def _on_batch(self, link: _Link, batch: protocol.Batch) -> None:
        max_inputs = self._ready.max_inputs
        if (self._held_inputs + len(batch.inputs) > max_inputs if max_inputs
                else self._outstanding >= self._ready.max_batches):
            # Another broker filled us first: hand it back unrun, and say when we have room.
            self.refused_batches += 1
            link.refused = True
            held = f"{self._held_inputs} inputs" if max_inputs else f"{self._outstanding} batches"
            self._send(link, protocol.BatchResult.failed(batch.batch_id, len(batch.inputs), ErrorCode.BUSY,
                                                         f"worker holds {held} already"))
            return
        link.holding[(link.epoch, batch.batch_id)] = len(batch.inputs)
        self.peak_batches_held = max(self.peak_batches_held, self._outstanding)
        self.peak_inputs_held = max(self.peak_inputs_held, self._held_inputs)
        work = _decode_batch(batch)
        work.link = link.index
        work.epoch = link.epoch
        self._inbox.put(work)

    def _forward_results(self, results: zmq.Socket) -> None:
        while True:
            try:
                tag, *frames = results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            index, batch_id, answered, epoch = map(int, tag.split(b":"))
            link = self._links[index]
            key = (epoch, batch_id)
            left = link.holding.get(key)
            if left is not None:
                if left > answered:
                    link.holding[key] = left - answered
                else:
                    del link.holding[key]
            if epoch != link.epoch:
                self.stale_results += 1  # the broker forgot us since: see _forget_batches
                continue
            send_frames(link.socket, frames, dontwait=False)
            self._state.results_sent += 1
            for other in self._links:
                if other.refused:  # a slot is free: the broker we turned away may send again
                    other.refused = False
                    self._heartbeat(other)

    def _send(self, link: _Link, message: protocol.Message) -> None:
        try:
            send_frames(link.socket, protocol.encode(message))
        except zmq.Again:
            logger.warning("broker %s not reading; dropped %s", link.endpoint, type(message).__name__)

    def _figures(self) -> dict:
        figures = self._state.figures()
        figures["refused_batches"] = self.refused_batches
        figures["peak_batches_held"] = self.peak_batches_held
        figures["stale_results"] = self.stale_results
        if self._ready.max_inputs:
            figures["peak_inputs_held"] = self.peak_inputs_held
        try:
            described = self._describe()
        except Exception:  # figures are best effort; a broken describe() must not stop heartbeats
            logger.exception("handler describe() failed")
            return figures
        try:
            # The broker refuses a heartbeat whose figures are out of the protocol's bounds, and a
            # worker whose heartbeats are refused expires: check here, once a heartbeat, and leave
            # the handler's figures out rather than the heartbeat.
            protocol.decode(protocol.encode(protocol.Heartbeat(stats={**figures, **described})))
        except (protocol.DecodeError, TypeError) as error:
            if not self._warned_figures:
                self._warned_figures = True
                logger.warning("handler describe() figures left out of heartbeats: %s", error)
            return figures
        figures.update(described)
        return figures

    def _touch_health_file(self, now: float) -> None:
        """Healthy: a broker answers, and no batch has computed for more than half the watchdog."""
        path = self._config.health_file
        busy_since = self._state.busy_since
        stuck = busy_since is not None and now - busy_since > self._config.watchdog_s / 2
        silent_after_s = self._config.heartbeat_interval_s * self._config.liveness
        heard_recently = any(now - link.heard_at <= silent_after_s for link in self._links)
        if path and not stuck and heard_recently:
            with open(path, "a"):
                os.utime(path)

    def _watchdog(self, now: float) -> None:
        busy_since = self._state.busy_since
        if busy_since is not None and now - busy_since > self._config.watchdog_s:
            logger.critical(
                "batch has computed for %.0f s (watchdog %.0f s): the model is hung; exiting",
                now - busy_since, self._config.watchdog_s,
            )
            logging.shutdown()
            os._exit(_WATCHDOG_EXIT_CODE)


def broker_endpoints(value: str) -> list[str]:
    """`--broker A,B`: every broker's endpoint, in order. Refuses an empty list."""
    endpoints = [endpoint.strip() for endpoint in value.split(",") if endpoint.strip()]
    if not endpoints:
        raise ValueError(f"--broker needs at least one endpoint, got {value!r}")
    return endpoints


def _decode_batch(batch: protocol.Batch) -> WorkBatch:
    inputs, errors = [], {}
    for index, item in enumerate(batch.inputs):
        try:
            inputs.append(protocol.decode_value(item))
        except protocol.DecodeError as error:
            inputs.append(None)
            errors[index] = f"input could not be decoded: {error}"
    return WorkBatch(batch.batch_id, inputs, errors, request_ids=list(batch.request_ids), traces=batch.traces,
                     received_ns=time.time_ns() if batch.traces else 0)
