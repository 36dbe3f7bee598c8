"""The figures the broker keeps, and the snapshot it describes itself in. Pure: times come in as `now`.

The core keeps each count once, as a plain int in a plain record (one ModelStats per model;
the broker-wide counts in BrokerCore.stats; per-worker figures in WorkerState), written only by
the broker's thread. `BrokerCore.describe(now)` copies them into a BrokerSnapshot, which feeds
STATUS (so ddml-status) and /metrics alike. The snapshot is never mutated once built, so the
scrape thread may read the one the broker thread last handed over without a lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field

from ddml_common import protocol

_RATE_WINDOW_S = 10.0  # window over which a model's drain rate is measured (for Retry-After)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)  # a model's load, a wait for one


@dataclass(frozen=True, slots=True)
class HistogramFigures:
    """A histogram at one moment: the count in each bucket (not cumulative; the last is +Inf)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """Bucket counts in a list: a fraction of a microsecond per observation, on the broker's thread."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value

    def figures(self) -> HistogramFigures:
        return HistogramFigures(self.bounds, tuple(self.counts), self.sum)


class ModelStats:
    """Per-model figures for status, /metrics and Retry-After."""

    def __init__(self) -> None:
        self.batches = 0
        self.items = 0
        self.batch_sizes: Counter[int] = Counter()  # also the batch-size histogram: see histograms()
        self.outcomes: Counter[str] = Counter()  # "ok" or an ErrorCode value
        self.redispatched = 0
        self.queue_wait = Histogram(SECONDS_BUCKETS)  # per input: enqueued to dispatched
        self.batch_latency = Histogram(SECONDS_BUCKETS)  # per batch: dispatched to its last answer
        # Pool workers (broker/pool_events.py): loads by (reason, "ok" or "failed"), unloads by reason,
        # each successful load's time, and each request's wait for a load (enqueued with no replica loaded).
        self.pool_loads: Counter[tuple[str, str]] = Counter()
        self.pool_unloads: Counter[str] = Counter()
        self.load_seconds = Histogram(LOAD_SECONDS_BUCKETS)
        self.cold_start_wait = Histogram(LOAD_SECONDS_BUCKETS)
        self._completions: deque[tuple[float, int]] = deque()  # (at, items) within the window

    def record_dispatch(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.batch_sizes[size] += 1

    def record_completion(self, size: int, now: float) -> None:
        self._completions.append((now, size))
        while self._completions and self._completions[0][0] < now - _RATE_WINDOW_S:
            self._completions.popleft()

    def items_per_s(self, now: float) -> float:
        recent = [n for at, n in self._completions if at >= now - _RATE_WINDOW_S]
        return sum(recent) / _RATE_WINDOW_S

    def describe(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "outcomes": dict(self.outcomes),
            "redispatched": self.redispatched,
            **({"pool_loads": _by_outcome(self.pool_loads)} if self.pool_loads else {}),
            **({"pool_unloads": dict(sorted(self.pool_unloads.items()))} if self.pool_unloads else {}),
        }

    def histograms(self) -> dict[str, HistogramFigures]:
        """Those with at least one observation, by name: batch_size, queue_wait_seconds, batch_latency_seconds,
        load_seconds, cold_start_wait_seconds."""
        sizes = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
        for size, count in self.batch_sizes.items():
            sizes[bisect_left(BATCH_SIZE_BUCKETS, size)] += count
        every = {
            "batch_size": HistogramFigures(BATCH_SIZE_BUCKETS, tuple(sizes), float(self.items)),
            "queue_wait_seconds": self.queue_wait.figures(),
            "batch_latency_seconds": self.batch_latency.figures(),
            "load_seconds": self.load_seconds.figures(),
            "cold_start_wait_seconds": self.cold_start_wait.figures(),
        }
        return {name: figures for name, figures in every.items() if figures.count}


def _by_outcome(loads: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{("demand", "ok"): 2} as {"ok": {"demand": 2}}."""
    nested: dict[str, dict[str, int]] = {}
    for (reason, outcome), count in sorted(loads.items()):
        nested.setdefault(outcome, {})[reason] = count
    return nested


@dataclass(frozen=True, slots=True)
class BrokerSnapshot:
    """Everything the broker reports about itself, at one moment. Built fresh; never mutated."""

    instance_id: str
    models: dict[str, dict]  # per model: STATUS's figures (workers, queues, ModelStats.describe())
    workers: list[dict]  # per worker: WorkerState.describe()
    stats: dict[str, int]  # broker-wide counts, and in_flight_requests
    histograms: dict[str, dict[str, HistogramFigures]]  # per model: ModelStats.histograms()
    pool_events: list[dict] = field(default_factory=list)  # the latest pool events (broker/pool_events.py)

    def status(self, request_id: str) -> protocol.Status:
        return protocol.Status(request_id=request_id, instance_id=self.instance_id, models=self.models,
                               workers=self.workers, stats=self.stats, pool_events=self.pool_events)
