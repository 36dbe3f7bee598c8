"""Batch formation as pure logic: no sockets, no clock, no sleeps."""

from dataclasses import dataclass, field

from broker import batching
from broker.batching import Batcher, PendingRequest
from broker.config import BatchingConfig


@dataclass
class Worker:
    worker_id: bytes
    max_batch_size: int = 8
    model_max_batch_size: dict = field(default_factory=dict)
    max_batches: int = 1
    models: frozenset = frozenset({"m"})
    in_flight: dict = field(default_factory=dict)
    latency_ewma_s: float = 0.0
    busy_items: int = 0
    last_batch_size: int = 0
    last_compute_s: float = 0.0
    last_completed_at: float = float("-inf")
    max_inputs: int = 0
    on_probation: bool = False
    suspect_until: float | None = None
    batches_done: int = 0

    @property
    def in_flight_items(self) -> int:
        return self.busy_items


@dataclass
class HeldBatch:
    """A batch a worker holds, as far as batching looks at it."""
    isolated: bool = False


def request(request_id: str, n: int = 1, now: float = 0.0, model: str = "m", priority: int = 0,
            sizes: list | None = None) -> PendingRequest:
    return PendingRequest(b"gw", request_id, model, [request_id.encode()] * n, sizes or [], priority,
                          enqueued_at=now, deadline_at=now + 10)


def ids(dispatch):
    return [(item.request.request_id, item.index) for item in dispatch.items]


def test_lone_request_goes_out_at_once_with_no_timer():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("r1"), now=0.0)
    [dispatch] = batcher.assign([Worker(b"w1")], now=0.0)
    assert ids(dispatch) == [("r1", 0)]
    assert batcher.next_deadline() == float("inf")


def test_batches_grow_while_workers_are_busy():
    batcher = Batcher(BatchingConfig())
    busy = Worker(b"w1", in_flight={1: HeldBatch()})
    for i in range(5):
        batcher.add(request(f"r{i}"), now=0.0)
    assert batcher.assign([busy], now=0.0) == []
    [dispatch] = batcher.assign([Worker(b"w1")], now=0.1)
    assert [rid for rid, _ in ids(dispatch)] == ["r0", "r1", "r2", "r3", "r4"]


def test_size_cap_splits_a_large_request_across_workers_in_order():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("big", n=10), now=0.0)
    first, second = batcher.assign([Worker(b"w1", max_batch_size=4), Worker(b"w2", max_batch_size=4)], now=0.0)
    assert ids(first) == [("big", i) for i in range(4)]
    assert ids(second) == [("big", i) for i in range(4, 8)]
    assert batcher.queued_items("m") == 2


def test_least_loaded_worker_wins_then_lowest_latency():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("r1"), now=0.0)
    workers = [Worker(b"busy", max_batches=2, busy_items=5), Worker(b"slow", latency_ewma_s=0.2),
               Worker(b"fast", latency_ewma_s=0.1)]
    [dispatch] = batcher.assign(workers, now=0.0)
    assert dispatch.worker_id == b"fast"


def test_workers_serving_other_models_are_not_used():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("r1", model="m"), now=0.0)
    assert batcher.assign([Worker(b"w1", models=frozenset({"other"}))], now=0.0) == []


def test_partial_batch_waits_for_max_wait_measured_from_oldest_request():
    batcher = Batcher(BatchingConfig(max_wait_s=0.010))
    batcher.add(request("r1"), now=100.000)
    batcher.add(request("r2"), now=100.008)
    idle = [Worker(b"w1", max_batch_size=8)]
    assert batcher.assign(idle, now=100.009) == []
    assert batcher.next_deadline() == 100.010
    [dispatch] = batcher.assign(idle, now=100.011)
    assert [rid for rid, _ in ids(dispatch)] == ["r1", "r2"]


def test_full_batch_does_not_wait_for_max_wait():
    batcher = Batcher(BatchingConfig(max_wait_s=10.0))
    batcher.add(request("r1", n=8), now=0.0)
    [dispatch] = batcher.assign([Worker(b"w1", max_batch_size=8)], now=0.0)
    assert len(dispatch.items) == 8


def test_answered_requests_are_skipped_and_stop_counting():
    batcher = Batcher(BatchingConfig())
    expired, live = request("expired", n=3), request("live")
    batcher.add(expired, now=0.0)
    batcher.add(live, now=0.0)
    assert batcher.queued_requests("m") == 2
    expired.done = True
    batcher.forget(expired)
    assert batcher.queued_requests("m") == 1
    [dispatch] = batcher.assign([Worker(b"w1")], now=0.0)
    assert ids(dispatch) == [("live", 0)]


def test_requeued_items_go_to_the_front_in_their_order_and_count_attempts():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("a", n=2), now=0.0)
    [first] = batcher.assign([Worker(b"w1")], now=0.0)
    batcher.add(request("b"), now=1.0)
    batcher.requeue(first.items)
    [again] = batcher.assign([Worker(b"w2")], now=2.0)
    assert ids(again) == [("a", 0), ("a", 1), ("b", 0)]
    assert [item.attempts for item in again.items] == [2, 2, 1]


def test_queue_is_full_at_max_queue_requests():
    batcher = Batcher(BatchingConfig(max_queue=2))
    batcher.add(request("r1", n=5), now=0.0)
    assert not batcher.is_full("m", request("next"))
    batcher.add(request("r2"), now=0.0)
    assert batcher.is_full("m", request("next"))


def test_queue_is_full_when_the_next_request_would_pass_max_queue_bytes():
    batcher = Batcher(BatchingConfig(max_queue_bytes=100))
    big = PendingRequest(b"gw", "big", "m", [b"x" * 60], [], 0, enqueued_at=0.0, deadline_at=10.0)
    assert not batcher.is_full("m", big)  # an empty queue always takes one request, however large
    batcher.add(big, now=0.0)
    assert batcher.queued_bytes("m") == 60
    assert not batcher.is_full("m", PendingRequest(b"gw", "s", "m", [b"y" * 40], [], 0, 0.0, 10.0))
    assert batcher.is_full("m", PendingRequest(b"gw", "l", "m", [b"y" * 41], [], 0, 0.0, 10.0))
    [dispatch] = batcher.assign([Worker(b"w1")], now=0.0)
    assert len(dispatch.items) == 1 and batcher.queued_bytes("m") == 0  # taken inputs no longer count


def test_empty_priority_levels_are_pruned_so_peer_chosen_priorities_cannot_grow_state():
    batcher = Batcher(BatchingConfig())
    worker = Worker(b"w1", max_batch_size=1)
    for priority in range(1000):
        batcher.add(request(f"r{priority}", priority=priority), now=0.0)
        batcher.assign([worker], now=0.0)
    assert len(batcher._queues["m"]) <= batching._KEPT_EMPTY_LEVELS + 1


def test_higher_priority_is_served_first():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("low"), now=0.0)
    batcher.add(request("high", priority=5), now=1.0)
    [dispatch] = batcher.assign([Worker(b"w1", max_batch_size=1)], now=1.0)
    assert ids(dispatch) == [("high", 0)]


def test_token_budget_caps_padded_batch_size():
    batcher = Batcher(BatchingConfig(max_batch_tokens=100))
    batcher.add(request("r", n=4, sizes=[10, 10, 40, 10]), now=0.0)
    [first, second] = batcher.assign([Worker(b"w1"), Worker(b"w2")], now=0.0)
    assert ids(first) == [("r", 0), ("r", 1)]  # adding the 40 would pad 3 inputs to 120 tokens
    assert ids(second) == [("r", 2), ("r", 3)]


def test_byte_budget_keeps_a_batch_within_one_message(monkeypatch):
    monkeypatch.setattr(batching, "_MAX_BATCH_BYTES", 10)
    batcher = Batcher(BatchingConfig())
    big = PendingRequest(b"gw", "big", "m", [b"x" * 25], [], 0, enqueued_at=0.0, deadline_at=10.0)
    batcher.add(request("abcd", n=3), now=0.0)  # inputs of 4 bytes each
    batcher.add(big, now=0.0)
    dispatches = batcher.assign([Worker(b"w1"), Worker(b"w2"), Worker(b"w3")], now=0.0)
    assert [ids(d) for d in dispatches] == [
        [("abcd", 0), ("abcd", 1)],  # a third would make 12 bytes
        [("abcd", 2)],
        [("big", 0)],  # alone, an input over the budget still goes: an item has its own limit
    ]


def test_one_worker_with_room_for_two_batches_gets_two():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("r", n=6), now=0.0)
    dispatches = batcher.assign([Worker(b"w1", max_batch_size=3, max_batches=2)], now=0.0)
    assert [len(d.items) for d in dispatches] == [3, 3]


def test_busy_worker_gets_a_second_batch_only_when_a_full_one_waits():
    batcher = Batcher(BatchingConfig())
    computing = Worker(b"w1", max_batch_size=4, max_batches=2, in_flight={1: HeldBatch()})
    for i in range(3):
        batcher.add(request(f"r{i}"), now=0.0)
    assert batcher.assign([computing], now=0.0) == []  # a part-batch keeps growing instead
    batcher.add(request("r3"), now=0.1)
    [dispatch] = batcher.assign([computing], now=0.1)  # full: it pipelines
    assert [rid for rid, _ in ids(dispatch)] == ["r0", "r1", "r2", "r3"]


def test_idle_worker_with_two_credits_takes_a_part_batch_at_once():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("r", n=5), now=0.0)
    dispatches = batcher.assign([Worker(b"w1", max_batch_size=4, max_batches=2)], now=0.0)
    assert [len(d.items) for d in dispatches] == [4]  # the remaining 1 waits for the next free slot


def test_isolated_items_travel_alone():
    batcher = Batcher(BatchingConfig())
    batcher.add(request("a", n=2), now=0.0)
    [first] = batcher.assign([Worker(b"w1")], now=0.0)
    for item in first.items:
        item.isolated = True
    batcher.requeue(first.items)
    batcher.add(request("b", n=2), now=1.0)
    # Each isolated item goes alone, to an idle worker, and nothing joins it there.
    dispatches = batcher.assign([Worker(b"w1", max_batches=4)], now=1.0)
    assert [ids(d) for d in dispatches] == [[("a", 0)]]
    [second] = batcher.assign([Worker(b"w1", max_batches=4)], now=1.1)
    assert ids(second) == [("a", 1)]
    [rest] = batcher.assign([Worker(b"w1", max_batches=4)], now=1.2)
    assert ids(rest) == [("b", 0), ("b", 1)]


def isolate_head(batcher: Batcher, n: int) -> None:
    """Queue a request of n inputs and mark them isolated, as after their batch failed."""
    batcher.add(request("a", n=n), now=0.0)
    [first] = batcher.assign([Worker(b"w0", max_batch_size=n)], now=0.0)
    for item in first.items:
        item.isolated = True
    batcher.requeue(first.items)


def test_an_isolated_item_waits_for_an_idle_batch_worker_not_a_busy_one_with_credit():
    batcher = Batcher(BatchingConfig())
    isolate_head(batcher, 1)
    busy = Worker(b"busy", max_batches=2, in_flight={1: HeldBatch()}, busy_items=8)
    assert batcher.assign([busy], now=1.0) == [], "a hung batch ahead of it would take it down too"
    [alone] = batcher.assign([busy, Worker(b"idle", max_batches=2)], now=1.0)
    assert (alone.worker_id, ids(alone)) == (b"idle", [("a", 0)])


def test_workers_of_a_model_with_an_isolated_input_waiting_drain_for_it_rather_than_take_other_models():
    """A worker serving two models: while model m's isolated input waits for an idle worker, the
    worker takes no second batch of y, full though it is; once idle, m's input goes to it, even
    though y comes first in the batcher's order."""
    batcher = Batcher(BatchingConfig())
    for i in range(8):  # y's queue comes first in the batcher's order
        batcher.add(request(f"y{i}", model="y"), now=0.0)
    isolate_head(batcher, 1)  # model "m"
    both = frozenset({"m", "y"})
    busy = Worker(b"w1", models=both, max_batches=2, in_flight={1: HeldBatch()}, busy_items=8)
    assert batcher.assign([busy], now=1.0) == [], "a second y batch would keep it busy for ever"
    other = Worker(b"w2", models=frozenset({"y"}), max_batches=2, in_flight={1: HeldBatch()}, busy_items=8)
    [y_batch] = batcher.assign([busy, other], now=1.0)
    assert y_batch.worker_id == b"w2", "a worker that does not serve m goes on as before"
    for i in range(8):
        batcher.add(request(f"z{i}", model="y"), now=1.0)
    first, *rest = batcher.assign([Worker(b"w1", models=both, max_batches=2)], now=1.1)
    assert (first.worker_id, ids(first)) == (b"w1", [("a", 0)])
    assert rest == [], "nothing joins the isolated input"


def test_a_continuous_worker_drains_for_another_models_isolated_input_too():
    batcher = Batcher(BatchingConfig())
    isolate_head(batcher, 1)
    batcher.add(request("y0", model="y"), now=0.5)
    both = frozenset({"m", "y"})
    holding = Worker(b"w1", models=both, max_inputs=64, max_batch_size=16, in_flight={1: HeldBatch()}, busy_items=4)
    assert batcher.assign([holding], now=1.0) == []
    first, *rest = batcher.assign([Worker(b"w1", models=both, max_inputs=64, max_batch_size=16)], now=1.1)
    assert ids(first) == [("a", 0)] and rest == []


def test_a_batch_worker_holding_an_isolated_input_takes_nothing_more_even_a_full_batch():
    batcher = Batcher(BatchingConfig())
    for i in range(8):
        batcher.add(request(f"r{i}"), now=0.0)
    quarantined = Worker(b"w1", max_batches=4, in_flight={1: HeldBatch(isolated=True)}, busy_items=1)
    assert batcher.assign([quarantined], now=1.0) == []
    [dispatch] = batcher.assign([quarantined, Worker(b"w2")], now=1.0)
    assert dispatch.worker_id == b"w2" and len(dispatch.items) == 8


def test_idle_worker_waits_for_its_last_batch_to_refill_then_goes():
    batcher = Batcher(BatchingConfig(refill_wait_max_s=0.05))
    # It just returned 4 inputs that took 0.2 s: hold for up to 0.25 × 0.2 = 50 ms for 4 to queue.
    worker = Worker(b"w1", last_batch_size=4, last_compute_s=0.2, last_completed_at=1.0)
    batcher.add(request("r0"), now=1.001)
    assert batcher.assign([worker], now=1.001) == []
    assert batcher.next_deadline() == 1.0 + 0.25 * 0.2  # the broker wakes up then
    for i in range(1, 4):
        batcher.add(request(f"r{i}"), now=1.002)
    [dispatch] = batcher.assign([worker], now=1.002)  # refilled before the hold ran out
    assert len(dispatch.items) == 4


def test_refill_hold_is_bounded_and_never_applies_at_low_load():
    config = BatchingConfig(refill_wait_max_s=0.05)
    batcher = Batcher(config)
    slow = Worker(b"w1", last_batch_size=8, last_compute_s=10.0, last_completed_at=0.0)
    batcher.add(request("r0"), now=0.0)
    assert batcher.assign([slow], now=0.049) == []  # capped at 50 ms, not 0.25 × 10 s
    [dispatch] = batcher.assign([slow], now=0.051)
    assert ids(dispatch) == [("r0", 0)]
    lone = Worker(b"w2", last_batch_size=1, last_compute_s=1.0, last_completed_at=0.0)
    batcher.add(request("r1"), now=0.0)
    assert len(batcher.assign([lone], now=0.0)) == 1  # a last batch of 1: no hold, no timer
    off = Batcher(BatchingConfig(refill_wait_max_s=0))
    off.add(request("r2"), now=0.0)
    assert len(off.assign([slow], now=0.0)) == 1


def test_refill_hold_merges_the_cohort_already_waiting_with_the_one_coming_back():
    # Closed loop split into two cohorts: B (4 clients) queued early in A's batch; A's 4 come back
    # right after it finishes. Sending B alone would keep the split forever (batches of 4, not 8).
    batcher = Batcher(BatchingConfig(refill_wait_max_s=1.0))
    worker = Worker(b"w1", last_batch_size=4, last_compute_s=1.0, last_completed_at=10.0)
    for i in range(4):
        batcher.add(request(f"b{i}"), now=9.1)
    assert batcher.assign([worker], now=10.0) == []  # 4 are queued, but none of A's 4 is back yet
    for i in range(4):
        batcher.add(request(f"a{i}"), now=10.01 + 0.01 * i)
        if i < 3:
            assert batcher.assign([worker], now=10.01 + 0.01 * i) == []
    [dispatch] = batcher.assign([worker], now=10.04)
    assert ids(dispatch) == [(f"b{i}", 0) for i in range(4)] + [(f"a{i}", 0) for i in range(4)]


def test_refill_hold_ends_when_arrivals_come_no_faster_than_during_the_batch():
    # Independent arrivals: 4 during the last 1 s batch (4/s). The hold lasts only while arrivals
    # since it finished keep 3 × that pace: 1 / 12 s with none, 2 / 12 s with one.
    batcher = Batcher(BatchingConfig(refill_wait_max_s=1.0))
    worker = Worker(b"w1", last_batch_size=4, last_compute_s=1.0, last_completed_at=10.0)
    for i in range(4):
        batcher.add(request(f"r{i}"), now=9.2 + 0.2 * i)
    assert batcher.assign([worker], now=10.0) == []
    assert batcher.next_deadline() == 10.0 + 1 / 12  # not the cap, 10.0 + 0.25 × 1 s
    batcher.add(request("r4"), now=10.05)
    assert batcher.assign([worker], now=10.05) == []
    assert batcher.next_deadline() == 10.0 + 2 / 12
    [dispatch] = batcher.assign([worker], now=10.0 + 2 / 12)
    assert len(dispatch.items) == 5


def test_refill_hold_never_delays_a_full_batch():
    batcher = Batcher(BatchingConfig(refill_wait_max_s=1.0))
    worker = Worker(b"w1", max_batch_size=4, last_batch_size=4, last_compute_s=1.0, last_completed_at=10.0)
    for i in range(4):
        batcher.add(request(f"r{i}"), now=9.5)
    [dispatch] = batcher.assign([worker], now=10.0)
    assert len(dispatch.items) == 4
