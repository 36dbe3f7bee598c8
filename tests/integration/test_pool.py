"""Pool workers as real processes (issue #24): two workers that hold one model each, three models,
demand that moves from one model to the next and then asks for all three at once. Every request
must succeed; the test prints the time to a first replica, the loads and the evictions."""

from __future__ import annotations

import time

import pytest

from gateway.broker_client import BrokerClient
from tests.processes import wait_until

pytestmark = pytest.mark.integration

FAST = ("--heartbeat-interval-ms", "200")
MODELS = ("alpha", "beta", "gamma")


def write_repository(path) -> str:
    tables = "".join(f'[models.{m}]\nhandler = "worker.models.echo:EchoModel"\nidle-unload-s = 120\n\n'
                     for m in MODELS)
    path.write_text(tables + '[models.broken]\nhandler = "no_such_module:Nope"\n')
    return str(path)


def pool_figures(client: BrokerClient) -> dict:
    workers = [w for w in client.status()["workers"] if "pool" in w]
    return {name: sum(w["stats"].get(name, 0) for w in workers)
            for name in ("pool_loads", "pool_evictions", "pool_unloads", "pool_load_failures", "pool_busy_refusals")}


def burst(client: BrokerClient, models: tuple[str, ...], count: int) -> tuple[float, list[float]]:
    """`count` requests to each model at once; every one must succeed. Returns the seconds to the first
    answer and each request's latency."""
    started_at = time.monotonic()
    futures = [(m, n, client.submit(m, [{"m": m, "n": n}], timeout_s=30)) for n in range(count) for m in models]
    latencies, first_s = [], None
    for model, n, future in futures:
        assert future.result(timeout=40) == [{"m": model, "n": n}]
        done_s = time.monotonic() - started_at
        first_s = done_s if first_s is None else min(first_s, done_s)
        latencies.append(done_s)
    return first_s, latencies


def test_demand_that_moves_a_b_c_then_all_at_once_is_served_by_two_one_model_pool_workers(stack, tmp_path):
    repository = write_repository(tmp_path / "repository.toml")
    stack.start_broker(*FAST)
    for _ in range(2):
        stack.start_worker("--pool", "--repository", repository, "--max-models", "1", *FAST)
    client = BrokerClient(stack.frontend, heartbeat_interval_s=0.2)
    try:
        wait_until(lambda: len(client.status()["workers"]) == 2, timeout_s=30, what="2 pool workers")
        rows = []
        for model in MODELS:  # demand moves from one model to the next
            first_s, latencies = burst(client, (model,), count=20)
            rows.append((model, first_s, max(latencies)))
            second_s, _ = burst(client, (model,), count=20)  # held now: no wait for a load
            assert second_s < 1.0
        for _ in range(3):  # all three at once, on two workers of one model each: they take turns
            first_s, latencies = burst(client, MODELS, count=10)
            rows.append(("all three", first_s, max(latencies)))
        figures = pool_figures(client)
        print("\nphase       first answer s   last answer s")
        for phase, first_s, last_s in rows:
            print(f"{phase:<11} {first_s:>14.2f} {last_s:>15.2f}")
        print(f"loads {figures['pool_loads']}, evictions {figures['pool_evictions']}, "
              f"idle unloads {figures['pool_unloads']}, batches handed back {figures['pool_busy_refusals']}")
        status = client.status()
        assert status["stats"].get("replies_ok", 0) == 3 * 40 + 3 * 30
        assert figures["pool_loads"] >= 4  # alpha, beta, gamma, and alpha again (evicting one)
        assert figures["pool_evictions"] >= 2
        assert figures["pool_loads"] <= 20  # they take turns, bounded by the residency, not at every request
        held = [w["models"] for w in status["workers"]]
        assert all(len(models) <= 1 for models in held), held  # --max-models 1, always
        # A model that every pool worker failed to load is 503 at once; one in no repository is 404.
        with pytest.raises(Exception, match="UNAVAILABLE"):
            client.request("broken", [1], timeout_s=30)
        with pytest.raises(Exception, match="NO_SUCH_MODEL"):
            client.request("nowhere", [1], timeout_s=5)
    finally:
        client.close()


def test_with_two_brokers_each_model_is_loaded_once_though_each_broker_sees_only_its_own_demand(stack, tmp_path):
    """Brokers never talk to each other: alpha's demand reaches only broker one, beta's only broker
    two, and the two pool workers plan from both reports. Each model gets exactly one replica."""
    repository = write_repository(tmp_path / "repository.toml")
    brokers = []
    for _ in range(2):
        stack.start_broker(*FAST)
        brokers.append((stack.frontend, stack.backend))
    backends = ",".join(backend for _, backend in brokers)
    for _ in range(2):
        stack.start_worker("--pool", "--repository", repository, "--max-models", "2", "--broker", backends, *FAST)
    # The clients' default liveness (3 x 1 s): no broker stops here, and 3 x 0.2 s was short enough for a
    # loaded CI machine to starve the client past it and fail its requests UNAVAILABLE ("stopped answering").
    one, two = (BrokerClient(frontend) for frontend, _ in brokers)
    try:
        for client in (one, two):
            wait_until(lambda c=client: len(c.status()["workers"]) == 2, timeout_s=30, what="2 pool workers")
        started_at = time.monotonic()
        futures = [(m, n, client.submit(m, [n], timeout_s=30)) for n in range(30)
                   for m, client in (("alpha", one), ("beta", two))]
        assert all(future.result(timeout=40) == [n] for _, n, future in futures)
        elapsed_s = time.monotonic() - started_at
        wait_until(lambda: sorted(m for w in one.status()["workers"] for m in w["models"]) == ["alpha", "beta"],
                   timeout_s=5, what="one replica of each model")
        figures = pool_figures(one)
        print(f"\ntwo brokers: 60 requests in {elapsed_s:.2f} s; loads {figures['pool_loads']}, "
              f"evictions {figures['pool_evictions']}")
        assert figures["pool_loads"] == 2 and figures["pool_evictions"] == 0  # no double load, no churn
    finally:
        one.close()
        two.close()
