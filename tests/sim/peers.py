"""The simulated peers: gateways and workers that behave as the real ones do, and hostile ones.

SimWorker and ContinuousWorker keep only what is simulated: the network (one connection to the
broker), the process (start, death, SIGSTOP, restart by a supervisor), how long a batch or pass
computes, what a poisoned input does to the model, and the faults. Every decision is the shipped
code's: worker/link.py's WorkerLinks for registration, heartbeats, admission and BUSY, epochs,
stale results, silence and drain; worker/results.py for what a result holds; worker/passes.py for
how a continuous worker takes its passes; worker/health.py for the watchdog. SimGateway runs
the gateway's own request and link state (gateway/requests.py, gateway/links.py) over the
simulated network. Every input identifies itself
({"u": serial, "i": index}, plus "p" for poison) so replies can be checked against their own inputs.
"""

from __future__ import annotations

import itertools
import math
import random
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
from worker.health import HealthClock, hung
from worker.link import Compute, Exit, Forget, Forward, ResultTag, Send, WorkBatch, WorkerLinks, decode_batch
from worker.models import InputError
from worker.passes import current_inputs, lane_bounds, may_start, take_pass
from worker.results import batch_result, failed_pass, held_inputs, pass_results, prepare_result

POISONS = ("invalid", "raise", "kill", "hang", "slow", "error")
_STATUS_EVERY_TICKS = 10  # a random run's gateways ask the brokers' status this often
_UNSENT_RETRY_S = 0.005  # and while a request waits for a connection, it polls this often
_HUNG_S = 1e6  # a hung model computes "forever": the watchdog ends the process first
# The supervisor's liveness probe (deploy/kubernetes/base/worker.yaml), at the simulation's scale:
# every PROBE_PERIOD_S it restarts a worker whose health file is older than PROBE_STALE_S.
PROBE_PERIOD_S = 0.4
PROBE_STALE_S = 1.0


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
            poison = rng.choice(world.scenario.poison_kinds or POISONS)
        if poison:
            value["p"] = poison
        encoded = protocol.encode_value(value)
        known[encoded] = (serial, index, poison)
        inputs.append(encoded)
    return serial, inputs


@dataclass(eq=False, slots=True)
class Computing:
    """A batch worker's batch in compute: the batch off the wire, and as the compute thread has it."""

    batch: protocol.Batch
    work: WorkBatch
    started_at: float
    remaining_s: float  # compute left, while stopped
    outcome: str  # "ok", "kill" (dies at the end), "hang"
    token: int = 0  # bumped when its end is rescheduled (SIGSTOP/SIGCONT)
    end_at: float = 0.0  # when it ends, unless stopped


class SimWorker:
    """A worker process: the network, the process and the faults are simulated here; every
    decision is the real code's. Its I/O thread is worker/link.py's WorkerLinks (with one
    broker), driven as worker/connection.py drives it, and worker/health.py's watchdog; its
    compute thread computes for a drawn time, and what its result holds comes from
    worker/results.py (batch_result) for a model that echoes its inputs, unless poisoned."""

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
        self.running: list = []  # computing now, oldest first (a batch worker: at most one)
        self.conn: Conn | None = None
        # A scripted scenario's hook: turns the next result into the frames actually sent.
        self.tamper: Callable[[protocol.BatchResult], list[bytes]] | None = None

    # ------------------------------------------------------------------ process lifecycle

    def start(self) -> bool:
        world, spec = self.world, self.spec
        self.incarnation += 1
        self._token += 1
        self.alive = True
        self.stopped = False
        self.buffered: list[tuple[Conn, list[bytes]]] = []
        self.draining = False  # SIGTERM: WorkerLinks drains
        self.inbox: deque[Compute] = deque()  # handed to the compute thread, not started
        self.running = []
        self.conn = None
        self.connections = 0
        self._wake_at = math.inf  # the I/O thread's next timer
        heartbeat = world.config.heartbeat
        ready = protocol.Ready(list(spec.models), spec.max_batch_size, spec.max_batches, device="sim", host="sim",
                               pid=1000 + self.index, max_inputs=spec.max_inputs)
        # A second broker in --broker that never answers (down, or a wrong address): the worker
        # heartbeats it, reconnects to it after each silence, and must still admit, drain and exit.
        endpoints = ["sim", "unreachable"] if not self.faultless and world.rng.random() < 0.15 else ["sim"]
        if len(endpoints) > 1:
            world.faults["worker_with_a_dead_second_broker"] += 1
        self.links = WorkerLinks(endpoints, ready, heartbeat.interval_s, heartbeat.liveness)
        self.health = HealthClock(world.scenario.watchdog_s, heartbeat.interval_s)
        self.touched_at: float | None = None  # the health file's mtime; none before the first touch
        world.after(PROBE_PERIOD_S, self._probe, self._token)
        world.trace("%s starts (incarnation %s)", self.name, self.incarnation)
        self._open_conn()
        for link in range(len(endpoints)):
            self._perform(self.links.connected(link, world.now, busy=False))
        self._loop_pass()
        return True

    def die(self, reason: str, notice_s: float = 0.005, supervised: bool = False) -> None:
        """supervised: a supervisor ended it, and starts it again."""
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
        self.buffered.clear()
        if supervised or self.faultless or world.rng.random() < world.scenario.restart_p:
            world.after(world.rng.uniform(0.05, 0.5), self.start)

    def _probe(self, token: int) -> bool:
        """The liveness probe, which runs whatever the worker does (SIGSTOP included)."""
        if token != self._token:
            return False
        world = self.world
        if not self.faultless and self.touched_at is not None and world.now - self.touched_at > PROBE_STALE_S:
            world.faults["liveness_probe_restarts"] += 1
            self.die("liveness probe: the health file is stale", supervised=True)
            return True
        world.after(PROBE_PERIOD_S, self._probe, token)
        return True

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
        """The TCP link breaks. Same identity: ZeroMQ reconnects by itself. Otherwise it never comes
        back, and the worker must notice the silence and reconnect on a fresh socket by itself."""
        self.world.drop_link(self.conn, same_identity)

    def reregister(self) -> None:
        """A DISCONNECT that the broker did not send (a stale one, as a restarted broker's can be):
        the worker forgets what it holds, and registers again on the same identity."""
        if self.alive and not self.stopped:
            self.world.trace("%s registers again", self.name)
            self._perform(self.links.on_message(0, protocol.Disconnect("sim: register again"), self.world.now,
                                                self.busy is not None))
            self._loop_pass()

    def link_noise(self) -> None:
        """What a worker may hear on its link that no honest broker of this version sends it now:
        frames it cannot decode (a broker of another version, a corrupt frame), an ERROR (the broker
        refused a message of ours), a message of a kind no broker sends a worker, or a DISCONNECT
        that answers an older registration than our latest READY. Each goes to the real decisions
        (WorkerLinks; an undecodable one as heard()), which must carry on as if it never came."""
        world = self.world
        if not self.alive or self.stopped:
            return
        rng = world.rng
        registrations = self.links.links[0].registrations
        act = rng.choice(("garbage", "error", "unexpected", "stale_disconnect"))
        if act == "stale_disconnect" and registrations < 2:
            act = "garbage"
        world.faults[f"link_noise_{act}"] += 1
        if act == "garbage":
            frames = [rng.randbytes(rng.randint(0, 30))]
        elif act == "error":
            frames = protocol.encode(protocol.Error(ErrorCode.BAD_VERSION.value, "sim: refused"))
        elif act == "unexpected":
            frames = protocol.encode(rng.choice((protocol.Reply("r", [b"\x01"]), protocol.Ready(["m"], 1))))
        else:
            frames = protocol.encode(protocol.Disconnect("sim: stale", registration=rng.randint(1, registrations - 1)))
        world.trace("%s hears noise on its link: %s", self.name, act)
        self._handle(self.conn, frames, trusted=False)
        self._loop_pass()

    def drain(self) -> None:
        """SIGTERM: ask for no more batches, finish those in hand, DISCONNECT, exit."""
        if self.alive and not self.stopped and not self.draining:
            self.draining = True
            self._loop_pass()

    # ------------------------------------------------------------------ the I/O thread's shell

    def _open_conn(self) -> None:
        """A fresh DEALER with a fresh identity (worker/connection.py _Sockets)."""
        world = self.world
        if self.conn is not None:
            world.close_conn(self.conn, world.rng.uniform(0.0, 0.02))
        self.connections += 1
        identity = f"{self.name}.{self.incarnation}.{self.connections}".encode()
        self.conn = world.open_conn(self, identity, Peer.WORKER)
        world.trace("%s connects as %r", self.name, identity)

    def _perform(self, instructions: list) -> bool:
        """Carry out what WorkerLinks decided, in order, as worker/connection.py does. True on Exit."""
        for instruction in instructions:
            if not self.alive:
                return True
            kind = type(instruction)
            if kind is not Exit and instruction.link:  # to the dead second broker: lost, or a fresh socket
                if kind is Forget:
                    self._perform(self.links.forgotten(instruction.link, [], self.world.now, self.busy is not None))
                continue
            if kind is Send:
                message = instruction.message
                if type(message) is protocol.Heartbeat:
                    message.stats = self.links.figures()
                elif type(message) is protocol.BatchResult:  # only a batch handed back unrun goes so
                    self._refused(message)
                self._send(message, _KIND_NAMES[type(message)])
            elif kind is Forward:
                self._forward(instruction.frames)
            elif kind is Compute:
                self._take(instruction)
            elif kind is Forget:
                if instruction.reconnect:
                    self.world.trace("%s hears nothing from the broker: reconnects", self.name)
                    self._open_conn()
                self._perform(self.links.forgotten(0, self._forget(instruction.epoch), self.world.now,
                                                   self.busy is not None))
            elif kind is Exit:
                self.world.trace("%s drained and exits", self.name)
                self.die("drained", notice_s=0.01)
                return True
        return False

    def _refused(self, busy: protocol.BatchResult) -> None:
        """Full (with batches of a registration the broker forgot): WorkerLinks hands it back, all BUSY."""
        self.world.ledger.counts["batches_handed_back_busy"] += 1

    def _forget(self, epoch: int) -> list[tuple[int, int]]:
        """The broker forgot us: the batches not started leave the inbox."""
        dropped = [(c.epoch, c.batch.batch_id) for c in self.inbox]
        self.inbox.clear()
        return dropped

    def _send(self, message: protocol.Message, what: str) -> None:
        self.world.send_to_broker(self.conn, protocol.encode(message), what,
                                  faulty=not self.faultless and what != "DISCONNECT")

    def _forward(self, frames: list[bytes]) -> None:
        self.world.send_to_broker(self.conn, frames, "BATCH_RESULT", faulty=not self.faultless)

    def receive(self, conn: Conn, frames: list[bytes]) -> None:
        if not self.alive:
            return
        if self.stopped:
            self.buffered.append((conn, frames))
            return
        self._handle(conn, frames)
        if self.alive:
            self._loop_pass()

    def _handle(self, conn: Conn, frames: list[bytes], trusted: bool = True) -> None:
        """trusted: the broker sent it, and it must decode; otherwise as worker/connection.py
        _receive() takes what does not: dropped, but the broker still lives."""
        if conn is not self.conn:
            return  # a socket it closed
        world = self.world
        if trusted:
            message = decode_from_broker(world, self.name, frames)
        else:
            try:
                message = protocol.decode(frames)
            except protocol.DecodeError:
                self.links.heard(0, world.now)
                return
        if type(message) is protocol.Disconnect and message.registration \
                and message.registration < self.links.links[0].registrations:
            world.trace("%s ignores a stale DISCONNECT (%s < %s)", self.name, message.registration,
                        self.links.links[0].registrations)
        self._perform(self.links.on_message(0, message, world.now, self.busy is not None))

    def _loop_pass(self) -> None:
        """What worker/connection.py's loop does after each poll: WorkerLinks.on_tick, then the
        watchdog; and the next poll's timeout."""
        world = self.world
        now = world.now
        if self._perform(self.links.on_tick(now, self.busy is not None, self.draining)):
            return
        busy = self.busy  # the oldest in flight, as state.busy_since is the earliest start of any lane
        busy_since = busy.started_at if busy is not None else None
        if self.health.touch_due(now, busy_since, self.links.heard_recently(now)):
            self.touched_at = now
        if hung(now, busy_since, world.scenario.watchdog_s):
            self.die("watchdog: the model is hung")
            return
        wake_at = self.links.next_wake_at()
        if wake_at != self._wake_at:
            self._wake_at = wake_at
            world.at(wake_at, self._on_timer, self._token, wake_at)

    def _on_timer(self, token: int, due_at: float) -> bool:
        if token != self._token or due_at != self._wake_at:
            return False
        self._wake_at = math.inf
        if not self.stopped:
            self._loop_pass()
        return True

    # ------------------------------------------------------------------ the compute thread

    def _take(self, compute: Compute) -> None:
        self.inbox.append(compute)
        self._maybe_start()

    def _push(self, work: WorkBatch, result: protocol.BatchResult, items: list[bytes]) -> None:
        """A result to the I/O thread, tagged as worker/loop.py _push() tags it; items: the inputs
        it answers, as they came."""
        if self.tamper is not None:
            tamper, self.tamper = self.tamper, None
            self.world.ledger.mark_rogue(items)  # whatever it sends, no model said it
            frames = tamper(result)
        else:
            frames = protocol.encode(result)
        self._perform(self.links.on_result(ResultTag.decode(work.tag(len(result.outputs))), frames))

    def _maybe_start(self) -> None:
        if not self.alive or self.stopped or self.running or not self.inbox:
            return
        world = self.world
        compute = self.inbox.popleft()
        batch = compute.batch
        world.ledger.on_execute(batch.inputs, self.name, batch.batch_id)
        spec = self.spec
        poisons = {world.inputs.get(item, (0, 0, ""))[2] for item in batch.inputs}
        if "raise" in poisons and len(batch.inputs) > 1:
            world.ledger.raised_together(batch.inputs)
        outcome, duration_s = self._draw_outcome(poisons, spec.batch_s + spec.item_s * len(batch.inputs), "batch")
        world.trace("%s computes batch %s (%s inputs, %s)", self.name, batch.batch_id, len(batch.inputs), outcome)
        busy = Computing(batch, decode_batch(batch, compute.link, compute.epoch), world.now, duration_s, outcome)
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
    def busy(self):
        """The oldest batch or pass in flight, or None."""
        return self.running[0] if self.running else None

    def _schedule_end(self, busy, duration_s: float) -> None:
        busy.token += 1
        busy.end_at = self.world.now + duration_s
        self.world.at(busy.end_at, self._on_compute_end, self._token, busy, busy.token)

    def _on_compute_end(self, token: int, busy, busy_token: int) -> bool:
        if token != self._token or busy not in self.running or busy_token != busy.token or self.stopped:
            return False
        world = self.world
        if busy.outcome == "kill":
            world.faults["poison_kill"] += 1
            self.die("a poison input killed it", notice_s=world.rng.choice((0.0, 0.002)))
            return True
        self.running.remove(busy)
        self._computed(busy)
        if self.alive:
            self._loop_pass()
            self._maybe_start()
        return True

    def _computed(self, busy: Computing) -> None:
        """Answer the batch just computed, as worker/loop.py run_batch() does, for a model that
        echoes its inputs: "raise" fails the batch, "invalid" and "error" their own input."""
        work, known = busy.work, self.world.inputs
        positions = [i for i in range(len(work.inputs)) if i not in work.errors]
        poisons = [known.get(busy.batch.inputs[i], (0, 0, ""))[2] for i in positions]
        produced: list | Exception = (RuntimeError("poison") if "raise" in poisons
                                      else [_model_output(work.inputs[i], p) for i, p in zip(positions, poisons)])
        self._push(work, batch_result(work, produced, (self.world.now - busy.started_at) * 1000), busy.batch.inputs)


def _model_output(value, poison: str):
    """What the simulated model answers for one input: itself, or an Exception in its slot."""
    if poison == "invalid":
        return InputError("invalid")
    if poison == "error":
        return ValueError("bad input")
    return value  # echo: encode_value(decode_value(x)) == x


@dataclass(eq=False, slots=True)
class Held:
    """One input a continuous worker holds (worker/loop.py _Held): what pass_results() reads."""

    batch: WorkBatch
    position: int  # in its batch
    item: bytes
    cost: int  # what the model's cost() would say (tokens): drawn from the input's identity
    poison: str
    broker: int  # the broker incarnation (world.epoch) that sent it: batch ids start again with each
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


def input_cost(item: bytes, known: dict) -> int:
    info = known.get(item)
    return 1 if info is None else 1 + (info[0] * 31 + info[1] * 17) % 24


class ContinuousWorker(SimWorker):
    """A continuous worker (worker/loop.py run_continuous), with one broker.

    READY announces max_inputs. Every input that arrives is held; one that fails prepare() (here
    an undecodable or "invalid" input) is answered at once (worker/results.py prepare_result). Pass
    after pass is formed by the real worker.passes.plan_pass() from all that is held, and after each
    pass comes one partial BATCH_RESULT per batch the pass touched (worker/results.py pass_results). With
    spec.lanes > 1, up to that many passes run at once (self.running): lane 0 whenever it is free,
    another lane only while lane 0 is busy; they end in any order, and a kill, SIGSTOP or forget
    applies to every pass in flight. A raising pass of several inputs answers each PASS_FAILED; a
    raising pass of one, MODEL_ERROR (worker/results.py failed_pass). A batch that would take it past
    max_inputs is handed back BUSY (WorkerLinks decides), which with one broker must never happen
    (the ledger fails on it). When the broker forgets it, it drops the inputs it holds and has not
    started (worker/passes.py current_inputs); the pass it is running still ends, and WorkerLinks
    drops its answers (their epoch is past).

    READY is never duplicated or reordered here, nor overtaken by what follows it: ZeroMQ does none
    of these, and a broker cannot tell a duplicate READY from a registration anew (it would
    re-dispatch what this worker still holds), nor a HEARTBEAT that overtook the READY from one of
    a worker it forgot (it would answer DISCONNECT, and the batch it sends after the READY would
    reach the worker after it dropped what it held).
    """

    def start(self) -> bool:
        self.held: list[Held] = []  # oldest first
        self.world.ledger.counts["continuous_worker_starts"] += 1
        return super().start()

    def die(self, reason: str, notice_s: float = 0.005, supervised: bool = False) -> None:
        if self.alive and self.held:
            counts = self.world.ledger.counts
            counts["held_inputs_lost_with_killed_workers"] += len(self.held)  # never started: no execution
            counts["killed_workers_holding"] += 1
        self.held = []
        super().die(reason, notice_s, supervised)

    def reregister(self) -> None:
        """Not for a continuous worker: an unprompted READY would let a batch already on the wire
        arrive after it dropped what it held, and the broker, which forgot that batch, would then
        fill the worker past max_inputs."""
        self.world.ledger.counts["reregister_skipped_continuous"] += 1

    def _send(self, message: protocol.Message, what: str) -> None:
        self.world.send_to_broker(self.conn, protocol.encode(message), what,
                                  faulty=not self.faultless and what not in ("DISCONNECT", "READY"))
        if what == "READY":  # nothing sent after it may overtake it (see the class docstring)
            self.conn.barrier_at = self.conn.to_broker_at

    def _forward(self, frames: list[bytes]) -> None:
        world = self.world
        world.ledger.counts["partial_results"] += 1
        scenario = world.scenario
        if (scenario.result_delay_p and not self.faultless and world.injecting
                and world.rng.random() < scenario.result_delay_p):
            # The I/O thread stalls: this result, and all that follows it on the link, comes late.
            world.faults["result_delayed"] += 1
            self.conn.to_broker_at = max(self.conn.to_broker_at, world.now + world.rng.uniform(0.01, 0.3))
        super()._forward(frames)

    def _refused(self, busy: protocol.BatchResult) -> None:
        links = self.links
        self.world.ledger.on_busy_refusal(self.name, busy.batch_id, links.held_inputs, len(busy.outputs),
                                          links.ready.max_inputs)

    def _forget(self, epoch: int) -> list[tuple[int, int]]:
        """The compute thread drops what no pass has started (it sees the link's new epoch)."""
        kept = current_inputs(self.held, {0: epoch})
        if len(kept) < len(self.held):
            self.world.ledger.counts["held_inputs_dropped_on_forget"] += len(self.held) - len(kept)
            self.world.trace("%s drops %s held inputs it had not started", self.name, len(self.held) - len(kept))
        self.held = kept
        return super()._forget(epoch)

    def _take(self, compute: Compute) -> None:
        """The intake thread: prepare() the batch as it arrives, answer at once what fails, hold the rest."""
        world = self.world
        batch, known = compute.batch, world.inputs
        work = decode_batch(batch, compute.link, compute.epoch)
        positions = [i for i in range(len(work.inputs)) if i not in work.errors]
        prepared = [InputError("invalid") if known.get(batch.inputs[i], (0, 0, ""))[2] == "invalid"
                    else work.inputs[i] for i in positions]
        result = prepare_result(work, prepared, 0.0)
        for position, _ in held_inputs(work, prepared):
            item = batch.inputs[position]
            self.held.append(Held(work, position, item, input_cost(item, known), known.get(item, (0, 0, ""))[2],
                                  world.epoch))
        world.trace("%s holds batch %s (%s inputs, %s refused at once); holds %s", self.name, batch.batch_id,
                    len(batch.inputs), len(result.outputs) if result else 0, self.links.held_inputs)
        if result is not None:
            self._push(work, result, [batch.inputs[i] for i in result.indices])
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Start a pass in each free lane that may take one (worker/loop.py _Pool._next_pass): lane 0
        whenever it is free, another lane only while lane 0 is busy."""
        while self.alive and not self.stopped and self.held:
            busy_lanes = {p.lane for p in self.running}
            lane = next((k for k in range(self.spec.lanes) if k not in busy_lanes and may_start(k, busy_lanes)), None)
            if lane is None:
                return
            self._start_pass(lane)

    def _start_pass(self, lane: int) -> None:
        world, spec, held = self.world, self.spec, self.held
        members = take_pass(held, (spec.most_inputs, spec.cost_budget, *lane_bounds(spec.most_inputs, 0, spec.lanes)),
                            spec.padded)
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
                    len(members), lane, sorted({h.batch.batch_id for h in members}), len(held), outcome)
        running = Pass(members, world.now, duration_s, outcome, lane=lane)
        self.running.append(running)
        self._schedule_end(running, duration_s)

    def hang_now(self) -> bool:
        """The model hangs in a pass it runs (any lane): the watchdog ends the process."""
        if not self.alive or self.stopped or not self.running:
            return False
        running = self.running
        hung_pass = running[0] if len(running) == 1 else self.world.rng.choice(running)
        hung_pass.outcome = "hang"
        self._schedule_end(hung_pass, _HUNG_S)
        return True

    def _computed(self, busy: Pass) -> None:
        """Answer the pass just run: one partial result per batch it touched (pass_results)."""
        world = self.world
        members = busy.members
        shared = len(members) > 1
        if busy.outcome == "raise":
            outcome = failed_pass(RuntimeError("poison"), len(members))
            world.ledger.counts["pass_failed_inputs" if shared else "passes_of_one_raised"] += len(members)
        else:
            outcome = [_model_output(h.batch.inputs[h.position], h.poison) for h in members]
        epoch = self.links.links[0].epoch
        stale = [h for h in members if h.batch.epoch != epoch]
        if stale:
            # The pass began before the broker forgot us (it re-dispatched these inputs): WorkerLinks
            # drops their answers.
            counts = world.ledger.counts
            counts["stale_pass_answers"] += len(stale)
            if any(h.broker != world.epoch for h in stale):  # batch ids started again since
                counts["stale_pass_answers_to_a_new_broker"] += len(stale)
        for work, result in pass_results(members, outcome, (world.now - busy.started_at) * 1000):
            self._push(work, result, [h.item for h in members if h.batch is work])


_KIND_NAMES = {protocol.Ready: "READY", protocol.Heartbeat: "HEARTBEAT", protocol.BatchResult: "BATCH_RESULT",
               protocol.Disconnect: "DISCONNECT"}


class SimGateway:
    """A gateway's BrokerClient on its I/O-thread transport (one DEALER, one I/O thread), or, where
    `together`, as the async gateway sends: the requests of one flush in one REQUESTS message. Only the
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
        # As the async gateway (gateway/async_transport.py) does, send the requests of one flush to the broker
        # together, in one REQUESTS message; else one REQUEST each, as the I/O thread does. From a stream of its
        # own, so that the seed's other draws stay as they were.
        self.together = random.Random(f"together {world.seed} {index}").random() < 0.5

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
        tracked = self._copy_sent(instruction)
        what = "REQUEST" if tracked else "STATUS_REQUEST"
        world.send_to_broker(self.conn, protocol.encode(instruction.message), what, tracked)
        return True

    def _send_together(self, broker: int, sends: list[Send]) -> bool:
        """The async gateway's send of the requests of one flush to one broker: one REQUESTS message."""
        world = self.world
        if len(sends) == 1:
            return self._send(sends[0])
        if broker != 0 or not world.connected(self.conn):
            return False
        tracked = [self._copy_sent(instruction) for instruction in sends]
        world.ledger.counts["gateway_sent_together"] += len(sends)
        world.send_to_broker(self.conn, protocol.encode(protocol.Requests([s.message for s in sends])), "REQUESTS",
                             tracked)
        return True

    def _copy_sent(self, instruction: Send) -> Tracked | None:
        """The copy of a request that this send carries, as the invariants follow it (None: a status request)."""
        world = self.world
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
        return tracked

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
        for outcome in requests.flush(self._send, now, self._send_together if self.together else None):
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
            if message.instance_id:  # it names the instance as a heartbeat does (gateway/dealers.py's deliver)
                self.links.heartbeat(0, message.instance_id, now)
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
            world.ledger.on_execute(message.inputs, self.name, message.batch_id)
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
            world.ledger.on_execute([batch.inputs[i] for i in echoed], self.name, batch.batch_id)
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
