"""Two pool workers whose views are a report apart must still choose the same worker for a load.

Found by tests/integration/test_pool.py's two-broker test under load (2 of ~10 runs): w2 loaded beta (an
echo model: done within a millisecond) and heard alpha's demand from a broker that still reported it
*loading* beta; w1 heard it from one that reported w2 *holding* beta. Free room counted what a worker held
but not what it loaded, so w1 saw itself freer and took alpha, while w2 saw a tie, won it on rank, and took
alpha too: two replicas of a model whose max-replicas is 1, which nothing undid. Two cures, each tested
here: free room counts loads as holdings, and a worker acts on no plan while a broker's report shows it
otherwise than it is (worker/pool.py: PoolState.reported_as_it_is)."""

import pytest

from ddml_common.placement import Demand, Kind, PlacementPolicy, PoolWorker, View, rank
from ddml_common.repository import Placement
from worker.pool import PoolState

SPECS = {m: Placement(min_replicas=0, max_replicas=1, idle_unload_s=120.0) for m in ("alpha", "beta")}
CATALOG = frozenset(SPECS)


def loads_of(w2: PoolWorker) -> list[tuple[str, str]]:
    pool = {"w1": PoolWorker("w1", CATALOG, max_models=2), "w2": w2}
    actions = PlacementPolicy(SPECS).plan(View({"alpha": Demand(queued=30)}, pool), now=0.0)
    return [(a.pool_id, a.model) for a in actions if a.kind is Kind.LOAD]


def test_a_load_that_ends_between_two_views_does_not_change_whom_they_choose_for_the_next():
    assert rank("w2", "alpha") < rank("w1", "alpha")  # a tie goes to w2: the case that loaded alpha twice
    still_loading = loads_of(PoolWorker("w2", CATALOG, loading=frozenset({"beta"}), max_models=2))
    loaded = loads_of(PoolWorker("w2", CATALOG, held={"beta": 0.1}, max_models=2))
    assert still_loading == loaded == [("w1", "alpha")]


def report(entry=None) -> dict:
    return {"models": {"alpha": {"queued": 30}}, "pool": {} if entry is None else {"w2": entry}}


def test_a_worker_does_not_act_on_a_report_that_is_behind_its_own_load_and_does_once_it_catches_up():
    """The cure at the worker: w2 plans nothing on a report that does not yet show the load it made."""
    state = PoolState("w2", ["alpha", "beta"], max_models=2, budget_mb=0.0, report_ttl_s=3.0)
    state.on_demand(0, report({"held": {}, "loading": [], "catalog": ["alpha", "beta"], "max_models": 2}), now=0.0)
    assert state.reported_as_it_is(now=0.0)  # nothing done yet: the report is right
    assert state.begin_load("beta", 0.0) == ""
    state.finish_load("beta", handler=object(), memory_mb=0.1, load_s=0.001)
    assert not state.reported_as_it_is(now=0.01)  # the report still shows w2 empty: w2 waits
    state.on_demand(1, report({"held": {"beta": 0.1}, "loading": []}), now=0.01)
    assert not state.reported_as_it_is(now=0.01)  # one broker has heard, the other's report is still behind
    state.on_demand(0, report({"held": {"beta": 0.1}, "loading": []}), now=0.02)
    assert state.reported_as_it_is(now=0.02)
    state.on_demand(1, report(), now=0.03)  # a report that leaves w2 out (its budget) says nothing of it
    assert state.reported_as_it_is(now=0.03)
    state.reserve("alpha")  # announced as loading before its evictions drain: the reports must show that too
    assert not state.reported_as_it_is(now=0.04)
    assert state.reported_as_it_is(now=10.0)  # reports older than report_ttl_s are not read


@pytest.mark.parametrize("entry", [{"held": 5, "loading": None}, {"held": [{"a": 1}], "loading": [["x"]]}, "w2"])
def test_a_malformed_entry_for_itself_is_read_as_holding_nothing_never_raised(entry):
    state = PoolState("w2", ["alpha"], max_models=1, budget_mb=0.0, report_ttl_s=3.0)
    state.on_demand(0, {"pool": {"w2": entry}}, now=0.0)
    assert state.reported_as_it_is(now=0.0)
