"""Real broker and echo-worker processes over TCP loopback, driven by real BrokerClients."""

import signal
import time

import pytest

from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerClient, BrokerError
from tests.processes import wait_until

pytestmark = pytest.mark.integration

FAST_HEARTBEATS = ("--heartbeat-interval-ms", "200")


@pytest.fixture
def clients(stack):
    made: list[BrokerClient] = []

    def make(count: int = 1) -> list[BrokerClient]:
        new = [BrokerClient(stack.frontend, heartbeat_interval_s=0.2) for _ in range(count)]
        made.extend(new)
        return new

    yield make
    for client in made:
        client.close()


def workers_registered(client: BrokerClient, count: int, model: str = "echo") -> bool:
    return sum(1 for w in client.status()["workers"] if model in w["models"]) >= count


def test_2000_concurrent_requests_from_3_clients_each_get_their_own_reply(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", *FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", *FAST_HEARTBEATS)
    trio = clients(3)
    wait_until(lambda: workers_registered(trio[0], 2), timeout_s=30, what="2 workers")

    sent = []
    for n in range(2000):
        which = n % 3
        value = {"client": which, "n": n, "text": f"c{which}-{n}"}  # distinct per request
        sent.append((value, trio[which].submit("echo", [value], timeout_s=60)))
    lost = duplicated = 0
    for value, future in sent:
        try:
            assert future.result(timeout=60) == [value], "a reply carried another request's output"
        except BrokerError:
            lost += 1
    assert lost == 0 and duplicated == 0

    status = trio[0].status()
    assert status["stats"]["replies_ok"] == 2000
    assert all(w["items"] > 0 for w in status["workers"]), "both workers must have served"
    assert status["models"]["echo"]["mean_batch_size"] > 1, "concurrent requests should be batched"


def test_large_request_is_split_across_workers_and_reassembled_in_order(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", "--max-batch-size", "4", *FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", "--max-batch-size", "4", *FAST_HEARTBEATS)
    [client] = clients()
    wait_until(lambda: workers_registered(client, 2), timeout_s=30, what="2 workers")
    inputs = [{"i": i, "sleep_s": 0.01} for i in range(50)]
    assert client.request("echo", inputs, timeout_s=30) == inputs
    status = client.status()
    assert max(int(size) for size in status["models"]["echo"]["batch_sizes"]) <= 4
    assert status["models"]["echo"]["items"] == 50
    assert all(w["items"] > 0 for w in status["workers"]), "the split should reach both workers"


def test_worker_killed_mid_batch_its_requests_are_answered_by_the_other(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    flags = ("--model", "echo", "--max-batch-size", "2", "--max-batches", "1", *FAST_HEARTBEATS)
    victim, survivor = stack.start_worker(*flags), stack.start_worker(*flags)
    [client] = clients()
    wait_until(lambda: workers_registered(client, 2), timeout_s=30, what="2 workers")

    inputs = [{"n": n, "sleep_s": 1.0} for n in range(6)]
    futures = [client.submit("echo", [value], timeout_s=30) for value in inputs]
    wait_until(lambda: any(w["pid"] == victim.pid and w["in_flight_items"] for w in client.status()["workers"]),
               timeout_s=10, what="the victim to hold a batch")
    killed_at = time.monotonic()
    victim.kill()  # SIGKILL, mid-batch
    assert [f.result(timeout=30) for f in futures] == [[value] for value in inputs]

    status = client.status()
    assert [w["pid"] for w in status["workers"]] == [survivor.pid]
    assert status["models"]["echo"]["redispatched"] >= 1
    assert status["stats"]["workers_lost"] == 1
    assert time.monotonic() - killed_at < 15


def test_unknown_model_is_refused_at_once(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", *FAST_HEARTBEATS)
    [client] = clients()
    wait_until(lambda: workers_registered(client, 1), timeout_s=30, what="a worker")
    def refusal() -> BrokerError:
        started_at = time.monotonic()
        with pytest.raises(BrokerError) as caught:
            client.request("no-such-model", ["x"], timeout_s=10)
        assert time.monotonic() - started_at < 1.0, "refused at once, never queued"
        return caught.value

    # Right after start the broker answers 503 (its workers may still be rejoining), then 404.
    assert refusal().code in (ErrorCode.UNAVAILABLE, ErrorCode.NO_SUCH_MODEL)
    wait_until(lambda: refusal().code is ErrorCode.NO_SUCH_MODEL, timeout_s=5, interval_s=0.2,
               what="NO_SUCH_MODEL once the broker is past its start-up grace")


def test_deadline_passed_gets_timeout_and_queued_request_is_never_dispatched(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", "--max-batch-size", "1", "--max-batches", "1", *FAST_HEARTBEATS)
    [client] = clients()
    wait_until(lambda: workers_registered(client, 1), timeout_s=30, what="a worker")

    slow = client.submit("echo", [{"sleep_s": 1.5}], timeout_s=10)
    wait_until(lambda: client.status()["workers"][0]["in_flight_items"], timeout_s=5, what="slow batch running")
    started_at = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        client.request("echo", ["never runs"], timeout_s=0.3)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert 0.25 < time.monotonic() - started_at < 1.3

    assert slow.result(timeout=10) == [{"sleep_s": 1.5}]
    status = client.status()
    assert status["workers"][0]["items"] == 1, "the expired request must never reach the worker"
    assert status["models"]["echo"]["outcomes"]["TIMEOUT"] == 1


def test_running_request_past_its_deadline_gets_timeout(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", *FAST_HEARTBEATS)
    [client] = clients()
    wait_until(lambda: workers_registered(client, 1), timeout_s=30, what="a worker")
    started_at = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        client.request("echo", [{"sleep_s": 3}], timeout_s=0.5)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert time.monotonic() - started_at < 1.5


def test_sigterm_on_worker_finishes_its_batch_then_disconnects(stack, clients):
    stack.start_broker(*FAST_HEARTBEATS)
    worker = stack.start_worker("--model", "echo", *FAST_HEARTBEATS)
    [client] = clients()
    wait_until(lambda: workers_registered(client, 1), timeout_s=30, what="a worker")
    future = client.submit("echo", [{"sleep_s": 1.0, "n": 1}], timeout_s=10)
    wait_until(lambda: client.status()["workers"][0]["in_flight_items"], timeout_s=5, what="batch running")
    worker.signal(signal.SIGTERM)
    assert future.result(timeout=10) == [{"sleep_s": 1.0, "n": 1}]
    assert worker.popen.wait(10) == 0
    wait_until(lambda: not client.status()["workers"], timeout_s=5, what="the worker to leave")
    assert client.status()["stats"].get("workers_lost", 0) == 1  # it said DISCONNECT; nothing re-dispatched
    assert client.status()["models"]["echo"]["redispatched"] == 0


def test_health_file_is_touched_while_the_broker_answers(stack, clients, tmp_path):
    health = tmp_path / "healthy"
    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", "--health-file", str(health), *FAST_HEARTBEATS)
    wait_until(health.exists, timeout_s=10, what="the health file")
    first = health.stat().st_mtime
    wait_until(lambda: health.stat().st_mtime > first, timeout_s=5, what="the health file to be touched again")
    stack.processes[0].kill()  # the broker goes away: the file must go stale
    wait_until(lambda: time.time() - health.stat().st_mtime > 1.0, timeout_s=5, what="the file to go stale")


def test_large_and_small_inputs_cross_the_broker_whole_and_in_order(stack, clients):
    """Inputs of INPUT_FRAME_BYTES and more travel in frames of their own, which the broker forwards
    from the frames they came in (docs/protocol.md): mixed with small ones, split across batches by
    the worker's max batch size, each comes back bit for bit in its place."""
    import numpy as np

    from ddml_common.protocol import INPUT_FRAME_BYTES

    stack.start_broker(*FAST_HEARTBEATS)
    stack.start_worker("--model", "echo", "--max-batch-size", "2", *FAST_HEARTBEATS)
    (client,) = clients(1)
    wait_until(lambda: workers_registered(client, 1), timeout_s=30, what="a worker")
    rng = np.random.default_rng(7)
    image = rng.standard_normal((3, 224, 224), dtype=np.float32)  # 602,112 bytes, as issue #27's
    inputs = ["small", image, {"text": "x" * (INPUT_FRAME_BYTES + 3)}, rng.integers(0, 255, INPUT_FRAME_BYTES, np.uint8),
              "last"]
    futures = [client.submit("echo", inputs, timeout_s=30) for _ in range(8)]  # several at once: batched
    for future in futures:
        outputs = future.result(timeout=60)
        assert outputs[0] == "small" and outputs[2] == inputs[2] and outputs[4] == "last"
        for got, sent in ((outputs[1], image), (outputs[3], inputs[3])):
            assert got.dtype == sent.dtype and got.shape == sent.shape and got.tobytes() == sent.tobytes()
    stats = client.status()["stats"]
    assert stats.get("malformed", 0) == 0 and stats["replies_ok"] == 8
