"""Broker.step() over inproc:// sockets with a FakeClock: the broker's bookkeeping, one pass at a time."""

import uuid

import pytest
import zmq

from ddml_common import protocol
from broker.broker import Broker
from broker.config import BatchingConfig, BrokerConfig, HeartbeatConfig
from tests.fakes import FakeClock


def recv(socket: zmq.Socket, timeout_ms: int = 1000) -> protocol.Message:
    assert socket.poll(timeout_ms), "nothing received within the timeout"
    return protocol.decode(socket.recv_multipart())


def nothing_pending(socket: zmq.Socket) -> bool:
    return socket.poll(20) == 0


class Harness:
    def __init__(self, context: zmq.Context, **batching):
        self.clock = FakeClock()
        name = uuid.uuid4().hex
        config = BrokerConfig(
            frontend=f"inproc://front-{name}", backend=f"inproc://back-{name}",
            batching=BatchingConfig(**batching),
            heartbeat=HeartbeatConfig(interval_s=1.0, liveness=3, batch_timeout_floor_s=5.0),
        )
        self.broker = Broker(config, context, clock=self.clock, instance_id="inst-1")
        self.broker.bind()
        self.context = context
        self.sockets: list[zmq.Socket] = []

    def dealer(self, endpoint: str, identity: bytes) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, identity)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        self.sockets.append(socket)
        return socket

    def gateway(self, identity: bytes) -> zmq.Socket:
        return self.dealer(self.broker.frontend_endpoint, identity)

    def worker(self, identity: bytes, max_batch_size: int = 4, max_batches: int = 1) -> zmq.Socket:
        socket = self.dealer(self.broker.backend_endpoint, identity)
        socket.send_multipart(protocol.encode(protocol.Ready(["m"], max_batch_size, max_batches)))
        self.step()
        assert isinstance(recv(socket), protocol.Heartbeat)  # the broker heartbeats a new worker at once
        return socket

    def step(self, passes: int = 3) -> None:
        for _ in range(passes):
            self.broker.step(timeout_ms=20)

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.broker.close()


@pytest.fixture
def harness():
    context = zmq.Context()
    harness = Harness(context)
    yield harness
    harness.close()
    context.term()


def send_request(gateway, request_id: str, values: list, timeout_ms: int = 5000, model: str = "m"):
    gateway.send_multipart(protocol.encode(protocol.Request(
        request_id, model, timeout_ms, inputs=[protocol.encode_value(v) for v in values])))


def answer(worker, batch: protocol.Batch, transform=lambda v: v):
    outputs = [protocol.encode_value(transform(protocol.decode_value(x))) for x in batch.inputs]
    worker.send_multipart(protocol.encode(protocol.BatchResult(batch.batch_id, outputs)))


def test_replies_go_back_to_the_gateway_that_asked_and_no_other(harness):
    worker = harness.worker(b"w1", max_batch_size=8)
    gw_a, gw_b = harness.gateway(b"A"), harness.gateway(b"B")
    send_request(gw_a, "1", ["from-a"])
    send_request(gw_b, "1", ["from-b"])  # the same request id from another gateway is another request
    harness.step()
    batch = recv(worker)
    assert sorted(protocol.decode_value(x) for x in batch.inputs) == ["from-a", "from-b"]
    answer(worker, batch, str.upper)
    harness.step()
    reply_a, reply_b = recv(gw_a), recv(gw_b)
    assert [protocol.decode_value(x) for x in reply_a.outputs] == ["FROM-A"]
    assert [protocol.decode_value(x) for x in reply_b.outputs] == ["FROM-B"]
    assert nothing_pending(gw_a) and nothing_pending(gw_b)


def test_successes_a_batch_finishes_for_one_gateway_go_back_in_one_replies_message(harness):
    worker = harness.worker(b"w1", max_batch_size=8, max_batches=1)
    gw_a, gw_b = harness.gateway(b"A"), harness.gateway(b"B")
    for n in range(3):
        send_request(gw_a, f"a{n}", [f"a{n}"])
    send_request(gw_b, "b0", ["b0"])
    send_request(gw_a, "bad", [12])  # fails: str.upper of an int, reported per input
    harness.step()
    batch = recv(worker)
    assert len(batch.inputs) == 5
    outputs, errors = [], []
    for index, item in enumerate(batch.inputs):
        value = protocol.decode_value(item)
        if isinstance(value, str):
            outputs.append(protocol.encode_value(value.upper()))
        else:
            outputs.append(b"")
            errors.append([index, "BAD_REQUEST", "not a string"])
    worker.send_multipart(protocol.encode(protocol.BatchResult(batch.batch_id, outputs, errors)))
    harness.step()
    to_a = [recv(gw_a), recv(gw_a)]
    replies_message = next(m for m in to_a if isinstance(m, protocol.Replies))
    error = next(m for m in to_a if isinstance(m, protocol.Reply))
    assert sorted(replies_message.request_ids) == ["a0", "a1", "a2"]
    assert {r.request_id: [protocol.decode_value(x) for x in r.outputs]
            for r in protocol.replies_of(replies_message)} == {"a0": ["A0"], "a1": ["A1"], "a2": ["A2"]}
    assert (error.request_id, error.error_code) == ("bad", "BAD_REQUEST")
    lone = recv(gw_b)
    assert isinstance(lone, protocol.Reply) and [protocol.decode_value(x) for x in lone.outputs] == ["B0"]
    assert nothing_pending(gw_a) and nothing_pending(gw_b)


def test_large_request_is_split_and_reassembled_in_order(harness):
    w1, w2 = harness.worker(b"w1", max_batch_size=3), harness.worker(b"w2", max_batch_size=3)
    gateway = harness.gateway(b"A")
    send_request(gateway, "big", list(range(10)))
    harness.step()
    # Answer out of order across workers and batches; the reply must still be in input order.
    batches = {w: [] for w in (w1, w2)}
    while True:
        progressed = False
        for w in (w1, w2):
            if w.poll(20):
                message = protocol.decode(w.recv_multipart())
                if isinstance(message, protocol.Batch):
                    batches[w].append(message)
                    progressed = True
        for w in (w2, w1):
            while batches[w]:
                answer(w, batches[w].pop(), lambda v: v * 10)
        harness.step()
        if gateway.poll(0) or not progressed:
            break
    reply = recv(gateway)
    assert [protocol.decode_value(x) for x in reply.outputs] == [v * 10 for v in range(10)]


def test_dead_worker_batch_is_redispatched_then_late_result_discarded(harness):
    w1 = harness.worker(b"w1")
    gateway = harness.gateway(b"A")
    send_request(gateway, "r", ["x"])
    harness.step()
    lost = recv(w1)
    harness.clock.advance(3.5)  # w1 goes silent past 3 intervals
    w2 = harness.worker(b"w2")
    harness.step()
    retried = recv(w2)
    while isinstance(retried, protocol.Heartbeat):
        retried = recv(w2)
    assert retried.request_ids == ["r"]
    answer(w2, retried, lambda v: "second")
    harness.step()
    assert [protocol.decode_value(x) for x in recv(gateway).outputs] == ["second"]
    answer(w1, lost, lambda v: "late")  # the worker we gave up on comes back with its result
    harness.step()
    assert nothing_pending(gateway)
    assert harness.broker.stats["late_results"] == 1


def test_input_lost_twice_fails_with_worker_lost(harness):
    gateway = harness.gateway(b"A")
    for name in (b"w1", b"w2"):
        worker = harness.worker(name)
        if name == b"w1":
            send_request(gateway, "r", ["poison"])
        harness.step()
        assert isinstance(recv(worker), protocol.Batch)
        worker.send_multipart(protocol.encode(protocol.Disconnect("crashed")))
        harness.step()
    reply = recv(gateway)
    assert reply.error_code == "WORKER_LOST" and "2 times" in reply.error_message


def test_request_past_deadline_gets_timeout_and_is_never_dispatched(harness):
    worker = harness.worker(b"w1", max_batches=1)
    gateway = harness.gateway(b"A")
    send_request(gateway, "busy", ["a"])
    harness.step()
    first = recv(worker)
    send_request(gateway, "late", ["b"], timeout_ms=500)
    harness.step()
    harness.clock.advance(0.6)
    harness.step()
    reply = recv(gateway)
    assert (reply.request_id, reply.error_code) == ("late", "TIMEOUT")
    answer(worker, first)
    harness.step()
    assert recv(gateway).request_id == "busy"
    assert nothing_pending(worker) or not isinstance(recv(worker), protocol.Batch)


def test_unknown_model_and_empty_request_are_refused_at_once(harness):
    harness.worker(b"w1")
    gateway = harness.gateway(b"A")
    send_request(gateway, "starting", ["x"], model="nope")
    harness.step()
    # A broker that just started may not have heard from the model's workers yet: 503, not 404.
    assert recv(gateway).error_code == "UNAVAILABLE"
    harness.clock.advance(3.1)  # past one liveness window (3 × 1 s)
    harness.worker(b"w2")
    send_request(gateway, "1", ["x"], model="nope")
    send_request(gateway, "2", [])
    harness.step()
    replies = {r.request_id: r.error_code for r in (recv(gateway), recv(gateway))}
    assert replies == {"1": "NO_SUCH_MODEL", "2": "BAD_REQUEST"}


def test_full_queue_refuses_with_retry_after():
    context = zmq.Context()
    harness = Harness(context, max_queue=1)
    try:
        worker = harness.worker(b"w1", max_batch_size=1, max_batches=1)
        gateway = harness.gateway(b"A")
        for i in range(3):
            send_request(gateway, str(i), [i])
        harness.step()
        assert isinstance(recv(worker), protocol.Batch)
        # All three arrive in one pass: "0" fills the queue, so "1" and "2" are refused at once.
        replies = [recv(gateway), recv(gateway)]
        assert [(r.request_id, r.error_code) for r in replies] == [("1", "OVERLOADED"), ("2", "OVERLOADED")]
        assert all(r.retry_after_ms >= 100 for r in replies)
    finally:
        harness.close()
        context.term()


def test_malformed_and_wrong_version_messages_are_counted_and_answered(harness):
    gateway = harness.gateway(b"A")
    gateway.send_multipart([b"garbage"])
    gateway.send_multipart([b"DDML9", b"\x03", b"\x80"])
    harness.step()
    error = recv(gateway)
    assert isinstance(error, protocol.Error) and error.code == "BAD_VERSION" and "DDML9" in error.message
    assert harness.broker.stats["malformed"] == 2


def test_unknown_worker_is_told_to_register_again(harness):
    stranger = harness.dealer(harness.broker.backend_endpoint, b"stranger")
    stranger.send_multipart(protocol.encode(protocol.Heartbeat()))
    harness.step()
    assert isinstance(recv(stranger), protocol.Disconnect)


def test_draining_worker_gets_acknowledgement_and_no_more_batches(harness):
    worker = harness.worker(b"w1")
    worker.send_multipart(protocol.encode(protocol.Heartbeat(draining=True)))
    harness.step()
    assert recv(worker) == protocol.Heartbeat("inst-1", draining=True)
    gateway = harness.gateway(b"A")
    send_request(gateway, "r", ["x"], timeout_ms=300)
    harness.step()
    assert nothing_pending(worker)
    harness.clock.advance(0.4)
    harness.step()
    assert recv(gateway).error_code == "TIMEOUT"


def test_status_describes_models_queues_and_workers(harness):
    harness.worker(b"w1", max_batch_size=4)
    gateway = harness.gateway(b"A")
    gateway.send_multipart(protocol.encode(protocol.StatusRequest("s")))
    harness.step()
    status = recv(gateway)
    assert status.instance_id == "inst-1"
    assert status.models["m"]["workers"] == 1
    assert status.workers[0]["worker_id"] == b"w1".hex()


def test_batch_that_fails_as_a_whole_is_retried_one_input_at_a_time(harness):
    worker = harness.worker(b"w1", max_batch_size=8, max_batches=4)
    gateways = [harness.gateway(name) for name in (b"A", b"B", b"C")]
    harness.broker.core._workers.get(b"w1").max_batches = 0  # hold dispatch until all three are queued
    for gateway, value in zip(gateways, ["ok-1", "poison", "ok-2"]):
        send_request(gateway, "r", [value])
    harness.step()
    harness.broker.core._workers.get(b"w1").max_batches = 4
    harness.step()
    batch = recv(worker)
    assert len(batch.inputs) == 3
    worker.send_multipart(protocol.encode(protocol.BatchResult.failed(batch.batch_id, 3, protocol.ErrorCode.MODEL_ERROR, "boom")))
    harness.step()
    for _ in range(3):  # one at a time: a worker running an isolated input takes nothing more meanwhile
        single = recv(worker)
        assert len(single.inputs) == 1
        assert not worker.poll(50), "a second batch joined an isolated one"
        value = protocol.decode_value(single.inputs[0])
        if value == "poison":
            worker.send_multipart(protocol.encode(protocol.BatchResult.failed(
                single.batch_id, 1, protocol.ErrorCode.MODEL_ERROR, "poison raised")))
        else:
            answer(worker, single)
        harness.step()
    replies = [recv(g) for g in gateways]
    assert [r.error_code for r in replies] == [None, "MODEL_ERROR", None]
    assert replies[1].error_message == "input 0 (run alone, after its batch failed): poison raised"


def test_every_dropped_send_is_counted_by_reason_and_kind_even_those_not_tried(harness):
    """Issue #28: after the first failed send to a peer, the core tries no more to it in that pass, and
    those were never counted: send_dropped_* undercounted a flood of DISCONNECTs about a thousandfold."""
    from broker.core import Peer
    ghost_heartbeat = protocol.encode(protocol.Heartbeat(registration=1))
    for _ in range(50):  # an identity that never connected: every DISCONNECT to it is unreachable
        harness.broker.core.on_frames(Peer.WORKER, b"ghost", ghost_heartbeat, harness.clock())
    harness.broker._flush(harness.clock())
    stats = harness.broker.stats
    assert stats["send_dropped_unreachable"] == 50
    assert stats["send_dropped_unreachable_disconnect"] == 50
    assert stats["send_dropped_full"] == 0
