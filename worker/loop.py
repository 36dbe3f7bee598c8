"""The compute side of a worker: take a batch, run the model, push the result. Never raises.

run_worker keeps batch semantics (one predict() per batch the broker sends); run_continuous
does continuous batching, for handlers that declare it (Manager.continuous).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from ddml_common import protocol, tracing
from ddml_common.protocol import ErrorCode
from ddml_common.memory import keep_freed_buffers
from ddml_common.sockets import send_frames
from ddml_common.tensors import check_output, checked_outputs
from worker.link import ComputeState, WorkBatch
from worker.models import Manager
from worker.passes import current_inputs, lane_bounds, may_start, take_pass
from worker.results import (FailedInput, WrongOutputCount, batch_result, failed_pass, held_inputs, pass_results,
                            prepare_result)

logger = logging.getLogger(__name__)

# A result the I/O thread has not taken within this long never will be: it has ended (the worker
# is stopping). A compute thread then raises zmq.Again instead of waiting for ever.
RESULT_SEND_TIMEOUT_MS = 10_000
# Lane 0 runs with every thread only if no other lane has started a pass for this long.
SHARED_MEMORY_S = 1.0
# The main thread never waits longer than this at a time. Python runs a signal handler only in
# the main thread, and the kernel may deliver SIGTERM to any thread that does not block it (the
# broker I/O thread, a lane, an OpenMP thread): the main thread, asleep on a lock, would then not
# run the handler until it woke, and a worker with nothing to do would ignore SIGTERM for ever.
SIGNAL_CHECK_S = 0.25


def run_worker(
    model: Manager,
    inbox: queue.Queue,
    results: zmq.Socket,
    state: ComputeState,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Serve batches from the I/O thread until it puts None in the inbox. The model runs here."""
    keep_freed_buffers()
    while True:
        try:
            batch = inbox.get(timeout=SIGNAL_CHECK_S)  # see SIGNAL_CHECK_S
        except queue.Empty:
            continue
        if batch is None:
            return
        run_and_push(model, batch, results, state, clock)


def run_and_push(model: Manager, batch: WorkBatch, results: zmq.Socket, state: ComputeState,
                 clock: Callable[[], float] = time.monotonic) -> None:
    """Run one whole batch, count it, and hand its result to the I/O thread."""
    push_result(results, batch, run_counted(model, batch, state, clock))


def run_counted(model: Manager, batch: WorkBatch, state: ComputeState,
                clock: Callable[[], float] = time.monotonic) -> protocol.BatchResult:
    """Run one whole batch, with the watchdog's busy_since set meanwhile, and count it. The compute
    thread calls it, or the I/O thread for a lone batch (worker/connection.py: _run_inline)."""
    state.busy_since = started_at = clock()
    try:
        result = run_batch(model, batch, clock)
    finally:
        state.busy_since = None
    ended_at = clock()
    if batch.traces:
        _trace(batch, started_at, ended_at)
    state.computed(len(batch.inputs), ended_at - started_at)
    return result


def push_result(results: zmq.Socket, batch: WorkBatch, result: protocol.BatchResult) -> None:
    """A whole batch's result to the I/O thread; dropped, with a warning, if it has stopped taking them."""
    try:
        _push(results, batch, result)
    except zmq.Again:
        _dropped(len(batch.inputs))


@dataclass(eq=False, slots=True)
class _Held:
    """One input a continuous worker holds: where it came from, and what prepare() made of it."""

    batch: WorkBatch
    position: int  # in its batch
    prepared: Any
    cost: int
    waited: int = 0  # passes run while it was held


def run_continuous(
    model: Manager,
    inbox: queue.Queue,
    results: zmq.Socket,
    state: ComputeState,
    most_inputs: int,
    cost_budget: int = 0,
    least_inputs: int = 0,
    lanes: int = 1,
    threads: int = 0,
    set_threads: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Continuous batching: hold every input that arrives, and run pass after pass, each formed by
    plan_pass() from all that is held; answer each input as soon as its pass is done (one partial
    BATCH_RESULT per batch the pass touched). The model never waits while anything is held.

    Passes run in `lanes` compute lanes, each starting its next pass as soon as it is free and
    anything is held; a helper thread takes batches from the inbox and prepare()s them meanwhile.
    Lane 0 is this thread; the others run only while lane 0 is busy, so that an input that arrives
    during a pass starts at once instead of waiting for the pass to end. Lane 0 runs a pass with
    all `threads` when it takes all that is held and no other lane has run for SHARED_MEMORY_S (a
    lone request is as fast as with one lane), else with threads // lanes, as the other lanes
    always do (set_threads sets the calling thread's count).
    Lane 0 is this thread because OpenMP serves only one thread well with a team of several.

    plan_pass() forms each pass from what is held, within most_inputs, cost_budget and
    least_inputs; with several lanes, within lane_bounds().

    A pass of several inputs that fails as a whole answers each PASS_FAILED: the broker runs them
    again one at a time, so only a poison input fails, and no input runs more than --max-attempts.
    """
    keep_freed_buffers()
    limits = (most_inputs, cost_budget, *lane_bounds(most_inputs, least_inputs, lanes))
    pool = _Pool(model, state, limits, results, (threads, max(1, threads // lanes) if threads else 0, set_threads),
                 clock)
    helpers = [threading.Thread(target=pool.take, args=(inbox,), name="compute-intake", daemon=True)]
    helpers += [threading.Thread(target=pool.run_lane, args=(lane,), name=f"compute-lane-{lane}", daemon=True)
                for lane in range(1, lanes)]
    for helper in helpers:
        helper.start()
    try:
        pool.run_lane(0, results)
    finally:
        pool.stop()
        inbox.put(None)  # the intake thread may wait there, if lane 0 ended first
        for helper in helpers:
            helper.join(timeout=60)
    if pool.failure is not None:  # a thread died: end the process, so that a supervisor restarts it
        raise RuntimeError("a compute thread failed") from pool.failure


class _Pool:
    """What a continuous worker holds, and the lanes that run passes from it."""

    def __init__(self, model: Manager, state: ComputeState, limits: tuple[int, int, int, int], results: zmq.Socket,
                 threads: tuple[int, int, Callable[[int], None] | None], clock: Callable[[], float]):
        self._model, self._state, self._limits, self._clock = model, state, limits, clock
        self._padded = model.padded  # how plan_pass() forms passes
        # Torch threads for a pass alone and for one beside another lane (0: leave them), and how to set them.
        self._alone_threads, self._shared_threads, self._set_threads = threads
        # Each thread pushes results on its own socket (a ZeroMQ socket is not thread-safe), to where this one does.
        self._results_endpoint = results.getsockopt_string(zmq.LAST_ENDPOINT)
        self._context = results.context
        self._held: list[_Held] = []  # oldest first
        self._changed = threading.Condition()
        self._stopping = False
        self._started: dict[int, float] = {}  # lane -> when its pass began
        self.failure: BaseException | None = None  # what ended a thread that should not have ended
        self._shared_at = float("-inf")  # when a lane other than 0 last started a pass

    def take(self, inbox: queue.Queue) -> None:
        """The intake thread: prepare() each batch as it arrives, and hold what it made of it."""
        results = self._connect()
        try:
            while (arrived := inbox.get()) is not None:
                try:
                    held = _prepare(self._model, arrived, results, self._clock)
                except zmq.Again:
                    _dropped(len(arrived.inputs))
                    continue
                if held:
                    with self._changed:
                        self._held.extend(held)
                        self._changed.notify_all()
        except BaseException as error:  # run_continuous raises it
            self.failure = self.failure or error
        finally:
            self.stop()
            results.close(linger=0)

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDTIMEO, RESULT_SEND_TIMEOUT_MS)
        socket.connect(self._results_endpoint)
        return socket

    def run_lane(self, lane: int, results: zmq.Socket | None = None) -> None:
        """One compute lane: pass after pass until stopped; results None: on a socket of its own."""
        own = results is None
        if own:
            results = self._connect()
        current = 0
        try:
            while True:
                running, alone = self._next_pass(lane)
                if running is None:
                    return
                wanted = self._alone_threads if alone else self._shared_threads
                if self._set_threads is not None and wanted and wanted != current:
                    self._set_threads(current := wanted)
                started_at = self._started[lane]
                traced = [h for h in running if h.batch.spans]  # inputs of requests whose spans we export
                forward_from_ns = time.time_ns() if traced else 0
                outcome = _run_pass(self._model, running)
                compute_s = self._clock() - started_at
                with self._changed:
                    if traced:
                        _passed_spans(traced, (forward_from_ns, time.time_ns()), len(running))
                    self._done(lane)
                    self._state.batches += 1
                    self._state.items += len(running)
                    self._state.compute_s += compute_s
                try:
                    _answer(running, outcome, compute_s, results)
                except zmq.Again:
                    _dropped(len(running))
        except BaseException as error:  # nothing the model does gets here (_run_pass): a bug, or no memory
            with self._changed:
                self.failure = self.failure or error  # run_continuous raises it
                self._done(lane)
            self.stop()
        finally:
            if own:
                results.close(linger=0)

    def _done(self, lane: int) -> None:
        """Under the lock: the lane's pass has ended."""
        self._started.pop(lane, None)
        self._state.busy_since = min(self._started.values(), default=None)

    def _next_pass(self, lane: int) -> tuple[list[_Held] | None, bool]:
        """Wait for inputs and take the next pass (None when stopping); alone: no other lane is busy.
        A lane other than 0 takes one only while lane 0 is busy."""
        with self._changed:
            while True:
                if self._stopping:
                    return None, False
                epochs = self._state.link_epochs
                if epochs:  # a broker forgot us and re-dispatched what we held from it
                    self._held = current_inputs(self._held, epochs)
                if self._held and may_start(lane, self._started):
                    break
                self._changed.wait(SIGNAL_CHECK_S)  # lane 0 is the main thread: see SIGNAL_CHECK_S
            held = self._held
            running = take_pass(held, self._limits, self._padded)
            now = self._clock()
            if lane:
                self._shared_at = now
            # Alone: no other lane busy, none left for one to start beside it, and none started of
            # late. A 2-thread pass keeps both cores busy (OpenMP spins between its regions), so
            # under a steady load a lone pass in lane 0 would slow the lane that starts beside it.
            alone = not self._started and not held and now - self._shared_at > SHARED_MEMORY_S
            self._started[lane] = now
            self._state.busy_since = min(self._started.values())
            if lane == 0 and held:
                self._changed.notify_all()  # the other lanes may take the rest
        if logger.isEnabledFor(logging.DEBUG):
            request_ids = _pass_request_ids(running)
            logger.debug("pass of %d inputs (%d still held) of requests %s", len(running), len(held), request_ids,
                         extra={"request_id": request_ids})
        return running, alone


def _push(results: zmq.Socket, batch: WorkBatch, result: protocol.BatchResult) -> None:
    """A batch's result, whole or partial, to the I/O thread, tagged with how many inputs it answers."""
    send_frames(results, [batch.tag(len(result.outputs)), *protocol.encode(result)], dontwait=False)


def _dropped(inputs: int) -> None:
    logger.warning("the answers of %d inputs were dropped: the I/O thread took none for %d s (it has stopped)",
                   inputs, RESULT_SEND_TIMEOUT_MS // 1000)


def _prepare(model: Manager, batch: WorkBatch, results: zmq.Socket, clock: Callable[[], float]) -> list[_Held]:
    """prepare() a batch as it arrives; inputs that fail now are answered now."""
    started_at = clock()
    positions = [i for i in range(len(batch.inputs)) if i not in batch.errors]
    kept: list[_Held] = []
    prepared: list = []
    if positions:
        try:
            prepared = model.prepare([batch.inputs[i] for i in positions])
            if len(prepared) != len(positions):
                raise RuntimeError(f"prepare() returned {len(prepared)} values for {len(positions)} inputs")
            kept = [_Held(batch, i, value, max(0, int(model.cost(value)))) for i, value in held_inputs(batch, prepared)]
        except Exception as error:
            logger.exception("prepare() failed for batch %d (requests %s)", batch.batch_id, _request_ids(batch))
            message = f"model failed to prepare the input: {type(error).__name__}: {error}"[:1000]
            prepared = [FailedInput(ErrorCode.MODEL_ERROR, message)] * len(positions)  # each input answered once
            kept = []
    if batch.traces and kept:
        _hold_spans(batch, kept)
    if batch.timed:
        batch.prepare_ms = (clock() - started_at) * 1000
    result = prepare_result(batch, prepared, (clock() - started_at) * 1000)
    if result is not None:
        _push(results, batch, result)
    return kept


def _run_pass(model: Manager, running: list[_Held]) -> list:
    """One output (or Exception) per input of the pass; a pass that raises fails each input, as
    PASS_FAILED when it had company (any of them may be the culprit)."""
    try:
        return list(_predict(model, [h.prepared for h in running]))
    except Exception as error:
        requests = _pass_request_ids(running)
        logger.exception("pass of %d inputs failed (requests %s)", len(running), requests,
                         extra={"request_id": requests})
        return failed_pass(error, len(running))


def _predict(model: Manager, inputs: list) -> list:
    """model.predict(), held to its contract: one output per input, each fitting the declared
    outputs (one that does not is that input's MODEL_ERROR, naming the tensor)."""
    produced = model.predict(inputs)
    if len(produced) != len(inputs):
        raise WrongOutputCount(f"predict() returned {len(produced)} outputs for {len(inputs)} inputs")
    declared = _declared_outputs(model)
    if declared:
        produced = [output if isinstance(output, Exception) or (problem := check_output(declared, output)) is None
                    else OutputMismatch(problem) for output in produced]
    return produced


class OutputMismatch(RuntimeError):
    """An output that does not fit the declared outputs (answered MODEL_ERROR)."""


_declared: dict[int, tuple[Manager, list]] = {}  # id(model) -> (model, its declared outputs)


def _declared_outputs(model: Manager) -> list:
    """The outputs the model's metadata() declares, to check (ddml_common/tensors.checked_outputs), read once."""
    known = _declared.get(id(model))
    if known is None or known[0] is not model:
        try:
            declared = checked_outputs(model.metadata())
        except Exception:  # a handler's metadata() that fails declares nothing to check
            logger.exception("metadata() of model %s failed: its outputs are not checked", type(model).__name__)
            declared = []
        known = _declared[id(model)] = (model, declared)
    return known[1]


def _answer(running: list[_Held], outcome: list, compute_s: float, results: zmq.Socket) -> None:
    """One partial BATCH_RESULT per batch that the pass touched, in the order they were held."""
    for batch, result in pass_results(running, outcome, compute_s * 1000):
        _push(results, batch, result)


def run_batch(model: Manager, batch: WorkBatch, clock: Callable[[], float] = time.monotonic) -> protocol.BatchResult:
    """Run one batch. A failure becomes errors in the result: one per input, or for the whole batch."""
    started_at = clock()
    if logger.isEnabledFor(logging.DEBUG):
        request_ids = _request_ids(batch)
        logger.debug("batch %d: %d inputs of requests %s", batch.batch_id, len(batch.inputs), request_ids,
                     extra={"batch_id": batch.batch_id, "request_id": request_ids})
    positions = [i for i in range(len(batch.inputs)) if i not in batch.errors]
    produced: list | Exception = []
    if positions:
        try:
            batch.forward_ns = time.time_ns()
            produced = _predict(model, [batch.inputs[i] for i in positions])
        except Exception as error:
            request_ids = _request_ids(batch)
            logger.exception("batch %d of %d inputs failed (requests %s)", batch.batch_id, len(positions), request_ids,
                             extra={"batch_id": batch.batch_id, "request_id": request_ids})
            produced = error
    return batch_result(batch, produced, (clock() - started_at) * 1000)


def _hold_spans(batch: WorkBatch, kept: list[_Held]) -> None:
    """A continuous worker's spans for a traced batch's requests (nothing without --otlp-endpoint)."""
    if tracing.tracer() is None:
        return
    held = Counter(batch.request_ids[h.position] for h in kept if h.position < len(batch.request_ids))
    spans = tracing.HeldSpans(batch.batch_id, batch.traces, batch.received_ns or time.time_ns(), held)
    batch.spans = spans if spans else None


def _passed_spans(traced: list[_Held], forward_ns: tuple[int, int], size: int) -> None:
    """After a pass, under the pool's lock: each traced batch's forward spans, and its ended requests."""
    by_batch: dict[int, tuple[WorkBatch, Counter]] = {}
    for held in traced:
        batch = held.batch
        by_batch.setdefault(id(batch), (batch, Counter()))[1][batch.request_ids[held.position]] += 1
    for batch, answered in by_batch.values():
        batch.spans.passed(answered, forward_ns, size)
        if not batch.spans:
            batch.spans = None  # every traced request of it has ended


def _trace(batch: WorkBatch, started_at: float, ended_at: float) -> None:
    """Spans of a batch that serves traced requests (ddml_common/tracing.py; nothing without --otlp-endpoint)."""
    ended_ns = time.time_ns()
    started_ns = ended_ns - int((ended_at - started_at) * 1e9)
    tracing.worker_batch_spans(batch.batch_id, batch.traces, batch.received_ns or started_ns, started_ns,
                               (batch.forward_ns or started_ns, ended_ns), ended_ns, len(batch.inputs))


def _request_ids(batch: WorkBatch) -> str:
    """The requests a batch serves, each once, in batch order: what its log lines carry."""
    return ",".join(dict.fromkeys(batch.request_ids))


def _pass_request_ids(running: list[_Held]) -> str:
    """The requests a pass serves, each once, in pass order: what its log lines carry."""
    return ",".join(dict.fromkeys(h.batch.request_ids[h.position] for h in running))
