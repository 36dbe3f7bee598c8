"""Pool observability on real processes (issue #24): a pool worker that loads, evicts and fails to load,
seen through the broker's /metrics and through ddml-status (tables and -o json)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from gateway.broker_client import BrokerClient, BrokerError
from tests.handlers import SLOW_LOAD_S
from tests.processes import REPO, free_port, scrape, value, wait_until

pytestmark = pytest.mark.integration

FAST = ("--heartbeat-interval-ms", "200")
MEMORY_MB, BUDGET_MB = 100, 512


def ddml_status(frontend: str, *flags: str) -> str:
    return subprocess.run([sys.executable, "-m", "gateway.status_cli", "--broker", frontend, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=True).stdout


def test_metrics_and_ddml_status_follow_a_pool_worker_that_loads_evicts_and_fails_to_load(stack, tmp_path):
    repository = tmp_path / "repository.toml"
    repository.write_text("".join(
        f'[models.{m}]\nhandler = "tests.handlers:SlowLoadEcho"\nidle-unload-s = 120\nmemory-mb = {MEMORY_MB}\n\n'
        for m in ("alpha", "beta")) + '[models.broken]\nhandler = "no_such_module:Nope"\n')
    metrics_port = free_port()
    stack.start_broker("--metrics-port", str(metrics_port), *FAST)
    stack.start_worker("--pool", "--repository", str(repository), "--max-models", "1",
                       "--memory-budget-mb", str(BUDGET_MB), *FAST)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    client = BrokerClient(stack.frontend, heartbeat_interval_s=0.2)
    try:
        wait_until(lambda: len(client.status()["workers"]) == 1, timeout_s=30, what="the pool worker")
        with pytest.raises(BrokerError, match="UNAVAILABLE"):  # every pool worker failed to load it
            client.request("broken", ["x"], timeout_s=30)
        started_at = time.monotonic()
        assert client.request("alpha", ["a1"], timeout_s=30) == ["a1"]  # cold: it waits for the load
        cold_s = time.monotonic() - started_at
        assert cold_s >= SLOW_LOAD_S
        wait_until(lambda: value(scrape(metrics), "ddml_model_load_seconds_count", model="alpha") == 1, timeout_s=10,
                   what="alpha's load in /metrics")
        assert client.request("alpha", ["a2"], timeout_s=30) == ["a2"]  # held now: no wait for a load
        wait_until(lambda: value(scrape(metrics), "ddml_queue_wait_seconds_count", model="alpha") == 2, timeout_s=10,
                   what="the second request in /metrics")
        first = scrape(metrics)
        assert value(first, "ddml_model_loads_total", model="alpha", reason="demand", outcome="ok") == 1
        assert SLOW_LOAD_S <= value(first, "ddml_model_load_seconds_sum", model="alpha") < cold_s
        assert value(first, "ddml_cold_start_wait_seconds_count", model="alpha") == 1  # the first request only
        assert SLOW_LOAD_S <= value(first, "ddml_cold_start_wait_seconds_sum", model="alpha") <= cold_s
        assert value(first, "ddml_model_replicas", model="alpha", state="loaded") == 1
        load_s = value(first, "ddml_model_load_seconds_sum", model="alpha")
        wait_s = value(first, "ddml_cold_start_wait_seconds_sum", model="alpha")
        print(f"\nalpha: first request {cold_s:.3f} s, its load {load_s:.3f} s, its wait for the load {wait_s:.3f} s")
        assert value(first, "ddml_worker_pool_memory_used_bytes") == MEMORY_MB * 2**20
        assert value(first, "ddml_worker_pool_memory_budget_bytes") == BUDGET_MB * 2**20

        # beta on a one-model worker evicts alpha (once alpha has been resident min_residency_s)
        assert client.request("beta", ["b1"], timeout_s=30) == ["b1"]
        wait_until(lambda: value(scrape(metrics), "ddml_model_load_seconds_count", model="beta") == 1, timeout_s=10,
                   what="beta's load in /metrics")
        after = scrape(metrics)
        assert value(after, "ddml_model_loads_total", model="broken", reason="demand", outcome="failed") == 1
        assert value(after, "ddml_model_unloads_total", model="alpha", reason="evicted") == 1
        assert value(after, "ddml_model_loads_total", model="beta", reason="demand", outcome="ok") == 1
        assert value(after, "ddml_cold_start_wait_seconds_count", model="beta") == 1
        assert value(after, "ddml_model_replicas", model="beta", state="loaded") == 1
        assert value(after, "ddml_model_replicas", model="alpha", state="loaded") == 0

        [worker] = client.status()["workers"]
        pool_id = worker["pool"]["id"]
        text = ddml_status(stack.frontend)
        print("\n" + text)
        lines = text.splitlines()
        assert "pool: 1 workers, 0 loads in progress" in lines
        placements = lines[lines.index("pool: 1 workers, 0 loads in progress"):]
        assert any(line.split() == ["beta", "1", pool_id, "0", "-"] for line in placements), placements
        assert any(line.split()[:1] == [pool_id] and line.split()[2:] == ["beta", "-", "broken", "1/1",
                                                                         f"{MEMORY_MB}/{BUDGET_MB}"]
                   for line in placements), placements
        # TIME POOL-WORKER EVENT MODEL REASON (several words) SECONDS
        rows = lines[lines.index("latest pool events") + 3:]
        events = [(p[2], p[3], " ".join(p[4:-1])) for p in map(str.split, rows)]
        kinds = [(kind, model) for kind, model, _ in events]
        assert kinds.index(("loaded", "alpha")) < kinds.index(("unload", "alpha")) < kinds.index(("loaded", "beta"))
        assert ("load_failed", "broken") in kinds
        assert [why for kind, model, why in events if (kind, model) == ("unload", "alpha")] == ["evicted for beta"]

        document = json.loads(ddml_status(stack.frontend, "-o", "json"))
        loaded = [e for e in document["pool_events"] if e["kind"] == "loaded"]
        assert [e["model"] for e in loaded] == ["alpha", "beta"]
        assert all(e["pool_id"] == pool_id and SLOW_LOAD_S <= e["seconds"] < 10 for e in loaded)
        assert all(abs(e["at"] - (time.time() - e["age_s"])) < 5 for e in document["pool_events"])
    finally:
        client.close()
