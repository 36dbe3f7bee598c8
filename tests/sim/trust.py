"""Issue #28's invariants: retries go elsewhere, and a worker must earn trust back.

Checked by the Ledger (tests/sim/invariants.py) at the send boundary and on every reply, in every
run; tests/sim/misbehaving.py's faults (a black hole, a flapping link, a wedged model, beside
protected workers) are what exercise them most:

8. a retried input is never dispatched to an identity it was lost on (WorkItem.lost_on, which
   must name only identities the simulation saw it sent to) while another live worker that serves
   its model is registered: not draining, and not a suspect within its backoff;
9. a WORKER_LOST that calls an input poison names two distinct identities it was sent to, or
   one identity it was sent to at least twice (the only worker that could take it);
10. a suspect gets no batch during its backoff while another such worker serves the model, and a
    worker on probation never holds more than one batch;
11. a black hole that re-registers at once is given at most max_batches + log2(1 + T / floor)
    batches in T seconds (per broker instance) while a protected worker serves the model;
12. the offence record stays within its bound, whatever identities peers choose;
13. a clean input (no poison at all) never fails WORKER_LOST while a trusted protected worker that
    serves its model was registered from its last attempt's dispatch to its reply: trusted as the
    broker can know it, having answered a batch since it registered, not on probation nor a suspect;
    unless that last attempt went to a worker trusted so too (a model may wedge after it answered).
    With max_attempts 1 the first loss is the last, and nothing is checked.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING

from broker.workers import _OFFENCES_KEPT
from ddml_common import protocol

if TYPE_CHECKING:
    from broker.batching import InFlightBatch
    from tests.sim.invariants import Ledger, Tracked
    from tests.sim.world import World

_DISTINCT = re.compile(r"lost with (\d+) distinct workers: ([0-9a-f, ]+)")
_ONLY = re.compile(r"lost with worker ([0-9a-f]+), the only worker that could take it")
_INPUT = re.compile(r"^input (\d+) ")


class Trust:
    def __init__(self, ledger: Ledger, world: World):
        self._ledger = ledger
        self._world = world
        self._floor_s = world.config.heartbeat.batch_timeout_floor_s
        # (broker incarnation, serial, index) -> the identities its batches were sent to, in order
        self.sent_to: dict[tuple[int, int, int], list[bytes]] = {}
        # (incarnation, serial, index) -> {proven protected worker that served its model: registered_at},
        # as its last attempt left (invariant 13)
        self._alternatives: dict[tuple[int, int, int], dict[bytes, float]] = {}
        self._black_hole: dict[tuple[int, bytes], list[float]] = {}  # (incarnation, identity) -> [first at, count]
        self.counts: Counter[str] = ledger.counts

    # ------------------------------------------------------------------ helpers

    def _protected(self, worker_id: bytes) -> bool:
        conn = self._world.conns.get(worker_id)
        return conn is not None and getattr(conn.owner, "faultless", False)

    def _suspect(self, worker_id: bytes, now: float) -> bool:
        offences = self._world.core._workers.offences(worker_id)
        return offences is not None and offences.suspect_until > now

    def _others(self, model: str, excluded: tuple[bytes, ...] | set[bytes], now: float) -> list[bytes]:
        """Live workers outside `excluded` that serve the model, and are neither draining nor suspects."""
        return [w.worker_id for w in self._world.core._workers
                if model in w.models and w.worker_id not in excluded and not w.draining
                and not self._suspect(w.worker_id, now)]

    def _key(self, item: bytes) -> tuple[int, int] | None:
        info = self._world.inputs.get(item)
        return None if info is None else (info[0], info[1])

    # ------------------------------------------------------------------ events

    def on_dispatch(self, worker_id: bytes, batch: InFlightBatch, message: protocol.Batch) -> None:
        """Invariants 8, 10 and 11, as a batch leaves the broker."""
        world, ledger = self._world, self._ledger
        core, now, epoch = world.core, world.now, world.epoch
        ledger.checks += 3
        model = batch.model
        for item, encoded in zip(batch.items, message.inputs):
            key = self._key(encoded)
            if key is None:
                continue
            sent = self.sent_to.setdefault((epoch, *key), [])
            if item.lost_on:
                unseen = [w for w in item.lost_on if w not in sent]
                if unseen:
                    ledger.fail(f"input {key} is recorded lost on {unseen}, where it was never sent (sent to {sent})")
                if worker_id in item.lost_on:
                    others = self._others(model, set(item.lost_on), now)
                    if others:
                        ledger.fail(f"input {key}, lost on {list(item.lost_on)}, is sent again to {worker_id!r} "
                                    f"while {others} serve model {model!r}")
                    self.counts["retries_to_the_only_worker"] += 1
            sent.append(worker_id)
            target = core._workers.get(worker_id)
            trusted_target = target is not None and target.batches_done and not target.on_probation
            if item.attempts >= ledger.max_attempts >= 2 and world.scenario.misbehaving and not trusted_target:
                self._alternatives[(epoch, *key)] = {
                    w.worker_id: w.registered_at for w in core._workers
                    if model in w.models and w.worker_id != worker_id and w.worker_id not in item.lost_on
                    and w.batches_done and not w.on_probation and not w.draining
                    and not self._suspect(w.worker_id, now) and self._protected(w.worker_id)}
        worker = core._workers.get(worker_id)
        if self._suspect(worker_id, now):
            others = self._others(model, (worker_id,), now)
            if others:
                until = core._workers.offences(worker_id).suspect_until
                ledger.fail(f"suspect {worker_id!r} (backoff until {until:.4f}) gets batch {batch.batch_id} at "
                            f"{now:.4f} while {others} serve model {model!r}")
            self.counts["batches_to_suspects_alone"] += 1
        if worker is not None and worker.on_probation:
            self.counts["batches_on_probation"] += 1
            if len(worker.in_flight) > 1:
                ledger.fail(f"{worker_id!r} is on probation and holds {len(worker.in_flight)} batches: "
                            f"{sorted(worker.in_flight)}")
        self._count_black_hole(worker_id, model, now, epoch)

    def _count_black_hole(self, worker_id: bytes, model: str, now: float, epoch: int) -> None:
        """Invariant 11: over T seconds, a black hole gets at most max_batches + log2(1 + T / floor)."""
        conn = self._world.conns.get(worker_id)
        owner = conn.owner if conn is not None else None
        if (not getattr(owner, "black_hole", False) or not self._world.injecting or now < owner.misbehaves_at
                or not any(self._protected(w) for w in self._others(model, (worker_id,), now))):
            return
        record = self._black_hole.setdefault((epoch, worker_id), [now, 0])
        record[1] += 1
        self.counts["black_hole_batches_beside_a_protected_worker"] += 1
        elapsed_s = now - record[0]
        bound = owner.spec.max_batches + math.log2(1 + elapsed_s / self._floor_s)
        if record[1] > bound + 1e-9:
            self._ledger.fail(f"black hole {worker_id!r} got {record[1]} batches in {elapsed_s:.3f} s beside a "
                              f"protected worker; the bound is {bound:.2f} (max_batches {owner.spec.max_batches} "
                              f"+ log2(1 + T / {self._floor_s}))")

    def on_worker_lost(self, tracked: Tracked, reply: protocol.Reply, clean: bool) -> None:
        """Invariants 9 and 13, for a request answered WORKER_LOST."""
        ledger, world = self._ledger, self._world
        ledger.checks += 2
        message = reply.error_message
        if "poison" in message:
            self._check_poison_verdict(tracked, message)
        index = _INPUT.match(message)
        if not clean or index is None:
            return
        alternatives = self._alternatives.get((world.epoch, tracked.serial, int(index.group(1))))
        core = world.core
        still = [w.hex() for w, registered_at in (alternatives or {}).items()
                 if (state := core._workers.get(w)) is not None and state.registered_at == registered_at]
        if still:
            ledger.fail(f"request {tracked.key}, whose inputs are all clean, failed WORKER_LOST ({message!r}) although "
                        f"proven protected worker(s) {still} that serve its model were registered from its last "
                        f"attempt's dispatch to its reply")

    def _check_poison_verdict(self, tracked: Tracked, message: str) -> None:
        ledger = self._ledger
        match = _INPUT.match(message)
        if match is None:
            ledger.fail(f"a poison verdict that names no input: {message!r}")
        key = (self._world.epoch, tracked.serial, int(match.group(1)))
        sent = [w.hex() for w in self.sent_to.get(key, [])]
        distinct, only = _DISTINCT.search(message), _ONLY.search(message)
        if distinct is not None:
            named = [h.strip() for h in distinct.group(2).split(",") if h.strip()]
            if int(distinct.group(1)) < 2 or len(set(named)) < 2 or any(h not in sent for h in named):
                ledger.fail(f"poison verdict for {key[1:]} names {named}, but it was sent to {sent}: {message!r}")
        elif only is not None:
            if sent.count(only.group(1)) < 2:
                ledger.fail(f"poison verdict for {key[1:]} on the only worker {only.group(1)}, but it was sent "
                            f"to {sent}: {message!r}")
        else:
            ledger.fail(f"poison verdict for {key[1:]} with neither two distinct workers nor the only one: "
                        f"{message!r}")
        self.counts["poison_verdicts"] += 1

    def check_tables(self) -> None:
        """Invariant 12."""
        offences = self._world.core._workers._offences
        if len(offences) > _OFFENCES_KEPT:
            self._ledger.fail(f"the offence record holds {len(offences)} identities, past its bound {_OFFENCES_KEPT}")
