"""The worker's link to the broker: the only zmq code in worker/.

BrokerConnection runs on its own I/O thread and owns the DEALER socket, so heartbeats keep
flowing while the model computes on the main thread. It:
- sends READY, then a heartbeat every interval (carrying the worker's figures);
- decodes incoming batches and hands them to the compute thread through `inbox`;
- forwards results, which the compute thread pushes over an inproc socket;
- registers again when the broker says DISCONNECT (it forgot us, or restarted);
- reconnects on a fresh socket when the broker goes silent for `liveness` intervals;
- ends the process if one batch computes longer than the watchdog allows (a hung model),
  so that a supervisor can restart it;
- on stop, drains: asks the broker for no more batches, finishes what it holds, says
  DISCONNECT and returns.
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


@dataclass
class ComputeState:
    """Shared between the compute thread (writes) and the I/O thread (reads)."""

    busy_since: float | None = None  # monotonic start of the batch being computed
    batches: int = 0
    items: int = 0
    compute_s: float = 0.0
    results_sent: int = 0

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
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # handshake failures of _socket, for the operator
        self._broker_heard_at = -float("inf")  # the last message from the broker (reconnects do not count)
        self._keys = ClientKeys.from_files(config.curve_server_key, config.curve_secret_key)
        self._batches_received = 0
        self.broker_instance_id = ""
        self.registrations = 0  # READY messages sent; > 1 means we re-registered
        self._register_when_idle = False

    def run(self, should_stop: Callable[[], bool]) -> None:
        """The I/O thread's body. Returns after a graceful drain; puts None in the inbox on exit."""
        results = self._context.socket(zmq.PULL)
        results.bind(self._results_endpoint)
        try:
            self._serve(results, should_stop)
        finally:
            self._inbox.put(None)
            results.close(linger=0)
            if self._socket is not None:
                self._close_socket(linger=1000)

    def _serve(self, results: zmq.Socket, should_stop: Callable[[], bool]) -> None:
        interval_s = self._config.heartbeat_interval_s
        now = self._clock()
        self._connect(now)
        heartbeat_due_at = now
        drain_requested = drain_acknowledged = False
        while True:
            poller = zmq.Poller()
            poller.register(self._socket, zmq.POLLIN)
            poller.register(results, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            wait_ms = max(0, min(heartbeat_due_at - self._clock(), interval_s) * 1000)
            ready = dict(poller.poll(wait_ms))
            now = self._clock()
            if results in ready:
                self._forward_results(results)
            if self._socket in ready:
                drain_acknowledged |= self._receive(now)
            if self._monitor in ready:
                self._log_handshake_failures()
            if should_stop() and not drain_requested:
                drain_requested = True
                heartbeat_due_at = now  # announce it at once
                logger.info("draining: finishing %d batches in hand", self._outstanding)
            if now >= heartbeat_due_at:
                self._send(protocol.Heartbeat(stats=self._figures(), draining=drain_requested,
                                              registration=self.registrations))
                heartbeat_due_at = now + interval_s
                self._touch_health_file(now)
            if drain_requested and (drain_acknowledged or self._broker_silent(now)) and self._outstanding == 0:
                self._send(protocol.Disconnect("worker shutting down"))
                logger.info("drained; disconnected from broker")
                return
            if self._register_when_idle and self._state.busy_since is None:
                self._register()
            if self._broker_silent(now):
                logger.warning("broker silent for %.1f s; reconnecting", now - self._broker_seen_at)
                self._connect(now)
            self._watchdog(now)

    @property
    def _outstanding(self) -> int:
        return self._batches_received - self._state.results_sent

    def _connect(self, now: float) -> None:
        """A fresh DEALER with a fresh identity (never reuse one across incarnations), then READY."""
        if self._socket is not None:
            self._close_socket(linger=0)
            self._forget_batches()
        identity = f"{socketlib.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}".encode()
        sock = new_socket(self._context, zmq.DEALER, identity=identity, reconnect_ivl_max_ms=2000)
        if self._keys is not None:
            self._keys.apply(sock)
        self._monitor = sock.get_monitor_socket(sum(_HANDSHAKE_FAILURES))
        sock.connect(self._config.broker)
        self._socket = sock
        self._broker_seen_at = now
        self._register()

    def _close_socket(self, linger: int) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=linger)

    def _log_handshake_failures(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            logger.error("broker %s refused our handshake: %s", self._config.broker,
                         _HANDSHAKE_FAILURES.get(event, event))

    def _register(self) -> None:
        """Send READY, unless the model is still busy with a batch the broker took away from us:
        then wait until it returns (or the watchdog ends us), so no new work queues behind it."""
        if self._state.busy_since is not None:
            self._register_when_idle = True
            return
        self._register_when_idle = False
        self.registrations += 1
        self._send(self._ready)

    def _forget_batches(self) -> None:
        """The broker forgot us and re-dispatched what we held: drop the batches not yet started."""
        while True:
            try:
                stale = self._inbox.get_nowait()
            except queue.Empty:
                return
            if stale is None:  # never ours to drop; put it back
                self._inbox.put(None)
                return
            self._batches_received -= 1

    def _broker_silent(self, now: float) -> bool:
        return now - self._broker_seen_at > self._config.heartbeat_interval_s * self._config.liveness

    def _receive(self, now: float) -> bool:
        """Handle what the broker sent. True if it acknowledged our drain."""
        acknowledged = False
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return acknowledged
            self._broker_seen_at = self._broker_heard_at = now
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker: %s", error)
                continue
            match message:
                case protocol.Batch():
                    self._batches_received += 1
                    self._inbox.put(_decode_batch(message))
                case protocol.Heartbeat():
                    if message.instance_id != self.broker_instance_id:
                        if self.broker_instance_id:
                            logger.info("broker restarted (instance %s)", message.instance_id)
                        self.broker_instance_id = message.instance_id
                    acknowledged |= message.draining
                case protocol.Disconnect():
                    if message.registration and message.registration < self.registrations:
                        continue  # it answers a message sent before our latest READY: stale
                    logger.info("broker asked us to register again: %s", message.reason)
                    self._forget_batches()
                    self._register()
                case protocol.Error():
                    logger.error("broker refused our message: %s %s", message.code, message.message)
                case _:
                    logger.warning("unexpected %s from broker", type(message).__name__)

    def _forward_results(self, results: zmq.Socket) -> None:
        while True:
            try:
                frames = results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            send_frames(self._socket, frames, dontwait=False)
            self._state.results_sent += 1

    def _send(self, message: protocol.Message) -> None:
        try:
            send_frames(self._socket, protocol.encode(message))
        except zmq.Again:
            logger.warning("broker not reading; dropped %s", type(message).__name__)

    def _figures(self) -> dict:
        figures = self._state.figures()
        try:
            figures.update(self._describe())
        except Exception:  # figures are best effort; a broken describe() must not stop heartbeats
            logger.exception("handler describe() failed")
        return figures

    def _touch_health_file(self, now: float) -> None:
        """Healthy: the broker answers, and no batch has computed for more than half the watchdog."""
        path = self._config.health_file
        busy_since = self._state.busy_since
        stuck = busy_since is not None and now - busy_since > self._config.watchdog_s / 2
        heard_recently = now - self._broker_heard_at <= self._config.heartbeat_interval_s * self._config.liveness
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


def _decode_batch(batch: protocol.Batch) -> WorkBatch:
    inputs, errors = [], {}
    for index, item in enumerate(batch.inputs):
        try:
            inputs.append(protocol.decode_value(item))
        except protocol.DecodeError as error:
            inputs.append(None)
            errors[index] = f"input could not be decoded: {error}"
    return WorkBatch(batch.batch_id, inputs, errors)
