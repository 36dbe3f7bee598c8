"""The seed API with several models (issue #24): Dispatcher({name: Manager class, ...}) shares its
workers among the models by demand, through real pool worker processes and the broker's placement."""

import multiprocessing
import os
import threading
import time

import pytest

from gateway import Dispatcher, ModelSpec
from tests.handlers import ReverseModel, UpperModel
from tests.processes import wait_until

pytestmark = pytest.mark.e2e


def pool_counts(dispatcher: Dispatcher) -> dict:
    workers = [w for w in dispatcher.status()["workers"] if "pool" in w]
    return {name: sum(w["stats"].get(name, 0) for w in workers) for name in ("pool_loads", "pool_evictions")}


def check(model: str, texts: list, outputs: list) -> set:
    """Each output is `model`'s answer to its text, in order; returns the processes that computed them."""
    if model == "reverse":
        assert [o["reversed"] for o in outputs] == [t[::-1] for t in texts]
    else:
        assert [o["upper"] for o in outputs] == [t.upper() for t in texts]
    return {o["pid"] for o in outputs}


def test_one_worker_of_one_model_serves_demand_on_one_model_then_the_other_then_both():
    texts = [f"text number {i}" for i in range(40)]
    with Dispatcher({"reverse": ReverseModel, "upper": UpperModel}, batch_size=16, worker_num=1, cuda_devices=(0,),
                    max_models_per_worker=1, request_timeout_s=60) as dispatcher:
        assert dispatcher.models == ["reverse", "upper"]
        phases = []
        for model in ("reverse", "upper", "reverse"):  # each a cold start that evicts the other
            started_at = time.monotonic()
            pids = check(model, texts, dispatcher.predict(texts, model=model))
            phases.append((model, time.monotonic() - started_at))
        started_at = time.monotonic()
        futures = [(m, n, dispatcher.submit([texts[n]], model=m)) for n in range(len(texts)) for m in ("reverse", "upper")]
        for model, n, future in futures:  # both at once, on one worker of one model: they take turns
            pids |= check(model, [texts[n]], future.result(timeout=90))
        phases.append(("both", time.monotonic() - started_at))
        counts = pool_counts(dispatcher)
        status = dispatcher.status()
        with pytest.raises(ValueError, match="several models"):
            dispatcher.predict(texts)
        with pytest.raises(ValueError, match="no model 'other'"):
            dispatcher.predict(texts, model="other")
    print("\n" + ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in phases) + f"; {counts}")
    assert len(pids) == 1, "one worker process served both models"
    assert counts["pool_loads"] >= 4 and counts["pool_evictions"] >= 3, counts  # r, u, r, then u again at least
    assert all(len(w["models"]) <= 1 for w in status["workers"]), status["workers"]  # max_models_per_worker=1


def test_models_with_their_own_options_and_a_kept_replica_share_two_workers():
    with Dispatcher({"reverse": ModelSpec(ReverseModel, min_replicas=1),
                     "upper": ModelSpec(UpperModel, options={"own": 1, "shared": "mine"})},
                    batch_size=8, worker_num=2, request_timeout_s=60, shared="all") as dispatcher:
        held = {m for w in dispatcher.status()["workers"] for m in w["models"]}
        assert held == {"reverse"}, "min_replicas=1 is loaded before the constructor returns; upper waits for demand"
        texts = [f"{i} of many" for i in range(200)]
        futures = {m: dispatcher.submit(texts, model=m) for m in ("reverse", "upper")}
        assert max(o["batch"] for o in futures["reverse"].result(timeout=60)) <= 8
        upper = futures["upper"].result(timeout=60)
        check("upper", texts, upper)
        assert upper[0]["options"] == {"own": 1, "shared": "mine"}  # its own options over the Dispatcher's
        # On the CPU the cores are divided among the workers, as in the single-model form.
        assert {o["threads"] for o in upper} == {max(1, (os.cpu_count() or 1) // 2)}
        check("reverse", texts, futures["reverse"].result(timeout=60))


def test_a_map_of_models_is_checked_before_anything_starts():
    with pytest.raises(ValueError, match="at least one model"):
        Dispatcher({})
    with pytest.raises(ValueError, match="'a@1'"):
        Dispatcher({"a@1": ReverseModel})
    with pytest.raises(ValueError, match="min_replicas"):
        Dispatcher({"a": ModelSpec(ReverseModel, min_replicas=3)}, worker_num=2)
    with pytest.raises(ValueError, match="model_name"):
        Dispatcher({"a": ReverseModel}, model_name="b")
    with pytest.raises(ValueError, match="max_models_per_worker"):
        Dispatcher({"a": ReverseModel}, max_models_per_worker=0)
    with pytest.raises(ValueError, match="Manager subclass"):
        Dispatcher({"a": str})
    with pytest.raises(ValueError, match="max_batch_size"):
        Dispatcher({"a": ReverseModel}, batch_size=0)


def test_a_class_that_cannot_reach_a_worker_process_fails_the_constructor_and_leaves_nothing_running():
    class Local(ReverseModel):  # defined in a function: not importable, so not picklable by reference
        pass

    before = set(threading.enumerate())
    with pytest.raises(Exception, match="Local"):
        Dispatcher({"a": Local, "b": UpperModel}, start_timeout_s=30)
    wait_until(lambda: not [t for t in set(threading.enumerate()) - before if t.name == "ddml-broker"],
               timeout_s=15, what="the broker thread to stop")
    assert not multiprocessing.active_children()
