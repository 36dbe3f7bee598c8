"""A continuous worker reports how long prepare() took for a batch whose requests asked for their timings
(Batch.timed), in each of that batch's results (BatchResult.prepare_ms), and nothing for other batches."""

from __future__ import annotations

from worker.connection import WorkBatch
from worker.models.echo import EchoModel
from tests.unit.test_worker_continuous import loop, outcome  # noqa: F401 (loop is a fixture)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SlowPrepare(EchoModel):
    """Echo whose prepare() takes 250 ms of the injected clock per batch."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock

    def prepare(self, batch: list) -> list:
        self.clock.now += 0.25
        return list(batch)


def test_a_timed_batchs_results_carry_its_prepare_ms_and_an_untimed_ones_none(loop):
    start, inbox, _, results = loop
    clock = Clock()
    start(SlowPrepare(clock), most_inputs=1, clock=clock)  # passes of one input: two results for batch 1
    inbox.put(WorkBatch(1, ["a0", "a1"], request_ids=["a", "a"], timed=True))
    inbox.put(WorkBatch(2, ["b0"], request_ids=["b"]))
    got = results(3)
    assert outcome(got) == {(1, 0): "a0", (1, 1): "a1", (2, 0): "b0"}
    prepared = sorted((result.batch_id, result.prepare_ms) for _, result in got)
    assert prepared == [(1, 250.0), (1, 250.0), (2, 0.0)]
