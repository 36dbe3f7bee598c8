"""Fakes for unit tests of pure logic only. Integration and e2e tests use real parts."""

from __future__ import annotations

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerError


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Awaitable:
    """A fake broker client behind the async interface the gateway's app awaits (AsyncBrokerClient's):
    the fakes stay plain methods, which their subclasses in the tests override."""

    def __init__(self, fake):
        self.fake = fake

    async def request(self, *args, **kwargs) -> list:
        return self.fake.request(*args, **kwargs)

    async def status(self, *args, **kwargs) -> dict:
        return self.fake.status(*args, **kwargs)


class FakeBrokerClient:
    """Answers like a broker would: echoes inputs, or raises the error it was told to."""

    def __init__(self, error: BrokerError | None = None, workers: list | None = None):
        self.error = error
        self.calls: list[tuple[str, list, float, int]] = []
        self.request_ids: list[str] = []  # the request_id_prefix of each call: the HTTP request's id
        self.workers = [{"worker_id": "ab", "models": ["echo"], "host": "h", "pid": 1, "device": "cpu",
                         "state": "idle", "max_batch_size": 8}] if workers is None else workers

    def request(self, model: str, inputs: list, timeout_s: float, priority: int = 0,
                request_id_prefix: str = "", timings: dict | None = None) -> list:
        self.calls.append((model, inputs, timeout_s, priority))
        self.request_ids.append(request_id_prefix)
        if self.error is not None:
            raise self.error
        return [protocol.decode_value(protocol.encode_value(x)) for x in inputs]

    def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
        if self.error is not None and self.error.code is ErrorCode.UNAVAILABLE:
            raise self.error
        models = {m: {"workers": 1, "queued_requests": 0} for w in self.workers for m in w["models"]}
        return {"instance_id": "fake", "models": models, "workers": self.workers, "stats": {}}
