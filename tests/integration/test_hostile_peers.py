"""Hostile peers: three messages that once ended the broker, sent to a real broker process.

docs/reliability.md promises that nothing a peer sends can make a process fall over. Each test
here replays one way a peer broke that promise, with raw DEALER sockets that speak the protocol
through `protocol.encode` (no hand-built frames), next to real echo workers:

- a gateway's REQUEST whose `sizes` hold a string (the batcher compared it with an int);
- a worker killed while idle, then one request that fills both of its batch slots: the broker
  planned two batches for it, the first send failed and removed it, the second found no worker;
- a worker's BATCH_RESULT whose `errors` name inputs outside the batch, or carry a list as the code.

Each test ends with the broker process alive, having handled the message (no `internal_errors`),
with no second reply for the hostile request, and with a normal request served.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import pytest
import zmq

from ddml_common import protocol
from gateway.broker_client import BrokerClient, BrokerError
from tests.chaos import Load, broker_clients, live_pids
from tests.hostile import BlackHole
from tests.processes import Process, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def client(stack):
    with broker_clients(stack) as make:
        yield make


def raw_dealer(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, timeout_s: float) -> protocol.Message | None:
    if not sock.poll(timeout_s * 1000):
        return None
    return protocol.decode(sock.recv_multipart(zmq.NOBLOCK))


def broker_stats(c: BrokerClient) -> dict:
    try:
        return c.status(timeout_s=1.0)["stats"]
    except BrokerError:
        return {}


def assert_alive(broker: Process) -> None:
    assert broker.popen.poll() is None, (
        f"the broker exited with {broker.popen.returncode}:\n{broker.output()[-4000:]}")


def assert_handled(broker: Process, c: BrokerClient) -> None:
    """Alive, and because it handled the message: the per-message catch-all (which counts
    `internal_errors`) keeps a buggy broker up too, and must not be what saved it."""
    assert_alive(broker)
    assert broker_stats(c).get("internal_errors", 0) == 0, broker.output()[-4000:]


def wait_while_alive(broker: Process, condition: Callable[[], object], timeout_s: float, what: str):
    """wait_until, but fail at once, with the broker's log, if the broker exits meanwhile."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        assert_alive(broker)
        result = condition()
        if result:
            return result
        if time.monotonic() > give_up_at:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}; broker log:\n{broker.output()[-4000:]}")
        time.sleep(0.02)


def wait_until_broker_holds_nothing(broker: Process, c: BrokerClient) -> None:
    """Once the broker holds no request it cannot reply to one again, so a reply read after this
    point, on the same connection, is behind every reply it will ever send for earlier requests."""
    wait_while_alive(broker, lambda: broker_stats(c).get("in_flight_requests") == 0, 20,
                     "the broker to hold no request")


def test_request_with_a_string_in_sizes_is_refused_and_the_broker_keeps_serving(stack, client, zmq_context):
    broker = stack.start_broker()
    stack.start_worker("--model", "echo")
    c = client()
    wait_until(lambda: live_pids(c), 30, what="a worker")
    malformed_before = broker_stats(c).get("malformed", 0)
    gateway = raw_dealer(zmq_context, stack.frontend)
    hostile = protocol.Request("hostile-1", "echo", timeout_ms=5000, inputs=[protocol.encode_value("x")],
                               sizes=["a"])  # type: ignore[list-item]  # the point: not an int
    gateway.send_multipart(protocol.encode(hostile))

    # Either answer is fine: a BAD_REQUEST reply, or the message dropped and counted as malformed.
    outcome: dict = {}

    def refused() -> dict:
        if gateway.poll(0):
            outcome["reply"] = protocol.decode(gateway.recv_multipart(zmq.NOBLOCK))
        elif broker_stats(c).get("malformed", 0) > malformed_before:
            # Counted. The broker counts it and may also refuse it: such a reply left the broker
            # before the stats answer did, but on another connection, so it may still be on its way.
            if gateway.poll(2000):
                outcome["reply"] = protocol.decode(gateway.recv_multipart(zmq.NOBLOCK))
            else:
                outcome["dropped"] = True
        return outcome

    wait_while_alive(broker, refused, 10, "a BAD_REQUEST reply or a malformed count")
    if "reply" in outcome:
        reply = outcome["reply"]
        if isinstance(reply, protocol.Reply):
            assert (reply.request_id, reply.error_code) == ("hostile-1", "BAD_REQUEST"), reply
        else:
            assert isinstance(reply, protocol.Error) and reply.code == "BAD_REQUEST", reply

    wait_until_broker_holds_nothing(broker, c)
    normal = protocol.Request("normal-1", "echo", timeout_ms=5000, inputs=[protocol.encode_value("still serving")])
    gateway.send_multipart(protocol.encode(normal))
    reply = receive(gateway, 10)
    # FIFO on this connection: a second answer to the hostile request would arrive first.
    assert isinstance(reply, protocol.Reply) and reply.request_id == "normal-1", reply
    assert reply.ok and [protocol.decode_value(o) for o in reply.outputs] == ["still serving"], reply
    assert receive(gateway, 0.2) is None
    assert_handled(broker, c)


def test_request_planned_as_two_batches_for_a_worker_just_killed_gets_one_reply(stack, client):
    # Heartbeats every 2 s and 5 missed before a worker is dead: the killed worker stays registered
    # for 10 s, and the broker's next heartbeat to it (which would also find it gone) is unlikely
    # to fall in the 0.2 s between the kill and the request.
    broker = stack.start_broker("--heartbeat-interval-ms", "2000", "--liveness", "5")
    victim = stack.start_worker("--model", "echo", "--max-batch-size", "4", "--max-batches", "2")
    c = client()
    wait_until(lambda: live_pids(c) == [victim.pid], 30, what="the worker")
    victim.kill()  # SIGKILL while idle, and reaped: the kernel has closed its TCP connection
    # The broker only learns that the connection is gone when a send to it fails (ROUTER_MANDATORY:
    # EHOSTUNREACH), and only once libzmq's I/O thread has processed the close. Nothing outside the
    # broker can observe that, so a short delay is unavoidable; on loopback it takes well under 10 ms.
    time.sleep(0.2)
    inputs = [{"n": n} for n in range(8)]  # two full batches of 4: both of the worker's slots
    future = c.submit("echo", inputs, timeout_s=15)
    wait_while_alive(broker, lambda: broker_stats(c).get("workers_lost", 0) >= 1, 10,
                     "the broker to find the worker gone")
    assert broker_stats(c).get("send_dropped_unreachable", 0) >= 1, (
        "the broker's first batch did not fail to send, so this run did not plan batches for a dead worker")

    stack.start_worker("--model", "echo", "--max-batch-size", "4")
    wait_while_alive(broker, future.done, 20, "the request's reply")
    try:
        assert future.result(timeout=0) == inputs
    except BrokerError as error:  # the dead worker's batches may fail rather than wait for another
        assert error.code.value in {"UNAVAILABLE", "WORKER_LOST", "TIMEOUT"}, error
        assert error.message != "no reply before the deadline", "the broker never answered"

    wait_until_broker_holds_nothing(broker, c)
    # The new worker serves; and on this client's one connection its reply comes after any second
    # reply to the request above, which would have been counted as unmatched.
    assert c.submit("echo", ["after"], timeout_s=10).result(timeout=15) == ["after"]
    assert c.unmatched_replies == 0
    assert_handled(broker, c)


class FakeWorker:
    """A worker on a raw DEALER: registers, heartbeats, and answers each batch with a hostile result."""

    def __init__(self, context: zmq.Context, endpoint: str, model: str,
                 hostile_errors: Callable[[int], list]):
        self.socket = raw_dealer(context, endpoint)
        self.model = model
        self.hostile_errors = hostile_errors  # batch size -> the result's `errors`
        self.registrations = 0
        self.batches = 0

    def send(self, message: protocol.Message) -> None:
        self.socket.send_multipart(protocol.encode(message))

    def ready(self) -> None:
        self.registrations += 1
        self.send(protocol.Ready([self.model], max_batch_size=4, max_batches=1, pid=os.getpid()))

    def serve(self, broker: Process, until: Callable[[], bool], timeout_s: float) -> None:
        give_up_at = time.monotonic() + timeout_s
        heartbeat_due_at = 0.0
        while not until():
            assert_alive(broker)
            now = time.monotonic()
            assert now < give_up_at, f"no reply in {timeout_s} s; broker log:\n{broker.output()[-4000:]}"
            if now >= heartbeat_due_at:
                self.send(protocol.Heartbeat(registration=self.registrations))
                heartbeat_due_at = now + 0.5
            message = receive(self.socket, 0.05)
            if isinstance(message, protocol.Heartbeat):
                self.send(protocol.Heartbeat(registration=self.registrations))
            elif isinstance(message, protocol.Disconnect):  # "send READY": as a real worker would
                self.ready()
            elif isinstance(message, protocol.Batch):
                self.batches += 1
                size = len(message.inputs)
                # Valid outputs (the inputs echoed), so that only `errors` is hostile.
                self.send(protocol.BatchResult(message.batch_id, outputs=list(message.inputs),
                                               errors=self.hostile_errors(size)))

    def leave(self) -> None:
        self.send(protocol.Disconnect("fake worker leaving"))
        self.socket.close(linger=1000)


HOSTILE_ERRORS = {
    # Every input "failed", under indices that are not in the batch: it looks like a whole-batch
    # failure, whose message was read from errors[0].
    "index-outside-the-batch": lambda size: [[size + i, "MODEL_ERROR", "no such input"] for i in range(size)],
    # The code is looked up in a dict of ErrorCode values; a list cannot be.
    "list-as-the-code": lambda size: [[0, ["MODEL_ERROR"], "a list, not a code"]],
}


@pytest.mark.parametrize("hostile", list(HOSTILE_ERRORS))
def test_batch_result_with_hostile_errors_gets_one_reply_and_the_broker_keeps_serving(
        stack, client, zmq_context, hostile):
    broker = stack.start_broker("--heartbeat-interval-ms", "1000", "--liveness", "5", "--batch-timeout-s", "1")
    real = stack.start_worker("--model", "echo", wait=False)  # starts meanwhile; serves only "echo"
    c = client()
    fake = FakeWorker(zmq_context, stack.backend, "fake", HOSTILE_ERRORS[hostile])
    fake.ready()
    wait_while_alive(broker, lambda: "fake" in c.status()["models"], 10, "the fake worker to register")
    future = c.submit("fake", ["a", "b"], timeout_s=5)  # one batch of 2
    fake.serve(broker, until=future.done, timeout_s=15)
    assert fake.batches >= 1
    try:
        outputs = future.result(timeout=0)
        assert outputs == ["a", "b"], "only a reply with the right outputs may succeed"
    except BrokerError as error:  # an error is fine: the worker's result made no sense
        assert error.message != "no reply before the deadline", "the broker never answered"
    fake.leave()

    real.wait_for_output(r"worker ready", timeout_s=60)
    wait_while_alive(broker, lambda: real.pid in live_pids(c), 10, "the real worker to register")
    wait_until_broker_holds_nothing(broker, c)
    assert c.submit("echo", ["after"], timeout_s=10).result(timeout=15) == ["after"]
    assert c.unmatched_replies == 0, "a second reply for the hostile batch's request"
    assert_handled(broker, c)


def test_a_black_hole_worker_beside_a_good_one_makes_no_innocent_request_fail(stack, client):
    """Issue #28: a worker that takes batches, heartbeats and never answers (a wedged model with a live
    I/O thread). Its batch passes the deadline, it registers again within a millisecond, idle, and
    took the retry, and lost it again: innocent inputs failed as "poison" (WORKER_LOST). Now a lost
    input runs elsewhere, and the black hole is held back for a growing backoff after each overrun."""
    batch_timeout_s = 1.0
    broker = stack.start_broker("--heartbeat-interval-ms", "200", "--batch-timeout-s", str(batch_timeout_s))
    black_hole = BlackHole(stack.backend, "echo", max_batch_size=4, max_batches=1,
                           heartbeat_interval_s=0.2).start()  # first: it wins the first tie
    try:
        c = client()
        wait_while_alive(broker, lambda: len(c.status()["workers"]) == 1, 10, "the black hole to register")
        good = stack.start_worker("--model", "echo", "--max-batch-size", "4", "--max-batches", "1",
                                  "--heartbeat-interval-ms", "200")
        wait_while_alive(broker, lambda: good.pid in live_pids(c), 30, "the good worker to register")
        load_s = 6.0
        # Each request sleeps 0.1 s in the good worker, so it is often busy when a black-holed batch
        # passes its deadline: the moment at which the retry went back to the black hole.
        with Load(c, concurrency=4, timeout_s=30, extra={"sleep_s": 0.1}) as load:
            time.sleep(load_s)
            tally = load.stop()
        assert black_hole.batches >= 1, "the black hole was never given a batch: this run tested nothing"
        assert (tally.errors, tally.lost, tally.wrong, tally.duplicated) == ({}, 0, 0, 0), tally.reasons
        # Held back after each overrun for batch_timeout_s × 1, 2, 4, ...: a few batches at most.
        assert black_hole.batches <= 1 + math.ceil(math.log2(1 + (load_s + 5) / batch_timeout_s)), black_hole.batches
        assert_handled(broker, c)
    finally:
        black_hole.close()
