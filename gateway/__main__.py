"""`ddml-gateway` / `python -m gateway`: run the HTTP gateway under gunicorn.

Flags become DDML_* environment variables, which gateway/gunicorn_conf.py and get_app() read;
then this process becomes the gunicorn master (SIGTERM = graceful gunicorn shutdown).
"""

from __future__ import annotations

import os
import sys
import tempfile

from ddml_common.cli import Parser, env_name
from gateway.config import DEFAULT_THREADS, DEFAULT_WORKERS, MAX_NESTING_DEPTH

_FLAGS_FOR_ENV = (
    "broker", "bind", "workers", "threads", "max_body_bytes", "max_inputs", "max_input_chars",
    "request_timeout_ms", "log_level", "certfile", "keyfile", "access_log",
    "curve_server_key", "curve_secret_key", "api_key_file", "log_format",
)


def build_parser() -> Parser:
    parser = Parser("ddml-gateway", "Serve the ddml HTTP API under gunicorn, forwarding to a broker.")
    parser.add_argument("--broker", default="tcp://127.0.0.1:5555", help="the broker's frontend endpoint")
    parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT to listen on")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="gunicorn worker processes (default: half the cores, at least 1)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="request threads per gunicorn process")
    parser.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger bodies get 413")
    parser.add_argument("--max-inputs", type=int, default=4096, help="inputs per request; more get 400")
    parser.add_argument("--max-input-chars", type=int, default=1 << 20,
                        help="characters in any one string of a request, however deeply nested (keys too); "
                             f"more get 400. Bodies nested more than {MAX_NESTING_DEPTH} levels deep get 400 too")
    parser.add_argument("--request-timeout-ms", type=float, default=30_000.0,
                        help="default request deadline; a body's timeout_ms may ask for another")
    parser.add_argument("--certfile", default=None, help="TLS certificate (PEM); with --keyfile serves HTTPS")
    parser.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    parser.add_argument("--curve-server-key", default=None, help="the broker's public .key: turns on CurveZMQ")
    parser.add_argument("--curve-secret-key", default=None, help="this gateway's .key_secret (ddml-keys generate)")
    parser.add_argument("--api-key-file", default=None,
                        help="require 'Authorization: Bearer TOKEN' with a token from this file (one per line); "
                             "/healthz stays open")
    parser.add_argument("--access-log", default=None, help="access log file ('-' for stderr); off by default")
    parser.add_argument("--preload", action="store_true", help="pass --preload to gunicorn (safe: no zmq before fork)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag in _FLAGS_FOR_ENV:
        value = getattr(args, flag)
        if value is not None:
            os.environ[env_name(flag)] = str(value)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One fresh directory per gateway: every gunicorn process writes its metrics there.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ddml-gateway-metrics-")
    command = [sys.executable, "-m", "gunicorn", "-c", "python:gateway.gunicorn_conf"]
    if args.preload:
        command.append("--preload")
    command.append("gateway.app:get_app()")
    sys.stdout.flush()
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
