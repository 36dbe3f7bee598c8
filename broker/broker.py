"""The broker's shell: two ROUTER sockets, one zmq.Poller, and the BrokerCore that decides.

One thread. The frontend is for gateways and clients, the backend for workers. This module
only moves frames: it receives, hands each message to the core (broker/core.py), and sends
what the core returns. Every decision (admission, batching, liveness, retries, replies) is
in the core, which imports neither zmq nor time and is driven by tests/sim/ as well.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Callable

import zmq

from broker.core import BrokerCore, Peer, Send, throttled
from broker.config import BrokerConfig
from broker.curve import GATEWAY_DOMAIN, WORKER_DOMAIN, BrokerSecurity
from broker.metrics import BrokerMetrics
from ddml_common import protocol
from ddml_common.sockets import new_socket, recv_routed, send_frames

logger = logging.getLogger(__name__)

Clock = Callable[[], float]  # monotonic seconds

_DRAIN_BURST = 1000  # messages read from one socket per pass, so timers are never starved
_DRAIN_FLUSH_S = 0.5  # after a drain, time spent still serving before close
_FRONTEND_HWM = 10_000  # messages queued per gateway, each way
_BACKEND_HWM = 1_000  # messages queued per worker, each way
_PUBLISH_EVERY_S = 0.5  # how often /metrics gets a fresh snapshot of the core's figures


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        context: zmq.Context,
        clock: Clock = time.monotonic,
        instance_id: str | None = None,
        metrics: BrokerMetrics | None = None,
    ):
        self._config = config
        self._clock = clock
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.core = BrokerCore(config, self.instance_id, clock())
        self.metrics = metrics or BrokerMetrics()  # /metrics renders what publish() last handed it
        self._published_at = -math.inf
        self.stats = self.core.stats
        self._drop_reasons: dict[bytes, str] = {}  # peer -> why its last send failed, within one flush
        # HWMs count messages per peer: they bound what a peer that stops reading (or a flood of
        # garbage) can make us buffer. Gateways may have many replies in flight; workers, with
        # credit for two batches, only a handful of messages. No ROUTER_HANDOVER on the backend:
        # a worker opens a fresh socket with a fresh identity to reconnect, so a second connection
        # that claims a live worker's identity is an impostor, and libzmq refuses it.
        self._frontend = new_socket(context, zmq.ROUTER, hwm=_FRONTEND_HWM)  # gateways connect here
        self._backend = new_socket(context, zmq.ROUTER, hwm=_BACKEND_HWM)  # workers connect here
        self._sockets = {Peer.GATEWAY: self._frontend, Peer.WORKER: self._backend}
        self._poller = zmq.Poller()
        self._poller.register(self._frontend, zmq.POLLIN)
        self._poller.register(self._backend, zmq.POLLIN)
        self._reload_requested = False
        self.frontend_endpoint = config.frontend
        self.backend_endpoint = config.backend
        self.last_step_at = clock()  # the loop's own liveness, for the health endpoint
        self._security: BrokerSecurity | None = None
        if config.curve_secret_key:
            self._security = BrokerSecurity(
                context, config.curve_secret_key, config.authorized_workers, config.authorized_clients
            )

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Bind both sockets. A ':0' port binds a random free one; the endpoints say which."""
        if self._security is not None:
            self._security.start()  # the ZAP handler must run before any CURVE server binds
            self._security.serve(self._frontend, GATEWAY_DOMAIN)
            self._security.serve(self._backend, WORKER_DOMAIN)
        self.frontend_endpoint = _bind(self._frontend, self._config.frontend)
        self.backend_endpoint = _bind(self._backend, self._config.backend)
        logger.info(
            "broker %s bound: frontend %s, backend %s",
            self.instance_id, self.frontend_endpoint, self.backend_endpoint,
        )

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.step(self._poll_timeout_ms())

    def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting requests, then answer everything held, for at most timeout_s."""
        self.core.start_drain()
        give_up_at = self._clock() + (self._config.drain_timeout_s if timeout_s is None else timeout_s)
        logger.info("draining %d requests", self.core.in_flight_requests)
        while self.core.in_flight_requests and self._clock() < give_up_at:
            self.step(min(self._poll_timeout_ms(), 100))
        now = self._clock()
        self.core.abandon_all(now)
        self._flush(now)
        # Keep serving briefly (heartbeats included) so the last replies leave while the sockets
        # are still open, rather than relying on linger at close alone.
        flush_until = self._clock() + _DRAIN_FLUSH_S
        while self._clock() < flush_until:
            self.step(50)

    def close(self, linger_ms: int = 0) -> None:
        """Close both sockets. After drain(), pass a linger so the last replies are flushed, not dropped."""
        self._frontend.close(linger=linger_ms)
        self._backend.close(linger=linger_ms)
        if self._security is not None:
            self._security.stop()

    def request_reload(self) -> None:
        """Re-read the authorised keys on the next pass (safe from a signal handler)."""
        self._reload_requested = True

    def stop_authenticator(self) -> None:
        """Stop the ZAP handler (for tests of failing closed): every new handshake is then refused."""
        if self._security is not None:
            self._security.stop()

    # ------------------------------------------------------------------ the loop

    def step(self, timeout_ms: int) -> None:
        """One pass: receive whatever is ready, run the timers, send what the core decided."""
        ready = dict(self._poller.poll(timeout_ms))
        now = self._clock()
        if self._reload_requested:
            self._reload_keys(now)
        if self._backend in ready:
            self._drain(Peer.WORKER, now)
            self._flush(now)
        if self._frontend in ready:
            self._drain(Peer.GATEWAY, now)
        now = self._clock()
        self.core.on_tick(now)
        self._flush(now)
        if now - self._published_at >= _PUBLISH_EVERY_S:
            self._publish(now)
        self.last_step_at = now

    def _publish(self, now: float) -> None:
        """Hand /metrics a fresh snapshot: built on this thread, only read on the scrape thread."""
        self._published_at = now
        try:
            self.metrics.publish(self.core.describe(now))
        except Exception:  # a bug in describe() must cost the metrics, not the broker
            self.stats["internal_errors"] += 1
            if throttled(self.stats["internal_errors"]):
                logger.exception("describing the broker for /metrics failed (%d so far)", self.stats["internal_errors"])

    def _drain(self, peer: Peer, now: float) -> None:
        socket = self._sockets[peer]
        if self._security is not None:
            return self._drain_authenticated(peer, socket, now)
        on_frames = self.core.on_frames
        for _ in range(_DRAIN_BURST):
            try:
                peer_id, frames = recv_routed(socket)
            except zmq.Again:
                return
            on_frames(peer, peer_id, frames, now)

    def _drain_authenticated(self, peer: Peer, socket: zmq.Socket, now: float) -> None:
        """As _drain, but every message must come from a key that is still authorised."""
        domain = WORKER_DOMAIN if peer is Peer.WORKER else GATEWAY_DOMAIN
        for _ in range(_DRAIN_BURST):
            try:
                first = socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [first.bytes]
            while socket.getsockopt(zmq.RCVMORE):
                frames.append(socket.recv())
            try:
                user_id = first.get("User-Id").encode()
            except zmq.ZMQError:  # no ZAP ran for this message: never trust it
                user_id = None
            if not self._security.permits(domain, user_id):
                self.stats["refused_unauthorised"] += 1
                _throttled_warning(self.stats["refused_unauthorised"], "dropped message from unauthorised %s %s",
                                   domain, frames[0].hex())
                if peer is Peer.WORKER:
                    self.core.forget_worker(frames[0], "its key is no longer authorised", now)
                continue
            self.core.on_frames(peer, frames[0], frames[1:], now, peer_key=user_id)

    def _reload_keys(self, now: float) -> None:
        self._reload_requested = False
        if self._security is None:
            return
        revoked = self._security.reload()
        logger.info("reloaded keys; revoked: %d worker, %d gateway",
                    len(revoked[WORKER_DOMAIN]), len(revoked[GATEWAY_DOMAIN]))
        for worker_id, key in self.core.workers_with_keys():
            if not self._security.permits(WORKER_DOMAIN, key):
                self.core.forget_worker(worker_id, "its key was revoked", now)

    def _poll_timeout_ms(self) -> int:
        """Sleep no longer than the core's next timer, nor a heartbeat interval."""
        wait_s = min(self.core.next_wake_at() - self._clock(), self._config.heartbeat.interval_s)
        return max(0, math.ceil(wait_s * 1000))

    def _flush(self, now: float) -> None:
        self.core.flush(self._send, now, self._not_tried)
        self._drop_reasons.clear()

    def _send(self, instruction: Send) -> bool:
        """Send without ever blocking. False if the peer is gone or its queue is full."""
        try:
            send_frames(self._sockets[instruction.peer], [instruction.peer_id, *protocol.encode(instruction.message)])
            return True
        except zmq.Again:
            self._dropped("full", "is not reading", instruction)
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise
            self._dropped("unreachable", "is gone", instruction)
        return False

    def _not_tried(self, instruction: Send) -> None:
        """A message the core did not try, after a send to the same peer failed: dropped for that reason."""
        self._dropped(self._drop_reasons.get(instruction.peer_id, "unreachable"), "failed a send before", instruction)

    def _dropped(self, reason: str, why: str, instruction: Send) -> None:
        """Count every dropped message, by reason (`send_dropped_full`, `send_dropped_unreachable`) and
        kind (`send_dropped_full_disconnect`, ...); log with rate limiting: a flood must not fill the disk."""
        self._drop_reasons[instruction.peer_id] = reason
        kind = type(instruction.message).__name__
        self.stats[f"send_dropped_{reason}"] += 1
        self.stats[f"send_dropped_{reason}_{kind.lower()}"] += 1
        _throttled_warning(self.stats[f"send_dropped_{reason}"], "peer %s %s; dropped %s",
                           instruction.peer_id.hex(), why, kind)


def _bind(socket: zmq.Socket, endpoint: str) -> str:
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        port = socket.bind_to_random_port(endpoint[: -len(":0")])
        return f"{endpoint[: -len(':0')]}:{port}"
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _throttled_warning(count: int, fmt: str, *args) -> None:
    if throttled(count):
        logger.warning(fmt + " (%d so far)", *args, count)
