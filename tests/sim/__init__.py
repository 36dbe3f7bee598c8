"""Deterministic simulation of a whole ddml cluster around the real BrokerCore.

One seed is one run: a virtual clock, an event heap and one random.Random(seed) decide every
message delay, every fault and every request, so a failing seed replays bit for bit with
`python -m tests.sim --seed N --verbose`. See /work/shared/notes/simulation-testing.md for the
idea, world.py for the engine, peers.py for the simulated gateways and workers, misbehaving.py for
issue #28's fault model (a black hole, a flapping link, a wedged model, beside protected workers),
and invariants.py and trust.py for what is checked after every event and at every send.
"""

from tests.sim.world import SimFailure, Totals, World, replay_command, run_seed, run_seeds

__all__ = ["SimFailure", "Totals", "World", "replay_command", "run_seed", "run_seeds"]
