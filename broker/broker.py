"""The broker: routes requests from gateways to workers in micro-batches, and replies back.

One thread, one zmq.Poller, two ROUTER sockets: the frontend for gateways and clients, the
backend for workers. This module only moves frames and keeps per-request bookkeeping;
WorkerRegistry (workers.py) and Batcher (batching.py) make the decisions.

Every accepted request gets exactly one reply: outputs, or an error (TIMEOUT at its deadline,
WORKER_LOST after too many attempts, ...). Results that arrive for a request already answered,
or for a batch the broker took away from a worker, are discarded.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
import uuid
from collections import Counter, deque
from typing import Callable

import zmq

from ddml_common import protocol
from broker.batching import Batcher, InFlightBatch, PendingRequest
from broker.config import BrokerConfig
from broker.curve import GATEWAY_DOMAIN, WORKER_DOMAIN, BrokerSecurity
from broker.metrics import BrokerMetrics
from ddml_common.protocol import ErrorCode
from ddml_common.sockets import new_socket, recv_routed, send_frames
from broker.workers import WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)

Clock = Callable[[], float]  # monotonic seconds

_DRAIN_BURST = 1000  # messages read from one socket per pass, so timers are never starved
_RATE_WINDOW_S = 10.0  # window over which a model's drain rate is measured (for Retry-After)
_PUBLISH_EVERY_S = 0.5  # how often queue and worker gauges are refreshed for scrapes
_DRAIN_FLUSH_S = 0.5  # after a drain, time spent still serving before close
_FRONTEND_HWM = 10_000  # messages queued per gateway, each way
_BACKEND_HWM = 1_000  # messages queued per worker, each way
_REPLIES_MAX_BYTES = 16 << 20  # outputs per REPLIES message; larger sets go in several
_REPLY_STAT = {"ok": "replies_ok", **{code.value: f"replies_{code.value.lower()}" for code in ErrorCode}}


class ModelStats:
    """Per-model figures for status and for Retry-After."""

    def __init__(self) -> None:
        self.batches = 0
        self.items = 0
        self.batch_sizes: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()  # "ok" or an ErrorCode value
        self.redispatched = 0
        self._completions: deque[tuple[float, int]] = deque()  # (at, items) within the window

    def record_dispatch(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.batch_sizes[size] += 1

    def record_completion(self, size: int, now: float) -> None:
        self._completions.append((now, size))
        while self._completions and self._completions[0][0] < now - _RATE_WINDOW_S:
            self._completions.popleft()

    def items_per_s(self, now: float) -> float:
        recent = [n for at, n in self._completions if at >= now - _RATE_WINDOW_S]
        return sum(recent) / _RATE_WINDOW_S

    def describe(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "outcomes": dict(self.outcomes),
            "redispatched": self.redispatched,
        }


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
        # HWMs count messages per peer: they bound what a peer that stops reading (or a flood of
        # garbage) can make us buffer. Gateways may have many replies in flight; workers, with
        # credit for two batches, only a handful of messages.
        self._frontend = new_socket(context, zmq.ROUTER, hwm=_FRONTEND_HWM)  # gateways connect here
        self._backend = new_socket(context, zmq.ROUTER, hwm=_BACKEND_HWM)  # workers connect here
        self._backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._poller = zmq.Poller()
        self._poller.register(self._frontend, zmq.POLLIN)
        self._poller.register(self._backend, zmq.POLLIN)
        self._workers = WorkerRegistry(config.heartbeat)
        self._batcher = Batcher(config.batching)
        self._requests: dict[tuple[bytes, str], PendingRequest] = {}
        self._outbox: dict[bytes, list[PendingRequest]] = {}  # successes to reply to, by gateway
        self._deadlines: list[tuple[float, int, tuple[bytes, str]]] = []  # heap
        self._sequence = itertools.count()
        self._batch_ids = itertools.count(1)
        self._model_stats: dict[str, ModelStats] = {}
        self.stats: Counter[str] = Counter()  # broker-wide counters, reported in STATUS
        self._draining = False
        self._reload_requested = False
        self.metrics = metrics or BrokerMetrics()
        self._published_at = -math.inf
        self._started_at = clock()
        self.frontend_endpoint = config.frontend
        self.backend_endpoint = config.backend
        self._security: BrokerSecurity | None = None
        self._peer_keys: dict[bytes, bytes] = {}  # worker_id -> CURVE public key it authenticated with
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
        self._draining = True
        give_up_at = self._clock() + (self._config.drain_timeout_s if timeout_s is None else timeout_s)
        logger.info("draining %d requests", len(self._requests))
        while self._requests and self._clock() < give_up_at:
            self.step(min(self._poll_timeout_ms(), 100))
        now = self._clock()
        for request in list(self._requests.values()):
            self._finish(request, now, ErrorCode.UNAVAILABLE, "broker shut down before this request finished")
        for worker in self._workers:
            self._send(self._backend, worker.worker_id, protocol.Disconnect("broker shutting down"))
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
        """One pass: receive whatever is ready, then run timers. Tests call this directly."""
        ready = dict(self._poller.poll(timeout_ms))
        now = self._clock()
        if self._reload_requested:
            self._reload_keys(now)
        if self._backend in ready:
            self._drain(self._backend, self._on_worker_frames, now)
        if self._frontend in ready:
            self._drain(self._frontend, self._on_gateway_frames, now)
        self._on_tick(self._clock())
        self._flush_replies()  # normally empty: batch results flush their own

    def _drain(self, socket: zmq.Socket, handler, now: float) -> None:
        if self._security is not None:
            return self._drain_authenticated(socket, handler, now)
        for _ in range(_DRAIN_BURST):
            try:
                peer_id, frames = recv_routed(socket)
            except zmq.Again:
                return
            handler(peer_id, frames, now)

    def _drain_authenticated(self, socket: zmq.Socket, handler, now: float) -> None:
        """As _drain, but every message must come from a key that is still authorised."""
        domain = GATEWAY_DOMAIN if socket is self._frontend else WORKER_DOMAIN
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
                if domain == WORKER_DOMAIN:
                    self._lose_worker(self._workers.remove(frames[0]), "its key is no longer authorised", now)
                continue
            if domain == WORKER_DOMAIN:
                self._peer_keys[frames[0]] = user_id
            handler(frames[0], frames[1:], now)

    def _reload_keys(self, now: float) -> None:
        self._reload_requested = False
        if self._security is None:
            return
        revoked = self._security.reload()
        logger.info("reloaded keys; revoked: %d worker, %d gateway",
                    len(revoked[WORKER_DOMAIN]), len(revoked[GATEWAY_DOMAIN]))
        for worker in list(self._workers):
            if not self._security.permits(WORKER_DOMAIN, self._peer_keys.get(worker.worker_id)):
                self._lose_worker(self._workers.remove(worker.worker_id), "its key was revoked", now)

    def _on_gateway_frames(self, gateway_id: bytes, frames: list[bytes], now: float) -> None:
        message = self._decode(self._frontend, "gateway", gateway_id, frames)
        match message:
            case protocol.Request():
                self._on_request(gateway_id, message, now)
            case protocol.Heartbeat():
                self._send(self._frontend, gateway_id, protocol.Heartbeat(self.instance_id))
            case protocol.StatusRequest():
                self._send(self._frontend, gateway_id, self._status(message.request_id, now))
            case None:
                pass
            case _:
                self._unexpected("gateway", gateway_id, message)

    def _on_worker_frames(self, worker_id: bytes, frames: list[bytes], now: float) -> None:
        message = self._decode(self._backend, "worker", worker_id, frames)
        if message is None:
            return
        if isinstance(message, protocol.Ready):
            self._on_ready(worker_id, message, now)
            return
        if self._workers.heard_from(worker_id, now) is None:
            if isinstance(message, protocol.BatchResult):
                self.stats["late_results"] += 1  # we gave up on this worker and re-dispatched its work
            if not isinstance(message, protocol.Disconnect):
                # A worker we do not know (we expired it, or we restarted): make it register again.
                # Echo its registration, so that it can ignore answers to messages older than its READY.
                registration = message.registration if isinstance(message, protocol.Heartbeat) else 0
                self._send(self._backend, worker_id, protocol.Disconnect("unknown worker: send READY", registration))
            return
        match message:
            case protocol.Heartbeat():
                self._on_worker_heartbeat(worker_id, message)
            case protocol.BatchResult():
                self._on_batch_result(worker_id, message, now)
            case protocol.Disconnect():
                self._lose_worker(self._workers.remove(worker_id), f"disconnected: {message.reason}", now)
            case _:
                self._unexpected("worker", worker_id, message)

    def _on_tick(self, now: float) -> None:
        """Timers: time out requests, expire workers, heartbeat workers, dispatch batches."""
        self._expire_requests(now)
        for worker in self._workers.expire(now):
            self._lose_worker(worker, "missed heartbeats or overran a batch deadline", now)
            self._send(self._backend, worker.worker_id, protocol.Disconnect("expired: send READY"))
        for worker in self._workers.due_for_heartbeat(now):
            self._send(self._backend, worker.worker_id, protocol.Heartbeat(self.instance_id))
        for dispatch in self._batcher.assign(self._workers.with_room(), now):
            self._dispatch(dispatch.worker_id, dispatch.model, dispatch.items, now)
        if now - self._published_at >= _PUBLISH_EVERY_S:
            self._published_at = now
            status = self._status("", now)
            self.metrics.publish({"models": status.models, "workers": status.workers})

    def _poll_timeout_ms(self) -> int:
        """Sleep no longer than the next heartbeat, expiry, request deadline or batch deadline."""
        wake_at = min(
            self._workers.next_deadline(),
            self._batcher.next_deadline(),
            self._deadlines[0][0] if self._deadlines else math.inf,
        )
        wait_s = min(wake_at - self._clock(), self._config.heartbeat.interval_s)
        return max(0, math.ceil(wait_s * 1000))

    # ------------------------------------------------------------------ handlers

    def _on_request(self, gateway_id: bytes, request: protocol.Request, now: float) -> None:
        key = (gateway_id, request.request_id)
        if key in self._requests:
            # Replying would confuse it with the original: drop it, the original still gets its reply.
            self.stats["duplicate_requests"] += 1
            logger.warning("gateway %s reused request id %r; dropped", gateway_id.hex(), request.request_id,
                           extra={"request_id": request.request_id})
            return
        self.stats["requests"] += 1
        model = request.model
        pending = PendingRequest(
            gateway_id, request.request_id, model, request.inputs, request.sizes, request.priority,
            enqueued_at=now, deadline_at=now + request.timeout_ms / 1000,
        )
        if self._draining:
            return self._finish(pending, now, ErrorCode.UNAVAILABLE, "broker is shutting down")
        if request.instance_id and request.instance_id != self.instance_id:
            # Meant for a broker instance that died: the client has already given up on it.
            return self._finish(pending, now, ErrorCode.UNAVAILABLE,
                                f"sent to broker instance {request.instance_id}, which restarted")
        if not request.inputs:
            return self._finish(pending, now, ErrorCode.BAD_REQUEST, "a request needs at least one input")
        if not self._workers.serves(model):
            starting = now - self._started_at < self._config.heartbeat.expiry_s  # workers still rejoining
            if starting or model in self._model_stats:  # served before: its workers are restarting, most likely
                return self._finish(pending, now, ErrorCode.UNAVAILABLE,
                                    f"no live worker serves model {model!r} right now", retry_after_ms=1000)
            return self._finish(pending, now, ErrorCode.NO_SUCH_MODEL, f"no live worker serves model {model!r}")
        if request.timeout_ms <= 0:
            return self._finish(pending, now, ErrorCode.TIMEOUT, "deadline passed before the broker saw the request")
        if self._batcher.is_full(model):
            retry_after_ms = self._retry_after_ms(model, now)
            return self._finish(
                pending, now, ErrorCode.OVERLOADED,
                f"model {model!r} has {self._batcher.queued_requests(model)} requests waiting",
                retry_after_ms=retry_after_ms,
            )
        self._requests[key] = pending
        heapq.heappush(self._deadlines, (pending.deadline_at, next(self._sequence), key))
        self._batcher.add(pending, now)

    def _on_ready(self, worker_id: bytes, ready: protocol.Ready, now: float) -> None:
        previous = self._workers.register(worker_id, ready, now)
        for model in ready.models:
            self._stats_for(model)  # remembered, so that while its workers restart it is 503, not 404
        if previous is not None:
            self._lose_worker(previous, "registered again", now)
        logger.info(
            "worker %s joined: models %s, device %s, host %s, pid %d, max batch %d",
            worker_id.hex(), ",".join(ready.models), ready.device, ready.host, ready.pid, ready.max_batch_size,
            extra={"worker_id": worker_id.hex()},
        )

    def _on_worker_heartbeat(self, worker_id: bytes, heartbeat: protocol.Heartbeat) -> None:
        worker = self._workers.get(worker_id)
        worker.stats = heartbeat.stats
        if heartbeat.draining:
            if not worker.draining:
                logger.info("worker %s is draining; no more batches go to it", worker_id.hex(),
                            extra={"worker_id": worker_id.hex()})
            worker.draining = True
            # Every batch we sent before this acknowledgement reaches the worker before it (FIFO pipe).
            self._send(self._backend, worker_id, protocol.Heartbeat(self.instance_id, draining=True))

    def _on_batch_result(self, worker_id: bytes, result: protocol.BatchResult, now: float) -> None:
        batch = self._workers.completed(worker_id, result.batch_id, result.compute_ms / 1000, now)
        if batch is None:
            self.stats["late_results"] += 1
            logger.warning("discarded result for unknown batch %d from worker %s", result.batch_id, worker_id.hex(),
                           extra={"batch_id": result.batch_id, "worker_id": worker_id.hex()})
            return
        self._stats_for(batch.model).record_completion(len(batch.items), now)
        self.metrics.batch_latency.labels(batch.model).observe(now - batch.dispatched_at)
        errors = {error[0]: error for error in result.errors}
        if len(result.outputs) != len(batch.items):
            message = f"worker returned {len(result.outputs)} outputs for {len(batch.items)} inputs"
            errors = {i: [i, ErrorCode.MODEL_ERROR.value, message] for i in range(len(batch.items))}
        whole_batch_failed = len(batch.items) > 1 and len(errors) == len(batch.items) and all(
            error[1] == ErrorCode.MODEL_ERROR.value for error in errors.values()
        )
        if whole_batch_failed:
            # One input may have broken the batch for all: run each alone, so only the culprit fails.
            self._retry_isolated(batch.items, f"its batch failed: {errors[0][2]}", now)
            return
        for position, item in enumerate(batch.items):
            request = item.request
            if request.done:
                continue
            if position in errors:
                _, code, message = errors[position]
                code = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.MODEL_ERROR
                alone = " (run alone, after its batch failed)" if item.isolated else ""
                self._finish(request, now, code, f"input {item.index}{alone}: {message}")
                continue
            if request.outputs[item.index] is None:
                request.remaining -= 1
            request.outputs[item.index] = result.outputs[position]
            if request.remaining == 0:
                self._finish(request, now)
        self._flush_replies()

    # ------------------------------------------------------------------ actions

    def _dispatch(self, worker_id: bytes, model: str, items: list, now: float) -> None:
        batch = InFlightBatch(next(self._batch_ids), worker_id, model, items, dispatched_at=now)
        self._workers.dispatched(batch, now)
        self._stats_for(model).record_dispatch(len(items))
        self.metrics.batch_size.labels(model).observe(len(items))
        queue_wait = self.metrics.queue_wait.labels(model)
        for item in items:
            queue_wait.observe(now - item.enqueued_at)
        message = protocol.Batch(
            batch_id=batch.batch_id,
            model=model,
            request_ids=[item.request.request_id for item in items],
            timeout_ms=int((batch.deadline_at - now) * 1000),
            inputs=[item.request.inputs[item.index] for item in items],
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("batch %d of %d inputs to worker %s", batch.batch_id, len(items), worker_id.hex(),
                         extra={"batch_id": batch.batch_id, "worker_id": worker_id.hex(), "model": model,
                                "request_id": ",".join(message.request_ids)})
        if not self._send(self._backend, worker_id, message):
            self._lose_worker(self._workers.remove(worker_id), "unreachable", now)

    def _lose_worker(self, worker: WorkerState | None, reason: str, now: float) -> None:
        """A worker is gone: its inputs run again (alone, if their batch had company), or fail."""
        if worker is None:
            return
        lost = sum(len(batch.items) for batch in worker.in_flight.values())
        logger.warning("worker %s lost (%s) with %d inputs in flight", worker.worker_id.hex(), reason, lost,
                       extra={"worker_id": worker.worker_id.hex(), "batch_id": ",".join(map(str, worker.in_flight))})
        self.stats["workers_lost"] += 1
        for batch in worker.in_flight.values():
            self._retry_isolated(batch.items, f"a worker running it was lost ({reason})", now,
                                 code=ErrorCode.WORKER_LOST)
        worker.in_flight.clear()

    def _retry_isolated(self, items: list, why: str, now: float, code: ErrorCode = ErrorCode.MODEL_ERROR) -> None:
        """Requeue the items of a failed batch to run one per batch, or fail those tried enough.

        Running each alone, rather than bisecting, keeps every input at --max-attempts executions
        (2 by default) while still telling a poison input from the bystanders in its batch.
        """
        retry = []
        for item in items:
            if item.request.done:
                continue
            if item.attempts >= self._config.batching.max_attempts:
                alone = " when run alone: it looks like a poison input" if item.isolated else ""
                self._finish(item.request, now, code,
                             f"input {item.index} failed {item.attempts} times{alone}; last time {why}"[:1000])
            else:
                item.isolated = True
                retry.append(item)
                self._stats_for(item.request.model).redispatched += 1
                self.metrics.child(self.metrics.redispatched, item.request.model).inc()
        self._batcher.requeue(retry)

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

    def _finish(
        self,
        request: PendingRequest,
        now: float,
        code: ErrorCode | None = None,
        message: str = "",
        retry_after_ms: int = 0,
    ) -> None:
        """Send the request's one reply (a success via the outbox) and forget it."""
        if request.done:
            return
        request.done = True
        self._requests.pop(request.key, None)
        self._batcher.forget(request)
        outcome = "ok" if code is None else code.value
        self.stats[_REPLY_STAT[outcome]] += 1
        if request.model in self._model_stats or self._workers.serves(request.model):
            self._stats_for(request.model).outcomes[outcome] += 1  # unknown names must not grow state
            self.metrics.requests.inc(request.model, outcome)
        if code is None:
            # Sent by _flush_replies(), together with the other requests of this gateway that the
            # same batch result finished.
            self._outbox.setdefault(request.gateway_id, []).append(request)
            return
        if code is not ErrorCode.OVERLOADED:
            logger.info("request %s failed: %s %s", request.request_id, code.value, message,
                        extra={"request_id": request.request_id, "model": request.model})
        reply = protocol.Reply(
            request.request_id, error_code=code.value, error_message=message, retry_after_ms=retry_after_ms
        )
        self._send(self._frontend, request.gateway_id, reply)

    def _flush_replies(self) -> None:
        """Send the successful replies that _finish() held: one message per gateway, not per request."""
        for gateway_id, finished in self._outbox.items():
            start, size = 0, 0
            for end, request in enumerate(finished, 1):
                size += sum(map(len, request.outputs))
                if size >= _REPLIES_MAX_BYTES or end == len(finished):
                    chunk = finished[start:end]
                    if len(chunk) == 1:
                        message = protocol.Reply(chunk[0].request_id, outputs=chunk[0].outputs)
                    else:
                        message = protocol.Replies([r.request_id for r in chunk], [r.outputs for r in chunk])
                    self._send(self._frontend, gateway_id, message)
                    start, size = end, 0
        self._outbox.clear()

    def _retry_after_ms(self, model: str, now: float) -> int:
        """How long until the queue has drained enough to take a request, at the recent rate."""
        rate = self._stats_for(model).items_per_s(now)
        backlog = self._batcher.queued_items(model)
        if rate <= 0:
            return 1000
        return max(100, min(60_000, math.ceil(backlog / rate * 1000)))

    def _send(self, socket: zmq.Socket, peer_id: bytes, message: protocol.Message) -> bool:
        """Send without ever blocking. False if the peer is gone or its queue is full."""
        try:
            send_frames(socket, [peer_id, *protocol.encode(message)])
            return True
        except zmq.Again:
            self.stats["send_dropped_full"] += 1
            logger.warning("peer %s is not reading; dropped %s", peer_id.hex(), type(message).__name__)
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise
            self.stats["send_dropped_unreachable"] += 1
            logger.warning("peer %s is gone; dropped %s", peer_id.hex(), type(message).__name__)
        return False

    def _decode(self, socket: zmq.Socket, role: str, peer_id: bytes, frames: list[bytes]):
        try:
            return protocol.decode(frames)
        except protocol.VersionMismatch as error:
            self.stats["malformed"] += 1
            self.metrics.malformed.inc()
            _throttled_warning(self.stats["malformed"], "%s %s: %s", role, peer_id.hex(), error)
            self._send(socket, peer_id, protocol.Error(ErrorCode.BAD_VERSION.value, str(error)))
        except protocol.DecodeError as error:
            self.stats["malformed"] += 1
            self.metrics.malformed.inc()
            _throttled_warning(
                self.stats["malformed"], "dropped malformed message from %s %s: %s", role, peer_id.hex(), error
            )
        return None

    def _unexpected(self, role: str, peer_id: bytes, message: protocol.Message) -> None:
        self.stats["unexpected"] += 1
        _throttled_warning(
            self.stats["unexpected"], "%s %s sent unexpected %s", role, peer_id.hex(), type(message).__name__
        )

    def _stats_for(self, model: str) -> ModelStats:
        if model not in self._model_stats:
            self._model_stats[model] = ModelStats()
        return self._model_stats[model]

    def _status(self, request_id: str, now: float) -> protocol.Status:
        models = {}
        for name in sorted({m for w in self._workers for m in w.models} | set(self._model_stats)):
            oldest = self._batcher.oldest_enqueued_at(name)
            serving = [w for w in self._workers if name in w.models]
            models[name] = {
                "workers": len(serving),
                "max_batch_size": max((w.max_batch_size for w in serving), default=0),
                "metadata": next((w.metadata for w in serving if w.metadata), {}),
                "queued_requests": self._batcher.queued_requests(name),
                "queued_items": self._batcher.queued_items(name),
                "oldest_wait_s": round(now - oldest, 3) if oldest is not None else 0.0,
                "items_per_s": round(self._stats_for(name).items_per_s(now), 3),
                **self._stats_for(name).describe(),
            }
        return protocol.Status(
            request_id=request_id,
            instance_id=self.instance_id,
            models=models,
            workers=[w.describe(now) for w in self._workers],
            stats={**self.stats, "in_flight_requests": len(self._requests)},
        )


def _bind(socket: zmq.Socket, endpoint: str) -> str:
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        port = socket.bind_to_random_port(endpoint[: -len(":0")])
        return f"{endpoint[: -len(':0')]}:{port}"
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _throttled_warning(count: int, fmt: str, *args) -> None:
    """Warn on the first ten occurrences, then on every hundredth, so a flood cannot fill the disk."""
    if count <= 10 or count % 100 == 0:
        logger.warning(fmt + " (%d so far)", *args, count)
