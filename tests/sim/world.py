"""The simulated world: virtual clock, event heap, network, the broker's shell, faults.

Nothing here reads real time, and one random.Random(seed) makes every choice, so one seed is one
run. The broker is the real BrokerCore, driven the way broker/broker.py drives it: every message
is real frames (protocol.encode by its sender) handed to on_frames(); after each delivery and at
each of the core's timers (next_wake_at()) come on_tick() and flush(send). send() returns False
for an identity the broker's ROUTER does not know (ROUTER_MANDATORY): a peer that died or whose
link broke, once the broker noticed, a small random delay later.

The network keeps ZeroMQ's promises over TCP: per connection FIFO, no loss and no duplicates,
until the connection breaks, and then what is in flight on it is lost. The faults break exactly
what they name: rare reordering and duplicates on worker -> broker links, link drops, crashes.
A quarter of the seeds also run issue #28's misbehaving workers (misbehaving.py: a black hole, a
flapping link, a wedged model) beside protected workers that no fault touches.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import random
import signal
import struct
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from broker.config import BatchingConfig, BrokerConfig, HeartbeatConfig
from broker.core import BrokerCore, Peer, Send
from ddml_common import protocol
from tests.sim.invariants import Ledger

START_AT = 1000.0  # the virtual monotonic clock starts here
_SPIN_RETRY_S = 1e-6  # a 0 ms poll: the loop comes round again at once
_MAX_SPINS = 2  # that many in a row is a busy loop, not a rounding at a timer's edge
MODELS = ("m", "m2")  # what the simulated workers serve and the gateways ask for
FAULT_KINDS = (
    "worker_kill", "worker_stop", "link_drop", "link_reset", "reregister", "broker_restart", "broker_drain",
    "burst", "hostile_gateway", "rogue_worker", "garbage", "worker_drain", "queue_full", "holding", "link_noise",
)


# Bugs the random simulation finds that are not fixed yet. A seed counts each occurrence rather
# than failing on it, so that the search goes on finding new ones; tests/sim/test_regressions.py
# holds a strict xfail test for each. Remove the name once its test passes.
KNOWN_BUGS: frozenset[str] = frozenset()  # none open; "stale_pass_result" (seed 1689) was fixed


_PACK = struct.Struct("<dI").pack


def _format(now: float, fmt: str, args: tuple) -> str:
    return f"{now - START_AT:9.5f} " + (fmt % args if args else fmt)


class SimFailure(AssertionError):
    """An invariant broke. The message starts with the seed and a command that replays the run."""


PLANT_VARIABLE = "DDML_SIM_PLANT"  # "double-reply": the shell sends a successful REPLY twice (tests the checks)


def replay_command(seed: int, strict: bool = False) -> str:
    plant = os.environ.get(PLANT_VARIABLE)
    return ((f"{PLANT_VARIABLE}={plant} " if plant else "") + f"python -m tests.sim --seed {seed} --verbose"
            + (" --strict" if strict else ""))


@dataclass
class WorkerSpec:
    models: tuple[str, ...]
    max_batch_size: int
    max_batches: int
    batch_s: float  # compute time per batch (or pass) ...
    item_s: float  # ... plus per input
    # Continuous batching (peers.ContinuousWorker) when max_inputs > 0: it holds up to max_inputs
    # inputs and runs passes of at most most_inputs inputs and cost_budget padded cost (0: none).
    max_inputs: int = 0
    most_inputs: int = 0
    cost_budget: int = 0
    lanes: int = 1  # compute lanes: passes at once (worker --compute-lanes); lane k > 0 only while lane 0 is busy
    padded: bool = True  # a pass costs inputs × the largest cost; False: the sum, and passes go oldest first
    # Issue #28's fault model (tests/sim/misbehaving.py): "black_hole", "flapping" or "wedged", from
    # misbehave_after_s into the run; a flapping link breaks about every flap_every_s.
    behaviour: str = ""
    misbehave_after_s: float = 0.0
    flap_every_s: float = 0.0
    protected: bool = False  # no fault touches it (beside misbehaving workers): runs as the wind-down's worker

    @classmethod
    def draw_continuous(cls, rng: random.Random, models: tuple[str, ...], faultless: bool = False) -> WorkerSpec:
        """A continuous worker, as worker/serve.py configures one."""
        max_batch_size = rng.randint(1, 8)
        max_batches = rng.randint(1, 2)
        default = max_batch_size * max_batches
        max_inputs = default if faultless or rng.random() < 0.6 else rng.randint(1, 2 * default + 2)
        most_inputs = min(rng.choice((max_batch_size, max_batch_size, rng.randint(1, 8))), max_inputs)
        cost_budget = 0 if faultless else rng.choice((0, 0, 40, 100))
        return cls(models, max_batch_size, max_batches, rng.uniform(0.002, 0.03), rng.uniform(0.0005, 0.005),
                   max_inputs, most_inputs, cost_budget)


def draw_lanes(rng: random.Random) -> int:
    """A continuous worker's compute lanes: 1 or 2 mostly (2 is the default for a CPU text model), 3 at times."""
    return rng.choice((1, 1, 2, 2, 2, 3))


@dataclass
class Scenario:
    """Everything a seed decides before the run starts."""

    config: BrokerConfig
    gateways: int
    workers: list[WorkerSpec]
    submit_s: float  # gateways submit for this long, then the run drains
    rate_per_s: float  # requests per second per gateway (open loop)
    max_inputs: int  # inputs per request: 1..max_inputs, past max_batch_size on purpose
    poison_p: float  # per input: invalid, raise, kill, hang or slow
    slow_p: float  # per batch: computes 10-40 times longer
    hang_p: float  # per batch: hangs until the watchdog ends the worker
    dup_p: float  # per worker -> broker message: delivered twice
    reorder_p: float  # per worker -> broker message: may overtake earlier ones
    kill_after_dispatch_p: float  # per batch sent: its worker is SIGKILLed right then
    restart_p: float  # a dead worker is restarted (fresh identity) by its supervisor
    watchdog_s: float
    faults: list[tuple[float, str]]  # (at, kind), at relative to the start
    result_delay_p: float = 0.0  # per partial result of a continuous worker: its link stalls a while
    misbehaving: bool = False  # issue #28's model: misbehaving workers beside protected ones (misbehaving.py)
    poison_kinds: tuple[str, ...] = ()  # the poisons inputs draw from (empty: peers.POISONS, all of them)

    @classmethod
    def draw(cls, rng: random.Random) -> Scenario:
        heartbeat = HeartbeatConfig(interval_s=0.2, liveness=3, batch_timeout_floor_s=rng.choice((0.5, 1.0, 1.0)))
        batching = BatchingConfig(
            max_wait_s=rng.choice((0.0, 0.0, 0.0, 0.01, 0.05)),
            max_queue=rng.choice((3, 10, 30, 30)),
            max_queue_bytes=rng.choice((1 << 30, 1 << 30, 1 << 30, 400, 2000)),
            max_attempts=rng.choice((1, 2, 2, 2, 3)),
            max_batch_tokens=rng.choice((0, 0, 0, 40)),
            refill_wait_max_s=rng.choice((0.0, 0.05, 0.2)),
        )
        workers = []
        for _ in range(rng.randint(1, 3)):
            models = rng.choice((("m",), ("m",), ("m", "m2"), ("m2",)))
            if rng.random() < 0.5:
                workers.append(WorkerSpec.draw_continuous(rng, models))
                continue
            workers.append(WorkerSpec(models=models, max_batch_size=rng.randint(1, 8), max_batches=rng.randint(1, 2),
                                      batch_s=rng.uniform(0.002, 0.03), item_s=rng.uniform(0.0005, 0.005)))
        submit_s = rng.uniform(1.0, 2.0)
        enabled = [kind for kind in FAULT_KINDS if rng.random() < 0.4]  # each seed its own mix
        faults = []
        if enabled:
            faults = sorted((rng.uniform(0.05, submit_s), rng.choice(enabled)) for _ in range(rng.randint(2, 8)))

        def maybe(p: float, value: float) -> float:
            return value if rng.random() < p else 0.0

        return cls(
            config=BrokerConfig(batching=batching, heartbeat=heartbeat),
            gateways=rng.randint(2, 3),
            workers=workers,
            submit_s=submit_s,
            rate_per_s=rng.uniform(3, 15),
            max_inputs=rng.choice((1, 4, 12)),
            poison_p=maybe(0.4, rng.uniform(0.01, 0.08)),
            slow_p=maybe(0.3, rng.uniform(0.02, 0.1)),
            hang_p=maybe(0.2, rng.uniform(0.01, 0.05)),
            dup_p=maybe(0.3, rng.uniform(0.02, 0.1)),
            reorder_p=maybe(0.2, rng.uniform(0.01, 0.05)),
            kill_after_dispatch_p=maybe(0.3, rng.uniform(0.02, 0.08)),
            restart_p=rng.choice((0.5, 0.9, 1.0)),
            watchdog_s=rng.uniform(1.5, 3.0),
            faults=faults,
            result_delay_p=maybe(0.3, rng.uniform(0.02, 0.1)),
        )


@dataclass(eq=False, slots=True)
class Conn:
    """One peer's connection to the broker, as the network and the broker's ROUTER see it."""

    identity: bytes
    owner: Any  # the peer object; it has receive(frames)
    peer: Peer
    latency_s: float
    epoch: int  # the broker incarnation it reaches
    up_at: float  # the ROUTER knows it from then
    gone_at: float = math.inf  # ... and no longer from then (ROUTER_MANDATORY sends fail)
    down_until: float = -math.inf  # link broken until then: the broker's sends are lost, the peer's wait
    gen: int = 0  # bumped when the link breaks: what was in flight is lost
    closed: bool = False  # its owner closed it or died
    full_until: float = -math.inf  # its send queue is at the high-water mark: the broker's sends fail
    to_broker_at: float = -math.inf  # FIFO: the latest delivery scheduled each way
    barrier_at: float = -math.inf  # a reordered message still arrives after this (a continuous worker's READY)
    from_broker_at: float = -math.inf


@dataclass
class RunResult:
    seed: int
    steps: int
    checks: int
    digest: str
    faults: Counter
    counts: Counter
    virtual_s: float


@dataclass
class Totals:
    seeds: int = 0
    steps: int = 0
    checks: int = 0
    faults: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    virtual_s: float = 0.0
    wall_s: float = 0.0

    def merge(self, other: Totals) -> None:
        self.seeds += other.seeds
        self.steps += other.steps
        self.checks += other.checks
        self.faults.update(other.faults)
        self.counts.update(other.counts)
        self.virtual_s += other.virtual_s

    def add(self, result: RunResult) -> None:
        self.seeds += 1
        self.steps += result.steps
        self.checks += result.checks
        self.faults.update(result.faults)
        self.counts.update(result.counts)
        self.virtual_s += result.virtual_s

    def summary(self) -> str:
        counts = self.counts
        shown = ("requests_sent", "requests_sent_hostile", "requests_read", "requests_accepted", "lost_by_crash",
                 "inputs_executed", *_CONTINUOUS_SHOWN)
        replies = sum(v for k, v in counts.items() if k.startswith("reply_"))
        return (
            f"sim: {self.seeds} seeds, {self.steps} events, {self.checks} invariant checks, "
            f"{self.wall_s:.1f} s wall ({self.virtual_s:.0f} s simulated); "
            f"requests sent {counts['requests_sent']} (+{counts['requests_sent_hostile']} hostile), "
            f"read {counts['requests_read']}, accepted {counts['requests_accepted']}, replies {replies}, "
            f"lost by broker crash {counts['lost_by_crash']}, inputs executed {counts['inputs_executed']}; "
            f"continuous batching: worker starts {counts['continuous_worker_starts']}, "
            f"passes {counts['passes']} ({counts['shared_passes']} shared, {counts['pass_inputs']} inputs), "
            f"partial results {counts['partial_results']}, "
            f"held-not-started inputs lost with killed workers {counts['held_inputs_lost_with_killed_workers']} "
            f"(at {counts['killed_workers_holding']} kills), dropped when the broker forgot the worker "
            f"{counts['held_inputs_dropped_on_forget']}, PASS_FAILED inputs re-run alone "
            f"{counts['pass_failed_inputs']} (of {counts['raising_shared_passes']} raising shared passes/batches), "
            f"isolated dispatches {counts['isolated_dispatches']}, broker duplicate outputs "
            f"{counts['broker_duplicate_outputs']}, malformed results {counts['broker_malformed_results']}; "
            f"faults: {_listing(self.faults)}; other counts: "
            + _listing(Counter({k: v for k, v in counts.items() if k not in shown}))
        )


_CONTINUOUS_SHOWN = ("continuous_worker_starts", "passes", "shared_passes", "pass_inputs", "partial_results",
                     "held_inputs_lost_with_killed_workers", "killed_workers_holding",
                     "held_inputs_dropped_on_forget", "pass_failed_inputs", "raising_shared_passes",
                     "isolated_dispatches", "broker_duplicate_outputs", "broker_malformed_results")
_HARVESTED_STATS = ("duplicate_outputs", "malformed_results", "late_results", "batches_refused_busy")


def _listing(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


class World:
    def __init__(self, seed: int, scenario: Scenario | None = None, verbose: bool = False,
                 echo: Callable[[str], None] = print):
        from tests.sim import peers  # peers.py imports this module's names

        self.seed = seed
        self.plant = os.environ.get(PLANT_VARIABLE, "")  # a bug planted on purpose, to test that the checks see it
        self.rng = random.Random(seed)
        # Compute lanes come from a stream of their own, so that a seed whose continuous workers all
        # draw one lane runs exactly as it did before lanes existed.
        self.lanes_rng = random.Random(f"lanes {seed}")
        padding_rng = random.Random(f"padding {seed}")  # the same for whether passes pad (unpadded models)
        if scenario is None:
            scenario = Scenario.draw(self.rng)
            for spec in scenario.workers:
                if spec.max_inputs:
                    spec.lanes = draw_lanes(self.lanes_rng)
                    spec.padded = padding_rng.random() < 0.5
            from tests.sim.misbehaving import draw_misbehaving  # it imports peers, which import this module

            draw_misbehaving(seed, scenario)
        self.scenario = scenario
        self.config = self.scenario.config
        self.now = START_AT
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = itertools.count()
        self.steps = 0
        self.faults: Counter[str] = Counter()
        self.verbose = verbose
        self._echo = echo
        self._recent: deque[tuple[float, str, tuple]] = deque(maxlen=40)  # (at, format, args)
        self._digest = 0
        self._trace_codes: dict[str, int] = {}
        self.conns: dict[bytes, Conn] = {}
        self.epoch = 1  # broker incarnation
        self.broker_up_at = START_AT  # when the current (or next) instance binds
        self.core: BrokerCore | None = None
        self._tick_token = 0
        self._tick_at = math.inf
        self._spins = 0  # consecutive on_tick() after which the core wanted to wake at once
        self.ledger = Ledger(self)
        self.inputs: dict[bytes, tuple[int, int, str]] = {}  # encoded input -> (serial, index, poison)
        self._serials = itertools.count(1)
        self.submitting = True
        self.injecting = True
        self.tolerate: set[str] = set()  # names of known bugs to count rather than fail on
        self.replay = ""  # how to replay a scripted run (a random one replays from its seed)
        self.known_bugs: Counter[str] = Counter()
        self.core_stats: Counter[str] = Counter()  # of broker instances gone (see _harvest_stats)
        self.batch_owners: dict[int, Any] = {}  # batch id -> the peer it was sent to (for hostile results)
        self.workers: list[peers.SimWorker] = []
        self.gateways: list[peers.SimGateway] = []
        self.hostiles: list[Any] = []
        self._peers = peers

    # ------------------------------------------------------------------ engine

    def at(self, when: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn, args))

    def after(self, delay_s: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (self.now + delay_s, next(self._seq), fn, args))

    def trace(self, fmt: str, *args) -> None:
        """Record an event: formatted only when printed (--verbose) or quoted in a failure. The
        digest covers each event's exact time and kind, which any divergence would change."""
        now = self.now
        code = self._trace_codes.get(fmt)
        if code is None:
            code = self._trace_codes[fmt] = len(self._trace_codes)
        self._digest = zlib.crc32(_PACK(now, code), self._digest)
        self._recent.append((now, fmt, args))
        if self.verbose:
            self._echo(_format(now, fmt, args))

    def recent_events(self) -> list[str]:
        return [_format(now, fmt, args) for now, fmt, args in self._recent]

    def serial(self) -> int:
        return next(self._serials)

    def fail(self, message: str) -> None:
        recent = "\n    ".join(self.recent_events())
        raise SimFailure(
            f"seed {self.seed}: {message}\n"
            f"  replay: {self.replay or replay_command(self.seed, strict=not self.tolerate)}\n"
            f"  at t={self.now - START_AT:.5f}, step {self.steps}; last events:\n    {recent}"
        )

    def run_until(self, stop_at: float, done: Callable[[], bool] | None = None) -> None:
        heap, ledger = self._heap, self.ledger
        while heap and heap[0][0] <= stop_at:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            if fn(*args) is False:  # a stale timer: nothing happened
                continue
            self.steps += 1
            ledger.check_step(self.steps)
            if done is not None and done():
                return
        self.now = max(self.now, stop_at)

    # ------------------------------------------------------------------ a whole run

    def run(self) -> RunResult:
        """The seed's whole run: its peers and faults, then the wind-down and the final checks."""
        scenario, rng = self.scenario, self.rng
        with quiet_logs():
            self.start_broker()
            for spec in scenario.workers:
                self.after(rng.uniform(0, 0.05), self.add_worker(spec).start)
            for _ in range(scenario.gateways):
                self.after(rng.uniform(0, 0.05), self.add_gateway().start)
            for at, kind in scenario.faults:
                self.at(START_AT + at, self.inject, kind)
            self.run_until(START_AT + scenario.submit_s)
            self.wind_down()
        return self.result()

    def result(self) -> RunResult:
        self._harvest_stats()
        return RunResult(self.seed, self.steps, self.ledger.checks, f"{self._digest:08x}", self.faults,
                         self.ledger.counts + self.known_bugs + self.core_stats, self.now - START_AT)

    def _harvest_stats(self) -> None:
        """A few of the core's own counters, kept across broker instances, for the summary."""
        if self.core is not None:
            for name in _HARVESTED_STATS:
                self.core_stats[f"broker_{name}"] += self.core.stats[name]
                self.core.stats[name] = 0

    def add_worker(self, spec: WorkerSpec, faultless: bool = False):
        if spec.behaviour:
            from tests.sim.misbehaving import KINDS

            kind = KINDS[spec.behaviour, bool(spec.max_inputs)]
        else:
            kind = self._peers.ContinuousWorker if spec.max_inputs else self._peers.SimWorker
        worker = kind(self, len(self.workers), spec, faultless=faultless or spec.protected)
        self.workers.append(worker)
        return worker

    def add_gateway(self):
        gateway = self._peers.SimGateway(self, len(self.gateways))
        self.gateways.append(gateway)
        return gateway

    def wind_down(self) -> None:
        """Stop submitting and injecting, heal what is stopped, add one healthy worker, and run
        until every deadline has passed and nothing is held, queued or in flight."""
        self.submitting = self.injecting = False
        self.trace("wind down")
        for hostile in self.hostiles:
            hostile.stop()
        for worker in self.workers:
            worker.heal()
        if self.core is None:  # a broker restart is under way: let it come up
            self.run_until(self.now + 1.0, lambda: self.core is not None)
        spec = (WorkerSpec(MODELS, 4, 2, 0.005, 0.001, max_inputs=8, most_inputs=4, lanes=draw_lanes(self.lanes_rng))
                if self.rng.random() < 0.5 else WorkerSpec(MODELS, 4, 2, 0.005, 0.001))
        self.add_worker(spec, faultless=True).start()
        heartbeat = self.config.heartbeat
        last_deadline = max((t.deadline_at for t in self.ledger.outstanding.values()), default=self.now)
        settle_at = max(self.now + heartbeat.expiry_s, last_deadline + self.ledger.reply_bound_s)
        limit = settle_at + self.scenario.watchdog_s + 2 * heartbeat.expiry_s + 5 * heartbeat.batch_timeout_floor_s

        def quiet() -> bool:
            core = self.core
            return (self.now >= settle_at and core is not None and not core._requests
                    and not any(w.in_flight for w in core._workers) and not any(g.requests for g in self.gateways))

        self.run_until(limit, quiet)
        if not quiet():
            self.run_until(self.now)  # let events at this same instant run
        self.ledger.check_quiescent()
        for gateway in self.gateways:
            gateway.check_settled()

    # ------------------------------------------------------------------ the broker and its shell

    def start_broker(self) -> None:
        """A broker instance binds; restart_broker() has already counted the new epoch."""
        instance_id = f"b{self.epoch}-{self.rng.getrandbits(32):08x}"
        self.core = BrokerCore(self.config, instance_id, self.now)
        self._tick_at = math.inf
        self.trace("broker %s up", instance_id)
        self._run_core()

    def drain_broker(self) -> None:
        """SIGTERM, as Broker.drain() does it: refuse new requests, answer those held for a while,
        fail the rest UNAVAILABLE, keep serving a moment, then exit; a new instance starts."""
        self.faults["broker_drain"] += 1
        self.trace("broker %s drains", self.core.instance_id)
        self.core.start_drain()
        self._drain_poll(self.epoch, self.now + self.rng.uniform(0.05, 1.0))

    def _drain_poll(self, epoch: int, give_up_at: float) -> bool:
        core = self.core
        if epoch != self.epoch or core is None:
            return False
        if core.in_flight_requests and self.now < give_up_at:
            self.after(0.02, self._drain_poll, epoch, give_up_at)
            return True
        self.trace("broker %s abandons %s requests", core.instance_id, core.in_flight_requests)
        core.abandon_all(self.now)
        self._run_core()
        self.after(self.rng.uniform(0.0, 0.5), self._drained, epoch)
        return True

    def _drained(self, epoch: int) -> bool:
        if epoch != self.epoch or self.core is None:
            return False
        self.restart_broker(graceful=True)
        return True

    def restart_broker(self, graceful: bool = False, down_s: float | None = None) -> None:
        """The broker process ends and a new one binds after a while (a random draw, or `down_s` for a
        scripted test that needs it on one side of a silence window): every connection breaks."""
        if not graceful:
            self.faults["broker_restart"] += 1
        self.trace("broker %s %s", self.core.instance_id, "exits" if graceful else "crashes")
        if graceful and self.ledger.outstanding:
            self.fail(f"the drained broker exits with {len(self.ledger.outstanding)} requests unanswered: "
                      f"{sorted(self.ledger.outstanding)[:5]}")
        self.ledger.broker_crashed()
        self._harvest_stats()
        self.core = None
        self.epoch += 1  # what the old instance had in flight, either way, is lost with it
        up_at = self.broker_up_at = self.now + (self.rng.uniform(0.01, 0.6) if down_s is None else down_s)
        for conn in list(self.conns.values()):
            if conn.closed:
                continue
            conn.gen += 1
            conn.epoch = self.epoch
            conn.up_at = conn.down_until = up_at + self.rng.uniform(0.0, 0.05)
            conn.gone_at = math.inf
            if conn.peer is Peer.GATEWAY:
                # A ROUTER names an anonymous DEALER anew on each connection.
                del self.conns[conn.identity]
                conn.identity = conn.owner.next_identity()
                self.conns[conn.identity] = conn
        self.at(up_at, self.start_broker)

    def _run_core(self) -> None:
        core, now = self.core, self.now
        try:
            core.on_tick(now)
        except Exception as error:  # noqa: BLE001 - any escape is the finding
            self.fail(f"on_tick raised {error!r}")
        try:
            core.flush(self._send, now)
        except SimFailure:  # an invariant checked at the send boundary
            raise
        except Exception as error:  # noqa: BLE001
            self.fail(f"flush raised {error!r}")
        wake = core.next_wake_at()
        if wake <= now:
            # The real loop would poll with a 0 ms timeout and run its timers again a moment later.
            # Once (a float rounding at a timer's edge) is harmless; on and on is a busy loop.
            self._spins += 1
            wake = self._spin(wake) if self._spins > _MAX_SPINS else now + _SPIN_RETRY_S
        else:
            self._spins = 0
        if wake < self._tick_at:
            self._tick_at = wake
            self._tick_token += 1
            self.at(wake, self._tick, self.epoch, self._tick_token)

    def _spin(self, wake: float) -> float:
        """Fail, or, with the bug tolerated, wake as a core would that ignored its past batching
        deadlines (a worker's message runs on_tick anyway when a worker frees up)."""
        core = self.core
        queued = {m: core._batcher.queued_items(m) for m in core._batcher._queues}
        detail = (f"next_wake_at() stays at or before now ({wake - START_AT:.6f} <= {self.now - START_AT:.6f}) "
                  f"right after on_tick, {self._spins} times in a row: the broker loop busy-spins "
                  f"(queued items {queued}, workers with room {[w.worker_id for w in core._workers.with_room()]})")
        if "spin" not in self.tolerate:
            self.fail(detail)
        self.known_bugs["known_bug_spin"] += 1
        self.known_bugs["known_bug_spin_seeds"] = 1
        batcher = core._batcher.next_deadline()
        return min(core._workers.next_deadline(), core._deadlines[0][0] if core._deadlines else math.inf,
                   batcher if batcher > self.now else math.inf)

    def _tick(self, epoch: int, token: int) -> bool:
        if epoch != self.epoch or token != self._tick_token or self.core is None:
            return False
        self._tick_at = math.inf
        self.trace("tick")
        self._run_core()
        return True

    def _send(self, instruction: Send) -> bool:
        """The shell's send: ROUTER_MANDATORY, never blocking."""
        message = instruction.message
        kind = type(message)
        if instruction.peer is Peer.GATEWAY and (kind is protocol.Reply or kind is protocol.Replies):
            for reply in protocol.replies_of(message):
                self.ledger.on_reply_sent(instruction.peer_id, reply)
                if self.plant == "double-reply" and reply.ok:
                    self.ledger.on_reply_sent(instruction.peer_id, reply)
        conn = self.conns.get(instruction.peer_id)
        now = self.now
        if (conn is None or conn.peer is not instruction.peer or conn.epoch != self.epoch
                or not conn.up_at <= now < conn.gone_at):
            self.trace("send %s to %r fails: unreachable", kind.__name__, instruction.peer_id)
            if kind is protocol.Batch:
                self.ledger.counts["batch_sends_failed"] += 1
            return False
        if now < conn.full_until:  # zmq.Again: the shell counts it and reports the send failed
            self.trace("send %s to %r fails: queue full", kind.__name__, instruction.peer_id)
            self.ledger.counts["sends_failed_full"] += 1
            return False
        frames = protocol.encode(message)
        if kind is protocol.Batch:
            self.trace("send Batch %s of %s to %r", message.batch_id, len(message.inputs), instruction.peer_id)
            # As far as the broker can know, it reached the worker.
            self.ledger.on_batch_sent(message, rogue=not getattr(conn.owner, "honest", True),
                                      isolated=instruction.batch is not None and instruction.batch.isolated)
            if instruction.batch is not None:
                self.ledger.trust.on_dispatch(instruction.peer_id, instruction.batch, message)
            self.batch_owners[message.batch_id] = conn.owner
        elif kind is protocol.Reply:
            self.trace("send Reply %s %s to %r", message.request_id[:24], message.error_code or "ok",
                       instruction.peer_id)
        else:
            self.trace("send %s to %r", kind.__name__, instruction.peer_id)
        if now < conn.down_until:
            return True  # written into a broken connection: lost
        if kind is protocol.Batch and self._kill_after_dispatch(conn.owner):
            return True
        when = max(now + self._latency(conn), conn.from_broker_at)
        conn.from_broker_at = when
        self.at(when, self._deliver_to_peer, conn, conn.gen, frames)
        return True

    def _kill_after_dispatch(self, owner: Any) -> bool:
        """The worker dies with the batch on the wire: before it runs it, and, with no delay for
        the ROUTER to notice, before the next send of the same flush."""
        p = self.scenario.kill_after_dispatch_p
        if not (p and self.injecting and getattr(owner, "killable", False) and not owner.faultless
                and self.rng.random() < p):
            return False
        self.faults["kill_after_dispatch"] += 1
        owner.die("SIGKILL right after a dispatch", notice_s=self.rng.choice((0.0, 0.0005, 0.005)))
        return True

    def _deliver_to_peer(self, conn: Conn, gen: int, frames: list[bytes]) -> bool:
        if gen != conn.gen or conn.closed:
            self.trace("lost on the way to %r", conn.identity)
            return True
        conn.owner.receive(conn, frames)
        return True

    # ------------------------------------------------------------------ connections

    def open_conn(self, owner: Any, identity: bytes, peer: Peer) -> Conn:
        latency_s = self.rng.choice((0.0002, 0.001, 0.003))
        conn = Conn(identity, owner, peer, latency_s, self.epoch, up_at=max(self.now, self.broker_up_at) + latency_s)
        conn.to_broker_at = conn.up_at
        self.conns[identity] = conn
        return conn

    def close_conn(self, conn: Conn, notice_s: float) -> None:
        """Its owner closed it or died. What is already on the wire still arrives (TCP sends data
        before FIN); the ROUTER forgets the identity once it notices."""
        if conn.closed:
            return
        conn.closed = True
        conn.gone_at = min(conn.gone_at, max(self.now + notice_s, conn.to_broker_at + 1e-6))

    def drop_link(self, conn: Conn, same_identity: bool) -> None:
        """The TCP connection breaks: everything in flight on it is lost. ZeroMQ reconnects with
        the same identity a moment later (the peer's messages wait for it)."""
        conn.gen += 1
        notice_s = self.rng.uniform(0.0, 0.05)
        back_at = self.now + notice_s + self.rng.uniform(0.01, 0.3)
        conn.gone_at = self.now + notice_s
        conn.down_until = back_at
        conn.to_broker_at = back_at
        self.trace("link of %r drops until %.5f", conn.identity, back_at - START_AT)
        if same_identity:
            self.at(back_at, self._relink, conn, self.epoch)

    def _relink(self, conn: Conn, epoch: int) -> bool:
        if conn.closed or epoch != self.epoch:
            return False
        conn.gone_at = math.inf
        self.trace("link of %r back", conn.identity)
        return True

    def connected(self, conn: Conn) -> bool:
        """Can the peer send now (a DEALER with ZMQ_IMMEDIATE)?"""
        now = self.now
        return (not conn.closed and self.core is not None and conn.epoch == self.epoch
                and conn.up_at <= now and conn.down_until <= now)

    def _latency(self, conn: Conn) -> float:
        rng = self.rng
        spike = 10.0 if rng.random() < 0.03 else 1.0
        return conn.latency_s * (0.5 + rng.random()) * spike

    def send_to_broker(self, conn: Conn, frames: list[bytes], what: str, tracked: Any = None,
                       faulty: bool = False) -> None:
        """A peer sends; the message waits for the link if it is down. `faulty`: this kind may be
        duplicated or reordered by the fault model (worker -> broker READY, HEARTBEAT, BATCH_RESULT)."""
        if conn.closed:
            return
        now = self.now
        when = max(now, conn.up_at, conn.down_until) + self._latency(conn)
        rng = self.rng
        scenario = self.scenario
        if faulty and scenario.reorder_p and self.injecting and rng.random() < scenario.reorder_p:
            self.faults["reorder"] += 1  # may overtake what the link already carries
            when = max(when, conn.barrier_at)
        else:
            when = max(when, conn.to_broker_at)
            conn.to_broker_at = when
        self.at(when, self._deliver_to_broker, conn, conn.gen, conn.epoch, frames, what, tracked)
        if faulty and scenario.dup_p and self.injecting and rng.random() < scenario.dup_p:
            self.faults[f"duplicate_{what}"] += 1
            self.at(when + rng.uniform(0.0, 0.05), self._deliver_to_broker, conn, conn.gen, conn.epoch,
                    frames, what, tracked)

    def _deliver_to_broker(self, conn: Conn, gen: int, epoch: int, frames: list[bytes], what: str,
                           tracked: Any) -> bool:
        core = self.core
        if epoch != self.epoch or gen != conn.gen or core is None:
            self.trace("%s from %r lost", what, conn.identity)
            return True
        if type(tracked) is list:
            self.trace("%s of %d (%s...) from %r arrives", what, len(tracked), tracked[0].request_id[:24],
                       conn.identity)
        elif tracked is not None:
            self.trace("%s %s from %r arrives", what, tracked.request_id[:24], conn.identity)
        else:
            self.trace("%s from %r arrives", what, conn.identity)
        ledger = self.ledger
        ledger.before_read(conn.peer, conn.identity, tracked)
        try:
            core.on_frames(conn.peer, conn.identity, frames, self.now)
        except SimFailure:
            raise
        except Exception as error:  # noqa: BLE001 - any escape is the finding
            self.fail(f"on_frames raised {error!r} for {what} from {conn.identity!r}")
        self._run_core()
        ledger.after_read()
        return True

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str) -> bool:
        if not self.injecting:
            return False
        rng, peers = self.rng, self._peers
        alive = [w for w in self.workers if w.alive and not w.faultless]  # protected workers: no fault
        if kind == "worker_kill" and alive:
            worker = rng.choice(alive)
            self.faults["worker_kill_busy" if worker.busy else "worker_kill_idle"] += 1
            worker.die("SIGKILL", notice_s=rng.choice((0.0, 0.001, 0.02)))
        elif kind == "worker_stop" and alive:
            self.faults[kind] += 1
            rng.choice(alive).sigstop(rng.choice((0.1, 0.5, 1.0, 2.5)))
        elif kind in ("link_drop", "link_reset") and alive:
            self.faults[kind] += 1
            rng.choice(alive).link_fault(same_identity=kind == "link_drop")
        elif kind == "queue_full" and alive:
            # The worker stops reading long enough to fill its high-water mark, then drains it.
            self.faults[kind] += 1
            rng.choice(alive).conn.full_until = self.now + rng.uniform(0.05, 0.3)
        elif kind == "reregister" and alive:
            self.faults[kind] += 1
            rng.choice(alive).reregister()
        elif kind == "link_noise" and alive:
            rng.choice(alive).link_noise()  # counts its own kind
        elif kind == "worker_drain" and alive:
            self.faults[kind] += 1
            rng.choice(alive).drain()
        elif kind == "holding":
            self._fault_holding(kind, 20)
        elif kind == "broker_restart" and self.core is not None:
            self.restart_broker()
        elif kind == "broker_drain" and self.core is not None and not self.core.draining:
            self.drain_broker()
        elif kind == "burst":
            self.faults[kind] += 1
            gateway = rng.choice(self.gateways)
            for _ in range(rng.randint(10, 40)):
                gateway.submit()
        elif kind == "hostile_gateway":
            self.faults[kind] += 1
            hostile = peers.HostileGateway(self, len(self.hostiles))
            self.hostiles.append(hostile)
            hostile.start()
        elif kind == "rogue_worker":
            self.faults[kind] += 1
            rogue = peers.RogueWorker(self, len(self.hostiles))
            self.hostiles.append(rogue)
            rogue.start()
        elif kind == "garbage":
            self.faults[kind] += 1
            peers.send_garbage(self)
        else:
            return False
        return True


    def _fault_holding(self, kind: str, tries: int) -> bool:
        """Kill, SIGSTOP or hang a continuous worker while it holds inputs it has not started; if
        none holds any now, look again a moment later."""
        if not self.injecting:
            return False
        holding = [w for w in self.workers
                   if w.alive and not w.stopped and not w.faultless and getattr(w, "held", None)]
        if not holding:
            if tries > 0:
                self.after(0.02, self._fault_holding, kind, tries - 1)
            else:
                self.faults["holding_none_found"] += 1
            return True
        rng = self.rng
        worker = rng.choice(holding)
        act = rng.choice(("kill", "kill", "stop", "hang") if worker.busy is not None else ("kill", "stop"))
        self.faults[f"holding_{act}"] += 1
        self.trace("%s holds %s inputs it has not started: %s", worker.name, len(worker.held), act)
        if act == "kill":
            worker.die("SIGKILL while holding inputs", notice_s=rng.choice((0.0, 0.001, 0.02)))
        elif act == "stop":
            worker.sigstop(rng.choice((0.1, 0.5, 1.0, 2.5)))
        else:
            worker.hang_now()
        return True


@contextlib.contextmanager
def quiet_logs():
    """The core logs every lost worker and failed request: at this rate, only errors. The worker
    logs as errors what the faults make it hear (an ERROR from the broker): at this rate, nothing."""
    quiet = {"broker": logging.ERROR, "ddml_common": logging.ERROR, "gateway": logging.ERROR,
             "worker": logging.CRITICAL}
    loggers = [logging.getLogger(name) for name in quiet]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(quiet[logger.name])
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_seed(seed: int, verbose: bool = False, tolerate: frozenset[str] = KNOWN_BUGS,
             echo: Callable[[str], None] = print) -> RunResult:
    """One seed, one run. Raises SimFailure, whose message starts with the seed and a replay command."""
    world = World(seed, verbose=verbose, echo=echo)
    world.tolerate = set(tolerate)
    return world.run()


def run_seeds(count: int, start: int = 0, tolerate: frozenset[str] = KNOWN_BUGS,
              progress: Callable[[Totals], None] | None = None, stop_on_failure: bool = True,
              failures: list[str] | None = None) -> Totals:
    """Seeds start .. start + count - 1. Returns the totals; raises the first SimFailure unless
    stop_on_failure is False, in which case failures collects their messages."""
    totals = Totals()
    began = time.perf_counter()
    for seed in range(start, start + count):
        try:
            totals.add(run_seed(seed, tolerate=tolerate))
        except SimFailure as failure:
            if stop_on_failure:
                raise
            if failures is not None:
                failures.append(str(failure))
        if progress is not None and (seed - start + 1) % 1000 == 0:
            totals.wall_s = time.perf_counter() - began
            progress(totals)
    totals.wall_s = time.perf_counter() - began
    return totals


def _run_chunk(args: tuple[int, int, frozenset[str]]) -> tuple[Totals, list[str]]:
    count, start, tolerate = args
    failures: list[str] = []
    return run_seeds(count, start, tolerate=tolerate, stop_on_failure=False, failures=failures), failures


def run_parallel(count: int, start: int = 0, jobs: int = 1, tolerate: frozenset[str] = KNOWN_BUGS
                 ) -> tuple[Totals, list[str]]:
    """run_seeds() over `jobs` processes (each seed is still one deterministic run). Returns the
    totals and the failure messages, each of which starts with its seed."""
    began = time.perf_counter()
    jobs = max(1, min(jobs, count))
    bounds = [start + count * i // jobs for i in range(jobs + 1)]
    chunks = [(hi - lo, lo, tolerate) for lo, hi in zip(bounds, bounds[1:])]
    if jobs == 1:
        results = [_run_chunk(chunks[0])]
    else:
        import multiprocessing

        # Each child starts with the default SIGTERM action, whatever handler the test process installed:
        # a child that caught it would outlive the pool's terminate() and hang the run's exit.
        with multiprocessing.get_context("fork").Pool(jobs, initializer=signal.signal,
                                                      initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
            results = pool.map(_run_chunk, chunks)
    totals, failures = Totals(), []
    for chunk_totals, chunk_failures in results:
        totals.merge(chunk_totals)
        failures.extend(chunk_failures)
    totals.wall_s = time.perf_counter() - began
    return totals, failures
