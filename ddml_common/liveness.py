"""Is a broker still the one we knew, and do we still hear it? Shared by every peer of a broker.

A worker's link (worker/link.py) and a gateway's link (gateway/links.py) ask the same
two questions of each broker they dial, and answer them the same way:
- **restart**: every broker HEARTBEAT carries its instance id; a new one means the broker
  restarted and forgot whatever it held for us;
- **silence**: a broker heartbeats every interval; nothing at all from it for `liveness`
  intervals means it is dead or cut off (Paranoid Pirate's liveness counter, kept as a time).

Pure: no sockets, no clock; every method takes `now` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass


def broker_endpoints(value: str, flag: str = "--broker") -> list[str]:
    """`--broker A,B`: every broker's endpoint, in order. Refuses an empty list."""
    endpoints = [endpoint.strip() for endpoint in value.split(",") if endpoint.strip()]
    if not endpoints:
        raise ValueError(f"{flag} needs at least one endpoint, got {value!r}")
    return endpoints


@dataclass(slots=True)
class Liveness:
    """One broker as heard from here: who it is, and when we last heard it."""

    silent_after_s: float  # heartbeat interval × liveness
    seen_at: float = -float("inf")  # the last message from it, or the last (re)connect
    heard_at: float = -float("inf")  # the last message from it (reconnects do not count)
    instance_id: str = ""  # "" until its first heartbeat

    def connected(self, now: float) -> None:
        """A fresh socket: give the broker a full silence window to answer it."""
        self.seen_at = now

    def heard(self, now: float) -> None:
        """Any message from the broker."""
        self.seen_at = self.heard_at = now

    def instance(self, instance_id: str) -> bool:
        """A heartbeat's instance id. True when it names another instance than the one we knew:
        the broker restarted (the first one we hear is no restart)."""
        restarted = bool(self.instance_id) and instance_id != self.instance_id
        self.instance_id = instance_id
        return restarted

    def silent(self, now: float) -> bool:
        """Nothing from it (nor a reconnect) for the whole silence window."""
        return now - self.seen_at > self.silent_after_s

    def heard_recently(self, now: float) -> bool:
        """A message from it within the silence window (a reconnect does not count)."""
        return now - self.heard_at <= self.silent_after_s
