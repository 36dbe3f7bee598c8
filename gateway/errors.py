"""The one table that maps an ErrorCode to an HTTP status, and the JSON error body.

Every error leaves the gateway as {"error": {"message": ..., "type": ..., "param": ..., "code": ...}},
with Retry-After on the 503s, whether it came from the broker, from input validation, or from
Falcon itself. That is OpenAI's error shape, so its clients read ours; `code` is ddml's (the
table below), `type` OpenAI's class of error, and `param` the request field at fault, or null.
"""

from __future__ import annotations

import math

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
    ErrorCode.TIMEOUT: 504,
}
_DEFAULT_RETRY_AFTER_S = 1

# Falcon's own errors (unknown route, wrong method, ...) get codes in the same vocabulary.
_CODE_BY_FALCON_STATUS = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "BAD_REQUEST"}


def error_body(code: str, message: str, status: int = 500, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": _error_type(status), "param": param, "code": code}})


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


def invalid(message: str, param: str | None = None) -> BrokerError:
    """A BAD_REQUEST (400) that names the request field at fault."""
    error = BrokerError(ErrorCode.BAD_REQUEST, message)
    error.param = param
    return error


def handle_broker_error(req: falcon.Request, resp: falcon.Response, error: BrokerError, params) -> None:
    status = HTTP_STATUS_BY_CODE.get(error.code, 500)
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(error.code.value, error.message, status, getattr(error, "param", None))
    if status == 503:
        resp.set_header("Retry-After", str(max(1, math.ceil(error.retry_after_s)) if error.retry_after_s
                                           else _DEFAULT_RETRY_AFTER_S))
    if status == 401:
        resp.set_header("WWW-Authenticate", 'Bearer realm="ddml"')


def serialize_falcon_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    status = error.status_code
    code = _CODE_BY_FALCON_STATUS.get(status, "HTTP_%d" % status)
    message = error.description or error.title or "error"
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(code, message, status)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, error: Exception, params) -> None:
    if isinstance(error, falcon.HTTPError):
        raise error
    resp.status = 500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(ErrorCode.INTERNAL.value, f"{type(error).__name__}: {error}"[:500], 500)
