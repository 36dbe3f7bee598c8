"""HTTP metrics for the gateway at /metrics, correct across gunicorn's processes.

With PROMETHEUS_MULTIPROC_DIR set (ddml-gateway sets it to a fresh directory), every gunicorn
process writes its samples there (a loop turn's at the turn's end: count()) and any process's
/metrics merges them all (prometheus_client's multiprocess mode), so a scrape that lands on any
process sees the whole gateway.

Every label value comes from a fixed set, whatever clients send: the route is the matched URI
template or "unmatched", the method one of METHODS or "other", the status a number Falcon chose.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess, values

from gateway.process_id import pid

# In multiprocess mode every increment asks prometheus_client's process identifier (os.getpid() by
# default, a system call: three a request) whether the process forked. The same answer, from a copy
# kept across forks. (Set before any metric is made here, the only module of the gateway that makes any.)
if getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue(process_identifier=pid)

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HTTP_REQUESTS = Counter("ddml_http_requests", "HTTP requests answered, by route, method and status",
                        ["route", "method", "status"])
HTTP_DURATION = Histogram("ddml_http_request_duration_seconds", "Time to answer an HTTP request",
                          ["route", "method", "status"], buckets=_SECONDS_BUCKETS)


def record(req: falcon.Request, resp: falcon.Response) -> None:
    """Count an answered request, and its time since req.context.started_at (gateway/middleware.py
    sets it once the request's head has passed its limits: a request refused before that is not counted)."""
    started_at = getattr(req.context, "started_at", None)
    if started_at is None:
        return
    count(req.uri_template or "unmatched", req.method, resp.status_code, started_at)  # the template, never the raw path


def count(route: str, method: str, status: int, started_at: float) -> None:
    """Count an answered request under its route template, and its time since `started_at` (perf_counter).

    The sample is kept here and written into the metrics at the end of the event loop's turn
    (flush()), with the turn's other samples: one write per series a turn, where each request made
    three (prometheus_client's multiprocess values: a lock, a fork check and an mmap write each, 1.9 µs
    a request at c64 by bench/gateway_parts.py; 0.65 at 16 requests a turn). The turn ends before
    this process reads its next request, and /metrics flushes this process's samples first: a scrape
    sees every request answered before it (another process's, once that process's turn has ended,
    microseconds after the answer was written)."""
    global _flush_in
    key = (route, method if method in METHODS else "other", status)
    durations = _pending.get(key)
    if durations is None:
        durations = _pending[key] = []
    durations.append(time.perf_counter() - started_at)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no event loop (a script, a thread): written now
        flush()
        return
    if _flush_in is not loop:  # (a loop that stopped before its flush ran is not this one)
        loop.call_soon(flush)
        _flush_in = loop


def flush() -> None:
    """Write the samples count() kept: per series, the counter once, the histogram's sum once and each
    bucket hit once. The same values observe() one at a time would leave: the counts are whole
    numbers, and the sum is added in the same order, one duration at a time."""
    global _flush_in
    _flush_in = None
    pending = dict(_pending)
    _pending.clear()
    for key, durations in pending.items():
        children = _children.get(key)
        if children is None:  # labels() looks the child up under a lock each time: once per key, here
            labels = (key[0], key[1], str(key[2]))
            children = _children[key] = (HTTP_REQUESTS.labels(*labels), HTTP_DURATION.labels(*labels))
        requests, duration = children
        requests.inc(len(durations))
        total = duration._sum.get()
        hits = [0] * len(duration._buckets)
        for seconds in durations:
            total += seconds
            hits[bisect.bisect_left(duration._upper_bounds, seconds)] += 1  # observe()'s bucket: the first bound >= it
        duration._sum.set(total)
        for bucket, hit in zip(duration._buckets, hits):
            if hit:
                bucket.inc(hit)


# (route, method, status) -> the two metrics' children: a fixed set of keys, as the labels are
_children: dict[tuple[str, str, int], tuple] = {}
# (route, method, status) -> the durations in seconds of the requests answered this turn, not yet written
_pending: dict[tuple[str, str, int], list[float]] = {}
_flush_in: asyncio.AbstractEventLoop | None = None  # the loop a flush() is scheduled in


class MetricsResource:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        flush()  # this process's samples of this turn, before they are read
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(registry)
