"""The operator's overrides (issue #24, docs/placement.md): merged by version in any order, refused at
decode when malformed, applied by the policy, carried broker -> pool worker -> broker, and the
management routes' pure helpers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import BrokerCore, Peer
from ddml_common import protocol
from ddml_common.placement import (Action, Demand, Kind, Override, PlacementPolicy, PoolWorker, View,
                                   merge_overrides, merge_reports, overrides_from_wire, overrides_to_wire)
from ddml_common.repository import Placement
from gateway.management import (load_override, model_state, replicas_body, repository_index, scale_override,
                                unload_override)
from gateway.errors import GatewayError
from tests.unit.test_core import CONFIG, Wire, frames, step
from worker.pool import PoolState

SPECS = {m: Placement(min_replicas=0, max_replicas=2, idle_unload_s=30.0) for m in ("a", "b")}
POOL_READY = protocol.Ready([], max_batch_size=8, max_batches=2,
                            pool={"id": "p1", "catalog": ["a", "b"], "max_models": 2, "budget_mb": 0,
                                  "placement": {"a": [0, 2], "b": [1, 3]}})

overrides = st.builds(Override, version=st.integers(0, 5), min_replicas=st.none() | st.integers(0, 2),
                      max_replicas=st.none() | st.integers(2, 4), unloaded=st.booleans())
override_maps = st.dictionaries(st.sampled_from(["a", "b", "c"]), overrides, max_size=3)


# ------------------------------------------------------------------ merge


def test_the_higher_version_wins_and_an_older_one_arriving_late_changes_nothing():
    new, old = Override(7, 1, 2), Override(3, unloaded=True)
    assert merge_overrides({"a": new}, {"a": old}) == {"a": new}
    assert merge_overrides({"a": old}, {"a": new}) == {"a": new}


@settings(max_examples=300, deadline=None)
@given(st.lists(override_maps, max_size=5), st.randoms())
def test_the_merge_is_the_same_whatever_the_order_the_overrides_arrive_in(maps, random):
    shuffled = list(maps)
    random.shuffle(shuffled)
    assert merge_overrides(*maps) == merge_overrides(*shuffled)
    merged = merge_overrides(*maps)
    assert merge_overrides(merged, *maps) == merged  # idempotent: hearing one again changes nothing


@given(override_maps)
def test_an_override_survives_the_wire(value):
    assert overrides_from_wire(overrides_to_wire(value)) == value
    protocol.decode(protocol.encode(protocol.StatusRequest("s", overrides_to_wire(value))))


# ------------------------------------------------------------------ decode refusals


GOOD = {"version": 5, "min_replicas": 1, "max_replicas": 2, "unloaded": False}


@pytest.mark.parametrize("bad", [
    {**GOOD, "version": -1}, {**GOOD, "version": 1 << 63}, {**GOOD, "version": 1.5}, {**GOOD, "version": True},
    {**GOOD, "min_replicas": -1}, {**GOOD, "max_replicas": protocol.MAX_REPLICAS + 1}, {**GOOD, "min_replicas": "1"},
    {**GOOD, "min_replicas": 3, "max_replicas": 2}, {**GOOD, "unloaded": 1}, {**GOOD, "extra": 1},
    {"min_replicas": 1}, [5, 1, 2], "all",
])
def test_a_malformed_override_is_refused_at_decode_and_left_out_by_the_defensive_reader(bad):
    for message in (protocol.StatusRequest("s", {"a": bad}),
                    protocol.Status("s", "i", {}, [], overrides={"a": bad}),
                    protocol.Heartbeat(pool={"held": {}, "loading": [], "failed": {}, "overrides": {"a": bad}})):
        with pytest.raises(protocol.DecodeError):
            protocol.decode(protocol.encode(message))
    assert overrides_from_wire({"a": bad}) == {}
    assert overrides_from_wire({"a": bad, "b": GOOD}) == {"b": Override(5, 1, 2)}


def test_overrides_of_too_many_models_or_with_a_bad_name_are_refused():
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(protocol.StatusRequest("s", {f"m{i}": GOOD for i in range(2000)})))
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(protocol.StatusRequest("s", {"": GOOD})))


def test_a_status_request_without_overrides_keeps_its_exact_bytes():
    assert protocol.encode(protocol.StatusRequest("s")) == protocol.encode(protocol.StatusRequest("s", {}))
    assert b"overrides" not in protocol.encode(protocol.StatusRequest("s"))[0]


def test_a_bad_repository_placement_in_a_ready_is_refused():
    for bad in ({"zzz": [0, 1]}, {"a": [0]}, {"a": [0, -1]}, {"a": "0,1"}):
        ready = protocol.Ready([], 8, pool={**POOL_READY.pool, "placement": bad})
        with pytest.raises(protocol.DecodeError):
            protocol.decode(protocol.encode(ready))


# ------------------------------------------------------------------ the policy


def worker(pool_id, held=(), max_models=2):
    return PoolWorker(pool_id, frozenset(SPECS), {m: 0.0 for m in held}, max_models=max_models)


def test_an_override_of_min_replicas_loads_without_demand_and_unloaded_drains_once_demand_ends():
    policy = PlacementPolicy(SPECS)
    pool = {"w1": worker("w1"), "w2": worker("w2")}
    [load] = policy.plan(View({}, pool, {"a": Override(1, min_replicas=1)}), now=0.0)
    assert (load.kind, load.model, load.reason) == (Kind.LOAD, "a", "min-replicas")
    held = {"w1": worker("w1", held=["a"]), "w2": worker("w2", held=["a"])}
    unloaded = {"a": Override(2, unloaded=True)}
    assert policy.plan(View({"a": Demand(in_flight=3)}, held, unloaded), now=0.1) == []  # what runs ends first
    [unload] = policy.plan(View({}, held, unloaded), now=0.15)
    assert (unload.kind, unload.model, unload.reason) == (Kind.UNLOAD, "a", "operator")  # one per plan...
    quiet = View({}, {"w1": worker("w1", held=["a"])}, unloaded)
    assert policy.plan(quiet, now=0.2) == [Action(Kind.UNLOAD, "w1", "a", "operator")]  # ... and the last
    still_busy = View({"a": Demand(queued=2)}, {"w1": worker("w1", held=["a"])}, unloaded)
    assert policy.plan(still_busy, now=0.3) == []  # what was accepted is answered first
    assert policy.plan(View({"a": Demand(queued=5)}, {"w1": worker("w1")}, unloaded), now=0.4) == []  # no load


def test_a_lowered_max_unloads_the_excess_replica_at_once_and_a_raised_one_allows_more():
    policy = PlacementPolicy(SPECS)
    two = {"w1": worker("w1", held=["a"]), "w2": worker("w2", held=["a"])}
    [action] = policy.plan(View({"a": Demand(in_flight=4)}, two, {"a": Override(1, max_replicas=1)}), now=0.0)
    assert action.kind is Kind.UNLOAD and action.model == "a" and action.reason == "operator"
    assert policy.effective({"b": Override(1, max_replicas=0)})["b"] == Placement(0, 0, 30.0)
    assert policy.effective({"a": Override(1, min_replicas=5)})["a"].max_replicas == 5  # the max follows


def test_merge_reports_merges_the_brokers_overrides_with_the_workers_own():
    mine = {"a": Override(4, min_replicas=1)}
    reports = [{"overrides": {"a": {"version": 3, "unloaded": True}}},
               {"overrides": {"b": {"version": 9, "max_replicas": 1, "unloaded": False}, "c": "junk"}}]
    view = merge_reports(reports, overrides=mine)
    assert view.overrides == {"a": Override(4, min_replicas=1), "b": Override(9, max_replicas=1)}


# ------------------------------------------------------------------ broker and pool worker


def test_a_pool_worker_keeps_the_newest_override_and_hands_it_back_and_a_new_one_clears_a_failure():
    state = PoolState("p1", ["a", "b"], 2, 0.0, report_ttl_s=1.0)
    state.fail_load("a", "out of memory")
    state.on_demand(0, {"overrides": {"a": {"version": 5, "min_replicas": 1, "unloaded": False}}}, now=0.0)
    state.on_demand(1, {"overrides": {"a": {"version": 2, "unloaded": True}}}, now=0.0)  # older, from broker two
    assert state.overrides() == {"a": Override(5, min_replicas=1)}
    holdings = state.holdings()
    assert holdings["overrides"] == {"a": {"version": 5, "min_replicas": 1, "unloaded": False}}
    assert holdings["failed"] == {}  # the operator's load tries again
    protocol.decode(protocol.encode(protocol.Heartbeat(pool=holdings)))


def test_a_restarted_broker_learns_the_overrides_back_from_its_pool_workers_and_refuses_an_unloaded_model():
    core, wire = BrokerCore(CONFIG, "i2", now=0.0), Wire()  # a broker that never heard the gateway
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat(registration=1, pool={
        "held": {}, "loading": [], "failed": {}, "overrides": {"a": {"version": 5, "unloaded": True}}})), 0.1)
    step(core, wire, 0.2)
    [heartbeat] = wire.take(b"w1", protocol.Heartbeat)[-1:]
    assert heartbeat.demand["overrides"] == {"a": {"version": 5, "unloaded": True}}  # on to every pool worker
    status = core.status("s", 0.2)
    assert status.overrides == {"a": {"version": 5, "unloaded": True}}
    assert status.models["a"]["replicas"]["unloaded"] is True and status.models["b"]["replicas"]["min"] == 1
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request("r1", "a", 5000, [protocol.encode_value(1)])), 0.3)
    step(core, wire, 0.3)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == protocol.ErrorCode.UNAVAILABLE.value and "unloaded by operator" in reply.error_message
    # A gateway's newer override (a load) replaces it, and is in the broker's answer.
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.StatusRequest("s2", {"a": {
        "version": 6, "min_replicas": 1, "unloaded": False}})), 0.4)
    step(core, wire, 0.4)
    [answer] = wire.take(b"gw", protocol.Status)
    assert answer.overrides["a"]["version"] == 6 and answer.models["a"]["replicas"]["min"] == 1


# ------------------------------------------------------------------ the management routes' helpers


def views(replicas_a: dict, overrides: dict | None = None, workers=0) -> list[dict]:
    return [{"models": {"a": {"workers": workers, "replicas": replicas_a}, "fixed": {"workers": 1}},
             "workers": [{"models": ["fixed"]}], "overrides": overrides or {}}]


def test_states_and_reasons_of_the_index():
    assert model_state(views({"loaded": 0, "loading": 0, "min": 0, "max": 1}), "a") == (
        "UNAVAILABLE", "no replica; loads on demand")
    assert model_state(views({"loaded": 0, "loading": 1, "min": 1, "max": 1}), "a") == ("LOADING", "")
    assert model_state(views({"loaded": 0, "loading": 0, "min": 1, "max": 1, "failed": "OSError: x"}), "a") == (
        "UNAVAILABLE", "OSError: x")
    assert model_state(views({"loaded": 0, "loading": 0, "min": 0, "max": 0, "unloaded": True}), "a") == (
        "UNAVAILABLE", "unloaded by operator")
    index = repository_index(views({"loaded": 1, "loading": 0, "min": 0, "max": 1}, workers=1))
    assert index == [{"name": "a", "version": "1", "state": "READY", "reason": ""},
                     {"name": "fixed", "version": "1", "state": "READY", "reason": ""}]


def test_load_and_unload_keep_what_the_operator_set_before():
    limits = {"loaded": 0, "loading": 0, "min": 0, "max": 3}
    scaled = views(limits, {"a": {"version": 1, "min_replicas": 2, "max_replicas": 3, "unloaded": False}})
    unload = unload_override(scaled, "a", 2)
    assert unload == Override(2, 2, 3, unloaded=True)
    after = views({**limits, "min": 0, "max": 0, "unloaded": True}, {"a": unload.to_wire()})
    assert load_override(after, "a", 3) == Override(3, 2, 3)
    assert load_override(views(limits), "a", 4) == Override(4, 1)
    assert scale_override(views(limits), "a", 5, 4, None) == Override(5, 4, 4)  # min past max: max follows


@pytest.mark.parametrize("body", [{}, {"min": -1}, {"max": 1.5}, {"min": True}, {"min": 3, "max": 1},
                                  {"minimum": 1}, [1, 2], {"max": protocol.MAX_REPLICAS + 1}])
def test_a_bad_replicas_body_is_400(body):
    with pytest.raises(GatewayError):
        replicas_body(body)
    assert replicas_body({"min": 1, "max": 2}) == (1, 2) and replicas_body({"max": 0}) == (None, 0)


def test_a_restarted_broker_reports_a_rejoining_pool_worker_as_holding_what_its_ready_said():
    """Regression (the operator simulation found it): before the worker's first heartbeat the broker reported it
    as holding nothing, and another pool worker, planning from that report, loaded a second replica over max."""
    core, wire = BrokerCore(CONFIG, "i3", now=0.0), Wire()
    rejoining = protocol.Ready(["a"], max_batch_size=8, max_batches=2, pool=POOL_READY.pool)
    core.on_frames(Peer.WORKER, b"w1", frames(rejoining), 0.0)
    step(core, wire, 0.0)
    [heartbeat] = wire.take(b"w1", protocol.Heartbeat)[-1:]
    assert heartbeat.demand["pool"]["p1"]["held"] == {"a": 0.0}


def test_what_waits_for_an_unloaded_model_is_refused_once_its_last_replica_is_gone():
    """Regression (the operator simulation): the unload came while a replica still served the model, and the
    replica then went (an eviction); what was queued for it waited for a load that would never come."""
    core, wire = BrokerCore(CONFIG, "i4", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat(registration=1, pool={
        "held": {"a": 1.0}, "loading": [], "failed": {}})), 0.1)
    for n in range(20):  # more than two batches of 8: the rest queue
        core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(f"r{n}", "a", 5000, [protocol.encode_value(n)])),
                       0.3)
    step(core, wire, 0.3)
    sent = [b for b in wire.take(b"w1", protocol.Batch)]
    assert sum(len(b.request_ids) for b in sent) < 20
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.StatusRequest("s", {"a": {"version": 1, "unloaded": True}})),
                   0.4)
    step(core, wire, 0.4)
    assert wire.take(b"gw", protocol.Reply) == []  # a replica still serves it: the queue is answered by it
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat(registration=1, pool={
        "held": {}, "loading": ["b"], "failed": {}})), 0.5)  # evicted for b
    step(core, wire, 0.5)
    replies = wire.take(b"gw", protocol.Reply)
    assert len(replies) == 20 - sum(len(b.request_ids) for b in sent)
    assert all("unloaded by operator" in r.error_message for r in replies)


def test_a_pool_worker_refuses_a_load_planned_before_the_operator_unloaded_the_model():
    """Regression (the operator simulation): a load planned before the unload, performed once its evictions
    had drained, loaded the unloaded model."""
    state = PoolState("p1", ["a", "b"], 2, 0.0, report_ttl_s=1.0)
    state.on_demand(0, {"overrides": {"a": {"version": 3, "unloaded": True}}}, now=0.0)
    assert "unloaded by operator" in state.begin_load("a", 0.0)
    assert state.begin_load("b", 0.0) == ""


def test_a_rejoining_entry_yields_to_another_brokers_whatever_the_order_of_the_reports():
    """Regression (the operator simulation): a restarted broker knew a rejoining worker's holdings but not that it
    was loading flaky, nor that flaky had failed there; a worker that heard its report first loaded a second
    replica. Every report order now gives the same view."""
    full = {"pool": {"p1": {"held": {"a": 1.0}, "loading": ["flaky"], "failed": ["b"], "catalog": ["a", "b", "flaky"],
                            "max_models": 2}}}
    rejoining = {"pool": {"p1": {"rejoining": True, "held": {"a": 0.0}, "loading": [], "failed": [],
                                 "catalog": ["a", "b", "flaky"], "max_models": 2}}}
    for reports in ([full, rejoining], [rejoining, full]):
        worker = merge_reports(reports).workers["p1"]
        assert worker.loading == {"flaky"} and worker.failed == {"b"}
    assert merge_reports([rejoining]).workers["p1"].held == {"a": 0.0}  # alone, it stands
