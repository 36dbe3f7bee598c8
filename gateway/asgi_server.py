"""The gateway's gunicorn worker: uvicorn's, with a timeout on slow request heads and JSON refusals.

gunicorn runs `gateway.asgi_server.GatewayWorker` (gateway/gunicorn_conf.py): each process serves
the ASGI app on one asyncio event loop, so an idle or slow client costs a socket and a few objects,
never a thread. uvicorn bounds the time a kept-alive connection may sit idle (gunicorn's
keepalive), but not the time a client may take to send a request's line and headers: a client
that trickles them a byte a second would hold its connection for ever. HeadTimeoutH11Protocol
adds that bound (--header-timeout-s), from the connection (or from the previous answer on it)
to the end of the headers: past it, a client that has sent part of a request gets 408, and the
connection is closed. The body's bound is the app's (gateway/resources.py: read_body).

The protocol's own refusals (a request it cannot parse, a head over the size limit) come back
in the gateway's JSON error shape with an X-Request-ID (gateway/errors.py: server_refusal),
with the status h11 hints at (431 for a head too large), rather than uvicorn's plain text 400.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import falcon
import h11
from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from gateway.config import build_parser
from gateway.errors import server_refusal

# The most a request's line and headers may take, in bytes, all together (431 past it, from h11),
# and each (gunicorn's limits, which the gateway kept: HeadLimits, in the app).
MAX_HEAD_BYTES = 16 * 1024
MAX_REQUEST_LINE_BYTES = 4094  # the target, path and query: 414 past it
MAX_HEADER_BYTES = 8190  # one header's name and value: 431 past it

_args = build_parser().parse_args([])  # the gateway's flags, from DDML_GATEWAY_* / DDML_* (and DDML_CONFIG)
HEADER_TIMEOUT_S = _args.header_timeout_s


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on each request's head (see the module's docstring)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        armed_for = self._armed_for if self._head_timer is not None else None
        super().handle_events()
        if self._head_timer is not None and self.cycle is not armed_for:
            self._disarm()  # a request's head arrived: the app has it now

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        if self.cycle is finished and not self.transport.is_closing():
            self._arm(finished)  # the next request's head is due from now (none was pipelined)

    def send_400_response(self, msg: str) -> None:
        # Called while h11's RemoteProtocolError is being handled: its status hint says which refusal.
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400) if isinstance(error, h11.RemoteProtocolError) else 400
        reason = {431: "Request Header Fields Too Large"}.get(status, "Bad Request")
        detail = f"{msg} ({error})" if error is not None else msg
        self._refuse(status, reason, detail)

    # ------------------------------------------------------------------ the head's deadline

    def _arm(self, after_cycle) -> None:
        self._disarm()
        self._armed_for = after_cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late, after_cycle)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self, after_cycle) -> None:
        self._head_timer = None
        if self.cycle is not after_cycle or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it ends
            self._refuse(408, "Request Timeout", f"the request's line and headers did not arrive within "
                                                 f"{self.header_timeout_s:g} s (--header-timeout-s)")
        else:  # an idle connection: close it, as the keep-alive timeout does
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.transport.write(server_refusal(status, reason, message))
        self.transport.close()


class HeadLimits:
    """Falcon middleware, first in line: a target over MAX_REQUEST_LINE_BYTES gets 414, a header over
    MAX_HEADER_BYTES 431, in the gateway's error shape (as gunicorn's own limits did)."""

    async def process_request(self, req, resp) -> None:
        scope = req.scope
        if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_REQUEST_LINE_BYTES:
            raise falcon.HTTPUriTooLong(description=f"the request's target is over {MAX_REQUEST_LINE_BYTES} bytes")
        for name, value in scope["headers"]:
            if len(name) + len(value) > MAX_HEADER_BYTES:
                raise falcon.HTTPError(falcon.HTTP_431, description=f"a header is over {MAX_HEADER_BYTES} bytes")


class GatewayWorker(UvicornWorker):
    """gunicorn's worker class for the gateway (gateway/gunicorn_conf.py)."""

    CONFIG_KWARGS = {"loop": "asyncio", "http": HeadTimeoutH11Protocol, "lifespan": "on",
                     "h11_max_incomplete_event_size": MAX_HEAD_BYTES}

    async def _serve(self) -> None:
        # As UvicornWorker's, but SIGQUIT (which the gunicorn master sends its workers on SIGINT: a
        # terminal's Ctrl-C) stops uvicorn as SIGTERM does: requests in flight are answered, and an
        # idle process exits at once. uvicorn_worker's own SIGQUIT handler only marks the gunicorn
        # worker as stopping, which uvicorn never looks at, so the process served on until killed.
        self.config.app = self.wsgi
        server = Server(config=self.config)
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, server.handle_exit, signal.SIGTERM, None)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
