"""The gateway's per-request middleware: one Falcon middleware for what every request gets.

Before the route, in this order: the head's limits (414, 431: gateway/asgi_server.py's check_head),
the trace context (gateway/tracing.py), the start time, the request id (gateway/request_ids.py:
400 for an invalid X-Request-ID). After the answer, the reverse: X-Request-ID and the request's log
line, the HTTP metrics (gateway/metrics.py), the SERVER span's end. Falcon runs process_response
even when process_request raised, so a request refused at its head gets an id and no metric (its
start time was never set), and one refused for its X-Request-ID is counted, as when these were
four middlewares.

The predict route's usual request takes these same steps in gateway/hot_path.py, without Falcon.

One middleware, not four, because Falcon awaits each middleware's two methods for every request:
four were eight awaited calls, which cost more than their own work (bench/gateway_parts.py; the
figures are in the commit that merged them).
"""

from __future__ import annotations

import time

import falcon

from gateway import metrics, request_ids, tracing
from gateway.asgi_server import check_head


class RequestMiddleware:
    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        check_head(req.scope)
        tracing.begin(req)
        req.context.started_at = time.perf_counter()
        request_ids.assign(req)

    async def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        request_ids.answer(req, resp)
        metrics.record(req, resp)
        tracing.end(req, resp)
