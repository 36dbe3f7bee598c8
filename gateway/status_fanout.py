"""BrokerClient.status(): ask every broker (or the preferred ones in turn) and merge their views."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from ddml_common.protocol import ErrorCode
from gateway.broker_error import BrokerError
from gateway.links import Link

if TYPE_CHECKING:
    from gateway.broker_client import BrokerClient

_STATUS_STRAGGLER_S = 0.25  # once one broker has answered, how long the others may take


def gather_status(client: BrokerClient, links: list[Link], timeout_s: float, every_broker: bool) -> dict:
    def unanswered() -> BrokerError:
        return BrokerError(ErrorCode.UNAVAILABLE, f"no broker of {client.endpoint} answered within {timeout_s} s")

    if not every_broker:
        deadline_at = time.monotonic() + timeout_s
        for link in sorted(links, key=lambda b: not b.up):
            future = client.ask(link.index, timeout_s)
            try:
                answer = future.result(timeout=max(0.0, deadline_at - time.monotonic()))
            except (FutureTimeout, BrokerError):
                continue
            return {"instance_id": answer.instance_id, "models": answer.models, "workers": answer.workers,
                    "stats": answer.stats, "brokers": [{"endpoint": link.endpoint, "role": "preferred",
                                                        "instance_id": answer.instance_id}]}
        raise unanswered()
    futures = [client.ask(link.index, timeout_s) for link in links]
    deadline_at = time.monotonic() + timeout_s
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=max(0.0, deadline_at - time.monotonic()), return_when=FIRST_COMPLETED)
        if not done:
            break
        if any(not future.exception() for future in done):
            # One broker has answered: give the others a moment, not the whole timeout (a broker
            # that died silently would otherwise hold up every status, /readyz included).
            deadline_at = min(deadline_at, time.monotonic() + _STATUS_STRAGGLER_S)
    answers = [f.result() if f.done() and not f.exception() else None for f in futures]
    preferred = next((links[i] for i, a in enumerate(answers) if a is not None), None)
    if preferred is None:
        raise unanswered()
    first = answers[preferred.index]
    brokers = []
    for link, answer in zip(links, answers):
        role = "preferred" if link is preferred else ("standby" if answer is not None else "down")
        entry = {"endpoint": link.endpoint, "role": role, "instance_id": link.instance_id}
        if answer is not None:
            entry.update(instance_id=answer.instance_id, models=answer.models, workers=answer.workers,
                         stats=answer.stats)
        brokers.append(entry)
    return {"instance_id": first.instance_id, "models": first.models, "workers": first.workers,
            "stats": first.stats, "brokers": brokers}
