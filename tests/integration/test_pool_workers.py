"""Pool workers as real processes (issue #24): several supervised pool workers from one command
(`--pool --num-workers N`, as `--cuda-devices 0,1` runs one per GPU), and each model's own
--max-batch-size on one pool worker."""

from __future__ import annotations

import os
import signal
import time

import pytest

from gateway.broker_client import BrokerClient
from tests.processes import wait_until

pytestmark = pytest.mark.integration

FAST = ("--heartbeat-interval-ms", "200")


def write_repository(path, caps: dict[str, int]) -> str:
    path.write_text("".join(f'[models.{model}]\nhandler = "tests.handlers:DirectedEcho"\nidle-unload-s = 120\n'
                            f"max-batch-size = {cap}\n\n" for model, cap in caps.items()))
    return str(path)


def pool_workers(client: BrokerClient) -> list[dict]:
    return [w for w in client.status()["workers"] if "pool" in w]


def serve_both(client: BrokerClient, models: tuple[str, ...], count: int = 10) -> None:
    """`count` requests to each model at once; every one must succeed."""
    futures = [(m, n, client.submit(m, [{"m": m, "n": n}], timeout_s=30)) for n in range(count) for m in models]
    for model, n, future in futures:
        assert future.result(timeout=40) == [{"m": model, "n": n}]


def test_pool_with_num_workers_runs_supervised_pool_workers_that_share_the_models_and_come_back(stack, tmp_path):
    repository = write_repository(tmp_path / "repository.toml", {"alpha": 16, "beta": 16})
    stack.start_broker(*FAST)
    supervisor = stack.start_worker("--pool", "--repository", repository, "--max-models", "1",
                                    "--num-workers", "2", *FAST, wait=False)
    client = BrokerClient(stack.frontend)  # default liveness (3 × 1 s): 3 × 0.2 s ran out under CI load
    try:
        wait_until(lambda: len(pool_workers(client)) == 2, timeout_s=60, what="2 supervised pool workers")
        first = pool_workers(client)
        assert len({w["pool"]["id"] for w in first}) == 2 and len({w["pid"] for w in first}) == 2
        assert supervisor.pid not in {w["pid"] for w in first}  # children, not the supervisor itself
        serve_both(client, ("alpha", "beta"))
        # --max-models 1 each: placement put one model on each child.
        wait_until(lambda: sorted(m for w in pool_workers(client) for m in w["models"]) == ["alpha", "beta"],
                   timeout_s=10, what="alpha and beta held, one on each pool worker")
        victim = next(w for w in pool_workers(client) if w["models"] == ["alpha"])
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: len(pool_workers(client)) == 2 and victim["pid"] not in {w["pid"] for w in
                                                                                   pool_workers(client)},
                   timeout_s=30, what="the killed pool worker restarted and registered again")
        again = pool_workers(client)
        assert victim["pool"]["id"] not in {w["pool"]["id"] for w in again}  # a new pool id: a new process
        assert supervisor.popen.poll() is None
        serve_both(client, ("alpha", "beta"))  # alpha is loaded again, on either
        print(f"\nsupervised pool workers: pids {sorted(w['pid'] for w in first)}, after the kill "
              f"{sorted(w['pid'] for w in again)}")
    finally:
        client.close()


def test_each_model_on_a_pool_worker_is_batched_up_to_its_own_max_batch_size(stack, tmp_path):
    """alpha's cap is 64 and beta's 8, on one pool worker: alpha's batches grow past 8."""
    repository = write_repository(tmp_path / "repository.toml", {"alpha": 64, "beta": 8})
    stack.start_broker(*FAST)
    stack.start_worker("--pool", "--repository", repository, "--max-models", "2", *FAST)
    client = BrokerClient(stack.frontend)  # default liveness (3 × 1 s): 3 × 0.2 s ran out under CI load
    try:
        wait_until(lambda: len(pool_workers(client)) == 1, timeout_s=30, what="the pool worker")
        serve_both(client, ("alpha", "beta"), count=1)  # both loaded
        # One batch computes for 1 s while 100 inputs of each model queue behind it.
        sleeper = client.submit("alpha", [{"sleep_s": 1.0}], timeout_s=30)
        wait_until(lambda: client.status()["workers"][0]["in_flight_batches"] == 1, timeout_s=5,
                   what="the sleeping batch at the worker")
        started_at = time.monotonic()
        serve_both(client, ("alpha", "beta"), count=100)
        assert sleeper.result(timeout=40) == [{"sleep_s": 1.0}]
        models = client.status()["models"]
        alpha = {int(size): n for size, n in models["alpha"]["batch_sizes"].items()}
        beta = {int(size): n for size, n in models["beta"]["batch_sizes"].items()}
        print(f"\n200 requests in {time.monotonic() - started_at:.2f} s; batch sizes: alpha {alpha}, beta {beta}")
        assert max(alpha) > 8 and max(alpha) <= 64
        assert max(beta) <= 8
        assert models["alpha"]["max_batch_size"] == 64 and models["beta"]["max_batch_size"] == 8
    finally:
        client.close()
