"""Retries go elsewhere, and a worker must earn trust back (issue #28, point 1): pure tests of the
batcher, the registry and the core, with a black-hole worker that takes batches and never answers."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from broker import workers as workers_module
from broker.batching import Batcher, InFlightBatch, PendingRequest, WorkItem
from broker.config import BatchingConfig, BrokerConfig, HeartbeatConfig
from broker.core import BrokerCore, Peer
from broker.workers import WorkerRegistry
from ddml_common import protocol
from ddml_common.protocol import Ready
from tests.unit.test_batching import HeldBatch, Worker
from tests.unit.test_core import Wire, frames, step

FLOOR_S = 2.0
HEARTBEAT = HeartbeatConfig(interval_s=1.0, liveness=3, batch_timeout_floor_s=FLOOR_S)


def lost_item(request_id: str, lost_on: tuple[bytes, ...]) -> tuple[PendingRequest, WorkItem]:
    request = PendingRequest(b"gw", request_id, "m", [b"x"], [], 0, enqueued_at=0.0, deadline_at=60.0)
    item = WorkItem(request, 0, enqueued_at=0.0, attempts=1, isolated=True, lost_on=lost_on)
    return request, item


# ------------------------------------------------------------------ batching


def test_an_input_lost_with_a_worker_never_goes_back_to_it_while_another_serves_its_model():
    batcher = Batcher(BatchingConfig())
    _, item = lost_item("r", (b"bad",))
    batcher.requeue([item])
    bad = Worker(b"bad")
    # Only the bad worker has room (the good one is busy): the input waits rather than go back.
    assert batcher.assign([bad], now=0.1, serves_elsewhere=lambda model, ids: True) == []
    [dispatch] = batcher.assign([bad, Worker(b"good")], now=0.2, serves_elsewhere=lambda model, ids: True)
    assert dispatch.worker_id == b"good" and dispatch.items == [item]


def test_an_input_lost_with_the_only_worker_may_run_on_it_again():
    batcher = Batcher(BatchingConfig())
    _, item = lost_item("r", (b"only",))
    batcher.requeue([item])
    [dispatch] = batcher.assign([Worker(b"only")], now=0.1, serves_elsewhere=lambda model, ids: False)
    assert dispatch.worker_id == b"only"


def test_a_worker_on_probation_is_chosen_last():
    batcher = Batcher(BatchingConfig())
    batcher.add(PendingRequest(b"gw", "r", "m", [b"x"], [], 0, enqueued_at=0.0, deadline_at=9.0), now=0.0)
    suspect = Worker(b"suspect", on_probation=True)
    busier = Worker(b"trusted", max_batch_size=1, max_batches=2, in_flight={1: HeldBatch()}, busy_items=8)
    [dispatch] = batcher.assign([suspect, busier], now=0.0)
    assert dispatch.worker_id == b"trusted"


def test_a_suspect_within_its_backoff_gets_nothing_while_another_worker_serves_its_model_but_serves_alone():
    batcher = Batcher(BatchingConfig())
    batcher.add(PendingRequest(b"gw", "r", "m", [b"x"], [], 0, enqueued_at=0.0, deadline_at=9.0), now=0.0)
    suspect = Worker(b"suspect", suspect_until=5.0, on_probation=True)
    # Another worker serves "m" (busy now): the suspect is held back, and the input waits.
    assert batcher.assign([suspect], now=0.0, serves_elsewhere=lambda model, ids: True) == []
    # It is the only worker serving "m": holding it back would fail everything, so it serves.
    [dispatch] = batcher.assign([suspect], now=0.0, serves_elsewhere=lambda model, ids: False)
    assert dispatch.worker_id == b"suspect"


# ------------------------------------------------------------------ the registry


def overrun(registry: WorkerRegistry, worker_id: bytes, now: float) -> float:
    """Register, take a batch, let it pass its deadline: returns when the worker was expired."""
    registry.register(worker_id, Ready(["m"], 4), now)
    registry.with_room(now)
    batch = InFlightBatch(1, worker_id, "m", [], dispatched_at=now)
    batch.pending = 1
    registry.dispatched(batch, now)
    expired_at = batch.deadline_at
    [dead] = registry.expire(expired_at)
    assert dead.worker_id == worker_id
    return expired_at


def test_a_worker_that_overran_a_batch_is_held_back_after_registering_again_for_a_growing_backoff():
    registry = WorkerRegistry(HEARTBEAT)
    expired_at = overrun(registry, b"bad", now=0.0)
    registry.register(b"bad", Ready(["m"], 4), expired_at)  # back within a millisecond
    [held] = registry.with_room(expired_at)
    assert held.suspect_until == expired_at + FLOOR_S  # the batcher gives it nothing while another serves
    assert registry.next_deadline() <= expired_at + FLOOR_S  # the loop wakes when the backoff ends
    [released] = registry.with_room(expired_at + FLOOR_S)
    assert released.suspect_until is None and released.on_probation and released.has_room
    # The second overrun doubles the backoff; the record survived the re-registration.
    batch = InFlightBatch(2, b"bad", "m", [], dispatched_at=expired_at + FLOOR_S)
    registry.dispatched(batch, expired_at + FLOOR_S)
    assert not released.has_room  # on probation: one batch at a time
    registry.expire(batch.deadline_at)
    assert registry.offences(b"bad").overruns == 2
    registry.register(b"bad", Ready(["m"], 4), batch.deadline_at)
    [held] = registry.with_room(batch.deadline_at + 2 * FLOOR_S - 0.01)
    assert held.suspect_until == batch.deadline_at + 2 * FLOOR_S  # twice the first backoff
    assert registry.with_room(batch.deadline_at + 2 * FLOOR_S)[0].suspect_until is None


def test_an_answered_batch_ends_probation():
    registry = WorkerRegistry(HEARTBEAT)
    expired_at = overrun(registry, b"w", now=0.0)
    registry.register(b"w", Ready(["m"], 4, max_batches=2), expired_at)
    [worker] = registry.with_room(expired_at + FLOOR_S)
    batch = InFlightBatch(2, b"w", "m", [], dispatched_at=expired_at + FLOOR_S)
    registry.dispatched(batch, expired_at + FLOOR_S)
    assert not worker.has_room
    registry.completed(b"w", 2, compute_s=0.01, now=expired_at + FLOOR_S + 0.01)
    assert not worker.on_probation and worker.has_room


def test_the_offence_record_is_bounded_against_hostile_identities(monkeypatch):
    monkeypatch.setattr(workers_module, "_OFFENCES_KEPT", 16)
    registry = WorkerRegistry(HEARTBEAT)
    for n in range(40):
        overrun(registry, b"w%d" % n, now=float(n))
    assert len(registry._offences) == 16
    assert registry.offences(b"w39") is not None and registry.offences(b"w0") is None


def test_the_backoff_is_capped():
    registry = WorkerRegistry(HEARTBEAT)
    now = 0.0
    for _ in range(40):
        now = overrun(registry, b"w", now)
        now = registry.offences(b"w").suspect_until  # held back until then
    record = registry.offences(b"w")
    assert record.overruns == 40
    registry.register(b"w", Ready(["m"], 4), now - workers_module._SUSPECT_BACKOFF_MAX_S)
    assert registry.get(b"w").suspect_until == now  # the last backoff was the cap


def test_a_new_registration_starts_from_a_pessimistic_latency_not_zero_and_keeps_the_floor_deadline():
    registry = WorkerRegistry(HEARTBEAT)
    registry.register(b"old", Ready(["m"], 4), 0.0)
    batch = InFlightBatch(1, b"old", "m", [], dispatched_at=0.0)
    registry.dispatched(batch, 0.0)
    registry.completed(b"old", 1, compute_s=0.02, now=0.02)
    registry.register(b"new", Ready(["m"], 4), 0.1)
    new, old = registry.get(b"new"), registry.get(b"old")
    assert new.latency_ewma_s > old.latency_ewma_s > 0
    assert registry.batch_timeout_s(new) == FLOOR_S  # the prior never stretches a batch's deadline
    assert new.describe(0.1)["latency_ewma_ms"] == 0.0  # nothing measured yet
    batch = InFlightBatch(2, b"new", "m", [], dispatched_at=0.1)
    registry.dispatched(batch, 0.1)
    registry.completed(b"new", 2, compute_s=0.03, now=0.13)
    assert new.latency_ewma_s == 0.03  # the first measurement replaces the prior


# ------------------------------------------------------------------ the core: a black hole beside a good worker


CORE_CONFIG = BrokerConfig(heartbeat=HEARTBEAT, batching=BatchingConfig(max_attempts=2))


def run_black_hole(arrivals: list[float], timeout_s: float, good_compute_s: float, horizon_s: float):
    """A good worker answers every batch after good_compute_s; a black hole heartbeats, takes batches,
    never answers, and registers again as soon as the broker drops it. Returns (replies, batches the
    black hole got)."""
    core, wire = BrokerCore(CORE_CONFIG, "i1", now=0.0), Wire()
    ready = frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1))
    core.on_frames(Peer.WORKER, b"bad", ready, 0.0)  # the black hole first: it would win every tie
    core.on_frames(Peer.WORKER, b"good", ready, 0.0)
    pending_good: list[tuple[float, protocol.Batch]] = []
    replies: dict[str, protocol.Reply] = {}
    black_holed = 0
    events = sorted(set(arrivals) | {round(t * 0.05, 6) for t in range(int(horizon_s / 0.05) + 1)})
    queue = sorted(arrivals)
    for now in events:
        while queue and queue[0] <= now:
            request_id = f"r{len(arrivals) - len(queue)}"
            queue.pop(0)
            core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(
                request_id, "m", int(timeout_s * 1000), inputs=[protocol.encode_value(request_id)])), now)
        for done_at, batch in [p for p in pending_good if p[0] <= now]:
            pending_good.remove((done_at, batch))
            core.on_frames(Peer.WORKER, b"good", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), now)
        for worker_id in (b"bad", b"good"):
            core.on_frames(Peer.WORKER, worker_id, frames(protocol.Heartbeat()), now)
        step(core, wire, now)
        black_holed += len(wire.take(b"bad", protocol.Batch))
        if wire.take(b"bad", protocol.Disconnect):
            core.on_frames(Peer.WORKER, b"bad", ready, now)  # re-registers at once
            step(core, wire, now)
            black_holed += len(wire.take(b"bad", protocol.Batch))
        for batch in wire.take(b"good", protocol.Batch):
            pending_good.append((now + good_compute_s, batch))
        for reply in wire.take(b"gw", protocol.Reply):
            replies[reply.request_id] = reply
        for many in wire.take(b"gw", protocol.Replies):
            for request_id in many.request_ids:
                replies[request_id] = protocol.Reply(request_id, outputs=[b""])
    return replies, black_holed


@settings(max_examples=40, deadline=None)
@given(arrivals=st.lists(st.floats(0.0, 20.0, allow_nan=False).map(lambda t: round(t, 3)), min_size=1,
                         max_size=30, unique=True),
       good_compute_s=st.sampled_from([0.01, 0.3, 1.0]))
def test_no_innocent_input_fails_while_a_good_worker_serves_beside_a_black_hole(arrivals, good_compute_s):
    replies, black_holed = run_black_hole(arrivals, timeout_s=30.0, good_compute_s=good_compute_s, horizon_s=60.0)
    assert len(replies) == len(arrivals)
    failed = {rid: (r.error_code, r.error_message) for rid, r in replies.items() if not r.ok}
    assert failed == {}, failed
    # The black hole is held back for a backoff that doubles: floor × (1 + 2 + 4 + ...) after each overrun.
    assert black_holed <= 1 + math.ceil(math.log2(1 + 60.0 / FLOOR_S)), black_holed


def test_the_issue_28_black_hole_a_retry_while_the_good_worker_is_busy_waits_for_it():
    """The failure of issue #28: the black hole's batch passes its deadline while the good worker is
    busy; the black hole registers again at once, idle, and took the retry, and lost it again."""
    replies, black_holed = run_black_hole([0.0, 1.9, 3.9, 5.9], timeout_s=30.0, good_compute_s=1.0, horizon_s=40.0)
    assert all(reply.ok for reply in replies.values()), replies
    assert len(replies) == 4 and black_holed <= 2


def core_with_request(*worker_ids: bytes) -> tuple[BrokerCore, Wire, list[bytes]]:
    """A core with these workers registered (one batch at a time each) and request "r", of one input,
    waiting; and the READY frames, to register one again."""
    core, wire = BrokerCore(CORE_CONFIG, "i1", now=0.0), Wire()
    ready = frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1))
    for worker_id in worker_ids:
        core.on_frames(Peer.WORKER, worker_id, ready, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request("r", "m", 30_000, inputs=[b"\xa1x"])), 0.0)
    return core, wire, ready


def test_poison_only_when_lost_on_distinct_workers_and_the_message_names_them():
    core, wire, ready = core_with_request(b"w1", b"w2")
    step(core, wire, 0.0)
    [first] = [s.peer_id for s in wire.sent if isinstance(s.message, protocol.Batch)]
    wire.sent.clear()
    core.on_frames(Peer.WORKER, first, frames(protocol.Disconnect("crashed")), 0.1)
    core.on_frames(Peer.WORKER, first, ready, 0.1)  # the same identity, back at once
    step(core, wire, 0.1)
    [second] = [s.peer_id for s in wire.sent if isinstance(s.message, protocol.Batch)]
    assert second != first  # elsewhere, though the first is back and idle
    core.on_frames(Peer.WORKER, second, frames(protocol.Disconnect("crashed")), 0.2)
    step(core, wire, 0.2)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == "WORKER_LOST" and "poison" in reply.error_message
    assert first.hex() in reply.error_message and second.hex() in reply.error_message
    assert "2 distinct workers" in reply.error_message


def test_poison_on_the_only_worker_says_so():
    core, wire, ready = core_with_request(b"only")
    for now in (0.0, 0.1):
        step(core, wire, now)
        assert wire.take(b"only", protocol.Batch)
        core.on_frames(Peer.WORKER, b"only", frames(protocol.Disconnect("crashed")), now)
        core.on_frames(Peer.WORKER, b"only", ready, now)
    step(core, wire, 0.2)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == "WORKER_LOST" and "the only worker that could take it (serving model 'm')" in reply.error_message


def test_an_input_lost_with_the_only_worker_runs_on_a_newcomer_rather_than_on_that_identity_back():
    core, wire, ready = core_with_request(b"w1")
    step(core, wire, 0.0)
    assert wire.take(b"w1", protocol.Batch)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Disconnect("crashed")), 0.1)  # lost on w1, alone
    core.on_frames(Peer.WORKER, b"w2", ready, 0.1)
    core.on_frames(Peer.WORKER, b"w1", ready, 0.1)
    step(core, wire, 0.1)
    assert wire.take(b"w1", protocol.Batch) == []
    [batch] = wire.take(b"w2", protocol.Batch)
    core.on_frames(Peer.WORKER, b"w2", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), 0.2)
    step(core, wire, 0.2)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.ok


def test_an_input_that_failed_with_its_batch_then_was_lost_once_is_not_called_poison():
    """Its first run failed with a whole batch (so it ran alone next), and the second was lost with a
    worker: lost with one worker only, among several, so nothing says it is a poison input."""
    core, wire = BrokerCore(CORE_CONFIG, "i1", now=0.0), Wire()
    ready = frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1))
    core.on_frames(Peer.WORKER, b"w1", ready, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(
        "r", "m", 30_000, inputs=[protocol.encode_value("a"), protocol.encode_value("b")])), 0.0)
    step(core, wire, 0.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    failed = [protocol.InputFailure(i, "MODEL_ERROR", "the batch raised") for i in range(2)]
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, [b"", b""], errors=failed)), 0.1)
    core.on_frames(Peer.WORKER, b"w2", ready, 0.1)
    step(core, wire, 0.1)
    sent = [s.peer_id for s in wire.sent if isinstance(s.message, protocol.Batch)]
    lost_with = sent[0]
    core.on_frames(Peer.WORKER, lost_with, frames(protocol.Disconnect("crashed")), 0.2)
    step(core, wire, 0.2)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == "WORKER_LOST" and "poison" not in reply.error_message, reply.error_message
    assert f"lost with worker {lost_with.hex()}" in reply.error_message


def test_a_worker_on_probation_gets_one_batch_per_round_even_with_credit_for_more():
    """Found by the simulator (seed 198): the batcher gave a worker on probation a second batch in one
    assign(), which the registry then refused as a dispatch to a full worker."""
    batcher = Batcher(BatchingConfig())
    for n in range(8):
        batcher.add(PendingRequest(b"gw", f"r{n}", "m", [b"x"], [], 0, enqueued_at=0.0, deadline_at=9.0), now=0.0)
    suspect = Worker(b"suspect", max_batch_size=2, max_batches=4, on_probation=True)
    [dispatch] = batcher.assign([suspect], now=0.0)
    assert dispatch.worker_id == b"suspect" and len(dispatch.items) == 2
    assert batcher.assign([Worker(b"suspect", max_batch_size=2, max_batches=4, on_probation=True,
                                  in_flight={1: HeldBatch()}, busy_items=2)], now=0.0) == []


def test_a_lone_worker_that_overran_a_batch_is_not_held_back_so_the_retry_runs_at_once():
    """Found by the simulator's regression for seed 1689: a worker still busy with a pass for a broker
    that restarted let the new broker's first batch pass its deadline; held back for its backoff, with no
    other worker, the retry waited, and the request failed. Alone, a suspect serves (on probation)."""
    core, wire, ready = core_with_request(b"only")
    step(core, wire, 0.0)
    assert wire.take(b"only", protocol.Batch)
    now = 0.0
    while not wire.take(b"only", protocol.Disconnect):  # heartbeats go on; the batch overruns
        now += 0.5
        core.on_frames(Peer.WORKER, b"only", frames(protocol.Heartbeat()), now)
        step(core, wire, now)
    core.on_frames(Peer.WORKER, b"only", ready, now)
    step(core, wire, now)
    [retry] = wire.take(b"only", protocol.Batch)  # at once, not after the backoff
    core.on_frames(Peer.WORKER, b"only", frames(protocol.BatchResult(retry.batch_id, retry.inputs)), now + 0.01)
    step(core, wire, now + 0.01)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.ok
