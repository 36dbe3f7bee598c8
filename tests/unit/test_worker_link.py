"""The worker's link state machine (worker/link.py), restart and silence detection
(ddml_common/liveness.py) and the health file and watchdog (worker/health.py): events in,
instructions out, no sockets, time passed in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ddml_common import protocol
from ddml_common.liveness import Liveness, broker_endpoints
from ddml_common.protocol import ErrorCode
from worker.health import HealthClock, healthy, hung, touch
from worker.link import Compute, Exit, Forget, Forward, ResultTag, Send, WorkerLinks, decode_batch

ROOT = Path(__file__).resolve().parents[2]
INTERVAL_S = 1.0
LIVENESS = 3


def links(brokers: int = 1, max_batches: int = 1, max_inputs: int = 0) -> WorkerLinks:
    machine = WorkerLinks([f"tcp://b{k}" for k in range(brokers)],
                          protocol.Ready(["m"], 4, max_batches, max_inputs=max_inputs), INTERVAL_S, LIVENESS)
    for index in range(brokers):
        machine.connected(index, now=0.0, busy=False)
    return machine


def batch(batch_id: int, size: int = 1) -> protocol.Batch:
    return protocol.Batch(batch_id, "m", ["r"] * size, 1000, [protocol.encode_value(k) for k in range(size)])


def sent(instructions: list, kind: type) -> list:
    return [i.message for i in instructions if type(i) is Send and type(i.message) is kind]


def answer(machine: WorkerLinks, compute: Compute, answered: int) -> list:
    return machine.on_result(ResultTag(compute.link, compute.batch.batch_id, answered, compute.epoch), [b"frames"])


# ---------------------------------------------------------------------------- liveness


def test_a_new_instance_id_is_a_restart_but_the_first_one_is_not():
    liveness = Liveness(silent_after_s=3.0)
    assert liveness.instance("b-1") is False
    assert liveness.instance("b-1") is False
    assert liveness.instance("b-2") is True and liveness.instance_id == "b-2"


def test_silence_counts_from_the_last_message_or_reconnect_but_health_only_from_a_message():
    liveness = Liveness(silent_after_s=3.0)
    liveness.connected(now=10.0)
    assert not liveness.silent(12.9) and liveness.silent(13.1)
    assert not liveness.heard_recently(11.0), "a reconnect is not an answer"
    liveness.heard(now=12.0)
    assert liveness.heard_recently(15.0) and not liveness.heard_recently(15.1)
    assert not liveness.silent(15.0)


def test_broker_endpoints_are_split_trimmed_and_never_empty():
    assert broker_endpoints(" tcp://a:1 , tcp://b:2,") == ["tcp://a:1", "tcp://b:2"]
    with pytest.raises(ValueError, match="--broker"):
        broker_endpoints(" , ")


# ---------------------------------------------------------------------------- registration


def test_each_link_registers_on_connect_and_heartbeats_every_interval():
    machine = WorkerLinks(["tcp://a", "tcp://b"], protocol.Ready(["m"], 4), INTERVAL_S, LIVENESS)
    assert [type(i.message) for i in machine.connected(0, 0.0, False)] == [protocol.Ready]
    assert machine.connected(1, 0.0, False)[0].link == 1
    beats = machine.on_tick(0.0, busy=False, stopping=False)
    assert [(i.link, type(i.message)) for i in beats] == [(0, protocol.Heartbeat), (1, protocol.Heartbeat)]
    assert beats[0].message.registration == 1
    assert machine.on_tick(0.9, busy=False, stopping=False) == []
    assert machine.next_wake_at() == 1.0
    assert len(sent(machine.on_tick(1.0, busy=False, stopping=False), protocol.Heartbeat)) == 2


def test_a_disconnect_that_answers_an_older_registration_is_ignored():
    machine = links()
    machine.on_message(0, protocol.Disconnect("forgot you"), 0.1, busy=False)
    assert machine.forgotten(0, [], 0.1, busy=False)[0].message.max_batches == 1  # READY again: registration 2
    assert machine.on_message(0, protocol.Disconnect("stale", registration=1), 0.2, busy=False) == []
    [forget] = machine.on_message(0, protocol.Disconnect("again", registration=2), 0.3, busy=False)
    assert forget == Forget(0, epoch=2, reconnect=False)


def test_a_forgotten_batch_worker_registers_again_only_once_its_batch_is_computed():
    machine = links(max_batches=2)
    [running] = machine.on_message(0, batch(1), 0.1, busy=False)
    [queued] = machine.on_message(0, batch(2), 0.1, busy=True)
    [forget] = machine.on_message(0, protocol.Disconnect("restarted"), 0.2, busy=True)
    # The shell took batch 2 back out of the inbox; batch 1 is still computing.
    assert machine.forgotten(0, [(queued.epoch, 2)], 0.2, busy=True) == []
    assert machine.outstanding == 1
    assert not sent(machine.on_tick(0.4, busy=True, stopping=False), protocol.Ready)
    assert answer(machine, running, 1) == [], "its result is of the forgotten epoch: dropped"
    assert machine.counters.stale_results == 1 and machine.outstanding == 0
    assert sent(machine.on_tick(0.5, busy=False, stopping=False), protocol.Ready)
    assert forget.epoch == 1 and machine.links[0].registrations == 2


def test_a_broker_restart_is_logged_and_its_instance_kept():
    machine = links()
    machine.on_message(0, protocol.Heartbeat(instance_id="one"), 0.1, busy=False)
    machine.on_message(0, protocol.Heartbeat(instance_id="two"), 0.2, busy=False)
    assert machine.links[0].liveness.instance_id == "two"


# ---------------------------------------------------------------------------- capacity


def test_two_brokers_never_fill_a_worker_past_max_batches_and_the_refused_one_hears_of_a_free_slot():
    machine = links(brokers=2, max_batches=1)
    [compute] = machine.on_message(0, batch(7), 0.1, busy=False)
    assert type(compute) is Compute and compute.link == 0
    [busy] = sent(machine.on_message(1, batch(7, size=3), 0.1, busy=True), protocol.BatchResult)
    assert busy.batch_id == 7 and len(busy.outputs) == 3
    assert {e.code for e in busy.errors} == {ErrorCode.BUSY.value}
    assert machine.counters.refused_batches == 1 and machine.counters.peak_batches_held == 1
    forwarded = answer(machine, compute, 1)
    assert forwarded[0] == Forward(0, [b"frames"])
    assert [(i.link, type(i.message)) for i in forwarded[1:]] == [(1, protocol.Heartbeat)]
    assert answer(machine, compute, 1) == [Forward(0, [b"frames"])], "told once"


def test_a_continuous_worker_admits_by_inputs_and_partial_results_free_them():
    machine = links(brokers=2, max_inputs=4)
    [first] = machine.on_message(0, batch(1, size=3), 0.1, busy=False)
    assert sent(machine.on_message(1, batch(1, size=2), 0.1, busy=False), protocol.BatchResult)
    answer(machine, first, 2)
    assert machine.held_inputs == 1
    assert type(machine.on_message(1, batch(1, size=3), 0.2, busy=True)[0]) is Compute
    assert machine.counters.peak_inputs_held == 4 and machine.figures()["peak_inputs_held"] == 4


def test_a_forgotten_continuous_worker_registers_at_once_and_drops_the_answers_of_the_old_epoch():
    machine = links(max_inputs=4)
    [old] = machine.on_message(0, batch(1, size=2), 0.1, busy=False)
    [forget] = machine.on_message(0, protocol.Disconnect("restarted"), 0.2, busy=True)
    assert sent(machine.forgotten(0, [], 0.2, busy=True), protocol.Ready), "nothing it holds is waited for"
    assert machine.held_inputs == 0 and forget.epoch == 1
    [new] = machine.on_message(0, batch(1, size=4), 0.3, busy=True)
    assert new.epoch == 1
    assert answer(machine, old, 2) == [] and machine.held_inputs == 4, "the same batch id, but of the old epoch"


# ---------------------------------------------------------------------------- silence and drain


def test_a_silent_broker_gets_a_fresh_socket_and_a_full_window_to_answer_it():
    machine = links(max_batches=2)
    [queued] = machine.on_message(0, batch(1), 0.5, busy=True)
    assert not [i for i in machine.on_tick(3.4, busy=False, stopping=False) if type(i) is Forget]
    [forget] = [i for i in machine.on_tick(3.6, busy=False, stopping=False) if type(i) is Forget]
    assert forget == Forget(0, 1, reconnect=True)
    assert sent(machine.forgotten(0, [(0, 1)], 3.6, busy=False), protocol.Ready)
    assert machine.outstanding == 0
    assert not [i for i in machine.on_tick(6.5, busy=False, stopping=False) if type(i) is Forget]
    assert not machine.heard_recently(6.5)
    assert queued.epoch == 0


def test_drain_announces_itself_finishes_what_is_held_then_disconnects_and_exits():
    machine = links()
    machine.on_tick(0.0, busy=False, stopping=False)
    [compute] = machine.on_message(0, batch(1), 0.1, busy=False)
    first = machine.on_tick(0.2, busy=True, stopping=True)
    assert sent(first, protocol.Heartbeat)[0].draining, "announced at once, not at the next interval"
    machine.on_message(0, protocol.Heartbeat(instance_id="b", draining=True), 0.3, busy=True)
    assert not any(type(i) is Exit for i in machine.on_tick(0.4, busy=True, stopping=True)), "a batch is held"
    answer(machine, compute, 1)
    last = machine.on_tick(0.5, busy=False, stopping=True)
    assert sent(last, protocol.Disconnect) and type(last[-1]) is Exit


def test_a_draining_worker_whose_broker_is_silent_exits_without_its_acknowledgement():
    machine = links()
    machine.on_tick(0.0, busy=False, stopping=True)
    assert not any(type(i) is Exit for i in machine.on_tick(2.9, busy=False, stopping=True))
    assert type(machine.on_tick(3.1, busy=False, stopping=True)[-1]) is Exit


def test_a_batch_that_does_not_decode_is_answered_input_by_input():
    work = decode_batch(protocol.Batch(4, "m", ["a", "b"], 100, [protocol.encode_value("x"), b"\xc1"]), 1, 2)
    assert work.inputs[0] == "x" and work.inputs[1] is None and list(work.errors) == [1]
    assert (work.link, work.epoch) == (1, 2)
    assert ResultTag.decode(work.tag(2)) == ResultTag(1, 4, 2, 2)


# ---------------------------------------------------------------------------- health and watchdog


def test_the_watchdog_and_the_health_file_decide_on_the_oldest_batch_in_compute():
    assert not hung(10.0, None, 5.0) and not hung(10.0, 5.0, 5.0) and hung(10.1, 5.0, 5.0)
    assert healthy(10.0, 8.0, 5.0, heard_recently=True)
    assert not healthy(10.0, 7.0, 5.0, heard_recently=True), "stuck for more than half the watchdog"
    assert not healthy(10.0, None, 5.0, heard_recently=False)


def test_the_health_file_is_due_once_an_interval_and_touched_only_while_healthy(tmp_path):
    clock = HealthClock(watchdog_s=10.0, interval_s=1.0)
    assert not clock.touch_due(0.0, None, heard_recently=False), "no broker has answered yet"
    assert not clock.touch_due(0.5, None, heard_recently=True), "not due yet"
    assert clock.touch_due(1.0, None, heard_recently=True)
    assert not clock.touch_due(2.0, busy_since=-4.0, heard_recently=True), "a batch is stuck"
    path = tmp_path / "healthy"
    touch(str(path))
    assert path.exists()


# ---------------------------------------------------------------------------- purity


@pytest.mark.parametrize("module", ["worker/link.py", "worker/health.py", "ddml_common/liveness.py",
                                    "worker/passes.py", "worker/results.py"])
def test_the_decision_modules_touch_no_sockets_threads_or_clock(module):
    tree = ast.parse((ROOT / module).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"zmq", "socket", "threading", "time", "queue", "random"}, imported
