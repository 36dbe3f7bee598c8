"""Prometheus metrics for the broker, served on --metrics-port.

The core keeps its counts as plain ints and histograms as plain lists (broker/stats.py): no
lock, a fraction of a microsecond per update on the broker's hot path. This module only
renders. The broker's thread hands it a BrokerSnapshot (`publish`) at most twice a second; a
scrape, on the HTTP server's thread, renders the latest one it was handed, which is never
mutated, so the two threads share nothing else. Per-worker figures arrive in heartbeats, so one
scrape target describes a whole cluster, including workers behind NAT on other hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from broker.stats import BrokerSnapshot, HistogramFigures

WORKER_STATES = ("idle", "busy", "draining")
_HISTOGRAMS = (  # (name in ModelStats.histograms(), metric name, help); the pool's only with pool workers
    ("batch_size", "ddml_batch_size", "Inputs per dispatched batch"),
    ("queue_wait_seconds", "ddml_queue_wait_seconds", "Time an input waited before dispatch"),
    ("batch_latency_seconds", "ddml_batch_latency_seconds", "Dispatch to result, per batch"),
    ("load_seconds", "ddml_model_load_seconds", "A pool worker's load of the model, start to finish"),
    ("cold_start_wait_seconds", "ddml_cold_start_wait_seconds",
     "Enqueued with no replica loaded, to dispatched: a request's wait for a pool worker to load its model"),
)

_POOL_HISTOGRAMS = frozenset(("load_seconds", "cold_start_wait_seconds"))


@dataclass(frozen=True)
class _Published:
    """What a scrape reads, handed over in one assignment."""

    snapshot: BrokerSnapshot
    started_at: float  # wall-clock seconds: the `_created` of the broker-wide counter
    redispatched_since: dict[str, float] = field(default_factory=dict)  # model -> its counter's `_created`


class BrokerMetrics:
    """The broker's Prometheus registry, and the collector that renders the latest snapshot."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        empty = BrokerSnapshot(instance_id="", models={}, workers=[], stats={}, histograms={})
        self._published = _Published(empty, time.time())
        self.registry.register(_SnapshotCollector(self))

    @property
    def snapshot(self) -> BrokerSnapshot:
        return self._published.snapshot

    def publish(self, snapshot: BrokerSnapshot) -> None:
        """Called by the broker's thread; replaces what a scrape reads, never mutates it."""
        before = self._published
        since = {model: before.redispatched_since.get(model) or time.time()
                 for model, info in snapshot.models.items() if info["redispatched"]}
        self._published = _Published(snapshot, before.started_at, since)


class _SnapshotCollector:
    def __init__(self, metrics: BrokerMetrics):
        self._metrics = metrics

    def collect(self):
        published = self._metrics._published  # one read: every family below comes from the same moment
        snapshot = published.snapshot
        yield from _counts(published)
        yield from _histograms(snapshot)
        yield from _queues(snapshot)
        yield from _workers(snapshot)
        yield from _pool(snapshot)


def _counts(published: _Published):
    snapshot = published.snapshot
    requests = CounterMetricFamily("ddml_requests", "Requests answered, by outcome (ok or an error code)",
                                   labels=["model", "outcome"])
    redispatched = CounterMetricFamily("ddml_redispatched_inputs", "Inputs dispatched again after a failure",
                                       labels=["model"])
    for model, info in snapshot.models.items():
        for outcome, count in info["outcomes"].items():
            requests.add_metric([model, outcome], count)
        if info["redispatched"]:
            redispatched.add_metric([model], info["redispatched"], created=published.redispatched_since[model])
    malformed = CounterMetricFamily("ddml_malformed_messages", "Messages dropped as malformed",
                                    value=snapshot.stats.get("malformed", 0), created=published.started_at)
    return requests, redispatched, malformed


def _histograms(snapshot: BrokerSnapshot):
    for key, name, documentation in _HISTOGRAMS:
        family = HistogramMetricFamily(name, documentation, labels=["model"])
        for model, histograms in snapshot.histograms.items():
            if key in histograms:
                family.add_metric([model], _buckets(histograms[key]), histograms[key].sum)
        if family.samples or key not in _POOL_HISTOGRAMS:
            yield family


def _buckets(figures: HistogramFigures) -> list[tuple[str, int]]:
    cumulative, buckets = 0, []
    for bound, count in zip((*figures.bounds, float("inf")), figures.counts):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))  # as prometheus_client writes "le"
    return buckets


def _queues(snapshot: BrokerSnapshot):
    depth = GaugeMetricFamily("ddml_queue_depth", "Requests waiting, per model", labels=["model"])
    items = GaugeMetricFamily("ddml_queue_inputs", "Inputs waiting, per model", labels=["model"])
    oldest = GaugeMetricFamily("ddml_queue_oldest_wait_seconds", "Age of the oldest waiting input", labels=["model"])
    workers = GaugeMetricFamily("ddml_workers", "Live workers by state", labels=["model", "state"])
    for model, info in snapshot.models.items():
        depth.add_metric([model], info["queued_requests"])
        items.add_metric([model], info["queued_items"])
        oldest.add_metric([model], info["oldest_wait_s"])
        for state in WORKER_STATES:
            count = sum(1 for w in snapshot.workers if model in w["models"] and w["state"] == state)
            workers.add_metric([model, state], count)
    return depth, items, oldest, workers


def _workers(snapshot: BrokerSnapshot):
    labels = ["worker", "host", "device", "model"]
    info = GaugeMetricFamily("ddml_worker_info", "One per live worker", labels=labels)
    batches = CounterMetricFamily("ddml_worker_batches", "Batches the worker computed (its own count)", labels=labels)
    inputs = CounterMetricFamily("ddml_worker_inputs", "Inputs the worker computed (its own count)", labels=labels)
    latency = GaugeMetricFamily("ddml_worker_mean_batch_latency_seconds", "Mean compute time per batch",
                                labels=labels)
    in_flight = GaugeMetricFamily("ddml_worker_in_flight_inputs", "Inputs dispatched, not yet answered",
                                  labels=labels)
    memory = GaugeMetricFamily("ddml_worker_cuda_memory_allocated_bytes", "CUDA memory in use", labels=labels)
    heartbeat_age = GaugeMetricFamily("ddml_worker_heartbeat_age_seconds", "Since the worker was last heard",
                                      labels=labels)
    for worker in snapshot.workers:
        values = [worker["worker_id"], worker["host"], worker["device"], ",".join(worker["models"])]
        stats = worker.get("stats") or {}
        info.add_metric(values, 1)
        batches.add_metric(values, stats.get("batches", 0))
        inputs.add_metric(values, stats.get("items", 0))
        latency.add_metric(values, stats.get("mean_batch_latency_ms", 0.0) / 1000)
        in_flight.add_metric(values, worker["in_flight_items"])
        heartbeat_age.add_metric(values, worker["last_heartbeat_age_s"])
        if "cuda_memory_allocated_bytes" in stats:
            memory.add_metric(values, stats["cuda_memory_allocated_bytes"])
    return info, batches, inputs, latency, in_flight, memory, heartbeat_age


# A pool worker's own counts (worker/pool.py's PoolState.figures), by metric: (stat, kind, help).
_POOL_FIGURES = (
    ("pool_loads", CounterMetricFamily, "ddml_worker_pool_loads", "Models the pool worker loaded"),
    ("pool_load_failures", CounterMetricFamily, "ddml_worker_pool_load_failures", "Loads that failed"),
    ("pool_evictions", CounterMetricFamily, "ddml_worker_pool_evictions", "Models unloaded to make room for another"),
    ("pool_unloads", CounterMetricFamily, "ddml_worker_pool_idle_unloads", "Models unloaded after idle-unload-s"),
    ("pool_load_s_total", CounterMetricFamily, "ddml_worker_pool_load_seconds", "Time spent loading models"),
)
_MIB = 1 << 20
_POOL_MEMORY = (  # (stat in MB, metric in bytes, help)
    ("pool_memory_used_mb", "ddml_worker_pool_memory_used_bytes", "Memory its models take (measured on a GPU)"),
    ("pool_memory_budget_mb", "ddml_worker_pool_memory_budget_bytes", "Its --memory-budget-mb, or what the device has"),
)


def _pool(snapshot: BrokerSnapshot):
    """Pool workers (docs/placement.md): replicas per model, and each pool worker's loads and memory."""
    replicas = GaugeMetricFamily("ddml_model_replicas", "Replicas per model, loaded or loading",
                                 labels=["model", "state"])
    for model, info in snapshot.models.items():
        if "replicas" in info:
            replicas.add_metric([model, "loaded"], info["replicas"]["loaded"])
            replicas.add_metric([model, "loading"], info["replicas"]["loading"])
    loads = CounterMetricFamily("ddml_model_loads", "Pool workers' loads of the model, by placement reason and "
                                "outcome (ok, failed)", labels=["model", "reason", "outcome"])
    unloads = CounterMetricFamily("ddml_model_unloads", "Pool workers' unloads of the model, by reason (evicted: "
                                  "to make room for another)", labels=["model", "reason"])
    for model, info in snapshot.models.items():
        for outcome, by_reason in info.get("pool_loads", {}).items():
            for reason, count in by_reason.items():
                loads.add_metric([model, reason, outcome], count)
        for reason, count in info.get("pool_unloads", {}).items():
            unloads.add_metric([model, reason], count)
    families = [kind(name, text, labels=["worker", "host"]) for _, kind, name, text in _POOL_FIGURES]
    memory = [GaugeMetricFamily(name, text, labels=["worker", "host"]) for _, name, text in _POOL_MEMORY]
    for worker in snapshot.workers:
        stats = worker.get("stats") or {}
        if "pool" not in worker:
            continue
        labels = [worker["worker_id"], worker["host"]]
        for (stat, *_), family in zip(_POOL_FIGURES, families):
            family.add_metric(labels, stats.get(stat, 0))
        for (stat, *_), family in zip(_POOL_MEMORY, memory):
            family.add_metric(labels, stats.get(stat, 0) * _MIB)
    # none without pool workers
    return tuple(family for family in (replicas, loads, unloads, *families, *memory) if family.samples)
