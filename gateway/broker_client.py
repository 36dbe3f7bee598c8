"""BrokerClient: how a gateway process (or the in-process Dispatcher) talks to the broker.

One client per process, safe for many threads and for gunicorn's fork: nothing zmq exists until
the first call in a process (a pid check restarts it after a fork). Two paths:

- request() (the gateway's, blocking): each request thread sends on its own DEALER and waits on
  it for its reply. No handoff to another thread either way, which at concurrency 1 saves two
  thread wake-ups per request and, under load, the Future machinery's CPU.
- submit() (asynchronous, for the Dispatcher and bench): one I/O thread owns a shared DEALER;
  request threads hand it frames over their own inproc PUSH socket and get a Future keyed by
  request id, bounded by the request's deadline.

The I/O thread also heartbeats the broker for both paths. If the broker goes silent, or comes
back with a new instance id (it restarted and forgot what we sent), every waiting request
fails with UNAVAILABLE instead of hanging until its deadline: the I/O thread rings an inproc
PUB "alarm" that every request thread's SUB listens to, so no waiting thread has to poll.
"""

from __future__ import annotations

import atexit
import itertools
from collections import deque
import logging
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import zmq

from ddml_common import protocol
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
        self.endpoint = endpoint
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
        self._ids = itertools.count(1)
        self._inproc = ""
        self._alarm_endpoint = ""
        self.broker_instance_id = ""
        self.broker_seen_at = 0.0  # monotonic; 0 until the broker first answers
        self.replies = 0  # replies that found their waiting request
        self.unmatched_replies = 0  # replies for nothing waiting: late (we gave up) or duplicated
        self.expired_locally = 0  # requests the broker never answered before deadline + grace
        # Written by the I/O thread, read by request() threads: broker silences and restarts seen.
        self._silences = 0
        self._restarts = 0
        self._restarted_at = 0.0

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

    def request(self, model: str, inputs: list, timeout_s: float, priority: int = 0) -> list:
        """Send one request on this thread's own DEALER and wait there for its outputs. Raises BrokerError."""
        self._ensure_started()
        dealer, alarm, poller = self._thread_sockets()
        request_id = f"{self._pid}-{next(self._ids)}"
        silences, restarts = self._silences, self._restarts  # what the I/O thread has seen so far
        encoded = [protocol.encode_value(value) for value in inputs]
        frames = protocol.encode(self._request_message(request_id, model, inputs, encoded, timeout_s, priority))
        now = time.monotonic()
        give_up_at = now + timeout_s + _REPLY_GRACE_S
        if not _send_quietly(dealer, frames):  # no connection yet: wait for one, briefly
            if not dealer.poll(_CONNECT_GRACE_S * 1000, zmq.POLLOUT) or not _send_quietly(dealer, frames):
                raise BrokerError(ErrorCode.UNAVAILABLE, f"broker {self.endpoint} is not reachable")
        while True:
            if self._silences != silences:
                raise BrokerError(ErrorCode.UNAVAILABLE, f"broker {self.endpoint} stopped answering")
            if self._restarts != restarts:
                # As in the I/O thread: wait a moment for the new broker's refusal, then give up.
                give_up_at = min(give_up_at, self._restarted_at + self._heartbeat_interval_s * self._liveness)
            now = time.monotonic()
            if now >= give_up_at:
                if self._restarts != restarts:
                    raise BrokerError(ErrorCode.UNAVAILABLE, "broker restarted while the request was in flight")
                with self._lock:
                    self.expired_locally += 1
                raise BrokerError(ErrorCode.TIMEOUT, "no reply before the deadline")
            ready = dict(poller.poll(min(give_up_at - now, _WAKE_CHECK_S) * 1000))
            if alarm in ready:
                _drain(alarm)  # the counters above say what happened
            if dealer not in ready:
                continue
            try:
                reply = protocol.decode(dealer.recv_multipart(zmq.NOBLOCK))
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker: %s", error)
                continue
            replies = protocol.replies_of(reply)
            mine = next((r for r in replies if r.request_id == request_id), None)
            with self._lock:  # the others: late replies of earlier requests this thread gave up on
                self.unmatched_replies += len(replies) - (mine is not None)
                self.replies += mine is not None
            if mine is not None:
                return _outputs_of(mine)

    def _request_message(self, request_id: str, model: str, inputs: list, encoded: list[bytes],
                         timeout_s: float, priority: int) -> protocol.Request:
        """The wire request of both paths; `encoded` are the inputs' item frames."""
        return protocol.Request(
            request_id, model, timeout_ms=max(0, int(timeout_s * 1000)), inputs=encoded,
            sizes=[len(value) if isinstance(value, (str, bytes)) else 0 for value in inputs],
            priority=priority, instance_id=self.broker_instance_id,
        )

    def _thread_sockets(self) -> tuple[zmq.Socket, zmq.Socket, zmq.Poller]:
        """This thread's DEALER to the broker, its SUB to the I/O thread's alarm, and a poller over
        both; created on its first request (in this process)."""
        sockets = getattr(self._local, "sockets", None)
        if sockets is None or self._local.sockets_pid != os.getpid():
            dealer = self._connect()
            alarm = self._context.socket(zmq.SUB)
            alarm.setsockopt(zmq.LINGER, 0)
            alarm.setsockopt(zmq.SUBSCRIBE, b"")
            alarm.connect(self._alarm_endpoint)
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            poller.register(alarm, zmq.POLLIN)
            sockets = self._local.sockets = (dealer, alarm, poller)
            self._local.sockets_pid = os.getpid()
        return sockets

    def status(self, timeout_s: float = 2.0) -> dict:
        """The broker's view of models, queues and workers. Raises BrokerError if it does not answer."""
        future = self._send(lambda request_id: protocol.StatusRequest(request_id), wait_s=timeout_s)
        try:
            status = future.result(timeout=timeout_s)
        except FutureTimeout:
            raise BrokerError(ErrorCode.UNAVAILABLE, f"broker did not answer within {timeout_s} s") from None
        return {
            "instance_id": status.instance_id,
            "models": status.models,
            "workers": status.workers,
            "stats": status.stats,
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

    def _send(self, build, wait_s: float) -> Future:
        """Hand a message to the I/O thread; the Future gets the broker's answer or a BrokerError."""
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
        send_frames(push, [request_id.encode(), *protocol.encode(build(request_id))], dontwait=False)
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
        dealer = self._connect()
        started.set()
        heartbeat_due_at = 0.0
        self.broker_seen_at = time.monotonic()
        silent_after_s = self._heartbeat_interval_s * self._liveness
        # Requests that could not be sent because no connection is up yet: (give_up_at, id, frames).
        self._backlog: deque[tuple[float, str, list[bytes]]] = deque()
        try:
            while not self._stopping.is_set():
                poller = zmq.Poller()
                poller.register(dealer, zmq.POLLIN)
                poller.register(pull, zmq.POLLIN)
                wait_ms = 5 if self._backlog else min(100, max(0.0, heartbeat_due_at - time.monotonic()) * 1000)
                ready = dict(poller.poll(wait_ms))
                now = time.monotonic()
                if self._backlog:
                    self._flush_backlog(dealer, now)
                if pull in ready:
                    self._forward(pull, dealer, now)
                if dealer in ready:
                    self._receive(dealer, now)
                if now >= heartbeat_due_at:
                    # Until the first heartbeat goes through (no connection yet), retry every 20 ms:
                    # the broker's answer tells us its instance id, without which a broker restart
                    # in our first interval would go unnoticed and its requests would wait out
                    # their deadlines.
                    sent = _send_quietly(dealer, protocol.encode(protocol.Heartbeat()))
                    heartbeat_due_at = now + (self._heartbeat_interval_s if sent else _HEARTBEAT_RETRY_S)
                    self._expire_waiting(now)
                if now - self.broker_seen_at > silent_after_s and not self._stopping.is_set():
                    self._silences += 1
                    self._ring()
                    self._fail_pending(ErrorCode.UNAVAILABLE, f"broker {self.endpoint} stopped answering")
                    dealer.close(linger=0)
                    dealer = self._connect()
                    self.broker_seen_at = now
        finally:
            dealer.close(linger=0)
            pull.close(linger=0)
            self._alarm.close(linger=0)

    def _connect(self) -> zmq.Socket:
        """A DEALER to the broker: the I/O thread's, or a request thread's own."""
        dealer = new_socket(self._context, zmq.DEALER, hwm=_DEALER_HWM)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # with no broker connection, fail fast instead of queueing
        if self._curve is not None:
            self._curve.apply(dealer)
        dealer.connect(self.endpoint)
        return dealer

    def _forward(self, pull: zmq.Socket, dealer: zmq.Socket, now: float) -> None:
        for _ in range(1000):
            try:
                request_id, *frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self._backlog or not _send_quietly(dealer, frames):
                self._backlog.append((now + _CONNECT_GRACE_S, request_id.decode(), frames))

    def _flush_backlog(self, dealer: zmq.Socket, now: float) -> None:
        """Send what waited for a connection, in order; fail what waited too long."""
        while self._backlog:
            give_up_at, request_id, frames = self._backlog[0]
            if _send_quietly(dealer, frames):
                self._backlog.popleft()
            elif now >= give_up_at:
                self._backlog.popleft()
                self._fail(request_id, ErrorCode.UNAVAILABLE, f"broker {self.endpoint} is not reachable")
            else:
                return

    def _receive(self, dealer: zmq.Socket, now: float) -> None:
        for _ in range(1000):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.broker_seen_at = now
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker: %s", error)
                continue
            match message:
                case protocol.Reply() | protocol.Replies():
                    for reply in protocol.replies_of(message):
                        self._resolve(reply.request_id, reply)
                case protocol.Status():
                    self._resolve(message.request_id, message)
                case protocol.Heartbeat():
                    self._on_heartbeat(message.instance_id)
                case protocol.Error():
                    logger.error("broker refused a message: %s %s", message.code, message.message)
                case _:
                    logger.warning("unexpected %s from broker", type(message).__name__)

    def _resolve(self, request_id: str, answer: protocol.Message) -> None:
        with self._lock:
            future = self._pending.pop(request_id, None)
        if future is None:
            self.unmatched_replies += 1
        else:
            self.replies += 1
            future.set_result(answer)

    def _on_heartbeat(self, instance_id: str) -> None:
        if self.broker_instance_id and instance_id != self.broker_instance_id:
            # What reached the old broker died with it; what reached the new one carries the old
            # instance id, so the new broker refuses it unrun, at once. Either way one reply: wait a
            # moment for the refusals, then fail the rest here, long before their deadlines.
            logger.warning("broker restarted (%s -> %s)", self.broker_instance_id, instance_id)
            self._restarted_at = time.monotonic()
            self._restarts += 1
            give_up_at = self._restarted_at + self._heartbeat_interval_s * self._liveness
            with self._lock:
                for future in self._pending.values():
                    future.deadline_at = min(future.deadline_at, give_up_at)
                    future.fail_as = (ErrorCode.UNAVAILABLE, "broker restarted while the request was in flight")
            self._ring()
        self.broker_instance_id = instance_id

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
            self.expired_locally += 1
            self._fail(request_id, ErrorCode.TIMEOUT, "no reply before the deadline")

    def _fail_pending(self, code: ErrorCode, message: str) -> None:
        self._backlog.clear()  # never send a request after telling its caller it failed
        with self._lock:
            request_ids = list(self._pending)
        for request_id in request_ids:
            self._fail(request_id, code, message)

    def _fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        with self._lock:
            future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(BrokerError(code, message))


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
