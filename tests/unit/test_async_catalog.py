"""AsyncCatalog: one fetch for every request that waits on it, at most CACHE_S old, errors as the blocking Catalog's."""

from __future__ import annotations

import asyncio

import pytest

from ddml_common.protocol import ErrorCode
from gateway.async_catalog import AsyncCatalog
from gateway.broker_error import BrokerError
from gateway.catalog import CACHE_S
from tests.fakes import FakeClock


class SlowBroker:
    """Answers status() when released; counts the calls."""

    def __init__(self):
        self.calls = 0
        self.release = asyncio.Event()
        self.error: BrokerError | None = None

    async def status(self, timeout_s: float, every_broker: bool) -> dict:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return {"models": {"echo": {"workers": 1}}, "workers": [], "calls": self.calls}


def test_concurrent_requests_share_one_fetch_and_the_copy_lasts_cache_s():
    async def scenario():
        clock = FakeClock()
        broker = SlowBroker()
        catalog = AsyncCatalog(broker, clock=clock)
        waiting = [asyncio.ensure_future(catalog.refresh()) for _ in range(5)]
        await asyncio.sleep(0)
        broker.release.set()
        await asyncio.gather(*waiting)
        assert broker.calls == 1 and catalog.status()["calls"] == 1
        clock.advance(CACHE_S / 2)
        await catalog.refresh()
        assert broker.calls == 1  # still fresh
        clock.advance(CACHE_S)
        broker.release.clear()
        refreshing = asyncio.ensure_future(catalog.refresh())
        await asyncio.sleep(0)
        await asyncio.wait_for(catalog.refresh(), 1)  # a copy exists: the second caller does not wait
        assert catalog.status()["calls"] == 1
        broker.release.set()
        await refreshing
        assert broker.calls == 2 and catalog.status()["calls"] == 2

    asyncio.run(scenario())


def test_a_failed_fetch_is_what_status_reports_until_one_succeeds():
    async def scenario():
        clock = FakeClock()
        broker = SlowBroker()
        broker.release.set()
        broker.error = BrokerError(ErrorCode.UNAVAILABLE, "down")
        catalog = AsyncCatalog(broker, clock=clock)
        await catalog.refresh()  # never raises
        with pytest.raises(BrokerError, match="down"):
            catalog.status()
        assert catalog.version_served("echo") is None  # the methods that never raise still do not
        broker.error = None
        await catalog.refresh()  # retried at once, not after CACHE_S
        assert catalog.model("echo") == {"workers": 1}

    asyncio.run(scenario())


def test_metadata_and_version_follow_each_new_copy_and_a_failed_fetch():
    """They are remembered per copy (the request path asks for both on every request): a new copy, or a
    failed fetch, must show at once."""
    copies = iter([
        {"models": {"m": {"workers": ["w"], "metadata": {"a": 1}}, "m@1": {"workers": ["w"]}}, "workers": []},
        {"models": {"m": {"workers": ["w"], "metadata": {"a": 2}}, "m@2": {"workers": ["w"]}}, "workers": []},
    ])

    class Broker:
        error: BrokerError | None = None

        async def status(self, timeout_s: float, every_broker: bool) -> dict:
            if self.error is not None:
                raise self.error
            return next(copies)

    async def scenario():
        clock, broker = FakeClock(), Broker()
        catalog = AsyncCatalog(broker, clock=clock)
        await catalog.refresh()
        assert (catalog.metadata("m"), catalog.version_served("m")) == ({"a": 1}, "1")
        assert (catalog.metadata("m"), catalog.version_served("m")) == ({"a": 1}, "1")  # remembered
        clock.advance(CACHE_S * 2)
        await catalog.refresh()
        assert (catalog.metadata("m"), catalog.version_served("m")) == ({"a": 2}, "2")
        broker.error = BrokerError(ErrorCode.UNAVAILABLE, "gone")
        clock.advance(CACHE_S * 2)
        await catalog.refresh()
        assert (catalog.metadata("m"), catalog.version_served("m")) == ({}, None)  # never raise: "unknown"

    asyncio.run(scenario())
