"""`ddml-gateway` / `python -m gateway`: run the HTTP gateway under gunicorn.

The flags are checked here, so that a bad one ends with one line and exit status 2 before
gunicorn starts. Each becomes a DDML_GATEWAY_<FLAG> variable, which gateway/gunicorn_conf.py
and get_app() read back with the same parser; then this process becomes the gunicorn master
(SIGTERM or SIGINT: an idle gateway exits at once, requests in flight finish first).
"""

from __future__ import annotations

import os
import sys
import tempfile

from ddml_common import tracing
from ddml_common.cli import env_names
from ddml_common.keys import ClientKeys
from gateway.auth import load_tokens
from gateway.config import GatewayConfig, build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        GatewayConfig.from_args(args)
    except ValueError as error:
        parser.fail(f"invalid configuration: {error}")
    _check_files(parser, args)
    for dest in parser.settable_actions():
        value = getattr(args, dest)
        if value is not None and dest != "config":  # the file's values are all in args already
            os.environ[env_names(parser.section, dest)[0]] = str(value)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One fresh directory per gateway: every gunicorn process writes its metrics there.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ddml-gateway-metrics-")
    command = [sys.executable, "-m", "gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway.app:get_app()"]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _check_files(parser, args) -> None:
    """The files gunicorn's processes will read: readable, and what they should hold."""
    if bool(args.certfile) != bool(args.keyfile):
        parser.fail("--certfile and --keyfile go together")
    for flag, path in (("--certfile", args.certfile), ("--keyfile", args.keyfile)):
        if path and not os.access(path, os.R_OK):
            parser.fail(f"{flag} {path}: cannot read it")
    try:
        if args.api_key_file:
            load_tokens(args.api_key_file)
    except (OSError, ValueError) as error:
        parser.fail(f"--api-key-file {args.api_key_file}: {getattr(error, 'strerror', None) or error}")
    _check_optional_packages(parser, args)
    try:
        ClientKeys.from_files(args.curve_server_key, args.curve_secret_key)
    except (OSError, ValueError) as error:
        parser.fail(f"--curve-server-key / --curve-secret-key: {getattr(error, 'strerror', None) or error}")



def _check_optional_packages(parser, args) -> None:
    """--grpc-bind and --otlp-endpoint need their extras: say so in one line, before gunicorn starts."""
    missing = args.grpc_bind and tracing.first_missing(("grpc", "google.protobuf"))
    if missing:
        parser.fail(f"--grpc-bind needs the {missing} package: pip install 'ddml[grpc]'")
    missing = args.otlp_endpoint and tracing.missing_package()
    if missing:
        parser.fail(f"--otlp-endpoint needs the {missing} package: pip install 'ddml[otel]'")


if __name__ == "__main__":
    main()
