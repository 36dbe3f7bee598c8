"""The random simulation in CI: thousands of seeds, every invariant after every event.

DDML_SIM_SEEDS sets how many seeds (2,000 by default), DDML_SIM_START the first, and
DDML_SIM_JOBS how many processes share them (default: up to 2, one per CPU). A failure names its
seed and the command that replays it: python -m tests.sim --seed N --verbose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim.world import PLANT_VARIABLE, SimFailure, Totals, World, run_parallel, run_seed

ROOT = Path(__file__).resolve().parents[2]


def run_ci(count: int | None = None, start: int | None = None, jobs: int | None = None) -> Totals:
    """Run the CI seeds; returns the totals (seeds, events, faults by kind, invariant checks, wall
    time). Raises SimFailure with the first failing seed's message and how many seeds failed."""
    count = int(os.environ.get("DDML_SIM_SEEDS", 2000)) if count is None else count
    start = int(os.environ.get("DDML_SIM_START", 0)) if start is None else start
    jobs = int(os.environ.get("DDML_SIM_JOBS", min(2, os.cpu_count() or 1))) if jobs is None else jobs
    totals, failures = run_parallel(count, start, jobs)
    if failures:
        seeds = ", ".join(f.split(":", 1)[0].removeprefix("seed ") for f in failures[:20])
        raise SimFailure(f"{failures[0]}\n{len(failures)} of {count} seeds failed: {seeds}")
    return totals


def test_random_seeds(record_property):
    totals = run_ci()
    print(f"\n{totals.summary()}")
    for name, value in (("seeds", totals.seeds), ("events", totals.steps), ("checks", totals.checks),
                        ("wall_s", round(totals.wall_s, 1))):
        record_property(f"sim_{name}", value)
    assert totals.steps >= 200 * totals.seeds, "runs became too short to search much"


def test_one_seed_is_one_run():
    first, second = [], []
    a = run_seed(11, verbose=True, echo=first.append)
    b = run_seed(11, verbose=True, echo=second.append)
    assert first == second and a.digest == b.digest
    assert a.steps == b.steps and len(first) > 100


def test_one_seed_is_one_run_in_any_process():
    """Nothing may depend on str hashing (set order) or on anything else that differs by process."""
    digests = set()
    for hash_seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "tests.sim", "--seed", "5"], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=120)
        assert done.returncode == 0, done.stderr
        digests.add(done.stdout.split("digest ")[1].split(",")[0])
    assert len(digests) == 1


def test_a_failure_names_its_seed_and_replays_from_the_command_line(monkeypatch):
    """With a bug planted in the shell (every successful reply sent twice), the run fails, its message
    names the seed and a command, and that command fails the same way."""
    monkeypatch.setenv(PLANT_VARIABLE, "double-reply")
    with pytest.raises(SimFailure) as failure:
        World(1).run()
    message = str(failure.value)
    assert message.startswith("seed 1: ")
    assert f"replay: {PLANT_VARIABLE}=double-reply python -m tests.sim --seed 1 --verbose --strict" in message
    done = subprocess.run([sys.executable, "-m", "tests.sim", "--seed", "1", "--strict"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == message.splitlines()[0]
