"""The blocking transport: each request thread sends on its own DEALERs and waits there for its
reply. No handoff to another thread either way, which at concurrency 1 saves two thread wake-ups
per request and, under load, the Future machinery's CPU.

It only does I/O: gateway/requests.py decides where the request goes, what a broker change means
for it, and when it ends. The I/O thread keeps the brokers' links (gateway/links.py) and rings an
inproc PUB "alarm" whenever one goes down, restarts or comes back, so no waiting thread polls.
"""

from __future__ import annotations

import logging
import time

import zmq

from ddml_common import protocol
from ddml_common.keys import ClientKeys
from gateway.dealers import connect_dealer, drain, send_quietly
from gateway.links import Links
from gateway.requests import CONNECT_GRACE_S, Outcome, Requests, Send

logger = logging.getLogger(__name__)

_INSTANCE_CHECK_MS = 5.0  # a new request waits for the I/O thread to learn the broker's instance: looks this often


class ThreadTransport:
    """One request thread's sockets (a DEALER per broker, a SUB to the alarm) and its requests."""

    def __init__(self, context: zmq.Context, links: Links, curve: ClientKeys | None, alarm_endpoint: str,
                 restart_grace_s: float):
        self.dealers = {link.index: connect_dealer(context, link.endpoint, curve, request_thread=True)
                        for link in links}
        self.alarm = context.socket(zmq.SUB)
        self.alarm.setsockopt(zmq.LINGER, 0)
        self.alarm.setsockopt(zmq.SUBSCRIBE, b"")
        self.alarm.connect(alarm_endpoint)
        self.poller = zmq.Poller()
        for dealer in self.dealers.values():
            self.poller.register(dealer, zmq.POLLIN)
        self.poller.register(self.alarm, zmq.POLLIN)
        self.requests = Requests(links, restart_grace_s)

    def _send(self, instruction: Send) -> bool:
        return send_quietly(self.dealers[instruction.broker], protocol.encode(instruction.message))

    def request(self, request_id: str, message: protocol.Request, timeout_s: float,
                wake_check_s: float) -> Outcome:
        """Send one request and wait for its outcome. `wake_check_s`: how often to look at the
        brokers' links without an alarm (a SUB misses what was sent before it subscribed)."""
        requests = self.requests
        now = time.monotonic()
        requests.submit(request_id, message, timeout_s, now)
        try:
            outcome = self._flush(now)
            while outcome is None and requests.unsent():
                wait_ms = max(1.0, min(CONNECT_GRACE_S, requests.next_wake_at() - now) * 1000)
                if requests.awaits_instance():
                    # The I/O thread has not yet heard the broker name its instance (a writable DEALER
                    # would not wait here): look again every few ms.
                    if self.alarm.poll(min(wait_ms, _INSTANCE_CHECK_MS)):
                        drain(self.alarm)
                else:
                    # No connection yet (this thread's DEALERs are new, or every broker is down): wait for one, briefly.
                    writable = zmq.Poller()
                    for dealer in self.dealers.values():
                        writable.register(dealer, zmq.POLLOUT)
                    writable.poll(wait_ms)
                now = time.monotonic()
                outcome = self._flush(now)
            while outcome is None:
                wait_s = min(requests.next_wake_at() - now, wake_check_s)
                ready = dict(self.poller.poll(max(0.0, wait_s) * 1000))
                now = time.monotonic()
                if self.alarm in ready:
                    drain(self.alarm)  # the links say what happened
                for index, dealer in self.dealers.items():
                    if dealer in ready:
                        self._read(index, dealer, request_id, now)
                if request_id in requests:  # (else it was answered: this thread's requests hold no other)
                    requests.links_changed(now)
                    requests.tick(now)
                outcome = self._flush(now)
            return outcome
        finally:
            if request_id in requests:  # interrupted: never leave a record behind for the next request
                requests.fail_all(protocol.ErrorCode.INTERNAL, "interrupted")
                requests.flush(lambda _: False, now)

    def _flush(self, now: float) -> Outcome | None:
        outcomes = self.requests.flush(self._send, now)
        return outcomes[0] if outcomes else None

    def _read(self, index: int, dealer: zmq.Socket, request_id: str, now: float) -> None:
        """Hand the replies this DEALER holds to the requests (late ones of earlier requests too), until
        `request_id`'s ends: what is left stays readable, and the next request's poll finds it. Not
        reading on to zmq.Again saves a recv and an exception per request."""
        requests = self.requests
        while request_id in requests:
            try:
                message = protocol.decode(dealer.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except protocol.DecodeError as error:
                logger.warning("dropped malformed message from broker: %s", error)
                continue
            for answer in protocol.replies_of(message):
                requests.reply(index, answer, now)

    def close(self) -> None:
        for dealer in self.dealers.values():
            dealer.close(linger=0)
        self.alarm.close(linger=0)
