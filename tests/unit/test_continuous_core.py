"""Continuous batching in the broker core: credit in inputs, partial results, held inputs of a lost worker.

Pure: BrokerCore driven with frames and times (see test_core.py for the harness)."""

from __future__ import annotations

from broker.core import BrokerCore, Peer
from ddml_common import protocol
from tests.unit.test_core import CONFIG, Wire, frames, request, step


def continuous(worker_id: bytes, core: BrokerCore, now: float = 0.0, max_inputs: int = 4, max_batch_size: int = 2):
    core.on_frames(Peer.WORKER, worker_id, frames(protocol.Ready(
        ["m"], max_batch_size=max_batch_size, max_batches=2, max_inputs=max_inputs)), now)


def one_batch(**counts: int) -> tuple[BrokerCore, Wire, protocol.Batch]:
    """A core with one continuous worker, w1 (8 inputs held, batches of 8), and the one batch it
    was sent for these requests (name=inputs), in that order."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    continuous(b"w1", core, max_inputs=8, max_batch_size=8)
    for name, count in counts.items():
        core.on_frames(Peer.GATEWAY, b"gw", request(name, count=count), 0.0)
    step(core, wire, 0.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    return core, wire, batch


def values(batch: protocol.Batch) -> list:
    return [protocol.decode_value(x) for x in batch.inputs]


def partial(batch: protocol.Batch, positions: list[int], errors=()) -> list[bytes]:
    return frames(protocol.BatchResult(batch.batch_id, [batch.inputs[p] for p in positions],
                                       errors=[list(e) for e in errors], indices=positions))


def replies(wire: Wire) -> dict[str, protocol.Reply]:
    found = {}
    for message in wire.take(b"gw", protocol.Reply):
        found[message.request_id] = message
    for message in wire.take(b"gw", protocol.Replies):
        for request_id, outputs in zip(message.request_ids, message.outputs):
            found[request_id] = protocol.Reply(request_id, outputs)
    return found


def test_credit_is_counted_in_inputs_and_slices_go_out_at_once_without_a_hold():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    continuous(b"w1", core, max_inputs=5, max_batch_size=2)
    for n in range(8):
        core.on_frames(Peer.GATEWAY, b"gw", request(f"r{n}"), 0.0)
    step(core, wire, 0.0)
    batches = wire.take(b"w1", protocol.Batch)
    assert [len(b.inputs) for b in batches] == [2, 2, 1], "5 inputs of credit, in slices of max_batch_size"
    assert core.status("", 0.0).models["m"]["queued_items"] == 3
    # Answering 2 inputs frees 2 inputs of credit at once: no batch needs to finish whole.
    core.on_frames(Peer.WORKER, b"w1", partial(batches[0], [0, 1]), 0.1)
    step(core, wire, 0.1)
    assert [len(b.inputs) for b in wire.take(b"w1", protocol.Batch)] == [2]
    assert set(replies(wire)) == {"r0", "r1"}
    [worker] = core.status("", 0.1).workers
    assert worker["in_flight_items"] == 5 and worker["max_inputs"] == 5


def test_a_request_is_answered_when_its_own_inputs_are_done_not_when_its_batch_is():
    core, wire, batch = one_batch(a=2, b=1)
    assert values(batch) == ["a/0", "a/1", "b/0"]
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [2, 0]), 0.1)  # b's input and half of a's
    step(core, wire, 0.1)
    got = replies(wire)
    assert set(got) == {"b"} and protocol.decode_value(got["b"].outputs[0]) == "b/0"
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [1]), 0.2)
    step(core, wire, 0.2)
    got = replies(wire)
    assert [protocol.decode_value(x) for x in got["a"].outputs] == ["a/0", "a/1"]
    assert core.status("", 0.2).workers[0]["in_flight_items"] == 0


def test_an_input_answered_twice_counts_once_and_a_late_part_after_the_batch_is_done_is_late():
    core, wire, batch = one_batch(a=2)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [0]), 0.1)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [0]), 0.1)  # duplicated on the wire
    step(core, wire, 0.1)
    assert replies(wire) == {} and core.stats["duplicate_outputs"] == 1
    assert core.status("", 0.1).workers[0]["in_flight_items"] == 1
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [1]), 0.2)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [1]), 0.2)
    step(core, wire, 0.2)
    assert list(replies(wire)) == ["a"] and core.stats["late_results"] == 1
    assert core.stats["replies_ok"] == 1


def test_a_pass_that_failed_as_a_whole_reruns_each_input_alone_and_only_the_poison_fails():
    core, wire, batch = one_batch(p=1, x=1, y=1)
    failed = [[k, "PASS_FAILED", "boom"] for k in range(3)]
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [0, 1, 2], failed), 0.1)
    now = 0.1
    ran: dict[str, int] = {}
    for _ in range(10):  # each isolated input goes alone, to a worker that holds nothing
        step(core, wire, now)
        sent = wire.take(b"w1", protocol.Batch)
        if not sent:
            break
        [alone] = sent
        [value] = values(alone)
        assert len(alone.inputs) == 1
        ran[value] = ran.get(value, 0) + 1
        now += 0.1
        error = [[0, "MODEL_ERROR", "poison"]] if value == "p/0" else []
        core.on_frames(Peer.WORKER, b"w1", partial(alone, [0], error), now)
    step(core, wire, now)
    got = replies(wire)
    assert ran == {"p/0": 1, "x/0": 1, "y/0": 1}, "each ran alone once more: two executions in all"
    assert got["x"].ok and got["y"].ok
    assert got["p"].error_code == "MODEL_ERROR" and "poison" in got["p"].error_message


def test_an_isolated_input_waits_for_an_empty_worker_and_nothing_joins_it():
    core, wire, batch = one_batch(p=1, x=1)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [0], [[0, "PASS_FAILED", "boom"]]), 0.1)  # x still held
    core.on_frames(Peer.GATEWAY, b"gw", request("z"), 0.1)
    step(core, wire, 0.1)
    assert wire.take(b"w1", protocol.Batch) == [], "p must run alone: not while x is held, and z waits behind p"
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [1]), 0.2)
    step(core, wire, 0.2)
    [alone] = wire.take(b"w1", protocol.Batch)
    assert values(alone) == ["p/0"]
    core.on_frames(Peer.WORKER, b"w1", partial(alone, [0]), 0.3)
    step(core, wire, 0.3)
    [after] = wire.take(b"w1", protocol.Batch)
    assert values(after) == ["z/0"]
    assert set(replies(wire)) == {"x", "p"}


def test_a_lost_worker_reruns_only_what_it_had_not_answered_held_inputs_included():
    core, wire, batch = one_batch(a=3)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [1]), 0.1)  # a/1 done; a/0 and a/2 held, not started
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Disconnect("killed")), 0.2)
    continuous(b"w2", core, 0.2, max_inputs=8, max_batch_size=8)
    now = 0.2
    seen = []
    for _ in range(5):
        step(core, wire, now)
        for alone in wire.take(b"w2", protocol.Batch):
            seen.extend(values(alone))
            now += 0.1
            core.on_frames(Peer.WORKER, b"w2", partial(alone, [0]), now)
    step(core, wire, now)
    assert sorted(seen) == ["a/0", "a/2"], "the answered input is not run again"
    [reply] = replies(wire).values()
    assert reply.ok and [protocol.decode_value(x) for x in reply.outputs] == ["a/0", "a/1", "a/2"]


def test_hostile_partial_results_fail_the_batch_clearly_and_never_raise():
    core, wire, batch = one_batch(a=2, b=2)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [0, 1]), 0.1)
    # Well-typed, but index 9 is outside a batch of 4: the unanswered inputs fail, the answered request stands.
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, [b"x"], indices=[9])), 0.2)
    step(core, wire, 0.2)
    got = replies(wire)
    assert got["a"].ok and got["b"].error_code == "MODEL_ERROR"
    assert core.stats["malformed_results"] == 1 and core.stats["internal_errors"] == 0
    # A whole result after partial ones makes no sense either.
    core.on_frames(Peer.GATEWAY, b"gw", request("c", count=2), 0.3)
    step(core, wire, 0.3)
    [batch] = wire.take(b"w1", protocol.Batch)
    core.on_frames(Peer.WORKER, b"w1", partial(batch, [0]), 0.4)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, batch.inputs)), 0.4)
    step(core, wire, 0.4)
    assert replies(wire)["c"].error_code == "MODEL_ERROR" and core.stats["malformed_results"] == 2
    assert core.status("", 0.4).workers[0]["in_flight_items"] == 0


def test_a_batch_worker_and_a_continuous_worker_share_a_model_least_loaded_first():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"wb", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    continuous(b"wc", core, max_inputs=4, max_batch_size=4)
    for n in range(8):
        core.on_frames(Peer.GATEWAY, b"gw", request(f"r{n}"), 0.0)
    step(core, wire, 0.0)
    sizes = {w: [len(b.inputs) for b in wire.take(w, protocol.Batch)] for w in (b"wb", b"wc")}
    assert sum(map(sum, sizes.values())) == 8 and sizes[b"wb"] == [4] and sum(sizes[b"wc"]) == 4
