"""A batch worker's I/O thread runs a lone short batch itself (worker/connection.py: _run_inline),
and every guarantee of the compute thread still holds when such a batch runs long: heartbeats, the
brokers' messages, a batch that comes meanwhile, the watchdog. Real broker and echo-worker
processes over TCP loopback."""

import time

import pytest

from gateway.broker_client import BrokerClient, BrokerError
from tests.processes import wait_until
from worker.link import INLINE_AFTER_BATCHES

pytestmark = pytest.mark.integration

HB = ("--heartbeat-interval-ms", "200")  # a worker silent for 3 × 0.2 s is expired by the broker


@pytest.fixture
def clients(stack):
    """A client of the stack's broker (start it first)."""
    made: list[BrokerClient] = []

    def make() -> BrokerClient:
        made.append(BrokerClient(stack.frontend, heartbeat_interval_s=0.2))
        return made[-1]

    yield make
    for one in made:
        one.close()


def only_worker(client: BrokerClient) -> dict:
    [worker] = client.status()["workers"]
    return worker


def short_batches_until_inline(client: BrokerClient) -> dict:
    """Enough lone short batches that the worker runs the next ones on its I/O thread; its view then."""
    sent = INLINE_AFTER_BATCHES + 8  # a first batch or two may be slow
    for n in range(sent):
        assert client.request("echo", [{"n": n}], timeout_s=10) == [{"n": n}]

    def counted() -> dict | None:
        stats = only_worker(client)["stats"]
        return stats if stats.get("batches") == sent else None

    stats = wait_until(counted, timeout_s=10, what="every batch in the worker's heartbeat")
    assert stats["inline_batches"] >= 1, f"the last lone short batches ran on the I/O thread: {stats}"
    return only_worker(client)


def test_a_long_batch_on_the_io_thread_keeps_heartbeats_and_a_batch_that_comes_meanwhile_runs_after_it(stack,
                                                                                                         clients):
    stack.start_broker(*HB)
    stack.start_worker("--model", "echo", "--max-batches", "2", *HB)
    client = clients()
    wait_until(lambda: len(client.status()["workers"]) == 1, timeout_s=30, what="the worker")
    before = short_batches_until_inline(client)
    inline_before = before["stats"]["inline_batches"]

    long = client.submit("echo", [{"sleep_s": 2.0, "long": True}], timeout_s=30)  # 3 silent windows over
    wait_until(lambda: only_worker(client)["in_flight_items"] == 1, timeout_s=5, what="the long batch")
    meanwhile = client.submit("echo", [{"meanwhile": True}], timeout_s=30)  # the worker's second slot
    ages, started_at = [], time.monotonic()
    while not long.done() and time.monotonic() - started_at < 10:
        ages.append(only_worker(client)["last_heartbeat_age_s"])
        time.sleep(0.05)

    assert long.result(timeout=10) == [{"sleep_s": 2.0, "long": True}]
    assert meanwhile.result(timeout=10) == [{"meanwhile": True}]
    after = only_worker(client)
    assert after["worker_id"] == before["worker_id"] and after["uptime_s"] > before["uptime_s"], \
        "the broker never expired the worker: it heartbeated all along"
    assert max(ages) < 0.6, f"heartbeats stopped during the long batch: ages {ages}"
    assert len(ages) > 10
    assert client.status()["models"]["echo"]["redispatched"] == 0

    def both_counted() -> dict | None:  # in a heartbeat sent after both batches
        stats = only_worker(client)["stats"]
        return stats if stats["batches"] == before["stats"]["batches"] + 2 else None

    stats = wait_until(both_counted, timeout_s=5, what="both batches in the worker's heartbeat")
    assert stats["inline_batches"] == inline_before + 1, "the long one ran on the I/O thread, the other not"


def test_watchdog_ends_a_worker_whose_batch_hangs_on_the_io_thread(stack, clients):
    stack.start_broker(*HB)
    worker = stack.start_worker("--model", "echo", "--watchdog-s", "1", *HB)
    client = clients()
    wait_until(lambda: len(client.status()["workers"]) == 1, timeout_s=30, what="the worker")
    short_batches_until_inline(client)
    hung = client.submit("echo", [{"sleep_s": 3600}], timeout_s=20)
    wait_until(lambda: worker.popen.poll() is not None, timeout_s=15, what="the watchdog to end the worker")
    assert worker.popen.returncode == 75, worker.output()[-3000:]
    assert "watchdog" in worker.output()
    with pytest.raises(BrokerError):
        hung.result(timeout=30)
