"""Pool observability (issue #24): pool events from worker to broker to ddml-status, their metrics, the
ring's bound, the wait for a load, and decode's refusals of hostile but decodable event fields."""

from __future__ import annotations

import json
import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.core import BrokerCore, Peer
from broker.metrics import BrokerMetrics
from broker.pool_events import RING_SIZE, PoolEventRing
from ddml_common import protocol
from ddml_common.pool_events import EventKind, EventLog
from gateway.status_cli import render, render_json
from tests.fakes import FakeClock
from tests.unit.test_broker_pool import POOL_READY, ask
from tests.unit.test_core import CONFIG, Wire, frames, step


def event(seq: int, kind: str = "loaded", model: str = "a", reason: str = "demand", seconds: float = 1.5,
          age_ms: int = 0, **extra) -> dict:
    return {"seq": seq, "age_ms": age_ms, "kind": kind, "model": model, "reason": reason, "seconds": seconds,
            **extra}


def heartbeat(events: list[dict], held=("a",), loading=(), failed=None, stats=None) -> list[bytes]:
    return frames(protocol.Heartbeat(registration=1, stats=stats or {}, pool={
        "held": {m: 10.0 for m in held}, "loading": list(loading), "failed": failed or {}, "events": events}))


def samples(core: BrokerCore, now: float) -> dict[tuple, float]:
    metrics = BrokerMetrics()
    metrics.publish(core.describe(now))
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------- the worker's log


def test_a_workers_log_sends_its_events_while_recent_and_keeps_the_latest_sixteen():
    clock = FakeClock(100.0)
    log = EventLog(ttl_s=3.0, clock=clock)
    log.record(EventKind.LOAD, "a", "demand")
    clock.advance(1.25)
    log.record(EventKind.LOADED, "a", "demand", 1.25)
    assert [(e["seq"], e["kind"], e["age_ms"], e["seconds"]) for e in log.wire()] == \
        [(1, "load", 1250, 0.0), (2, "loaded", 0, 1.25)]
    clock.advance(2.0)  # the first is 3.25 s old: past the ttl, no longer sent
    assert [e["seq"] for e in log.wire()] == [2]
    for n in range(40):
        log.record(EventKind.UNLOAD, f"m{n}", "idle", seconds=math.nan)  # a NaN duration is sent as 0
    wire = log.wire()
    assert len(wire) == protocol.MAX_POOL_EVENTS and wire[-1]["seq"] == 42 and wire[-1]["seconds"] == 0.0
    protocol.decode(protocol.encode(protocol.Heartbeat(pool={"held": {}, "loading": [], "failed": {},
                                                             "events": wire})))  # what it sends decodes


def test_a_workers_long_error_is_cut_so_that_its_heartbeat_still_decodes():
    log = EventLog(ttl_s=3.0, clock=FakeClock())
    log.record(EventKind.LOAD_FAILED, "a", "demand", 0.5, error="x" * 100_000)
    [wire] = log.wire()
    assert 0 < len(wire["error"]) <= 300
    protocol.decode(protocol.encode(protocol.Heartbeat(pool={"events": [wire]})))


# ---------------------------------------------------------------------------- the broker's ring


def test_the_ring_keeps_each_event_once_however_many_heartbeats_carry_it():
    ring = PoolEventRing()
    assert [e.event.seq for e in ring.ingest("p1", "h", ["a"], [event(1), event(2)], now=10.0)] == [1, 2]
    assert ring.ingest("p1", "h", ["a"], [event(2), event(1)], now=10.5) == []  # sent again: not new
    assert [e.event.seq for e in ring.ingest("p1", "h", ["a"], [event(2), event(3)], now=11.0)] == [3]
    assert [e.event.seq for e in ring.ingest("p2", "h", ["a"], [event(1)], now=11.0)] == [1]  # another worker
    assert [(e["pool_id"], e["seq"]) for e in ring.describe(12.0)] == [("p1", 1), ("p1", 2), ("p1", 3), ("p2", 1)]


def test_the_ring_holds_the_latest_32_and_ages_them_on_the_brokers_clock():
    ring = PoolEventRing()
    for seq in range(1, 101):
        ring.ingest("p1", "h", ["a"], [event(seq, age_ms=500)], now=float(seq))
    described = ring.describe(100.0)
    assert len(described) == RING_SIZE == 32
    assert [e["seq"] for e in described] == list(range(69, 101))
    assert described[-1]["age_s"] == 0.5 and described[0]["age_s"] == 31.5
    assert "age_ms" not in described[-1]


def test_the_ring_leaves_out_events_for_models_outside_the_workers_catalog_and_kinds_it_does_not_know():
    ring = PoolEventRing()
    fresh = ring.ingest("p1", "h", ["a"], [event(1, model="zzz"), event(2, kind="teleported"), event(3)], now=1.0)
    assert [e.event.seq for e in fresh] == [3]
    assert ring.ingest("p1", "h", ["a"], [event(1, model="zzz")], now=2.0) == []


# ---------------------------------------------------------------------------- the broker core


def test_the_broker_counts_each_load_and_unload_once_by_reason_and_reports_them_in_status():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    loads = [event(1, "load", seconds=0.0), event(2, "loaded", seconds=0.7)]
    for now in (0.1, 0.3, 0.5):  # the same events on three heartbeats
        core.on_frames(Peer.WORKER, b"w1", heartbeat(loads), now)
    core.on_frames(Peer.WORKER, b"w1", heartbeat(loads + [event(3, "unload", reason="evicted for b", seconds=0.0),
                                                          event(4, "load", model="b"),
                                                          event(5, "load_failed", model="b", seconds=2.5,
                                                                error="OSError: no such file")],
                                                 held=(), failed={"b": "OSError: no such file"}), 1.0)
    step(core, wire, 1.0)
    status = protocol.decode(frames(core.status("s1", 2.0)))  # through the wire, as ddml-status gets it
    assert [(e["seq"], e["kind"], e["model"], e["reason"]) for e in status.pool_events] == [
        (1, "load", "a", "demand"), (2, "loaded", "a", "demand"), (3, "unload", "a", "evicted for b"),
        (4, "load", "b", "demand"), (5, "load_failed", "b", "demand")]
    assert status.pool_events[1]["age_s"] == pytest.approx(1.9) and status.pool_events[1]["pool_id"] == "p1"
    assert status.pool_events[4]["error"] == "OSError: no such file"
    assert status.models["a"]["pool_loads"] == {"ok": {"demand": 1}}
    assert status.models["a"]["pool_unloads"] == {"evicted": 1}
    assert status.models["b"]["pool_loads"] == {"failed": {"demand": 1}}
    figures = samples(core, 2.0)
    assert figures[("ddml_model_loads_total", (("model", "a"), ("outcome", "ok"), ("reason", "demand")))] == 1
    assert figures[("ddml_model_loads_total", (("model", "b"), ("outcome", "failed"), ("reason", "demand")))] == 1
    assert figures[("ddml_model_unloads_total", (("model", "a"), ("reason", "evicted")))] == 1
    assert figures[("ddml_model_load_seconds_count", (("model", "a"),))] == 1
    assert figures[("ddml_model_load_seconds_sum", (("model", "a"),))] == pytest.approx(0.7)
    assert figures[("ddml_model_load_seconds_bucket", (("le", "0.5"), ("model", "a")))] == 0
    assert figures[("ddml_model_load_seconds_bucket", (("le", "1.0"), ("model", "a")))] == 1


def test_a_reason_the_broker_does_not_know_is_labelled_other_so_a_peer_cannot_grow_label_values():
    core = BrokerCore(CONFIG, "i1", now=0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", heartbeat([event(n, "unload", reason=f"whim {n}") for n in range(1, 9)]), 0.1)
    unloads = {labels: v for (name, labels), v in samples(core, 0.2).items() if name == "ddml_model_unloads_total"}
    assert unloads == {(("model", "a"), ("reason", "other")): 8}


def test_a_request_that_waits_for_a_load_is_counted_with_its_wait_and_one_that_finds_a_replica_is_not():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    step(core, wire, 0.0)
    ask(core, "r1", "a", now=1.0)  # no replica of a: it waits for a load
    step(core, wire, 1.0)
    core.on_frames(Peer.WORKER, b"w1", heartbeat([event(1, "load")], held=(), loading=["a"]), 1.1)
    core.on_frames(Peer.WORKER, b"w1", heartbeat([event(1, "load"), event(2, "loaded", seconds=0.6)]), 1.75)
    step(core, wire, 1.75)
    [batch] = wire.take(b"w1", protocol.Batch)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), 1.8)
    ask(core, "r2", "a", now=2.0)  # a replica is loaded now
    step(core, wire, 2.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    assert batch.request_ids == ["r2"]
    figures = samples(core, 2.5)
    assert figures[("ddml_cold_start_wait_seconds_count", (("model", "a"),))] == 1
    assert figures[("ddml_cold_start_wait_seconds_sum", (("model", "a"),))] == pytest.approx(0.75)
    assert figures[("ddml_queue_wait_seconds_count", (("model", "a"),))] == 2


def test_pool_memory_is_exported_in_bytes_and_no_pool_series_appear_without_pool_workers():
    core = BrokerCore(CONFIG, "i1", now=0.0)
    assert not any(name.startswith(("ddml_model_", "ddml_cold_start", "ddml_worker_pool"))
                   for name, _ in samples(core, 0.1))
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", heartbeat([], stats={"pool_memory_used_mb": 10.0,
                                                            "pool_memory_budget_mb": 64.0}), 0.1)
    figures = {name: v for (name, _), v in samples(core, 0.2).items()}
    assert figures["ddml_worker_pool_memory_used_bytes"] == 10 * 2**20
    assert figures["ddml_worker_pool_memory_budget_bytes"] == 64 * 2**20


# ---------------------------------------------------------------------------- decode refuses


GOOD_STATUS_EVENT = {"pool_id": "p1", "host": "h", "age_s": 1.5, "seq": 1, "kind": "loaded", "model": "a",
                     "reason": "demand", "seconds": 0.5}


@pytest.mark.parametrize("events", [
    {"seq": 1},  # not a list
    [event(n) for n in range(17)],  # more than MAX_POOL_EVENTS
    ["loaded"],  # not a map
    [{**event(1), "extra": 1, "more": 2}],  # more entries than an event has
    [event(-1)], [event(True)], [event(1.0)], [event(1 << 63)],  # seq
    [event(1, age_ms=-1)], [event(1, age_ms=math.nan)], [event(1, age_ms=math.inf)], [event(1, age_ms="1")],
    [event(1, seconds=math.nan)], [event(1, seconds=-0.5)], [event(1, seconds=2.0**41)], [event(1, seconds=None)],
    [event(1, kind="")], [event(1, kind="k" * 257)], [event(1, kind=7)],
    [event(1, model="")], [event(1, model=["a"])], [{k: v for k, v in event(1).items() if k != "model"}],
    [event(1, reason=None)], [event(1, reason="r" * 4097)], [event(1, error=b"bytes")], [event(1, error="e" * 4097)],
])
def test_decode_refuses_a_heartbeats_hostile_events(events):
    message = protocol.Heartbeat(pool={"held": {}, "loading": [], "failed": {}, "events": events})
    with pytest.raises(protocol.DecodeError, match=r"Heartbeat\.pool\['events'\]"):
        protocol.decode(protocol.encode(message))


@pytest.mark.parametrize("events", [
    [GOOD_STATUS_EVENT] * 65,  # more than MAX_STATUS_POOL_EVENTS
    [{**GOOD_STATUS_EVENT, "pool_id": 1}], [{**GOOD_STATUS_EVENT, "host": "h" * 257}],
    [{**GOOD_STATUS_EVENT, "age_s": math.nan}], [{k: v for k, v in GOOD_STATUS_EVENT.items() if k != "age_s"}],
    [{**GOOD_STATUS_EVENT, "error": "", "x": 1}],  # more entries than an event has
    "events",
])
def test_decode_refuses_a_statuss_hostile_events(events):
    message = protocol.Status("s", "i", {}, [], {}, pool_events=events)
    with pytest.raises(protocol.DecodeError, match=r"Status\.pool_events"):
        protocol.decode(protocol.encode(message))


def test_events_within_every_bound_decode_and_a_status_without_events_keeps_its_bytes():
    heartbeat_events = [event(n, error="e" * 4096, reason="r" * 4096, seconds=2.0**40) for n in range(16)]
    decoded = protocol.decode(protocol.encode(protocol.Heartbeat(pool={"events": heartbeat_events})))
    assert decoded.pool["events"] == heartbeat_events
    decoded = protocol.decode(protocol.encode(protocol.Status("s", "i", {}, [], {}, [GOOD_STATUS_EVENT] * 64)))
    assert decoded.pool_events == [GOOD_STATUS_EVENT] * 64
    assert protocol.encode(protocol.Status("s", "i", {}, [], {})) == \
        protocol.encode(protocol.Status("s", "i", {}, [], {}, pool_events=[]))
    assert b"pool_events" not in b"".join(protocol.encode(protocol.Status("s", "i", {}, [], {})))


# ---------------------------------------------------------------------------- ddml-status


def pool_status() -> dict:
    pool_worker = {"worker_id": "aa" * 8, "host": "gpu1", "pid": 7, "device": "cuda:0", "models": ["beta"],
                   "state": "idle", "in_flight_items": 0, "batches": 3, "p50_batch_latency_ms": 1.0,
                   "last_heartbeat_age_s": 0.1,
                   "stats": {"pool_memory_used_mb": 1500.0, "pool_memory_budget_mb": 8000.0},
                   "pool": {"id": "gpu1:7:ab", "held_mb": {"beta": 1500.0}, "loading": ["gamma"], "failed": {},
                            "max_models": 2, "budget_mb": 8000.0}}
    fixed = {"worker_id": "bb" * 8, "host": "cpu1", "pid": 9, "device": "cpu", "models": ["alpha"], "state": "idle",
             "in_flight_items": 0, "batches": 0, "p50_batch_latency_ms": 0.0, "last_heartbeat_age_s": 0.2, "stats": {}}
    queue = {"workers": 1, "queued_requests": 0, "queued_items": 0, "oldest_wait_s": 0.0, "mean_batch_size": 1.0,
             "batches": 1, "redispatched": 0, "outcomes": {}}
    replicas = {"loaded": 1, "loading": 0, "pool_workers": []}
    return {"instance_id": "i1", "stats": {}, "workers": [pool_worker, fixed],
            "models": {"alpha": {**queue, "replicas": replicas}, "beta": {**queue, "replicas": replicas},
                       "gamma": {**queue, "workers": 0, "replicas": {**replicas, "loaded": 0, "loading": 1}}},
            "pool_events": [
                {"pool_id": "gpu1:7:ab", "host": "gpu1", "age_s": 30.0, "seq": 4, "kind": "unload",
                 "model": "alpha", "reason": "evicted for beta", "seconds": 0.0},
                {"pool_id": "gpu1:7:ab", "host": "gpu1", "age_s": 20.0, "seq": 6, "kind": "loaded",
                 "model": "beta", "reason": "demand", "seconds": 2.25},
                {"pool_id": "gpu1:7:ab", "host": "gpu1", "age_s": 10.0, "seq": 7, "kind": "load_failed",
                 "model": "delta", "reason": "demand", "seconds": 0.5, "error": "OSError: no weights"}]}


def test_status_shows_placements_pool_workers_and_the_latest_events_at_wall_clock_times():
    import time

    wall_now = time.mktime((2026, 12, 6, 20, 0, 0, 0, 0, -1))
    text = render(pool_status(), None, 1.0, wall_now=wall_now)
    lines = text.splitlines()
    assert "pool: 1 workers, 1 loads in progress" in lines
    placements = lines[lines.index("pool: 1 workers, 1 loads in progress") + 3:]
    [beta] = [line for line in placements if line.startswith("beta ")]
    assert beta.split() == ["beta", "1", "gpu1:7:ab", "0", "-"]
    [gamma] = [line for line in placements if line.startswith("gamma ")]
    assert gamma.split() == ["gamma", "0", "-", "1", "gpu1:7:ab"]
    [alpha] = [line for line in placements if line.startswith("alpha ")]
    assert alpha.split() == ["alpha", "1", "cpu1:9", "0", "-"]  # a fixed worker holds it
    [worker] = [line for line in lines if line.startswith("gpu1:7:ab ")]
    assert worker.split() == ["gpu1:7:ab", "cuda:0", "beta", "gamma", "-", "2/2", "1500/8000"]
    [evicted] = [line for line in lines if " unload " in line]
    assert evicted.split()[:4] == ["19:59:30", "gpu1:7:ab", "unload", "alpha"] and "evicted for beta" in evicted
    [loaded] = [line for line in lines if " loaded " in line]
    assert loaded.startswith("19:59:40") and loaded.rstrip().endswith("2.25")
    [failed] = [line for line in lines if " load_failed " in line]
    assert "demand: OSError: no weights" in failed and failed.rstrip().endswith("0.50")


def test_status_without_pool_workers_has_no_pool_tables():
    status = pool_status()
    status["workers"] = status["workers"][1:]
    status["pool_events"] = []
    for info in status["models"].values():
        del info["replicas"]
    text = render(status, None, 1.0)
    assert "pool:" not in text and "POOL-WORKER" not in text and "latest pool events" not in text


def test_status_json_keeps_every_event_with_its_wall_clock_time():
    document = json.loads(render_json(pool_status(), None, 1.0, wall_now=1000.0))
    assert [(e["seq"], e["at"], e["age_s"]) for e in document["pool_events"]] == \
        [(4, 970.0, 30.0), (6, 980.0, 20.0), (7, 990.0, 10.0)]
    assert document["workers"][0]["pool"]["max_models"] == 2
