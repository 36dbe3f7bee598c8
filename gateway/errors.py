"""The one error path of every HTTP surface: ErrorCode -> status, Retry-After and message, once.

An error is a BrokerError (from the broker) or a GatewayError (raised by the gateway itself,
naming the request field at fault when there is one). `http_error()` turns either into an
HttpError: the status from the table below, the one Retry-After rule, the code and the message.
Each surface then only chooses the shape of its body, as a function of the HttpError:

    openai_body   v1 and OpenAI  {"error": {"message", "type", "param", "code"}}  (also Falcon's own errors)
    v2_body       KServe v2      {"error": "..."}

The app-wide handlers write the shape of the path's surface (`shape_for`: v2_body on KServe's paths, else
openai_body), for errors raised outside a responder too (middleware, falcon's own, a bug's 500); a
surface with another shape also wraps its responders in `errors_as(its_body)`. Retry-After (on every 503) is the broker's estimate rounded up to whole
seconds, at least 1: a client told to wait less than the estimate would only be refused again.
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Callable

import falcon
import orjson

from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerError

HTTP_STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NO_SUCH_MODEL: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.MODEL_ERROR: 500,
    ErrorCode.WORKER_LOST: 500,
    ErrorCode.BAD_VERSION: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.BUSY: 503,  # never sent to a gateway (worker -> broker only); mapped so the table is whole
    ErrorCode.PASS_FAILED: 500,  # never sent to a gateway (worker -> broker only); mapped so the table is whole
    ErrorCode.BATCH_FAILED: 500,  # never sent to a gateway (worker -> broker only); mapped so the table is whole
    ErrorCode.TIMEOUT: 504,
}
_DEFAULT_RETRY_AFTER_S = 1
logger = logging.getLogger(__name__)

# Falcon's own errors (unknown route, wrong method, ...) get codes in the same vocabulary.
# 403 and 409 are the management API's (gateway/management.py): a write without the admin key, and one for a
# model that only fixed workers serve.
_CODE_BY_FALCON_STATUS = {400: "BAD_REQUEST", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
                          408: "REQUEST_TIMEOUT", 409: "CONFLICT", 414: "URI_TOO_LONG", 417: "EXPECTATION_FAILED",
                          431: "HEADERS_TOO_LARGE", 500: "INTERNAL", 501: "NOT_IMPLEMENTED"}


class GatewayError(BrokerError):
    """An error the gateway finds itself. Its message stands alone; `param` is the request field at fault."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None, retry_after_s: float = 0.0):
        super().__init__(code, message, retry_after_s)
        self.param = param


@dataclass(frozen=True, slots=True)
class HttpError:
    """One error as HTTP will carry it, before a surface shapes its body."""

    status: int
    code: str  # an ErrorCode value, or one of Falcon's (NOT_FOUND, ...)
    message: str
    param: str | None = None  # the request field at fault
    retry_after_s: int | None = None  # the Retry-After header, on a 503
    from_gateway: bool = False  # raised by the gateway itself: the message needs no code to be read

    @property
    def type(self) -> str:
        """OpenAI's class of error."""
        if self.status == 401:
            return "authentication_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


BodyShape = Callable[[HttpError], dict]


def http_error(error: BrokerError) -> HttpError:
    """The table and the Retry-After rule, applied: the one place HTTP statuses are chosen."""
    status = HTTP_STATUS_BY_CODE.get(error.code, 500)
    from_gateway = isinstance(error, GatewayError)
    return HttpError(status, error.code.value, error.message, error.param if from_gateway else None,
                     retry_after(error.retry_after_s) if status == 503 else None, from_gateway)


def retry_after(seconds: float) -> int:
    """Whole seconds for Retry-After: the estimate rounded up, at least 1 (1 when there is none)."""
    return max(1, math.ceil(seconds)) if seconds > 0 else _DEFAULT_RETRY_AFTER_S


def openai_body(error: HttpError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def v2_body(error: HttpError) -> dict:
    """KServe v2 has no code field: the broker's code goes before its message."""
    return {"error": error.message if error.from_gateway else f"{error.code}: {error.message}"}


def write_error(resp: falcon.Response, error: HttpError, shape: BodyShape = openai_body) -> None:
    resp.status = error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(shape(error))
    if error.retry_after_s is not None:
        resp.set_header("Retry-After", str(error.retry_after_s))
    if error.status == 401:
        resp.set_header("WWW-Authenticate", 'Bearer realm="ddml"')


def errors_as(shape: BodyShape):
    """Wrap a responder so that its errors leave in `shape` rather than the app-wide openai_body."""

    def wrap(responder):
        @functools.wraps(responder)
        async def wrapped(self, req: falcon.Request, resp: falcon.Response, **params) -> None:
            try:
                await responder(self, req, resp, **params)
            except Exception as error:
                _write_shaped(req, resp, error, shape)

        return wrapped

    return wrap


def _write_shaped(req: falcon.Request, resp: falcon.Response, error: Exception, shape: BodyShape) -> None:
    if isinstance(error, BrokerError):
        write_error(resp, http_error(error), shape)
    elif isinstance(error, falcon.HTTPError):  # falcon's own (a header it could not parse, ...): our shape too
        write_error(resp, _falcon_http_error(error), shape)
        for name, value in (error.headers or {}).items():
            resp.set_header(name, value)
    else:  # a bug: a 500, in this surface's shape, and logged
        logger.exception("unexpected error on %s %s", req.method, req.path)
        write_error(resp, _unexpected(error), shape)


def invalid(message: str, param: str | None = None) -> GatewayError:
    """A BAD_REQUEST (400) that names the request field at fault."""
    return GatewayError(ErrorCode.BAD_REQUEST, message, param)


def handle_broker_error(req: falcon.Request, resp: falcon.Response, error: BrokerError, params) -> None:
    write_error(resp, http_error(error), shape_for(req))


def shape_for(req: falcon.Request) -> BodyShape:
    """The body shape of the surface a path belongs to: KServe v2's (/v2, /v2/health/..., /v2/models/..., and
    Triton's /v2/repository/...), else OpenAI's. (Cohere's /v2/rerank and /v2/embed are not KServe's.)"""
    path = req.path
    return v2_body if path == "/v2" or path.startswith(_V2_PREFIXES) else openai_body


_V2_PREFIXES = ("/v2/models/", "/v2/health/", "/v2/repository/")


def _falcon_http_error(error: falcon.HTTPError) -> HttpError:
    status = error.status_code
    code = _CODE_BY_FALCON_STATUS.get(status, "HTTP_%d" % status)
    return HttpError(status, code, error.description or error.title or "error", from_gateway=True)


def _unexpected(error: Exception) -> HttpError:
    return HttpError(500, ErrorCode.INTERNAL.value, f"{type(error).__name__}: {error}"[:500])


def serialize_falcon_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    """Falcon's own errors (it sets the status and headers): the same body, with a code of ours."""
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(shape_for(req)(_falcon_http_error(error)))


def handle_unexpected(req: falcon.Request, resp: falcon.Response, error: Exception, params) -> None:
    if isinstance(error, falcon.HTTPError):
        raise error
    logger.exception("unexpected error on %s %s", req.method, req.path)
    write_error(resp, _unexpected(error), shape_for(req))


def server_refusal(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response for a request the server refused before the app saw it (gunicorn's own
    400, 414, 431, ...: gateway/gunicorn_conf.py routes them here): the JSON error shape, and an
    X-Request-ID. The client's own id cannot be echoed, since its headers did not parse: a new one."""
    code = _CODE_BY_FALCON_STATUS.get(status, "HTTP_%d" % status)
    body = orjson.dumps(openai_body(HttpError(status, code, message or reason)))
    reason = "".join(c for c in reason if " " <= c <= "~")[:64]  # (gunicorn's own words, but never a CR/LF)
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {uuid.uuid4().hex}\r\n\r\n")
    return head.encode("latin-1") + body
