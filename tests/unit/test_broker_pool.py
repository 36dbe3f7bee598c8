"""The broker and pool workers (docs/placement.md): catalogs, holdings, cold start, demand reports."""

from __future__ import annotations

import pytest

from broker.core import BrokerCore, Peer
from ddml_common import protocol
from tests.unit.test_core import CONFIG, Wire, frames, step

POOL_READY = protocol.Ready([], max_batch_size=8, max_batches=2,
                            pool={"id": "p1", "catalog": ["a", "b"], "max_models": 1, "budget_mb": 0})


def ask(core: BrokerCore, request_id: str, model: str, now: float, timeout_ms: int = 5000) -> None:
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(
        request_id, model, timeout_ms, inputs=[protocol.encode_value(request_id)])), now)


def holdings(held=(), loading=(), failed=None) -> list[bytes]:
    return frames(protocol.Heartbeat(registration=1, pool={"held": {m: 10.0 for m in held}, "loading": list(loading),
                                                            "failed": failed or {}}))


def test_a_request_for_a_model_a_pool_worker_may_load_waits_and_runs_once_it_is_loaded():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    step(core, wire, 0.0)
    wire.take(b"w1", protocol.Heartbeat)
    ask(core, "r1", "a", now=1.0)
    step(core, wire, 1.0)
    assert wire.take(b"gw", protocol.Reply) == []  # waiting, not refused
    [heartbeat] = wire.take(b"w1", protocol.Heartbeat)  # at once, not at the next interval
    assert heartbeat.demand["models"]["a"]["queued"] == 1
    assert heartbeat.demand["pool"]["p1"]["catalog"] == ["a", "b"]
    core.on_frames(Peer.WORKER, b"w1", holdings(loading=["a"]), 1.1)
    step(core, wire, 1.1)
    assert wire.take(b"w1", protocol.Batch) == []
    core.on_frames(Peer.WORKER, b"w1", holdings(held=["a"]), 1.5)
    step(core, wire, 1.5)
    [batch] = wire.take(b"w1", protocol.Batch)
    assert batch.model == "a"
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), 1.6)
    step(core, wire, 1.6)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.ok and reply.request_id == "r1"
    [worker] = core.status("", 1.6).workers
    assert worker["models"] == ["a"] and worker["pool"]["held_mb"] == {"a": 10.0}


def test_a_model_in_no_catalog_is_still_404_and_one_every_pool_worker_failed_to_load_is_503():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", holdings(failed={"b": "out of memory"}), 2.9)
    ask(core, "r1", "zzz", now=3.5)  # past the start-up grace, when workers may still be rejoining
    ask(core, "r2", "b", now=3.5)
    step(core, wire, 3.5)
    replies = {r.request_id: r for r in wire.take(b"gw", protocol.Reply)}
    assert replies["r1"].error_code == protocol.ErrorCode.NO_SUCH_MODEL.value
    assert replies["r2"].error_code == protocol.ErrorCode.UNAVAILABLE.value
    assert "out of memory" in replies["r2"].error_message and replies["r2"].retry_after_ms > 0


def test_an_unloaded_model_gets_no_more_batches_and_its_waiting_request_times_out_once():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", holdings(held=["a"]), 0.1)
    core.on_frames(Peer.WORKER, b"w1", holdings(), 0.2)  # it drains a
    ask(core, "r1", "a", now=0.5, timeout_ms=1000)
    step(core, wire, 0.5)
    assert wire.take(b"w1", protocol.Batch) == []
    step(core, wire, 1.6)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == protocol.ErrorCode.TIMEOUT.value


def test_fixed_workers_get_no_demand_report_and_are_counted_as_fixed_replicas():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"fixed", frames(protocol.Ready(["a"], max_batch_size=4)), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    step(core, wire, 0.0)
    [plain] = wire.take(b"fixed", protocol.Heartbeat)
    [report] = wire.take(b"w1", protocol.Heartbeat)
    assert plain.demand == {}
    assert report.demand["models"]["a"] == {"fixed": 1}
    assert protocol.decode(protocol.encode(report)) == report  # within the protocol's bounds


@pytest.mark.parametrize("pool", [
    {"id": "", "catalog": ["a"], "max_models": 1, "budget_mb": 0},
    {"id": "p", "catalog": [], "max_models": 1, "budget_mb": 0},
    {"id": "p", "catalog": ["a"], "max_models": 0, "budget_mb": 0},
    {"id": "p", "catalog": ["a"], "max_models": 1, "budget_mb": -1},
    {"id": "p", "catalog": [3], "max_models": 1, "budget_mb": 0},
])
def test_a_pool_registration_out_of_bounds_does_not_decode(pool):
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(protocol.Ready([], max_batch_size=1, pool=pool)))


@pytest.mark.parametrize("pool", [{"held": {"a": -1}}, {"held": ["a"]}, {"loading": [""]},
                                  {"failed": {"a": 3}}, {"held": {"": 1.0}}])
def test_holdings_out_of_bounds_do_not_decode(pool):
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(protocol.Heartbeat(pool=pool)))


def test_a_ready_without_models_decodes_only_from_a_pool_worker():
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(protocol.Ready([], max_batch_size=1)))
    assert protocol.decode(protocol.encode(POOL_READY)) == POOL_READY
    assert protocol.encode(protocol.Heartbeat("i")) == protocol.encode(protocol.Heartbeat("i", pool={}, demand={}))


def test_requests_waiting_for_a_model_whose_only_load_failed_get_503_at_once_not_at_their_deadline():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    ask(core, "r1", "a", now=0.5, timeout_ms=60_000)
    ask(core, "r2", "b", now=0.5, timeout_ms=60_000)
    core.on_frames(Peer.WORKER, b"w1", holdings(loading=["a"]), 0.6)
    step(core, wire, 0.6)
    assert wire.take(b"gw", protocol.Reply) == []
    core.on_frames(Peer.WORKER, b"w1", holdings(failed={"a": "CUDA out of memory"}), 0.9)
    step(core, wire, 0.9)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.request_id == "r1" and reply.error_code == protocol.ErrorCode.UNAVAILABLE.value
    assert "CUDA out of memory" in reply.error_message
    assert core.in_flight_requests == 1  # r2, for b, still waits


def test_an_answered_request_leaves_no_phantom_input_in_status_or_the_demand_report():
    """Found by the pool-metrics work: a request answered UNAVAILABLE while no worker served its model
    left its input in the queue (no batch ever forms to skip it), so STATUS and the demand report said
    one input had been waiting for 59 s, and placement would load (or evict for) a request long gone."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    step(core, wire, 0.0)
    ask(core, "r1", "b", now=1.0)
    step(core, wire, 1.0)
    core.on_frames(Peer.WORKER, b"w1", holdings(failed={"b": "out of memory"}), 1.2)
    step(core, wire, 1.2)
    assert [(r.request_id, r.error_code) for r in wire.take(b"gw", protocol.Reply)] == [("r1", "UNAVAILABLE")]
    waiting = core.status("", 60.0).models["b"]
    assert (waiting["queued_items"], waiting["oldest_wait_s"]) == (0, 0.0)
    assert "b" not in core._demand_report(60.0)["models"]


def test_status_lists_every_loadable_model_with_its_replicas_loaded_and_loading():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    assert "replicas" not in str(core.status("", 0.0).models)  # no pool worker: STATUS as before
    core.on_frames(Peer.WORKER, b"fixed", frames(protocol.Ready(["a"], max_batch_size=4)), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", holdings(held=["a"], loading=["b"]), 0.1)
    models = core.status("", 0.2).models
    assert models["a"]["replicas"] == {"loaded": 2, "loading": 0, "pool_workers": ["p1"]}
    assert models["b"]["replicas"] == {"loaded": 0, "loading": 1, "pool_workers": []}
    assert models["b"]["workers"] == 0


def test_v1_models_shows_each_models_replicas_as_its_broker_reports_them():
    import falcon.testing

    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from tests.fakes import Awaitable, FakeBrokerClient

    class PoolBroker(FakeBrokerClient):
        def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
            status = super().status(timeout_s, every_broker)
            status["models"]["echo"]["replicas"] = {"loaded": 1, "loading": 0, "pool_workers": ["p1"]}
            status["models"]["cold"] = {"workers": 0, "queued_requests": 0,
                                        "replicas": {"loaded": 0, "loading": 1, "pool_workers": []}}
            return status

    app = falcon.testing.TestClient(create_app(Awaitable(PoolBroker()), GatewayConfig()))
    models = {m["name"]: m for m in app.simulate_get("/v1/models").json["models"]}
    assert models["echo"]["replicas"] == {"loaded": 1, "loading": 0, "pool_workers": ["p1"]}
    assert models["cold"]["ready"] is False and models["cold"]["replicas"]["loading"] == 1


def test_metrics_show_replicas_per_model_and_each_pool_workers_loads_and_memory():
    from prometheus_client import generate_latest

    from broker.metrics import BrokerMetrics

    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(POOL_READY), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat(
        registration=1, stats={"pool_loads": 3, "pool_evictions": 2, "pool_memory_used_mb": 10.0},
        pool={"held": {"a": 10.0}, "loading": ["b"], "failed": {}})), 0.1)
    metrics = BrokerMetrics()
    metrics.publish(core.describe(0.2))
    text = generate_latest(metrics.registry).decode()
    assert 'ddml_model_replicas{model="a",state="loaded"} 1.0' in text
    assert 'ddml_model_replicas{model="b",state="loading"} 1.0' in text
    assert 'ddml_worker_pool_loads_total{host="",worker="' in text and "} 3.0" in text
    assert "ddml_worker_pool_evictions_total" in text and "ddml_worker_pool_memory_used_bytes" in text
    with pytest.raises(protocol.DecodeError):  # what /metrics exports as a number must be one
        protocol.decode(protocol.encode(protocol.Heartbeat(stats={"pool_loads": "many"})))
