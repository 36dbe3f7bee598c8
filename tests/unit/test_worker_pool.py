"""A pool worker's parts without sockets: its repository configs, its holdings, and its placement step."""

from __future__ import annotations

import threading

import pytest

from ddml_common.placement import PlacementPolicy
from ddml_common.repository import parse_repository
from worker.__main__ import build_parser, config_from_args
from worker.config import WorkerConfig
from worker.pool import Placer, PoolState, flag_argv, model_configs, model_flags

ECHO = "worker.models.echo:EchoModel"
REPOSITORY = f"""
[models.alpha]
handler = "{ECHO}"
max-batch-size = 16
[models.beta]
handler = "{ECHO}"
memory-mb = 300
[models.broken]
handler = "no_such_module:Nope"
"""


def parse_with_the_worker_parser(argv: list[str]) -> WorkerConfig:
    return config_from_args(build_parser().parse_args(argv))


def repository():
    return parse_repository(REPOSITORY, "repo.toml", model_flags(build_parser()))


def test_a_model_table_may_set_the_flags_of_a_model_and_none_of_the_process():
    flags = model_flags(build_parser())
    assert {"handler", "model-path", "task", "max-batch-size", "pooling", "echo-test-directives"} <= flags
    assert not {"broker", "pool", "repository", "max-models", "device", "model", "config"} & flags


def test_flags_become_a_command_line_that_the_worker_parser_checks():
    assert flag_argv({"a": True, "b": False, "c": 3, "d": ["x", "y"]}) == ["--a", "--c", "3", "--d", "x", "--d", "y"]
    base = WorkerConfig(broker="tcp://b:1", device="cpu")
    configs = model_configs(repository(), base, parse_with_the_worker_parser)
    assert configs["alpha"].model == "alpha" and configs["alpha"].max_batch_size == 16
    assert configs["alpha"].handler == ECHO and configs["alpha"].broker == "tcp://b:1"
    bad = parse_repository('[models.x]\nmax-batch-size = "many"\n', "repo.toml", model_flags(build_parser()))
    with pytest.raises(SystemExit):  # the worker's own parser refuses it, naming the flag
        model_configs(bad, base, parse_with_the_worker_parser)


def test_a_pool_worker_never_loads_past_its_limits_and_drains_before_it_unloads():
    state = PoolState("p1", ["a", "b", "c"], max_models=2, budget_mb=1000.0, report_ttl_s=3.0)
    assert state.begin_load("a", 600.0) == ""
    state.finish_load("a", handler="A", memory_mb=600.0, load_s=0.1)
    assert "memory-budget-mb" in state.begin_load("b", 500.0)
    assert state.begin_load("b", 300.0) == ""
    assert "--max-models 2" in state.begin_load("c", 0.0)
    assert state.holdings() == {"held": {"a": 600.0}, "loading": ["b"], "failed": {}}
    assert state.take_changed() and not state.take_changed()
    assert state.acquire("a") == "A"  # a batch of a computes
    assert state.begin_unload("a", evicted=True)
    assert state.held_models() == [] and state.acquire("a") == "A"  # not offered, still runs what arrives
    assert state.finish_unload("a") is None  # two batches of it still compute
    state.release("a")
    state.release("a")
    assert state.finish_unload("a") == "A"
    assert state.acquire("a") is None  # gone: a late batch goes back BUSY
    assert state.figures()["pool_evictions"] == 1 and state.figures()["pool_busy_refusals"] == 1


def test_placement_loads_what_the_brokers_report_waiting_and_a_failed_load_is_reported_not_fatal():
    repo = repository()
    configs = model_configs(repo, WorkerConfig(device="cpu"), parse_with_the_worker_parser)
    state = PoolState("p1", sorted(repo.models), max_models=1, budget_mb=0.0, report_ttl_s=3.0)
    placer = Placer(state, PlacementPolicy({n: e.placement for n, e in repo.models.items()}), configs, "cpu",
                    drain_s=0.0)
    stopping = threading.Event()
    state.on_demand(0, {"models": {"broken": {"queued": 2}}}, now=10.0)
    placer.step(10.0, stopping)
    holdings = state.holdings()
    assert holdings["held"] == {} and "No module named 'no_such_module'" in holdings["failed"]["broken"]
    state.on_demand(0, {"models": {"broken": {"queued": 2}, "beta": {"queued": 1}}}, now=10.5)
    placer.step(10.5, stopping)
    assert state.holdings()["held"] == {"beta": 300.0}  # its memory-mb on the CPU
    assert state.acquire("beta").predict(["x"]) == ["x"]
    state.release("beta")
    state.on_demand(0, {"models": {}}, now=20.0)  # beta idle, but idle-unload-s (300 s) has not passed
    placer.step(20.0, stopping)
    assert state.held_models() == ["beta"]
    assert state.reports(now=30.0) == []  # a report older than its ttl is left out


@pytest.mark.parametrize("argv, complaint", [
    (["--pool"], "--pool needs --repository FILE"),
    (["--pool", "--repository", "/nonexistent.toml"], "cannot read repository /nonexistent.toml"),
    (["--pool", "--repository", "{repo}", "--memory-budget-mb", "-1"], "--memory-budget-mb must be 0"),
    (["--pool", "--repository", "{repo}", "--max-models", "0"], "--max-models must be at least 1"),
])
def test_a_pool_worker_that_cannot_start_says_why_in_one_line(capsys, tmp_path, argv, complaint):
    from worker.__main__ import main

    repo = tmp_path / "repo.toml"
    repo.write_text(f'[models.a]\nhandler = "{ECHO}"\n')
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(repo=repo) for arg in argv])
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err.splitlines()[-1]


def test_an_unload_is_acknowledged_once_every_fresh_broker_reports_us_without_it():
    state = PoolState("p1", ["alpha", "beta"], max_models=2, budget_mb=0.0, report_ttl_s=3.0)
    holding = {"pool": {"p1": {"held": {"alpha": 0.0}}}}
    without = {"pool": {"p1": {"held": {}}}}
    state.on_demand(0, holding, now=10.0)
    state.on_demand(1, holding, now=10.0)
    assert not state.acknowledged("alpha", since_at=10.5, now=10.6)  # both reports are older than the unload
    state.on_demand(0, without, now=10.6)
    state.on_demand(1, holding, now=10.7)  # sent before broker 1 heard of the change
    assert not state.acknowledged("alpha", since_at=10.5, now=10.7)
    state.on_demand(1, without, now=10.8)
    assert state.acknowledged("alpha", since_at=10.5, now=10.8)
    assert not state.acknowledged("beta", since_at=10.9, now=11.0)  # reports older than its unload
    assert state.acknowledged("beta", since_at=10.9, now=14.0)  # both brokers silent past the report TTL
