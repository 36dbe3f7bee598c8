"""What must hold in every simulated run, checked after every event.

The Ledger follows every request the simulated peers send, from the moment the core reads it to
the reply the core hands to `send`, and every input from its first dispatch to each execution:

1. every request the core read gets exactly one reply sent by the core, by its deadline plus one
   heartbeat interval, unless the broker instance that read it crashed first (lost by crash);
   a request tagged with another broker instance is refused unrun, with UNAVAILABLE;
2. a reply carries its own inputs as outputs (the workers echo), one per input, in order;
3. no input is executed more than max_attempts times by the batches of one broker instance, and none
   fails WORKER_LOST before that instance sent it to a worker max_attempts times (a batch whose send
   failed never ran). Per instance: a gateway with several brokers resends a request that a broker
   held when it crashed, to another broker or to the restarted one, and the new instance cannot know
   that the old one had run it (docs/reliability.md: "at most --max-attempts per broker");
4. nothing escapes the core and its internal_errors counter stays 0;
5. the core's state stays bounded and consistent: the requests it holds are those accepted and
   unanswered, each missing output is queued or in flight exactly once, the batcher's counters
   match its queues, registered workers are reachable or about to be dropped;
6. an isolated input is never at a worker together with any other batch (whatever the worker's
   kind); continuous batching: the core never has more unanswered inputs at a worker than its
   max_inputs; each batch's pending count is its unanswered inputs; a continuous worker (which
   serves one broker here) is never sent more than it may hold (it would refuse BUSY); an isolated input never shares a forward pass with
   another input from the same broker; a pass execution counts for every input in it (held
   inputs dropped or lost unstarted do not), within max_attempts (invariant 3);
7. a request whose inputs are clean (no "raise", "error" or "invalid" poison) and that no rogue
   worker or tampered result touched is never answered MODEL_ERROR or BAD_REQUEST: a bystander of
   a raising pass or batch runs again alone and succeeds. With max_attempts 1 there is no second
   run, so a bystander of a raising pass may fail MODEL_ERROR (and only then).
8-13. issue #28's: retries go elsewhere, and a worker must earn trust back: see tests/sim/trust.py.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.core import _MAX_REMEMBERED_MODELS, Peer
from ddml_common import protocol
from ddml_common.protocol import MAX_MODELS, ErrorCode
from tests.sim.trust import Trust

if TYPE_CHECKING:
    from tests.sim.world import World

_DEEP_EVERY = 8  # steps between full consistency checks of the core's tables (and at the end)


@dataclass(eq=False, slots=True)
class Tracked:
    """A request a simulated gateway sent, as the invariants follow it."""

    owner: str  # the gateway's name ("g0", "evil")
    request_id: str
    inputs: list[bytes]  # encoded; each identifies itself ({"u": serial, "i": index, ...})
    serial: int  # the "u" of its inputs
    timeout_ms: int
    instance_id: str  # the broker instance it was tagged with
    hostile: bool = False
    key: tuple[bytes, str] | None = None  # (gateway identity, request id) once a broker read it
    deadline_at: float = math.inf  # the core's deadline: read at + timeout
    expect_refusal: bool = False  # tagged with another broker instance
    outcome: str = ""  # "ok" or the error code of the reply the core sent
    answered_in_step: int = -1  # the step whose events sent its reply
    replies_sent: int = 0  # by the core, at the send boundary
    replies_delivered: int = 0  # to the gateway


class Ledger:
    def __init__(self, world: World):
        self._world = world
        config = world.config
        self.max_attempts = config.batching.max_attempts
        self.reply_bound_s = config.heartbeat.interval_s  # a reply may follow its deadline by this much
        # A registered worker whose identity the ROUTER forgot is dropped at its next heartbeat
        # send (every interval) or at expiry, whichever comes first.
        self.forget_bound_s = min(config.heartbeat.interval_s, config.heartbeat.expiry_s) + 1e-6
        self.outstanding: dict[tuple[bytes, str], Tracked] = {}  # read by the current core, unanswered
        self._deadlines: list[tuple[float, int, Tracked]] = []  # lingers after replies: check identity
        self._pushes = 0
        # (broker incarnation, serial, index) -> batches of that instance that reached a worker with the input
        self.dispatched: Counter[tuple[int, int, int]] = Counter()
        self.executed: Counter[tuple[int, int]] = Counter()  # (serial, index) -> times a worker started it
        self.executed_by_instance: Counter[tuple[int, int, int]] = Counter()  # (incarnation, serial, index) -> runs
        self.batch_instances: dict[int, int] = {}  # batch id -> the broker incarnation (world.epoch) that sent it
        self.by_serial: dict[int, Tracked] = {}  # every request submitted, by the serial of its inputs
        self.rogue_touched: set[int] = set()  # serials of requests a rogue worker was sent: it may answer any code
        self.raised_with: set[int] = set()  # serials of requests with an input in a raising pass (or batch) of several
        self.isolated_batches: set[tuple[int, int]] = set()  # (broker incarnation, batch id) of isolated inputs
        self.clean_poisons = frozenset(("", "slow", "kill", "hang"))  # none of these fails an input by itself
        self.counts: Counter[str] = Counter()
        self.checks = 0
        # The message being read, while on_frames, on_tick and flush run for it.
        self._arriving: dict[tuple[bytes, str], Tracked] = {}  # our requests in it (a REQUESTS: several), by key
        self._arriving_gateway: bytes | None = None  # from a gateway (identity): it may be answered at once
        self._arriving_duplicates: set[tuple[bytes, str]] = set()  # those whose request id is held already
        self._arriving_codes: dict[tuple[bytes, str] | None, list[str]] = {}  # the replies sent as it arrived, by key
        self._stats_before: tuple[int, int] = (0, 0)
        self.trust = Trust(self, world)  # invariants 8-13 (issue #28: retries elsewhere, trust earned back)

    def fail(self, message: str) -> None:
        self._world.fail(message)

    # ------------------------------------------------------------------ requests in

    def submitted(self, tracked: Tracked) -> None:
        self.by_serial[tracked.serial] = tracked
        self.counts["requests_sent_hostile" if tracked.hostile else "requests_sent"] += 1

    def before_read(self, peer: Peer, identity: bytes, tracked: Tracked | list[Tracked] | None) -> None:
        """A message is about to reach the core; `tracked` if it is one of our requests (a list: the
        requests of a REQUESTS message)."""
        self._arriving = {}
        if peer is not Peer.GATEWAY:
            self._arriving_gateway = None
            return
        core = self._world.core
        self._arriving_gateway = identity
        self._arriving_codes.clear()
        self._arriving_duplicates.clear()
        self._stats_before = (core.stats["malformed"], core.stats["duplicate_requests"])
        for one in ([] if tracked is None else tracked if type(tracked) is list else [tracked]):
            one.key = (identity, one.request_id)
            self._arriving[one.key] = one
            if one.key in self.outstanding:
                self._arriving_duplicates.add(one.key)
            stale = bool(one.instance_id) and one.instance_id != core.instance_id
            one.expect_refusal = stale or core.draining

    def after_read(self) -> None:
        """on_frames, on_tick and flush have run for the message that just arrived: was each request in
        it refused at once (with the right code), dropped as a duplicate, or accepted?"""
        if self._arriving_gateway is None:
            return
        self._arriving_gateway = None
        arriving, self._arriving = self._arriving, {}
        core = self._world.core
        self.checks += 1
        for key, codes in self._arriving_codes.items():
            if len(codes) > 1:
                self.fail(f"{len(codes)} replies ({codes}) to one request {key} as it arrived")
        if core.stats["malformed"] != self._stats_before[0]:
            # Refused by decode(): answered BAD_REQUEST if its request id could be read, else dropped.
            codes = [code for key_codes in self._arriving_codes.values() for code in key_codes]
            if any(code != ErrorCode.BAD_REQUEST.value for code in codes):
                self.fail(f"a malformed request was answered {codes}, not BAD_REQUEST")
            self.counts["requests_malformed"] += len(arriving)
            return
        if not arriving:
            if self._arriving_codes:
                self.fail(f"a message that is not a request was answered with a reply ({self._arriving_codes})")
            return
        duplicates = len(self._arriving_duplicates)
        if core.stats["duplicate_requests"] != self._stats_before[1] + duplicates:
            self.fail(f"requests {sorted(self._arriving_duplicates)} reused pending ids but the core counted "
                      f"{core.stats['duplicate_requests'] - self._stats_before[1]} duplicates")
        for key, tracked in arriving.items():
            self._after_read_one(tracked, self._arriving_codes.get(key, []), key in self._arriving_duplicates)

    def _after_read_one(self, tracked: Tracked, codes: list[str], duplicate: bool) -> None:
        core = self._world.core
        self.counts["requests_read"] += 1
        if duplicate:
            self.counts["requests_duplicate"] += 1
            return
        if codes:
            self.counts["requests_refused"] += 1
            if tracked.expect_refusal and codes[0] != ErrorCode.UNAVAILABLE.value:
                self.fail(f"request {tracked.key} (tagged with instance {tracked.instance_id!r}, broker draining: "
                          f"{core.draining}) was answered {codes[0]}, not UNAVAILABLE")
            return
        if tracked.expect_refusal:
            self.fail(f"request {tracked.key} tagged with broker instance {tracked.instance_id!r} was accepted "
                      f"by instance {core.instance_id!r} (draining: {core.draining}): it must be refused unrun "
                      f"with UNAVAILABLE")
        now = self._world.now
        tracked.deadline_at = now + tracked.timeout_ms / 1000
        self.outstanding[tracked.key] = tracked
        self._pushes += 1
        heapq.heappush(self._deadlines, (tracked.deadline_at, self._pushes, tracked))
        self.counts["requests_accepted"] += 1

    def broker_crashed(self) -> None:
        """Requests the dead instance held are lost with it: no reply is owed for them."""
        self.counts["lost_by_crash"] += len(self.outstanding)
        self.outstanding.clear()
        self._deadlines.clear()

    # ------------------------------------------------------------------ the send boundary

    def on_reply_sent(self, gateway_id: bytes, reply: protocol.Reply) -> None:
        """The core handed a reply to `send`: invariants 1 and 2, whatever the network does next."""
        self.checks += 1
        key = (gateway_id, reply.request_id)
        code = reply.error_code or "ok"
        tracked = self.outstanding.pop(key, None)
        accepted = tracked is not None  # not refused as it arrived
        if tracked is not None:
            if self._world.now > tracked.deadline_at + self.reply_bound_s:
                self.fail(f"request {key} answered at {self._world.now:.4f}, after its deadline "
                          f"{tracked.deadline_at:.4f} + {self.reply_bound_s} s")
        elif gateway_id == self._arriving_gateway:  # an answer to the message arriving now
            self._arriving_codes.setdefault(key if self._arriving else None, []).append(code)
            if not self._arriving:  # not one of ours: garbage whose request id could be read
                self.counts[f"reply_{code}"] += 1
                return
            tracked = self._arriving.get(key)
            if tracked is None:
                self.fail(f"reply {code} for request {key} as requests {sorted(self._arriving)} arrive")
        else:
            self.fail(f"reply {code} for request {key}, which the broker does not hold "
                      f"(never read, already answered, or lost in a crash)")
        tracked.replies_sent += 1
        tracked.outcome = reply.error_code or "ok"
        tracked.answered_in_step = self._world.steps
        self.counts[f"reply_{reply.error_code or 'ok'}"] += 1
        if reply.error_code is None:
            self._check_outputs(tracked, reply.outputs, "sent")
        elif (reply.error_code in (ErrorCode.MODEL_ERROR.value, ErrorCode.BAD_REQUEST.value) and accepted
              and tracked.serial not in self.rogue_touched):
            self._check_clean_failure(tracked, reply)
        elif reply.error_code == ErrorCode.WORKER_LOST.value and tracked.serial not in self.rogue_touched:
            self.trust.on_worker_lost(tracked, reply, clean=self._clean(tracked, frozenset(("",))))
            epoch = self._world.epoch
            reached = max(self.dispatched[(epoch, tracked.serial, i)] for i in range(len(tracked.inputs)))
            if reached < self.max_attempts:
                self.fail(f"request {key} failed WORKER_LOST ({reply.error_message!r}) although none of its "
                          f"inputs reached a worker {self.max_attempts} times (at most {reached})")

    def _clean(self, tracked: Tracked, clean: frozenset[str] | None = None) -> bool:
        """Every input's poison is among `clean` (default: those that fail no input by themselves)."""
        inputs, clean = self._world.inputs, clean or self.clean_poisons
        return all(inputs.get(item, (0, 0, "?"))[2] in clean for item in tracked.inputs)

    def _check_clean_failure(self, tracked: Tracked, reply: protocol.Reply) -> None:
        """Invariant 7."""
        if not self._clean(tracked):
            return
        if self.max_attempts == 1 and tracked.serial in self.raised_with:
            self.counts["bystanders_failed_without_a_second_attempt"] += 1
            return
        self.fail(f"request {tracked.key}, whose inputs are all clean, was answered {reply.error_code}: "
                  f"{reply.error_message!r} (raised with a poison: {tracked.serial in self.raised_with}, "
                  f"max_attempts {self.max_attempts})")

    def on_batch_sent(self, batch: protocol.Batch, rogue: bool, isolated: bool = False) -> None:
        """A batch left the broker: count each input's dispatch; none may belong to a request
        answered before this step (TIMEOUT included: a request past its deadline is never dispatched)."""
        self.checks += 1
        world = self._world
        inputs, by_serial = world.inputs, self.by_serial
        epoch = world.epoch
        self.batch_instances[batch.batch_id] = epoch
        if isolated:
            self.isolated_batches.add((epoch, batch.batch_id))
        for item in batch.inputs:
            info = inputs.get(item)
            if info is None:
                continue
            self.dispatched[epoch, info[0], info[1]] += 1
            if isolated:
                self.counts["isolated_dispatches"] += 1
            if rogue:
                self.rogue_touched.add(info[0])
            tracked = by_serial[info[0]]
            if tracked.replies_sent and tracked.answered_in_step != world.steps:
                self.fail(f"batch {batch.batch_id} carries input {info[1]} of request {tracked.key}, answered "
                          f"{tracked.outcome} before (a request answered is never dispatched)")

    def on_execute(self, items: list[bytes], worker: str, batch_id: int, epoch: int | None = None) -> None:
        """A worker starts computing these inputs of one batch: invariant 3. epoch: the broker
        incarnation that sent the batch, when the worker knows it (else looked up by batch id)."""
        self.checks += 1
        if epoch is None:
            epoch = self.batch_instances.get(batch_id, self._world.epoch)
        inputs, executed, here = self._world.inputs, self.executed, self.executed_by_instance
        for item in items:
            info = inputs.get(item)
            if info is None:
                continue
            executed[info[0], info[1]] += 1
            key = epoch, info[0], info[1]
            here[key] += 1
            if here[key] > self.max_attempts:
                self.fail(f"input {key[1:]} executed {here[key]} times by batches of broker instance {epoch} "
                          f"(by {worker} last, batch {batch_id}); max_attempts is {self.max_attempts}")
        self.counts["inputs_executed"] += len(items)

    def on_pass(self, members: list, worker: str) -> None:
        """A continuous worker starts a forward pass (members: peers.Held): invariants 3 and 6."""
        for held in members:
            self.on_execute([held.item], worker, held.batch.batch_id, held.broker)
        self.counts["passes"] += 1
        self.counts["pass_inputs"] += len(members)
        if len(members) == 1:
            return
        self.counts["shared_passes"] += 1
        isolated = self.isolated_batches
        for held in members:
            if (held.broker, held.batch.batch_id) in isolated:
                others = [(h.batch.batch_id, h.position) for h in members if h is not held and h.broker == held.broker]
                if others:
                    self.fail(f"{worker} runs isolated input {held.position} of batch {held.batch.batch_id} in a pass "
                              f"with {len(others)} other inputs of the same broker (batch, position): {others[:6]}")

    def raised_together(self, items: list[bytes]) -> None:
        """These inputs shared a pass (or batch) that raised: its bystanders may fail when max_attempts is 1."""
        inputs = self._world.inputs
        self.counts["raising_shared_passes"] += 1
        for item in items:
            info = inputs.get(item)
            if info is not None:
                self.raised_with.add(info[0])

    def mark_rogue(self, items: list[bytes]) -> None:
        """A tampered result answers these: whatever comes of them, no model said it."""
        inputs = self._world.inputs
        for item in items:
            info = inputs.get(item)
            if info is not None:
                self.rogue_touched.add(info[0])

    def on_busy_refusal(self, worker: str, batch_id: int, held: int, size: int, max_inputs: int) -> None:
        """Invariant 6: a continuous worker that serves one broker never has to refuse a batch."""
        self.fail(f"{worker} must refuse batch {batch_id} BUSY: it holds {held} inputs and {size} more would "
                  f"pass its max_inputs {max_inputs}; with one broker, the broker's credit should prevent that")

    # ------------------------------------------------------------------ at the gateway

    def on_reply_delivered(self, gateway: str, tracked: Tracked | None, reply: protocol.Reply) -> None:
        """A reply reached the gateway that sent the request (invariant 2, end to end)."""
        self.checks += 1
        if tracked is None:
            self.fail(f"gateway {gateway} got a reply for request {reply.request_id!r}, which it never sent")
        tracked.replies_delivered += 1
        if tracked.replies_delivered > 1:
            self.fail(f"gateway {gateway} got {tracked.replies_delivered} replies for {reply.request_id!r}")
        if reply.error_code is None:
            self._check_outputs(tracked, reply.outputs, "delivered")

    def _check_outputs(self, tracked: Tracked, outputs: list[bytes], where: str) -> None:
        if outputs == tracked.inputs:
            return
        if len(outputs) != len(tracked.inputs):
            self.fail(f"ok reply {where} for {tracked.request_id!r} has {len(outputs)} outputs "
                      f"for {len(tracked.inputs)} inputs")
        for index, (output, expected) in enumerate(zip(outputs, tracked.inputs)):
            if output != expected:
                got = _describe_value(output)
                self.fail(f"ok reply {where} for {tracked.request_id!r}: output {index} is {got}, "
                          f"not its own input {_describe_value(expected)}")

    # ------------------------------------------------------------------ after every step

    def check_step(self, step: int) -> None:
        """Invariants 1, 4 and 5, cheaply after every event, fully every few events."""
        world = self._world
        core = world.core
        if core is None:
            return
        now = world.now
        self.checks += 6
        if core.stats["internal_errors"]:
            self.fail(f"core counted {core.stats['internal_errors']} internal errors (a caught exception is a bug)")
        if len(core._requests) != len(self.outstanding):
            self._diff_requests(core)
        deadlines, outstanding = self._deadlines, self.outstanding
        while deadlines and outstanding.get(deadlines[0][2].key) is not deadlines[0][2]:
            heapq.heappop(deadlines)  # answered (a later request may reuse its id)
        if deadlines and now > deadlines[0][0] + self.reply_bound_s:
            key = deadlines[0][2].key
            self.fail(f"request {key} has no reply at {now:.4f}, past its deadline {deadlines[0][0]:.4f} "
                      f"+ {self.reply_bound_s} s")
        for worker_id in core._workers._workers:
            conn = world.conns.get(worker_id)
            if conn is None or (conn.epoch == world.epoch and now > conn.gone_at + self.forget_bound_s):
                self.fail(f"worker {worker_id!r} is still registered at {now:.4f} although its connection "
                          f"was gone at {conn.gone_at if conn else 'never open'}")
        if len(core._deadlines) > 4 * len(core._requests) + 1024 + 1:
            self.fail(f"deadline heap holds {len(core._deadlines)} entries for {len(core._requests)} requests")
        for worker in core._workers:
            if worker.in_flight:
                self._check_quarantine(worker)
            if worker.max_inputs and worker.in_flight:
                self._check_continuous(worker)
        batcher = core._batcher
        for table in (batcher._queued_bytes, batcher._queued_requests):
            for model, value in table.items():
                if value < 0:
                    self.fail(f"batcher counter for model {model!r} went negative: {value}")
        if step % _DEEP_EVERY == 0:
            self.check_tables()
            self.trust.check_tables()

    def _check_continuous(self, worker) -> None:
        """Invariant 6, at the broker: its credit for a continuous worker, counted in inputs."""
        in_flight = worker.in_flight
        pending = worker.in_flight_items
        if pending > worker.max_inputs:
            self.fail(f"the broker has {pending} unanswered inputs at worker {worker.worker_id!r}, "
                      f"past its max_inputs {worker.max_inputs} (batches {sorted(in_flight)})")

    def _check_quarantine(self, worker) -> None:
        """Invariant 6, for every kind of worker: an isolated input is alone at its worker. (Queued
        behind a poison input that hangs, a bystander is lost with it a second time, and fails.)"""
        in_flight = worker.in_flight
        if len(in_flight) > 1 and any(batch.isolated for batch in in_flight.values()):
            self.fail(f"worker {worker.worker_id!r} has an isolated input in flight together with other batches: "
                      + ", ".join(f"{b.batch_id} ({len(b.items)} inputs{', isolated' if b.isolated else ''})"
                                  for b in in_flight.values()))

    def _diff_requests(self, core) -> None:
        held, expected = set(core._requests), set(self.outstanding)
        self.fail(f"core holds {len(held)} requests, the sim counts {len(expected)} accepted and unanswered; "
                  f"held only by the core: {sorted(held - expected)[:5]}, "
                  f"only in the sim: {sorted(expected - held)[:5]}")

    def check_tables(self) -> None:
        """Full consistency of the core's tables: O(items), so not after every event."""
        core = self._world.core
        if core is None:
            return
        self.checks += 5
        if core._requests.keys() != self.outstanding.keys():
            self._diff_requests(core)
        batcher, workers = core._batcher, core._workers
        placed: Counter[tuple[int, int]] = Counter()  # (id(request), index) -> places it is waiting or running
        queued: Counter[int] = Counter()  # id(request) -> its items in queues
        for model, levels in batcher._queues.items():
            held_bytes = 0
            for queue in levels.values():
                for item in queue:
                    held_bytes += item.nbytes
                    if not item.request.done:
                        placed[id(item.request), item.index] += 1
                        queued[id(item.request)] += 1
            if held_bytes != batcher._queued_bytes.get(model, 0):
                self.fail(f"batcher counts {batcher._queued_bytes.get(model, 0)} queued bytes for {model!r}, "
                          f"its queues hold {held_bytes}")
        for worker in workers:
            for batch_id, batch in worker.in_flight.items():
                if batch.worker_id != worker.worker_id or batch.batch_id != batch_id:
                    self.fail(f"batch {batch_id} filed under worker {worker.worker_id!r} "
                              f"belongs to {batch.worker_id!r}")
                unanswered = batch.unanswered()
                if batch.pending != len(unanswered):
                    self.fail(f"batch {batch_id} counts {batch.pending} inputs pending, {len(unanswered)} "
                              f"of its {len(batch.items)} are unanswered")
                for item in unanswered:
                    if not item.request.done:
                        placed[id(item.request), item.index] += 1
        with_queued: Counter[str] = Counter()
        for key, request in core._requests.items():
            if request.done:
                self.fail(f"request {key} is answered but still held")
            missing = 0
            for index, output in enumerate(request.outputs):
                if output is not None:
                    continue
                missing += 1
                where = placed[id(request), index]
                if where != 1:
                    state = "lost: neither queued nor in flight" if where == 0 else f"in {where} places at once"
                    self.fail(f"input {index} of request {key} is {state}")
            if missing != request.remaining:
                self.fail(f"request {key} counts {request.remaining} inputs remaining, {missing} lack an output")
            if request.queued != queued[id(request)]:
                self.fail(f"request {key} counts {request.queued} items queued, the queues hold {queued[id(request)]}")
            if request.queued:
                with_queued[request.model] += 1
        for model, count in batcher._queued_requests.items():
            if count != with_queued[model]:
                self.fail(f"batcher counts {count} queued requests for {model!r}, "
                          f"{with_queued[model]} have items queued")
        # Peers choose model names freely (READY names up to MAX_MODELS): what is kept per model must
        # be bounded by what is served now plus what the core promises to remember.
        bound = _MAX_REMEMBERED_MODELS + MAX_MODELS * (len(workers) + 1)
        for name, table in (("model stats", core._model_stats), ("batcher queues", batcher._queues)):
            if len(table) > bound:
                self.fail(f"{name} grew to {len(table)} models (bound {bound})")

    def check_quiescent(self) -> None:
        """At the end: nothing held, nothing queued alive, nothing in flight."""
        core = self._world.core
        self.check_tables()
        self.checks += 3
        if core._requests:
            self.fail(f"the core still holds {len(core._requests)} requests after every deadline passed: "
                      f"{sorted(core._requests)[:5]}")
        for model, levels in core._batcher._queues.items():
            live = sum(1 for q in levels.values() for item in q if not item.request.done)
            if live:
                self.fail(f"{live} live items still queued for {model!r} at the end")
        busy = {w.worker_id: sorted(w.in_flight) for w in core._workers if w.in_flight}
        if busy:
            self.fail(f"batches still in flight at the end: {busy}")


def _describe_value(data: bytes):
    try:
        return protocol.decode_value(data)
    except protocol.DecodeError:
        return data[:40]
