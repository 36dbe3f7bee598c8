"""BrokerError: a request that ended in an error (imported through gateway.broker_client)."""

from __future__ import annotations

from ddml_common.protocol import ErrorCode


class BrokerError(Exception):
    """A request that ended in an error. gateway/errors.py turns it into an HTTP response."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float = 0.0):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
