"""Request ids: one per HTTP request, from the client's X-Request-ID or made here.

An X-Request-ID must be 1 to 128 printable ASCII characters without spaces; any other value gets
400. The id comes back as X-Request-ID on every response, errors included. The routes that ask
the broker put it first in the wire request id, as "{id}/{pid}-{n}" (unique per gateway socket
however clients choose ids), so the broker's and the worker's log lines about the request carry
it too. Here, each request gets one DEBUG line when answered, and a WARNING when it ends in a
5xx, both with the id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import falcon

from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerError

logger = logging.getLogger("gateway.requests")

HEADER = "X-Request-ID"
_VALID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


class RequestIdMiddleware:
    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = uuid.uuid4().hex
        req.context.request_id_given = False
        req.context.request_started_at = time.perf_counter()
        given = req.get_header(HEADER)
        if given is None:
            return
        if not valid_request_id(given):
            raise BrokerError(ErrorCode.BAD_REQUEST,
                              f"{HEADER} must be 1 to 128 printable ASCII characters without spaces, got {given!r:.60}")
        req.context.request_id = given
        req.context.request_id_given = True

    async def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        request_id = getattr(req.context, "request_id", None)
        if request_id is None:  # a request that no process_request saw
            request_id = req.context.request_id = uuid.uuid4().hex
        resp.set_header(HEADER, request_id)
        status = resp.status_code
        if status < 500 and not logger.isEnabledFor(logging.DEBUG):
            return
        elapsed_ms = (time.perf_counter() - getattr(req.context, "request_started_at", time.perf_counter())) * 1000
        if status >= 500:
            detail = resp.data[:300].decode(errors="replace") if isinstance(resp.data, bytes) else ""
            logger.warning("request %s: %s %r -> %d in %.1f ms: %s", request_id, req.method, req.path[:200], status,
                           elapsed_ms, detail, extra={"request_id": request_id})
        else:
            logger.debug("request %s: %s %r -> %d in %.1f ms", request_id, req.method, req.path[:200], status, elapsed_ms,
                         extra={"request_id": request_id})
