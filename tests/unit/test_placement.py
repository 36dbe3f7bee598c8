"""The placement policy: examples of each rule, then Hypothesis properties of its invariants."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ddml_common.placement import (Action, Demand, Kind, PlacementPolicy, PolicyConfig, PoolWorker, View,
                                   merge_reports, rank)
from ddml_common.repository import Placement

MODELS = ("a", "b", "c", "d")
SPECS = {m: Placement(min_replicas=0, max_replicas=2, idle_unload_s=30.0, memory_mb=100.0) for m in MODELS}


def worker(pool_id, held=(), loading=(), max_models=1, budget_mb=0.0, catalog=MODELS, failed=()):
    return PoolWorker(pool_id, frozenset(catalog), {m: 100.0 for m in held}, frozenset(loading), frozenset(failed),
                      max_models, budget_mb)


def view(workers, **demand):
    return View({m: d for m, d in demand.items()}, {w.pool_id: w for w in workers})


def ours(actions, pool_id):
    return [(a.kind, a.model) for a in actions if a.pool_id == pool_id]


def test_a_queued_model_with_no_replica_is_loaded_on_the_freest_worker():
    policy = PlacementPolicy(SPECS)
    actions = policy.plan(view([worker("w1", held=["b"], max_models=2), worker("w2", max_models=2)],
                               a=Demand(queued=1)), now=0.0)
    assert actions == [Action(Kind.LOAD, "w2", "a", "demand")]


def test_no_demand_means_no_load_and_a_model_loading_gets_no_second_load():
    policy = PlacementPolicy(SPECS)
    assert policy.plan(view([worker("w1"), worker("w2")]), now=0.0) == []
    waiting = Demand(queued=500, oldest_wait_s=9.0)
    assert policy.plan(view([worker("w1", loading=["a"]), worker("w2")], a=waiting), now=0.0) == []


def test_min_replicas_are_loaded_without_demand():
    policy = PlacementPolicy({**SPECS, "a": Placement(min_replicas=1, max_replicas=2)})
    assert policy.plan(view([worker("w1")]), now=0.0) == [Action(Kind.LOAD, "w1", "a", "min-replicas")]


def test_a_full_worker_evicts_a_model_without_demand_only_after_its_residency():
    policy = PlacementPolicy(SPECS, PolicyConfig(min_residency_s=5.0))
    full = [worker("w1", held=["b"])]
    assert policy.plan(view(full, a=Demand(queued=1)), now=0.0) == []  # b was loaded just now (as first seen)
    assert policy.plan(view(full, a=Demand(queued=1)), now=6.0) == [
        Action(Kind.UNLOAD, "w1", "b", "evicted for a"), Action(Kind.LOAD, "w1", "a", "demand")]


def test_a_model_with_demand_is_evicted_only_for_a_starving_one_and_never_below_min_replicas():
    config = PolicyConfig(min_residency_s=0.0, starve_wait_s=2.0)
    policy = PlacementPolicy(SPECS, config)
    busy = [worker("w1", held=["b"])]
    assert policy.plan(view(busy, a=Demand(queued=1, oldest_wait_s=1.0), b=Demand(in_flight=3)), now=0.0) == []
    assert ours(policy.plan(view(busy, a=Demand(queued=1, oldest_wait_s=2.5), b=Demand(in_flight=3)), now=1.0),
                "w1") == [(Kind.UNLOAD, "b"), (Kind.LOAD, "a")]
    pinned = PlacementPolicy({**SPECS, "b": Placement(min_replicas=1, max_replicas=1)}, config)
    assert pinned.plan(view(busy, a=Demand(queued=1, oldest_wait_s=9.0)), now=0.0) == []


def test_the_least_recently_used_model_without_demand_is_evicted_first():
    policy = PlacementPolicy(SPECS, PolicyConfig(min_residency_s=0.0))
    w = worker("w1", held=["b", "c"], max_models=2)
    policy.plan(view([w], b=Demand(in_flight=1), c=Demand(in_flight=1)), now=0.0)
    policy.plan(view([w], c=Demand(in_flight=1)), now=5.0)  # b's last demand: 0; c's: 5
    assert ours(policy.plan(view([w], a=Demand(queued=1)), now=6.0), "w1") == [(Kind.UNLOAD, "b"), (Kind.LOAD, "a")]


def test_an_idle_model_scales_down_to_min_replicas_one_replica_per_plan():
    policy = PlacementPolicy({**SPECS, "a": Placement(min_replicas=1, max_replicas=3, idle_unload_s=10.0)})
    pool = [worker("w1", held=["a"]), worker("w2", held=["a"]), worker("w3", held=["a"])]
    assert policy.plan(view(pool), now=0.0) == []
    assert policy.plan(view(pool), now=9.0) == []
    [first] = policy.plan(view(pool), now=10.0)
    assert (first.kind, first.model, first.reason) == (Kind.UNLOAD, "a", "idle")
    remaining = [w for w in pool if w.pool_id != first.pool_id]
    [second] = policy.plan(view(remaining), now=11.0)
    assert second.kind is Kind.UNLOAD
    assert policy.plan(view([w for w in remaining if w.pool_id != second.pool_id]), now=12.0) == []


def test_a_model_served_steadily_but_seldom_queued_when_reported_is_not_unloaded_as_idle():
    """Regression, the pool simulator's seed 50 (--max-models 3): a model at 10 requests/s, each served in
    milliseconds, was seldom queued or in flight when a broker took its report, so its idle clock ran on
    and both its replicas were unloaded under steady demand. Its recent rate says it has demand."""
    policy = PlacementPolicy({**SPECS, "a": Placement(max_replicas=2, idle_unload_s=10.0)})
    pool = [worker("w1", held=["a"])]
    assert all(policy.plan(view(pool, a=Demand(rate_per_s=10.0)), now=float(t)) == [] for t in range(60))
    assert policy.plan(view(pool), now=68.0) == []  # idle 9 s
    [unload] = policy.plan(view(pool), now=69.0)
    assert (unload.kind, unload.model, unload.reason) == (Kind.UNLOAD, "a", "idle")


def test_a_worker_whose_load_failed_or_lacks_the_model_is_not_chosen():
    policy = PlacementPolicy(SPECS)
    pool = [worker("w1", failed=["a"]), worker("w2", catalog=["b"]), worker("w3")]
    assert policy.plan(view(pool, a=Demand(queued=1)), now=0.0) == [Action(Kind.LOAD, "w3", "a", "demand")]


def test_memory_budget_counts_measured_memory_first():
    policy = PlacementPolicy(SPECS)
    w = PoolWorker("w1", frozenset(MODELS), {"b": 700.0}, max_models=4, budget_mb=1000.0)
    measured = PoolWorker("w2", frozenset(MODELS), {"a": 400.0}, max_models=4, budget_mb=4000.0)
    assert policy.plan(view([w, measured], a=Demand(queued=1, oldest_wait_s=1.0)), now=0.0) == []  # w1: 700+400
    assert policy.plan(view([w], c=Demand(queued=1)), now=0.0) == [Action(Kind.LOAD, "w1", "c", "demand")]  # 100


def test_reports_of_two_brokers_are_summed_and_a_worker_sees_itself_as_the_brokers_see_it():
    own = worker("w1", held=["a"])
    reports = [
        {"models": {"a": {"queued": 3, "oldest_wait_ms": 200, "in_flight": 1, "fixed": 1}},
         "pool": {"w1": {"held": {}, "catalog": ["a"], "max_models": 1}, "w2": {"held": {"b": 50}, "catalog": ["b"]}}},
        {"models": {"a": {"queued": 2, "oldest_wait_ms": 900, "in_flight": "x", "fixed": 1}, "b": "junk"},
         "pool": {"w2": {"held": {}}, "w3": ["junk"]}},
        "junk",
    ]
    merged = merge_reports(reports, own=own)
    assert merged.demand["a"] == Demand(queued=5, oldest_wait_s=0.9, in_flight=1, fixed=1)
    assert "b" not in merged.demand
    assert dict(merged.workers["w1"].held) == {}  # as reported, not as it knows itself: see merge_reports
    assert merge_reports([], own=own).workers["w1"] is own  # until a broker reports it
    assert dict(merged.workers["w2"].held) == {"b": 50.0}
    assert set(merged.workers) == {"w1", "w2"}


# ---------------------------------------------------------------------- properties

@st.composite
def worlds(draw):
    specs = {}
    for model in MODELS:
        low = draw(st.integers(0, 1))
        specs[model] = Placement(min_replicas=low, max_replicas=draw(st.integers(max(1, low), 3)),
                                 idle_unload_s=draw(st.sampled_from([1.0, 5.0, 60.0])),
                                 memory_mb=draw(st.sampled_from([0.0, 100.0, 400.0])))
    pool = []
    for index in range(draw(st.integers(1, 4))):
        max_models = draw(st.integers(1, 3))
        budget_mb = draw(st.sampled_from([0.0, 500.0, 1000.0]))
        held: dict[str, float] = {}
        for model in draw(st.lists(st.sampled_from(MODELS), unique=True, max_size=max_models)):
            mb = specs[model].memory_mb
            if budget_mb and sum(held.values()) + mb > budget_mb:
                continue
            held[model] = mb
        loading = frozenset(draw(st.lists(st.sampled_from([m for m in MODELS if m not in held]), unique=True,
                                          max_size=max(0, min(1, max_models - len(held))))))
        pool.append(PoolWorker(f"w{index}", frozenset(draw(st.lists(st.sampled_from(MODELS), min_size=1, unique=True))),
                               held, loading, frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=1))),
                               max_models, budget_mb))
    demand = {m: Demand(queued=draw(st.integers(0, 200)), oldest_wait_s=draw(st.sampled_from([0.0, 0.6, 3.0])),
                        in_flight=draw(st.integers(0, 3)), fixed=draw(st.integers(0, 1)))
              for m in draw(st.lists(st.sampled_from(MODELS), unique=True))}
    return specs, View(demand, {w.pool_id: w for w in pool})


def apply(view_: View, actions: list[Action], specs) -> dict[str, PoolWorker]:
    """Perform a plan as pool workers do (worker/pool.py's PoolState): in order, each worker refusing
    an unload of what it does not hold, and a load of what it holds or that would exceed its limits."""
    workers = dict(view_.workers)
    for action in actions:
        w = workers[action.pool_id]
        if action.kind is Kind.UNLOAD:
            held = {m: mb for m, mb in w.held.items() if m != action.model}
            workers[action.pool_id] = PoolWorker(w.pool_id, w.catalog, held, w.loading, w.failed, w.max_models,
                                                 w.budget_mb)
            continue
        mb = max([x.held.get(action.model, 0.0) for x in view_.workers.values()] + [0.0]) \
            or specs[action.model].memory_mb
        if (w.holds(action.model) or len(w.held) + len(w.loading) + 1 > w.max_models
                or (w.budget_mb and w.used_mb + mb > w.budget_mb)):
            continue  # refused
        workers[action.pool_id] = PoolWorker(w.pool_id, w.catalog, {**w.held, action.model: mb}, w.loading,
                                             w.failed, w.max_models, w.budget_mb)
    return workers


def _two_evictions_of_one_model_at_min_replicas():
    """Hypothesis's counterexample: d (min 1, max 1) held on w0 and w1; one plan evicted d from w0 for b
    and from w1 for a, each eviction checking only that d had more than min-replicas."""
    specs = {m: Placement(min_replicas=0, max_replicas=2, idle_unload_s=30.0, memory_mb=100.0) for m in "abc"}
    specs["d"] = Placement(min_replicas=1, max_replicas=1, idle_unload_s=30.0, memory_mb=100.0)
    workers = [worker("w0", held="acd", max_models=3, catalog="b"), worker("w1", held="d", catalog="a")]
    return specs, view(workers, a=Demand(queued=1, oldest_wait_s=0.6), b=Demand(queued=1), c=Demand(in_flight=1))


def test_one_plan_never_evicts_a_model_below_min_replicas_from_two_workers_at_once():
    specs, before = _two_evictions_of_one_model_at_min_replicas()
    actions = PlacementPolicy(specs, PolicyConfig(min_residency_s=0.0)).plan(before, now=0.0)
    after = apply(before, actions, specs)
    assert sum(w.holds("d") for w in after.values()) >= 1
    assert len([a for a in actions if a.kind is Kind.UNLOAD and a.model == "d"]) == 1  # one may still go


@settings(max_examples=300, deadline=None)
@given(worlds(), st.floats(0.0, 100.0))
@example(_two_evictions_of_one_model_at_min_replicas(), 0.0)
def test_a_plan_performed_never_exceeds_limits_nor_max_replicas_and_never_goes_below_min(world, now):
    specs, before = world
    policy = PlacementPolicy(specs, PolicyConfig(min_residency_s=0.0))
    actions = policy.plan(before, now=now)
    after = apply(before, actions, specs)
    for pool_id, w in after.items():
        old = before.workers[pool_id]
        models = len(w.held) + len(w.loading)
        assert models <= max(w.max_models, len(old.held) + len(old.loading))
        if w.budget_mb:
            assert w.used_mb <= max(w.budget_mb, old.used_mb)
    loads = [a for a in actions if a.kind is Kind.LOAD]
    for model, spec in specs.items():
        count = sum(w.holds(model) for w in after.values())
        was = sum(w.holds(model) for w in before.workers.values())
        assert count <= max(spec.max_replicas, was)
        assert count >= min(spec.min_replicas, was)
        assert sum(a.model == model for a in loads) <= 1  # one load of a model per plan
        if any(model in w.loading for w in before.workers.values()):
            assert not any(a.model == model for a in loads)
    for action in loads:
        w = before.workers[action.pool_id]
        assert action.model in w.catalog and action.model not in w.failed and not w.holds(action.model)


@settings(max_examples=200, deadline=None)
@given(worlds(), st.randoms(use_true_random=False))
def test_every_worker_computes_the_same_plan_whatever_order_it_heard_of_the_pool(world, rng):
    specs, before = world
    shuffled = list(before.workers.items())
    rng.shuffle(shuffled)
    first = PlacementPolicy(specs).plan(before, now=0.0)
    second = PlacementPolicy(specs).plan(View(before.demand, dict(shuffled)), now=0.0)
    assert sorted(first, key=repr) == sorted(second, key=repr)


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_no_unload_of_a_model_before_its_residency_and_none_for_idleness_while_it_has_demand(world):
    specs, before = world
    policy = PlacementPolicy(specs, PolicyConfig(min_residency_s=5.0))
    assert not [a for a in policy.plan(before, now=0.0) if a.kind is Kind.UNLOAD]  # everything just seen
    for action in policy.plan(before, now=100.0):
        if action.reason == "idle":
            assert not before.demand.get(action.model, Demand()).active


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_a_model_with_demand_and_free_room_somewhere_gets_a_replica(world):
    specs, before = world
    actions = PlacementPolicy(specs).plan(before, now=0.0)
    planned = {a.model for a in actions if a.kind is Kind.LOAD}
    for model, demand in before.demand.items():
        if demand.queued == 0 or demand.fixed or any(w.holds(model) for w in before.workers.values()):
            continue
        room = [w for w in before.workers.values() if model in w.catalog and model not in w.failed
                and len(w.held) + len(w.loading) < w.max_models
                and (not w.budget_mb or w.used_mb + (specs[model].memory_mb or 0) <= w.budget_mb)]
        if room:
            assert model in planned


def test_steady_demand_for_what_is_held_plans_nothing_for_ever():
    """No thrash: a steady mixed load the pool can hold is left where it is."""
    policy = PlacementPolicy(SPECS, PolicyConfig(min_residency_s=0.0))
    steady = view([worker("w1", held=["a", "b"], max_models=2), worker("w2", held=["c"], max_models=2)],
                  a=Demand(in_flight=2, queued=1, oldest_wait_s=0.1), b=Demand(in_flight=1),
                  c=Demand(in_flight=4, queued=3, oldest_wait_s=0.2))
    assert all(policy.plan(steady, now=t * 0.5) == [] for t in range(200))


def test_three_models_on_two_one_model_workers_take_turns_bounded_by_residency():
    """All three in demand at once on two workers of one model each: the starving one evicts the
    longest resident, at most once per residency; every model gets served in turn."""
    config = PolicyConfig(min_residency_s=5.0, starve_wait_s=2.0)
    policy = PlacementPolicy(SPECS, config)
    held = {"w1": ["a"], "w2": ["b"]}
    loads = {m: 0 for m in "abc"}
    waiting_since = {"c": 0.0}
    for tick in range(120):  # a minute in half seconds
        now = tick * 0.5
        for m in "abc":
            if not any(m in h for h in held.values()):
                waiting_since.setdefault(m, now)
        pool = [worker(w, held=h) for w, h in held.items()]
        demand = {m: Demand(queued=5, in_flight=2 if any(m in h for h in held.values()) else 0,
                            oldest_wait_s=now - waiting_since[m] if m in waiting_since else 0.1) for m in "abc"}
        for action in policy.plan(view(pool, **demand), now):
            if action.kind is Kind.UNLOAD:
                held[action.pool_id].remove(action.model)
            else:
                held[action.pool_id].append(action.model)
                loads[action.model] += 1
                waiting_since.pop(action.model, None)
    assert all(count >= 2 for count in loads.values()), loads  # each got its turn, again and again
    assert sum(loads.values()) <= 2 * 60 / config.min_residency_s  # and not more often than residency allows


def test_a_worker_that_heard_of_one_models_demand_chooses_for_it_as_one_that_heard_of_both():
    """The double load the two-broker test found: demand for alpha reached a worker through one broker,
    beta's through the other; a plan for beta must not depend on whether alpha's demand was heard."""
    pool = [worker("w1", max_models=1), worker("w2", max_models=1)]
    both = PlacementPolicy(SPECS).plan(view(pool, a=Demand(queued=1), b=Demand(queued=1)), now=0.0)
    only_b = PlacementPolicy(SPECS).plan(view(pool, b=Demand(queued=1)), now=0.0)
    assert [a for a in both if a.model == "b"] == only_b


demands = st.fixed_dictionaries({m: st.builds(Demand, queued=st.integers(0, 5),
                                              oldest_wait_s=st.sampled_from([0.0, 0.6, 3.0]),
                                              in_flight=st.integers(0, 2)) for m in MODELS})


@settings(max_examples=200, deadline=None)
@given(st.lists(demands, min_size=10, max_size=80), st.sampled_from([0.25, 0.5, 1.0]))
def test_a_one_model_worker_is_given_a_load_at_most_once_per_min_residency_whatever_the_demand(ticks, step_s):
    """The churn bound behind tests/sim/pool.py's no-thrash gate: a worker of one model loads only into a
    slot that an unload emptied, and nothing is unloaded before min_residency_s, so the loads planned for
    one worker are at least min_residency_s apart, under any demand (here, one that changes every plan)."""
    config = PolicyConfig()
    policy = PlacementPolicy(SPECS, config)
    held: dict[str, list[str]] = {"w1": [], "w2": []}
    loaded_at: dict[str, float] = {}
    for tick, demand in enumerate(ticks):
        now = tick * step_s
        pool = [worker(pool_id, held=models) for pool_id, models in held.items()]
        done: set[str] = set()
        for action in policy.plan(view(pool, **demand), now):
            if action.pool_id in done:
                continue  # a worker performs its part up to its first load, then plans again
            if action.kind is Kind.UNLOAD:
                held[action.pool_id].remove(action.model)
                continue
            done.add(action.pool_id)
            if action.pool_id in loaded_at:
                assert now - loaded_at[action.pool_id] >= config.min_residency_s, (action, now, loaded_at)
            loaded_at[action.pool_id] = now
            held[action.pool_id].append(action.model)
        assert all(len(models) <= 1 for models in held.values())


def test_a_load_planned_before_a_drain_has_room_left_only_while_the_others_hold_fewer_than_max_replicas():
    policy = PlacementPolicy(SPECS)  # max 2
    one_other = view([worker("w0", held="a"), worker("w1", loading="a"), worker("w2")])
    assert policy.room_left(one_other, "w1", "a")  # its own reservation does not count
    two_others = view([worker("w0", held="a"), worker("w1", loading="a"), worker("w2", loading="a")])
    assert not policy.room_left(two_others, "w1", "a")


def test_the_model_answered_at_the_lowest_recent_rate_is_evicted_first_though_none_is_queued():
    """While every client waits on a cold model, the hot ones have nothing queued or in flight and were
    answered as recently as the others: their rate keeps them (bench/zipf_pool.py)."""
    policy = PlacementPolicy(SPECS, PolicyConfig(min_residency_s=0.0))
    w = worker("w1", held=["a", "b"], max_models=2)
    hot_a = view([w], a=Demand(rate_per_s=40.0), b=Demand(rate_per_s=0.5), c=Demand(queued=8))
    assert ours(policy.plan(hot_a, now=0.0), "w1") == [(Kind.UNLOAD, "b"), (Kind.LOAD, "c")]
    hot_b = view([w], a=Demand(rate_per_s=0.5), b=Demand(rate_per_s=40.0), c=Demand(queued=8))
    assert ours(PlacementPolicy(SPECS, PolicyConfig(min_residency_s=0.0)).plan(hot_b, now=0.0), "w1") == \
        [(Kind.UNLOAD, "a"), (Kind.LOAD, "c")]


def test_a_replica_over_max_replicas_that_racing_loads_let_through_is_unloaded_with_no_override():
    """A safety net: two loads of one model from views a report apart (tests/integration/test_pool.py saw
    it under load) left a second replica over max-replicas 1 that only idle-unload-s would ever remove."""
    specs = {**SPECS, "a": Placement(min_replicas=0, max_replicas=1, idle_unload_s=300.0, memory_mb=100.0)}
    policy = PlacementPolicy(specs)
    busy = view([worker("w1", held=["a"]), worker("w2", held=["a"])], a=Demand(queued=3, in_flight=1))
    assert policy.plan(busy, now=0.0) == []  # just seen: a replica stays min_residency_s, as any other
    actions = policy.plan(busy, now=PolicyConfig().min_residency_s)
    unloads = [(a.pool_id, a.model, a.reason) for a in actions if a.kind is Kind.UNLOAD]
    keeper = min(("w1", "w2"), key=lambda pool_id: rank(pool_id, "a"))
    assert unloads == [({"w1", "w2"}.difference({keeper}).pop(), "a", "over max-replicas")]
    assert policy.plan(view([worker(keeper, held=["a"]), worker("w9")], a=Demand(queued=3)), now=9.0) == []
