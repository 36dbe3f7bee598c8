"""HTTP metrics for the gateway at /metrics, correct across gunicorn's processes.

With PROMETHEUS_MULTIPROC_DIR set (ddml-gateway sets it to a fresh directory), every gunicorn
process writes its samples there and any process's /metrics merges them all (prometheus_client's
multiprocess mode), so a scrape that lands on any process sees the whole gateway.

Every label value comes from a fixed set, whatever clients send: the route is the matched URI
template or "unmatched", the method one of METHODS or "other", the status a number Falcon chose.
"""

from __future__ import annotations

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
    route = req.uri_template or "unmatched"  # the template, never the raw path
    method = req.method if req.method in METHODS else "other"
    key = (route, method, resp.status_code)
    children = _children.get(key)
    if children is None:  # labels() looks the child up under a lock each time: once per key, here
        labels = (route, method, str(key[2]))
        children = _children[key] = (HTTP_REQUESTS.labels(*labels), HTTP_DURATION.labels(*labels))
    children[0].inc()
    children[1].observe(time.perf_counter() - started_at)


# (route, method, status) -> the two metrics' children: a fixed set of keys, as the labels are
_children: dict[tuple[str, str, int], tuple] = {}


class MetricsResource:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(registry)
