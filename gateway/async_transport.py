"""AsyncBrokerClient: the gateway's way to the brokers on its event loop (zmq.asyncio).

One client per gunicorn process, one DEALER per broker for every request of that process.
Nothing zmq exists until the process's event loop first uses it (the ASGI lifespan's startup,
or the first request): never in the gunicorn master, so forking is safe. If the loop changes (a
test client that runs each request in a fresh loop) everything is made again in the new one.

It only does I/O. gateway/requests.py decides where each request goes, what a broker's death,
restart or silence means for it, and when it ends; gateway/links.py tells those changes from what
the sockets saw. The shell: a request coroutine hands its request to `Requests` and sends what
it says at once; one reader task per DEALER hands replies back and wakes the requests they
answer (asyncio Futures); one timer task heartbeats the brokers, reconnects silent ones and
ticks the requests' deadlines. The blocking BrokerClient (gateway/broker_client.py) stays for
scripts, the Dispatcher and the gRPC server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ddml_common import protocol
from ddml_common.keys import ClientKeys
from ddml_common.protocol import ErrorCode
from gateway.broker_client import _answer_of, _check_timeout, _outputs_of, request_message, split_endpoints
from gateway.broker_error import BrokerError
from gateway.dealers import connect_dealer, deliver
from gateway.links import Links
from gateway.requests import Outcome, Requests, Send
from gateway.status_fanout import gather_status_async

logger = logging.getLogger(__name__)

_MAX_WAIT_S = 0.1  # the timer task looks at the links and the deadlines at least this often
_UNSENT_WAIT_S = 0.005  # while a request waits for a connection
_DRAIN_CAP = 1000  # messages read from one DEALER per wake-up, so that one busy broker cannot starve the rest


class AsyncBrokerClient:
    def __init__(self, endpoint: str, heartbeat_interval_s: float = 1.0, liveness: int = 3,
                 curve: ClientKeys | None = None):
        self.endpoints = split_endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self._curve = curve
        self._heartbeat_interval_s = heartbeat_interval_s
        self._silent_after_s = heartbeat_interval_s * liveness
        self._links = Links(self.endpoints, self._silent_after_s, heartbeat_interval_s)
        self.requests = Requests(self._links, restart_grace_s=self._silent_after_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._context: zmq.asyncio.Context | None = None
        self._dealers: list[zmq.asyncio.Socket] = []
        self._monitors: list[zmq.asyncio.Socket | None] = []
        self._readers: list[asyncio.Task] = []
        self._timer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._futures: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)

    @property
    def links(self) -> Links:
        return self._links

    # ------------------------------------------------------------------ what the routes call

    async def request(self, model: str, inputs: list, timeout_s: float, priority: int = 0,
                      request_id_prefix: str = "", timings: dict | None = None) -> list:
        """Send one request and await its outputs. Raises BrokerError. With a `timings` map, ask
        where the request's time went, and put the reply's figures in it (protocol.TIMINGS)."""
        _check_timeout(timeout_s)
        request_id = f"{os.getpid()}-{next(self._ids)}"
        request_id = f"{request_id_prefix}/{request_id}" if request_id_prefix else request_id
        encoded = [protocol.encode_value(value) for value in inputs]
        message = request_message(request_id, model, inputs, encoded, timeout_s, priority)
        message.timings = timings is not None
        outcome = await self._await(request_id, lambda requests, now: requests.submit(request_id, message,
                                                                                      timeout_s, now))
        outputs = _outputs_of(outcome)
        if timings is not None:
            timings.update(outcome.answer.timings)
        return outputs

    async def ask(self, broker: int, timeout_s: float) -> protocol.Message:
        """One broker's protocol.Status. Raises BrokerError."""
        request_id = f"{os.getpid()}-{next(self._ids)}"
        message = protocol.StatusRequest(request_id)
        return _answer_of(await self._await(request_id, lambda requests, now: requests.ask(
            request_id, message, broker, timeout_s, now)))

    async def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
        """As BrokerClient.status(): every broker's view, or the first that answers."""
        self._ensure_started()
        return await gather_status_async(self, list(self._links), timeout_s, every_broker)

    async def start(self) -> None:
        """Connect now (the ASGI lifespan's startup), so that heartbeats run before the first request."""
        self._ensure_started()

    async def _await(self, request_id: str, submit) -> Outcome:
        self._ensure_started()
        future = self._loop.create_future()
        self._futures[request_id] = future
        requests = self.requests
        now = time.monotonic()
        submit(requests, now)
        self._settle(requests.flush(self._send, now))
        if requests.unsent():
            self._wake.set()  # no connection yet: the timer task tries again soon
        try:
            return await future  # Requests ends every request by its deadline and grace
        finally:
            self._futures.pop(request_id, None)

    # ------------------------------------------------------------------ the shell

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._pid == os.getpid():
            return
        if self._loop is not None and self._pid == os.getpid():
            self._abandon()  # another loop's sockets and tasks (tests): start afresh in this one
        self._loop, self._pid = loop, os.getpid()
        self._context = zmq.asyncio.Context()
        self._links = Links(self.endpoints, self._silent_after_s, self._heartbeat_interval_s)
        self.requests = Requests(self._links, restart_grace_s=self._silent_after_s)
        self._futures = {}
        self._wake = asyncio.Event()
        self._dealers, self._monitors, self._readers = [], [], []
        for link in self._links:
            self._dealers.append(connect_dealer(self._context, link.endpoint, self._curve))
            self._monitors.append(None)
            self._readers.append(None)
            self._listen(link.index)
        self._links.started(time.monotonic())
        self._timer = loop.create_task(self._run_timer(), name="ddml-broker-timer")

    def _listen(self, index: int) -> None:
        """Start reading a (new) DEALER, and its monitor with several brokers."""
        dealer = self._dealers[index]
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED) if len(self._links) > 1 else None
        self._monitors[index] = monitor
        self._readers[index] = self._loop.create_task(self._read(index, dealer, monitor),
                                                     name=f"ddml-broker-reader-{index}")

    async def _read(self, index: int, dealer: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket | None) -> None:
        if monitor is not None:
            watch = self._loop.create_task(self._watch(index, monitor))
        # The same socket, read without asyncio. The next await still finds what arrived meanwhile
        # (it looks at the socket's events first), so draining here loses no wake-up.
        shadow = zmq.Socket.shadow(dealer.underlying)
        try:
            while True:
                frames = await dealer.recv_multipart()
                now = time.monotonic()
                deliver(frames, index, self._links, self.requests, now)
                for _ in range(_DRAIN_CAP):  # on to what else is waiting, without a Future each
                    try:
                        frames = shadow.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    deliver(frames, index, self._links, self.requests, now)
                self._after_events(now)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            if monitor is not None:
                watch.cancel()

    async def _watch(self, index: int, monitor: zmq.asyncio.Socket) -> None:
        """With several brokers, a dropped connection (a broker killed) fails over at once, not
        after `liveness` silent heartbeats."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    now = time.monotonic()
                    self._links.disconnected(index, now)
                    self._after_events(now)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    def _after_events(self, now: float) -> None:
        """What the readers saw may have changed the links or answered requests: act on it."""
        requests = self.requests
        requests.links_changed(now)  # cheap when nothing changed
        self._settle(requests.flush(self._send, now))
        if requests.unsent():
            self._wake.set()

    async def _run_timer(self) -> None:
        links, heartbeat = self._links, protocol.encode(protocol.Heartbeat())
        wake = self._wake
        try:
            while True:
                now = time.monotonic()
                for index in links.heartbeats_due(now):
                    links.heartbeat_sent(index, _send_now(self._dealers[index], heartbeat), now)
                for index in links.silent(now):
                    self._reconnect(index)
                self.requests.tick(now)
                self._after_events(now)
                wait_s = (_UNSENT_WAIT_S if self.requests.unsent()
                          else min(_MAX_WAIT_S, links.next_heartbeat_at() - now, self.requests.next_wake_at() - now))
                if wait_s > 0:
                    try:
                        await asyncio.wait_for(wake.wait(), wait_s)
                    except TimeoutError:
                        pass
                wake.clear()
        except asyncio.CancelledError:
            pass

    def _reconnect(self, index: int) -> None:
        self._readers[index].cancel()
        self._close_socket(index)
        self._dealers[index] = connect_dealer(self._context, self._links[index].endpoint, self._curve)
        self._listen(index)

    def _close_socket(self, index: int) -> None:
        monitor = self._monitors[index]
        if monitor is not None:
            self._dealers[index].disable_monitor()
            monitor.close(linger=0)
        self._dealers[index].close(linger=0)

    def _send(self, instruction: Send) -> bool:
        return _send_now(self._dealers[instruction.broker], protocol.encode(instruction.message))

    def _settle(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            future = self._futures.get(outcome.request_id)
            if future is not None and not future.done():
                future.set_result(outcome)

    # ------------------------------------------------------------------ stopping

    async def close(self) -> None:
        """Every request still waiting ends UNAVAILABLE; the sockets and tasks go."""
        if self._loop is None or self._pid != os.getpid():
            return
        self.requests.fail_all(ErrorCode.UNAVAILABLE, "the broker client was closed")
        self._settle(self.requests.flush(lambda _: False, time.monotonic()))
        tasks = [task for task in (self._timer, *self._readers) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._abandon()

    def _abandon(self) -> None:
        for task in (self._timer, *self._readers):
            if task is not None:
                task.cancel()
        for index in range(len(self._dealers)):
            self._close_socket(index)
        if self._context is not None:
            self._context.destroy(linger=0)
        self._loop = self._pid = self._context = self._timer = None
        self._dealers, self._monitors, self._readers = [], [], []


def _send_now(dealer: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
    """Send without waiting; False if the DEALER cannot take it now (no connection, or full). Through
    zmq.asyncio's own send, which then looks for replies that arrived meanwhile (a send can take the
    socket's read signal, and a reader awaiting it would otherwise sleep through them)."""
    sent = dealer.send_multipart(frames, flags=zmq.DONTWAIT)  # done at once: nothing here ever waits to send
    return sent.done() and sent.exception() is None


__all__ = ["AsyncBrokerClient", "BrokerError"]
