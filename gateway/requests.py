"""Requests: a gateway request's whole lifetime, decided without I/O.

Events in: submit (or ask one broker for its status), a reply, the brokers' links changed
(gateway/links.py says how), and the time passing (tick). Instructions out: `flush(send, now)`
hands each message to send to `send` (the shell's socket write: True if it went), or, given a
`send_together`, the requests bound for one broker as one list (one REQUESTS message), and returns
the outcomes, each request's one Resolve or Fail. No sockets, threads, locks or clock here: the
blocking per-thread transport, the I/O-thread transport, an asyncio shell and the simulator all
drive this same code.

The policy. Several brokers are all equal. Each request goes to the first live one in their
order (a stable preference, so that batching is not split at low load). When that broker dies,
restarts, or falls silent, or answers UNAVAILABLE, the request goes to another live broker with
the same request id and what is left of its deadline; the first reply wins, and a later one for
the same request is dropped and counted (`duplicate_replies`). With one broker nothing is
resent: if it goes silent every request it held fails with UNAVAILABLE, and if it restarts
(forgetting what we sent) the new instance's refusal is awaited briefly, then the request fails
UNAVAILABLE instead of waiting out its deadline. A restart is told by the broker's new instance
id, so a lone broker's first requests wait (within the connect grace) until a heartbeat or a
status answer has named its instance.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from gateway.links import Change, Links

REPLY_GRACE_S = 1.0  # beyond the deadline, time allowed for the broker's TIMEOUT reply to arrive
CONNECT_GRACE_S = 1.0  # how long a new request waits for a (re)connection before failing UNAVAILABLE
ALL_DOWN_RETRY_AFTER_S = 1.0  # Retry-After when no broker is reachable
RECENT_RESENT = 4096  # ids of answered requests that were sent to several brokers, kept to spot duplicates
_RESTARTED = "broker restarted while the request was in flight"


@dataclass(slots=True)
class Send:
    """Send `message` to broker `broker` (an index into the endpoints)."""

    request_id: str
    broker: int
    message: protocol.Message


@dataclass(slots=True)
class Resolve:
    """The request's answer came: a Reply (ok or an error), or a broker's Status."""

    request_id: str
    answer: protocol.Message


@dataclass(slots=True)
class Fail:
    """The request ends without an answer from a broker."""

    request_id: str
    code: ErrorCode
    message: str
    retry_after_s: float = 0.0


Outcome = Union[Resolve, Fail]
SendFn = Callable[[Send], bool]
SendTogetherFn = Callable[[int, list[Send]], bool]  # (broker, its requests in order) -> True if all went
MAX_TOGETHER = 256  # requests handed to send_together in one list
TOGETHER_BYTES = 4 << 20  # and about this many bytes of inputs (a larger request goes alone)


class _Chunk:
    """Requests to one broker that go in one list: at most MAX_TOGETHER, about TOGETHER_BYTES of inputs
    (one larger request goes alone) and at most protocol.MAX_ITEMS inputs."""

    __slots__ = ("records", "sends", "bytes", "items")

    def __init__(self):
        self.records: list[Record] = []
        self.sends: list[Send] = []
        self.bytes = self.items = 0

    def takes(self, items: int, size: int) -> bool:
        """Room for a request of `items` inputs, `size` bytes of them."""
        return not self.sends or (len(self.sends) < MAX_TOGETHER and self.items + items <= protocol.MAX_ITEMS
                                  and self.bytes + size <= TOGETHER_BYTES)

    def add(self, record: "Record", instruction: Send, items: int, size: int) -> None:
        self.records.append(record)
        self.sends.append(instruction)
        self.bytes += size
        self.items += items


@dataclass(eq=False, slots=True)
class Record:
    """One request: where it has been sent, what is still expected from where, and how it ends."""

    request_id: str
    message: protocol.Message  # a Request; a StatusRequest when `only` is set
    deadline_at: float  # the request's own deadline: a resend carries what is left of it
    give_up_at: float  # when it fails locally: deadline + grace, sooner after a lone broker restarts
    connect_until: float  # a first send may wait this long for a connection
    only: int | None = None  # a status request: that broker only, no failover
    waiting: dict[int, int] = field(default_factory=dict)  # broker index -> its epoch when sent
    tried: set[int] = field(default_factory=set)
    refused_by: set[int] = field(default_factory=set)  # brokers that answered UNAVAILABLE: not asked again
    # Brokers that restarted while holding it, until when: the new instance refuses the old copy, if it
    # reached it. No second copy goes there before that refusal, or this time, says the old one is gone.
    stale_until: dict[int, float] = field(default_factory=dict)
    if_unsendable: Outcome | None = None  # a resend that no broker takes ends so (None: a first send)
    fail_as: Fail | None = None  # how it ends at give_up_at, when not TIMEOUT


@dataclass
class Counts:
    replies: int = 0  # answers that found their waiting request
    unmatched_replies: int = 0  # answers for nothing waiting: late (we gave up) or unknown
    duplicate_replies: int = 0  # a second answer to a request resent to another broker: dropped
    resent: int = 0  # requests sent again to another broker
    expired_locally: int = 0  # requests no broker answered before deadline + grace


class Requests:
    def __init__(self, links: Links, restart_grace_s: float):
        """`links` is read, never written: the shell that owns the sockets keeps it up to date.
        `restart_grace_s`: with one broker, how long after its restart to await its refusal."""
        self._links = links
        self._multi = len(links) > 1
        self._restart_grace_s = restart_grace_s
        self._records: dict[str, Record] = {}
        self._unsent: dict[str, Record] = {}  # the records the next flush sends, in order
        self._outcomes: list[Outcome] = []
        self._seen_changes = links.changes
        self._recent_resent: deque[str] = deque(maxlen=RECENT_RESENT)
        self._recent_resent_set: set[str] = set()
        self.counts = Counts()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    # ------------------------------------------------------------------ events

    def submit(self, request_id: str, message: protocol.Request, timeout_s: float, now: float) -> None:
        """A new request, with failover; the next flush sends it."""
        deadline_at = now + timeout_s
        record = Record(request_id, message, deadline_at, deadline_at + REPLY_GRACE_S, now + CONNECT_GRACE_S)
        self._records[request_id] = record
        self._unsent[request_id] = record

    def ask(self, request_id: str, message: protocol.Message, broker: int, wait_s: float, now: float) -> None:
        """A message for one broker only (a status request), answered within `wait_s` or failed."""
        record = Record(request_id, message, now + wait_s, now + wait_s, now + CONNECT_GRACE_S, only=broker)
        self._records[request_id] = record
        link = self._links[broker]
        if not link.up:  # known to be down: say so now, rather than after the connect grace
            self._end(record, Fail(request_id, ErrorCode.UNAVAILABLE, f"broker {link.endpoint} is down"))
        else:
            self._unsent[request_id] = record

    def reply(self, broker: int, answer: protocol.Reply | protocol.Status, now: float) -> None:
        """An answer from a broker: a request's Reply, or a Status."""
        request_id = answer.request_id
        record = self._records.get(request_id)
        if record is None or (record.only is not None) != (type(answer) is protocol.Status):
            self._count_stray(request_id)
            return
        record.waiting.pop(broker, None)
        if (self._multi and record.only is None and not answer.ok
                and answer.error_code == ErrorCode.UNAVAILABLE.value):
            if record.stale_until.pop(broker, None) is not None:
                # The restarted broker refused the copy its old instance was sent: it never ran.
                if not record.waiting:
                    self._resend(record, self._unreachable(request_id))
                return
            # UNAVAILABLE from one of several brokers (shutting down, restarted, no worker yet) is not
            # final: wait for another broker it is also with, or send it to one not tried yet.
            record.refused_by.add(broker)
            if record.waiting:
                return
            if any(link.up and link.index not in record.tried for link in self._links):
                self._resend(record, Resolve(request_id, answer))
                return
        self.counts.replies += 1
        if len(record.tried) > 1:
            self._remember_resent(request_id)
        self._end(record, Resolve(request_id, answer))

    def links_changed(self, now: float) -> None:
        """Some broker went down, restarted or came back (links.changes moved): resend or fail what
        may have been lost with it. Cheap when nothing changed since the last call."""
        if self._links.changes == self._seen_changes:
            return
        self._seen_changes = self._links.changes
        links = self._links
        for record in list(self._records.values()):
            lost = [index for index, epoch in record.waiting.items() if links[index].epoch != epoch]
            if not lost:
                continue
            if record.only is not None:
                link = links[record.only]
                self._end(record, Fail(record.request_id, ErrorCode.UNAVAILABLE,
                                       f"broker {link.endpoint} {link.change.value}"))
            elif not self._multi:
                link = links[0]
                if link.change is Change.RESTARTED:
                    # What reached the old instance died with it; what reached the new one carries
                    # the old instance id, and its refusal is on the way. Wait for it a moment.
                    record.give_up_at = min(record.give_up_at, link.changed_at + self._restart_grace_s)
                    record.fail_as = Fail(record.request_id, ErrorCode.UNAVAILABLE, _RESTARTED)
                else:
                    self._end(record, Fail(record.request_id, ErrorCode.UNAVAILABLE,
                                           f"broker {link.endpoint} stopped answering"))
            else:
                for index in lost:
                    del record.waiting[index]
                    if links[index].change is Change.RESTARTED:
                        record.stale_until[index] = links[index].changed_at + self._restart_grace_s
                if not record.waiting:
                    self._resend(record, self._unreachable(record.request_id))

    def tick(self, now: float) -> None:
        """Fail what no broker answered in time; resend what a restarted broker never refused."""
        stale: list[Record] = []
        due: list[Record] = []
        for r in self._records.values():  # one pass (resending changes neither list)
            if r.stale_until:
                stale.append(r)
            if now >= r.give_up_at:
                due.append(r)
        for record in stale:
            for index in [i for i, until in record.stale_until.items() if now >= until]:
                del record.stale_until[index]  # its old copy died with the old instance
                if not record.waiting:
                    self._resend(record, self._unreachable(record.request_id))
        for record in due:
            if record.fail_as is not None:
                self._end(record, record.fail_as)
                continue
            if record.only is None:
                self.counts.expired_locally += 1
            self._end(record, Fail(record.request_id, ErrorCode.TIMEOUT, "no reply before the deadline"))

    # ------------------------------------------------------------------ instructions

    def flush(self, send: SendFn, now: float, send_together: SendTogetherFn | None = None) -> list[Outcome]:
        """Send what is due, through `send`; then the outcomes since the last flush, in order.

        With `send_together`, the requests (not the status requests) going to one broker are handed
        to it together, in order, as one list of at most MAX_TOGETHER requests and about
        TOGETHER_BYTES of inputs (True: all of them went, in one message; False: none did). A list
        one broker did not take goes on to the next broker each request may go to, as `send` does
        with one request."""
        if self._unsent:
            if send_together is None:
                for record in list(self._unsent.values()):
                    if not self._send_one(record, send, now):
                        self._not_sent(record, now)
            else:
                self._flush_together(send, send_together, now)
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def _flush_together(self, send: SendFn, send_together: SendTogetherFn, now: float) -> None:
        refused: set[int] = set()  # brokers that did not take a list in this flush: not tried again in it
        pending = list(self._unsent.values())
        while pending:
            chunks: dict[int, list[_Chunk]] = {}  # broker -> its lists, in order
            for record in pending:
                if record.only is not None:  # a status request, alone
                    if not self._send_one(record, send, now):
                        self._not_sent(record, now)
                    continue
                instruction = self._next_send(record, now, refused)
                if instruction is None:
                    self._not_sent(record, now)
                    continue
                lists = chunks.get(instruction.broker)
                if lists is None:
                    lists = chunks[instruction.broker] = [_Chunk()]
                inputs = instruction.message.inputs
                items, size = len(inputs), sum(map(len, inputs))
                if not lists[-1].takes(items, size):
                    lists.append(_Chunk())
                lists[-1].add(record, instruction, items, size)
            pending = []
            for broker, lists in chunks.items():
                for chunk in lists:
                    if broker not in refused and send_together(broker, chunk.sends):
                        for record in chunk.records:
                            self._sent(record, broker)
                    else:
                        refused.add(broker)
                        pending.extend(chunk.records)

    def _not_sent(self, record: Record, now: float) -> None:
        """No broker took the record in this flush."""
        if record.stale_until:
            del self._unsent[record.request_id]  # await a restarted broker's refusal, then resend
        elif record.if_unsendable is not None:
            self._end(record, record.if_unsendable)
        elif now >= record.connect_until:
            self._end(record, self._unreachable(record.request_id))

    def unsent(self) -> bool:
        """Something waits for a connection (the shell should flush again soon)."""
        return bool(self._unsent)

    def awaits_instance(self) -> bool:
        """A lone broker, up, whose instance no heartbeat or status has named yet: a request waits
        (within its connect grace) until one does. Sent untagged, it would be run by whichever
        instance reads it, and a restart before we first heard the broker would look like first
        contact: the request would wait out its deadline, not fail at once. (Several brokers: a
        dropped connection fails over, and is told by the DEALER's monitor, so they need not wait.)"""
        if self._multi:
            return False
        link = self._links[0]
        return link.up and not link.instance_id

    def next_wake_at(self) -> float:
        """When tick() or flush() next has something to do (math.inf: nothing)."""
        wake_at = math.inf
        for r in self._records.values():
            if r.give_up_at < wake_at:
                wake_at = r.give_up_at
        for r in self._unsent.values():
            if r.connect_until < wake_at:
                wake_at = r.connect_until
        return wake_at

    def fail_all(self, code: ErrorCode, message: str) -> None:
        """The shell is closing: every request ends now."""
        for record in list(self._records.values()):
            self._end(record, Fail(record.request_id, code, message))

    # ------------------------------------------------------------------ decisions

    def _send_one(self, record: Record, send: SendFn, now: float) -> bool:
        """Send to the first live broker not tried (any live one, on a second round), else to one
        thought down. False if none took it."""
        skip: set[int] = set()
        while (instruction := self._next_send(record, now, skip)) is not None:
            if send(instruction):
                self._sent(record, instruction.broker)
                return True
            skip.add(instruction.broker)
        return False

    def _next_send(self, record: Record, now: float, skip: set[int]) -> Send | None:
        """Where the record goes next, its message tagged for that broker, passing over the brokers in
        `skip` (they did not take it); None if it goes nowhere now."""
        if record.only is not None:
            return None if record.only in skip else Send(record.request_id, record.only, record.message)
        remaining_ms = int((record.deadline_at - now) * 1000)
        if remaining_ms <= 0 and record.tried:
            return None
        if not record.tried and now < record.connect_until and self.awaits_instance():
            return None  # until the broker's instance is known, within the connect grace
        for index in self._candidates(record):
            if index in skip:
                continue
            message = record.message
            message.instance_id = self._links[index].tag()  # a broker that restarted since refuses it unrun
            message.timeout_ms = max(0, remaining_ms)
            return Send(record.request_id, index, message)
        return None

    def _sent(self, record: Record, index: int) -> None:
        """Broker `index` took the record."""
        del self._unsent[record.request_id]
        if record.only is None:
            if record.tried:
                self.counts.resent += 1
            record.tried.add(index)
        record.waiting[index] = self._links[index].epoch

    def _candidates(self, record: Record) -> list[int]:
        links = self._links.links
        if len(links) == 1:
            return [0]
        untried = [b.index for b in links if b.up and b.index not in record.tried]
        # Then one that lost it (went down or restarted) and is back; never one that refused it.
        barred = record.refused_by | record.stale_until.keys()
        retried = [b.index for b in links if b.up and b.index in record.tried and b.index not in record.waiting
                   and b.index not in barred]
        # Last, brokers we think down: one may be back before its first heartbeat says so, and a
        # DEALER with IMMEDIATE refuses at once while its broker is unreachable.
        down = [b.index for b in links if not b.up and b.index not in record.waiting and b.index not in barred]
        return untried + retried + down

    def _resend(self, record: Record, if_unsendable: Outcome) -> None:
        record.if_unsendable = if_unsendable
        self._unsent[record.request_id] = record

    def _unreachable(self, request_id: str) -> Fail:
        endpoints = ",".join(link.endpoint for link in self._links)
        return Fail(request_id, ErrorCode.UNAVAILABLE, f"no broker of {endpoints} is reachable",
                    retry_after_s=ALL_DOWN_RETRY_AFTER_S)

    def _end(self, record: Record, outcome: Outcome) -> None:
        del self._records[record.request_id]
        self._unsent.pop(record.request_id, None)
        self._outcomes.append(outcome)

    def _remember_resent(self, request_id: str) -> None:
        if len(self._recent_resent) == self._recent_resent.maxlen:
            self._recent_resent_set.discard(self._recent_resent[0])
        self._recent_resent.append(request_id)
        self._recent_resent_set.add(request_id)

    def _count_stray(self, request_id: str) -> None:
        if request_id in self._recent_resent_set:
            self.counts.duplicate_replies += 1
        else:
            self.counts.unmatched_replies += 1
