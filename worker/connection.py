"""The worker's I/O thread: one DEALER per broker, and nothing that decides.

BrokerConnection runs on its own thread, so heartbeats keep flowing while the model computes
on the main thread. It owns the sockets (one DEALER per `--broker` endpoint: every broker is
equal, and the worker serves them all), the compute thread's inbox and the inproc socket that
results come back on. Each event (a message from a broker, a result, a poll that timed out)
goes to WorkerLinks (worker/link.py), which decides; this shell performs its instructions:
send, forward a result, hand a batch to the compute thread, forget a broker's batches on a fresh
socket, exit. The health file and the watchdog are worker/health.py's.
"""

from __future__ import annotations

import logging
import os
import queue
import socket as socketlib
import threading
import time
from typing import TYPE_CHECKING, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ddml_common import protocol
from ddml_common.keys import ClientKeys
from ddml_common.liveness import broker_endpoints
from ddml_common.sockets import new_socket, recv_message, send_frames
from worker.config import WorkerConfig
from worker.health import HealthClock, exit_hung, hung, touch
from worker.link import (BatchKey, ComputeState, Compute, Exit, Forget, Forward, Instruction, ResultTag, Send,
                         WorkBatch, WorkerLinks, decode_batch)

__all__ = ["BrokerConnection", "ComputeState", "WorkBatch", "broker_endpoints"]

if TYPE_CHECKING:
    from worker.pool import PoolHooks

logger = logging.getLogger(__name__)
_POOL_POLL_S = 0.05  # a pool worker's I/O thread looks this often for holdings to announce
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # ints: pyzmq's enum arithmetic costs µs

_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol mismatch (is CURVE on at both ends, with the right server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused (is our public key authorised on the broker?)",
}


class _Sockets:
    """One broker's DEALER and the monitor socket that reports its handshake failures."""

    def __init__(self, context: zmq.Context, endpoint: str, keys: ClientKeys | None):
        identity = f"{socketlib.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}".encode()
        self.dealer = new_socket(context, zmq.DEALER, identity=identity, reconnect_ivl_max_ms=2000)
        if keys is not None:
            keys.apply(self.dealer)
        self.monitor = self.dealer.get_monitor_socket(sum(_HANDSHAKE_FAILURES))
        self.dealer.connect(endpoint)

    def close(self, linger: int) -> None:
        self.dealer.disable_monitor()
        self.monitor.close(linger=0)
        self.dealer.close(linger=linger)


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
        pool: PoolHooks | None = None,
        inline: Callable[[WorkBatch], protocol.BatchResult] | None = None,
    ):
        self._config = config
        self._context = context
        self._inbox = inbox
        self._results_endpoint = results_endpoint
        self._state = state
        self._describe = describe
        self._clock = clock
        self._keys = ClientKeys.from_files(config.curve_server_key, config.curve_secret_key)
        self.links = WorkerLinks(broker_endpoints(config.broker), ready, config.heartbeat_interval_s,
                                 config.liveness)
        self._sockets: list[_Sockets | None] = [None] * len(self.links.links)
        self._health = HealthClock(config.watchdog_s, config.heartbeat_interval_s)
        self._warned_figures = False
        self._pool = pool  # a pool worker's holdings and the brokers' demand (worker/pool.py)
        # Runs a whole batch and counts it (loop.run_counted), for a lone batch the I/O thread runs
        # itself; None: every batch goes to the compute thread (a continuous or pool worker).
        self._inline = inline
        # Whoever holds it may use the sockets and the links: the I/O thread, always, except while
        # it runs a batch itself; then the standby thread, should that batch run long (_standby).
        self._owner = threading.Lock()
        self._inline_since: float | None = None  # when the I/O thread began the batch it runs itself
        self._deferred: list[WorkBatch] = []  # batches that came meanwhile, for the compute thread after it
        self.inline_batches = 0  # batches the I/O thread ran itself
        # A message waited behind the last batch run here: the next batch goes to the compute thread,
        # so that under load one batch is decoded while another computes.
        self._queued_behind = False
        self._drained = False
        self._results: zmq.Socket | None = None
        self._should_stop: Callable[[], bool] = bool
        self._poller: zmq.Poller | None = None
        self._polled: list[_Sockets | None] = []

    @property
    def broker_instance_id(self) -> str:
        return self.links.links[0].liveness.instance_id

    @property
    def registrations(self) -> int:
        return self.links.registrations

    def run(self, should_stop: Callable[[], bool]) -> None:
        """The I/O thread's body. Returns after a graceful drain; puts None in the inbox on exit."""
        results = self._context.socket(zmq.PULL)
        results.bind(self._results_endpoint)
        self._results, self._should_stop = results, should_stop
        standby_stop = threading.Event()
        standby = None
        if self._inline is not None:
            standby = threading.Thread(target=self._standby, args=(standby_stop,), name="broker-io-standby",
                                       daemon=True)
            standby.start()
        self._owner.acquire()
        try:
            self._serve()
        finally:
            self._owner.release()
            standby_stop.set()
            if standby is not None:
                standby.join(timeout=5)
            self._inbox.put(None)
            results.close(linger=0)
            for sockets in self._sockets:
                if sockets is not None:
                    sockets.close(linger=1000)

    def _serve(self) -> None:
        now = self._clock()
        for index in range(len(self._sockets)):
            self._sockets[index] = _Sockets(self._context, self.links.links[index].endpoint, self._keys)
            self._perform(self.links.connected(index, now, self._busy))
        while not self._step(wait=True) and not self._drained:
            pass

    def _step(self, wait: bool) -> bool:
        """One pass of the I/O loop: poll (up to the next timer if `wait`), receive, forward results,
        then the timers. True once drained."""
        links = self.links
        results = self._results
        if self._polled != self._sockets:  # the first pass, or a socket was replaced (a reconnect)
            self._poller, self._polled = self._new_poller(results), list(self._sockets)
        wait_s = min(links.next_wake_at() - self._clock(), links.interval_s if self._pool is None else _POOL_POLL_S)
        ready = dict(self._poller.poll(max(0, wait_s * 1000) if wait else 0))
        now = self._clock()
        if self._pool is not None and self._pool.take_changed():
            links.heartbeat_due_at = now  # holdings changed: tell every broker now
        if results in ready:
            self._forward_results(results)
        for index, sockets in enumerate(self._sockets):
            if sockets.dealer in ready:
                self._receive(index, sockets.dealer, now)
            if sockets.monitor in ready:
                self._log_handshake_failures(index, sockets.monitor)
        now = self._clock()  # a batch this pass ran here may have taken a while
        if self._perform(links.on_tick(now, self._busy, self._should_stop())):
            return True
        self._check_health(now)
        return False

    def _standby(self, stopped: threading.Event) -> None:
        """The standby thread: while the I/O thread runs a batch itself and that batch runs long
        (the model's recent batches were short, this one is not), do the I/O thread's work in its
        place, a pass every quarter interval: heartbeats, the brokers' messages (a batch that comes
        goes to the compute thread once the long one is done), the health file and the watchdog."""
        period_s = self.links.interval_s / 4
        while not stopped.wait(period_s):
            since = self._inline_since
            if since is None or self._clock() - since < period_s:
                continue
            with self._owner:
                if self._inline_since is None:
                    continue
                try:
                    # Never drained here: the batch the I/O thread computes is held until it answers.
                    self._drained |= self._step(wait=False)
                except Exception:  # the I/O thread goes on after its batch; say why the standby did not
                    logger.exception("the standby I/O pass failed")

    def _run_inline(self, work: WorkBatch) -> None:
        """Run a lone batch here, on the I/O thread, and send its result at once: no hand-off to the
        compute thread and back, no wake-up of either. The standby thread serves the brokers
        meanwhile, should it run long."""
        self.inline_batches += 1
        self._inline_since = self._clock()
        self._owner.release()
        try:
            result = self._inline(work)
        finally:
            self._owner.acquire()
            self._inline_since = None
        for deferred in self._deferred:
            self._inbox.put(deferred)
        self._deferred.clear()
        self._queued_behind = any(sockets.dealer.get(_EVENTS) & _POLLIN for sockets in self._sockets)
        tag = ResultTag(work.link, work.batch_id, len(result.outputs), work.epoch)
        self._perform(self.links.on_result(tag, protocol.encode(result)))

    def _new_poller(self, results: zmq.Socket) -> zmq.Poller:
        """A poller over the results socket and every broker's sockets. Built again only when a socket
        is replaced (a reconnect), not on every wake-up."""
        poller = zmq.Poller()
        poller.register(results, zmq.POLLIN)
        for sockets in self._sockets:
            poller.register(sockets.dealer, zmq.POLLIN)
            poller.register(sockets.monitor, zmq.POLLIN)
        return poller

    def _check_health(self, now: float) -> None:
        """Touch the health file when due and healthy; end a process whose model is hung."""
        busy_since = self._state.busy_since
        if self._health.touch_due(now, busy_since, self.links.heard_recently(now)) and self._config.health_file:
            touch(self._config.health_file)
        if hung(now, busy_since, self._config.watchdog_s):
            exit_hung(now, busy_since, self._config.watchdog_s)

    @property
    def _busy(self) -> bool:
        return self._state.busy_since is not None

    def _perform(self, instructions: list[Instruction]) -> bool:
        """Carry out what WorkerLinks decided, in order. True on Exit."""
        for instruction in instructions:
            match instruction:
                case Send(link, message):
                    if type(message) is protocol.Heartbeat:
                        message.stats = self._figures()
                        if self._pool is not None:
                            message.pool = self._pool.holdings()
                    elif type(message) is protocol.Ready and self._pool is not None:
                        message.models = self._pool.held_models()
                    self._send(link, message)
                case Forward(link, frames):
                    send_frames(self._sockets[link].dealer, frames, dontwait=False)
                case Compute(link, epoch, batch):
                    work = decode_batch(batch, link, epoch)
                    if work.traces:
                        work.received_ns = time.time_ns()  # the broker-queue span of a traced request ends here
                    if self._inline_since is not None:  # the standby's pass: the I/O thread computes one
                        self._deferred.append(work)
                    elif self._may_run_inline():
                        self._run_inline(work)
                    else:
                        self._queued_behind = False
                        self._inbox.put(work)
                case Forget():
                    self._perform(self.links.forgotten(instruction.link, self._forget(instruction),
                                                       self._clock(), self._busy))
                case Exit():
                    return True
        return False

    def _may_run_inline(self) -> bool:
        """Run the batch that just came here: it is the only one held (the compute thread is idle,
        and no result is on its way back), it did not wait behind the last batch run here (under
        load the compute thread overlaps one batch's decoding with another's compute), and the
        model's recent batches were short."""
        return (self._inline is not None and self.links.outstanding == 1 and self._state.busy_since is None
                and not self._queued_behind and self._state.batches_are_short)

    def _forget(self, forget: Forget) -> list[BatchKey]:
        """Take the link's batches out of the inbox (the broker re-dispatched them), publish its
        new epoch to a continuous compute thread, and open a fresh socket if asked."""
        if forget.reconnect:
            self._sockets[forget.link].close(linger=0)
            self._sockets[forget.link] = _Sockets(self._context, self.links.links[forget.link].endpoint, self._keys)
        kept, dropped = [], []
        while True:
            try:
                batch = self._inbox.get_nowait()
            except queue.Empty:
                break
            if batch is not None and batch.link == forget.link:
                dropped.append((batch.epoch, batch.batch_id))
            else:
                kept.append(batch)  # another broker's, or the end marker: never ours to drop
        for batch in kept:
            self._inbox.put(batch)
        for batch in self._deferred:
            if batch.link == forget.link:
                dropped.append((batch.epoch, batch.batch_id))
        self._deferred = [batch for batch in self._deferred if batch.link != forget.link]
        self._state.link_epochs[forget.link] = forget.epoch
        return dropped

    def _receive(self, index: int, dealer: zmq.Socket, now: float) -> None:
        """Everything one broker has sent, to WorkerLinks."""
        while True:
            try:
                frames = recv_message(dealer)  # a large input as a view of its frame, not a copy
            except zmq.Again:
                return
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError as error:
                self.links.heard(index, now)
                logger.warning("dropped malformed message from broker %s: %s", self.links.links[index].endpoint,
                               error)
                continue
            if self._pool is not None and type(message) is protocol.Heartbeat and message.demand:
                self._pool.on_demand(index, message.demand, now)
            ran_inline = self.inline_batches
            self._perform(self.links.on_message(index, message, now, self._busy))
            if self._sockets[index].dealer is not dealer:
                return  # a fresh socket replaced it
            if self.inline_batches != ran_inline:
                return  # a batch ran here: the timers first (heartbeats), then the rest (poll)

    def _forward_results(self, results: zmq.Socket) -> None:
        while True:
            try:
                tag, *frames = results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._perform(self.links.on_result(ResultTag.decode(tag), frames))

    def _log_handshake_failures(self, index: int, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            logger.error("broker %s refused our handshake: %s", self.links.links[index].endpoint,
                         _HANDSHAKE_FAILURES.get(event, event))

    def _send(self, index: int, message: protocol.Message) -> None:
        try:
            send_frames(self._sockets[index].dealer, protocol.encode(message))
        except zmq.Again:
            logger.warning("broker %s not reading; dropped %s", self.links.links[index].endpoint,
                           type(message).__name__)

    def _figures(self) -> dict:
        figures = {**self._state.figures(), **self.links.figures()}
        if self._inline is not None:
            figures["inline_batches"] = self.inline_batches
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
