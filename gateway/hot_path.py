"""The predict route's usual request, answered without Falcon's per-request machinery.

GatewayApp is the gateway's falcon.asgi.App. A request to POST /v1/models/{model}/predict that is
the usual kind (below) it answers itself, with the steps Falcon, RequestMiddleware and
PredictResource take for it, by the same functions (the head's limits, the request id, the body's
checks, PredictResource.checked(), the broker client, the catalog's X-Model-Version, the error
handlers, the log line, metrics.count()) and with the same bytes out: the same status, headers in
the same order, the same body. What it skips is Falcon's Request (a dict of every header), the
router, the middleware's two awaited calls and their context attributes, the Response's
rendering: a fifth of the gateway's own CPU per request outside the transport (bench/gateway_parts.py;
the figure is in the commit that added this).

Every other request, and a predict request that is not the usual kind, goes to Falcon, untouched;
so does one refused before the broker is asked (a bad body, an invalid X-Request-ID, a head over
its limits, ...): Falcon then answers it as it always has, from the beginning, the body handed on
as it came. Nothing is counted or logged for it here. The usual kind:
- no bearer tokens (--api-key-file) and no spans (--otlp-endpoint) in this gateway;
- the method POST, the path /v1/models/<one non-empty segment>/predict;
- the whole body in the first ASGI message (uvicorn's, for a body that arrived with its head);
- an Accept that chooses JSON without parsing it (none, */*, application/json);
- Content-Type, Content-Length, Accept, X-Request-ID, traceparent and tracestate sent once each
  at most (Falcon joins repeated ones).
"""

from __future__ import annotations

import time
from typing import Any

import falcon
import falcon.asgi

from ddml_common import tracing
from gateway import metrics
from gateway.asgi_server import check_head
from gateway.broker_error import BrokerError
from gateway.catalog import check_model_name
from gateway.errors import handle_broker_error, handle_unexpected
from gateway.request_ids import log_answer, new_request_id, valid_request_id
from gateway.resources import _JSON_ACCEPTS, PredictResource, parse_body, render_json

ROUTE = "/v1/models/{model}/predict"
_PREFIX, _SUFFIX = "/v1/models/", "/predict"
_JSON_TYPE = (b"content-type", falcon.MEDIA_JSON.encode())
_NOTHING = object()  # no outputs yet
_HEADERS = frozenset({b"content-type", b"content-length", b"accept", b"x-request-id", b"traceparent", b"tracestate"})


class GatewayApp(falcon.asgi.App):
    """falcon.asgi.App, answering the predict route's usual request itself (see the module's docstring)."""

    # The route's resource, where this app may answer it (create_app: without bearer tokens); else None.
    predict: PredictResource | None = None

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[override]
        model = self._model_of(scope)
        if model is None:
            return await super().__call__(scope, receive, send)
        headers = _headers_of(scope)
        if headers is None:
            return await super().__call__(scope, receive, send)
        first = await receive()
        if (first["type"] != "http.request" or first.get("more_body", False)
                or not await self._answer(scope, model, headers, first.get("body", b""), send)):
            await super().__call__(scope, _replay(first, receive), send)

    def _model_of(self, scope: dict) -> str | None:
        """The model a request this app may answer itself names, else None."""
        if self.predict is None or scope["type"] != "http" or scope["method"] != "POST" or tracing.enabled():
            return None
        path = scope["path"]
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            return None
        model = path[len(_PREFIX):-len(_SUFFIX)]
        return model if model and "/" not in model else None

    async def _answer(self, scope: dict, model: str, headers: dict[bytes, bytes], data: bytes, send) -> bool:
        """Answer the request, or leave it to Falcon (False) if it is refused before the broker is asked."""
        started_at = time.perf_counter()  # RequestMiddleware's start: after the head's limits and the trace
        given = headers.get(b"x-request-id")
        if given is None:
            request_id = new_request_id()
        else:
            request_id = given.decode("latin-1")
            if not valid_request_id(request_id):
                return False
        accept = headers.get(b"accept")
        if (None if accept is None else accept.decode("latin-1")) not in _JSON_ACCEPTS:
            return False
        resource = self.predict
        try:
            length = headers.get(b"content-length")
            if length is not None and not (length.isdigit() and int(length) == len(data)):
                return False  # read_body's refusals (too large, cut short) and Falcon's (not a number)
            if len(data) > resource.config.max_body_bytes:
                return False
            check_model_name(model)
            content_type = headers.get(b"content-type")
            body = parse_body(None if content_type is None else content_type.decode("latin-1"), data)
            traceparent = headers.get(b"traceparent")
            if traceparent is not None:  # tracing.begin(), without spans
                tracestate = headers.get(b"tracestate")
                tracing.set_current(tracing.incoming(traceparent.decode("latin-1"),
                                                     None if tracestate is None else tracestate.decode("latin-1")))
            inputs, timeout_s, priority = await resource.checked(model, body)
        except Exception:  # noqa: BLE001 (Falcon's to answer, from the beginning)
            return False
        outputs = _NOTHING
        try:
            outputs = await resource.broker.request(model, inputs, timeout_s=timeout_s, priority=priority,
                                                    request_id_prefix=request_id)
            version = resource.catalog.version_served(model)  # the catalog's mark_version()
            body = render_json({"model": model, "outputs": outputs})
        except Exception as error:  # as Falcon's error handlers (gateway/app.py) answer it, on a Response
            status, head, body = self._refusal(scope["path"], model, outputs is not _NOTHING, request_id, error)
        else:  # the headers as Falcon orders them: the resource's, then the middleware's, then Content-Length
            status = 200
            head = [_JSON_TYPE, (b"x-request-id", request_id.encode("latin-1")), (b"content-length", b"%d" % len(body))]
            if version is not None:
                head.insert(0, (b"x-model-version", version.encode("latin-1")))
        log_answer(request_id, "POST", scope["path"], status, started_at, body)  # RequestMiddleware's
        metrics.count(ROUTE, "POST", status, started_at)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})
        return True


    def _refusal(self, path: str, model: str, answered: bool, request_id: str,
                 error: Exception) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body) of an error raised once the broker was asked, as Falcon answers it."""
        resp = self._response_type(options=self.resp_options)
        if answered:  # the error came after the answer: the resource had marked the version
            self.predict.catalog.mark_version(resp, model)
        if isinstance(error, BrokerError):
            handle_broker_error(_Target(path), resp, error, {})
        else:
            handle_unexpected(_Target(path), resp, error, {})
        resp.set_header("X-Request-ID", request_id)
        body = resp.data
        resp.set_header("Content-Length", str(len(body)))
        return resp.status_code, [(name.encode("latin-1"), value.encode("latin-1"))
                                  for name, value in resp.headers.items()], body


class _Target:
    """What the error handlers read of a request: its method and path."""

    __slots__ = ("path",)
    method = "POST"

    def __init__(self, path: str):
        self.path = path


def _headers_of(scope: dict) -> dict[bytes, bytes] | None:
    """The headers the predict route reads, by name; None when the head is over a limit of check_head's
    or one of them is repeated (Falcon's to answer)."""
    headers = scope["headers"]
    if type(headers) is not list:  # any iterable, as ASGI allows (uvicorn's is a list): read once, kept for Falcon
        headers = scope["headers"] = [tuple(header) for header in headers]
    try:
        check_head(scope)
    except falcon.HTTPError:
        return None
    found = {}
    for name, value in headers:
        if name in _HEADERS:
            if name in found:
                return None
            found[name] = value
    return found


def _replay(first: dict, receive):
    """receive(), giving `first` (the message already taken) first."""
    taken: list[Any] = [first]

    async def replayed() -> dict:
        return taken.pop() if taken else await receive()

    return replayed
