"""The broker's HTTP side port (--metrics-port): /metrics for Prometheus, /healthz for liveness probes.

/healthz reflects the broker's loop itself: the loop stamps the time at the end of every pass
(Broker.last_step_at), and it passes at least once per heartbeat interval even when idle. A
loop that has not passed for --stall-timeout-s answers 503, so a liveness probe restarts a
broker that is stuck, not one that is merely busy. A failure to render /metrics is a 500 on
/metrics only: it never fails the health check.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)


class HealthServer:
    """Serves /metrics and /healthz on its own thread. Constructing it binds; start() serves."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, loop_age_s: Callable[[], float],
                 stall_timeout_s: float):
        self._registry = registry
        self._loop_age_s = loop_age_s
        self._stall_timeout_s = stall_timeout_s
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="broker-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def health(self) -> tuple[int, bytes]:
        age_s = self._loop_age_s()
        if age_s > self._stall_timeout_s:
            return 503, f'{{"live": false, "loop_age_s": {age_s:.3f}}}\n'.encode()
        return 200, f'{{"live": true, "loop_age_s": {age_s:.3f}}}\n'.encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    status, body = server.health()
                    self._reply(status, "application/json", body)
                elif path == "/metrics":
                    try:
                        body = generate_latest(server._registry)
                    except Exception as error:  # a broken collector must not take the port down
                        logger.exception("rendering /metrics failed")
                        self._reply(500, "text/plain", f"metrics failed: {type(error).__name__}\n".encode())
                        return
                    self._reply(200, CONTENT_TYPE_LATEST, body)
                else:
                    self._reply(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:  # probes every few seconds: not worth a log line
                pass

        return Handler
