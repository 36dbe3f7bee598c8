"""run_continuous(): the worker's continuous-batching loop, with a real inproc socket and an echo model.

It must answer every input exactly once, in passes it forms itself (never more than most_inputs),
each batch's inputs as their pass ends; tell a pass that failed as a whole (PASS_FAILED) from an
input's own failure; and drop what a broker that forgot the worker had sent."""

from __future__ import annotations

import queue
import threading

import pytest
import zmq

from ddml_common import protocol
from worker.connection import ComputeState, WorkBatch
from worker.loop import run_continuous
from worker.models import Manager
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


class Lengths(Recording):
    def cost(self, prepared):
        return len(prepared)


@pytest.fixture
def loop():
    context = zmq.Context.instance()
    endpoint = f"inproc://continuous-{id(object())}"
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    push = context.socket(zmq.PUSH)
    push.connect(endpoint)
    inbox: queue.Queue = queue.Queue()
    state = ComputeState()
    threads = []

    def start(model: Manager, most_inputs: int, budget: int = 0):
        thread = threading.Thread(target=run_continuous, args=(model, inbox, push, state, most_inputs, budget),
                                  daemon=True)
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

    yield start, inbox, state, results
    inbox.put(None)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    push.close(0)
    pull.close(0)


def outcome(results) -> dict[tuple[int, int], object]:
    """(batch id, position) -> the output value, or the error code."""
    found = {}
    for _, result in results:
        errors = {k: code for k, code, _ in result.errors}
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
