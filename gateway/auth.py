"""Optional bearer-token authentication for the HTTP API (--api-key-file).

Every route needs `Authorization: Bearer <token>` with a token from the file (one per line;
blank lines and # comments ignored), except the probes, which Kubernetes sends without one, and
/metrics, unless --protect-metrics (Prometheus can send a token: `authorization:` in its scrape
config). Tokens are compared in constant time, and against every token, so timing tells nothing
about which one nearly matched.
"""

from __future__ import annotations

import hmac

import falcon

from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerError

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"


def load_tokens(path: str) -> list[bytes]:
    with open(path, "rb") as tokens_file:
        tokens = [line.strip() for line in tokens_file]
    tokens = [t for t in tokens if t and not t.startswith(b"#")]
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return tokens


class BearerAuth:
    def __init__(self, tokens: list[bytes], protect_metrics: bool = False):
        self._tokens = tokens
        self._open_paths = PROBE_PATHS if protect_metrics else PROBE_PATHS | {METRICS_PATH}

    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in self._open_paths:
            return
        check_authorization(self._tokens, req.get_header("Authorization"))


def check_authorization(tokens: list[bytes], header: str | None) -> None:
    """An Authorization value (HTTP header or gRPC metadata) with one of the tokens, else BrokerError."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise BrokerError(ErrorCode.UNAUTHORIZED, "send 'Authorization: Bearer <token>'")
    presented_bytes = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented_bytes, token)
    if not matched:
        raise BrokerError(ErrorCode.UNAUTHORIZED, "the bearer token is not valid")
