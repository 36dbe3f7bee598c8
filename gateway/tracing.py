"""W3C trace context on every HTTP route (ddml_common/tracing.py says what travels and which spans exist).

begin() (gateway/middleware.py calls it for every request) reads `traceparent` and `tracestate`, and leaves them where the broker client reads
them for this request (a context variable: each request runs in its own asyncio task). With --otlp-endpoint it also wraps the request in a SERVER span
(named "METHOD route-template") and sends that span on as the parent. An invalid traceparent is
ignored, as W3C says: the request goes on without one.
"""

from __future__ import annotations

import falcon

from ddml_common import tracing

_TRACEPARENT = tracing.TRACEPARENT_HEADER.lower()
_TRACESTATE = tracing.TRACESTATE_HEADER.lower()


def begin(req: falcon.Request) -> None:
    """Before the route: the request's trace context, and its SERVER span with --otlp-endpoint."""
    traceparent = req.get_header(_TRACEPARENT)
    if traceparent is None and not tracing.enabled():
        return  # nothing to carry: each request's task starts with an empty context
    trace = tracing.incoming(traceparent, req.get_header(_TRACESTATE))
    if tracing.enabled():
        span = req.context.trace_span = tracing.ServerSpan()
        trace = span.start(req.method, trace, {"http.request.method": req.method, "url.path": req.path[:200]})
    tracing.set_current(trace)


def end(req: falcon.Request, resp: falcon.Response) -> None:
    """After the answer: the SERVER span ends, with the route and the status."""
    span = getattr(req.context, "trace_span", None)  # (begin() makes one only with --otlp-endpoint)
    if span is not None:
        status = resp.status_code
        span.end(f"{req.method} {req.uri_template or 'unmatched'}",
                 {"http.response.status_code": status, "ddml.request_id": req.context.get("request_id", "")},
                 error=f"HTTP {status}" if status >= 500 else None)
