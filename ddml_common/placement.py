"""Placement by demand: which pool worker loads or unloads which model. Pure: no sockets, no clock.

Every pool worker runs the same PlacementPolicy.plan() over the same View (the demand and holdings
every broker reports, merged by merge_reports()) and performs only the actions that name its own
pool id. docs/placement.md says why the plans of different workers agree, and why they settle.

    view = merge_reports(reports_from_each_broker, own=me)
    for action in policy.plan(view, now):
        if action.pool_id == me.pool_id: ...   # Unload: drain, then unload; Load: load

Rules, in the order plan() applies them:
1. Scale up. A model gets a replica when it has fewer than min-replicas, or when it has inputs
   queued and no replica, or when its oldest input has waited scale_up_wait_s (or more than
   scale_up_queue inputs wait per replica) and it has fewer than max-replicas; never while one
   replica of it is loading. The replica goes to the worker with the most free room, else to one
   that has room once it evicts: first models without demand, then models with demand only for a
   model that has starved for starve_wait_s; within each, the lowest recent rate (rate_per_s) first,
   then the least recently used (without demand) or the longest resident (with demand).
   Nothing is evicted before it has been loaded min_residency_s, nor below its min-replicas: the
   min-replicas holders of a model ranked first (lowest rank(pool_id, model)) are protected.
2. Scale down. A model without demand for idle-unload-s loses one replica per plan, down to
   min-replicas (never a protected one); a model over its max-replicas (an operator's override
   lowered it) loses one replica per plan at once, and one unloaded by the operator (max 0) once it
   has no demand left.
An operator's Override (the management API) replaces a model's min-replicas and max-replicas; the
highest version wins, whatever the order it arrives in (merge_overrides).
Every tie is broken by rank(pool_id, model), the same on every worker.
"""

from __future__ import annotations

import enum
import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ddml_common.protocol import MAX_ID, MAX_REPLICAS
from ddml_common.repository import Placement


class Kind(enum.Enum):
    LOAD = "load"
    UNLOAD = "unload"  # a worker drains the model first: it is never unloaded with inputs in flight


@dataclass(frozen=True)
class Action:
    kind: Kind
    pool_id: str
    model: str
    reason: str  # "demand", "min-replicas", "evicted for MODEL", "idle"


@dataclass(frozen=True)
class Demand:
    """One model's demand, summed over brokers."""

    queued: int = 0  # inputs waiting in a broker queue
    oldest_wait_s: float = 0.0  # of the oldest of them
    in_flight: int = 0  # inputs sent to a worker and not answered
    rate_per_s: float = 0.0  # inputs answered per second, recently
    fixed: int = 0  # fixed replicas (workers started with --model): counted, never moved

    @property
    def active(self) -> bool:
        return self.queued > 0 or self.in_flight > 0


@dataclass(frozen=True)
class PoolWorker:
    pool_id: str
    catalog: frozenset[str]  # models it may load
    held: Mapping[str, float] = field(default_factory=dict)  # model -> memory it takes, MB (0: not measured)
    loading: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()  # models whose load failed here: not planned here again
    max_models: int = 1
    budget_mb: float = 0.0  # 0: no memory budget

    @property
    def used_mb(self) -> float:
        return sum(self.held.values())

    def holds(self, model: str) -> bool:
        return model in self.held or model in self.loading


@dataclass(frozen=True)
class Override:
    """An operator's change to one model's placement (gateway/management.py): it replaces the
    repository's min-replicas and max-replicas (None: the repository's); `unloaded` holds the model at
    no pool replica until a later override loads it. Of two overrides of a model, the higher version
    wins (the gateway's time.time_ns(), past every version it has seen); equal versions are ordered by
    their content, so that every peer keeps the same one whatever the order they arrive in."""

    version: int
    min_replicas: int | None = None
    max_replicas: int | None = None
    unloaded: bool = False

    def order(self) -> tuple:
        return (self.version, self.unloaded, -1 if self.min_replicas is None else self.min_replicas,
                -1 if self.max_replicas is None else self.max_replicas)

    def applied_to(self, spec: Placement) -> Placement:
        if self.unloaded:
            return replace(spec, min_replicas=0, max_replicas=0)
        low = spec.min_replicas if self.min_replicas is None else self.min_replicas
        high = spec.max_replicas if self.max_replicas is None else self.max_replicas
        return replace(spec, min_replicas=min(low, high) if self.max_replicas is not None else low,
                       max_replicas=high if self.max_replicas is not None else max(low, high))

    def to_wire(self) -> dict:
        wire: dict = {"version": self.version, "unloaded": self.unloaded}
        if self.min_replicas is not None:
            wire["min_replicas"] = self.min_replicas
        if self.max_replicas is not None:
            wire["max_replicas"] = self.max_replicas
        return wire

    @staticmethod
    def from_wire(value: Any) -> "Override | None":
        """An override as the wire carries it, or None if it is malformed (never raises)."""
        if not isinstance(value, Mapping) or set(value) - {"version", "min_replicas", "max_replicas", "unloaded"}:
            return None
        version, unloaded = value.get("version"), value.get("unloaded", False)
        low, high = value.get("min_replicas"), value.get("max_replicas")
        if type(version) is not int or not 0 <= version <= MAX_ID or type(unloaded) is not bool:
            return None
        for count in (low, high):
            if count is not None and (type(count) is not int or not 0 <= count <= MAX_REPLICAS):
                return None
        if low is not None and high is not None and low > high:
            return None
        return Override(version, low, high, unloaded)


def merge_overrides(*maps: Mapping[str, Override]) -> dict[str, Override]:
    """Per model, the override of the highest order(): the same result in any order of the maps."""
    merged: dict[str, Override] = {}
    for overrides in maps:
        for model, override in overrides.items():
            held = merged.get(model)
            if held is None or override.order() > held.order():
                merged[model] = override
    return merged


def overrides_from_wire(value: Any) -> dict[str, Override]:
    """{model: override} from the wire; malformed entries are left out."""
    overrides: dict[str, Override] = {}
    for model, entry in (value.items() if isinstance(value, Mapping) else ()):
        override = Override.from_wire(entry)
        if isinstance(model, str) and override is not None:
            overrides = merge_overrides(overrides, {model: override})
    return overrides


def overrides_to_wire(overrides: Mapping[str, Override]) -> dict:
    return {model: override.to_wire() for model, override in sorted(overrides.items())}


@dataclass(frozen=True)
class View:
    demand: Mapping[str, Demand]
    workers: Mapping[str, PoolWorker]  # by pool id
    overrides: Mapping[str, Override] = field(default_factory=dict)  # the operator's, merged over brokers


@dataclass(frozen=True)
class PolicyConfig:
    scale_up_wait_s: float = 0.5  # a further replica once the oldest input has waited this long
    scale_up_queue: int = 64  # ... or more than this many inputs wait per replica
    starve_wait_s: float = 1.0  # a model waiting this long with no replica may evict a model with demand
    min_residency_s: float = 2.0  # nothing is evicted sooner after it was loaded


def rank(pool_id: str, model: str) -> int:
    """The tie-break every worker computes alike, and that differs from model to model."""
    return zlib.crc32(f"{pool_id}/{model}".encode())


class PlacementPolicy:
    """plan() over successive views. Keeps only what time needs: when each model last had demand,
    and since when each worker has held each model (as seen in the views)."""

    def __init__(self, specs: Mapping[str, Placement], config: PolicyConfig = PolicyConfig()):
        self.specs = dict(specs)
        self.config = config
        self._last_demand_at: dict[str, float] = {}
        self._held_since: dict[tuple[str, str], float] = {}
        self._effective: dict[str, Placement] = dict(self.specs)

    def plan(self, view: View, now: float) -> list[Action]:
        """The whole pool's plan. Each model's load is chosen from the view alone, never from the loads
        planned for other models: a worker that has heard of one model's demand and not yet of
        another's must choose as one that has heard of both. So a plan may give one worker several
        loads; it performs them in order, and refuses one that would take it past its limits (the
        next plan, which sees it loading, chooses another worker)."""
        self._observe(view, now)
        self._effective = self.effective(view.overrides)
        workers = view.workers
        actions: list[Action] = []
        for model in sorted(self._wanted(view, workers), key=lambda m: self._urgency(view, workers, m)):
            chosen = self._place(view, workers, model, now)
            if chosen is not None:
                pool_id, victims, reason = chosen
                actions += [Action(Kind.UNLOAD, pool_id, victim, f"evicted for {model}") for victim in victims]
                actions.append(Action(Kind.LOAD, pool_id, model, reason))
        claimed = {a.pool_id for a in actions}  # one thing at a time: no idle unload beside a load
        # Over max-replicas: lowered by the operator, or (a safety net) two loads of one model that views a
        # report apart let through. Either way the extra replica goes, drained first.
        for model in sorted(self._effective):
            going = sum(a.kind is Kind.UNLOAD and a.model == model for a in actions)
            victim = self._over_max(view, workers, claimed, model, going, now)
            if victim is not None:
                claimed.add(victim)
                actions.append(Action(Kind.UNLOAD, victim, model,
                                      "operator" if model in view.overrides else "over max-replicas"))
        for model in sorted(self._idle_models(workers, now)):
            victim = self._scale_down(workers, claimed, model, now)
            if victim is not None:
                claimed.add(victim)
                actions.append(Action(Kind.UNLOAD, victim, model, "idle"))
        return actions

    def room_left(self, view: View, pool_id: str, model: str) -> bool:
        """Whether pool_id may still begin a load of `model` that an earlier plan gave it: whether the
        other workers of this newer view hold or load fewer than its max-replicas. A load that waited for
        its evictions to drain was chosen from a view a drain old; a worker that another had not yet heard
        of then (one that restarted) may have taken the model since, and both would load it."""
        spec = self.effective(view.overrides).get(model)
        others = sum(w.holds(model) for p, w in view.workers.items() if p != pool_id)
        return spec is not None and others < spec.max_replicas

    def effective(self, overrides: Mapping[str, Override]) -> dict[str, Placement]:
        """Each model's placement, the operator's overrides applied."""
        return {model: overrides[model].applied_to(spec) if model in overrides else spec
                for model, spec in self.specs.items()}

    # ------------------------------------------------------------------ time

    def _observe(self, view: View, now: float) -> None:
        seen = set()
        for pool_id, worker in view.workers.items():
            for model in (*worker.held, *worker.loading):
                seen.add((pool_id, model))
                self._held_since.setdefault((pool_id, model), now)
                self._last_demand_at.setdefault(model, now)  # the idle clock starts when it is first seen
        for key in [k for k in self._held_since if k not in seen]:
            del self._held_since[key]
        for model, demand in view.demand.items():
            # A model answered recently (rate_per_s: the brokers' last 10 s) had requests, though none may be
            # queued or in flight at the moment a report is taken: a steady load served fast must not look idle.
            if demand.active or demand.rate_per_s > 0:
                self._last_demand_at[model] = now

    def _resident(self, pool_id: str, model: str, now: float) -> bool:
        return now - self._held_since.get((pool_id, model), now) >= self.config.min_residency_s

    # ------------------------------------------------------------------ scale up

    def _replicas(self, workers: Mapping[str, PoolWorker], model: str) -> int:
        return sum(w.holds(model) for w in workers.values())

    def _protected(self, workers: Mapping[str, PoolWorker], pool_id: str, model: str) -> bool:
        """Whether pool_id's replica of model is one of its min-replicas loaded holders ranked first: never
        a victim, never scaled down. Each eviction checked against the replica count alone could, in one
        plan, take two replicas of a model at min-replicas (one per worker); the protected set depends on
        the view alone, so every plan keeps it whole."""
        keep = self._effective[model].min_replicas
        if keep <= 0:
            return False
        holders = sorted((rank(p, model), p) for p, w in workers.items() if model in w.held)
        return pool_id in {p for _, p in holders[:keep]}

    def _wanted(self, view: View, workers: Mapping[str, PoolWorker]) -> list[str]:
        wanted = []
        for model, spec in self._effective.items():
            if any(model in w.loading for w in workers.values()):
                continue  # one load of a model at a time
            pool = self._replicas(workers, model)
            if pool >= spec.max_replicas:
                continue
            demand = view.demand.get(model, Demand())
            replicas = pool + demand.fixed
            if pool < spec.min_replicas:
                wanted.append(model)
            elif replicas == 0 and demand.queued > 0:
                wanted.append(model)
            elif replicas > 0 and (demand.oldest_wait_s >= self.config.scale_up_wait_s
                                   or demand.queued > self.config.scale_up_queue * replicas):
                wanted.append(model)
        return wanted

    def _urgency(self, view: View, workers: Mapping[str, PoolWorker], model: str) -> tuple:
        """Models below min-replicas first, then those with no replica, then the longest wait."""
        demand = view.demand.get(model, Demand())
        replicas = self._replicas(workers, model) + demand.fixed
        return (self._replicas(workers, model) >= self._effective[model].min_replicas, replicas > 0,
                -demand.oldest_wait_s, model)

    def _memory_of(self, workers: Mapping[str, PoolWorker], model: str) -> float:
        measured = [w.held[model] for w in workers.values() if w.held.get(model, 0.0) > 0]
        return max(measured) if measured else self._effective[model].memory_mb

    def _place(self, view: View, workers: Mapping[str, PoolWorker], model: str,
               now: float) -> tuple[str, list[str], str] | None:
        demand = view.demand.get(model, Demand())
        below_min = self._replicas(workers, model) < self._effective[model].min_replicas
        reason = "min-replicas" if below_min else "demand"
        starving = (demand.queued > 0 and self._replicas(workers, model) + demand.fixed == 0
                    and demand.oldest_wait_s >= self.config.starve_wait_s)
        need_mb = self._memory_of(workers, model)
        best: tuple | None = None
        for pool_id, worker in workers.items():
            # A worker that is loading another model may still be chosen: it loads this one next. Were it
            # passed over, two workers that each saw the other's load still running would both take this one.
            if model not in worker.catalog or model in worker.failed or worker.holds(model):
                continue
            if _fits(worker, need_mb, []):
                # Free room counts what it loads as what it holds (as _fits does): a load that ends between two
                # workers' views must not change whom they choose (tests/unit/test_placement_views.py).
                room = worker.max_models - len(worker.held) - len(worker.loading)
                key = (0, -room, 0.0, rank(pool_id, model))
                candidate = (pool_id, [], reason)
            elif demand.queued > 0:
                victims = self._victims(view, workers, worker, need_mb, starving, now)
                if victims is None:
                    continue
                # Which worker evicts: by rank alone, not by its victims' ages, which each worker measures
                # from the reports it heard, so that two workers with views a report apart still agree.
                key = (1, len(victims), 0.0, rank(pool_id, model))
                candidate = (pool_id, victims, reason)
            else:
                continue
            if best is None or key < best[0]:
                best = (key, candidate)
        return None if best is None else best[1]

    def _victims(self, view: View, workers: Mapping[str, PoolWorker], worker: PoolWorker, need_mb: float,
                 starving: bool, now: float) -> list[str] | None:
        """The fewest models to unload from `worker` so that a model of need_mb fits, or None."""
        candidates = []
        for model in worker.held:
            spec = self._effective.get(model)
            if spec is None or not self._resident(worker.pool_id, model, now):
                continue
            if self._replicas(workers, model) <= spec.min_replicas or self._protected(workers, worker.pool_id, model):
                continue
            demand = view.demand.get(model, Demand())
            active = demand.active
            if active and not starving:
                continue
            # No demand first, then those with demand; within each, the lowest recent rate first (while every
            # client waits on a cold model, the hot ones have nothing queued or in flight, and were answered as
            # recently as the cold ones: the rate tells them apart); then the least recently used, or, with
            # demand, the longest resident.
            order = (active, demand.rate_per_s, self._last_demand_at.get(model, -math.inf) if not active
                     else self._held_since.get((worker.pool_id, model), now), model)
            candidates.append((order, model))
        victims: list[str] = []
        for _, model in sorted(candidates):
            victims.append(model)
            if _fits(worker, need_mb, victims):
                return victims
        return None

    # ------------------------------------------------------------------ scale down

    def _idle_models(self, workers: Mapping[str, PoolWorker], now: float) -> set[str]:
        idle = set()
        for worker in workers.values():
            for model in worker.held:
                spec = self._effective.get(model)
                if spec is not None and now - self._last_demand_at.get(model, now) >= spec.idle_unload_s:
                    idle.add(model)
        return idle

    def _over_max(self, view: View, workers: Mapping[str, PoolWorker], claimed: set[str], model: str,
                  going: int, now: float) -> str | None:
        """A replica over the model's max-replicas, beyond the `going` unloads of it already planned.
        Lowered by the operator: unloaded at once, whatever its residency (the worker drains it first),
        and the last one only once the model has no demand, so that what the brokers accepted before the
        operator's unload is answered. Let through by two loads that raced (a safety net): once resident,
        and never one of the min-replicas holders ranked first."""
        spec = self._effective[model]
        if sum(model in w.held for w in workers.values()) - going <= spec.max_replicas:
            return None  # (one still loading counts once it is loaded: it may yet fail)
        if spec.max_replicas == 0 and view.demand.get(model, Demand()).active:
            return None
        operator = model in view.overrides
        holders = [pool_id for pool_id, w in workers.items() if model in w.held and pool_id not in claimed
                   and (operator or (self._resident(pool_id, model, now)
                                     and not self._protected(workers, pool_id, model)))]
        return max(holders, key=lambda pool_id: rank(pool_id, model), default=None)

    def _scale_down(self, workers: Mapping[str, PoolWorker], claimed: set[str], model: str,
                    now: float) -> str | None:
        if self._replicas(workers, model) <= self._effective[model].min_replicas:
            return None
        holders = [pool_id for pool_id, w in workers.items()
                   if model in w.held and pool_id not in claimed and self._resident(pool_id, model, now)
                   and not self._protected(workers, pool_id, model)]
        return max(holders, key=lambda pool_id: rank(pool_id, model), default=None)


def _fits(worker: PoolWorker, need_mb: float, victims: Iterable[str]) -> bool:
    victims = set(victims)
    models = len(worker.held) - len(victims) + len(worker.loading) + 1
    if models > worker.max_models:
        return False
    if worker.budget_mb <= 0:
        return True
    used_mb = sum(mb for m, mb in worker.held.items() if m not in victims)
    return used_mb + need_mb <= worker.budget_mb


# ---------------------------------------------------------------------- reports


def merge_reports(reports: Iterable[Mapping[str, Any]], own: PoolWorker | None = None,
                  overrides: Mapping[str, Override] | None = None) -> View:
    """The View from every broker's report (Heartbeat.demand), each a JSON-like map that decode()
    bounded but whose shape is checked here: what is malformed is left out, never raised.

    Demand is summed over brokers (each queues its own requests), the oldest wait is the largest,
    fixed replicas the largest (every broker sees every worker); pool workers are the union by pool
    id. `own`, this worker's first-hand state, stands in for it only while no broker reports it: every
    worker plans from what the brokers say, itself included, so that two workers that heard the same
    reports make the same plan (a worker that knew itself better than the others know it would choose
    differently from them, and two of them could take the same load). The operator's overrides are
    merged by version with `overrides` (those this worker holds already)."""
    demand: dict[str, Demand] = {}
    workers: dict[str, PoolWorker] = {}
    rejoining: set[str] = set()  # pool ids whose entry so far is a rejoining one
    merged = dict(overrides or {})
    for report in reports:
        if not isinstance(report, Mapping):
            continue
        merged = merge_overrides(merged, overrides_from_wire(report.get("overrides")))
        models = report.get("models")
        for name, figures in (models.items() if isinstance(models, Mapping) else ()):
            if not isinstance(figures, Mapping):
                continue
            old = demand.get(name, Demand())
            demand[name] = Demand(
                queued=old.queued + _count(figures.get("queued")),
                oldest_wait_s=max(old.oldest_wait_s, _count(figures.get("oldest_wait_ms")) / 1000),
                in_flight=old.in_flight + _count(figures.get("in_flight")),
                rate_per_s=old.rate_per_s + _count(figures.get("rate_per_s")),
                fixed=max(old.fixed, _count(figures.get("fixed"))),
            )
        pool = report.get("pool")
        for pool_id, entry in (pool.items() if isinstance(pool, Mapping) else ()):
            worker = _pool_worker(pool_id, entry)
            if worker is None:
                continue
            # A broker that has not heard the worker since it (re)registered knows only what it holds: another
            # broker's entry, whatever the order of the reports, says what it loads and failed to load too.
            if pool_id not in workers or (pool_id in rejoining and entry.get("rejoining") is not True):
                workers[pool_id] = worker
                (rejoining.add if entry.get("rejoining") is True else rejoining.discard)(pool_id)
    if own is not None and own.pool_id not in workers:
        workers[own.pool_id] = own
    return View(demand, workers, merged)


def _pool_worker(pool_id: Any, entry: Any) -> PoolWorker | None:
    if not isinstance(pool_id, str) or not isinstance(entry, Mapping):
        return None
    held = entry.get("held")
    held = {m: float(_count(mb)) for m, mb in held.items() if isinstance(m, str)} if isinstance(held, Mapping) else {}
    return PoolWorker(pool_id, catalog=_names(entry.get("catalog")), held=held, loading=_names(entry.get("loading")),
                      failed=_names(entry.get("failed")), max_models=max(1, int(_count(entry.get("max_models")))),
                      budget_mb=float(_count(entry.get("budget_mb"))))


def _names(value: Any) -> frozenset[str]:
    if isinstance(value, Mapping):
        value = list(value)
    return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else frozenset()


def _count(value: Any) -> float:
    """A non-negative finite number, else 0."""
    if type(value) in (int, float) and math.isfinite(value) and value > 0:
        return value
    return 0
