"""Pool events (issue #24): what a pool worker did to its models, for ddml-status and /metrics.

A pool worker records each step of a load or an unload in an EventLog: a load started, finished or
failed (with the seconds it took), an unload started (with its reason: `idle`, `evicted for M`, ...)
and finished (once drained). It puts the events of the last few heartbeat intervals on every
heartbeat, in Heartbeat.pool["events"], each a map

    {"seq": n, "age_ms": ms since it happened, "kind": "loaded", "model": "m", "reason": "demand",
     "seconds": 1.25[, "error": why a load failed]}

Ages, not wall-clock times: clocks of different hosts are not comparable. A broker keeps each event
once (by pool id and seq: broker/pool_events.py), counts it in /metrics, and reports its latest
events in STATUS, where ddml-status turns their ages into its own wall-clock times.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ddml_common.protocol import MAX_POOL_EVENTS, MAX_TEXT_LEN

_REASON_LEN = 300  # an event's reason or error, as a worker sends it (a load's error can be long)
# /metrics labels a reason by its first word, one of these (else "other"): a peer must not grow label values.
REASON_LABELS = frozenset(("demand", "min-replicas", "idle", "evicted", "operator"))


class EventKind(enum.Enum):
    LOAD = "load"  # a load started
    LOADED = "loaded"  # ... and finished: `seconds` is the load time
    LOAD_FAILED = "load_failed"  # ... or failed: `seconds` until it did, `error` why
    UNLOAD = "unload"  # an unload started: the model is no longer offered, and drains
    UNLOADED = "unloaded"  # ... and its handler is gone: `seconds` is the drain time


@dataclass(frozen=True, slots=True)
class PoolEvent:
    seq: int  # the worker's count of its events: a broker keeps each event once
    kind: EventKind
    model: str
    reason: str  # the placement's: "demand", "min-replicas", "idle", "evicted for M", ...
    at: float  # when it happened, on the holder's monotonic clock
    seconds: float = 0.0
    error: str = ""

    def to_wire(self, now: float) -> dict:
        wire = {"seq": self.seq, "age_ms": max(0, int((now - self.at) * 1000)), "kind": self.kind.value,
                "model": self.model, "reason": self.reason, "seconds": round(self.seconds, 3)}
        if self.error:
            wire["error"] = self.error
        return wire

    @staticmethod
    def from_wire(entry: dict, now: float) -> PoolEvent | None:
        """An event that decode() checked (ddml_common/protocol.py); None for a kind this version does not know."""
        try:
            kind = EventKind(entry["kind"])
        except ValueError:
            return None
        return PoolEvent(entry["seq"], kind, entry["model"], entry["reason"], now - entry["age_ms"] / 1000,
                         entry["seconds"], entry.get("error", ""))

    @property
    def reason_label(self) -> str:
        """The reason as a /metrics label: its first word, from a fixed set."""
        first = self.reason.split(" ", 1)[0]
        return first if first in REASON_LABELS else "other"


class EventLog:
    """A pool worker's latest events. Written by its placement thread, read by its I/O thread."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque[PoolEvent] = deque(maxlen=MAX_POOL_EVENTS)
        self._seq = 0

    def record(self, kind: EventKind, model: str, reason: str, seconds: float = 0.0, error: str = "") -> PoolEvent:
        seconds = seconds if math.isfinite(seconds) and seconds > 0 else 0.0
        with self._lock:
            self._seq += 1
            event = PoolEvent(self._seq, kind, model, reason[:_REASON_LEN], self._clock(), seconds,
                              error[:_REASON_LEN])
            self._events.append(event)
        return event

    def wire(self) -> list[dict]:
        """The events of the last ttl_s, for a heartbeat: sent on several, so that one lost costs none."""
        now = self._clock()
        with self._lock:
            return [e.to_wire(now) for e in self._events if now - e.at <= self._ttl_s]

