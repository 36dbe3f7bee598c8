"""Each model's own max batch size on a pool worker (Ready.pool's "max_batch"), and supervised pool workers'
device slots: pure logic, no processes."""

from __future__ import annotations

import pytest

from broker.core import BrokerCore, Peer
from ddml_common import protocol
from tests.unit.test_core import CONFIG, Wire, frames, step
from worker.config import WorkerConfig
from worker.serve import device_slots

POOL = {"id": "p1", "catalog": ["big", "small"], "max_models": 2, "budget_mb": 0}


def ready(**caps) -> protocol.Ready:
    return protocol.Ready([], max_batch_size=8, max_batches=2, pool={**POOL, **caps})


def batch_sizes_of_a_full_queue(ready_message: protocol.Ready) -> list[tuple[str, int]]:
    """100 one-input requests for each model, queued before a pool worker that holds both (two batches at
    once): the model and size of each batch it is sent."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(ready_message), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat(
        registration=1, pool={"held": {"big": 1.0, "small": 1.0}, "loading": [], "failed": {}})), 0.1)
    for n in range(100):
        for model in ("big", "small"):
            core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(
                f"{model}{n}", model, 5000, inputs=[protocol.encode_value(n)])), 0.2)
    step(core, wire, 0.2)
    return [(batch.model, len(batch.inputs)) for batch in wire.take(b"w1", protocol.Batch)]


def test_each_model_is_batched_up_to_its_own_cap_on_one_pool_worker():
    assert batch_sizes_of_a_full_queue(ready(max_batch={"big": 64, "small": 8})) == [("big", 64), ("small", 8)]
    assert batch_sizes_of_a_full_queue(ready(max_batch={"big": 64})) == [("big", 64), ("small", 8)]  # small: 8
    # Without the map, every model gets the READY's one cap, as before.
    assert batch_sizes_of_a_full_queue(ready()) == [("big", 8), ("big", 8)]


def test_status_reports_each_models_own_cap():
    core = BrokerCore(CONFIG, "i1", now=0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(ready(max_batch={"big": 64, "small": 8})), 0.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat(
        registration=1, pool={"held": {"big": 1.0, "small": 1.0}, "loading": [], "failed": {}})), 0.1)
    models = core.status("", 0.2).models
    assert models["big"]["max_batch_size"] == 64 and models["small"]["max_batch_size"] == 8


def test_a_pool_registration_without_caps_keeps_its_exact_bytes_and_with_them_round_trips():
    plain = protocol.Ready([], max_batch_size=8, max_batches=2, pool=dict(POOL))
    assert b"max_batch\xa9" not in b"".join(protocol.encode(plain))  # no key "max_batch" (a fixstr of 9)
    assert protocol.decode(protocol.encode(plain)).pool == POOL
    capped = ready(max_batch={"big": 64, "small": 8})
    assert protocol.decode(protocol.encode(capped)) == capped
    assert protocol.decode(protocol.encode(ready(max_batch={}))).pool["max_batch"] == {}


@pytest.mark.parametrize("caps", [
    [64, 8],  # not a map
    {"big": 0},  # below 1
    {"big": protocol.MAX_ITEMS + 1},
    {"big": True},  # a bool is not a size
    {"big": 8.0},
    {"big": "64"},
    {"big": None},
    {"other": 8},  # not in the catalog
    {"big": 8, "small": 8, "other": 8},  # more than the catalog
])
def test_hostile_caps_do_not_decode(caps):
    with pytest.raises(protocol.DecodeError, match="max_batch"):
        protocol.decode(protocol.encode(ready(max_batch=caps)))


def test_device_slots_spread_processes_over_the_gpus_and_split_the_cpu_among_them():
    gpus = device_slots(WorkerConfig(device="auto"), 3, ["0", "1"])
    assert [gpu for gpu, _ in gpus] == ["0", "1", "0"]
    assert all(config.device == "auto" and config.torch_threads == 0 for _, config in gpus)
    cpus = device_slots(WorkerConfig(device="cpu", torch_threads=0), 2, [])
    assert [gpu for gpu, _ in cpus] == [None, None]
    assert all(config.device == "cpu" and config.torch_threads >= 1 for _, config in cpus)
