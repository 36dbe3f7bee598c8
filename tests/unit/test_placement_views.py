"""Two pool workers whose views are a report apart must still choose the same worker for a load.

Found by tests/integration/test_pool.py's two-broker test under load (2 of ~10 runs): w2 loaded beta (an
echo model: done within a millisecond) and heard alpha's demand from a broker that still reported it
*loading* beta; w1 heard it from one that reported w2 *holding* beta. Free room counted what a worker held
but not what it loaded, so w1 saw itself freer and took alpha, while w2 saw a tie, won it on rank, and took
alpha too: two replicas of a model whose max-replicas is 1, which nothing undid."""

from ddml_common.placement import Demand, Kind, PlacementPolicy, PoolWorker, View, rank
from ddml_common.repository import Placement

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
