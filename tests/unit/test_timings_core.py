"""The broker core's figures for a request that asks for its timings (Request.timings): the longest any
of its inputs queued (from each input's enqueue and dispatch times) and the longest prepare and forward
pass of the results that answered it, capped by how long each batch was out. Pure: frames and times in."""

from __future__ import annotations

import pytest

from broker.core import BrokerCore, Peer
from ddml_common import protocol
from tests.unit.test_core import CONFIG, Wire, frames, step


def ask(request_id: str, count: int = 1, timings: bool = False) -> list[bytes]:
    inputs = [protocol.encode_value(f"{request_id}/{i}") for i in range(count)]
    return frames(protocol.Request(request_id, "m", 5000, inputs=inputs, timings=timings))


def answers(wire: Wire) -> dict[str, protocol.Reply]:
    return {reply.request_id: reply for message in wire.take(b"gw", protocol.Reply) + wire.take(b"gw", protocol.Replies)
            for reply in protocol.replies_of(message)}


def busy_core(max_inputs: int = 0) -> tuple[BrokerCore, Wire, protocol.Batch]:
    """A core whose one worker holds its only batch (request "busy", sent at 0.0): what follows queues."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1,
                                                             max_inputs=max_inputs)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", ask("busy"), 0.0)
    step(core, wire, 0.0)
    [first] = wire.take(b"w1", protocol.Batch)
    assert not first.timed  # no request of it asked
    return core, wire, first


def test_a_timed_request_gets_its_queue_prepare_and_forward_ms_and_an_untimed_one_none():
    core, wire, first = busy_core()
    core.on_frames(Peer.GATEWAY, b"gw", ask("timed", count=2, timings=True), 1.0)
    core.on_frames(Peer.GATEWAY, b"gw", ask("plain"), 1.0)
    step(core, wire, 1.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(first.batch_id, first.inputs, compute_ms=40.0)),
                   1.25)
    step(core, wire, 1.25)
    assert answers(wire)["busy"].timings == {}
    [batch] = wire.take(b"w1", protocol.Batch)
    assert batch.timed and sorted(set(batch.request_ids)) == ["plain", "timed"]
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, batch.inputs, compute_ms=30.0,
                                                                   prepare_ms=5.0)), 1.5)
    step(core, wire, 1.5)
    got = answers(wire)
    assert got["timed"].timings == {"queue_ms": pytest.approx(250.0), "prepare_ms": 5.0, "forward_ms": 30.0}
    assert got["plain"].timings == {}


def test_a_worker_cannot_claim_more_time_than_its_batch_was_out():
    core, wire, first = busy_core()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(first.batch_id, first.inputs)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", ask("timed", timings=True), 2.0)
    step(core, wire, 2.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    claim = float(protocol.MAX_DURATION_MS)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(batch.batch_id, batch.inputs, compute_ms=claim,
                                                                   prepare_ms=claim)), 2.1)
    step(core, wire, 2.1)
    timings = answers(wire)["timed"].timings
    assert timings["forward_ms"] == pytest.approx(100.0) and timings["prepare_ms"] == pytest.approx(100.0)
    assert timings.get("queue_ms", 0.0) == 0.0  # sent at once: it never waited


def test_a_continuous_workers_partial_results_give_the_longest_of_the_requests_inputs():
    core, wire, first = busy_core(max_inputs=1)
    core.on_frames(Peer.GATEWAY, b"gw", ask("timed", count=2, timings=True), 0.5)
    step(core, wire, 0.5)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(first.batch_id, first.inputs, indices=[0])), 0.75)
    step(core, wire, 0.75)  # one input of credit: timed's first input goes, its second waits
    [one] = wire.take(b"w1", protocol.Batch)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(one.batch_id, one.inputs, indices=[0],
                                                                   compute_ms=20.0, prepare_ms=4.0)), 1.0)
    step(core, wire, 1.0)
    [two] = wire.take(b"w1", protocol.Batch)
    assert two.timed and "timed" not in answers(wire)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(two.batch_id, two.inputs, indices=[0],
                                                                   compute_ms=10.0, prepare_ms=6.0)), 1.25)
    step(core, wire, 1.25)
    timings = answers(wire)["timed"].timings
    assert timings == {"queue_ms": pytest.approx(500.0), "prepare_ms": 6.0, "forward_ms": 20.0}
