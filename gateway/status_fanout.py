"""BrokerClient.status() and AsyncBrokerClient.status(): ask every broker (or the preferred ones in
turn) and merge their views. The waiting differs (threads' Futures, or the event loop); what is
asked, for how long, and the merged answer are one code."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from ddml_common.protocol import ErrorCode
from gateway.broker_error import BrokerError
from gateway.links import Link

if TYPE_CHECKING:
    from gateway.async_transport import AsyncBrokerClient
    from gateway.broker_client import BrokerClient

_STATUS_STRAGGLER_S = 0.25  # once one broker has answered, how long the others may take


def gather_status(client: BrokerClient, links: list[Link], timeout_s: float, every_broker: bool,
                  overrides: dict | None = None) -> dict:
    if not every_broker:
        deadline_at = time.monotonic() + timeout_s
        for link in _preferred_first(links):
            future = client.ask(link.index, timeout_s)
            try:
                answer = future.result(timeout=max(0.0, deadline_at - time.monotonic()))
            except (FutureTimeout, BrokerError):
                continue
            return _one_view(link, answer)
        raise _unanswered(client, timeout_s)
    futures = [client.ask(link.index, timeout_s, overrides) for link in links]
    deadline_at = time.monotonic() + timeout_s
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=max(0.0, deadline_at - time.monotonic()), return_when=FIRST_COMPLETED)
        if not done:
            break
        if any(not future.exception() for future in done):
            deadline_at = _after_first_answer(deadline_at)
    answers = [f.result() if f.done() and not f.exception() else None for f in futures]
    return _merged(client, links, answers, timeout_s)


async def gather_status_async(client: AsyncBrokerClient, links: list[Link], timeout_s: float,
                              every_broker: bool, overrides: dict | None = None) -> dict:
    """(With `overrides`, every broker merges the operator's overrides before it answers: gateway/management.py.)"""
    if not every_broker:
        deadline_at = time.monotonic() + timeout_s
        for link in _preferred_first(links):
            try:
                answer = await asyncio.wait_for(client.ask(link.index, timeout_s),
                                                max(0.0, deadline_at - time.monotonic()))
            except (TimeoutError, BrokerError):
                continue
            return _one_view(link, answer)
        raise _unanswered(client, timeout_s)
    tasks = [asyncio.ensure_future(client.ask(link.index, timeout_s, overrides)) for link in links]
    deadline_at = time.monotonic() + timeout_s
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline_at - time.monotonic()),
                                           return_when=asyncio.FIRST_COMPLETED)
        if not done:
            break
        if any(not task.exception() for task in done):
            deadline_at = _after_first_answer(deadline_at)
    for task in pending:
        task.cancel()
    answers = [t.result() if t.done() and not t.cancelled() and not t.exception() else None for t in tasks]
    return _merged(client, links, answers, timeout_s)


def _preferred_first(links: list[Link]) -> list[Link]:
    return sorted(links, key=lambda b: not b.up)


def _after_first_answer(deadline_at: float) -> float:
    """One broker has answered: give the others a moment, not the whole timeout (a broker that
    died silently would otherwise hold up every status, /readyz included)."""
    return min(deadline_at, time.monotonic() + _STATUS_STRAGGLER_S)


def _unanswered(client: Any, timeout_s: float) -> BrokerError:
    return BrokerError(ErrorCode.UNAVAILABLE, f"no broker of {client.endpoint} answered within {timeout_s} s")


def _one_view(link: Link, answer) -> dict:
    return {"instance_id": answer.instance_id, "models": answer.models, "workers": answer.workers,
            "stats": answer.stats, "pool_events": answer.pool_events,
            "brokers": [{"endpoint": link.endpoint, "role": "preferred", "instance_id": answer.instance_id}]}


def _merged(client: Any, links: list[Link], answers: list, timeout_s: float) -> dict:
    preferred = next((links[i] for i, a in enumerate(answers) if a is not None), None)
    if preferred is None:
        raise _unanswered(client, timeout_s)
    first = answers[preferred.index]
    brokers = []
    for link, answer in zip(links, answers):
        role = "preferred" if link is preferred else ("standby" if answer is not None else "down")
        entry = {"endpoint": link.endpoint, "role": role, "instance_id": link.instance_id}
        if answer is not None:
            entry.update(instance_id=answer.instance_id, models=answer.models, workers=answer.workers,
                         stats=answer.stats, overrides=answer.overrides)
        brokers.append(entry)
    return {"instance_id": first.instance_id, "models": first.models, "workers": first.workers,
            "stats": first.stats, "pool_events": first.pool_events, "brokers": brokers}
