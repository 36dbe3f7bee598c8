"""Partition: a worker on another "host" (a network namespace behind a veth pair) loses its link."""

from __future__ import annotations

import time

import pytest

from gateway.broker_client import BrokerClient
from tests.chaos import Load, live_pids
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration

HB = ("--heartbeat-interval-ms", "200")



def test_partitioned_worker_is_replaced_then_rejoins_within_2_s(netns, stack):  # netns outlives the stack
    backend = f"tcp://{netns.host_ip}:{free_port()}"
    stack.start_broker(*HB, backend=backend)
    flags = ("--model", "echo", "--max-batch-size", "8", *HB)
    remote = stack.start_worker(*flags, prefix=netns.prefix)  # reaches the broker across the veth
    local = stack.start_worker(*flags)
    client = BrokerClient(stack.frontend, heartbeat_interval_s=0.2)
    try:
        wait_until(lambda: len(live_pids(client)) == 2, 30, what="both workers")
        assert any(w["pid"] == remote.pid for w in client.status()["workers"])
        with Load(client, concurrency=16, extra={"sleep_s": 0.05}) as load:
            load.wait_for_ok(100, 30)
            cut_at = time.monotonic()
            netns.set_link(up=False)
            wait_until(lambda: remote.pid not in live_pids(client), 10, what="the broker to drop the remote")
            detected_s = time.monotonic() - cut_at
            served_during = load.tally.ok
            wait_until(lambda: time.monotonic() - cut_at >= 10, 15, interval_s=0.1, what="10 s of partition")
            served_during = load.tally.ok - served_during
            healed_at = time.monotonic()
            netns.set_link(up=True)
            wait_until(lambda: remote.pid in live_pids(client), 10, what="the remote to rejoin")
            rejoined_s = time.monotonic() - healed_at
            load.wait_for_ok(100, 30)
            tally = load.stop()
        tally.notes = {"detection_s": f"{detected_s:.2f}", "served_while_cut": served_during,
                       "rejoin_s": f"{rejoined_s:.2f}"}
        tally.record("partition: remote worker link down 10 s")
        assert tally.lost == 0 and tally.duplicated == 0 and tally.wrong == 0, tally
        assert not tally.errors, tally.errors
        assert served_during > 100, "the local worker must carry the load while the link is down"
        assert rejoined_s < 2.0
        assert local.popen.poll() is None and remote.popen.poll() is None
    finally:
        client.close()
