"""Issue #28's fault model: workers that keep registering and keep losing what they are given.

Three misbehaviours, each on the real worker code (WorkerLinks decides registration, heartbeats
and admission, as for every simulated worker):

- a black hole (`BlackHoleWorker`) takes batches, heartbeats, and never answers; when the broker
  takes a batch away and says DISCONNECT, it registers again at once, under the same identity;
- a flapping link (`Flapping`): every few hundred ms its TCP connection breaks and ZeroMQ
  reconnects under the same identity; what was in flight on it is lost, and the worker registers
  again when the broker has forgotten it;
- a wedged model (`Wedged`): from some moment on, every batch or pass it starts never finishes,
  while its I/O thread heartbeats on. Its watchdog ends the process and the supervisor starts it
  again, under a fresh identity, with the model still wedged.

A seed runs this model with probability MISBEHAVING_P, drawn from a stream of its own so that the
other seeds run as before. Then the seed's own workers are `protected` (no fault touches them, and
no input kills or hangs them): what is lost is lost with a misbehaving worker or a broker, which is
what lets tests/sim/trust.py check that no clean input fails while a protected worker serves its model.
"""

from __future__ import annotations

import random

from tests.sim.peers import _HUNG_S, ContinuousWorker, SimWorker
from tests.sim.world import MODELS, START_AT, Scenario, WorkerSpec
from worker.link import Compute

MISBEHAVING_P = 0.25  # share of random seeds that run this model
BEHAVIOURS = ("black_hole", "flapping", "wedged")
CLEAN_POISONS = ("invalid", "raise", "error")  # poisons that fail their own input, and kill or hang nothing


def draw_misbehaving(seed: int, scenario: Scenario) -> None:
    """Maybe turn a drawn scenario into one with misbehaving workers beside protected ones."""
    rng = random.Random(f"misbehaving {seed}")
    if rng.random() >= MISBEHAVING_P:
        return
    scenario.misbehaving = True
    for spec in scenario.workers:
        spec.protected = True
    if not any("m" in spec.models for spec in scenario.workers):
        scenario.workers[0].models = MODELS
    scenario.poison_kinds = CLEAN_POISONS
    for _ in range(rng.choice((1, 1, 2))):
        behaviour = rng.choice(BEHAVIOURS)
        models = rng.choice((("m",), ("m",), MODELS))
        if behaviour != "black_hole" and rng.random() < 0.5:
            spec = WorkerSpec.draw_continuous(rng, models)
        else:
            spec = WorkerSpec(models, rng.randint(1, 8), rng.randint(1, 2), rng.uniform(0.002, 0.03),
                              rng.uniform(0.0005, 0.005))
        spec.behaviour = behaviour
        spec.misbehave_after_s = rng.choice((0.0, rng.uniform(0.0, scenario.submit_s)))
        spec.flap_every_s = rng.uniform(0.1, 0.6)
        scenario.workers.append(spec)


class BlackHoleWorker(SimWorker):
    """Takes batches, heartbeats, never answers; registers again at once when dropped (it never
    seems busy, so WorkerLinks sends READY as soon as the broker says DISCONNECT)."""

    black_hole = True  # tests/sim/trust.py bounds the batches it gets (invariant 11)

    @property
    def misbehaves_at(self) -> float:
        return START_AT + self.spec.misbehave_after_s

    def start(self) -> bool:
        self.swallowed: list[Compute] = []
        return super().start()

    def _take(self, compute: Compute) -> None:
        world = self.world
        if not world.injecting or world.now < self.misbehaves_at:  # honest before, and healed at wind-down
            super()._take(compute)
            return
        world.faults["black_hole_batches"] += 1
        world.trace("%s swallows batch %s", self.name, compute.batch.batch_id)
        self.swallowed.append(compute)

    def _forget(self, epoch: int) -> list[tuple[int, int]]:
        dropped = [(c.epoch, c.batch.batch_id) for c in self.swallowed]
        self.swallowed.clear()
        return dropped + super()._forget(epoch)


class Flapping:
    """Its link breaks every spec.flap_every_s (about) and comes back under the same identity."""

    def start(self) -> bool:
        started = super().start()
        world = self.world
        world.at(max(world.now, START_AT + self.spec.misbehave_after_s), self._flap, self._token)
        return started

    def _flap(self, token: int) -> bool:
        world = self.world
        if token != self._token or not self.alive or not world.injecting:
            return False
        world.faults["flaps"] += 1
        world.drop_link(self.conn, same_identity=True)
        world.after(world.rng.uniform(0.5, 1.5) * self.spec.flap_every_s, self._flap, token)
        return True


class Wedged:
    """From spec.misbehave_after_s on, every batch or pass it starts hangs; the watchdog ends it."""

    def _draw_outcome(self, poisons: set[str], duration_s: float, unit: str) -> tuple[str, float]:
        world = self.world
        if world.injecting and world.now >= START_AT + self.spec.misbehave_after_s:
            world.faults[f"wedged_{unit}"] += 1
            return "hang", _HUNG_S
        return super()._draw_outcome(poisons, duration_s, unit)


class FlappingWorker(Flapping, SimWorker):
    pass


class FlappingContinuousWorker(Flapping, ContinuousWorker):
    pass


class WedgedWorker(Wedged, SimWorker):
    pass


class WedgedContinuousWorker(Wedged, ContinuousWorker):
    pass


KINDS = {  # (behaviour, continuous) -> the peer class
    ("black_hole", False): BlackHoleWorker,
    ("flapping", False): FlappingWorker,
    ("flapping", True): FlappingContinuousWorker,
    ("wedged", False): WedgedWorker,
    ("wedged", True): WedgedContinuousWorker,
}
