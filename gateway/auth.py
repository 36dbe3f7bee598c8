"""Optional bearer-token authentication for the HTTP API (--api-key-file).

Every route except /healthz needs `Authorization: Bearer <token>` with a token from the file
(one per line; blank lines and # comments ignored). Tokens are compared in constant time, and
against every token, so timing tells nothing about which one nearly matched.
"""

from __future__ import annotations

import hmac

import falcon

from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerError

OPEN_PATHS = frozenset({"/healthz"})  # Prometheus can send a bearer token (authorization: in scrape config)


def load_tokens(path: str) -> list[bytes]:
    with open(path, "rb") as tokens_file:
        tokens = [line.strip() for line in tokens_file]
    tokens = [t for t in tokens if t and not t.startswith(b"#")]
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return tokens


class BearerAuth:
    def __init__(self, tokens: list[bytes]):
        self._tokens = tokens

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in OPEN_PATHS:
            return
        header = req.get_header("Authorization") or ""
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise BrokerError(ErrorCode.UNAUTHORIZED, "send 'Authorization: Bearer <token>'")
        presented_bytes = presented.strip().encode()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented_bytes, token)
        if not matched:
            raise BrokerError(ErrorCode.UNAUTHORIZED, "the bearer token is not valid")
