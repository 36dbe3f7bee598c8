"""The seed's in-process API: Dispatcher(model_cls, batch_size, worker_num, cuda_devices)."""

import pytest

from gateway import Dispatcher
from tests.handlers import ReverseModel

pytestmark = pytest.mark.e2e


def test_dispatcher_predicts_in_order_across_spawned_workers_on_cpu_without_cuda():
    texts = [f"text number {i}" for i in range(300)]
    with Dispatcher(ReverseModel, batch_size=16, max_latency=0.0, worker_num=2, cuda_devices=(0,)) as dispatcher:
        outputs = dispatcher.predict(texts)
        futures = [dispatcher.submit([t]) for t in texts[:50]]
        single = [f.result(timeout=30)[0] for f in futures]
    assert [o["reversed"] for o in outputs] == [t[::-1] for t in texts]
    assert [o["reversed"] for o in single] == [t[::-1] for t in texts[:50]]
    assert {o["device"] for o in outputs} == {"cpu"}  # no CUDA here: the CPU, as documented
    assert len({o["pid"] for o in outputs}) == 2, "both worker processes should serve"
    assert max(o["batch"] for o in outputs) <= 16
