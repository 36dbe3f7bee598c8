"""Broker configuration: frozen dataclasses with units in field names, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchingConfig:
    max_wait_s: float = 0.0  # hold a partial batch this long for it to fill; 0 = dispatch at once
    max_queue: int = 10_000  # waiting requests per model before OVERLOADED
    max_queue_bytes: int = 1 << 30  # encoded inputs waiting per model before OVERLOADED
    max_attempts: int = 2  # executions of one input before it fails with WORKER_LOST
    max_batch_tokens: int = 0  # cap on sum of size hints × max in a batch; 0 = count cap only
    refill_wait_max_s: float = 0.2  # cap on the refill hold (batching.py, _refill_hold_until); 0 = off

    def __post_init__(self) -> None:
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.refill_wait_max_s < 0:
            raise ValueError(f"refill_wait_max_s must be >= 0, got {self.refill_wait_max_s}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be >= 1, got {self.max_queue_bytes}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_s: float = 1.0  # heartbeats both ways
    liveness: int = 3  # missed intervals before a peer is declared dead
    batch_timeout_floor_s: float = 10.0  # a batch may always take this long
    batch_timeout_factor: float = 5.0  # ... or this many times the worker's recent batch latency

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.liveness < 1:
            raise ValueError(f"liveness must be >= 1, got {self.liveness}")
        if self.batch_timeout_floor_s <= 0:
            raise ValueError(f"batch_timeout_floor_s must be > 0, got {self.batch_timeout_floor_s}")

    @property
    def expiry_s(self) -> float:
        return self.interval_s * self.liveness


@dataclass(frozen=True)
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"  # gateways and clients connect here
    backend: str = "tcp://127.0.0.1:5556"  # workers connect here
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    drain_timeout_s: float = 30.0  # on SIGTERM: answer what is held for at most this long
    curve_secret_key: str | None = None  # the broker's .key_secret; None = no transport security
    authorized_workers: str | None = None  # directory of worker public keys (backend)
    authorized_clients: str | None = None  # directory of gateway/client public keys (frontend)
