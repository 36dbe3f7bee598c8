"""Worker registry transitions, with explicit times."""

from broker.batching import InFlightBatch, PendingRequest, WorkItem
from broker.config import HeartbeatConfig
from ddml_common.protocol import Ready
from broker.workers import WorkerRegistry


def registry(**overrides) -> WorkerRegistry:
    return WorkerRegistry(HeartbeatConfig(**{"interval_s": 1.0, "liveness": 3, "batch_timeout_floor_s": 5.0,
                                             **overrides}))


def batch(batch_id: int, worker_id: bytes, n: int = 2, now: float = 0.0) -> InFlightBatch:
    request = PendingRequest(b"gw", f"r{batch_id}", "m", [b"x"] * n, [], 0, now, now + 60)
    return InFlightBatch(batch_id, worker_id, "m", [WorkItem(request, i, now) for i in range(n)], now)


def test_registered_worker_is_idle_with_room():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=0.0)
    [worker] = workers.with_room()
    assert worker.state == "idle" and workers.serves("m") and not workers.serves("other")


def test_silent_worker_expires_after_liveness_intervals():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=0.0)
    workers.heard_from(b"w1", now=1.0)
    assert workers.expire(now=3.9) == []
    assert workers.serves("m")
    [expired] = workers.expire(now=4.1)
    assert expired.worker_id == b"w1" and len(workers) == 0
    assert not workers.serves("m")  # the cached set of served models follows expiry


def test_served_models_follow_register_and_remove():
    workers = registry()
    workers.register(b"w1", Ready(models=["a"], max_batch_size=4), now=0.0)
    assert workers.serves("a") and not workers.serves("b")
    workers.register(b"w2", Ready(models=["b"], max_batch_size=4), now=0.0)
    assert workers.serves("b")
    workers.remove(b"w1")
    assert not workers.serves("a") and workers.serves("b")


def test_busy_worker_that_misses_batch_deadline_is_expired_with_its_batch():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4, max_batches=1), now=0.0)
    workers.dispatched(batch(1, b"w1"), now=1.0)
    assert workers.with_room() == []
    workers.heard_from(b"w1", now=5.5)  # heartbeats keep coming: the I/O thread is alive, the model is not
    assert workers.expire(now=5.9) == []
    [expired] = workers.expire(now=6.1)
    assert list(expired.in_flight) == [1]


def test_batch_deadline_scales_with_recent_latency():
    workers = registry(batch_timeout_factor=5.0)
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4, max_batches=2), now=0.0)
    workers.dispatched(batch(1, b"w1"), now=0.0)
    workers.completed(b"w1", 1, compute_s=2.0)
    assert workers.batch_timeout_s(workers.get(b"w1")) == 20.0  # 5 × 2 s × 2 batches held


def test_result_for_unknown_batch_or_worker_is_none():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=0.0)
    workers.dispatched(batch(1, b"w1"), now=0.0)
    assert workers.completed(b"w1", 99, 0.1) is None
    assert workers.completed(b"ghost", 1, 0.1) is None
    assert workers.completed(b"w1", 1, 0.1).batch_id == 1
    assert workers.completed(b"w1", 1, 0.1) is None  # a second result for the same batch
    assert workers.get(b"w1").items_done == 2


def test_draining_worker_has_no_room():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=0.0)
    workers.get(b"w1").draining = True
    assert workers.with_room() == [] and workers.get(b"w1").state == "draining"


def test_register_again_returns_previous_state_with_its_batches():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=0.0)
    workers.dispatched(batch(1, b"w1"), now=0.0)
    previous = workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=1.0)
    assert list(previous.in_flight) == [1] and workers.get(b"w1").in_flight == {}


def test_heartbeats_fall_due_every_interval():
    workers = registry()
    workers.register(b"w1", Ready(models=["m"], max_batch_size=4), now=0.0)
    assert [w.worker_id for w in workers.due_for_heartbeat(now=0.0)] == [b"w1"]
    assert workers.due_for_heartbeat(now=0.5) == []
    assert workers.next_deadline() == 1.0
    assert len(workers.due_for_heartbeat(now=1.0)) == 1
