"""Gateway configuration, read from DDML_* environment variables (set by ddml-gateway or by hand)."""

from __future__ import annotations

import os
from dataclasses import dataclass


# gunicorn processes × threads. A gateway shares its host with the broker and, often, the
# workers: half the cores, at least one, and threads enough that the broker can hold a second
# full batch (128 requests in flight per process). On 2 cores, 1 × 128 against 2 × 64 in one
# run (bench.ab --role gateway, 2 rounds): 67.2 against 55.2 req/s at concurrency 16, 68.1
# against 61.1 at 64, 67.8 against 61.8 at 256, and a lower p99 at each.
DEFAULT_WORKERS = max(1, (os.cpu_count() or 2) // 2)
DEFAULT_THREADS = 128

# Arrays and objects nested in one request body (JSON, msgpack, or a v2 inference header); deeper
# gets 400. Real inputs nest a few levels. orjson writes at most 254 levels, so an unbounded echo of
# a deep input would fail only on the way out, as a 500. A v2 input tensor may have as many
# dimensions as this.
MAX_NESTING_DEPTH = 32


@dataclass(frozen=True)
class GatewayConfig:
    broker: str = "tcp://127.0.0.1:5555"  # the broker's frontend endpoint
    max_body_bytes: int = 16 << 20  # larger bodies get 413
    max_inputs: int = 4096  # inputs per request
    max_input_chars: int = 1 << 20  # characters in one string, anywhere in the inputs (keys too)
    request_timeout_ms: float = 30_000.0  # default deadline; a request may ask for less (timeout_ms)
    max_request_timeout_ms: float = 300_000.0
    curve_server_key: str | None = None  # the broker's public .key: turns on CurveZMQ to the broker
    curve_secret_key: str | None = None  # this gateway's .key_secret
    api_key_file: str | None = None  # bearer tokens, one per line; None = no HTTP auth

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_input_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_ms <= 0:
            raise ValueError(f"request_timeout_ms must be > 0, got {self.request_timeout_ms}")

    @classmethod
    def from_env(cls) -> "GatewayConfig":
        """The only place the gateway reads its environment."""
        env = os.environ
        default = cls()
        return cls(
            broker=env.get("DDML_BROKER", default.broker),
            max_body_bytes=int(env.get("DDML_MAX_BODY_BYTES", default.max_body_bytes)),
            max_inputs=int(env.get("DDML_MAX_INPUTS", default.max_inputs)),
            max_input_chars=int(env.get("DDML_MAX_INPUT_CHARS", default.max_input_chars)),
            request_timeout_ms=float(env.get("DDML_REQUEST_TIMEOUT_MS", default.request_timeout_ms)),
            max_request_timeout_ms=float(env.get("DDML_MAX_REQUEST_TIMEOUT_MS", default.max_request_timeout_ms)),
            curve_server_key=env.get("DDML_CURVE_SERVER_KEY") or None,
            curve_secret_key=env.get("DDML_CURVE_SECRET_KEY") or None,
            api_key_file=env.get("DDML_API_KEY_FILE") or None,
        )
