"""The gateway's gunicorn worker: uvicorn's, with bounds on slow and large request heads, and JSON refusals.

gunicorn runs `gateway.asgi_server.GatewayWorker` (gateway/gunicorn_conf.py): each process serves
the ASGI app on one asyncio event loop, with uvicorn's httptools parser (in C: about half the
gateway's CPU per request of h11's, measured in the commit that chose it), so an idle or slow
client costs a socket and a few objects, never a thread. uvicorn bounds the time a kept-alive
connection may sit idle (gunicorn's keepalive), but neither the time a client may take to send a
request's line and headers (a client that trickles them a byte a second would hold its
connection for ever) nor their size. GatewayHttpProtocol adds both: the head must arrive within
--header-timeout-s of the connection (or of the previous answer on it), else a client that has
sent part of a request gets 408 and the connection is closed; and it may take MAX_HEAD_BYTES,
else 431. The body's bound is the app's (gateway/resources.py: read_body), and so are the limits
on the target (414) and on one header (431) that gunicorn had (check_head, below).

The protocol's own refusals (a request it cannot parse, a head too large or too late) come back
in the gateway's JSON error shape with an X-Request-ID (gateway/errors.py: server_refusal),
rather than uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

import falcon
from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from ddml_common.memory import keep_freed_buffers
from gateway.config import build_parser
from gateway.errors import server_refusal
from gateway.resources import BODY_ARRIVED

logger = logging.getLogger(__name__)

# The most a request's line and headers may take, in bytes, all together (431 past it), and each
# (gunicorn's limits, which the gateway kept: check_head, in the app).
MAX_HEAD_BYTES = 16 * 1024
MAX_REQUEST_LINE_BYTES = 4094  # the target, path and query: 414 past it
MAX_HEADER_BYTES = 8190  # one header's name and value: 431 past it

GC_YOUNG_THRESHOLD = 10_000  # allocations less deallocations between young collections (Python's: 700)
CLOSE_GRACE_S = 0.5  # when stopping, how long an idle connection's close may take before it is dropped
ONE_WRITE_MAX_BODY_BYTES = 64 * 1024  # a larger body goes out in a write of its own (no copy), after its head
_ORPHAN_CHECK_TICKS = 10  # uvicorn ticks every 0.1 s: look for the gunicorn master once a second

_args = build_parser().parse_args([])  # the gateway's flags, from DDML_GATEWAY_* / DDML_* (and DDML_CONFIG)
HEADER_TIMEOUT_S = _args.header_timeout_s


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline and a size limit on each request's head (see the
    module's docstring)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_due_at: float | None = None  # when the awaited head is due; None: none awaited
        self._idle_due_at = 0.0  # when the connection closes if no byte of that head has come
        self._timer_at = 0.0  # when _head_timer fires
        self._lost = False
        self._in_head = True  # between a request's start (or the connection's) and the end of its headers
        self._head_bytes = 0
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._lost = True
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._in_head
        super().data_received(data)
        if in_head and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request's line and headers are over {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous and type(cycle) is RequestResponseCycle:
            # uvicorn made this request's cycle (its task has not run yet): answer it in one write.
            cycle.__class__ = OneWriteCycle

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.scope[BODY_ARRIVED] = True

    def on_response_complete(self) -> None:
        # uvicorn's, but without its keep-alive timer (made, and cancelled when the next request comes,
        # for every response): the head's timer, armed here, closes the connection if it stays idle
        # for uvicorn's keep-alive timeout (gunicorn's keepalive) as that timer did.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._arm(min(self.timeout_keep_alive, self.header_timeout_s))  # the next request's head is due from now

    def send_400_response(self, msg: str) -> None:
        error = sys.exc_info()[1]
        self._refuse(400, "Bad Request", f"{msg} ({error})" if error is not None else msg)

    def shutdown(self) -> None:
        """The server is stopping: an idle connection closes now (one with a request in flight, after
        its answer). A TLS connection's close waits for the client's close_notify, which a client
        that pools its connections never sends, and the server waits for every connection: so one
        still open after CLOSE_GRACE_S is dropped."""
        super().shutdown()
        if self.transport.is_closing():
            self.loop.call_later(CLOSE_GRACE_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self._lost:
            self.transport.abort()

    # ------------------------------------------------------------------ the head's deadline
    # One timer per connection, moved lazily: arming sets the deadline, and the timer, when it fires
    # before that deadline, waits again for what is left. A timer made and cancelled for each request
    # cost more than the rest of the head's bookkeeping (loop.call_later + cancel: 1.9 µs on uvloop).

    def _arm(self, idle_s: float | None = None) -> None:
        """The next head is due in header_timeout_s; with no byte of it in `idle_s` (default: the
        same), the connection is idle and closes."""
        self._in_head = True
        self._head_bytes = 0
        now = self.loop.time()
        self._head_due_at = now + self.header_timeout_s
        self._idle_due_at = now + (self.header_timeout_s if idle_s is None else idle_s)
        self._set_timer(min(self._idle_due_at, self._head_due_at))

    def _set_timer(self, at: float) -> None:
        """Have the timer fire at `at` or sooner: a later deadline keeps it as it is."""
        if self._head_timer is not None:
            if self._timer_at <= at:
                return
            self._head_timer.cancel()
        self._timer_at = at
        self._head_timer = self.loop.call_at(at, self._head_late)

    def _disarm(self) -> None:
        self._head_due_at = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head_due_at is None or self._lost:
            return
        due_at = self._head_due_at if self._head_bytes else min(self._idle_due_at, self._head_due_at)
        if self.loop.time() < due_at:  # armed again since this timer was set, or part of a head came
            self._set_timer(due_at)
            return
        self._head_due_at = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:  # part of a request came: say why it ends
            self._refuse(408, "Request Timeout", f"the request's line and headers did not arrive within "
                                                 f"{self.header_timeout_s:g} s (--header-timeout-s)")
        else:  # an idle connection: close it
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._disarm()
        self.transport.write(server_refusal(status, reason, message))
        self.transport.close()


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, but a response's head goes out in one write with its body,
    where uvicorn writes each on its own: one system call (and one TCP segment for the client to
    read) less per response. The head is held from the app's http.response.start to its first
    http.response.body, the next message of the same task; an app that starts a response and
    ends without a body has its connection closed by uvicorn, the head unsent, as before with it."""

    _held_head: bytes | None = None

    async def send(self, message) -> None:
        head = self._held_head
        if head is None:
            if message["type"] != "http.response.start" or self.response_started:
                return await super().send(message)
            transport, self.transport = self.transport, _HeldWrite()
            try:
                await super().send(message)  # (flow control, the access log and every check: uvicorn's)
            finally:
                held, self.transport = self.transport, transport
            self._held_head = held.data
            return
        self._held_head = None
        body = message.get("body", b"") if message["type"] == "http.response.body" else b""
        if (self.chunked_encoding or self.scope["method"] == "HEAD" or self.disconnected
                or len(body) > ONE_WRITE_MAX_BODY_BYTES):
            if not self.disconnected:
                self.transport.write(head)
            return await super().send(message)
        self.expected_content_length += len(head)  # uvicorn counts what it writes against Content-Length
        await super().send({**message, "body": head + body})


class _HeldWrite:
    """Stands in for the transport while uvicorn writes a response's head: keeps it."""

    __slots__ = ("data",)

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def check_head(scope: dict) -> None:
    """First for every request (gateway/middleware.py): a target over MAX_REQUEST_LINE_BYTES gets 414, a
    header over MAX_HEADER_BYTES 431, in the gateway's error shape (as gunicorn's own limits did)."""
    if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_REQUEST_LINE_BYTES:
        raise falcon.HTTPUriTooLong(description=f"the request's target is over {MAX_REQUEST_LINE_BYTES} bytes")
    for name, value in scope["headers"]:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise falcon.HTTPError(falcon.HTTP_431, description=f"a header is over {MAX_HEADER_BYTES} bytes")


class _OrphanAwareServer(Server):
    """uvicorn's Server, which also stops (gracefully, as on SIGTERM) once the gunicorn master that
    started this process is gone: SIGKILLed (an OOM killer, `kill -9`), it cannot stop its workers,
    and an orphaned worker would serve on for ever and keep the port taken, so that a new gateway
    could not bind it. gunicorn's own workers check the same in their loops; uvicorn's do not."""

    def __init__(self, config, master_pid: int):
        super().__init__(config=config)
        self._master_pid = master_pid

    async def on_tick(self, counter: int) -> bool:
        if counter % _ORPHAN_CHECK_TICKS == 0 and not self.should_exit and os.getppid() != self._master_pid:
            logger.warning("the gunicorn master (pid %d) is gone; stopping", self._master_pid)
            self.should_exit = True
        return await super().on_tick(counter)


class GatewayWorker(UvicornWorker):
    """gunicorn's worker class for the gateway (gateway/gunicorn_conf.py)."""

    # access_log: uvicorn formats a line per request unless told not to, even with nowhere to write it.
    # loop "auto": uvloop when it is installed (as the bare ASGI floor of bench.overhead has it), else
    # asyncio's. Its transports and loop are C: at c64 asyncio's transport.write() alone was a fifth of
    # the gateway's samples (py-spy), and uvloop cut the gateway's CPU per request (the figure is in
    # the commit that made the change).
    CONFIG_KWARGS = {"loop": "auto", "http": GatewayHttpProtocol, "lifespan": "on",
                     "access_log": bool(_args.access_log)}

    async def _serve(self) -> None:
        # As UvicornWorker's, but SIGQUIT (which the gunicorn master sends its workers on SIGINT: a
        # terminal's Ctrl-C) stops uvicorn as SIGTERM does: requests in flight are answered, and an
        # idle process exits at once. uvicorn_worker's own SIGQUIT handler only marks the gunicorn
        # worker as stopping, which uvicorn never looks at, so the process served on until killed.
        self.config.app = self.wsgi
        # Everything imported and built so far lives as long as the process: out of the collector's
        # sight, a full collection walks only what requests made. Without it, at concurrency 64 full
        # collections paused the loop 85-350 ms, every request with it (p99 401 against 105 ms with
        # it, the same run; the measurement is in the commit that added this).
        gc.collect()
        gc.freeze()
        keep_freed_buffers()  # a tensor's body and frames reuse freed memory, not fresh pages (ddml_common/memory.py)
        # A request's objects die with it, by their reference counts (a predict request leaves less than
        # one object a request to the collector): what the young generation holds is mostly what the
        # requests in flight hold. At the default threshold (700) that alone set off a young collection
        # every few requests at c64; at this one, collections come as cyclic garbage (error paths'
        # tracebacks) adds up. (The figures are in the commit that set it.)
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        server = _OrphanAwareServer(self.config, self.ppid)
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, server.handle_exit, signal.SIGTERM, None)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
