"""W3C trace context on every HTTP route (ddml_common/tracing.py says what travels and which spans exist).

TraceMiddleware reads `traceparent` and `tracestate`, and leaves them where BrokerClient reads
them for this request's thread. With --otlp-endpoint it also wraps the request in a SERVER span
(named "METHOD route-template") and sends that span on as the parent. An invalid traceparent is
ignored, as W3C says: the request goes on without one.
"""

from __future__ import annotations

import falcon

from ddml_common import tracing


# The WSGI names of the two headers: req.env.get() finds them as req.get_header() does, without its
# name mangling and its KeyError when the header is absent (the usual case: a few µs a request).
_TRACEPARENT_ENV = "HTTP_" + tracing.TRACEPARENT_HEADER.upper()
_TRACESTATE_ENV = "HTTP_" + tracing.TRACESTATE_HEADER.upper()


class TraceMiddleware:
    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        traceparent = req.env.get(_TRACEPARENT_ENV)
        if traceparent is None and not tracing.enabled():
            return  # nothing to carry: the context is already empty (process_response empties it)
        trace = tracing.incoming(traceparent, req.env.get(_TRACESTATE_ENV))
        if tracing.enabled():
            span = req.context.trace_span = tracing.ServerSpan()
            trace = span.start(req.method, trace, {"http.request.method": req.method, "url.path": req.path[:200]})
        tracing.set_current(trace)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        if req.env.get(_TRACEPARENT_ENV) is None and not tracing.enabled():
            return  # process_request set nothing
        tracing.set_current(None)  # request threads are reused
        span = req.context.get("trace_span")
        if span is not None:
            status = resp.status_code
            span.end(f"{req.method} {req.uri_template or 'unmatched'}",
                     {"http.response.status_code": status, "ddml.request_id": req.context.get("request_id", "")},
                     error=f"HTTP {status}" if status >= 500 else None)
