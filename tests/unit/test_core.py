"""BrokerCore as a pure state machine: frames and times in, sends out. No sockets, no clock."""

from __future__ import annotations

import pytest

from broker.config import BatchingConfig, BrokerConfig, HeartbeatConfig
from broker.core import BrokerCore, Peer, Send
from broker.metrics import BrokerMetrics
from ddml_common import protocol

CONFIG = BrokerConfig(heartbeat=HeartbeatConfig(interval_s=1.0, liveness=3, batch_timeout_floor_s=5.0),
                      batching=BatchingConfig(max_attempts=2))


class Wire:
    """Collects what the core sends; sends to peers in `gone` fail, as ROUTER_MANDATORY makes them."""

    def __init__(self):
        self.sent: list[Send] = []
        self.gone: set[bytes] = set()

    def __call__(self, instruction: Send) -> bool:
        if instruction.peer_id in self.gone:
            return False
        self.sent.append(instruction)
        return True

    def take(self, peer_id: bytes, kind: type) -> list:
        found = [s.message for s in self.sent if s.peer_id == peer_id and isinstance(s.message, kind)]
        self.sent = [s for s in self.sent if not (s.peer_id == peer_id and isinstance(s.message, kind))]
        return found


def frames(message: protocol.Message) -> list[bytes]:
    return protocol.encode(message)


def request(request_id: str, count: int = 1, timeout_ms: int = 5000) -> list[bytes]:
    inputs = [protocol.encode_value(f"{request_id}/{i}") for i in range(count)]
    return frames(protocol.Request(request_id, "m", timeout_ms, inputs=inputs))


def step(core: BrokerCore, wire: Wire, now: float) -> None:
    core.on_tick(now)
    core.flush(wire, now)


def test_batches_whose_sends_fail_go_back_unrun_and_the_next_worker_gets_them():
    """The crash of the broker-core issue: an idle worker dies unnoticed, an 8-input request needs two of
    its batches, the first send fails and forgets it; the second must not raise, and nothing is lost."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=2)), 0.0)
    step(core, wire, 0.0)
    wire.gone.add(b"w1")  # SIGKILLed while idle
    core.on_frames(Peer.GATEWAY, b"gw", request("r", count=8), 0.1)
    step(core, wire, 0.1)
    assert core.stats["internal_errors"] == 0 and core.stats["workers_lost"] == 1
    assert core.status("", 0.1).models["m"]["queued_items"] == 8
    core.on_frames(Peer.WORKER, b"w2", frames(protocol.Ready(["m"], max_batch_size=8, max_batches=1)), 0.2)
    step(core, wire, 0.2)
    [batch] = wire.take(b"w2", protocol.Batch)
    assert [protocol.decode_value(x) for x in batch.inputs] == [f"r/{i}" for i in range(8)]
    core.on_frames(Peer.WORKER, b"w2", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), 0.3)
    step(core, wire, 0.3)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.ok and [protocol.decode_value(x) for x in reply.outputs] == [f"r/{i}" for i in range(8)]


def test_a_worker_speaks_only_with_the_key_it_registered_with():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    ready = frames(protocol.Ready(["m"], max_batch_size=4))
    core.on_frames(Peer.WORKER, b"w1", ready, 0.0, peer_key=b"key-a")
    core.on_frames(Peer.WORKER, b"w1", ready, 0.1, peer_key=b"key-b")  # a takeover attempt
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Disconnect("bye")), 0.1, peer_key=b"key-b")
    assert core.stats["refused"] == 2
    [worker] = core.status("", 0.1).workers
    assert worker["worker_id"] == b"w1".hex() and core.workers_with_keys() == [(b"w1", b"key-a")]
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Disconnect("bye")), 0.2, peer_key=b"key-a")
    assert core.status("", 0.2).workers == []


def test_a_handler_that_raises_is_counted_and_the_core_goes_on(monkeypatch):
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(core, "_on_request", broken)
    core.on_frames(Peer.GATEWAY, b"gw", request("r1"), 0.0)
    assert core.stats["internal_errors"] == 1
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.StatusRequest("s1")), 0.0)
    step(core, wire, 0.0)
    [status] = wire.take(b"gw", protocol.Status)
    assert status.stats["internal_errors"] == 1


def test_a_result_whose_errors_name_an_index_outside_the_batch_fails_the_batch_without_raising():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("r"), 0.0)
    step(core, wire, 0.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    hostile = protocol.BatchResult(batch.batch_id, [b""], [protocol.InputFailure(0, "MODEL_ERROR", "x")])
    hostile.errors = [protocol.InputFailure(7, "MODEL_ERROR", "outside")]  # what decode() would refuse, handed to the core as if it did not
    core._on_batch_result(b"w1", hostile, 0.1)
    step(core, wire, 0.1)
    assert core.stats["internal_errors"] == 0 and core.stats["malformed_results"] == 1
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == "MODEL_ERROR" and "outputs and errors" in reply.error_message


def test_models_named_by_workers_are_forgotten_past_a_bound_with_their_metrics(monkeypatch):
    import broker.core

    monkeypatch.setattr(broker.core, "_MAX_REMEMBERED_MODELS", 5)
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    for n in range(20):  # each worker names a new model, serves one request, and leaves
        worker_id, model = f"w{n}".encode(), f"model-{n}"
        core.on_frames(Peer.WORKER, worker_id, frames(protocol.Ready([model], max_batch_size=1)), n)
        core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(f"r{n}", model, 5000,
                                                                   inputs=[protocol.encode_value(n)])), n)
        step(core, wire, n)
        [batch] = wire.take(worker_id, protocol.Batch)
        core.on_frames(Peer.WORKER, worker_id, frames(protocol.BatchResult(batch.batch_id, batch.inputs)), n)
        core.on_frames(Peer.WORKER, worker_id, frames(protocol.Disconnect("bye")), n)
        step(core, wire, n)
    snapshot = core.describe(20)
    assert len(snapshot.models) <= 5 + 1 and set(snapshot.histograms) == set(snapshot.models)
    metrics = BrokerMetrics()
    metrics.publish(snapshot)
    exported = {sample.labels.get("model") for family in metrics.registry.collect() for sample in family.samples}
    assert len(exported - {None}) <= 5 + 1


def test_a_batch_handed_back_busy_is_requeued_unrun_and_the_worker_gets_nothing_until_it_speaks():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=2)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("r", count=2), 0.0)
    step(core, wire, 0.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    busy = protocol.BatchResult.failed(batch.batch_id, 2, protocol.ErrorCode.BUSY, "full with another broker's work")
    core.on_frames(Peer.WORKER, b"w1", frames(busy), 0.1)
    step(core, wire, 0.1)
    assert wire.take(b"w1", protocol.Batch) == [], "a saturated worker gets nothing until it speaks"
    assert wire.take(b"gw", protocol.Reply) == [] and core.stats["batches_refused_busy"] == 1
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Heartbeat()), 0.2)  # room again
    step(core, wire, 0.2)
    [again] = wire.take(b"w1", protocol.Batch)
    assert len(again.inputs) == 2, "not isolated: the refusal was no failure"
    items = core._workers.get(b"w1").in_flight[again.batch_id].items
    assert [(item.attempts, item.isolated) for item in items] == [(1, False), (1, False)], \
        "the refused run does not count as an attempt"


def test_a_request_that_does_not_decode_is_answered_bad_request_at_once_unless_its_id_is_in_flight():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("live"), 0.0)
    hostile = protocol.Request("bad", "m", 5000, inputs=[protocol.encode_value("x")])
    hostile.sizes = ["a"]  # decodes as msgpack, refused by decode()
    core.on_frames(Peer.GATEWAY, b"gw", frames(hostile), 0.0)
    hostile.request_id = "live"  # the same id as a request in flight: no reply may go to it
    core.on_frames(Peer.GATEWAY, b"gw", frames(hostile), 0.0)
    step(core, wire, 0.0)
    [refusal] = wire.take(b"gw", protocol.Reply)
    assert (refusal.request_id, refusal.error_code) == ("bad", "BAD_REQUEST") and "sizes" in refusal.error_message
    assert core.stats["malformed"] == 2 and core.in_flight_requests == 1


def _requests(*requests: protocol.Request, **entry_changes) -> list[bytes]:
    """A REQUESTS message; entry_changes: {index: {field: value}} written into the entries' bodies."""
    import msgpack

    frame = protocol.encode(protocol.Requests(list(requests)))[0]
    body = msgpack.unpackb(frame[6:])
    for index, changes in entry_changes.get("changes", {}).items():
        body["requests"][index].update(changes)
    return [frame[:6] + msgpack.packb(body)]


def _request(request_id: str, model: str = "m") -> protocol.Request:
    return protocol.Request(request_id, model, 5000, inputs=[protocol.encode_value(request_id)])


def test_the_requests_of_a_requests_message_are_each_handled_as_a_request_and_answered_together():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=8, max_batches=1)), 0.0)
    step(core, wire, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", _requests(_request("a"), _request("b", model="nope"), _request("c")), 0.1)
    step(core, wire, 0.1)
    [refusal] = wire.take(b"gw", protocol.Reply)
    assert (refusal.request_id, refusal.error_code) == ("b", "UNAVAILABLE")  # (no worker serves it, in the start-up)
    [batch] = wire.take(b"w1", protocol.Batch)
    assert batch.request_ids == ["a", "c"]
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), 0.2)
    step(core, wire, 0.2)
    [replies] = wire.take(b"gw", protocol.Replies)
    assert replies.request_ids == ["a", "c"] and replies.outputs == [[protocol.encode_value("a")],
                                                                     [protocol.encode_value("c")]]
    assert core.stats["requests"] == 3 and core.stats["malformed"] == 0


def test_a_requests_entry_that_does_not_decode_is_answered_bad_request_alone_unless_its_id_is_in_flight():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("live"), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", _requests(_request("a"), _request("bad"), _request("live"), _request("c"),
                                                  changes={1: {"sizes": ["x"]}, 2: {"priority": 10**6}}), 0.0)
    step(core, wire, 0.0)
    [refusal] = wire.take(b"gw", protocol.Reply)
    assert (refusal.request_id, refusal.error_code) == ("bad", "BAD_REQUEST") and "sizes" in refusal.error_message
    assert core.stats["malformed"] == 2 and core.in_flight_requests == 3  # live, a and c


def test_a_requests_message_whose_layout_does_not_decode_is_answered_bad_request_for_every_readable_id():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("live"), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", _requests(_request("a"), _request("live"), _request("b"),
                                                  changes={2: {"input_bytes": [99]}}), 0.0)
    step(core, wire, 0.0)
    refusals = wire.take(b"gw", protocol.Reply)
    assert [(r.request_id, r.error_code) for r in refusals] == [("a", "BAD_REQUEST"), ("b", "BAD_REQUEST")]
    assert core.stats["malformed"] == 1 and core.in_flight_requests == 1


def test_a_rollout_of_two_versions_under_one_name_is_warned_of_once(caplog):
    core = BrokerCore(CONFIG, "i1", now=0.0)
    with caplog.at_level("WARNING", logger="broker.broker"):
        core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m", "m@v1"], 4)), 0.0)
        core.on_frames(Peer.WORKER, b"w2", frames(protocol.Ready(["m", "m@v2"], 4)), 0.1)
        core.on_frames(Peer.WORKER, b"w3", frames(protocol.Ready(["m", "m@v2"], 4)), 0.2)  # same pair: no new warning
    warnings = [r.getMessage() for r in caplog.records if "versions" in r.getMessage()]
    assert warnings == ["model m is served at 2 versions: v1, v2 (a rollout?); unpinned requests go to any of them"]
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Disconnect("rolled")), 0.3)
    core.on_frames(Peer.WORKER, b"w4", frames(protocol.Ready(["m", "m@v3"], 4)), 0.4)  # the next rollout warns again
    assert any("v2, v3" in r.getMessage() for r in caplog.records)


def test_messages_not_tried_after_a_failed_send_are_handed_to_the_shell_to_count():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    wire.gone.add(b"w")
    for _ in range(20):
        core.on_frames(Peer.WORKER, b"w", frames(protocol.Heartbeat(registration=1)), 0.0)
    not_tried: list[Send] = []
    core.flush(wire, 0.0, not_tried.append)
    assert len(not_tried) == 19 and all(isinstance(s.message, protocol.Disconnect) for s in not_tried)


def test_floods_of_unknown_models_and_forged_results_are_counted_and_logged_rate_limited(caplog):
    """Issue #28: each refused unknown-model request logged an INFO line (20,000: +4.9 MB), and each
    forged result an unthrottled WARNING."""
    import logging
    core, wire = BrokerCore(CONFIG, "i1", now=100.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4)), 100.0)
    caplog.set_level(logging.INFO, logger="broker.broker")
    caplog.clear()  # only the flood's lines: the READY's "joined" line is captured too when an earlier test left
    # broker.broker at INFO (it made this test fail with 41 > 40 after the rest of tests/unit)
    for n in range(1000):
        core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request(f"r{n}", f"nope-{n}", 1000, inputs=[b"\xa1x"])),
                       110.0)  # (past the start, when an unknown model may be a worker rejoining)
        core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(10**9 + n, [b"x"])), 110.0)
    step(core, wire, 110.0)
    assert core.stats["replies_no_such_model"] == 1000 and core.stats["late_results"] == 1000
    assert len(wire.take(b"gw", protocol.Reply)) == 1000  # each still gets its reply
    assert len(caplog.records) <= 2 * (10 + 1000 // 100), len(caplog.records)


def big_metadata(tag: str) -> dict:
    return {"inputs": [{"name": f"{tag}{i}", "doc": "x" * 1000} for i in range(1000)]}  # about 1 MB


def test_one_ready_puts_its_metadata_into_status_once_whatever_number_of_models_it_names():
    """Issue #28: 64 model names with 1 MB of metadata made every STATUS 64 MB."""
    core = BrokerCore(CONFIG, "i1", now=0.0)
    models = [f"m{i}" for i in range(protocol.MAX_MODELS)]
    ready = protocol.Ready(models, max_batch_size=4, metadata=big_metadata("a"))
    core.on_frames(Peer.WORKER, b"rogue", frames(ready), 0.0)
    status = core.status("s", 0.0)
    size = len(b"".join(protocol.encode(status)))
    assert size < 1.5 * len(b"".join(protocol.encode(ready))), size
    carriers = [name for name, info in status.models.items() if info["metadata"]]
    assert len(carriers) == 1
    assert all(info.get("metadata_from") == carriers[0] for name, info in status.models.items() if name != carriers[0])


def test_metadata_in_status_is_bounded_in_total_across_workers():
    core = BrokerCore(CONFIG, "i1", now=0.0)
    for n in range(12):  # each a distinct 1 MB document
        ready = protocol.Ready([f"w{n}-m{i}" for i in range(protocol.MAX_MODELS)], max_batch_size=4,
                               metadata=big_metadata(f"w{n}-"))
        core.on_frames(Peer.WORKER, b"w%d" % n, frames(ready), 0.0)
    status = core.status("s", 0.0)
    size = len(b"".join(protocol.encode(status)))
    assert size < 6 * protocol.MAX_DOCUMENT_SIZE, size
    left_out = [name for name, info in status.models.items() if info.get("metadata_from") == ""]
    assert left_out  # the models whose metadata did not fit say so


# ------------------------------------------------------------------ retries and trust (issue #28, the simulator's findings)

TRUST_CONFIG = BrokerConfig(heartbeat=HeartbeatConfig(interval_s=1.0, liveness=3, batch_timeout_floor_s=5.0),
                            batching=BatchingConfig(max_attempts=2))
ONE_AT_A_TIME = frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1))


def answer(core: BrokerCore, wire: Wire, worker_id: bytes, now: float) -> None:
    for batch in wire.take(worker_id, protocol.Batch):
        core.on_frames(Peer.WORKER, worker_id, frames(protocol.BatchResult(batch.batch_id, batch.inputs)), now)
    step(core, wire, now)


def test_a_retried_inputs_last_attempt_waits_for_a_proven_worker_rather_than_go_to_a_newcomer():
    """Found by the simulator (seed 1869, a black hole and a flapping worker beside a good one): an input
    lost once went, for its last attempt, to a worker that had answered nothing since it registered, which
    lost it too, and the innocent input failed as poison while the good worker, which had, was busy."""
    core, wire = BrokerCore(TRUST_CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"good", ONE_AT_A_TIME, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("warm"), 0.0)
    step(core, wire, 0.0)
    answer(core, wire, b"good", 0.1)  # good has answered a batch: proven
    core.on_frames(Peer.GATEWAY, b"gw", request("long"), 0.2)
    step(core, wire, 0.2)
    [long_batch] = wire.take(b"good", protocol.Batch)  # good is busy with it
    core.on_frames(Peer.WORKER, b"bad", ONE_AT_A_TIME, 0.3)
    core.on_frames(Peer.GATEWAY, b"gw", request("r"), 0.3)
    step(core, wire, 0.3)
    assert wire.take(b"bad", protocol.Batch)
    core.on_frames(Peer.WORKER, b"bad", frames(protocol.Disconnect("crashed")), 0.4)  # r is lost with bad
    core.on_frames(Peer.WORKER, b"new", ONE_AT_A_TIME, 0.4)  # idle, but it has shown nothing
    step(core, wire, 0.4)
    assert wire.take(b"new", protocol.Batch) == [], "r's last attempt went to a worker that answered nothing"
    core.on_frames(Peer.WORKER, b"good", frames(protocol.BatchResult(long_batch.batch_id, long_batch.inputs)), 0.5)
    step(core, wire, 0.5)
    [retry] = wire.take(b"good", protocol.Batch)
    assert [protocol.decode_value(x) for x in retry.inputs] == ["r/0"]
    core.on_frames(Peer.WORKER, b"good", frames(protocol.BatchResult(retry.batch_id, retry.inputs)), 0.6)
    step(core, wire, 0.6)
    replies = {reply.request_id: reply for reply in wire.take(b"gw", protocol.Reply)}
    assert replies["r"].ok and replies["long"].ok


def test_a_retry_that_is_not_the_last_attempt_may_go_to_a_newcomer():
    config = BrokerConfig(heartbeat=TRUST_CONFIG.heartbeat, batching=BatchingConfig(max_attempts=3))
    core, wire = BrokerCore(config, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"good", ONE_AT_A_TIME, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("warm"), 0.0)
    step(core, wire, 0.0)
    answer(core, wire, b"good", 0.1)
    core.on_frames(Peer.GATEWAY, b"gw", request("long"), 0.2)
    step(core, wire, 0.2)
    core.on_frames(Peer.WORKER, b"bad", ONE_AT_A_TIME, 0.3)
    core.on_frames(Peer.GATEWAY, b"gw", request("r"), 0.3)
    step(core, wire, 0.3)
    core.on_frames(Peer.WORKER, b"bad", frames(protocol.Disconnect("crashed")), 0.4)
    core.on_frames(Peer.WORKER, b"new", ONE_AT_A_TIME, 0.4)
    step(core, wire, 0.4)
    assert len(wire.take(b"new", protocol.Batch)) == 1  # its second of three attempts


def test_a_worker_that_registers_again_holding_a_batch_is_a_suspect_though_it_never_overran():
    """Found by the simulator (seed 240, a black hole whose link also dropped): the broker dropped it as
    unreachable, or saw it register again, before its batch's deadline, so no overrun was recorded, and
    it came back trusted and idle, for another batch. Losing a batch it was sent is an offence."""
    core, wire = BrokerCore(TRUST_CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"flaky", ONE_AT_A_TIME, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("r"), 0.0)
    step(core, wire, 0.0)
    assert wire.take(b"flaky", protocol.Batch)
    core.on_frames(Peer.WORKER, b"flaky", ONE_AT_A_TIME, 0.1)  # its link dropped; it registers again
    registry = core._workers
    assert registry.offences(b"flaky").overruns == 1
    worker = registry.get(b"flaky")
    assert worker.on_probation and worker.suspect_until == 0.1 + 5.0


@pytest.mark.parametrize("how", ["unreachable", "silent"])
def test_a_worker_lost_while_it_holds_a_batch_is_a_suspect_and_an_idle_one_is_not(how):
    """unreachable: the heartbeats to both fail (ROUTER_MANDATORY); silent: both miss 3 intervals, before
    the batch's 5 s deadline (seed 940: a black hole SIGSTOPped holding two batches)."""
    core, wire = BrokerCore(TRUST_CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"a", ONE_AT_A_TIME, 0.0)
    core.on_frames(Peer.WORKER, b"b", ONE_AT_A_TIME, 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("r"), 0.0)
    step(core, wire, 0.0)
    [holder] = [s.peer_id for s in wire.sent if isinstance(s.message, protocol.Batch)]
    other = b"b" if holder == b"a" else b"a"
    if how == "unreachable":
        wire.gone |= {holder, other}
    step(core, wire, 1.0 if how == "unreachable" else 3.5)
    assert core.stats["workers_lost"] == 2
    assert core._workers.offences(holder) is not None and core._workers.offences(other) is None


def test_a_large_input_goes_to_the_worker_in_the_frame_it_came_in_never_copied():
    """DDML3 (docs/protocol.md, "Frames"): the broker never unpacks a REQUEST's inputs, and a large one
    leaves in the BATCH as the very view of the frame it arrived in; the small ones are cut from `inline`."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=8, max_batches=1)), 0.0)
    step(core, wire, 0.0)
    received = memoryview(b"\x00" + protocol.encode_value(bytes(protocol.INPUT_FRAME_BYTES)))[1:]  # as recv gives it
    small = protocol.encode_value("small")
    head, large = protocol.encode(protocol.Request("r", "m", 5000, inputs=[small, received.tobytes()]))
    core.on_frames(Peer.GATEWAY, b"gw", [head, received], 0.1)
    step(core, wire, 0.1)
    [batch] = wire.take(b"w1", protocol.Batch)
    assert batch.inputs[0] == small and batch.inputs[1] is received
    sent = protocol.encode(batch)
    assert len(sent) == 2 and sent[1] is received
