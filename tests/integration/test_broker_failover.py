"""Several brokers, all equal: a broker's death, restart or partition costs clients nothing.

Real brokers, workers and clients on 127.0.0.1. Workers serve every broker they are given
(`--broker B1,B2`); clients send each request to the first live broker and resend what a dead
broker held to the other, with the same id; the first reply wins.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from gateway.broker_client import BrokerClient, BrokerError
from tests.chaos import Load, Tally, settle
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration

HB = ("--heartbeat-interval-ms", "200")


class Pair:
    """Two brokers on fixed random ports (so that one can restart at the same address)."""

    def __init__(self, stack, frontend_host: str = "127.0.0.1", backend_host: str = "127.0.0.1"):
        self.stack = stack
        self.addresses = [(f"tcp://{frontend_host}:{free_port()}", f"tcp://{backend_host}:{free_port()}")
                          for _ in range(2)]
        self.processes = [None, None]
        for index in range(2):
            self.start(index)

    def start(self, index: int, *flags: str):
        frontend, backend = self.addresses[index]
        self.processes[index] = self.stack.start_broker(*HB, *flags, frontend=frontend, backend=backend)
        return self.processes[index]

    @property
    def frontends(self) -> str:
        return ",".join(frontend for frontend, _ in self.addresses)

    @property
    def backends(self) -> str:
        return ",".join(backend for _, backend in self.addresses)


def workers_per_broker(client: BrokerClient) -> list[int]:
    try:
        brokers = client.status(timeout_s=1.0)["brokers"]
    except BrokerError:
        return [0, 0]
    return [len(b.get("workers", [])) for b in brokers]


def start_workers(stack, pair: Pair, count: int, *flags: str):
    return [stack.start_worker("--model", "echo", "--max-batch-size", "8", *HB, *flags, broker=pair.backends)
            for _ in range(count)]


def two_brokers(stack, workers: int) -> tuple[Pair, BrokerClient]:
    """Two brokers, `workers` echo workers serving both, and a client of both, once all are joined."""
    pair = Pair(stack)
    start_workers(stack, pair, workers)
    client = BrokerClient(pair.frontends, heartbeat_interval_s=0.2)
    wait_until(lambda: workers_per_broker(client) == [workers, workers], 30, what="the workers on both brokers")
    return pair, client


class TimedLoad(Load):
    """Load that also keeps the worst time any one request took."""

    worst_latency_s = 0.0

    def _call(self, path, value, timeout_s):
        started_at = time.monotonic()
        try:
            return super()._call(path, value, timeout_s)
        finally:
            self.worst_latency_s = max(self.worst_latency_s, time.monotonic() - started_at)


def test_sigkill_of_the_broker_carrying_the_traffic_costs_clients_nothing(stack):
    pair, client = two_brokers(stack, workers=2)
    try:
        with TimedLoad(client, concurrency=32, extra={"sleep_s": 0.02}) as load:
            load.wait_for_ok(300, 30)
            assert client.status()["brokers"][0]["stats"].get("requests", 0) > 0, "broker 1 carries the load"
            killed_at = time.monotonic()
            pair.processes[0].kill()
            load.wait_for_ok(300, 30)
            served_after_s = time.monotonic() - killed_at
            tally = load.stop()
        tally.notes = {"resent": client.resent, "duplicates_dropped": client.duplicate_replies,
                       "300_ok_after_kill_s": f"{served_after_s:.2f}",
                       "worst_latency_s": f"{load.worst_latency_s:.2f}"}
        tally.record("failover: SIGKILL the broker carrying 32 clients")
        assert (tally.ok, tally.errors, tally.lost, tally.duplicated, tally.wrong) == (
            tally.sent, {}, 0, 0, 0), tally
        assert tally.unaccounted == 0
    finally:
        client.close()


def test_sigkill_of_the_broker_carrying_minilm_traffic_costs_clients_nothing(stack):
    """The same with the real MiniLM model, once: 16 clients, one worker on two brokers."""
    pair = Pair(stack)
    stack.start_worker("--model", "minilm", "--device", "cpu", *HB, broker=pair.backends)
    client = BrokerClient(pair.frontends, heartbeat_interval_s=0.2)
    outcomes: list = []
    stop = threading.Event()

    def run(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started_at = time.monotonic()
            try:
                [vector] = client.request("minilm", [f"client {index} sentence {n}"], timeout_s=30)
                outcomes.append(("ok" if len(vector) == 384 else "wrong", time.monotonic() - started_at))
            except BrokerError as error:
                outcomes.append((error.code.value, time.monotonic() - started_at))

    try:
        wait_until(lambda: workers_per_broker(client) == [1, 1], 60, what="the MiniLM worker on both brokers")
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(16)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(outcomes) >= 60, 60, what="60 replies before the kill")
        pair.processes[0].kill()
        killed_at_count = len(outcomes)
        wait_until(lambda: len(outcomes) >= killed_at_count + 60, 60, what="60 replies after the kill")
        stop.set()
        for thread in threads:
            thread.join(40)
        settle(client)
        counts = Counter(kind for kind, _ in outcomes)
        Tally(sent=len(outcomes), ok=counts["ok"], wrong=counts["wrong"], duplicated=client.unmatched_replies,
              errors=Counter({k: v for k, v in counts.items() if k not in ("ok", "wrong")}),
              notes={"resent": client.resent, "worst_latency_s": f"{max(t for _, t in outcomes):.2f}"}).record(
            "failover: SIGKILL the broker carrying MiniLM traffic (16 clients)")
        assert counts == Counter(ok=len(outcomes)), counts
        assert client.unmatched_replies == 0
    finally:
        stop.set()
        client.close()


def test_rolling_restart_of_the_brokers_under_load_fails_nothing(stack):
    pair, client = two_brokers(stack, workers=2)
    try:
        rejoin_s = []
        with Load(client, concurrency=16, extra={"sleep_s": 0.02}) as load:
            for index in (0, 1):
                load.wait_for_ok(200, 30)
                pair.processes[index].signal(signal.SIGTERM)
                assert pair.processes[index].popen.wait(30) == 0, "a drained broker exits 0"
                load.wait_for_ok(100, 30)  # the other broker carries the load alone
                restarted_at = time.monotonic()
                pair.start(index)
                wait_until(lambda: workers_per_broker(client)[index] == 2, 10, interval_s=0.05,
                           what="the workers to rejoin the restarted broker")
                rejoin_s.append(time.monotonic() - restarted_at)
            load.wait_for_ok(200, 30)
            tally = load.stop()
        tally.notes = {"resent": client.resent, "rejoin_s": ", ".join(f"{s:.2f}" for s in rejoin_s)}
        tally.record("failover: SIGTERM each broker in turn (rolling restart)")
        assert (tally.errors, tally.lost, tally.duplicated, tally.wrong) == ({}, 0, 0, 0), tally
        assert all(s < 2.0 for s in rejoin_s), f"a restarted broker gets its workers back within 2 s: {rejoin_s}"
    finally:
        client.close()


def test_both_brokers_down_gives_clean_unavailable_then_full_recovery(stack):
    pair, client = two_brokers(stack, workers=1)
    try:
        assert client.request("echo", ["before"], timeout_s=5) == ["before"]
        for process in pair.processes:
            process.kill()
        started_at = time.monotonic()
        with pytest.raises(BrokerError) as refused:
            client.request("echo", ["while down"], timeout_s=10)
        assert refused.value.code.value == "UNAVAILABLE" and refused.value.retry_after_s > 0
        assert time.monotonic() - started_at < 5, "refused promptly, not at the deadline"
        pair.start(1)
        wait_until(lambda: _echoes(client), 10, interval_s=0.1, what="service back with one broker")
    finally:
        client.close()


def _echoes(client: BrokerClient) -> bool:
    try:
        return client.request("echo", ["after"], timeout_s=2) == ["after"]
    except BrokerError:
        return False


def test_a_worker_never_holds_more_than_max_batches_from_two_loaded_brokers(stack):
    pair = Pair(stack)
    [worker] = start_workers(stack, pair, 1, "--max-batches", "2", "--max-batch-size", "4")
    one, two = (BrokerClient(frontend, heartbeat_interval_s=0.2) for frontend, _ in pair.addresses)
    both = BrokerClient(pair.frontends, heartbeat_interval_s=0.2)
    try:
        wait_until(lambda: workers_per_broker(both) == [1, 1], 30, what="the worker on both brokers")
        with Load(one, concurrency=16, extra={"sleep_s": 0.05}) as load_one, \
                Load(two, concurrency=16, extra={"sleep_s": 0.05}) as load_two:
            load_one.wait_for_ok(150, 30)
            load_two.wait_for_ok(150, 30)
            tallies = [load_one.stop(), load_two.stop()]
        # The worker's figures arrive with its heartbeats: wait for one sent after the load.
        wait_until(lambda: _worker_stats(both).get("peak_batches_held", 0) >= 2, 5, what="the worker's figures")
        stats = _worker_stats(both)
        for tally in tallies:
            assert (tally.errors, tally.lost, tally.duplicated, tally.wrong) == ({}, 0, 0, 0), tally
        assert stats["peak_batches_held"] <= 2, stats
        assert stats["peak_batches_held"] == 2, "both slots were used"
        assert stats["refused_batches"] > 0, "two loaded brokers offered it more than two batches"
        assert worker.popen.poll() is None
    finally:
        for client in (one, two, both):
            client.close()


def _worker_stats(client: BrokerClient) -> dict:
    [worker] = client.status()["workers"]
    return worker["stats"]


def test_partition_between_the_client_and_one_broker_fails_over(netns, stack):
    """Broker 1 runs on another host (a network namespace). The workers reach it over one veth
    pair, the client over a second one. Cutting the client's link partitions the client from
    broker 1 only: broker 1 keeps its workers, and the client must go to broker 2."""
    client_link = _extra_veth(netns)
    try:
        frontend_port, backend_port = free_port(), free_port()
        broker_one = stack._spawn("broker", "--frontend", f"tcp://0.0.0.0:{frontend_port}", "--backend",
                                  f"tcp://0.0.0.0:{backend_port}", *HB, prefix=netns.prefix)
        broker_one.wait_for_output(r"broker ready", timeout_s=30)
        pair = Pair.__new__(Pair)
        pair.stack, pair.processes = stack, [broker_one, None]
        pair.addresses = [(f"tcp://{client_link['ns_ip']}:{frontend_port}", f"tcp://{netns.ns_ip}:{backend_port}"),
                          (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")]
        pair.start(1)
        start_workers(stack, pair, 2)
        client = BrokerClient(pair.frontends, heartbeat_interval_s=0.2)
        try:
            wait_until(lambda: workers_per_broker(client) == [2, 2], 30, what="both workers on both brokers")
            with TimedLoad(client, concurrency=16, extra={"sleep_s": 0.02}) as load:
                load.wait_for_ok(200, 30)
                cut_at = time.monotonic()
                client_link["set"](up=False)
                load.wait_for_ok(200, 30)
                served_s = time.monotonic() - cut_at
                client_link["set"](up=True)
                load.wait_for_ok(100, 30)
                tally = load.stop()
            tally.notes = {"resent": client.resent, "200_ok_after_cut_s": f"{served_s:.2f}",
                           "worst_latency_s": f"{load.worst_latency_s:.2f}"}
            tally.record("failover: partition between the client and broker 1")
            assert (tally.errors, tally.lost, tally.duplicated, tally.wrong) == ({}, 0, 0, 0), tally
        finally:
            client.close()
    finally:
        client_link["delete"]()


def _extra_veth(netns) -> dict:
    """A second veth pair between this host and the namespace, on its own /30."""
    import random

    tag = netns.name[len("ddml"):]
    host_if, ns_if = f"ch{tag}", f"cn{tag}"
    octet, base = random.randrange(1, 255), random.randrange(0, 64) * 4
    host_ip, ns_ip = f"10.238.{octet}.{base + 1}", f"10.238.{octet}.{base + 2}"

    def run(*args):
        subprocess.run(args, check=True, capture_output=True, timeout=10)

    run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
    try:
        run("ip", "link", "set", ns_if, "netns", netns.name)
        run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "netns", "exec", netns.name, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        run("ip", "netns", "exec", netns.name, "ip", "link", "set", ns_if, "up")
    except BaseException:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        raise
    return {
        "ns_ip": ns_ip,
        "set": lambda up: run("ip", "link", "set", host_if, "up" if up else "down"),
        "delete": lambda: subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10),
    }


def test_ddml_status_shows_every_broker_with_its_role(stack):
    pair, client = two_brokers(stack, workers=1)
    try:
        pair.processes[0].kill()
        command = [sys.executable, "-m", "gateway.status_cli", "--broker", pair.frontends]
        table = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        rows = {line.split()[0]: line.split()[1] for line in table.stdout.splitlines()
                if line.startswith("tcp://")}
        assert rows == {pair.addresses[0][0]: "down", pair.addresses[1][0]: "preferred"}, table.stdout
        document = json.loads(subprocess.run([*command, "-o", "json"], capture_output=True, text=True,
                                             timeout=60, check=True).stdout)
        assert [b["role"] for b in document["brokers"]] == ["down", "preferred"]
        assert len(document["brokers"][1]["workers"]) == 1 and len(document["workers"]) == 1
    finally:
        client.close()
