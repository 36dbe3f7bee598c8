"""The simulated peers: gateways and workers that behave as the real ones do, and hostile ones.

SimWorker follows worker/connection.py and worker/loop.py (with one broker): READY with a
registration counter, a heartbeat every interval, one batch computed at a time, a batch past
--max-batches handed back unrun (all BUSY), DISCONNECT honoured unless it answers a registration
older than the latest READY, a fresh identity after `liveness` intervals of broker silence,
per-input errors, a whole-batch MODEL_ERROR when the model raises. SimGateway runs
the gateway's own request and link state (gateway/requests.py, gateway/links.py) over the
simulated network. Every input identifies itself
({"u": serial, "i": index}, plus "p" for poison) so replies can be checked against their own inputs.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Callable

from broker.core import Peer
from ddml_common import protocol
from ddml_common.protocol import MAX_MODELS, MAX_NAME_LEN, MAX_PRIORITY, MIN_PRIORITY, ErrorCode
from gateway.links import Links
from gateway.requests import REPLY_GRACE_S, Fail, Outcome, Requests, Send
from tests.sim.invariants import Tracked
from tests.sim.world import Conn, World, WorkerSpec
from worker.passes import lane_bounds, plan_pass

POISONS = ("invalid", "raise", "kill", "hang", "slow", "error")
_STATUS_EVERY_TICKS = 10  # a random run's gateways ask the brokers' status this often
_UNSENT_RETRY_S = 0.005  # and while a request waits for a connection, it polls this often
_HUNG_S = 1e6  # a hung model computes "forever": the watchdog ends the process first


def make_inputs(world: World, count: int, poison_p: float = 0.0,
                poisons: dict[int, str] | None = None) -> tuple[int, list[bytes]]:
    """Encoded inputs that identify themselves, registered with the world."""
    serial = world.serial()
    rng, inputs, known = world.rng, [], world.inputs
    for index in range(count):
        value = {"u": serial, "i": index}
        poison = ""
        if poisons is not None:
            poison = poisons.get(index, "")
        elif poison_p and rng.random() < poison_p:
            poison = rng.choice(POISONS)
        if poison:
            value["p"] = poison
        encoded = protocol.encode_value(value)
        known[encoded] = (serial, index, poison)
        inputs.append(encoded)
    return serial, inputs


@dataclass(eq=False, slots=True)
class Computing:
    batch: protocol.Batch
    started_at: float
    remaining_s: float  # compute left, while stopped
    outcome: str  # "ok", "kill" (dies at the end), "hang"
    token: int = 0  # bumped when its end is rescheduled (SIGSTOP/SIGCONT)
    end_at: float = 0.0  # when it ends, unless stopped


class SimWorker:
    killable = True

    def __init__(self, world: World, index: int, spec: WorkerSpec, faultless: bool = False):
        self.world = world
        self.index = index
        self.spec = spec
        self.faultless = faultless  # the wind-down's healthy worker: no random slowness or hangs
        self.name = f"w{index}"
        self.incarnation = 0
        self.alive = False
        self._token = 0  # bumped at death and at each start: older timers are stale
        self.running: list[Computing] = []  # computing now, oldest first (a batch worker: at most one)
        self.conn: Conn | None = None
        # A scripted scenario's hook: turns the next result into the frames actually sent.
        self.tamper: Callable[[protocol.BatchResult], list[bytes]] | None = None

    # ------------------------------------------------------------------ process lifecycle

    def start(self) -> bool:
        world = self.world
        self.incarnation += 1
        self._token += 1
        self.alive = True
        self.stopped = False
        self.buffered: list[tuple[Conn, list[bytes]]] = []
        self.registrations = 0
        self.register_when_idle = False
        self.draining = self.drain_acknowledged = False
        self.inbox: deque[protocol.Batch] = deque()
        self.holding = self._empty_holding()  # batch ids received and not yet answered (or forgotten)
        self.refused = False  # it handed a batch back BUSY: heartbeat as soon as a slot frees
        self.running = []
        self.conn = None
        self.connections = 0
        self.heartbeat_due_at = world.now
        world.trace("%s starts (incarnation %s)", self.name, self.incarnation)
        self._connect()
        self._loop_pass()
        return True

    def die(self, reason: str, notice_s: float = 0.005) -> None:
        if not self.alive:
            return
        world = self.world
        self.alive = False
        self._token += 1
        world.trace("%s dies: %s (busy: %s, inbox %s)", self.name, reason, len(self.running), len(self.inbox))
        if len(self.running) > 1:
            world.ledger.counts["deaths_with_passes_in_several_lanes"] += 1
        world.close_conn(self.conn, notice_s)
        self.running = []  # every pass in flight dies with it (the token bump makes their ends stale)
        self.inbox.clear()
        self.holding.clear()
        self.buffered.clear()
        if self.faultless or world.rng.random() < world.scenario.restart_p:
            world.after(world.rng.uniform(0.05, 0.5), self.start)

    def sigstop(self, duration_s: float) -> None:
        if not self.alive or self.stopped:
            return
        self.stopped = True
        world = self.world
        world.trace("%s SIGSTOP for %s s", self.name, duration_s)
        if len(self.running) > 1:
            world.ledger.counts["stops_with_passes_in_several_lanes"] += 1
        for busy in self.running:
            busy.remaining_s = busy.end_at - world.now
            busy.token += 1
        world.after(duration_s, self._sigcont, self._token)

    def _sigcont(self, token: int) -> bool:
        if token != self._token or not self.stopped:
            return False
        world = self.world
        self.stopped = False
        world.trace("%s SIGCONT (%s messages waiting)", self.name, len(self.buffered))
        for busy in self.running:
            self._schedule_end(busy, busy.remaining_s)
        buffered, self.buffered = self.buffered, []
        for conn, frames in buffered:
            if self.alive:
                self._handle(conn, frames)
        if self.alive:
            self._loop_pass()
            self._maybe_start()
        return True

    def heal(self) -> None:
        if self.alive and self.stopped:
            self._sigcont(self._token)

    def link_fault(self, same_identity: bool) -> None:
        """The TCP link breaks. Same identity: ZeroMQ reconnects by itself. Otherwise the worker
        notices and reconnects on a fresh socket (fresh identity), as after broker silence."""
        world = self.world
        world.drop_link(self.conn, same_identity)
        if not same_identity:
            world.after(world.rng.uniform(0.0, 0.2), self._reconnect, self._token)

    def _reconnect(self, token: int) -> bool:
        if token != self._token or self.stopped:
            return False
        self._connect()
        return True

    def reregister(self) -> None:
        """READY again on the same identity (as after a DISCONNECT)."""
        if self.alive and not self.stopped:
            self.world.trace("%s registers again", self.name)
            self._register()

    def drain(self) -> None:
        """SIGTERM: ask for no more batches, finish those in hand, DISCONNECT, exit."""
        if self.alive and not self.stopped and not self.draining:
            self.draining = True
            self.heartbeat_due_at = self.world.now
            self._loop_pass()

    # ------------------------------------------------------------------ the I/O thread

    def _connect(self) -> None:
        """A fresh DEALER with a fresh identity, then READY (worker/connection.py _connect)."""
        world = self.world
        if self.conn is not None:
            world.close_conn(self.conn, world.rng.uniform(0.0, 0.02))
            self._forget_batches()
        self.connections += 1
        identity = f"{self.name}.{self.incarnation}.{self.connections}".encode()
        self.conn = world.open_conn(self, identity, Peer.WORKER)
        self.broker_seen_at = world.now
        world.trace("%s connects as %r", self.name, identity)
        self._register()

    def _forget_batches(self) -> None:
        """The broker forgot us and re-dispatched what we held: drop the batches not yet started."""
        for batch in self.inbox:
            self.holding.discard(batch.batch_id)
        self.inbox.clear()

    def _register(self) -> None:
        """READY, unless the model still computes a batch the broker took away from us."""
        if self.running and self.holding:
            self.register_when_idle = True
            return
        self.register_when_idle = False
        self.registrations += 1
        spec = self.spec
        self._send(protocol.Ready(list(spec.models), spec.max_batch_size, spec.max_batches, device="sim",
                                  host="sim", pid=1000 + self.index, max_inputs=spec.max_inputs), "READY")

    @staticmethod
    def _empty_holding():
        return set()

    def _send(self, message: protocol.Message, what: str) -> None:
        self.world.send_to_broker(self.conn, protocol.encode(message), what,
                                  faulty=not self.faultless and what != "DISCONNECT")

    def receive(self, conn: Conn, frames: list[bytes]) -> None:
        if not self.alive:
            return
        if self.stopped:
            self.buffered.append((conn, frames))
            return
        self._handle(conn, frames)
        if self.alive:
            self._loop_pass()

    def _handle(self, conn: Conn, frames: list[bytes]) -> None:
        if conn is not self.conn:
            return  # a socket it closed
        world = self.world
        message = decode_from_broker(world, self.name, frames)
        self.broker_seen_at = world.now
        kind = type(message)
        if kind is protocol.Batch:
            self._on_batch(message)
        elif kind is protocol.Heartbeat:
            self.drain_acknowledged |= message.draining
        elif kind is protocol.Disconnect:
            if message.registration and message.registration < self.registrations:
                world.trace("%s ignores a stale DISCONNECT (%s < %s)", self.name, message.registration,
                            self.registrations)
                return
            world.trace("%s told to register again: %s", self.name, message.reason)
            self._forget_batches()
            self._register()

    def _on_batch(self, message: protocol.Batch) -> None:
        if len(self.holding) >= self.spec.max_batches:
            # Full (with batches of a registration the broker forgot): back unrun, all BUSY.
            self.world.ledger.counts["batches_handed_back_busy"] += 1
            self.refused = True
            self._send(protocol.BatchResult.failed(message.batch_id, len(message.inputs), ErrorCode.BUSY,
                                                   f"worker holds {len(self.holding)} batches already"),
                       "BATCH_RESULT")
            return
        self.holding.add(message.batch_id)
        self.inbox.append(message)
        self._maybe_start()

    def _loop_pass(self) -> None:
        """What worker/connection.py's loop does after each poll: heartbeat when due, drain,
        register when idle, reconnect after broker silence, and the watchdog."""
        world = self.world
        now = world.now
        config = world.config.heartbeat
        if now >= self.heartbeat_due_at:
            self._heartbeat()
            self.heartbeat_due_at = now + config.interval_s
            world.at(self.heartbeat_due_at, self._on_timer, self._token, self.heartbeat_due_at)
        silent = now - self.broker_seen_at > config.expiry_s
        if self.draining and (self.drain_acknowledged or silent) and not self.holding:
            self._send(protocol.Disconnect("worker shutting down"), "DISCONNECT")
            world.trace("%s drained and exits", self.name)
            self.die("drained", notice_s=0.01)
            return
        if self.register_when_idle and not self.running:
            self._register()
        if silent:
            world.trace("%s hears nothing from the broker: reconnects", self.name)
            self._connect()
        busy = self.busy  # the oldest in flight, as state.busy_since is the earliest start of any lane
        if busy is not None and now - busy.started_at > world.scenario.watchdog_s:
            self.die("watchdog: the model is hung")

    def _heartbeat(self) -> None:
        self._send(protocol.Heartbeat(stats={"batches": 0}, draining=self.draining, registration=self.registrations),
                   "HEARTBEAT")

    def _on_timer(self, token: int, due_at: float) -> bool:
        if token != self._token or due_at != self.heartbeat_due_at:
            return False
        if not self.stopped:
            self._loop_pass()
        return True

    # ------------------------------------------------------------------ the compute thread

    def _maybe_start(self) -> None:
        if not self.alive or self.stopped or self.running or not self.inbox:
            return
        world = self.world
        batch = self.inbox.popleft()
        world.ledger.on_execute(batch.inputs, self.name)
        spec = self.spec
        poisons = {world.inputs.get(item, (0, 0, ""))[2] for item in batch.inputs}
        if "raise" in poisons and len(batch.inputs) > 1:
            world.ledger.raised_together(batch.inputs)
        outcome, duration_s = self._draw_outcome(poisons, spec.batch_s + spec.item_s * len(batch.inputs), "batch")
        world.trace("%s computes batch %s (%s inputs, %s)", self.name, batch.batch_id, len(batch.inputs), outcome)
        busy = Computing(batch, world.now, duration_s, outcome)
        self.running.append(busy)
        self._schedule_end(busy, duration_s)

    def _draw_outcome(self, poisons: set[str], duration_s: float, unit: str) -> tuple[str, float]:
        """How a batch (or pass) with these poisons ends, and when: "ok", "kill", "hang" or "raise"
        (a pass only: a batch's raise is in its result)."""
        world = self.world
        rng, scenario = world.rng, world.scenario
        if "kill" in poisons:
            return "kill", duration_s * rng.random()
        if "hang" in poisons or (not self.faultless and scenario.hang_p and rng.random() < scenario.hang_p):
            world.faults[f"hung_{unit}"] += 1
            return "hang", _HUNG_S
        if unit == "pass" and "raise" in poisons:
            return "raise", duration_s * rng.random()
        if "slow" in poisons or (not self.faultless and scenario.slow_p and rng.random() < scenario.slow_p):
            world.faults[f"slow_{unit}"] += 1
            return "ok", duration_s * rng.uniform(10, 40)
        return "ok", duration_s

    @property
    def busy(self) -> Computing | None:
        """The oldest batch or pass in flight, or None."""
        return self.running[0] if self.running else None

    def _schedule_end(self, busy: Computing, duration_s: float) -> None:
        busy.token += 1
        busy.end_at = self.world.now + duration_s
        self.world.at(busy.end_at, self._on_compute_end, self._token, busy, busy.token)

    def _on_compute_end(self, token: int, busy: Computing, busy_token: int) -> bool:
        if token != self._token or busy not in self.running or busy_token != busy.token or self.stopped:
            return False
        world = self.world
        if busy.outcome == "kill":
            world.faults["poison_kill"] += 1
            self.die("a poison input killed it", notice_s=world.rng.choice((0.0, 0.002)))
            return True
        self.running.remove(busy)
        self._computed(busy)
        if self.refused:  # a slot is free: the broker it turned away may send again
            self.refused = False
            self._heartbeat()
        self._loop_pass()
        self._maybe_start()
        return True

    def _computed(self, busy: Computing) -> None:
        """Answer the batch just computed."""
        world = self.world
        self.holding.discard(busy.batch.batch_id)
        result = self._result(busy, world.now)
        if self.tamper is not None:
            tamper, self.tamper = self.tamper, None
            world.ledger.mark_rogue(busy.batch.inputs)  # whatever it sends, no model said it
            world.send_to_broker(self.conn, tamper(result), "BATCH_RESULT")
        else:
            self._send(result, "BATCH_RESULT")

    def _result(self, busy: Computing, now: float) -> protocol.BatchResult:
        """As worker/loop.py run_batch() builds it, for a model that echoes its inputs."""
        batch, known = busy.batch, self.world.inputs
        size = len(batch.inputs)
        outputs = [b""] * size
        errors, positions = [], []
        for index, item in enumerate(batch.inputs):
            undecodable = _undecodable(item, known)
            if undecodable:
                errors.append([index, ErrorCode.BAD_REQUEST.value, undecodable])
                continue
            positions.append(index)
        if any(known.get(batch.inputs[i], (0, 0, ""))[2] == "raise" for i in positions):
            errors.extend([i, ErrorCode.MODEL_ERROR.value, "model failed: RuntimeError: poison"] for i in positions)
        else:
            for i in positions:
                poison = known.get(batch.inputs[i], (0, 0, ""))[2]
                if poison == "invalid":
                    errors.append([i, ErrorCode.BAD_REQUEST.value, "InputError: invalid"])
                elif poison == "error":
                    errors.append([i, ErrorCode.MODEL_ERROR.value, "ValueError: bad input"])
                else:
                    outputs[i] = batch.inputs[i]  # echo: encode_value(decode_value(x)) == x
        return protocol.BatchResult(batch.batch_id, outputs, errors=sorted(errors),
                                    compute_ms=(now - busy.started_at) * 1000)


@dataclass(eq=False, slots=True)
class Held:
    """One input a continuous worker holds (worker/loop.py _Held)."""

    batch_id: int
    position: int  # in its batch
    item: bytes
    cost: int  # what the model's cost() would say (tokens): drawn from the input's identity
    poison: str
    broker: int  # the broker incarnation (world.epoch) that sent it: batch ids start again with each
    epoch: int  # the worker's epoch when it came (worker/connection.py link.epoch): bumped when the broker forgets it
    waited: int = 0  # passes run while it was held (plan_pass anchors on one that waited long)


@dataclass(eq=False, slots=True)
class Pass:
    """A continuous worker's forward pass, as SimWorker's Computing is a batch's."""

    members: list[Held]
    started_at: float
    remaining_s: float  # compute left, while stopped
    outcome: str  # "ok", "raise" (predict() raises at the end), "kill", "hang"
    token: int = 0
    end_at: float = 0.0
    lane: int = 0  # the compute lane that runs it (worker/loop.py _Pool.run_lane)


def _undecodable(item: bytes, known: dict) -> str:
    """Why a worker cannot decode this input, or "" (every input the sim made decodes)."""
    info = known.get(item)
    if info is not None and info[2] != "garbage":
        return ""
    try:
        protocol.decode_value(item)
    except protocol.DecodeError as error:
        return f"input could not be decoded: {error}"[:200]
    return ""


def input_cost(item: bytes, known: dict) -> int:
    info = known.get(item)
    return 1 if info is None else 1 + (info[0] * 31 + info[1] * 17) % 24


class ContinuousWorker(SimWorker):
    """worker/connection.py and worker/loop.py run_continuous, with one broker.

    READY announces max_inputs. Every input that arrives is held; one that fails prepare() (here
    an undecodable or "invalid" input) is answered at once. Pass after pass is formed by the real
    worker.passes.plan_pass() from all that is held, and after each pass comes one
    partial BATCH_RESULT per batch the pass touched. With spec.lanes > 1, up to that many passes run
    at once (self.running): lane 0 whenever it is free, another lane only while lane 0 is busy; they
    end in any order, and a kill, SIGSTOP or forget applies to every pass in flight. A raising pass of several inputs answers each
    PASS_FAILED; a raising pass of one, MODEL_ERROR. A batch that would take it past max_inputs is
    handed back BUSY, which with one broker must never happen (the ledger fails on it). When the
    broker forgets it (DISCONNECT, reconnect) it drops the inputs it holds and has not started;
    the pass it is running still answers, as the real one's does.

    READY is never duplicated or reordered here, nor overtaken by what follows it: ZeroMQ does none
    of these, and a broker cannot tell a duplicate READY from a registration anew (it would
    re-dispatch what this worker still holds), nor a HEARTBEAT that overtook the READY from one of
    a worker it forgot (it would answer DISCONNECT, and the batch it sends after the READY would
    reach the worker after it dropped what it held).
    """

    # Known bug "stale_pass_result" (tests/sim/test_regressions.py, seed 1689): the real worker sends
    # the answers of a pass that began before the broker forgot it. After a broker restart the new
    # broker numbers its batches from 1 again and takes such an answer for one of its own batches:
    # a client gets another request's output. True models the proposed fix (the I/O thread drops
    # results of an older epoch); while the bug is open, the world sets it when it tolerates the bug.
    drops_stale_results = True

    @staticmethod
    def _empty_holding():
        return {}  # batch id -> its inputs received and not yet answered (worker/connection.py link.holding)

    def start(self) -> bool:
        self.held: list[Held] = []  # oldest first
        self.epoch = 0
        self.world.ledger.counts["continuous_worker_starts"] += 1
        return super().start()

    def die(self, reason: str, notice_s: float = 0.005) -> None:
        if self.alive and self.held:
            counts = self.world.ledger.counts
            counts["held_inputs_lost_with_killed_workers"] += len(self.held)  # never started: no execution
            counts["killed_workers_holding"] += 1
        self.held = []
        super().die(reason, notice_s)

    def reregister(self) -> None:
        """Not for a continuous worker: the real one sends READY anew only when the broker forgot
        it (a DISCONNECT, after which nothing sent before it can arrive) or on a fresh socket. An
        unprompted READY would let a batch already on the wire arrive after it dropped what it
        held, and the broker, which forgot that batch, would then fill the worker past max_inputs."""
        self.world.ledger.counts["reregister_skipped_continuous"] += 1

    def _send(self, message: protocol.Message, what: str) -> None:
        self.world.send_to_broker(self.conn, protocol.encode(message), what,
                                  faulty=not self.faultless and what not in ("DISCONNECT", "READY"))
        if what == "READY":  # nothing sent after it may overtake it (see the class docstring)
            self.conn.barrier_at = self.conn.to_broker_at

    def _forget_batches(self) -> None:
        """The broker forgot us and re-dispatched what we held: drop what no pass has started."""
        if self.held:
            self.world.ledger.counts["held_inputs_dropped_on_forget"] += len(self.held)
            self.world.trace("%s drops %s held inputs it had not started", self.name, len(self.held))
        self.held = []
        self.holding.clear()
        self.inbox.clear()
        self.epoch += 1

    def _on_batch(self, message: protocol.Batch) -> None:
        world, spec = self.world, self.spec
        size = len(message.inputs)
        held = sum(self.holding.values())
        if held + size > spec.max_inputs:
            world.ledger.on_busy_refusal(self.name, message.batch_id, held, size, spec.max_inputs)
            self.refused = True
            self._send(protocol.BatchResult.failed(message.batch_id, size, ErrorCode.BUSY,
                                                   f"worker holds {held} inputs already"), "BATCH_RESULT")
            return
        self.holding[message.batch_id] = size
        known = world.inputs
        failed = []
        for position, item in enumerate(message.inputs):
            undecodable = _undecodable(item, known)
            if undecodable:
                failed.append((position, b"", [ErrorCode.BAD_REQUEST.value, undecodable]))
                continue
            info = known.get(item)
            poison = info[2] if info is not None else ""
            if poison == "invalid":  # prepare() refuses it: answered now, never in a pass
                failed.append((position, b"", [ErrorCode.BAD_REQUEST.value, "InputError: invalid"]))
                continue
            self.held.append(Held(message.batch_id, position, item, input_cost(item, known), poison, world.epoch,
                                  self.epoch))
        world.trace("%s holds batch %s (%s inputs, %s refused at once); holds %s", self.name, message.batch_id,
                    size, len(failed), sum(self.holding.values()))
        if failed:
            self._answer(message.batch_id, failed, 0.0)
        self._maybe_start()

    def _answer(self, batch_id: int, entries: list[tuple[int, bytes, list | None]], compute_s: float) -> None:
        """One partial BATCH_RESULT: entries are (position in the batch, output, [code, message] or None)."""
        world = self.world
        errors = [[k, *error] for k, (_, _, error) in enumerate(entries) if error is not None]
        result = protocol.BatchResult(batch_id, [output for _, output, _ in entries], errors=errors,
                                      compute_ms=compute_s * 1000, indices=[p for p, _, _ in entries])
        left = self.holding.get(batch_id)  # the I/O thread's count, as _forward_results keeps it
        if left is not None:
            if left > len(entries):
                self.holding[batch_id] = left - len(entries)
            else:
                del self.holding[batch_id]
        world.ledger.counts["partial_results"] += 1
        scenario = world.scenario
        if (scenario.result_delay_p and not self.faultless and world.injecting
                and world.rng.random() < scenario.result_delay_p):
            # The I/O thread stalls: this result, and all that follows it on the link, comes late.
            world.faults["result_delayed"] += 1
            self.conn.to_broker_at = max(self.conn.to_broker_at, world.now + world.rng.uniform(0.01, 0.3))
        if self.tamper is not None:
            tamper, self.tamper = self.tamper, None
            world.send_to_broker(self.conn, tamper(result), "BATCH_RESULT")
        else:
            self._send(result, "BATCH_RESULT")

    def _maybe_start(self) -> None:
        """Start a pass in each free lane that may take one (worker/loop.py _Pool._next_pass): lane 0
        whenever it is free, another lane only while lane 0 is busy."""
        while self.alive and not self.stopped and self.held:
            busy_lanes = {p.lane for p in self.running}
            if 0 not in busy_lanes:
                lane = 0
            else:
                lane = next((k for k in range(1, self.spec.lanes) if k not in busy_lanes), None)
                if lane is None:
                    return
            self._start_pass(lane)

    def _start_pass(self, lane: int) -> None:
        world, spec, held = self.world, self.spec, self.held
        costs, waited = [h.cost for h in held], [h.waited for h in held]
        chosen = plan_pass(costs, waited, spec.most_inputs, spec.cost_budget,
                           *lane_bounds(spec.most_inputs, 0, spec.lanes), padded=spec.padded)
        members = [held[k] for k in chosen]
        for k in sorted(chosen, reverse=True):
            del held[k]
        for waiting in held:
            waiting.waited += 1
        world.ledger.on_pass(members, self.name)
        paid = len(members) * max(h.cost for h in members) if spec.padded else sum(h.cost for h in members)
        duration_s = spec.batch_s + spec.item_s * paid / 12
        outcome, duration_s = self._draw_outcome({h.poison for h in members}, duration_s, "pass")
        if outcome == "raise" and len(members) > 1:
            world.ledger.raised_together([h.item for h in members])
        if not spec.padded:
            world.ledger.counts["passes_unpadded"] += 1
        if lane:
            world.ledger.counts["passes_beside_lane_0"] += 1
            world.trace("%s runs a pass of %s inputs in lane %s (batches %s; %s still held; %s)", self.name,
                        len(members), lane, sorted({h.batch_id for h in members}), len(held), outcome)
        else:
            world.trace("%s runs a pass of %s inputs (batches %s; %s still held; %s)", self.name, len(members),
                        sorted({h.batch_id for h in members}), len(held), outcome)
        running = Pass(members, world.now, duration_s, outcome, lane=lane)
        self.running.append(running)
        self._schedule_end(running, duration_s)

    def hang_now(self) -> bool:
        """The model hangs in a pass it runs (any lane): the watchdog ends the process."""
        if not self.alive or self.stopped or not self.running:
            return False
        running = self.running
        hung = running[0] if len(running) == 1 else self.world.rng.choice(running)
        hung.outcome = "hang"
        self._schedule_end(hung, _HUNG_S)
        return True

    def _computed(self, busy: Pass) -> None:
        """Answer the pass just run: one partial result per batch it touched."""
        world = self.world
        members = busy.members
        shared = len(members) > 1
        if busy.outcome == "raise":
            code = ErrorCode.PASS_FAILED if shared else ErrorCode.MODEL_ERROR
            failed = [code.value, "model failed: RuntimeError: poison"]
            world.ledger.counts["pass_failed_inputs" if shared else "passes_of_one_raised"] += len(members)
        by_batch: dict[tuple[int, int], list[tuple[int, bytes, list | None]]] = {}
        stale = [h for h in members if h.epoch != self.epoch]
        if stale:
            # The pass began before the broker forgot us (it re-dispatched these inputs).
            counts = world.ledger.counts
            counts["stale_pass_answers"] += len(stale)
            restarted = any(h.broker != world.epoch for h in stale)  # batch ids started again since
            if restarted:
                counts["stale_pass_answers_to_a_new_broker"] += len(stale)
            if self.drops_stale_results or "stale_pass_result" in world.tolerate:
                if restarted and not self.drops_stale_results:
                    world.known_bugs["known_bug_stale_pass_result"] += 1
                    world.known_bugs["known_bug_stale_pass_result_seeds"] = 1
                members = [h for h in members if h.epoch == self.epoch]
        for h in members:
            if busy.outcome == "raise":
                entry = (h.position, b"", failed)
            elif h.poison == "error":
                entry = (h.position, b"", [ErrorCode.MODEL_ERROR.value, "ValueError: bad input"])
            else:
                entry = (h.position, h.item, None)  # echo: encode_value(decode_value(x)) == x
            by_batch.setdefault((h.broker, h.batch_id), []).append(entry)
        compute_s = world.now - busy.started_at
        for (_, batch_id), entries in by_batch.items():
            self._answer(batch_id, entries, compute_s)


class SimGateway:
    """A gateway's BrokerClient on its I/O-thread transport (one DEALER, one I/O thread). Only the
    network, the timers and the sockets' moves are simulated here: every decision, which broker,
    resends, deadlines, a restart or a silence, is taken by the shipped gateway/requests.py and
    gateway/links.py. Every request must end there exactly once, in time (check_settled).

    The second gateway (g1) lists a second broker that never answers, as a gateway does whose other
    broker's host is down: its requests take the several-brokers paths (failover order, an
    UNAVAILABLE retried elsewhere, resends no broker takes, a dropped connection seen at once)."""

    endpoint = "tcp://broker:5555"  # the one simulated broker
    dead_endpoint = "tcp://down:5555"  # never reachable

    def __init__(self, world: World, index: int):
        self.world = world
        self.index = index
        self.name = f"g{index}"
        self._identities = 0
        self._ids = itertools.count(1)
        expiry_s = world.config.heartbeat.expiry_s
        endpoints = [self.endpoint, self.dead_endpoint] if index == 1 else [self.endpoint]
        self.links = Links(endpoints, silent_after_s=expiry_s, heartbeat_interval_s=world.config.heartbeat.interval_s)
        self._was_connected = False  # as its DEALER's monitor would tell (several brokers only)
        self.requests = Requests(self.links, restart_grace_s=expiry_s)
        self.sent: dict[str, Tracked] = {}  # every request it sent, by id
        # Every copy sent to the broker, by request id. A gateway with several brokers may send a request
        # again to the same one (after that broker restarted and refused the old copy unrun, or lost it),
        # and the invariants follow each copy as a request of its own.
        self.copies: dict[str, list[Tracked]] = {}
        self.copy_epochs: dict[int, int] = {}  # id(copy) -> the world's broker epoch when it was sent
        self.give_up_by: dict[str, float] = {}  # request id -> when it must have ended, at the latest
        self.outcomes: dict[str, Outcome] = {}  # request id -> how the client ended it
        self.conn: Conn | None = None
        self._changes = 0
        self._retry_due = False
        self._beating = False  # its heartbeat timer is running
        self._tick_due_at = 0.0
        self._ticks = 0

    @property
    def instance_id(self) -> str:
        """The broker instance it last heard."""
        return self.links[0].instance_id

    def next_identity(self) -> bytes:
        self._identities += 1
        return f"{self.name}.{self._identities}".encode()

    def start(self) -> bool:
        world = self.world
        self.conn = world.open_conn(self, self.next_identity(), Peer.GATEWAY)
        self.links.started(world.now)
        self._beating = True
        self._on_heartbeat_timer()
        if world.scenario.rate_per_s:
            world.after(world.rng.expovariate(world.scenario.rate_per_s), self._on_submit_timer)
        return True

    def _on_heartbeat_timer(self) -> bool:
        """The I/O thread's loop when a timer is due: heartbeats, the tick, silence, a dropped link."""
        world, links = self.world, self.links
        if not world.submitting and not self.requests:
            self._beating = False
            return False  # winding down, and nothing left to end
        now = world.now
        connected = world.connected(self.conn)
        for index in links.heartbeats_due(now):
            sent = index == 0 and connected
            if sent:
                world.send_to_broker(self.conn, protocol.encode(protocol.Heartbeat()), "HEARTBEAT")
            links.heartbeat_sent(index, sent, now)
        if len(links) > 1 and self._was_connected and not connected:
            links.disconnected(0, now)  # its DEALER's monitor
        self._was_connected = connected
        if now >= self._tick_due_at:
            self._tick_due_at = now + world.config.heartbeat.interval_s
            self.requests.tick(now)
            self._ticks += 1
            if world.submitting and world.scenario.rate_per_s and self._ticks % _STATUS_EVERY_TICKS == 0:
                self._ask_status(now)
        for _ in links.silent(now):
            world.trace("%s hears nothing from the broker: reconnects", self.name)
            world.close_conn(self.conn, 0.0)
            self.conn = world.open_conn(self, self.next_identity(), Peer.GATEWAY)
        self._flush()
        world.at(max(now, min(links.next_heartbeat_at(), self._tick_due_at)), self._on_heartbeat_timer)
        return True

    def _ask_status(self, now: float) -> None:
        """As the gateway's model catalog and /readyz do: ask each broker for its status."""
        wait_s = 2.0
        for link in self.links:
            request_id = f"{self.name}-status-{next(self._ids)}"
            self.give_up_by[request_id] = now + wait_s + self.world.config.heartbeat.interval_s
            self.requests.ask(request_id, protocol.StatusRequest(request_id), link.index, wait_s, now)

    def _on_submit_timer(self) -> bool:
        world = self.world
        if not world.submitting:
            return False
        self.submit()
        world.after(world.rng.expovariate(world.scenario.rate_per_s), self._on_submit_timer)
        return True

    def submit(self, count: int | None = None, timeout_s: float | None = None, model: str | None = None,
               poisons: dict[int, str] | None = None) -> Tracked:
        """One request, drawn at random; a scripted scenario may fix its shape."""
        world = self.world
        rng, scenario = world.rng, world.scenario
        if count is None:
            count = 1 if rng.random() < 0.5 else rng.randint(1, scenario.max_inputs)
        serial, inputs = make_inputs(world, count, scenario.poison_p, poisons)
        if timeout_s is None:
            draw = rng.random()
            timeout_s = (0.0 if draw < 0.03 else rng.uniform(0.001, 0.1) if draw < 0.2
                         else rng.uniform(0.1, 1.2) if draw < 0.9 else rng.uniform(1.2, 2.5))
        draw = rng.random()
        priority = 0 if draw < 0.6 else rng.randint(-3, 3) if draw < 0.9 else rng.choice((MIN_PRIORITY, MAX_PRIORITY))
        sizes = [rng.randint(0, 30) for _ in inputs] if rng.random() < 0.3 else []
        model = model or rng.choice(("m", "m", "m", "m2"))
        request_id = f"{self.name}-{next(self._ids)}"
        message = protocol.Request(request_id, model, int(timeout_s * 1000), inputs, sizes, priority)
        tracked = Tracked(self.name, request_id, inputs, serial, message.timeout_ms, self.instance_id)
        world.ledger.submitted(tracked)
        self.sent[request_id] = tracked
        # The client's own bound: the broker's reply by deadline + grace, noticed at the next tick.
        self.give_up_by[request_id] = world.now + timeout_s + REPLY_GRACE_S + world.config.heartbeat.interval_s
        self.requests.submit(request_id, message, timeout_s, world.now)
        self._flush()
        if not self._beating and self.conn is not None:
            self._beating = True
            world.after(world.config.heartbeat.interval_s, self._on_heartbeat_timer)
        return tracked

    def _send(self, instruction: Send) -> bool:
        """The DEALER's send, with ZMQ_IMMEDIATE: refused while not connected."""
        world = self.world
        if instruction.broker != 0 or not world.connected(self.conn):
            return False
        message = instruction.message
        tracked = self.sent.get(instruction.request_id)
        if tracked is not None:
            copies = self.copies.setdefault(instruction.request_id, [])
            if copies:
                live = [c for c in copies if c.replies_sent == 0 and self.copy_epochs[id(c)] == world.epoch]
                if live:  # the broker would run both: a second copy only once the first is answered or lost
                    world.fail(f"gateway {self.name} sends {tracked.request_id!r} again while the broker "
                               f"may still run the copy it sent before")
                tracked = Tracked(self.name, tracked.request_id, tracked.inputs, tracked.serial, 0, "")
                world.ledger.submitted(tracked)
                world.ledger.counts["gateway_sent_again"] += 1
            copies.append(tracked)
            self.copy_epochs[id(tracked)] = world.epoch  # the broker instance it can reach
            # what the broker will see: the instance and time left as sent now
            tracked.instance_id, tracked.timeout_ms = message.instance_id, message.timeout_ms
        world.send_to_broker(self.conn, protocol.encode(message), "REQUEST" if tracked else "STATUS_REQUEST", tracked)
        return True

    def _copy_answered(self, request_id: str) -> Tracked | None:
        """The copy a reply answers: the first that the broker answered and we have not heard."""
        copies = self.copies.get(request_id)
        if not copies:
            return self.sent.get(request_id)
        return next((c for c in copies if c.replies_sent > c.replies_delivered), copies[-1])

    def _flush(self) -> None:
        """What the I/O thread does after every event: resend or fail on a link change, send, settle."""
        world, requests = self.world, self.requests
        now = world.now
        if self.links.changes != self._changes:
            self._changes = self.links.changes
            requests.links_changed(now)
        for outcome in requests.flush(self._send, now):
            self._settled(outcome)
        if requests.unsent() and not self._retry_due:  # the I/O thread polls every 5 ms meanwhile
            self._retry_due = True
            world.after(_UNSENT_RETRY_S, self._retry)

    def _retry(self) -> bool:
        self._retry_due = False
        self._flush()
        return True

    def _settled(self, outcome: Outcome) -> None:
        world = self.world
        request_id = outcome.request_id
        if request_id in self.outcomes:
            world.fail(f"gateway {self.name} ended {request_id!r} twice: {self.outcomes[request_id]} and {outcome}")
        if world.now > self.give_up_by[request_id] + 1e-9:
            world.fail(f"gateway {self.name} ended {request_id!r} at {world.now:.4f}, past its bound "
                       f"{self.give_up_by[request_id]:.4f}: {outcome}")
        self.outcomes[request_id] = outcome
        if "-status-" in request_id:
            world.ledger.counts[f"gateway_status_{'failed' if type(outcome) is Fail else 'answered'}"] += 1
        elif type(outcome) is Fail:
            world.ledger.counts[f"gateway_failed_{outcome.code.value}"] += 1
        else:
            world.ledger.counts[f"gateway_answered_{outcome.answer.error_code or 'ok'}"] += 1

    def check_settled(self) -> None:
        """At the end of a run: every request it sent has ended, once (checked as each ended)."""
        missing = [request_id for request_id in self.sent if request_id not in self.outcomes]
        if missing or self.requests:
            self.world.fail(f"gateway {self.name} never ended {len(missing)} requests: {missing[:5]}")

    def receive(self, conn: Conn, frames: list[bytes]) -> None:
        if conn is not self.conn:
            return
        world = self.world
        now = world.now
        message = decode_from_broker(world, self.name, frames)
        self.links.heard(0, now)
        kind = type(message)
        if kind is protocol.Reply or kind is protocol.Replies:
            for reply in protocol.replies_of(message):
                world.ledger.on_reply_delivered(self.name, self._copy_answered(reply.request_id), reply)
                self.requests.reply(0, reply, now)
        elif kind is protocol.Status:
            self.requests.reply(0, message, now)
        elif kind is protocol.Heartbeat:
            if self.links.heartbeat(0, message.instance_id, now):
                world.trace("%s sees broker %s: %s waiting", self.name, message.instance_id, len(self.requests))
        self._flush()


class _HostilePeer:
    """Common to the hostile gateway and the rogue worker: a connection and a few scheduled acts."""

    peer = Peer.GATEWAY
    prefix = "evil"

    def __init__(self, world: World, index: int):
        self.world = world
        self.name = f"{self.prefix}{index}"
        self._identities = 0
        self.conn: Conn | None = None
        self.active = False

    def next_identity(self) -> bytes:
        self._identities += 1
        return f"{self.name}.{self._identities}".encode()

    def connect(self) -> None:
        self.active = True
        self.conn = self.world.open_conn(self, self.next_identity(), self.peer)

    def start(self) -> None:
        world = self.world
        self.connect()
        for _ in range(world.rng.randint(3, 10)):
            world.after(world.rng.uniform(0.0, 1.0), self._act)

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.world.close_conn(self.conn, 0.001)

    def _act(self) -> bool:
        if not self.active or not self.world.injecting:
            return False
        self.act()
        return True

    def send(self, message: protocol.Message, what: str, tracked: Tracked | None = None) -> None:
        self.world.send_to_broker(self.conn, protocol.encode(message), what, tracked)

    def receive(self, conn: Conn, frames: list[bytes]) -> None:
        decode_from_broker(self.world, self.name, frames)


class HostileGateway(_HostilePeer):
    """Well-typed messages with hostile values on the frontend, and messages of the wrong kind."""

    def __init__(self, world: World, index: int):
        super().__init__(world, index)
        self.request_ids: list[str] = []

    def request(self, count: int = 1, **fields) -> Tracked:
        world = self.world
        rng = world.rng
        serial, inputs = make_inputs(world, count)
        request_id = fields.pop("request_id", None) or f"{self.name}-{len(self.request_ids) + 1}"
        self.request_ids.append(request_id)
        message = protocol.Request(request_id, fields.pop("model", "m"), fields.pop("timeout_ms", rng.randint(1, 1500)),
                                   inputs, **fields)
        tracked = Tracked(self.name, request_id, inputs, serial, message.timeout_ms, message.instance_id, hostile=True)
        world.ledger.submitted(tracked)
        self.send(message, "REQUEST", tracked)
        return tracked

    def act(self) -> None:
        world = self.world
        rng = world.rng
        act = rng.choice(("duplicate_id", "huge", "priority", "unknown_model", "empty", "timeout", "long_names",
                          "stale_instance", "sizes", "wrong_kind", "status", "heartbeat", "undecodable"))
        world.faults[f"hostile_{act}"] += 1
        if act == "duplicate_id" and self.request_ids:
            self.request(rng.randint(1, 3), request_id=rng.choice(self.request_ids))
        elif act == "huge":
            self.request(rng.choice((50, 200)), timeout_ms=rng.randint(20, 300))
        elif act == "priority":
            self.request(rng.randint(1, 4), priority=rng.choice((MIN_PRIORITY, MAX_PRIORITY)))
        elif act == "unknown_model":
            self.request(1, model=rng.choice(("nope", "m3", "x" * MAX_NAME_LEN)))
        elif act == "empty":
            self.request(0)
        elif act == "timeout":
            self.request(1, timeout_ms=rng.choice((0, -1, -(1 << 40), 1)))
        elif act == "long_names":
            self.request(1, request_id="r" * MAX_NAME_LEN)
        elif act == "stale_instance":
            self.request(2, instance_id="an-old-broker")
        elif act == "sizes":
            count = rng.randint(1, 3)
            sizes = rng.choice(([1 << 30] * count, [0] * (count + 1), ["a"] * count, [-1] * count))
            # Sometimes under an id still in flight: a malformed request must not answer the other one.
            reuse = self.request_ids and rng.random() < 0.3
            self.request(count, sizes=sizes, request_id=rng.choice(self.request_ids) if reuse else None)
        elif act == "wrong_kind":
            self.send(rng.choice(_wrong_kinds(self.peer)), "WRONG_KIND")
        elif act == "status":
            self.send(protocol.StatusRequest(f"{self.name}-status"), "STATUS_REQUEST")
        elif act == "heartbeat":
            self.send(protocol.Heartbeat(instance_id="whoever", draining=True, registration=7), "HEARTBEAT")
        else:
            send_garbage(world, self.conn)


class RogueWorker(_HostilePeer):
    """A registered worker that misbehaves: odd READYs, results for batches it does not hold,
    results of the wrong shape, odd error codes. It never returns wrong outputs in the right
    shape: no broker could tell those from a model's."""

    peer = Peer.WORKER
    prefix = "rogue"
    killable = False
    honest = False

    def start(self) -> None:
        super().start()
        world = self.world
        rng = world.rng
        self.keepalive = rng.random() < 0.7
        models = ["m"] if rng.random() < 0.6 else [f"r{rng.getrandbits(24):06x}" for _ in range(MAX_MODELS)]
        self.continuous = rng.random() < 0.5
        self.send(protocol.Ready(models, rng.randint(1, 16), rng.randint(1, 3),
                                 max_inputs=rng.randint(1, 24) if self.continuous else 0), "READY")
        if self.continuous:  # well-typed partial results (decode() accepts them all), hostile in meaning
            self.style = rng.choice(PARTIAL_STYLES)
            world.faults[f"rogue_partial_{self.style}"] += 1
        else:
            self.style = rng.choice(("echo", "short", "long_error", "odd_codes", "known_codes", "silent", "late",
                                     "twice", "wrong_id", "huge_compute", "busy"))
        if self.keepalive:
            self._heartbeat()

    def _heartbeat(self) -> bool:
        if not self.active:
            return False
        self.send(protocol.Heartbeat(stats={"batches": 1, "note": "rogue"}), "HEARTBEAT")
        self.world.after(self.world.config.heartbeat.interval_s, self._heartbeat)
        return True

    def act(self) -> None:
        world = self.world
        rng = world.rng
        act = rng.choice(("ready_many", "ready_again", "result_for_other", "wrong_kind", "disconnect", "unknown_peer",
                          "undecodable"))
        world.faults[f"rogue_{act}"] += 1
        if act == "ready_many":
            names = [f"q{rng.getrandbits(24):06x}" for _ in range(MAX_MODELS)]
            self.send(protocol.Ready(names, 1, 1), "READY")
        elif act == "ready_again":
            self.send(protocol.Ready(["m"], rng.randint(1, 8), 2), "READY")
        elif act == "result_for_other":
            # Batches of other workers, or none at all; never its own: answering one of its own
            # batches with another's outputs is what no broker could tell from a model's answer.
            seen = [b for b, owner in world.batch_owners.items() if owner is not self]
            batch_id = rng.choice(seen) if seen and rng.random() < 0.8 else rng.randint(1 << 30, 1 << 40)
            size = rng.randint(0, 3)
            self.send(protocol.BatchResult(batch_id, [b"\x01"] * size, compute_ms=1.0), "BATCH_RESULT")
        elif act == "wrong_kind":
            self.send(rng.choice(_wrong_kinds(self.peer)), "WRONG_KIND")
        elif act == "disconnect":
            self.send(protocol.Disconnect("rogue leaves", registration=rng.randint(0, 5)), "DISCONNECT")
        elif act == "unknown_peer":
            # A peer the broker never registered: heartbeat, result, disconnect with no READY.
            junk = Junk(world, Peer.WORKER)
            message = rng.choice((protocol.Heartbeat(registration=3), protocol.BatchResult(rng.randint(1, 50), []),
                                  protocol.Disconnect("never said hello")))
            world.send_to_broker(junk.conn, protocol.encode(message), "UNKNOWN_PEER")
            junk.close_later()
        else:
            send_garbage(world, self.conn)

    def receive(self, conn: Conn, frames: list[bytes]) -> None:
        world = self.world
        if not self.active or conn is not self.conn:
            return
        if self.style == "huge_compute":
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError:
                # Its lies about compute_ms make the batch timeout longer than the protocol allows:
                # its own problem (the batch stays with it until it goes away).
                world.ledger.counts["rogue_batch_undecodable"] += 1
                return
        else:
            message = decode_from_broker(world, self.name, frames)
        if type(message) is not protocol.Batch:
            return
        rng, style = world.rng, self.style
        size = len(message.inputs)
        if self.continuous:
            self._partial(message)
            return
        if style == "busy":
            busy = protocol.BatchResult.failed(message.batch_id, size, ErrorCode.BUSY, "rogue: busy")
            self.send(busy, "BATCH_RESULT")
            return
        echo = protocol.BatchResult(message.batch_id, list(message.inputs), compute_ms=rng.uniform(1, 20))
        result, delay_s = echo, rng.uniform(0.001, 0.05)
        if style in ("echo", "late", "twice", "huge_compute"):
            world.ledger.on_execute(message.inputs, self.name)
        if style == "short":
            result = protocol.BatchResult(message.batch_id, list(message.inputs[:-1]))
        elif style == "long_error":
            result = protocol.BatchResult(message.batch_id, [b""] * (size + 1),
                                          errors=[[size, ErrorCode.MODEL_ERROR.value, "index past the batch"]])
        elif style in ("odd_codes", "known_codes"):
            codes = ("WEIRD", "", "ok") if style == "odd_codes" else tuple(c.value for c in ErrorCode)
            result = protocol.BatchResult(message.batch_id, [b""] * size,
                                          errors=[[i, rng.choice(codes), "rogue"] for i in range(size)])
        elif style == "silent":
            return
        elif style == "late":
            delay_s = rng.uniform(0.5, 3.0)
        elif style == "wrong_id":
            result = protocol.BatchResult(message.batch_id + (1 << 30), list(message.inputs))  # no batch has it
        elif style == "huge_compute":
            result.compute_ms = float(rng.choice((1 << 40, 1e9)))
        world.after(delay_s, self._reply, result)
        if style == "twice":
            world.after(delay_s + 0.01, self._reply, result)

    def _partial(self, batch: protocol.Batch) -> None:
        """A continuous rogue: partial results that decode but make no sense, or honest ones
        split oddly. Each message leaves after the one before it (FIFO)."""
        world, style = self.world, self.style
        rng = world.rng
        size = len(batch.inputs)
        order = list(range(size))
        rng.shuffle(order)
        cut = rng.randint(0, size)
        first, rest = sorted(order[:cut]), sorted(order[cut:])

        def part(indices: list[int], batch_id: int = batch.batch_id, code: str = "") -> protocol.BatchResult:
            if code:
                return protocol.BatchResult(batch_id, [b""] * len(indices), compute_ms=1.0, indices=indices,
                                            errors=[[k, code, "rogue"] for k in range(len(indices))])
            return protocol.BatchResult(batch_id, [batch.inputs[i] if i < size else b"\x01" for i in indices],
                                        compute_ms=1.0,
                                        indices=indices)

        echoed = {"p_echo": order, "p_twice": order, "p_oob": first, "p_whole_after": first, "p_half": first,
                  "p_busy_after": first, "p_pass_failed": order}.get(style, [])
        if echoed:
            world.ledger.on_execute([batch.inputs[i] for i in echoed], self.name)
        messages: list[protocol.BatchResult] = []
        if style == "p_echo":  # honest, in pieces of random sizes and order
            remaining = list(order)
            while remaining:
                take = rng.randint(1, len(remaining))
                messages.append(part(sorted(remaining[:take])))
                remaining = remaining[take:]
        elif style == "p_twice":  # every index answered, some of them twice, in two messages
            messages = [part(sorted(order)), part(first or sorted(order))]
        elif style == "p_oob":  # an index past the batch (decodable: < MAX_ITEMS)
            messages = [part(first), part(sorted({*rest, size + rng.randint(0, 3)}))]
        elif style == "p_whole_after":  # partial, then a whole result for the batch
            messages = [part(first), protocol.BatchResult(batch.batch_id, list(batch.inputs), compute_ms=1.0)]
        elif style == "p_unknown":  # partial results for a batch nobody sent
            messages = [part([0], batch.batch_id + (1 << 30)), part(sorted(order), rng.randint(1 << 31, 1 << 40))]
        elif style == "p_pass_failed":  # every pass failed: every input PASS_FAILED, a few at a time
            messages = [part(first, code=ErrorCode.PASS_FAILED.value), part(rest, code=ErrorCode.PASS_FAILED.value)]
        elif style == "p_half":  # some, then silence: the batch deadline takes the rest away
            messages = [part(first)]
        elif style == "p_busy_after":  # some, then BUSY for the whole batch
            messages = [part(first), protocol.BatchResult.failed(batch.batch_id, size, ErrorCode.BUSY, "rogue")]
        elif style == "p_codes":  # any code the protocol knows, per input
            codes = [c.value for c in ErrorCode]
            messages = [protocol.BatchResult(batch.batch_id, [b""] * size, compute_ms=1.0, indices=sorted(order),
                                             errors=[[k, rng.choice(codes), "rogue"] for k in range(size)])]
        delay_s = rng.uniform(0.001, 0.05)
        whole = style in ("p_whole_after", "p_busy_after")
        for k, message in enumerate(messages):
            if message.indices or (whole and k == len(messages) - 1):  # no indices: a whole result
                world.after(delay_s, self._reply, message)
                delay_s += rng.uniform(0.0, 0.05)

    def _reply(self, result: protocol.BatchResult) -> bool:
        if not self.active:
            return False
        self.send(result, "BATCH_RESULT")
        return True


PARTIAL_STYLES = ("p_echo", "p_twice", "p_oob", "p_whole_after", "p_unknown", "p_pass_failed", "p_half",
                  "p_busy_after", "p_codes")


class Junk:
    """A short-lived connection that sends one message, then goes away."""

    killable = False

    def __init__(self, world: World, peer: Peer):
        self.world = world
        world.faults["junk_peers"] += 1
        self.name = f"junk{world.faults['junk_peers']}"
        self._identities = 0
        self.conn = world.open_conn(self, self.next_identity(), peer)

    def next_identity(self) -> bytes:
        self._identities += 1
        return f"{self.name}.{self._identities}".encode()

    def close_later(self) -> None:
        self.world.after(0.05, self._close)

    def _close(self) -> bool:
        self.world.close_conn(self.conn, 0.001)
        return True

    def receive(self, conn: Conn, frames: list[bytes]) -> None:
        decode_from_broker(self.world, self.name, frames)


def decode_from_broker(world: World, name: str, frames: list[bytes]) -> protocol.Message:
    """Whatever the broker sends, to whoever, must decode: a peer drops what does not."""
    try:
        return protocol.decode(frames)
    except protocol.DecodeError as error:
        world.fail(f"{name} cannot decode what the broker sent: {error}")


def _wrong_kinds(peer: Peer) -> list[protocol.Message]:
    """Messages that decode but that the broker does not expect from this side."""
    if peer is Peer.WORKER:
        return [protocol.Request("from-the-wrong-side", "m", 100, [b"\x01"]), protocol.StatusRequest("s"),
                *_wrong_kinds(Peer.GATEWAY)[:5]]
    return [
        protocol.Reply("r1", [b"\x01"]),
        protocol.Replies(["r1", "r2"], [[b"\x01"], []]),
        protocol.Batch(1, "m", ["r1"], 100, [b"\x01"]),
        protocol.Status("s", "i", {}, []),
        protocol.Error("BAD", "you"),
        protocol.Ready(["m"], 2),
        protocol.BatchResult(1, [b"\x01"]),
        protocol.Disconnect("bye"),
    ]


def send_garbage(world: World, conn: Conn | None = None) -> None:
    """Frames that do not decode, on either socket."""
    rng = world.rng
    if conn is None:
        junk = Junk(world, rng.choice((Peer.GATEWAY, Peer.WORKER)))
        conn = junk.conn
        junk.close_later()
    valid = protocol.encode(protocol.Heartbeat())[0]
    frames = rng.choice((
        [],
        [b""],
        [rng.randbytes(rng.randint(1, 40))],
        [protocol.PROTOCOL_VERSION + bytes([rng.randint(0, 255)]) + rng.randbytes(rng.randint(0, 30))],
        [valid, valid],
        [b"DDML1" + valid[5:]],  # another protocol version: answered with ERROR
        [protocol.PROTOCOL_VERSION + bytes([protocol.Kind.REQUEST]) + protocol.encode_value(
            {"request_id": "x", "model": "m", "timeout_ms": 10, "inputs": [1, 2]})],  # items must be bin
    ))
    world.send_to_broker(conn, frames, "GARBAGE")
