"""What the broker knows of pool workers (docs/placement.md): pure, no sockets, no clock.

The broker does not decide placement. It learns each pool worker's catalog from its READY and
its holdings from its heartbeats (WorkerRegistry.set_holdings), answers requests for a model
that only a pool worker could load (can_load), and reports its demand and the pool to every
pool worker on the heartbeats it sends them (demand_report), from which each worker plans.
"""

from __future__ import annotations

from typing import Callable, Iterable

from broker.workers import WorkerState

_REPORT_BUDGET = 1 << 19  # about what a report may weigh (protocol.MAX_DOCUMENT_SIZE is twice this)


def pool_workers(workers: Iterable[WorkerState]) -> list[WorkerState]:
    return [w for w in workers if w.pool]


def can_load(workers: Iterable[WorkerState], model: str) -> tuple[bool, str] | None:
    """Whether a live pool worker may load `model`: None if no pool worker lists it; (True, "") if one
    that has not failed to load it does; (False, why) if every one that lists it failed to load it."""
    listed = [w for w in pool_workers(workers) if model in w.pool["catalog"] and not w.draining]
    if not listed:
        return None
    failures = [w.holdings.get("failed", {}).get(model) for w in listed]
    if any(why is None for why in failures):
        return True, ""
    return False, f"every pool worker that may load model {model!r} failed to: {failures[0]}"[:1000]


def catalog(workers: Iterable[WorkerState]) -> set[str]:
    """Every model a live pool worker may load."""
    return {m for w in pool_workers(workers) for m in w.pool["catalog"]}


def replicas(workers: list[WorkerState], model: str) -> dict:
    """STATUS's "replicas" of a model: workers that serve it (fixed or pool), pool workers loading it."""
    loading = [w for w in pool_workers(workers) if model in w.holdings.get("loading", ())]
    return {"loaded": sum(model in w.models for w in workers), "loading": len(loading),
            "pool_workers": sorted(w.pool["id"] for w in pool_workers(workers) if model in w.models)}


def demand_report(workers: list[WorkerState], queued: Callable[[str], int], oldest_wait_s: Callable[[str], float],
                  rate_per_s: Callable[[str], float]) -> dict:
    """Heartbeat.demand for pool workers: per model of any catalog or held anywhere, its inputs queued,
    oldest wait, inputs in flight, recent rate and fixed replicas; per pool worker, what it holds."""
    pool = pool_workers(workers)
    names = {m for w in pool for m in w.pool["catalog"]}
    in_flight: dict[str, int] = {}
    fixed: dict[str, int] = {}
    for worker in workers:
        for batch in worker.in_flight.values():
            in_flight[batch.model] = in_flight.get(batch.model, 0) + batch.pending
        if not worker.pool and not worker.draining:
            for model in worker.models & names:
                fixed[model] = fixed.get(model, 0) + 1
    models = {}
    for model in sorted(names):
        figures = {"queued": queued(model), "oldest_wait_ms": int(oldest_wait_s(model) * 1000),
                   "in_flight": in_flight.get(model, 0), "rate_per_s": round(rate_per_s(model), 3),
                   "fixed": fixed.get(model, 0)}
        models[model] = {k: v for k, v in figures.items() if v}
    report: dict = {"models": {m: f for m, f in models.items() if f}, "pool": {}}
    budget = _REPORT_BUDGET - 64 * len(report["models"])
    for worker in pool:
        holdings = worker.holdings
        entry = {"held": holdings.get("held", {}), "loading": holdings.get("loading", []),
                 "failed": sorted(holdings.get("failed", {})), "catalog": worker.pool["catalog"],
                 "max_models": worker.pool["max_models"], "budget_mb": worker.pool["budget_mb"]}
        budget -= 64 + sum(len(m) + 8 for m in entry["catalog"]) + 40 * len(entry["held"])
        if budget < 0:  # a worker left out plans from its own view of itself; others cannot choose it
            break
        report["pool"][worker.pool["id"]] = entry
    return report
