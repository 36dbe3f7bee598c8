"""Links: how the gateway tells that a broker died, restarted, fell silent or came back.

Pure: no sockets, no clock of its own. The I/O shell reports what it saw (a message, a heartbeat's
instance id, a dropped connection, the time) and reads back what changed. Restart and silence are
told by ddml_common/liveness.py, as the worker's links tell them (worker/link.py); this module
adds what only a gateway decides: a broker's epoch and why it moved, and when to heartbeat.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from ddml_common.liveness import Liveness

logger = logging.getLogger(__name__)

HEARTBEAT_RETRY_S = 0.02  # the first wait after a heartbeat could not be sent; doubled up to the interval
UNKNOWN_RETRY_MAX_S = 0.1  # ... or up to this, while a lone broker's instance is unknown (requests.awaits_instance)


def split_endpoints(endpoint: str) -> list[str]:
    """'tcp://a:5555, tcp://b:5555' -> the endpoints; ValueError if there is none."""
    endpoints = [e.strip() for e in endpoint.split(",") if e.strip()]
    if not endpoints:
        raise ValueError(f"need at least one broker endpoint, got {endpoint!r}")
    return endpoints


class Change(enum.Enum):
    """Why a broker's epoch last moved: what was sent to it before may be lost."""

    SILENT = "silent"
    DISCONNECTED = "disconnected"
    RESTARTED = "restarted"


@dataclass
class Link:
    """One broker as this gateway sees it."""

    index: int
    endpoint: str
    liveness: Liveness = field(default_factory=lambda: Liveness(0.0))  # its instance, and when last heard
    up: bool = True  # until it falls silent, disconnects or restarts; again once it answers
    epoch: int = 0  # +1 each time it goes down or restarts
    change: Change | None = None
    changed_at: float = 0.0
    heartbeat_due_at: float = 0.0
    heartbeat_retry_s: float = 0.0  # after a heartbeat that could not be sent (no connection): the next wait

    @property
    def instance_id(self) -> str:
        return self.liveness.instance_id

    @property
    def seen_at(self) -> float:
        """The last message from it, or the last (re)connect."""
        return self.liveness.seen_at

    def tag(self) -> str:
        """The instance id a request sent to it now carries, so that another instance refuses it
        unrun. None ("") while it is down: we no longer know which instance will read it."""
        return self.instance_id if self.up else ""


class Links:
    """Every broker's link. `changes` moves whenever any broker goes down, restarts or comes back,
    so that a reader on another thread can tell it has something to look at."""

    def __init__(self, endpoints: list[str], silent_after_s: float, heartbeat_interval_s: float = 1.0):
        self.links = [Link(index, endpoint, Liveness(silent_after_s)) for index, endpoint in enumerate(endpoints)]
        self.silent_after_s = silent_after_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.changes = 0

    @classmethod
    def of(cls, endpoint: str, heartbeat_interval_s: float, liveness: int) -> Links:
        """A client's links from its --broker string ('tcp://a:5555,tcp://b:5555'), each broker
        silent after `liveness` heartbeat intervals without a word. ValueError if it names none."""
        return cls(split_endpoints(endpoint), heartbeat_interval_s * liveness, heartbeat_interval_s)

    @property
    def endpoints(self) -> list[str]:
        return [link.endpoint for link in self.links]

    def __getitem__(self, index: int) -> Link:
        return self.links[index]

    def __iter__(self):
        return iter(self.links)

    def __len__(self) -> int:
        return len(self.links)

    def started(self, now: float) -> None:
        for link in self.links:
            link.liveness.connected(now)

    def heard(self, index: int, now: float) -> None:
        """Any message from the broker: it is not silent."""
        self.links[index].liveness.heard(now)

    def heartbeat(self, index: int, instance_id: str, now: float) -> bool:
        """Its heartbeat names its instance. True if that changed anything (restarted, or back)."""
        link = self.links[index]
        link.liveness.heard(now)
        restarted = link.liveness.instance(instance_id)
        if link.up and restarted:
            # What reached the old broker died with it; what reached the new one carries the old
            # instance id, so the new broker refuses it unrun, at once. Either way one reply.
            self._went_down(link, Change.RESTARTED, now)
            return True
        if not link.up:
            # What it held was given up when it went down, and what was sent since carried no
            # instance id (see tag()): whichever instance answers now may run it.
            logger.info("broker %s answers again%s", link.endpoint, " as a new instance" if restarted else "")
            link.up = True
            self.changes += 1
            return True
        return False

    def disconnected(self, index: int, now: float) -> bool:
        """Its connection dropped (a monitor event). True if that took it down."""
        link = self.links[index]
        if not link.up:
            return False
        self._went_down(link, Change.DISCONNECTED, now)
        return True

    def silent(self, now: float) -> list[int]:
        """The brokers that have said nothing for `silent_after_s`: now down. The shell reconnects
        each; its silence is counted again from now."""
        gone = [link.index for link in self.links if link.liveness.silent(now)]
        for index in gone:
            link = self.links[index]
            self._went_down(link, Change.SILENT, now)
            link.liveness.connected(now)
            link.heartbeat_due_at, link.heartbeat_retry_s = now, 0.0  # to the new connection, at once
        return gone

    def heartbeats_due(self, now: float) -> list[int]:
        return [link.index for link in self.links if now >= link.heartbeat_due_at]

    def heartbeat_sent(self, index: int, sent: bool, now: float) -> None:
        """The shell tried to send a heartbeat. Until one goes through (no connection yet), retry
        soon: the broker's answer tells us its instance id, without which a restart in our first
        interval would go unnoticed. But back off to the interval, so that a broker that stays
        unreachable costs one try a heartbeat interval, not fifty a second. While we have never heard
        a lone broker's instance, its first requests wait for it: then back off only to
        UNKNOWN_RETRY_MAX_S (the shells look at the links that often anyway)."""
        link = self.links[index]
        if sent:
            link.heartbeat_retry_s = 0.0
            link.heartbeat_due_at = now + self.heartbeat_interval_s
            return
        longest_s = (self.heartbeat_interval_s if link.instance_id or len(self.links) > 1
                     else min(self.heartbeat_interval_s, UNKNOWN_RETRY_MAX_S))
        link.heartbeat_retry_s = min(longest_s, 2 * link.heartbeat_retry_s or HEARTBEAT_RETRY_S)
        link.heartbeat_due_at = now + link.heartbeat_retry_s

    def next_heartbeat_at(self) -> float:
        return min(link.heartbeat_due_at for link in self.links)

    def next_silent_at(self) -> float:
        return min(link.seen_at for link in self.links) + self.silent_after_s

    def _went_down(self, link: Link, why: Change, now: float) -> None:
        if link.up or why is Change.RESTARTED:
            logger.warning("broker %s %s", link.endpoint, why.value)
        link.up = why is Change.RESTARTED  # a restarted broker answers: it is up, but forgot what we sent
        link.epoch += 1
        link.change, link.changed_at = why, now
        self.changes += 1
