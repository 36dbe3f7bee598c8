"""Outputs checked at the worker against the declared outputs, and a predict() that breaks its
contract for the whole batch: answered MODEL_ERROR, counted, never re-run input by input."""

from __future__ import annotations

import numpy as np

from broker.core import BrokerCore, Peer
from ddml_common import protocol
from ddml_common.tensors import TensorSpec, metadata
from tests.unit.test_core import CONFIG, Wire, frames, request, step
from worker.connection import WorkBatch
from worker.loop import _run_pass, run_batch
from worker.models import Manager
from worker.results import pass_results


class Classifier(Manager):
    """Declares CLASSES INT64 [-1,5] and PROBABILITIES FP32 [-1,5]; returns what it is told to."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def metadata(self):
        return metadata([TensorSpec("IMAGE", "FP32", (4,))],
                        [TensorSpec("CLASSES", "INT64", (5,), "classes"),
                         TensorSpec("PROBABILITIES", "FP32", (5,), "probabilities")], "python")

    def predict(self, batch):
        return self.make(batch)


def good(batch):
    return [{"classes": np.arange(5), "probabilities": np.full(5, 0.2, np.float32)} for _ in batch]


def codes(result):
    return {index: code for index, code, _ in (e.to_wire() if hasattr(e, "to_wire") else e for e in result.errors)}


def test_outputs_that_fit_the_declaration_pass():
    result = run_batch(Classifier(good), WorkBatch(1, [np.zeros(4, np.float32)] * 2))
    assert result.errors == []
    assert protocol.decode_value(result.outputs[0])["classes"].dtype == np.int64


def test_a_float_output_declared_int_is_a_model_error_naming_the_tensor_never_a_cast():
    def logits(batch):  # 1,000 float logits where CLASSES INT64 [5] is declared
        return [{"classes": np.zeros(1000, np.float32), "probabilities": np.zeros(5, np.float32)} for _ in batch]

    result = run_batch(Classifier(logits), WorkBatch(2, [np.zeros(4, np.float32)] * 2))
    assert codes(result) == {0: "MODEL_ERROR", 1: "MODEL_ERROR"}
    assert "CLASSES expects INT64 [5], got FP32 [1000]" in result.errors[0][2]


def test_one_bad_output_fails_only_its_input():
    def second_wrong(batch):
        outputs = good(batch)
        outputs[1] = {"classes": np.arange(5), "probabilities": np.zeros(5, np.float64)}
        return outputs

    result = run_batch(Classifier(second_wrong), WorkBatch(3, [np.zeros(4, np.float32)] * 3))
    assert codes(result) == {1: "MODEL_ERROR"}
    assert "PROBABILITIES expects FP32 [5], got FP64 [5]" in result.errors[0][2]
    missing = run_batch(Classifier(lambda b: [{"classes": np.arange(5)} for _ in b]), WorkBatch(4, [0]))
    assert "field 'probabilities', which the output lacks" in missing.errors[0][2]


def test_a_free_form_model_is_not_checked():
    class FreeForm(Manager):
        def predict(self, batch):
            return [np.zeros(7, np.float64) for _ in batch]

    assert run_batch(FreeForm(), WorkBatch(5, [1, 2])).errors == []


def test_a_pass_with_the_wrong_number_of_outputs_is_batch_failed_not_pass_failed():
    class Held:
        def __init__(self, batch, position):
            self.batch, self.position, self.prepared = batch, position, "x"

    batch = WorkBatch(6, ["a", "b"], request_ids=["r1", "r1"])
    running = [Held(batch, 0), Held(batch, 1)]
    outcome = _run_pass(Classifier(lambda b: b[:1]), running)
    [(_, result)] = pass_results(running, outcome, 1.0)
    assert codes(result) == {0: "BATCH_FAILED", 1: "BATCH_FAILED"}
    assert "returned 1 outputs for 2 inputs" in result.errors[0][2]


def dispatched_two() -> tuple[BrokerCore, Wire, protocol.Batch]:
    """A core that has sent worker w1 a batch of a request's two inputs."""
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", request("r", count=2), 0.0)
    step(core, wire, 0.0)
    [batch] = wire.take(b"w1", protocol.Batch)
    return core, wire, batch


def test_broker_answers_a_batch_failed_batch_model_error_counts_it_and_runs_nothing_again():
    core, wire, batch = dispatched_two()
    run = run_batch(Classifier(lambda b: b[:1]), WorkBatch(batch.batch_id, ["a", "b"]))
    core.on_frames(Peer.WORKER, b"w1", frames(run), 0.1)
    step(core, wire, 0.1)
    [reply] = wire.take(b"gw", protocol.Reply)
    assert reply.error_code == "MODEL_ERROR" and "returned 1 outputs for 2 inputs" in reply.error_message
    assert wire.take(b"w1", protocol.Batch) == [], "never re-run input by input"
    assert core.stats["batches_failed_whole"] == 1


def test_before_this_change_a_whole_batch_model_error_was_rerun_alone():
    """The contrast that shows the test above can fail: MODEL_ERROR for all inputs is re-run alone."""
    core, wire, batch = dispatched_two()
    failed = protocol.BatchResult.failed(batch.batch_id, 2, protocol.ErrorCode.MODEL_ERROR, "raised")
    core.on_frames(Peer.WORKER, b"w1", frames(failed), 0.1)
    step(core, wire, 0.1)
    assert wire.take(b"gw", protocol.Reply) == [] and len(wire.take(b"w1", protocol.Batch)) == 1
