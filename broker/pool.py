"""What the broker knows of pool workers (docs/placement.md): pure, no sockets, no clock.

The broker does not decide placement. It learns each pool worker's catalog from its READY and
its holdings from its heartbeats (WorkerRegistry.set_holdings), answers requests for a model
that only a pool worker could load (can_load), and reports its demand and the pool to every
pool worker on the heartbeats it sends them (demand_report), from which each worker plans.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from broker.workers import WorkerState
from ddml_common.placement import Override, merge_overrides, overrides_from_wire, overrides_to_wire
from ddml_common.repository import Placement

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


def replicas(workers: list[WorkerState], model: str, overrides: Mapping[str, Override] | None = None) -> dict:
    """STATUS's "replicas" of a model: workers that serve it (fixed or pool), pool workers loading it, and
    its pool's min and max (the repository's, as its pool workers registered them, the operator's
    override applied; absent when no pool worker lists it)."""
    loading = [w for w in pool_workers(workers) if model in w.holdings.get("loading", ())]
    figures = {"loaded": sum(model in w.models for w in workers), "loading": len(loading),
               "pool_workers": sorted(w.pool["id"] for w in pool_workers(workers) if model in w.models)}
    override = (overrides or {}).get(model)
    failure = load_failure(workers, model, override)
    return {**figures, **limits(workers, model, override), **({"failed": failure} if failure else {})}


def load_failure(workers: Iterable[WorkerState], model: str, override: Override | None) -> str | None:
    """Why `model` cannot be loaded, if every live pool worker that lists it failed to load it since it
    heard the operator's latest override of it (a newer override clears a failure: the worker tries again)."""
    listed = [w for w in pool_workers(workers) if model in w.pool["catalog"] and not w.draining]
    why = None
    for worker in listed:
        held = worker.holdings.get("overrides", {}).get(model, {}).get("version", -1)
        why = worker.holdings.get("failed", {}).get(model)
        if why is None or (override is not None and held < override.version):
            return None
    return why


def limits(workers: Iterable[WorkerState], model: str, override: Override | None) -> dict:
    """{"min", "max", "unloaded"} of a model's pool replicas, or {} if no pool worker registered its limits."""
    registered = [w.pool["placement"][model] for w in pool_workers(workers) if model in w.pool.get("placement", {})]
    if not registered:
        return {"unloaded": True} if override is not None and override.unloaded else {}
    low, high = max(r[0] for r in registered), max(r[1] for r in registered)
    if override is not None:
        applied = override.applied_to(Placement(min_replicas=low, max_replicas=high))
        low, high = applied.min_replicas, applied.max_replicas
    return {"min": low, "max": high, "unloaded": bool(override is not None and override.unloaded)}


def take_overrides(held: Mapping[str, Override], wire: Any) -> tuple[dict[str, Override], bool]:
    """The broker's overrides merged by version with those of a message (StatusRequest.overrides, or a pool
    worker's Heartbeat.pool["overrides"]), and whether that changed any."""
    merged = merge_overrides(held, overrides_from_wire(wire))
    return merged, merged != dict(held)


def unloaded_refusal(overrides: Mapping[str, Override], workers: Iterable[WorkerState], model: str) -> str | None:
    """Why a new request for `model` is refused, if the operator unloaded it and no fixed worker serves it."""
    override = overrides.get(model)
    if override is None or not override.unloaded:
        return None
    if any(model in w.models and not w.pool and not w.draining for w in workers):
        return None
    return (f"model {model!r} is unloaded by operator; POST /v2/repository/models/{model}/load "
            f"brings it back")[:1000]


def demand_report(workers: list[WorkerState], queued: Callable[[str], int], oldest_wait_s: Callable[[str], float],
                  rate_per_s: Callable[[str], float], overrides: Mapping[str, Override] | None = None) -> dict:
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
    if overrides:
        report["overrides"] = overrides_to_wire(overrides)
    budget = _REPORT_BUDGET - 64 * len(report["models"]) - 128 * len(overrides or ())
    for worker in pool:
        holdings = worker.holdings
        # Before its first heartbeat (a broker that restarted), what its READY said it holds: reported as
        # holding nothing, another worker would load a second replica of what it holds.
        held = holdings.get("held", {m: 0.0 for m in sorted(worker.models)})
        entry = {**({} if holdings else {"rejoining": True}),  # what it loads or failed to load: not known yet
                 "held": held, "loading": holdings.get("loading", []),
                 "failed": sorted(holdings.get("failed", {})), "catalog": worker.pool["catalog"],
                 "max_models": worker.pool["max_models"], "budget_mb": worker.pool["budget_mb"]}
        budget -= 64 + sum(len(m) + 8 for m in entry["catalog"]) + 40 * len(entry["held"])
        if budget < 0:  # a worker left out plans from its own view of itself; others cannot choose it
            break
        report["pool"][worker.pool["id"]] = entry
    return report
