"""run_batch(): every failure becomes errors in the result; the worker never raises."""

import numpy as np

from ddml_common import protocol
from worker.connection import WorkBatch
from worker.link import INLINE_AFTER_BATCHES, INLINE_BELOW_S, ComputeState
from worker.loop import run_batch, run_counted
from worker.models import InputError, Manager
from worker.models.echo import EchoModel


class WrongLength(Manager):
    def predict(self, batch):
        return batch[:-1]


class ArrayModel(Manager):
    def predict(self, batch):
        return [np.full(3, x, dtype=np.float32) if x != "obj" else object() for x in batch]


def errors(result):
    return {index: code for index, code, _ in result.errors}


def test_echo_batch_returns_each_input():
    result = run_batch(EchoModel(test_directives=True), WorkBatch(1, ["a", {"b": 1}, 3]))
    assert [protocol.decode_value(x) for x in result.outputs] == ["a", {"b": 1}, 3]
    assert result.errors == [] and result.batch_id == 1


def test_model_that_raises_fails_every_input_of_the_batch():
    result = run_batch(EchoModel(test_directives=True), WorkBatch(2, ["a", {"raise": "boom"}]))
    assert errors(result) == {0: "MODEL_ERROR", 1: "MODEL_ERROR"}
    assert "boom" in result.errors[0][2]


def test_input_error_fails_only_that_input_as_bad_request():
    result = run_batch(EchoModel(test_directives=True), WorkBatch(3, ["a", {"invalid": "no"}, "c"]))
    assert errors(result) == {1: "BAD_REQUEST"}
    assert protocol.decode_value(result.outputs[2]) == "c"


def test_inputs_that_failed_to_decode_are_bad_requests_and_skip_the_model():
    result = run_batch(EchoModel(test_directives=True), WorkBatch(4, [None, "b"], errors={0: "garbage"}))
    assert errors(result) == {0: "BAD_REQUEST"}
    assert protocol.decode_value(result.outputs[1]) == "b"


def test_wrong_number_of_outputs_fails_the_whole_batch_never_to_run_again():
    result = run_batch(WrongLength(), WorkBatch(5, ["a", "b"]))
    assert errors(result) == {0: "BATCH_FAILED", 1: "BATCH_FAILED"}  # the broker answers MODEL_ERROR, no rerun
    assert "returned 1 outputs for 2 inputs" in result.errors[0][2]


def test_outputs_that_cannot_travel_fail_alone_and_arrays_travel_raw():
    result = run_batch(ArrayModel(), WorkBatch(6, [1.0, "obj"]))
    assert errors(result) == {1: "MODEL_ERROR"}
    np.testing.assert_array_equal(protocol.decode_value(result.outputs[0]), np.ones(3, np.float32))


def test_manager_keeps_the_seed_gpu_id():
    assert Manager(device="cuda:1").gpu_id == 1 and Manager().gpu_id is None
    assert isinstance(InputError("x"), ValueError)


def test_handler_figures_the_broker_would_refuse_are_left_out_and_the_heartbeat_still_goes():
    import queue

    import zmq

    from worker.config import WorkerConfig
    from worker.connection import BrokerConnection, ComputeState

    def connection(describe):
        return BrokerConnection(WorkerConfig(), zmq.Context.instance(), protocol.Ready(["m"], 4), queue.Queue(),
                                "inproc://unused", ComputeState(), describe)

    good = connection(lambda: {"cache_hits": 3})._figures()
    assert good["cache_hits"] == 3 and good["batches"] == 0
    bad = connection(lambda: {"batches": "many", "nested": {"too": {"deep": 1}}})._figures()
    assert bad["batches"] == 0 and "nested" not in bad, "the worker's own figures still go"
    protocol.decode(protocol.encode(protocol.Heartbeat(stats=bad)))  # and the broker takes them


class SteppingClock:
    """Each call is `step_s` later than the one before."""

    def __init__(self, step_s: float):
        self.now, self.step_s = 100.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_run_counted_counts_each_batch_and_only_a_streak_of_short_ones_lets_the_io_thread_run_the_next():
    state, model = ComputeState(), EchoModel()
    short, long = SteppingClock(INLINE_BELOW_S / 10), SteppingClock(INLINE_BELOW_S)
    for n in range(INLINE_AFTER_BATCHES - 1):
        run_counted(model, WorkBatch(n, ["a", "b"]), state, short)
        assert not state.batches_are_short
    result = run_counted(model, WorkBatch(99, ["c"]), state, short)
    assert [protocol.decode_value(x) for x in result.outputs] == ["c"]
    assert state.batches_are_short and state.busy_since is None
    assert state.batches == INLINE_AFTER_BATCHES and state.items == 2 * (INLINE_AFTER_BATCHES - 1) + 1

    run_counted(model, WorkBatch(100, ["d"]), state, long)  # one long batch: the compute thread again
    assert not state.batches_are_short and state.short_streak == 0
    assert state.figures()["batches"] == INLINE_AFTER_BATCHES + 1


def test_run_counted_keeps_busy_since_while_the_model_runs_and_clears_it_after_a_failure():
    state = ComputeState()
    seen = []

    class Watched(Manager):
        def predict(self, batch):
            seen.append(state.busy_since)
            raise RuntimeError("boom")

    result = run_counted(Watched(), WorkBatch(1, ["a"]), state, SteppingClock(0.001))
    assert seen[0] is not None and state.busy_since is None
    assert errors(result) == {0: "MODEL_ERROR"} and state.batches == 1


def test_batches_held_back_while_the_io_thread_computes_are_dropped_with_their_forgotten_broker():
    import queue

    import zmq

    from worker.config import WorkerConfig
    from worker.connection import BrokerConnection
    from worker.link import Forget

    inbox = queue.Queue()
    connection = BrokerConnection(WorkerConfig(broker="tcp://127.0.0.1:1,tcp://127.0.0.1:2"), zmq.Context.instance(),
                                  protocol.Ready(["m"], 4), inbox, "inproc://unused", ComputeState(),
                                  inline=lambda batch: None)
    connection._deferred = [WorkBatch(1, ["a"], link=0), WorkBatch(2, ["b"], link=1), WorkBatch(3, ["c"], link=0)]
    inbox.put(WorkBatch(4, ["d"], link=0))

    dropped = connection._forget(Forget(link=0, epoch=1, reconnect=False))
    assert sorted(dropped) == [(0, 1), (0, 3), (0, 4)]
    assert [batch.batch_id for batch in connection._deferred] == [2], "the other broker's batch still runs"
    assert inbox.empty()
