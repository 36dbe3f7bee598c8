"""The pool simulation (tests/sim/pool.py) in CI: every invariant after every event, on many seeds.

DDML_POOL_SIM_SEEDS sets how many (by default a hundredth of DDML_SIM_SEEDS, at least 4); a failure
names its seed and the command that replays it."""

from __future__ import annotations

import os

from tests.sim.pool import REPLICA_BOUND_S, PoolSim


def test_pool_seeds_keep_every_invariant():
    count = int(os.environ.get("DDML_POOL_SIM_SEEDS", max(4, int(os.environ.get("DDML_SIM_SEEDS", 2000)) // 100)))
    totals = {"requests": 0, "ok": 0, "loads": 0, "load_failures": 0, "events": 0, "checks": 0}
    waits: list[float] = []  # of the seeds without kills, which are held to REPLICA_BOUND_S
    for seed in range(count):
        sim = PoolSim(seed, kill_rate=0.0 if seed % 2 else 0.05).run()
        for name in totals:
            totals[name] += sim.counts[name]
        if not sim.kill_rate:
            waits += sim.replica_waits_s
        # Only the model that never loads fails; every request for the others succeeds.
        assert set(sim.errors) <= {"UNAVAILABLE (flaky)", "TIMEOUT (flaky)"}, (seed, sim.errors)
    print(f"\n{count} seeds: {totals}; wait for a replica without kills: max {max(waits, default=0):.2f} s "
          f"(bound {REPLICA_BOUND_S} s)")
    assert totals["loads"] > count and totals["load_failures"] > 0 and totals["events"] > 10_000 * count


def test_pool_seeds_with_an_operator_keep_every_invariant_and_a_restarted_broker_learns_the_overrides_back():
    """Midway the operator overrides one model (unloaded, or a new min/max) on both brokers; a broker then
    restarts and must learn the override from the pool workers; a later load goes to one broker only.
    Only the model the operator unloaded, the flaky one, and requests the restarted broker got before its
    workers rejoined, may fail."""
    count = max(4, int(os.environ.get("DDML_POOL_SIM_SEEDS", max(4, int(os.environ.get("DDML_SIM_SEEDS", 2000))
                                                                 // 100))) // 2)
    learned: list[float] = []
    for seed in range(1000, 1000 + count):
        sim = PoolSim(seed, duration_s=60.0, kill_rate=0.0 if seed % 2 else 0.05, operator=True).run()
        assert set(sim.errors) <= {"UNAVAILABLE (flaky)", "TIMEOUT (flaky)", "UNAVAILABLE (operator)",
                                   "UNAVAILABLE (restart)"}, (seed, sim.errors)
        assert len(sim.learned_back_s) == 1, seed
        learned += sim.learned_back_s
    print(f"\n{count} seeds with an operator: a restarted broker learned the overrides back in at most "
          f"{max(learned):.2f} s")


def test_one_seed_is_one_run():
    first, second = [], []
    a = PoolSim(3, echo=first.append).run()
    b = PoolSim(3, echo=second.append).run()
    assert first == second and a.counts == b.counts and len(first) > 5
