"""The I/O-thread transport: one thread owns a DEALER per broker, shared by every submit() and
status() in the process. Callers hand it (request, Future) pairs and ring its inproc PULL; it
sends (the requests of one pass to one broker together, in one REQUESTS message), receives,
heartbeats the brokers for both transports, tells their links (gateway/links.py)
what it saw, and rings an inproc PUB "alarm" that every blocking request thread listens to
whenever a broker goes down, restarts or comes back.

It decides nothing about a request: gateway/requests.py says where each one goes and how it
ends, and each Future is set to that outcome (a Resolve or a Fail).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

import zmq

from ddml_common import protocol
from ddml_common.keys import ClientKeys
from ddml_common.protocol import ErrorCode
from gateway.dealers import connect_dealer, deliver, disconnected, drain, send_quietly, send_requests
from gateway.links import Links
from gateway.requests import Outcome, Requests, Send

logger = logging.getLogger(__name__)

_MAX_WAIT_MS = 100  # the loop looks at the links and the time at least this often
_UNSENT_WAIT_MS = 5  # while a request waits for a connection
_DRAIN_CAP = 1000  # messages read from one socket per pass, so that one busy socket cannot starve the rest


class IoThread:
    def __init__(self, context: zmq.Context, links: Links, curve: ClientKeys | None, heartbeat_interval_s: float,
                 wake_endpoint: str, alarm_endpoint: str, stopping: threading.Event):
        self._context = context
        self._links = links
        self._curve = curve
        self._heartbeat_interval_s = heartbeat_interval_s
        self._wake_endpoint = wake_endpoint
        self._alarm_endpoint = alarm_endpoint
        self._stopping = stopping
        self.requests = Requests(links, restart_grace_s=links.silent_after_s)
        # Handed over by callers' threads (deque appends and pops are atomic); only this thread reads it.
        self._handed: deque[tuple[str, Future, protocol.Message, int | None, float]] = deque()
        self._futures: dict[str, Future] = {}  # whom to tell each request's outcome; this thread only
        self._dealers: list[zmq.Socket] = []
        self._monitors: list[zmq.Socket | None] = []

    def hand_over(self, request_id: str, future: Future, message: protocol.Message, broker: int | None,
                  wait_s: float) -> None:
        """From any thread: a request (broker None: with failover; `wait_s` is its timeout), or a
        message for one broker (`wait_s` for its answer). The caller then rings the wake socket."""
        self._handed.append((request_id, future, message, broker, wait_s))

    def run(self, started: threading.Event) -> None:
        context, links, requests = self._context, self._links, self.requests
        pull = context.socket(zmq.PULL)
        pull.bind(self._wake_endpoint)
        alarm = context.socket(zmq.PUB)
        alarm.setsockopt(zmq.LINGER, 0)
        alarm.bind(self._alarm_endpoint)
        self._dealers = [connect_dealer(context, link.endpoint, self._curve) for link in links]
        self._monitors = [self._monitor(dealer) for dealer in self._dealers]
        started.set()
        heartbeat = protocol.encode(protocol.Heartbeat())
        tick_due_at = 0.0
        now = time.monotonic()
        links.started(now)
        changes = links.changes
        try:
            while not self._stopping.is_set():
                poller = zmq.Poller()
                poller.register(pull, zmq.POLLIN)
                for dealer in self._dealers:
                    poller.register(dealer, zmq.POLLIN)
                for monitor in self._monitors:
                    if monitor is not None:
                        poller.register(monitor, zmq.POLLIN)
                wake_at = min(links.next_heartbeat_at(), tick_due_at)
                wait_ms = (_UNSENT_WAIT_MS if requests.unsent()
                           else min(_MAX_WAIT_MS, max(0.0, wake_at - time.monotonic()) * 1000))
                ready = dict(poller.poll(wait_ms))
                now = time.monotonic()
                if pull in ready:
                    drain(pull)
                self._take_handed(now)
                for link, dealer, monitor in zip(links, self._dealers, self._monitors):
                    if dealer in ready:
                        self._receive(link.index, dealer, now)
                    if monitor is not None and monitor in ready and disconnected(monitor):
                        links.disconnected(link.index, now)
                for index in links.heartbeats_due(now):
                    links.heartbeat_sent(index, send_quietly(self._dealers[index], heartbeat), now)
                if now >= tick_due_at:
                    tick_due_at = now + self._heartbeat_interval_s
                    requests.tick(now)
                if not self._stopping.is_set():
                    for index in links.silent(now):
                        self._reconnect(index)
                if links.changes != changes:
                    changes = links.changes
                    try:
                        alarm.send(b"", zmq.NOBLOCK)  # wake every request thread waiting on its own DEALER
                    except zmq.ZMQError:  # a PUB drops for slow subscribers; their periodic check still runs
                        pass
                    requests.links_changed(now)
                self._settle(requests.flush(self._send, now, self._send_together))
        finally:
            self._take_handed(now)
            requests.fail_all(ErrorCode.UNAVAILABLE, "the broker client was closed")
            self._settle(requests.flush(self._send, now, self._send_together))
            for dealer, monitor in zip(self._dealers, self._monitors):
                if monitor is not None:
                    dealer.disable_monitor()
                    monitor.close(linger=0)
                dealer.close(linger=0)
            pull.close(linger=0)
            alarm.close(linger=0)

    def _take_handed(self, now: float) -> None:
        handed, requests = self._handed, self.requests
        while handed:
            request_id, future, message, broker, wait_s = handed.popleft()
            self._futures[request_id] = future
            if broker is None:
                requests.submit(request_id, message, wait_s, now)
            else:
                requests.ask(request_id, message, broker, wait_s, now)

    def _send(self, instruction: Send) -> bool:
        return send_quietly(self._dealers[instruction.broker], protocol.encode(instruction.message))

    def _send_together(self, index: int, sends: list[Send]) -> bool:
        return send_requests(self._dealers[index], sends)

    def _settle(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            future = self._futures.pop(outcome.request_id, None)
            if future is not None and not future.done():
                future.set_result(outcome)

    def _receive(self, index: int, dealer: zmq.Socket, now: float) -> None:
        links, requests = self._links, self.requests
        for _ in range(_DRAIN_CAP):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            deliver(frames, index, links, requests, now)

    def _monitor(self, dealer: zmq.Socket) -> zmq.Socket | None:
        """With several brokers, a dropped connection (a broker killed) fails over at once, not after
        `liveness` silent heartbeats. With one, there is nowhere to go, and its restart is told by its
        new instance id."""
        return dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED) if len(self._links) > 1 else None

    def _reconnect(self, index: int) -> None:
        if self._monitors[index] is not None:
            self._dealers[index].disable_monitor()
            self._monitors[index].close(linger=0)
        self._dealers[index].close(linger=0)
        self._dealers[index] = connect_dealer(self._context, self._links[index].endpoint, self._curve)
        self._monitors[index] = self._monitor(self._dealers[index])
