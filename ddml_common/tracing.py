"""The caller's W3C trace context, carried through ddml, and OTLP spans when --otlp-endpoint is set.

A request may carry `traceparent` and `tracestate` (HTTP headers, or gRPC metadata). The gateway
sends them on the wire (protocol.Request.trace), the broker copies them into the batch with how
long the input queued (protocol.Batch.traces), and the worker sees them with its batch. Without
--otlp-endpoint that is all: the context passes through unchanged, and nothing here imports
opentelemetry (the packages are the optional extra `ddml[otel]`).

With --otlp-endpoint (an OTLP/HTTP collector, e.g. http://collector:4318; /v1/traces is added
unless the URL already ends in it), the gateway exports a SERVER span per request, child of the
caller's span (or the root of a new trace), and sends its own span on as the parent. A worker
exports, for each traced request in a batch, three spans under that gateway span:

    ddml.broker.queue     from when the broker queued the input to when the worker received it
                          (the broker's measured wait, carried in the batch; the broker itself
                          exports nothing, so its loop stays free of exporters and clocks)
    ddml.worker.batch     the batch, from its arrival at the worker to its result
      ddml.worker.forward   the model's forward pass (predict) inside it

A continuous worker (--continuous) runs a request's inputs in whichever passes take them: its
ddml.worker.batch span lasts from the batch's arrival to the end of the pass that answers the
request's last input, with a ddml.worker.forward span for each pass that ran any of them
(HeldSpans).

Spans go out through OpenTelemetry's BatchSpanProcessor: a background thread, started lazily in
the process that first makes a span (so, after gunicorn's fork).
"""

from __future__ import annotations

import contextvars
import os
import re
import threading
from typing import Any

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
# version 00: 2 hex, trace id 32 hex (not all zeros), parent id 16 hex (not all zeros), flags 2 hex. A
# later version may add fields after these, which a parser of version 00 ignores (W3C trace context).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_TRACESTATE_CHARS = 512

# The trace that a request being handled on this thread sends on to the broker: [traceparent,
# tracestate], or None. The gateway sets it per request; BrokerClient reads it.
_current: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ddml_trace", default=None)


def parse_traceparent(value: Any) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid traceparent, else None (W3C: then ignore it)."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    return trace_id, span_id, int(flags, 16)


def incoming(traceparent: Any, tracestate: Any) -> list[str] | None:
    """The context to carry, from the caller's two values: [traceparent, tracestate], or None when
    there is no valid traceparent. An over-long tracestate is dropped, as W3C allows."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    state = tracestate.strip() if isinstance(tracestate, str) else ""
    if len(state) > _MAX_TRACESTATE_CHARS:
        state = ""
    return [f"00-{trace_id}-{span_id}-{flags:02x}", state]


def current_trace() -> list[str]:
    """What the request being handled on this thread sends to the broker (empty: no trace)."""
    return _current.get() or []


def set_current(trace: list[str] | None) -> None:
    _current.set(trace)


# --------------------------------------------------------------------------- spans (optional)

_lock = threading.Lock()
# configure() leaves these in the environment too, so that processes it starts (a supervised worker's)
# export the same way.
_ENDPOINT_VARIABLE, _SERVICE_VARIABLE = "DDML_TRACING_OTLP_ENDPOINT", "DDML_TRACING_SERVICE"
_endpoint: str | None = os.environ.get(_ENDPOINT_VARIABLE) or None
_service: str = os.environ.get(_SERVICE_VARIABLE, "ddml")
_tracer = None
_tracer_pid = 0
_provider = None


def configure(endpoint: str | None, service: str) -> None:
    """Export spans to this OTLP/HTTP endpoint from now on (None: no spans). Imports nothing yet."""
    global _endpoint, _service, _tracer
    with _lock:
        _endpoint = traces_url(endpoint) if endpoint else None
        _service = service
        _tracer = None
        if _endpoint:
            os.environ[_ENDPOINT_VARIABLE], os.environ[_SERVICE_VARIABLE] = _endpoint, service
        else:
            os.environ.pop(_ENDPOINT_VARIABLE, None)


def traces_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


_PACKAGES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


def missing_package() -> str | None:
    """The first package that --otlp-endpoint needs and this environment lacks (pip install 'ddml[otel]')."""
    return first_missing(_PACKAGES)


def first_missing(modules: tuple[str, ...]) -> str | None:
    import importlib.util

    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:  # a parent package is missing
            return module
    return None


def enabled() -> bool:
    return _endpoint is not None


def tracer():
    """This process's tracer (built on first use here: after a fork, a new one), or None when off."""
    global _tracer, _tracer_pid, _provider
    if _endpoint is None:
        return None
    if _tracer is not None and _tracer_pid == os.getpid():
        return _tracer
    with _lock:
        if _tracer is None or _tracer_pid != os.getpid():
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create({"service.name": _service}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_endpoint)))
            _tracer, _tracer_pid, _provider = provider.get_tracer("ddml"), os.getpid(), provider
    return _tracer


def shutdown() -> None:
    """Send the spans still held (at exit)."""
    if _provider is not None and _tracer_pid == os.getpid():
        _provider.shutdown()


def _context(trace: list[str] | None):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not trace:
        return None
    carrier = {TRACEPARENT_HEADER: trace[0]}
    if trace[1]:
        carrier[TRACESTATE_HEADER] = trace[1]
    return TraceContextTextMapPropagator().extract(carrier)


def _traceparent_of(span, tracestate: str) -> list[str]:
    context = span.get_span_context()
    return [f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}", tracestate]


class ServerSpan:
    """The gateway's span of one request (HTTP or gRPC). start() returns what to send on."""

    __slots__ = ("_span",)

    def __init__(self) -> None:
        self._span = None

    def start(self, name: str, trace: list[str] | None, attributes: dict) -> list[str] | None:
        active = tracer()
        if active is None:
            return trace
        from opentelemetry.trace import SpanKind

        self._span = active.start_span(name, context=_context(trace), kind=SpanKind.SERVER, attributes=attributes)
        return _traceparent_of(self._span, trace[1] if trace else "")

    def end(self, name: str, attributes: dict, error: str | None = None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.update_name(name)
        span.set_attributes(attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def worker_batch_spans(batch_id: int, traces: dict, received_ns: int, started_ns: int, forward_ns: tuple[int, int],
                       ended_ns: int, size: int, model: str = "") -> None:
    """The worker's spans for each traced request of one batch (see the module's docstring)."""
    active = tracer()
    if active is None or not traces:
        return
    from opentelemetry.trace import set_span_in_context

    attributes = {"ddml.batch_id": batch_id, "ddml.batch_size": size}
    if model:
        attributes["ddml.model"] = model
    for request_id, (traceparent, tracestate, queued_ms) in traces.items():
        parent = _context([traceparent, tracestate])
        queued_from = received_ns - queued_ms * 1_000_000
        active.start_span("ddml.broker.queue", context=parent, start_time=queued_from,
                          attributes={"ddml.request_id": request_id, "ddml.queued_ms": queued_ms}).end(received_ns)
        batch_span = active.start_span("ddml.worker.batch", context=parent, start_time=received_ns,
                                       attributes={**attributes, "ddml.request_id": request_id})
        active.start_span("ddml.worker.forward", context=set_span_in_context(batch_span), start_time=forward_ns[0],
                          attributes=attributes).end(forward_ns[1])
        batch_span.end(max(ended_ns, started_ns))


class HeldSpans:
    """A continuous worker's spans for the traced requests of one batch, whose inputs run in any
    number of passes, in any lanes. start() when the batch is prepared; passed() after each pass
    that ran some of its inputs. Callers serialise passed() (the worker calls it under its lock)."""

    def __init__(self, batch_id: int, traces: dict, received_ns: int, kept: dict[str, int]):
        """`kept`: request id -> how many of its inputs the worker holds (those not answered at once)."""
        self._open: dict[str, list] = {}  # request id -> [its batch span, inputs not answered yet]
        active = tracer()
        if active is None:
            return
        for request_id, (traceparent, tracestate, queued_ms) in traces.items():
            parent = _context([traceparent, tracestate])
            active.start_span("ddml.broker.queue", context=parent, start_time=received_ns - queued_ms * 1_000_000,
                              attributes={"ddml.request_id": request_id, "ddml.queued_ms": queued_ms}).end(received_ns)
            span = active.start_span("ddml.worker.batch", context=parent, start_time=received_ns,
                                     attributes={"ddml.batch_id": batch_id, "ddml.request_id": request_id,
                                                 "ddml.continuous": True})
            if kept.get(request_id):
                self._open[request_id] = [span, kept[request_id]]
            else:
                span.end(received_ns)  # each of its inputs was answered as it arrived

    def __bool__(self) -> bool:
        return bool(self._open)

    def passed(self, answered: dict[str, int], forward_ns: tuple[int, int], size: int) -> None:
        """A pass of `size` inputs, `answered` of them (request id -> count) from this batch, ran
        from forward_ns[0] to forward_ns[1] (wall clock): a forward span for each of its requests,
        and the end of a request's batch span with its last input."""
        active = tracer()
        if active is None:
            return
        from opentelemetry.trace import set_span_in_context

        for request_id, count in answered.items():
            held = self._open.get(request_id)
            if held is None:
                continue
            span = held[0]
            active.start_span("ddml.worker.forward", context=set_span_in_context(span), start_time=forward_ns[0],
                              attributes={"ddml.pass_size": size, "ddml.inputs": count}).end(forward_ns[1])
            held[1] -= count
            if held[1] <= 0:
                span.end(forward_ns[1])
                del self._open[request_id]
