"""run_continuous(): the worker's continuous-batching loop, with a real inproc socket and an echo model.

It must answer every input exactly once, in passes it forms itself (never more than most_inputs),
each batch's inputs as their pass ends; tell a pass that failed as a whole (PASS_FAILED) from an
input's own failure; and drop what a broker that forgot the worker had sent."""

from __future__ import annotations

import queue
import threading
import time
import uuid

import pytest
import zmq

from ddml_common import protocol
from worker.connection import ComputeState, WorkBatch
from worker.loop import SHARED_MEMORY_S, run_continuous
from worker.models import InputError, Manager
from worker.models.echo import EchoModel


class Recording(EchoModel):
    """Echo that records each pass, and can be held at the start of the first until released."""

    def __init__(self):
        super().__init__(test_directives=True)
        self.passes: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()  # a pass has begun

    def predict(self, batch):
        self.started.set()
        self.release.wait(10)
        self.passes.append(list(batch))
        return super().predict(batch)


class Gated(EchoModel):
    """Echo whose first pass waits until released; records which thread ran each pass, and how
    many passes ran at once."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.first = threading.Event()
        self.passes: list[tuple[str, list]] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def predict(self, batch):
        with self._lock:
            first = not self.passes
            self.passes.append((threading.current_thread().name, list(batch)))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        if first:
            self.first.set()
            self.release.wait(10)
        try:
            return super().predict(batch)
        finally:
            with self._lock:
                self.running -= 1


class Lengths(Recording):
    def cost(self, prepared):
        return len(prepared)


@pytest.fixture
def loop():
    context = zmq.Context.instance()
    endpoint = f"inproc://continuous-{uuid.uuid4().hex}"  # a closed one is freed late
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    push = context.socket(zmq.PUSH)
    push.connect(endpoint)
    inbox: queue.Queue = queue.Queue()
    state = ComputeState()
    threads = []

    raised: list[BaseException] = []

    def run(*args, **kwargs):
        try:
            run_continuous(*args, **kwargs)
        except BaseException as error:
            raised.append(error)

    def start(model: Manager, most_inputs: int, budget: int = 0, **lanes):
        thread = threading.Thread(target=run, args=(model, inbox, push, state, most_inputs, budget),
                                  kwargs=lanes, name="lane-0", daemon=True)
        thread.start()
        threads.append(thread)

    def results(count_inputs: int, timeout_s: float = 10.0) -> list[tuple[bytes, protocol.BatchResult]]:
        got, answered = [], 0
        while answered < count_inputs:
            assert pull.poll(int(timeout_s * 1000)), f"only {answered} of {count_inputs} inputs answered"
            tag, frame = pull.recv_multipart()
            result = protocol.decode([frame])
            got.append((tag, result))
            answered += len(result.indices)
        return got

    start.raised = raised
    yield start, inbox, state, results
    inbox.put(None)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert not raised or getattr(start, "expect_raise", False), raised
    push.close(0)
    pull.close(0)


def outcome(results) -> dict[tuple[int, int], object]:
    """(batch id, position) -> the output value, or the error code."""
    found = {}
    for _, result in results:
        errors = {error.index: error.code for error in result.errors}
        for k, position in enumerate(result.indices):
            key = (result.batch_id, position)
            assert key not in found, f"{key} answered twice"
            found[key] = errors[k] if k in errors else protocol.decode_value(result.outputs[k])
    return found


def test_every_input_is_answered_once_in_passes_no_larger_than_allowed(loop):
    start, inbox, state, results = loop
    model = Recording()
    model.release.clear()  # hold the first pass, so that the rest arrive and wait
    start(model, most_inputs=3)
    inbox.put(WorkBatch(1, ["a0"], request_ids=["a"]))
    assert model.started.wait(10)
    inbox.put(WorkBatch(2, ["b0", "b1", "b2", "b3"], request_ids=["b"] * 4))
    inbox.put(WorkBatch(3, ["c0", "c1"], request_ids=["c"] * 2))
    model.release.set()
    got = results(7)
    assert outcome(got) == {(1, 0): "a0", (2, 0): "b0", (2, 1): "b1", (2, 2): "b2", (2, 3): "b3",
                            (3, 0): "c0", (3, 1): "c1"}
    assert all(len(p) <= 3 for p in model.passes) and sum(map(len, model.passes)) == 7
    assert all(tag.count(b":") == 3 and int(tag.split(b":")[2]) == len(r.indices) for tag, r in got)
    assert state.batches == len(model.passes) and state.items == 7


def test_a_pass_that_raises_answers_pass_failed_with_company_and_model_error_alone(loop):
    start, inbox, state, results = loop
    start(Recording(), most_inputs=4)
    inbox.put(WorkBatch(1, ["x", {"raise": "boom"}, "y"], request_ids=["r"] * 3))
    assert set(outcome(results(3)).values()) == {"PASS_FAILED"}
    inbox.put(WorkBatch(2, [{"raise": "boom"}], request_ids=["p"]))
    assert outcome(results(1)) == {(2, 0): "MODEL_ERROR"}


def test_an_input_that_did_not_decode_or_prepare_is_answered_at_once_and_alone(loop):
    start, inbox, state, results = loop
    start(Recording(), most_inputs=4)
    inbox.put(WorkBatch(1, [None, "ok", {"invalid": "no"}], errors={0: "garbage"}, request_ids=["r"] * 3))
    assert outcome(results(3)) == {(1, 0): "BAD_REQUEST", (1, 1): "ok", (1, 2): "BAD_REQUEST"}


def test_inputs_of_a_broker_that_forgot_us_are_dropped_unstarted(loop):
    start, inbox, state, results = loop
    model = Recording()
    model.release.clear()
    start(model, most_inputs=1)
    inbox.put(WorkBatch(1, ["first"], request_ids=["a"]))  # its pass starts, and is held
    assert model.started.wait(10)
    inbox.put(WorkBatch(2, ["stale0", "stale1"], request_ids=["b", "b"], link=0, epoch=0))
    inbox.put(WorkBatch(3, ["other-broker"], request_ids=["c"], link=1, epoch=0))
    state.link_epochs[0] = 1  # the I/O thread: broker 0 forgot us and re-dispatched what we held
    inbox.put(WorkBatch(4, ["fresh"], request_ids=["d"], link=0, epoch=1))
    model.release.set()
    got = outcome(results(3))
    assert set(got.values()) == {"first", "other-broker", "fresh"}
    assert ["stale0"] not in model.passes and ["stale1"] not in model.passes


def test_passes_group_inputs_of_similar_cost_from_all_that_is_held(loop):
    start, inbox, state, results = loop
    model = Lengths()
    model.release.clear()
    start(model, most_inputs=2)
    inbox.put(WorkBatch(1, ["x" * 50], request_ids=["warm"]))
    assert model.started.wait(10)
    inbox.put(WorkBatch(2, ["a" * 30, "b" * 2, "c" * 31, "d" * 3], request_ids=list("abcd")))
    model.release.set()
    results(5)
    lengths = [sorted(len(text) for text in p) for p in model.passes]
    assert lengths[0] == [50] and sorted(lengths[1:]) == [[2, 3], [30, 31]]


def test_a_model_that_pads_nothing_gets_its_inputs_oldest_first_within_a_sum_of_costs(loop):
    start, inbox, state, results = loop
    model = Lengths()
    model.padded = False
    model.release.clear()
    start(model, most_inputs=3, budget=40)
    inbox.put(WorkBatch(1, ["x" * 50], request_ids=["warm"]))
    assert model.started.wait(10)
    inbox.put(WorkBatch(2, ["a" * 30, "b" * 2, "c" * 31, "d" * 3, "e" * 4], request_ids=list("abcde")))
    model.release.set()
    results(6)
    # Padded, these would go [2, 3, 4] and [30, 31]; with no padding, arrival order, within 40 in all.
    assert [[len(text) for text in p] for p in model.passes] == [[50], [30, 2], [31, 3, 4]]


def test_an_input_that_arrives_during_a_pass_starts_at_once_in_another_lane(loop):
    start, inbox, state, results = loop
    model = Gated()
    set_to: list[tuple[str, int]] = []
    start(model, most_inputs=4, lanes=2, threads=4,
          set_threads=lambda n: set_to.append((threading.current_thread().name, n)))
    inbox.put(WorkBatch(1, ["slow"], request_ids=["a"]))
    assert model.first.wait(10)
    inbox.put(WorkBatch(2, ["quick"], request_ids=["b"]))
    assert outcome(results(1, timeout_s=10)) == {(2, 0): "quick"}  # while the first pass still runs
    model.release.set()
    assert outcome(results(1)) == {(1, 0): "slow"}
    assert [name for name, _ in model.passes] == ["lane-0", "compute-lane-1"] and model.most_running == 2
    # Lane 0 began alone, with every thread; lane 1 runs beside it, with its share.
    assert set_to == [("lane-0", 4), ("compute-lane-1", 2)]


def test_lane_0_runs_every_pass_while_it_keeps_up(loop):
    start, inbox, state, results = loop
    model = Gated()
    model.release.set()
    start(model, most_inputs=4, lanes=2)
    for k in range(5):  # one at a time: each arrives when lane 0 is idle
        inbox.put(WorkBatch(k, [f"x{k}"], request_ids=[f"r{k}"]))
        assert outcome(results(1)) == {(k, 0): f"x{k}"}
    assert {name for name, _ in model.passes} == {"lane-0"} and model.most_running == 1


@pytest.mark.parametrize("lanes", [2, 3])
def test_with_several_lanes_every_input_is_answered_once(loop, lanes):
    start, inbox, state, results = loop
    model = Gated()
    model.release.set()
    start(model, most_inputs=3, lanes=lanes)
    expected = {}
    for k in range(40):
        inputs = [f"{k}-{i}" for i in range(k % 5 + 1)]
        inbox.put(WorkBatch(k, inputs, request_ids=[str(k)] * len(inputs)))
        expected.update({(k, i): value for i, value in enumerate(inputs)})
    assert outcome(results(len(expected))) == expected
    assert state.items == len(expected) and state.busy_since is None


class CostFails(Recording):
    def prepare(self, batch):
        return [InputError("refused") if value == "bad" else value for value in batch]

    def cost(self, prepared):
        raise RuntimeError("no cost")


def test_a_prepare_that_fails_after_refusing_an_input_answers_each_input_once(loop):
    start, inbox, state, results = loop
    start(CostFails(), most_inputs=4)
    inbox.put(WorkBatch(1, ["bad", "ok", "garbage"], errors={2: "undecodable"}, request_ids=["r"] * 3))
    assert outcome(results(3)) == {(1, 0): "MODEL_ERROR", (1, 1): "MODEL_ERROR", (1, 2): "BAD_REQUEST"}


def test_a_compute_lane_that_dies_ends_the_loop_with_its_error_and_clears_the_watchdog(loop):
    start, inbox, state, results = loop
    model = Gated()

    died = threading.Event()

    def set_threads(count):
        if threading.current_thread().name == "compute-lane-1":
            died.set()
            raise MemoryError("lane 1 cannot start")

    start.expect_raise = True
    start(model, most_inputs=4, lanes=2, threads=2, set_threads=set_threads)
    inbox.put(WorkBatch(1, ["slow"], request_ids=["a"]))
    assert model.first.wait(10)
    inbox.put(WorkBatch(2, ["lost"], request_ids=["b"]))  # lane 1 takes it, and dies
    assert died.wait(10)
    model.release.set()
    assert outcome(results(1)) == {(1, 0): "slow"}  # lane 0 ends its pass, then the loop
    deadline = time.monotonic() + 10
    while not start.raised and time.monotonic() < deadline:
        time.sleep(0.01)
    assert start.raised and isinstance(start.raised[0].__cause__, MemoryError)
    assert state.busy_since is None


def test_after_another_lane_ran_lane_0_keeps_its_share_of_threads_for_a_while(loop):
    start, inbox, state, results = loop
    model = Gated()
    now = [100.0]
    set_to: list[tuple[str, int]] = []
    start(model, most_inputs=4, lanes=2, threads=4, clock=lambda: now[0],
          set_threads=lambda n: set_to.append((threading.current_thread().name, n)))
    inbox.put(WorkBatch(1, ["slow"], request_ids=["a"]))
    assert model.first.wait(10)
    inbox.put(WorkBatch(2, ["beside"], request_ids=["b"]))
    results(1)
    model.release.set()
    results(1)
    now[0] += SHARED_MEMORY_S / 2  # a lone pass soon after: lane 0 leaves the other lane's share idle
    inbox.put(WorkBatch(3, ["soon"], request_ids=["c"]))
    results(1)
    now[0] += SHARED_MEMORY_S * 2  # long after: every thread again
    inbox.put(WorkBatch(4, ["later"], request_ids=["d"]))
    results(1)
    assert set_to == [("lane-0", 4), ("compute-lane-1", 2), ("lane-0", 2), ("lane-0", 4)]
