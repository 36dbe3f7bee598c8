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
import random
import re
import time

import falcon

from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerError

logger = logging.getLogger("gateway.requests")

HEADER = "X-Request-ID"
_VALID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space


# A made id has uuid4().hex's shape (32 hex digits, version 4, RFC 4122 variant), from random's
# generator rather than os.urandom: uuid4() cost a system call and a UUID object per request (py-spy
# at c64: 2% of the gateway's samples). An id names a request in logs; it guards nothing. (random
# reseeds in each forked process, so gunicorn's workers do not repeat one another's ids.)
_UUID4_MASK = ~(0xF000 << 64 | 0xC000 << 48) & ((1 << 128) - 1)
_UUID4_BITS = 0x4000 << 64 | 0x8000 << 48


def new_request_id() -> str:
    # (to_bytes().hex(): the same 32 digits as format(n, "032x"), in half its time)
    return (random.getrandbits(128) & _UUID4_MASK | _UUID4_BITS).to_bytes(16, "big").hex()


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def assign(req: falcon.Request) -> None:
    """The request's id: the client's X-Request-ID, or one made here (400 for an invalid one, which
    the answer still carries a made id for)."""
    req.context.request_id = new_request_id()
    req.context.request_id_given = False
    given = req.get_header(HEADER)
    if given is None:
        return
    if not valid_request_id(given):
        raise BrokerError(ErrorCode.BAD_REQUEST,
                          f"{HEADER} must be 1 to 128 printable ASCII characters without spaces, got {given!r:.60}")
    req.context.request_id = given
    req.context.request_id_given = True


def answer(req: falcon.Request, resp: falcon.Response) -> None:
    """X-Request-ID on the answer, and its log line (DEBUG; WARNING for a 5xx), timed from
    req.context.started_at (gateway/middleware.py)."""
    request_id = getattr(req.context, "request_id", None)
    if request_id is None:  # a request that assign() did not see
        request_id = req.context.request_id = new_request_id()
    resp.set_header(HEADER, request_id)
    log_answer(request_id, req.method, req.path, resp.status_code, getattr(req.context, "started_at", None), resp.data)


def log_answer(request_id: str, method: str, path: str, status: int, started_at: float | None,
               data: bytes | None) -> None:
    """An answered request's log line: DEBUG, or WARNING with the start of its body for a 5xx."""
    if status < 500 and not logger.isEnabledFor(logging.DEBUG):
        return
    elapsed_ms = (time.perf_counter() - (time.perf_counter() if started_at is None else started_at)) * 1000
    if status >= 500:
        detail = data[:300].decode(errors="replace") if isinstance(data, bytes) else ""
        logger.warning("request %s: %s %r -> %d in %.1f ms: %s", request_id, method, path[:200], status,
                       elapsed_ms, detail, extra={"request_id": request_id})
    else:
        logger.debug("request %s: %s %r -> %d in %.1f ms", request_id, method, path[:200], status, elapsed_ms,
                     extra={"request_id": request_id})
