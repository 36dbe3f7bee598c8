"""The broker's ring of recent pool events (ddml_common/pool_events.py): pure, no sockets, no clock.

Pool workers put their events of the last few heartbeat intervals on every heartbeat. The ring keeps
each event once, by its worker's pool id and seq, and only for a model of that worker's catalog (so
that a peer cannot grow the broker's per-model state); the latest RING_SIZE go into STATUS for
ddml-status, and the core counts each new one in /metrics (BrokerCore._count_pool_event).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable

from ddml_common.pool_events import PoolEvent

RING_SIZE = 32  # events in STATUS (at most protocol.MAX_STATUS_POOL_EVENTS)
_REMEMBERED_WORKERS = 4096  # pool ids whose last seq is remembered, oldest forgotten first


@dataclass(frozen=True, slots=True)
class RingEntry:
    pool_id: str
    host: str
    event: PoolEvent  # `at` on the broker's clock

    def describe(self, now: float) -> dict:
        wire = self.event.to_wire(now)
        del wire["age_ms"]
        return {"pool_id": self.pool_id, "host": self.host, "age_s": round(max(0.0, now - self.event.at), 3), **wire}


class PoolEventRing:
    def __init__(self, size: int = RING_SIZE):
        self._entries: deque[RingEntry] = deque(maxlen=size)
        self._last_seq: OrderedDict[str, int] = OrderedDict()  # by pool id: across re-registrations

    def ingest(self, pool_id: str, host: str, catalog: Iterable[str], events: list[dict],
               now: float) -> list[RingEntry]:
        """A heartbeat's events (decode() checked them): those not seen before, oldest first."""
        last = before = self._last_seq.get(pool_id, 0)
        known = frozenset(catalog)
        fresh = []
        for wire in sorted(events, key=lambda e: e["seq"]):
            if wire["seq"] <= last:
                continue
            last = wire["seq"]
            event = PoolEvent.from_wire(wire, now)
            if event is not None and event.model in known:
                fresh.append(RingEntry(pool_id, host, event))
        if last != before:
            self._last_seq[pool_id] = last
            self._last_seq.move_to_end(pool_id)
            while len(self._last_seq) > _REMEMBERED_WORKERS:
                self._last_seq.popitem(last=False)
        self._entries.extend(fresh)
        return fresh

    def describe(self, now: float) -> list[dict]:
        """STATUS's pool_events: the latest, oldest first."""
        return [entry.describe(now) for entry in self._entries]
