"""BrokerClient: how blocking code talks to the brokers: the in-process Dispatcher, scripts and bench,
and the gRPC server. (The HTTP gateway, on its event loop, has gateway/async_transport.py, which
drives the same gateway/requests.py.)

One client per process, safe for many threads and for gunicorn's fork: nothing zmq exists until
the first call in a process (a pid check starts afresh after a fork). Two transports, both thin:

- request() (blocking; gateway/thread_transport.py): each request thread sends on its own DEALERs
  and waits on them for its reply.
- submit() and status() (asynchronous, for the Dispatcher, bench and the gRPC server's catalog;
  gateway/io_thread.py): one I/O thread owns a DEALER per broker; callers get a Future.

The I/O thread also heartbeats the brokers for both, and keeps their links (gateway/links.py).
Every decision about a request (which broker, failover and resends, deadlines, late and duplicate
replies, one broker versus several) is gateway/requests.py's, the same code for both transports
and for the simulator. Its docstring states the policy.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import threading
from concurrent.futures import Future
from typing import Any, Callable

import zmq

from ddml_common import protocol, tracing
from ddml_common.keys import ClientKeys
from ddml_common.protocol import ErrorCode
from ddml_common.sockets import send_frames
from gateway.broker_error import BrokerError
from gateway.io_thread import IoThread
from gateway.links import Links
from gateway.requests import Counts, Fail, Outcome
from gateway.status_fanout import gather_status
from gateway.thread_transport import ThreadTransport

logger = logging.getLogger(__name__)

__all__ = ["BrokerClient", "BrokerError"]

# A waiting request() wakes on the I/O thread's alarm when a broker goes down or restarts. It
# also checks this often by itself, in case it subscribed just as an alarm went out (a SUB misses
# what was sent before its subscription arrived). Polling every 0.1 s instead cost the gateway
# 0.19 rather than 0.12 cores with 64 requests waiting 0.5 s each (64 threads waking 10 times a second).
_WAKE_CHECK_S = 1.0


class BrokerClient:
    def __init__(self, endpoint: str, heartbeat_interval_s: float = 1.0, liveness: int = 3,
                 curve: ClientKeys | None = None):
        self._links = Links.of(endpoint, heartbeat_interval_s, liveness)
        self.endpoints = self._links.endpoints
        self.endpoint = ",".join(self.endpoints)
        self._curve = curve
        self._heartbeat_interval_s = heartbeat_interval_s
        self._liveness = liveness
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._context: zmq.Context | None = None
        self._io: IoThread | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._local = threading.local()
        self._transports: list[ThreadTransport] = []  # every request thread's, for the counts
        self._ids = itertools.count(1)
        self._wake_endpoint = ""
        self._alarm_endpoint = ""

    @property
    def broker_instance_id(self) -> str:
        return self._links[0].instance_id

    @property
    def broker_seen_at(self) -> float:
        return max(link.seen_at for link in self._links)

    # What happened to requests, summed over the I/O thread's and every request thread's.
    replies = property(lambda self: self._count("replies"))
    unmatched_replies = property(lambda self: self._count("unmatched_replies"))
    duplicate_replies = property(lambda self: self._count("duplicate_replies"))
    resent = property(lambda self: self._count("resent"))
    expired_locally = property(lambda self: self._count("expired_locally"))

    def _count(self, name: str) -> int:
        with self._lock:
            counts: list[Counts] = [t.requests.counts for t in self._transports]
        if self._io is not None:
            counts.append(self._io.requests.counts)
        return sum(getattr(c, name) for c in counts)

    # ------------------------------------------------------------------ the two transports

    def submit(self, model: str, inputs: list, timeout_s: float, priority: int = 0) -> Future:
        """Send one request; the Future resolves to the outputs (decoded), or raises BrokerError."""
        _check_timeout(timeout_s)
        encoded = [protocol.encode_value(value) for value in inputs]
        return self._hand_over(
            lambda request_id: request_message(request_id, model, inputs, encoded, timeout_s, priority),
            None, timeout_s, _outputs_of)

    def request(self, model: str, inputs: list, timeout_s: float, priority: int = 0,
                request_id_prefix: str = "", timings: dict | None = None) -> list:
        """Send one request on this thread's own DEALERs and wait there for its outputs. Raises BrokerError.
        With a `timings` map, ask where the request's time went, and put the reply's figures in it
        (protocol.TIMINGS: queue_ms, prepare_ms, forward_ms)."""
        _check_timeout(timeout_s)
        self._ensure_started()
        transport = self._thread_transport()
        request_id = f"{self._pid}-{next(self._ids)}"
        request_id = f"{request_id_prefix}/{request_id}" if request_id_prefix else request_id  # the caller's id first
        encoded = [protocol.encode_value(value) for value in inputs]
        message = request_message(request_id, model, inputs, encoded, timeout_s, priority)
        message.timings = timings is not None
        outcome = transport.request(request_id, message, timeout_s, _WAKE_CHECK_S)
        outputs = _outputs_of(outcome)
        if timings is not None:
            timings.update(outcome.answer.timings)
        return outputs

    def ask(self, broker: int, timeout_s: float, overrides: dict | None = None) -> Future:
        """Ask one broker for its status (after it merged the operator's `overrides`); the Future resolves to its
        protocol.Status, or raises BrokerError."""
        return self._hand_over(lambda request_id: protocol.StatusRequest(request_id, overrides or {}), broker,
                               timeout_s, _answer_of)

    def status(self, timeout_s: float = 2.0, every_broker: bool = True, overrides: dict | None = None) -> dict:
        """Models, queues and workers, from the first broker that answers, and every broker's view
        under "brokers". Raises BrokerError if none answers. every_broker=False asks only the brokers
        a request would go to, in that order, until one answers (for a frequent caller that needs
        one view, such as the gateway's model catalog: a standby broker then hears nothing of it)."""
        return gather_status(self, list(self._links), timeout_s, every_broker, overrides)

    def _hand_over(self, build: Callable[[str], protocol.Message], broker: int | None, wait_s: float,
                   convert: Callable[[Outcome], Any]) -> Future:
        """Hand a message to the I/O thread. The Future gets `convert(outcome)`, or its BrokerError."""
        self._ensure_started()
        request_id = f"{self._pid}-{next(self._ids)}"
        raw: Future = Future()
        result: Future = Future()

        def settle(done: Future) -> None:
            try:
                result.set_result(convert(done.result()))
            except BrokerError as error:
                result.set_exception(error)

        raw.add_done_callback(settle)
        self._io.hand_over(request_id, raw, build(request_id), broker, wait_s)
        push = getattr(self._local, "push", None)
        if push is None or self._local.pid != os.getpid():
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._wake_endpoint)
            self._local.push, self._local.pid = push, os.getpid()
        send_frames(push, [b""], dontwait=False)
        return result

    def _thread_transport(self) -> ThreadTransport:
        """This thread's DEALERs, alarm SUB and requests; created on its first request (in this process)."""
        transport = getattr(self._local, "transport", None)
        if transport is None or self._local.transport_pid != os.getpid():
            transport = ThreadTransport(self._context, self._links, self._curve, self._alarm_endpoint,
                                        restart_grace_s=self._links.silent_after_s)
            with self._lock:
                self._transports.append(transport)
            self._local.transport, self._local.transport_pid = transport, os.getpid()
        return transport

    # ------------------------------------------------------------------ per process (fork) and close

    def _ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # First use in this process (or first after a fork): everything zmq is created here.
            self._context = zmq.Context()
            self._wake_endpoint = f"inproc://ddml-client-{id(self)}"
            self._alarm_endpoint = f"inproc://ddml-alarm-{id(self)}"
            self._links = Links.of(self.endpoint, self._heartbeat_interval_s, self._liveness)
            self._stopping = threading.Event()
            self._local = threading.local()
            self._transports = []
            self._io = IoThread(self._context, self._links, self._curve, self._heartbeat_interval_s,
                                self._wake_endpoint, self._alarm_endpoint, self._stopping)
            started = threading.Event()
            self._thread = threading.Thread(target=self._io.run, args=(started,), name="ddml-broker-io",
                                            daemon=True)
            self._thread.start()
            started.wait(5)
            self._pid = os.getpid()
            atexit.register(self.close)  # a context with live sockets would hang interpreter exit

    def close(self) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                return
            thread, context, stopping = self._thread, self._context, self._stopping
            self._thread = None
            self._pid = None
            stopping.set()
        # Join without the lock: the I/O thread's last outcomes wake callers whose callbacks may
        # take it, and joining while holding it stalled close() for the whole timeout.
        thread.join(timeout=5)
        if thread.is_alive():  # never pull the context from under a live I/O thread
            logger.warning("broker client I/O thread did not stop within 5 s; leaving its context open")
            return
        context.destroy(linger=0)


def request_message(request_id: str, model: str, inputs: list, encoded: list[bytes], timeout_s: float,
                    priority: int) -> protocol.Request:
    """The wire request of every transport; `encoded` are the inputs' item frames."""
    return protocol.Request(
        request_id, model, timeout_ms=max(0, int(timeout_s * 1000)), inputs=encoded,
        sizes=[len(value) if isinstance(value, (str, bytes)) else 0 for value in inputs],
        priority=priority, trace=tracing.current_trace(),  # the caller's trace context, if it sent one
    )


def _answer_of(outcome: Outcome) -> protocol.Message:
    """The broker's answer, or the outcome's failure as a BrokerError."""
    if type(outcome) is Fail:
        raise BrokerError(outcome.code, outcome.message, outcome.retry_after_s)
    return outcome.answer


def _outputs_of(outcome: Outcome) -> list[Any]:
    reply = _answer_of(outcome)
    if not reply.ok:
        code = ErrorCode(reply.error_code)
        raise BrokerError(code, reply.error_message, retry_after_s=reply.retry_after_ms / 1000)
    try:
        return [protocol.decode_value(output) for output in reply.outputs]
    except protocol.DecodeError as error:
        raise BrokerError(ErrorCode.INTERNAL, f"broker reply could not be decoded: {error}") from error


def _check_timeout(timeout_s: float) -> None:
    """NaN or an infinity would end in int() deep in a send (a 500): refuse it as the caller's error."""
    if (type(timeout_s) is float or type(timeout_s) is int) and math.isfinite(timeout_s):
        return  # the usual case, before the general checks below (bool and subclasses go on to them)
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not math.isfinite(timeout_s):
        raise BrokerError(ErrorCode.BAD_REQUEST, f"a request's timeout must be a finite number of seconds, "
                                                 f"got {timeout_s!r:.40}")
