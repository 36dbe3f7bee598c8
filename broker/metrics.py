"""Prometheus metrics for the broker, served on --metrics-port.

The broker thread counts requests and fills histograms inline, in plain Python objects
(_Counts, _Histograms) that cost a fraction of a microsecond per update: prometheus_client's
own metrics take a lock and cost 2 to 3 µs each, and at 20,000 requests/s the broker's budget
is 50 µs a request in all. The scrape thread reads copies of them. Gauges for queues and
workers come from a status snapshot that the broker thread publishes at most twice a second;
the scrape thread only reads the latest one, so it never walks live state. Per-worker
figures arrive in heartbeats, so one scrape target describes a whole cluster, including
workers behind NAT on other hosts.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WORKER_STATES = ("idle", "busy", "draining")


class Histogram:
    """One labelled histogram: bucket counts in a list. Only the broker thread writes it."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value


class _Histograms:
    """A histogram family labelled by model."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]):
        self.name, self.documentation, self.bounds = name, documentation, bounds
        self._children: dict[str, Histogram] = {}

    def labels(self, model: str) -> Histogram:
        child = self._children.get(model)
        if child is None:
            child = self._children[model] = Histogram(self.bounds)
        return child

    def forget(self, model: str) -> None:
        self._children.pop(model, None)

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, child in list(self._children.items()):  # list(): one atomic copy under the GIL
            counts, total, cumulative, buckets = list(child.counts), child.sum, 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # as prometheus_client writes "le"
            family.add_metric([model], buckets, total)
        return family


class _Counts:
    """A counter family: plain ints by label values. Only the broker thread writes it."""

    def __init__(self, name: str, documentation: str, labels: list[str]):
        self.name, self.documentation, self.label_names = name, documentation, labels
        self._values: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0) + 1

    def forget(self, first_label: str) -> None:
        for labels in [labels for labels in self._values if labels[0] == first_label]:
            del self._values[labels]

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, value in list(self._values.items()):
            family.add_metric(list(labels), value)
        return family


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = _Counts("ddml_requests", "Requests answered, by outcome (ok or an error code)",
                                ["model", "outcome"])
        self.batch_size = _Histograms("ddml_batch_size", "Inputs per dispatched batch", _BATCH_SIZE_BUCKETS)
        self.queue_wait = _Histograms("ddml_queue_wait_seconds", "Time an input waited before dispatch",
                                      _SECONDS_BUCKETS)
        self.batch_latency = _Histograms("ddml_batch_latency_seconds", "Dispatch to result, per batch",
                                         _SECONDS_BUCKETS)
        self.redispatched = Counter("ddml_redispatched_inputs", "Inputs dispatched again after a failure",
                                    ["model"], registry=self.registry)
        self.malformed = Counter("ddml_malformed_messages", "Messages dropped as malformed", registry=self.registry)
        self._snapshot: dict = {"models": {}, "workers": []}
        self.registry.register(_SnapshotCollector(self))
        self._children: dict = {}

    def child(self, metric, *labels: str):
        """metric.labels(*labels), cached: labels() costs about 6 µs, and the hot path calls it per request."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def forget_model(self, model: str) -> None:
        """Drop every series of a model the broker no longer remembers, so labels stay bounded."""
        self.requests.forget(model)
        for family in (self.batch_size, self.queue_wait, self.batch_latency):
            family.forget(model)
        try:
            self.redispatched.remove(model)
        except KeyError:
            pass
        self._children.pop((id(self.redispatched), (model,)), None)

    def publish(self, status: dict) -> None:
        """Called by the broker thread with a fresh status; replaces, never mutates."""
        self._snapshot = status


class _SnapshotCollector:
    def __init__(self, metrics: BrokerMetrics):
        self._metrics = metrics

    def collect(self):
        metrics = self._metrics
        yield from (metrics.requests.collect(), metrics.batch_size.collect(), metrics.queue_wait.collect(),
                    metrics.batch_latency.collect())
        snapshot = metrics._snapshot
        depth = GaugeMetricFamily("ddml_queue_depth", "Requests waiting, per model", labels=["model"])
        items = GaugeMetricFamily("ddml_queue_inputs", "Inputs waiting, per model", labels=["model"])
        oldest = GaugeMetricFamily("ddml_queue_oldest_wait_seconds", "Age of the oldest waiting input",
                                   labels=["model"])
        workers = GaugeMetricFamily("ddml_workers", "Live workers by state", labels=["model", "state"])
        for model, info in snapshot["models"].items():
            depth.add_metric([model], info["queued_requests"])
            items.add_metric([model], info["queued_items"])
            oldest.add_metric([model], info["oldest_wait_s"])
            for state in WORKER_STATES:
                count = sum(1 for w in snapshot["workers"] if model in w["models"] and w["state"] == state)
                workers.add_metric([model, state], count)
        labels = ["worker", "host", "device", "model"]
        info = GaugeMetricFamily("ddml_worker_info", "One per live worker", labels=labels)
        batches = CounterMetricFamily("ddml_worker_batches", "Batches the worker computed (its own count)",
                                      labels=labels)
        inputs = CounterMetricFamily("ddml_worker_inputs", "Inputs the worker computed (its own count)",
                                     labels=labels)
        latency = GaugeMetricFamily("ddml_worker_mean_batch_latency_seconds", "Mean compute time per batch",
                                    labels=labels)
        in_flight = GaugeMetricFamily("ddml_worker_in_flight_inputs", "Inputs dispatched, not yet answered",
                                      labels=labels)
        memory = GaugeMetricFamily("ddml_worker_cuda_memory_allocated_bytes", "CUDA memory in use",
                                   labels=labels)
        heartbeat_age = GaugeMetricFamily("ddml_worker_heartbeat_age_seconds", "Since the worker was last heard",
                                          labels=labels)
        for worker in snapshot["workers"]:
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
        yield from (depth, items, oldest, workers, info, batches, inputs, latency, in_flight, memory, heartbeat_age)
