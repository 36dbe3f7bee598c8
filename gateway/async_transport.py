"""AsyncBrokerClient: the gateway's way to the brokers on its event loop.

One client per gunicorn process, one DEALER per broker for every request of that process.
Nothing zmq exists until the process's event loop first uses it (the ASGI lifespan's startup,
or the first request): never in the gunicorn master, so forking is safe. If the loop changes (a
test client that runs each request in a fresh loop) everything is made again in the new one.

It only does I/O. gateway/requests.py decides where each request goes, what a broker's death,
restart or silence means for it, and when it ends; gateway/links.py tells those changes from what
the sockets saw. The shell: a request coroutine hands its request to `Requests`, then awaits a
Future; what `Requests` says to send goes out at once when the request is alone, else at the end
of the loop's turn with every other request submitted in it (one pass, one look at the read
signal: at c64 the gateway's CPU per request fell to 0.74 of sending each at once, and the
broker's and worker's further, as they get several per wake-up), those to one broker in one
REQUESTS message (one send, and at the broker one receive and one unpacking, for them all);
the loop watches each
DEALER's descriptor, and what a DEALER receives goes to `Requests`, whose outcomes settle those
Futures; one timer task heartbeats the brokers, reconnects silent ones and ticks the requests'
deadlines.

The loop watches zmq's descriptors itself (loop.add_reader, with zmq's edge-triggered rule), as
zmq.asyncio does inside, but without a Future and a scheduled callback per message: at
concurrency 1 zmq.asyncio's reader cost the transport about 2.5 times the CPU per request of
the blocking transport, and this about 1.4 times (the measurement is in the commit that made
the change). The blocking BrokerClient (gateway/broker_client.py) stays for scripts, the
Dispatcher and the gRPC server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from ddml_common import protocol
from ddml_common.keys import ClientKeys
from ddml_common.protocol import ErrorCode
from gateway.broker_client import _answer_of, _check_timeout, _outputs_of, request_message
from gateway.broker_error import BrokerError
from gateway.dealers import connect_dealer, deliver, send_quietly, send_requests
from gateway.links import Links
from gateway.process_id import pid
from gateway.requests import Outcome, Requests, Send
from gateway.status_fanout import gather_status_async

logger = logging.getLogger(__name__)

_MAX_WAIT_S = 0.1  # the timer task looks at the links and the deadlines at least this often
_UNSENT_WAIT_S = 0.005  # while a request waits for a connection
_DRAIN_CAP = 1000  # messages read from one DEALER per wake-up, so that one busy broker cannot starve the rest


class AsyncBrokerClient:
    def __init__(self, endpoint: str, heartbeat_interval_s: float = 1.0, liveness: int = 3,
                 curve: ClientKeys | None = None):
        self._links = Links.of(endpoint, heartbeat_interval_s, liveness)
        self.endpoints = self._links.endpoints
        self.endpoint = ",".join(self.endpoints)
        self._curve = curve
        self._heartbeat_interval_s = heartbeat_interval_s
        self._liveness = liveness
        self.requests = Requests(self._links, restart_grace_s=self._links.silent_after_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._context: zmq.Context | None = None
        self._dealers: list[zmq.Socket | None] = []
        self._monitors: list[zmq.Socket | None] = []
        self._timer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._futures: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._flush_due = False  # _flush_submitted() is scheduled
        self._sent_to: set[int] = set()  # brokers sent to since their read signal was last looked at

    @property
    def links(self) -> Links:
        return self._links

    # ------------------------------------------------------------------ what the routes call

    async def request(self, model: str, inputs: list, timeout_s: float, priority: int = 0,
                      request_id_prefix: str = "", timings: dict | None = None) -> list:
        """Send one request and await its outputs. Raises BrokerError. With a `timings` map, ask
        where the request's time went, and put the reply's figures in it (protocol.TIMINGS)."""
        _check_timeout(timeout_s)
        self._ensure_started()
        request_id = f"{self._pid}-{next(self._ids)}"
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

    async def ask(self, broker: int, timeout_s: float, overrides: dict | None = None) -> protocol.Message:
        """One broker's protocol.Status (after it merged the operator's `overrides`). Raises BrokerError."""
        self._ensure_started()
        request_id = f"{self._pid}-{next(self._ids)}"
        message = protocol.StatusRequest(request_id, overrides or {})
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
        """(The caller has made sure the client is started in this loop.)"""
        future = self._loop.create_future()
        self._futures[request_id] = future
        now = time.monotonic()
        submit(self.requests, now)
        if len(self._futures) == 1:
            self._after_events(now)  # alone: out at once (at c1 a turn of the loop more cost 0.06 ms)
        elif not self._flush_due:  # with others in flight, the requests of this turn go out together
            self._flush_due = True
            self._loop.call_soon(self._flush_submitted, self._loop)
        try:
            return await future  # Requests ends every request by its deadline and grace
        finally:
            self._futures.pop(request_id, None)

    # ------------------------------------------------------------------ the shell

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._pid == pid():
            return
        if self._loop is not None and self._pid == pid():
            self._abandon()  # another loop's sockets and tasks (tests): start afresh in this one
        self._loop, self._pid = loop, pid()
        self._context = zmq.Context()
        self._links = Links.of(self.endpoint, self._heartbeat_interval_s, self._liveness)
        self.requests = Requests(self._links, restart_grace_s=self._links.silent_after_s)
        self._futures = {}
        self._flush_due = False
        self._sent_to = set()
        self._wake = asyncio.Event()
        self._dealers, self._monitors = [], []
        for link in self._links:
            self._dealers.append(None)
            self._monitors.append(None)
            self._listen(link.index)
        self._links.started(time.monotonic())
        self._timer = loop.create_task(self._run_timer(), name="ddml-broker-timer")

    def _listen(self, index: int) -> None:
        """A (new) DEALER to broker `index`, watched by the loop; and its monitor, with several brokers:
        a dropped connection (a broker killed) then fails over at once, not after `liveness` silent
        heartbeats."""
        dealer = self._dealers[index] = connect_dealer(self._context, self._links[index].endpoint, self._curve)
        self._loop.add_reader(dealer.getsockopt(zmq.FD), self._readable, index)
        if len(self._links) > 1:
            monitor = self._monitors[index] = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._loop.add_reader(monitor.getsockopt(zmq.FD), self._monitor_readable, index)

    def _readable(self, index: int) -> None:
        """The DEALER's descriptor says something changed: read what waits, up to _DRAIN_CAP.
        (zmq's descriptor is edge-triggered: it signals again only once ZMQ_EVENTS has been read,
        so the loop reads EVENTS until no message is left; a send can take the signal too, which
        _send_now() makes up for.)"""
        dealer = self._dealers[index]
        now = time.monotonic()
        received = 0
        while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            if received == _DRAIN_CAP:
                self._loop.call_soon(self._readable, index)  # the rest after the other sockets' turn
                break
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            deliver(frames, index, self._links, self.requests, now)
            received += 1
        if received:
            self._after_events(now)

    def _monitor_readable(self, index: int) -> None:
        monitor = self._monitors[index]
        dropped = False
        while monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            dropped |= recv_monitor_message(monitor, zmq.NOBLOCK)["event"] == zmq.EVENT_DISCONNECTED
        if dropped:
            now = time.monotonic()
            self._links.disconnected(index, now)
            self._after_events(now)

    def _flush_submitted(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send what the request coroutines submitted since the last turn of the loop: one pass, one
        look at each DEALER's read signal afterwards, not one per request."""
        if loop is self._loop:  # (not closed, nor started afresh in another loop, since)
            self._flush_due = False
            self._after_events(time.monotonic())

    def _after_events(self, now: float) -> None:
        """What the readers saw may have changed the links or answered requests, or requests were
        submitted: act on it."""
        requests = self.requests
        requests.links_changed(now)  # cheap when nothing changed
        self._settle(requests.flush(self._send, now, self._send_together))
        for index in self._sent_to:
            dealer = self._dealers[index]
            if dealer is not None and dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._loop.call_soon(self._readable, index)  # the sends may have taken the read signal
        self._sent_to.clear()
        if requests.unsent():
            self._wake.set()  # no connection yet: the timer task tries again soon

    async def _run_timer(self) -> None:
        links, heartbeat = self._links, protocol.encode(protocol.Heartbeat())
        wake = self._wake
        try:
            while True:
                now = time.monotonic()
                for index in links.heartbeats_due(now):
                    links.heartbeat_sent(index, self._send_to(index, heartbeat), now)
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
        self._close_socket(index)
        self._listen(index)

    def _close_socket(self, index: int) -> None:
        monitor, dealer = self._monitors[index], self._dealers[index]
        if monitor is not None:
            self._loop.remove_reader(monitor.getsockopt(zmq.FD))
            dealer.disable_monitor()
            monitor.close(linger=0)
            self._monitors[index] = None
        if dealer is not None:
            self._loop.remove_reader(dealer.getsockopt(zmq.FD))
            dealer.close(linger=0)
            self._dealers[index] = None

    def _send(self, instruction: Send) -> bool:
        """Requests' sends: _after_events() looks at the read signal once they are all out."""
        index = instruction.broker
        self._sent_to.add(index)
        return send_quietly(self._dealers[index], protocol.encode(instruction.message))

    def _send_together(self, index: int, sends: list[Send]) -> bool:
        """Requests' requests to one broker, together: one REQUESTS message (a lone one: a REQUEST)."""
        self._sent_to.add(index)
        return send_requests(self._dealers[index], sends)

    def _send_to(self, index: int, frames: list[bytes]) -> bool:
        """Send without waiting; False if the DEALER cannot take it now (no connection, or full)."""
        dealer = self._dealers[index]
        sent = send_quietly(dealer, frames)
        if dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._readable, index)  # the send may have taken the read signal
        return sent

    def _settle(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            future = self._futures.get(outcome.request_id)
            if future is not None and not future.done():
                future.set_result(outcome)

    # ------------------------------------------------------------------ stopping

    async def close(self) -> None:
        """Every request still waiting ends UNAVAILABLE; the sockets and the timer go."""
        if self._loop is None or self._pid != pid():
            return
        self.requests.fail_all(ErrorCode.UNAVAILABLE, "the broker client was closed")
        self._settle(self.requests.flush(lambda _: False, time.monotonic()))
        timer = self._timer
        timer.cancel()
        await asyncio.gather(timer, return_exceptions=True)
        self._abandon()

    def _abandon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._loop.is_closed():
            for index in range(len(self._dealers)):
                self._close_socket(index)
        else:  # (a test's loop, gone already: nothing watches the descriptors any more)
            for socket in (*self._dealers, *self._monitors):
                if socket is not None:
                    socket.close(linger=0)
        if self._context is not None:
            self._context.destroy(linger=0)
        self._loop = self._pid = self._context = self._timer = None
        self._dealers, self._monitors = [], []


__all__ = ["AsyncBrokerClient", "BrokerError"]
