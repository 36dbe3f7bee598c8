"""Gateway configuration: its flags (build_parser), and GatewayConfig for the Falcon (ASGI) app.

ddml-gateway parses the flags, then hands every value to gunicorn's processes as a
DDML_GATEWAY_<FLAG> variable; gateway/gunicorn_conf.py and get_app() parse them again with the
same parser (from_env), so `gunicorn 'gateway.app:get_app()'` run by hand reads the same
variables, with the same checks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ddml_common.cli import Number, Parser, endpoints

# gunicorn processes, each an event loop that carries any number of requests. A gateway shares
# its host with the broker and, often, the workers: half the cores, at least one.
DEFAULT_WORKERS = max(1, (os.cpu_count() or 2) // 2)
DEFAULT_THREADS = 128  # --threads: read and ignored since the gateway moved to an event loop (#25)

# Arrays and objects nested in one request body (JSON, msgpack, or a v2 inference header); deeper
# gets 400. Real inputs nest a few levels. orjson writes at most 254 levels, so an unbounded echo of
# a deep input would fail only on the way out, as a 500. A v2 input tensor may have as many
# dimensions as this.
MAX_NESTING_DEPTH = 32

# On SIGTERM gunicorn waits this long past the longest request deadline for requests in flight:
# the client's reply grace (BrokerClient's _REPLY_GRACE_S, 1 s) and the time to write the answer.
SHUTDOWN_MARGIN_S = 5.0


@dataclass(frozen=True)
class GatewayConfig:
    broker: str = "tcp://127.0.0.1:5555"  # the broker's frontend endpoint
    max_body_bytes: int = 16 << 20  # larger bodies get 413
    max_inputs: int = 4096  # inputs per request
    max_input_chars: int = 1 << 20  # characters in one string, anywhere in the inputs (keys too)
    request_timeout_ms: float = 30_000.0  # default deadline; a request may ask for less (timeout_ms)
    max_request_timeout_ms: float = 300_000.0  # the longest deadline a request may ask for
    # Slow clients (issue #28): a request's line and headers must arrive within header_timeout_s of
    # its first byte (or of the connection, or of the previous answer), its body within body_timeout_s
    # of the headers; else 408 and the connection is closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    curve_server_key: str | None = None  # the broker's public .key: turns on CurveZMQ to the broker
    curve_secret_key: str | None = None  # this gateway's .key_secret
    api_key_file: str | None = None  # bearer tokens, one per line; None = no HTTP auth
    protect_metrics: bool = False  # with api_key_file: /metrics needs a token too (probes never do)
    admin_key_file: str | None = None  # admin tokens for the management writes; None = those writes are refused
    # text-embeddings-inference's root routes (/embed, /rerank, /predict, POST /, ...): which model
    # answers each task; None = the only live model of that task (gateway/tei.py)
    default_model: str | None = None
    default_rerank_model: str | None = None
    default_classify_model: str | None = None
    # gRPC and tracing (issue #26):
    otlp_endpoint: str | None = None  # OTLP/HTTP collector for request spans; None = no spans
    grpc_bind: str | None = None  # HOST:PORT of the KServe v2 gRPC service; None = none
    grpc_threads: int = 64  # gRPC calls served at once

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_input_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_ms <= 0:
            raise ValueError(f"request_timeout_ms must be > 0, got {self.request_timeout_ms}")
        if self.max_request_timeout_ms <= 0:
            raise ValueError(f"max_request_timeout_ms must be > 0, got {self.max_request_timeout_ms}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args) -> "GatewayConfig":
        return cls(
            broker=args.broker,
            max_body_bytes=args.max_body_bytes,
            max_inputs=args.max_inputs,
            max_input_chars=args.max_input_chars,
            request_timeout_ms=args.request_timeout_ms,
            max_request_timeout_ms=args.max_request_timeout_ms,
            header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
            curve_server_key=args.curve_server_key,
            curve_secret_key=args.curve_secret_key,
            api_key_file=args.api_key_file,
            protect_metrics=args.protect_metrics,
            admin_key_file=args.admin_key_file,
            default_model=args.default_model,
            default_rerank_model=args.default_rerank_model,
            default_classify_model=args.default_classify_model,
            otlp_endpoint=args.otlp_endpoint,
            grpc_bind=args.grpc_bind,
            grpc_threads=args.grpc_threads,
        )

    @classmethod
    def from_env(cls) -> "GatewayConfig":
        """From the DDML_* variables (and DDML_CONFIG), as the flags would be; bad values exit 2."""
        return cls.from_args(build_parser().parse_args([]))


def graceful_timeout_s(args) -> int:
    """How long a stopping gateway waits for requests in flight, in whole seconds as gunicorn takes
    it: --graceful-timeout-s, or by default the longest deadline a request may have plus SHUTDOWN_MARGIN_S."""
    return args.graceful_timeout_s or math.ceil(args.max_request_timeout_ms / 1000 + SHUTDOWN_MARGIN_S)


def build_parser() -> Parser:
    parser = Parser("ddml-gateway", "Serve the ddml HTTP API under gunicorn (each process an event loop: uvicorn's "
                                    "worker), forwarding to a broker.")
    defaults = GatewayConfig()
    parser.add_argument("--broker", type=endpoints, default=defaults.broker,
                        help="the broker's frontend endpoint; several, comma-separated, to fail over between "
                             "them (the first live one takes the requests)")
    parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT to listen on")
    parser.add_argument("--workers", type=Number(int, minimum=0), default=0,
                        help="gunicorn worker processes; 0 = half the cores, at least 1")
    parser.add_argument("--threads", type=Number(int, minimum=1), default=DEFAULT_THREADS,
                        help="ignored: each gunicorn process serves every request on one event loop (kept so "
                             "that existing command lines still work)")
    parser.add_argument("--max-body-bytes", type=Number(int, minimum=1), default=defaults.max_body_bytes,
                        help="larger bodies get 413")
    parser.add_argument("--max-inputs", type=Number(int, minimum=1), default=defaults.max_inputs,
                        help="inputs per request; more get 400")
    parser.add_argument("--max-input-chars", type=Number(int, minimum=1), default=defaults.max_input_chars,
                        help="characters in any one string of a request, however deeply nested (keys too); "
                             f"more get 400. Bodies nested more than {MAX_NESTING_DEPTH} levels deep get 400 too")
    parser.add_argument("--request-timeout-ms", type=Number(float, above=0), default=defaults.request_timeout_ms,
                        help="default request deadline; a body's timeout_ms may ask for another")
    parser.add_argument("--max-request-timeout-ms", type=Number(float, above=0),
                        default=defaults.max_request_timeout_ms,
                        help="the longest deadline a request may have: a longer timeout_ms, or "
                             "--request-timeout-ms, is cut to this; also how long a stopping gateway waits for "
                             "requests in flight")
    parser.add_argument("--graceful-timeout-s", type=Number(int, minimum=0), default=0,
                        help="on SIGTERM, how long to wait for requests in flight; 0 = --max-request-timeout-ms "
                             f"plus {SHUTDOWN_MARGIN_S:g} s. An idle gateway exits at once either way")
    parser.add_argument("--header-timeout-s", type=Number(float, above=0), default=defaults.header_timeout_s,
                        help="a request's line and headers must arrive within this of the connection (or of "
                             "the previous answer on it); else 408 and the connection is closed")
    parser.add_argument("--body-timeout-s", type=Number(float, above=0), default=defaults.body_timeout_s,
                        help="a request's body must arrive within this of its headers; else 408 and the "
                             "connection is closed")
    parser.add_argument("--worker-timeout-s", type=Number(int, minimum=1), default=120,
                        help="gunicorn restarts a worker process that has not checked in for this long "
                             "(a stuck process; requests wait their deadline, not this)")
    parser.add_argument("--certfile", default=None, help="TLS certificate (PEM); with --keyfile serves HTTPS")
    parser.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    parser.add_argument("--curve-server-key", default=None, help="the broker's public .key: turns on CurveZMQ")
    parser.add_argument("--curve-secret-key", default=None, help="this gateway's .key_secret (ddml-keys generate)")
    parser.add_argument("--api-key-file", default=None,
                        help="require 'Authorization: Bearer TOKEN' with a token from this file (one per line); "
                             "/healthz, /readyz and /metrics stay open (see --protect-metrics)")
    parser.add_argument("--protect-metrics", action="store_true",
                        help="with --api-key-file, /metrics needs a token too (the probes /healthz and /readyz "
                             "never do)")
    parser.add_argument("--admin-key-file", default=None,
                        help="the management API's writes (load, unload, scale: docs/http.md) need "
                             "'Authorization: Bearer TOKEN' with a token from this file (one per line); without "
                             "this flag they are refused (403). Its tokens pass --api-key-file's check too")
    parser.add_argument("--default-model", default=None,
                        help="the model that text-embeddings-inference's root routes use (/embed, /info, POST /, "
                             "...); by default the only live embedding model. Every model also has its own base "
                             "URL, /tei/MODEL")
    parser.add_argument("--default-rerank-model", default=None,
                        help="the model for /rerank at the root; by default --default-model if it reranks, else "
                             "the only live rerank model")
    parser.add_argument("--default-classify-model", default=None,
                        help="the model for /predict at the root; by default --default-model if it classifies, "
                             "else the only live classification model")
    # gRPC and tracing (issue #26)
    parser.add_argument("--grpc-bind", default=None,
                        help="also serve KServe v2 over gRPC (inference.GRPCInferenceService, as tritonclient.grpc "
                             "calls it) on HOST:PORT, in one more process beside gunicorn's; with TLS when "
                             "--certfile is given. Needs ddml[grpc]")
    parser.add_argument("--grpc-threads", type=Number(int, minimum=1), default=GatewayConfig.grpc_threads,
                        help="gRPC calls served at once (more wait their turn)")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="export an OpenTelemetry span per request (HTTP and gRPC), child of the caller's "
                             "traceparent, to this OTLP/HTTP collector (e.g. http://collector:4318); needs "
                             "ddml[otel]. traceparent and tracestate are carried to the workers either way")
    parser.add_argument("--access-log", default=None, help="access log file ('-' for stderr); off by default")
    parser.add_argument("--preload", action="store_true", help="pass --preload to gunicorn (safe: no zmq before fork)")
    return parser
