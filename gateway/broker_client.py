"""BrokerClient: how a gateway process (or the in-process Dispatcher) talks to the broker.

One client per process, safe for many threads and for gunicorn's fork: nothing zmq exists until
the first call in a process (a pid check restarts it after a fork). Two paths:

- request() (the gateway's, blocking): each request thread sends on its own DEALER and waits on
  it for its reply. No handoff to another thread either way, which at concurrency 1 saves two
  thread wake-ups per request and, under load, the Future machinery's CPU.
- submit() (asynchronous, for the Dispatcher and bench): one I/O thread owns a shared DEALER;
  request threads hand it frames over their own inproc PUSH socket and get a Future keyed by
  request id, bounded by the request's deadline.

The I/O thread also heartbeats the brokers for both paths, and rings an inproc PUB "alarm"
that every request thread's SUB listens to whenever a broker goes down or restarts, so no
waiting thread has to poll.

Several brokers (`--broker tcp://A:5555,tcp://B:5555`) are all equal. Each request goes to the
first live one in that order (a stable preference, so that batching is not split at low load).
When that broker dies, restarts, or falls silent, or answers UNAVAILABLE, the request goes to
another live broker with the same request id and what is left of its deadline; the first reply
wins, and a later one for the same request is dropped and counted (`duplicate_replies`).
Execution is at least once, as it already was; replies stay exactly once. With one broker
nothing is resent: if it goes silent, or comes back with a new instance id (it restarted and
forgot what we sent), every waiting request fails with UNAVAILABLE instead of hanging until
its deadline.
"""

from __future__ import annotations

import atexit
import itertools
from collections import deque
from dataclasses import dataclass, field
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ddml_common import protocol, tracing
from ddml_common.keys import ClientKeys
from ddml_common.protocol import ErrorCode
from ddml_common.sockets import new_socket, send_frames

logger = logging.getLogger(__name__)

_REPLY_GRACE_S = 1.0  # beyond the deadline, time allowed for the broker's TIMEOUT reply to arrive
_CONNECT_GRACE_S = 1.0  # how long a request waits for a (re)connection before failing UNAVAILABLE
_HEARTBEAT_RETRY_S = 0.02  # while a heartbeat cannot be sent (not connected yet)
_DEALER_HWM = 100_000  # messages queued each way on a DEALER to the broker: a gateway has many requests in flight
# A waiting request() wakes on the I/O thread's alarm when the broker goes silent or restarts. It
# also checks this often by itself, in case it subscribed just as an alarm went out (a SUB misses
# what was sent before its subscription arrived). Polling every 0.1 s instead cost the gateway
# 0.19 rather than 0.12 cores with 64 requests waiting 0.5 s each (64 threads waking 10 times a second).
_WAKE_CHECK_S = 1.0
_RECENT_RESENT = 4096  # ids of answered requests that were sent to several brokers, kept to spot duplicates
_ALL_DOWN_RETRY_AFTER_S = 1.0  # Retry-After when no broker is reachable
_THREAD_ZMTP_HEARTBEAT_IVL_MS = 10_000  # ZMTP pings on a request thread's DEALERs (the I/O thread's: 1 s)
_STATUS_STRAGGLER_S = 0.25  # status(): once one broker has answered, how long the others may take
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED


@dataclass
class _Broker:
    """One broker as this client sees it. Written by the I/O thread, read by request threads."""

    index: int
    endpoint: str
    instance_id: str = ""
    seen_at: float = 0.0  # monotonic: the last message from it (or the last reconnect)
    up: bool = True  # until it falls silent, disconnects or restarts; again once it answers
    epoch: int = 0  # +1 each time it goes down or restarts: what was sent to it before may be lost
    change: str = ""  # why the epoch last moved: "silent", "disconnected" or "restarted"
    changed_at: float = 0.0


@dataclass
class _Attempt:
    """Where one request has been sent, and what is still expected from where."""

    deadline_at: float
    waiting: dict[int, int] = field(default_factory=dict)  # broker index -> its epoch when we sent
    tried: set[int] = field(default_factory=set)


class BrokerError(Exception):
    """A request that ended in an error. gateway/errors.py turns it into an HTTP response."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float = 0.0):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class BrokerClient:
    def __init__(self, endpoint: str, heartbeat_interval_s: float = 1.0, liveness: int = 3,
                 curve: ClientKeys | None = None):
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()]
        if not self.endpoints:
            raise ValueError(f"need at least one broker endpoint, got {endpoint!r}")
        self.endpoint = ",".join(self.endpoints)
        self._multi = len(self.endpoints) > 1
        self._brokers = [_Broker(i, e) for i, e in enumerate(self.endpoints)]
        self._curve = curve
        self._heartbeat_interval_s = heartbeat_interval_s
        self._liveness = liveness
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._context: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._local = threading.local()
        self._pending: dict[str, Future] = {}
        self._attempts: dict[str, _Attempt] = {}  # the I/O thread's requests (submit path), by id
        self._attempt_messages: dict[str, protocol.Request] = {}  # and their messages, to resend
        self._ids = itertools.count(1)
        self._inproc = ""
        self._alarm_endpoint = ""
        self._recent_resent: deque[str] = deque(maxlen=_RECENT_RESENT)
        self._recent_resent_set: set[str] = set()
        self.replies = 0  # replies that found their waiting request
        self.unmatched_replies = 0  # replies for nothing waiting: late (we gave up) or duplicated
        self.duplicate_replies = 0  # a second reply to a request resent to another broker: dropped
        self.resent = 0  # requests sent again to another broker
        self.expired_locally = 0  # requests the broker never answered before deadline + grace
        self._changes = 0  # +1 whenever any broker goes down or restarts (request threads compare)

    @property
    def broker_instance_id(self) -> str:
        return self._brokers[0].instance_id

    @property
    def broker_seen_at(self) -> float:
        return max(broker.seen_at for broker in self._brokers)

    # ------------------------------------------------------------------ request threads

    def submit(self, model: str, inputs: list, timeout_s: float, priority: int = 0) -> Future:
        """Send one request; the Future resolves to the outputs (decoded), or raises BrokerError."""
        encoded = [protocol.encode_value(value) for value in inputs]
        outputs: Future = Future()
        raw = self._send(
            lambda request_id: self._request_message(request_id, model, inputs, encoded, timeout_s, priority),
            wait_s=timeout_s + _REPLY_GRACE_S,
        )

        def resolve(reply_future: Future) -> None:
            try:
                reply = reply_future.result()
                outputs.set_result(_outputs_of(reply))
            except BrokerError as error:
                outputs.set_exception(error)

        raw.add_done_callback(resolve)
        return outputs

    def request(self, model: str, inputs: list, timeout_s: float, priority: int = 0,
                request_id_prefix: str = "") -> list:
        """Send one request on this thread's own DEALERs and wait there for its outputs. Raises BrokerError."""
        self._ensure_started()
        dealers, alarm, poller = self._thread_sockets()
        request_id = f"{self._pid}-{next(self._ids)}"
        request_id = f"{request_id_prefix}/{request_id}" if request_id_prefix else request_id  # the caller's id first
        encoded = [protocol.encode_value(value) for value in inputs]
        message = self._request_message(request_id, model, inputs, encoded, timeout_s, priority)
        now = time.monotonic()
        attempt = _Attempt(deadline_at=now + timeout_s)
        give_up_at = attempt.deadline_at + _REPLY_GRACE_S
        changes = self._changes

        def send(index: int, frames: list[bytes]) -> bool:  # on this thread's DEALER to that broker
            return _send_quietly(dealers[index], frames)

        if not self._send_somewhere(attempt, message, now, send):
            # No connection yet (this thread's DEALERs are new, or every broker is down): wait for one, briefly.
            writable = zmq.Poller()
            for dealer in dealers.values():
                writable.register(dealer, zmq.POLLOUT)
            if not writable.poll(_CONNECT_GRACE_S * 1000) or not self._send_somewhere(
                    attempt, message, time.monotonic(), send):
                raise self._unreachable()
        while True:
            if self._changes != changes:
                changes = self._changes
                error = self._after_broker_change(attempt, message, time.monotonic(), send)
                if error is not None:
                    raise error
                if not self._multi:
                    broker = self._brokers[0]
                    if broker.change == "restarted" and broker.epoch != attempt.waiting.get(0, broker.epoch):
                        # Wait a moment for the new broker's refusal of what reached it, then give up.
                        give_up_at = min(give_up_at, broker.changed_at + self._heartbeat_interval_s * self._liveness)
            now = time.monotonic()
            if now >= give_up_at:
                broker = self._brokers[0]
                if not self._multi and broker.epoch != attempt.waiting.get(0, broker.epoch):
                    raise BrokerError(ErrorCode.UNAVAILABLE, "broker restarted while the request was in flight")
                with self._lock:
                    self.expired_locally += 1
                raise BrokerError(ErrorCode.TIMEOUT, "no reply before the deadline")
            ready = dict(poller.poll(min(give_up_at - now, _WAKE_CHECK_S) * 1000))
            if alarm in ready:
                _drain(alarm)  # the counters above say what happened
            for index, dealer in dealers.items():
                if dealer not in ready:
                    continue
                outcome = self._read_thread_dealer(dealer, index, request_id, attempt, message, send)
                if outcome is not None:
                    return outcome

    def _read_thread_dealer(self, dealer, index, request_id, attempt, message, send) -> list | None:
        """Read what one of this thread's DEALERs holds. The outputs when our reply came, else None."""
        while True:
            try:
                reply = protocol.decode(dealer.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return None
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker: %s", error)
                continue
            for answer in protocol.replies_of(reply):
                if answer.request_id != request_id:
                    self._count_stray(answer.request_id)  # late replies of requests this thread gave up on
                    continue
                if self._should_retry(answer, index, attempt, message, time.monotonic(), send):
                    continue
                with self._lock:
                    self.replies += 1
                if len(attempt.tried) > 1:
                    self._remember_resent(request_id)
                return _outputs_of(answer)

    def _request_message(self, request_id: str, model: str, inputs: list, encoded: list[bytes],
                         timeout_s: float, priority: int) -> protocol.Request:
        """The wire request of both paths; `encoded` are the inputs' item frames."""
        return protocol.Request(
            request_id, model, timeout_ms=max(0, int(timeout_s * 1000)), inputs=encoded,
            sizes=[len(value) if isinstance(value, (str, bytes)) else 0 for value in inputs],
            priority=priority, trace=tracing.current_trace(),  # the caller's trace context, if it sent one
        )

    # ------------------------------------------------------------------ failover (both paths)

    def _send_somewhere(self, attempt: _Attempt, message: protocol.Request, now: float, send) -> bool:
        """Send to the first live broker we have not tried (any live one, on a second round).
        False if none took it. `send(index, frames) -> bool` sends on that broker's DEALER."""
        remaining_ms = int((attempt.deadline_at - now) * 1000)
        if remaining_ms <= 0 and attempt.tried:
            return False
        untried = [b for b in self._brokers if b.up and b.index not in attempt.tried]
        retried = [b for b in self._brokers if b.up and b.index in attempt.tried and b.index not in attempt.waiting]
        # Last, brokers we think down: one may be back before its first heartbeat says so, and a
        # DEALER with IMMEDIATE refuses at once while its broker is unreachable.
        down = [b for b in self._brokers if not b.up and b.index not in attempt.waiting]
        for broker in untried + retried + down:
            message.instance_id = broker.instance_id  # a broker that restarted since refuses it unrun
            message.timeout_ms = max(0, remaining_ms)
            if send(broker.index, protocol.encode(message)):
                if attempt.tried:
                    with self._lock:
                        self.resent += 1
                attempt.tried.add(broker.index)
                attempt.waiting[broker.index] = broker.epoch
                return True
        return False

    def _after_broker_change(self, attempt: _Attempt, message, now: float, send) -> BrokerError | None:
        """A broker went down or restarted. Resend what may have died with it; an error to raise if
        the request cannot go anywhere."""
        lost = [i for i, epoch in attempt.waiting.items() if self._brokers[i].epoch != epoch]
        if not lost:
            return None
        if not self._multi:
            broker = self._brokers[0]
            if broker.change in ("silent", "disconnected"):
                return BrokerError(ErrorCode.UNAVAILABLE, f"broker {self.endpoint} stopped answering")
            return None  # restarted: its refusal is on the way (see request())
        for index in lost:
            del attempt.waiting[index]
        if attempt.waiting or self._send_somewhere(attempt, message, now, send):
            return None
        return self._unreachable()

    def _should_retry(self, answer: protocol.Reply, index: int, attempt: _Attempt, message, now: float,
                      send) -> bool:
        """UNAVAILABLE from one of several brokers (shutting down, restarted, no worker yet) is not final:
        wait for another broker it is also with, or send it to one not tried yet."""
        attempt.waiting.pop(index, None)
        if not self._multi or answer.ok or answer.error_code != ErrorCode.UNAVAILABLE.value:
            return False
        if attempt.waiting:
            return True
        untried = any(b.up and b.index not in attempt.tried for b in self._brokers)
        return untried and self._send_somewhere(attempt, message, now, send)

    def _unreachable(self) -> BrokerError:
        return BrokerError(ErrorCode.UNAVAILABLE, f"no broker of {self.endpoint} is reachable",
                           retry_after_s=_ALL_DOWN_RETRY_AFTER_S)

    def _remember_resent(self, request_id: str) -> None:
        with self._lock:
            if len(self._recent_resent) == self._recent_resent.maxlen:
                self._recent_resent_set.discard(self._recent_resent[0])
            self._recent_resent.append(request_id)
            self._recent_resent_set.add(request_id)

    def _count_stray(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._recent_resent_set:
                self.duplicate_replies += 1
            else:
                self.unmatched_replies += 1

    # ------------------------------------------------------------------ sockets per thread

    def _thread_sockets(self) -> tuple[dict[int, zmq.Socket], zmq.Socket, zmq.Poller]:
        """This thread's DEALERs to the brokers, its SUB to the I/O thread's alarm, and a poller over
        them; created on its first request (in this process)."""
        sockets = getattr(self._local, "sockets", None)
        if sockets is None or self._local.sockets_pid != os.getpid():
            dealers = {broker.index: self._connect(broker.endpoint, request_thread=True) for broker in self._brokers}
            alarm = self._context.socket(zmq.SUB)
            alarm.setsockopt(zmq.LINGER, 0)
            alarm.setsockopt(zmq.SUBSCRIBE, b"")
            alarm.connect(self._alarm_endpoint)
            poller = zmq.Poller()
            for dealer in dealers.values():
                poller.register(dealer, zmq.POLLIN)
            poller.register(alarm, zmq.POLLIN)
            sockets = self._local.sockets = (dealers, alarm, poller)
            self._local.sockets_pid = os.getpid()
        return sockets

    def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
        """Models, queues and workers, from the first broker that answers, and every broker's view
        under "brokers". Raises BrokerError if none answers. every_broker=False asks only the brokers
        a request would go to, in that order, until one answers (for a frequent caller that needs
        one view, such as the gateway's model catalog: a standby broker then hears nothing of it)."""
        if not every_broker:
            deadline_at = time.monotonic() + timeout_s
            for broker in sorted(self._brokers, key=lambda b: not b.up):
                future = self._send(lambda request_id: protocol.StatusRequest(request_id), wait_s=timeout_s,
                                    broker=broker.index)
                try:
                    answer = future.result(timeout=max(0.0, deadline_at - time.monotonic()))
                except (FutureTimeout, BrokerError):
                    continue
                return {"instance_id": answer.instance_id, "models": answer.models, "workers": answer.workers,
                        "stats": answer.stats, "brokers": [{"endpoint": broker.endpoint, "role": "preferred",
                                                            "instance_id": answer.instance_id}]}
            raise BrokerError(ErrorCode.UNAVAILABLE, f"no broker of {self.endpoint} answered within {timeout_s} s")
        futures = [self._send(lambda request_id: protocol.StatusRequest(request_id), wait_s=timeout_s,
                              broker=broker.index) for broker in self._brokers]
        deadline_at = time.monotonic() + timeout_s
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=max(0.0, deadline_at - time.monotonic()),
                                 return_when=FIRST_COMPLETED)
            if not done:
                break
            if any(not future.exception() for future in done):
                # One broker has answered: give the others a moment, not the whole timeout (a broker
                # that died silently would otherwise hold up every status, /readyz included).
                deadline_at = min(deadline_at, time.monotonic() + _STATUS_STRAGGLER_S)
        answers = [f.result() if f.done() and not f.exception() else None for f in futures]
        preferred = next((self._brokers[i] for i, a in enumerate(answers) if a is not None), None)
        if preferred is None:
            raise BrokerError(ErrorCode.UNAVAILABLE, f"no broker of {self.endpoint} answered within {timeout_s} s")
        first = answers[preferred.index]
        brokers = []
        for broker, answer in zip(self._brokers, answers):
            role = "preferred" if broker is preferred else ("standby" if answer is not None else "down")
            entry = {"endpoint": broker.endpoint, "role": role, "instance_id": broker.instance_id}
            if answer is not None:
                entry.update(instance_id=answer.instance_id, models=answer.models, workers=answer.workers,
                             stats=answer.stats)
            brokers.append(entry)
        return {
            "instance_id": first.instance_id,
            "models": first.models,
            "workers": first.workers,
            "stats": first.stats,
            "brokers": brokers,
        }

    def close(self) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                return
            thread, context, stopping = self._thread, self._context, self._stopping
            self._thread = None
            self._pid = None
            stopping.set()
        # Join without the lock: the I/O thread takes it to expire, resolve and fail requests, and
        # joining while holding it stalled close() for the whole timeout (1 close in 30, measured).
        thread.join(timeout=5)
        if thread.is_alive():  # never pull the context from under a live I/O thread
            logger.warning("broker client I/O thread did not stop within 5 s; leaving its context open")
            return
        context.destroy(linger=0)

    def _send(self, build, wait_s: float, broker: int | None = None) -> Future:
        """Hand a message to the I/O thread; the Future gets the broker's answer or a BrokerError.
        broker: send to that broker only (status); None: the request path, with failover."""
        self._ensure_started()
        request_id = f"{self._pid}-{next(self._ids)}"
        future: Future = Future()
        future.deadline_at = time.monotonic() + wait_s  # type: ignore[attr-defined]
        with self._lock:
            self._pending[request_id] = future
        push = getattr(self._local, "push", None)
        if push is None or self._local.pid != os.getpid():
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._inproc)
            self._local.push, self._local.pid = push, os.getpid()
        target = b"" if broker is None else str(broker).encode()
        send_frames(push, [request_id.encode(), target, *protocol.encode(build(request_id))], dontwait=False)
        return future

    def _ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # First use in this process (or first after a fork): everything zmq is created here.
            self._context = zmq.Context()
            self._inproc = f"inproc://ddml-client-{id(self)}"
            self._alarm_endpoint = f"inproc://ddml-alarm-{id(self)}"
            self._pending = {}
            self._attempts = {}
            self._attempt_messages: dict[str, protocol.Request] = {}
            self._stopping = threading.Event()
            self._local = threading.local()
            started = threading.Event()
            self._thread = threading.Thread(target=self._io, args=(started,), name="ddml-broker-io", daemon=True)
            self._thread.start()
            started.wait(5)
            self._pid = os.getpid()
            atexit.register(self.close)  # a context with live sockets would hang interpreter exit

    # ------------------------------------------------------------------ the I/O thread

    def _io(self, started: threading.Event) -> None:
        pull = self._context.socket(zmq.PULL)
        pull.bind(self._inproc)
        self._alarm = self._context.socket(zmq.PUB)
        self._alarm.setsockopt(zmq.LINGER, 0)
        self._alarm.bind(self._alarm_endpoint)
        self._dealers = [self._connect(broker.endpoint) for broker in self._brokers]
        self._monitors = [self._monitor(dealer) for dealer in self._dealers]
        started.set()
        heartbeat_due_at = 0.0
        now = time.monotonic()
        for broker in self._brokers:
            broker.seen_at = now
        silent_after_s = self._heartbeat_interval_s * self._liveness
        # What could not be sent because no connection is up yet: (give_up_at, id, target broker, frames).
        self._backlog: deque[tuple[float, str, bytes, list[bytes]]] = deque()
        try:
            while not self._stopping.is_set():
                poller = zmq.Poller()
                poller.register(pull, zmq.POLLIN)
                for dealer in self._dealers:
                    poller.register(dealer, zmq.POLLIN)
                for monitor in self._monitors:
                    if monitor is not None:
                        poller.register(monitor, zmq.POLLIN)
                wait_ms = 5 if self._backlog else min(100, max(0.0, heartbeat_due_at - time.monotonic()) * 1000)
                ready = dict(poller.poll(wait_ms))
                now = time.monotonic()
                if self._backlog:
                    self._flush_backlog(now)
                if pull in ready:
                    self._forward(pull, now)
                for broker, dealer, monitor in zip(self._brokers, self._dealers, self._monitors):
                    if dealer in ready:
                        self._receive(broker, dealer, now)
                    if monitor is not None and monitor in ready and _disconnected(monitor) and broker.up:
                        self._went_down(broker, "disconnected", now)
                if now >= heartbeat_due_at:
                    # Until the first heartbeat goes through (no connection yet), retry every 20 ms:
                    # the broker's answer tells us its instance id, without which a broker restart
                    # in our first interval would go unnoticed and its requests would wait out
                    # their deadlines.
                    sent = all([_send_quietly(dealer, protocol.encode(protocol.Heartbeat()))
                                for dealer in self._dealers])
                    heartbeat_due_at = now + (self._heartbeat_interval_s if sent else _HEARTBEAT_RETRY_S)
                    self._expire_waiting(now)
                for broker in self._brokers:
                    if now - broker.seen_at > silent_after_s and not self._stopping.is_set():
                        self._went_down(broker, "silent", now)
                        self._reconnect(broker, now)
        finally:
            for dealer, monitor in zip(self._dealers, self._monitors):
                if monitor is not None:
                    dealer.disable_monitor()
                    monitor.close(linger=0)
                dealer.close(linger=0)
            pull.close(linger=0)
            self._alarm.close(linger=0)

    def _connect(self, endpoint: str, request_thread: bool = False) -> zmq.Socket:
        """A DEALER to one broker: the I/O thread's, or a request thread's own."""
        dealer = new_socket(self._context, zmq.DEALER, hwm=_DEALER_HWM)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # with no broker connection, fail fast instead of queueing
        if request_thread:
            # The I/O thread's DEALER and its heartbeats tell when a broker dies; a request thread's
            # only needs to notice a half-open connection eventually. A gateway has a DEALER per
            # thread and broker, and at ZMTP's 1 s pings the idle ones cost every broker CPU.
            dealer.setsockopt(zmq.HEARTBEAT_IVL, _THREAD_ZMTP_HEARTBEAT_IVL_MS)
            dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * _THREAD_ZMTP_HEARTBEAT_IVL_MS)
        if self._curve is not None:
            self._curve.apply(dealer)
        dealer.connect(endpoint)
        return dealer

    def _monitor(self, dealer: zmq.Socket) -> zmq.Socket | None:
        """With several brokers, a dropped connection (a broker killed) fails over at once, not after
        `liveness` silent heartbeats. With one, there is nowhere to go, and its restart is told by its
        new instance id."""
        return dealer.get_monitor_socket(_MONITOR_EVENTS) if self._multi else None

    def _reconnect(self, broker: _Broker, now: float) -> None:
        index = broker.index
        if self._monitors[index] is not None:
            self._dealers[index].disable_monitor()
            self._monitors[index].close(linger=0)
        self._dealers[index].close(linger=0)
        self._dealers[index] = self._connect(broker.endpoint)
        self._monitors[index] = self._monitor(self._dealers[index])
        broker.seen_at = now

    def _went_down(self, broker: _Broker, why: str, now: float) -> None:
        """A broker died, restarted or fell silent: what it held may be lost. Resend or fail."""
        if broker.up or why == "restarted":
            logger.warning("broker %s %s", broker.endpoint, why)
        broker.up = why == "restarted"  # a restarted broker answers: it is up, but forgot what we sent
        broker.epoch += 1
        broker.change, broker.changed_at = why, now
        self._changes += 1
        self._ring()
        if not self._multi:
            if why == "restarted":
                give_up_at = now + self._heartbeat_interval_s * self._liveness
                with self._lock:
                    for future in self._pending.values():
                        future.deadline_at = min(future.deadline_at, give_up_at)
                        future.fail_as = (ErrorCode.UNAVAILABLE, "broker restarted while the request was in flight")
            else:
                self._fail_pending(ErrorCode.UNAVAILABLE, f"broker {self.endpoint} stopped answering")
            return
        for request_id, attempt in list(self._attempts.items()):
            error = self._after_broker_change(attempt, self._attempt_message(request_id), now, self._send_on_io)
            if error is not None:
                self._fail(request_id, error.code, error.message, error.retry_after_s)

    def _attempt_message(self, request_id: str) -> protocol.Request:
        return self._attempt_messages[request_id]

    def _send_on_io(self, index: int, frames: list[bytes]) -> bool:
        return _send_quietly(self._dealers[index], frames)

    def _forward(self, pull: zmq.Socket, now: float) -> None:
        for _ in range(1000):
            try:
                request_id, target, *frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            request_id = request_id.decode()
            if self._backlog or not self._start_attempt(request_id, target, frames, now):
                self._backlog.append((now + _CONNECT_GRACE_S, request_id, target, frames))

    def _start_attempt(self, request_id: str, target: bytes, frames: list[bytes], now: float) -> bool:
        """Send a request (with failover), or a status request to its one broker (`target`)."""
        if target:
            broker = self._brokers[int(target)]
            if not broker.up:  # known to be down: say so now, rather than after the connect grace
                self._fail(request_id, ErrorCode.UNAVAILABLE, f"broker {broker.endpoint} is down")
                return True
            return _send_quietly(self._dealers[broker.index], frames)
        message = protocol.decode(frames)
        with self._lock:
            future = self._pending.get(request_id)
        if future is None:
            return True  # failed or expired meanwhile: nothing to send
        attempt = _Attempt(deadline_at=future.deadline_at - _REPLY_GRACE_S)
        if not self._send_somewhere(attempt, message, now, self._send_on_io):
            return False
        self._attempts[request_id] = attempt
        self._attempt_messages[request_id] = message
        return True

    def _flush_backlog(self, now: float) -> None:
        """Send what waited for a connection, in order; fail what waited too long."""
        while self._backlog:
            give_up_at, request_id, target, frames = self._backlog[0]
            if self._start_attempt(request_id, target, frames, now):
                self._backlog.popleft()
            elif now >= give_up_at:
                self._backlog.popleft()
                error = self._unreachable()
                self._fail(request_id, error.code, error.message, error.retry_after_s)
            else:
                return

    def _receive(self, broker: _Broker, dealer: zmq.Socket, now: float) -> None:
        for _ in range(1000):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            broker.seen_at = now
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker %s: %s", broker.endpoint, error)
                continue
            match message:
                case protocol.Reply() | protocol.Replies():
                    for reply in protocol.replies_of(message):
                        self._on_reply(broker, reply, now)
                case protocol.Status():
                    self._resolve(message.request_id, message)
                case protocol.Heartbeat():
                    self._on_heartbeat(broker, message.instance_id, now)
                case protocol.Error():
                    logger.error("broker %s refused a message: %s %s", broker.endpoint, message.code,
                                 message.message)
                case _:
                    logger.warning("unexpected %s from broker %s", type(message).__name__, broker.endpoint)

    def _on_reply(self, broker: _Broker, reply: protocol.Reply, now: float) -> None:
        attempt = self._attempts.get(reply.request_id)
        if attempt is not None and self._should_retry(reply, broker.index, attempt,
                                                      self._attempt_message(reply.request_id), now,
                                                      self._send_on_io):
            return
        if self._resolve(reply.request_id, reply) and attempt is not None and len(attempt.tried) > 1:
            self._remember_resent(reply.request_id)

    def _resolve(self, request_id: str, answer: protocol.Message) -> bool:
        with self._lock:
            future = self._pending.pop(request_id, None)
        self._forget_attempt(request_id)
        if future is None:
            self._count_stray(request_id)
            return False
        with self._lock:
            self.replies += 1
        future.set_result(answer)
        return True

    def _forget_attempt(self, request_id: str) -> None:
        self._attempts.pop(request_id, None)
        self._attempt_messages.pop(request_id, None)

    def _on_heartbeat(self, broker: _Broker, instance_id: str, now: float) -> None:
        if broker.instance_id and instance_id != broker.instance_id:
            # What reached the old broker died with it; what reached the new one carries the old
            # instance id, so the new broker refuses it unrun, at once. Either way one reply.
            broker.instance_id = instance_id
            self._went_down(broker, "restarted", now)
        elif not broker.up:
            logger.info("broker %s answers again", broker.endpoint)
            broker.up = True
            self._changes += 1
            self._ring()
        broker.instance_id = instance_id

    def _ring(self) -> None:
        """Wake every request thread waiting in request(), so it rereads the counters. I/O thread only."""
        try:
            self._alarm.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:  # a PUB drops for slow subscribers; the periodic check still runs
            pass

    def _expire_waiting(self, now: float) -> None:
        """Drop bookkeeping for requests whose caller stopped waiting (their deadline passed)."""
        with self._lock:
            expired = [rid for rid, f in self._pending.items() if getattr(f, "deadline_at", float("inf")) < now]
        for request_id in expired:
            future = self._pending.get(request_id)
            fail_as = getattr(future, "fail_as", None)
            if fail_as is not None:
                self._fail(request_id, *fail_as)
                continue
            with self._lock:
                self.expired_locally += 1
            self._fail(request_id, ErrorCode.TIMEOUT, "no reply before the deadline")

    def _fail_pending(self, code: ErrorCode, message: str) -> None:
        self._backlog.clear()  # never send a request after telling its caller it failed
        with self._lock:
            request_ids = list(self._pending)
        for request_id in request_ids:
            self._fail(request_id, code, message)

    def _fail(self, request_id: str, code: ErrorCode, message: str, retry_after_s: float = 0.0) -> None:
        with self._lock:
            future = self._pending.pop(request_id, None)
        self._forget_attempt(request_id)
        if future is not None and not future.done():
            future.set_exception(BrokerError(code, message, retry_after_s))


def _disconnected(monitor: zmq.Socket) -> bool:
    """Read a monitor's events; True if one says the connection dropped."""
    dropped = False
    while monitor.poll(0):
        dropped |= recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    return dropped


def _drain(socket: zmq.Socket) -> None:
    while True:
        try:
            socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def _send_quietly(socket: zmq.Socket, frames: list[bytes]) -> bool:
    try:
        send_frames(socket, frames)
        return True
    except zmq.Again:
        return False


def _outputs_of(reply: protocol.Reply) -> list[Any]:
    if not reply.ok:
        code = ErrorCode(reply.error_code)
        raise BrokerError(code, reply.error_message, retry_after_s=reply.retry_after_ms / 1000)
    try:
        return [protocol.decode_value(output) for output in reply.outputs]
    except protocol.DecodeError as error:
        raise BrokerError(ErrorCode.INTERNAL, f"broker reply could not be decoded: {error}") from error
