"""Continuous batching, end to end: real broker and echo-worker processes over real ZeroMQ.

A continuous worker (`--continuous on`) holds up to --max-inputs-held inputs from any number of
batches, forms each forward pass itself (the oldest input first, then those nearest it in cost),
and answers each input as soon as its pass is done. These tests check what that promises a
client: a request waits for its own inputs only; the broker keeps the worker supplied, never
past its limit; a worker's death, a poison input in a shared pass, a broker restart or a second
broker cost no request more than one reply, and no input more than --max-attempts executions.

What ran where is read from the processes' JSON debug logs, not guessed from timing: the broker
logs every BATCH it sends with the ids of its requests, a continuous worker every forward pass
with the ids of its requests. Each request here is sent with a name as its id's prefix, and
carries one input unless it says otherwise, so a pass's request names are its inputs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter

import pytest

from gateway.broker_client import BrokerClient, BrokerError
from ddml_common.protocol import ErrorCode
from tests.chaos import Load, broker_clients, live_pids, send_sentinel, settle
from tests.processes import Process, free_port, wait_until

pytestmark = pytest.mark.integration

HB = ("--heartbeat-interval-ms", "200")
DEBUG_JSON = ("--log-level", "DEBUG", "--log-format", "json")
CONTINUOUS = ("--model", "echo", "--continuous", "on", *HB, *DEBUG_JSON)


# ---------------------------------------------------------------------------- logs


def _entries(process: Process, prefix: str) -> list[dict]:
    entries = []
    for line in process.output().splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line of a SIGKILLed process may be cut short
        if entry.get("message", "").startswith(prefix):
            entries.append(entry)
    return entries


def _named(entries: list[dict]) -> list[list[str]]:
    """The names of the named requests (those sent by Requests) of each entry that has any."""
    named = ([request_id.split("/", 1)[0] for request_id in entry["request_id"].split(",") if "/" in request_id]
             for entry in entries)
    return [names for names in named if names]


def passes(worker: Process) -> list[list[str]]:
    """The request names of each forward pass the worker (or its supervised children) started, in order."""
    return _named(_passes(worker))


def _passes(worker: Process) -> list[dict]:
    return [entry for entry in _entries(worker, "pass of ") if entry["level"] == "DEBUG"]  # not "... failed"


def pass_figures(worker: Process) -> list[tuple[int, int]]:
    """For each pass, of any requests: (its inputs, the inputs the worker held besides it)."""
    figures = []
    for entry in _passes(worker):
        words = entry["message"].replace("(", "").split()  # pass of N inputs (M still held) of requests ...
        figures.append((int(words[2]), int(words[4])))
    return figures


def dispatched(broker: Process) -> list[list[str]]:
    """The request names of each BATCH the broker sent, in order."""
    return _named([entry for entry in _entries(broker, "batch ") if " inputs to worker " in entry["message"]])


def executions(*workers: Process) -> Counter:
    """How many passes each request's input was in, on all these workers together."""
    return Counter(name for worker in workers for run in passes(worker) for name in run)


# ---------------------------------------------------------------------------- requests


class Requests:
    """Named requests, each sent with BrokerClient.request() on a thread of its own.

    Each thread keeps its DEALER after its answer: finish() lets the broker settle, then has every
    thread send one more request on it. Replies on a connection come in order, so by the
    sentinel's reply any second reply to the thread's request has been read and counted in
    client.unmatched_replies, which finish() returns (it must be 0: exactly one reply each).
    """

    def __init__(self, client: BrokerClient):
        self.client = client
        self.outcomes: dict[str, object] = {}
        self.answered_at: dict[str, float] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._drain = threading.Event()
        self._aborted = False  # the test failed before finish(): send no sentinel
        self._failures: list[str] = []

    def send(self, name: str, inputs: list, timeout_s: float = 30.0) -> None:
        def run() -> None:
            try:
                outcome: object = self.client.request("echo", inputs, timeout_s=timeout_s, request_id_prefix=name)
            except BrokerError as error:
                outcome = error
            except Exception as error:  # the client closed under it: the test failed already
                if not self._aborted:
                    raise
                outcome = error
            self.answered_at[name] = time.monotonic()
            self.outcomes[name] = outcome
            self._drain.wait()
            if self._aborted:
                return
            failure = send_sentinel(self.client, "echo", "request", len(self.outcomes))
            if failure:
                self._failures.append(failure)

        thread = threading.Thread(target=run, daemon=True, name=f"request-{name}")
        self._threads[name] = thread
        thread.start()

    def outcome(self, name: str, timeout_s: float = 40.0) -> object:
        wait_until(lambda: name in self.outcomes, timeout_s, interval_s=0.01, what=f"the answer to {name}")
        return self.outcomes[name]

    def finish(self) -> int:
        for name in self._threads:
            self.outcome(name)
        settle(self.client, settle_s=0.5)
        self._drain.set()
        for thread in self._threads.values():
            thread.join(20)
            assert not thread.is_alive(), f"{thread.name}'s sentinel got no answer"
        assert not self._failures, self._failures
        return self.client.unmatched_replies

    def abort(self) -> None:
        """Let every thread end without its sentinel (the client is about to close)."""
        self._aborted = True
        self._drain.set()


@pytest.fixture
def client(stack):
    with broker_clients(stack) as make:
        yield make


@pytest.fixture
def named_requests(client):
    """Makes Requests, each on a client of its own; if the test fails, their threads end before
    the clients close."""
    made: list[Requests] = []

    def make() -> Requests:
        made.append(Requests(client()))
        return made[-1]

    yield make
    for requests in made:
        requests.abort()


def worker_view(client: BrokerClient, pid: int) -> dict:
    """The broker's view of one worker ({} while it is not registered)."""
    try:
        workers = client.status()["workers"]
    except BrokerError:
        return {}
    return next((w for w in workers if w["pid"] == pid), {})


def in_flight_requests(client: BrokerClient) -> int | None:
    try:
        return client.status()["stats"]["in_flight_requests"]
    except BrokerError:
        return None


def start_workers(stack, *flag_sets: tuple[str, ...]) -> list[Process]:
    """Start workers side by side (each imports for a second or two), then wait for each."""
    workers = [stack.start_worker(*flags, wait=False) for flags in flag_sets]
    for worker in workers:
        worker.wait_for_output(r"worker ready", timeout_s=120)
    return workers


# ---------------------------------------------------------------------------- tests


def test_a_request_is_answered_when_its_own_inputs_are_done_not_its_batch(stack, client, named_requests):
    """p and q travel in ONE batch message; p is answered a second before q's slow pass ends.

    The worker (passes of 2, holds 5) runs r0's slow pass while u (2 inputs) and o wait behind
    it; p and q queue at the broker. r0's answer frees 2 places, so p and q leave together. The
    worker then runs u, then [o, p] (the oldest first, then the next), then q alone, for a
    second. Under batch semantics p would be answered with q, its batch mate; here it is not.
    """
    broker = stack.start_broker(*HB, *DEBUG_JSON)
    worker = stack.start_worker(*CONTINUOUS, "--max-batch-size", "2", "--max-inputs-held", "5")
    c = client()
    wait_until(lambda: worker_view(c, worker.pid), 30, what="the worker")
    assert worker_view(c, worker.pid)["max_inputs"] == 5
    requests = named_requests()
    held = lambda count: worker_view(c, worker.pid).get("in_flight_items") == count  # noqa: E731
    values = {"r0": [{"sleep_s": 2.0, "r0": 0}, {"r0": 1}], "u": [{"sleep_s": 0.5, "u": 0}, {"u": 1}],
              "o": [{"o": 0}], "p": [{"p": 0}], "q": [{"sleep_s": 1.0, "q": 0}]}
    requests.send("r0", values["r0"])
    wait_until(lambda: held(2), 10, what="r0's pass to start")
    requests.send("u", values["u"])
    wait_until(lambda: held(4), 10, what="u held")
    requests.send("o", values["o"])
    wait_until(lambda: held(5), 10, what="o held: the worker is full")
    requests.send("p", values["p"])
    wait_until(lambda: in_flight_requests(c) == 4, 10, what="p queued at the broker")
    requests.send("q", values["q"])
    wait_until(lambda: in_flight_requests(c) == 5, 10, what="q queued at the broker")
    assert "r0" not in requests.outcomes, "r0's pass ended before the scene was set: make it longer"
    for name, inputs in values.items():
        assert requests.outcome(name) == inputs, name
    assert requests.finish() == 0, "a request had a second reply"

    assert dispatched(broker) == [["r0", "r0"], ["u", "u"], ["o"], ["p", "q"]], "p and q shared one batch"
    assert [sorted(set(run)) for run in passes(worker)] == [["r0"], ["u"], ["o", "p"], ["q"]]
    gap_s = requests.answered_at["q"] - requests.answered_at["p"]
    assert gap_s > 0.5, f"p was answered {gap_s:.2f} s before its batch mate q: it waited for q's pass"


def test_the_broker_keeps_the_worker_supplied_up_to_max_inputs_held_and_never_past_it(stack, client):
    """12 closed-loop clients, a worker that holds 6 in passes of 2: the broker fills it to 6 in
    slices of at most 2, so that each pass starts with the next ones already there."""
    stack.start_broker(*HB, *DEBUG_JSON)
    worker = stack.start_worker(*CONTINUOUS, "--max-batch-size", "2", "--max-inputs-held", "6")
    c = client()
    wait_until(lambda: worker_view(c, worker.pid), 30, what="the worker")
    seen: list[int] = []
    with Load(client(), concurrency=12, extra={"sleep_s": 0.02}) as load:
        def watch() -> bool:
            view = worker_view(c, worker.pid)
            seen.append(view["in_flight_items"])
            assert view["max_inputs"] == 6
            return load.tally.ok >= 300
        wait_until(watch, 60, interval_s=0.005, what="300 ok replies")
        tally = load.stop()
    assert (tally.errors, tally.lost, tally.duplicated, tally.wrong, tally.unaccounted) == ({}, 0, 0, 0, 0), tally
    assert max(seen) == 6, f"the broker's count of inputs at the worker: {Counter(seen)}"
    # Its own count, from a heartbeat sent after the load.
    wait_until(lambda: worker_view(c, worker.pid).get("stats", {}).get("peak_inputs_held", 0) >= 6, 5,
               what="the worker's figures")
    stats = worker_view(c, worker.pid)["stats"]
    assert stats["peak_inputs_held"] == 6, stats
    assert stats["refused_batches"] == 0, stats
    sizes = c.status()["models"]["echo"]["batch_sizes"]
    assert max(map(int, sizes)) <= 2, f"slices of at most --max-batch-size: {sizes}"
    figures = pass_figures(worker)
    assert max(size for size, _ in figures) <= 2
    # Supplied ahead of compute: each pass is full, and starts with more inputs waiting behind it.
    loaded = figures[10:-20]  # not while the load starts or stops
    full = sum(1 for size, _ in loaded if size == 2) / len(loaded)
    ahead = sum(1 for _, behind in loaded if behind >= 2) / len(loaded)
    assert full >= 0.8, f"passes of 2: {full:.0%} ({Counter(size for size, _ in loaded)})"
    assert ahead >= 0.8, f"passes with 2 or more inputs waiting behind: {ahead:.0%} ({Counter(b for _, b in loaded)})"


def victim_and_spare_in_slow_passes(stack, client, named_requests, values: dict, batch_size: str, held: str):
    """A broker, a victim (passes of batch_size, holds `held`) and a spare that holds 1, each
    running one of the slow requests s1 and s2 of `values`, so that all that is sent next goes to
    the victim and waits there, unstarted. Returns the victim, the spare, a status client and the
    Requests."""
    stack.start_broker(*HB, *DEBUG_JSON)
    victim, spare = start_workers(stack, (*CONTINUOUS, "--max-batch-size", batch_size, "--max-inputs-held", held),
                                  (*CONTINUOUS, "--max-batch-size", "1", "--max-inputs-held", "1"))
    c = client()
    wait_until(lambda: worker_view(c, victim.pid) and worker_view(c, spare.pid), 30, what="both workers")
    requests = named_requests()
    # Least loaded first: s1 and s2 go one to each worker.
    requests.send("s1", values["s1"])
    wait_until(lambda: sum(w["in_flight_items"] for w in c.status()["workers"]) == 1, 10, what="s1 dispatched")
    requests.send("s2", values["s2"])
    wait_until(lambda: worker_view(c, victim.pid).get("in_flight_items") == 1
               and worker_view(c, spare.pid).get("in_flight_items") == 1, 10, what="s1 and s2, one per worker")
    return victim, spare, c, requests


def test_sigkill_of_a_worker_holding_unstarted_inputs_runs_them_once_elsewhere(stack, client, named_requests):
    """The victim runs a slow pass with 4 inputs waiting behind it (h1-h4, never started) when it
    is SIGKILLed. Its 5 unanswered inputs run again, alone, on the other worker: all succeed, each
    with one reply; h1-h4 run exactly once, the slow one twice (its one retry)."""
    values = {"s1": [{"sleep_s": 1.5, "s": 1}], "s2": [{"sleep_s": 1.5, "s": 2}],
              **{f"h{n}": [{"h": n}] for n in range(1, 5)}}
    victim, spare, c, requests = victim_and_spare_in_slow_passes(stack, client, named_requests, values, "2", "5")
    for n in range(1, 5):
        requests.send(f"h{n}", values[f"h{n}"])
    wait_until(lambda: worker_view(c, victim.pid).get("in_flight_items") == 5, 10, what="h1-h4 held by the victim")
    assert "s1" not in requests.outcomes and "s2" not in requests.outcomes, "the slow passes ended too soon"
    victim.kill()
    for name, inputs in values.items():
        assert requests.outcome(name) == inputs, name
    assert requests.finish() == 0, "a request had a second reply"

    [[slow_at_victim]] = passes(victim)  # h1-h4 never started there
    assert slow_at_victim in ("s1", "s2")
    ran = executions(victim, spare)
    assert ran == {"s1": 1, "s2": 1, slow_at_victim: 2, **{f"h{n}": 1 for n in range(1, 5)}}, ran
    assert all(len(run) == 1 for run in passes(spare)), "what the victim held runs alone"
    status = c.status()
    assert status["stats"]["workers_lost"] == 1
    assert status["models"]["echo"]["redispatched"] == 5


def test_a_pass_that_raises_fails_only_its_poison_input_after_two_executions(stack, client, named_requests):
    """x (the model raises on it) shares a pass with 3 bystanders. The pass fails as a whole;
    each of its inputs runs again alone: the bystanders succeed, x fails MODEL_ERROR, having run
    twice."""
    stack.start_broker(*HB, *DEBUG_JSON)
    worker = stack.start_worker(*CONTINUOUS, "--max-batch-size", "4", "--max-inputs-held", "5")
    c = client()
    wait_until(lambda: worker_view(c, worker.pid), 30, what="the worker")
    requests = named_requests()
    values = {"a": [{"a": 0}], "b": [{"b": 0}], "x": [{"raise": "poison"}], "d": [{"d": 0}]}
    requests.send("blocker", [{"sleep_s": 0.7}])
    wait_until(lambda: worker_view(c, worker.pid).get("in_flight_items") == 1, 10, what="the blocker's pass")
    for name, inputs in values.items():  # one at a time, so that the pass holds them in this order
        requests.send(name, inputs)
        wait_until(lambda: worker_view(c, worker.pid).get("in_flight_items") == 2 + list(values).index(name), 10,
                   what=f"{name} held")
    assert "blocker" not in requests.outcomes, "the blocker's pass ended too soon"
    for name in ("a", "b", "d"):
        assert requests.outcome(name) == values[name], name
    error = requests.outcome("x")
    assert isinstance(error, BrokerError) and error.code is ErrorCode.MODEL_ERROR, error
    assert "alone" in error.message and "echo model told to raise: poison" in error.message, error.message
    assert requests.finish() == 0, "a request had a second reply"

    runs = passes(worker)
    assert runs[:2] == [["blocker"], ["a", "b", "x", "d"]], runs
    assert sorted(runs[2:]) == [["a"], ["b"], ["d"], ["x"]], "after the shared pass failed, each ran alone"
    assert executions(worker) == {"blocker": 1, "a": 2, "b": 2, "x": 2, "d": 2}
    outcomes = c.status()["models"]["echo"]["outcomes"]
    assert outcomes["MODEL_ERROR"] == 1 and set(outcomes) == {"ok", "MODEL_ERROR"}, outcomes


def test_a_crash_poison_held_with_bystanders_fails_alone_and_another_worker_serves(stack, client, named_requests):
    """x ends the worker process ({"exit": 3}) in a pass with 3 bystanders, a 4th waiting behind.
    All 5 run again alone on the 2 other workers: the bystanders succeed; x ends one of those
    too, and fails WORKER_LOST as a poison input; the last worker serves on."""
    stack.start_broker(*HB, *DEBUG_JSON)
    spare = (*CONTINUOUS, "--max-batch-size", "1", "--max-inputs-held", "1")
    victim, *spares = start_workers(stack, (*CONTINUOUS, "--max-batch-size", "4", "--max-inputs-held", "6"),
                                    spare, spare)
    c = client()
    wait_until(lambda: len(live_pids(c)) == 3, 30, what="3 workers")
    requests = named_requests()
    for n in range(3):  # least loaded first: one blocker each, which fills the spares
        requests.send(f"blocker{n}", [{"sleep_s": 1.0, "blocker": n}])
        wait_until(lambda: sum(1 for w in c.status()["workers"] if w["in_flight_items"]) == n + 1, 10,
                   what=f"blocker {n} on a worker of its own")
    values = {"a": [{"a": 0}], "b": [{"b": 0}], "x": [{"exit": 3}], "d": [{"d": 0}], "e": [{"e": 0}]}
    for name, inputs in values.items():
        requests.send(name, inputs)
        wait_until(lambda: worker_view(c, victim.pid).get("in_flight_items") == 2 + list(values).index(name), 10,
                   what=f"{name} held by the victim")
    assert not any(name.startswith("blocker") for name in requests.outcomes), "the blockers ended too soon"
    for name in ("a", "b", "d", "e"):
        assert requests.outcome(name) == values[name], name
    error = requests.outcome("x")
    assert isinstance(error, BrokerError) and error.code is ErrorCode.WORKER_LOST, error
    assert "poison" in error.message, error.message
    for n in range(3):
        assert requests.outcome(f"blocker{n}") == [{"sleep_s": 1.0, "blocker": n}]
    assert requests.finish() == 0, "a request had a second reply"

    assert victim.popen.wait(5) == 3
    assert [p.popen.poll() for p in spares].count(3) == 1, "x, run alone, ended one spare"
    assert [p.popen.poll() for p in spares].count(None) == 1, "the other serves on"
    [[victim_blocker], shared] = passes(victim)
    assert shared == ["a", "b", "x", "d"], "e waited behind the pass that x ended"
    assert all(len(run) == 1 for spare_process in spares for run in passes(spare_process))
    ran = executions(victim, *spares)
    # The victim's blocker may run twice: its result, sent a moment before x ended the process,
    # can die with it, unsent.
    assert ran[victim_blocker] in (1, 2), ran
    expected = {**{f"blocker{n}": 1 for n in range(3)}, "a": 2, "b": 2, "x": 2, "d": 2, "e": 1}
    assert ran == {**expected, victim_blocker: ran[victim_blocker]}, ran
    assert requests.client.request("echo", ["after"], timeout_s=10) == ["after"]


@contextlib.contextmanager
def slow_pass_before_a_restart(stack, slow_s: float, *worker_flags: str):
    """A broker on fixed ports (so that it can restart there), a continuous worker (passes of 1)
    running s, a slow request, and clients of the broker that hear of a restart quickly. Yields
    the broker, the worker, a status client, the Requests (s among them) and restart(), which
    starts a new broker at the same address."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = stack.start_broker(*HB, *DEBUG_JSON, frontend=frontend, backend=backend)
    worker = stack.start_worker(*CONTINUOUS, "--max-batch-size", "1", *worker_flags)
    c = BrokerClient(frontend, heartbeat_interval_s=0.2)
    requests = Requests(BrokerClient(frontend, heartbeat_interval_s=0.2))
    try:
        wait_until(lambda: worker_view(c, worker.pid), 30, what="the worker")
        requests.send("s", [{"sleep_s": slow_s}])
        wait_until(lambda: worker_view(c, worker.pid).get("in_flight_items") == 1, 10, what="s's pass")
        yield broker, worker, c, requests, lambda: stack.start_broker(*HB, *DEBUG_JSON, frontend=frontend,
                                                                      backend=backend)
    finally:
        requests.abort()
        c.close()
        requests.client.close()


def test_broker_restart_while_the_worker_holds_unstarted_inputs_loses_and_repeats_nothing(stack):
    """The broker is SIGKILLed while the worker runs s (slow) with h1-h3 waiting behind it, then
    restarted at the same address. Each request gets one answer (UNAVAILABLE: it died with the
    old broker); the worker drops h1-h3 unrun, as the new broker never heard of them, and then
    takes a full load from the new broker: nothing it dropped still counts against its room."""
    with slow_pass_before_a_restart(stack, 3.0, "--max-inputs-held", "4") as (old, worker, c, requests, restart):
        for n in range(1, 4):
            requests.send(f"h{n}", [{"h": n}])
        wait_until(lambda: worker_view(c, worker.pid).get("in_flight_items") == 4, 10, what="h1-h3 held")
        old.kill()
        new = restart()
        for name in ("s", "h1", "h2", "h3"):
            outcome = requests.outcome(name, timeout_s=20)
            assert isinstance(outcome, BrokerError) and outcome.code is ErrorCode.UNAVAILABLE, (name, outcome)
        wait_until(lambda: worker_view(c, worker.pid), 10, what="the worker to register with the new broker")
        # s's pass ends after the restart; its result is for a batch the new broker never sent.
        wait_until(lambda: worker_view(c, worker.pid).get("stats", {}).get("stale_results") == 1, 10,
                   what="s's pass to end, and its result to be dropped")
        wait_until(lambda: requests.client.broker_instance_id == c.status()["instance_id"], 10,
                   what="the client to hear of the new broker")
        after = {f"n{n}": [{"n": n, "sleep_s": 0.3}] for n in range(4)}
        for name, inputs in after.items():
            requests.send(name, inputs)
        for name, inputs in after.items():
            assert requests.outcome(name) == inputs, name
        assert requests.finish() == 0, "a request had a second reply"
        stats = worker_view(c, worker.pid)["stats"]
        assert stats.get("refused_batches", 0) == 0, f"the worker still counted what it dropped: {stats}"
        assert executions(worker) == {"s": 1, **{name: 1 for name in after}}, "h1-h3 were dropped unrun"
        assert dispatched(new) and all(name in after for batch in dispatched(new) for name in batch)


def test_a_pass_from_before_a_broker_restart_never_answers_the_new_brokers_batch(stack):
    """The worker runs s when the broker restarts, registers again at once, and is sent n while
    s's pass still runs. s's late result must never be taken for n's: the worker drops it, as the
    broker it was for is gone, and n gets its own output. (Found by this test: a new broker then
    numbered its batches from 1 again, and answered n, its batch 1, with s's output.)"""
    with slow_pass_before_a_restart(stack, 4.0) as (old, worker, c, requests, restart):
        s_started_at = time.monotonic()
        assert dispatched(old) == [["s"]]
        old.kill()
        new = restart()
        wait_until(lambda: worker_view(c, worker.pid), 10, what="the worker to register with the new broker")
        wait_until(lambda: requests.client.broker_instance_id == c.status()["instance_id"], 10,
                   what="the client to hear of the new broker")
        requests.send("n", [{"n": 0}])
        wait_until(lambda: dispatched(new), 10, what="n's batch")
        assert time.monotonic() - s_started_at < 3.5, "s's pass ended before n reached the worker: make it longer"
        assert requests.outcome("n") == [{"n": 0}], "n was answered with the output of s, the old broker's batch"
        outcome = requests.outcome("s")
        assert isinstance(outcome, BrokerError) and outcome.code is ErrorCode.UNAVAILABLE, outcome
        assert requests.finish() == 0, "a request had a second reply"
        wait_until(lambda: worker_view(c, worker.pid).get("stats", {}).get("stale_results") == 1, 5,
                   what="the worker's figures: s's result dropped")
        assert executions(worker) == {"s": 1, "n": 1}


def test_a_worker_forgotten_while_stopped_drops_what_was_run_elsewhere(stack, client, named_requests):
    """The victim is SIGSTOPped in a slow pass with h1-h3 waiting behind it; the broker expires
    it and runs its inputs alone on the spare. Resumed, the victim is told to register again
    (DISCONNECT): it drops h1-h3 unrun, and its slow pass's late result too. Each request
    gets one reply; h1-h3 run once; the victim then serves again at full room."""
    slow = {"s1": [{"sleep_s": 2.5, "s": 1}], "s2": [{"sleep_s": 2.5, "s": 2}]}
    victim, spare, c, requests = victim_and_spare_in_slow_passes(stack, client, named_requests, slow, "1", "4")
    for n in range(1, 4):
        requests.send(f"h{n}", [{"h": n}])
    wait_until(lambda: worker_view(c, victim.pid).get("in_flight_items") == 4, 10, what="h1-h3 held")
    [slow_at_victim] = [run[0] for run in passes(victim)]
    victim.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not worker_view(c, victim.pid), 10, what="the broker to expire the victim")
    finally:
        victim.signal(signal.SIGCONT)
    wait_until(lambda: worker_view(c, victim.pid), 10, what="the victim to register again")
    for n in range(1, 4):
        assert requests.outcome(f"h{n}") == [{"h": n}]
    assert requests.outcome("s1") == [{"sleep_s": 2.5, "s": 1}]
    assert requests.outcome("s2") == [{"sleep_s": 2.5, "s": 2}]
    wait_until(lambda: worker_view(c, victim.pid).get("stats", {}).get("stale_results") == 1, 10,
               what="the victim to drop its slow pass's result: the broker had forgotten that batch")
    # Back from a stop that lost what it held, the victim is a suspect (docs/reliability.md): beside
    # the spare it gets no new work until its backoff (the batch deadline's floor) ends; then it
    # serves again. Requests go three at a time, more than the spare holds, until one runs there.
    after: dict[str, list] = {}

    def victim_served() -> bool:
        names = [f"n{len(after) + k}" for k in range(3)]
        for name in names:
            after[name] = [{"n": name, "sleep_s": 0.1}]
            requests.send(name, after[name])
        for name in names:
            assert requests.outcome(name) == after[name], name
        return bool(executions(victim).keys() & after.keys())

    wait_until(victim_served, 40, interval_s=0.1, what="the victim to serve again once its backoff ends")
    assert requests.finish() == 0, "a request had a second reply"
    assert "register again" in victim.output()
    # h1-h3 ran once each, wherever the broker sent them again (the victim too, once it was back):
    # the victim did not run those it had dropped.
    ran = executions(victim, spare)
    assert {name: ran[name] for name in ("s1", "s2", "h1", "h2", "h3")} == {
        "s1": 1, "s2": 1, slow_at_victim: 2, "h1": 1, "h2": 1, "h3": 1}, ran
    assert worker_view(c, victim.pid).get("stats", {}).get("refused_batches", 0) == 0


def test_a_continuous_worker_of_two_loaded_brokers_never_holds_more_than_max_inputs_held(stack):
    addresses = [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}") for _ in range(2)]
    for frontend, backend in addresses:
        stack.start_broker(*HB, frontend=frontend, backend=backend)
    worker = stack.start_worker("--model", "echo", "--continuous", "on", *HB, "--max-batch-size", "2",
                                "--max-inputs-held", "4", broker=",".join(backend for _, backend in addresses))
    one, two = (BrokerClient(frontend, heartbeat_interval_s=0.2) for frontend, _ in addresses)
    try:
        for each in (one, two):
            wait_until(lambda: worker_view(each, worker.pid), 30, what="the worker on both brokers")
        with Load(one, concurrency=8, extra={"sleep_s": 0.02}) as load_one, \
                Load(two, concurrency=8, extra={"sleep_s": 0.02}) as load_two:
            load_one.wait_for_ok(100, 30)
            load_two.wait_for_ok(100, 30)
            tallies = [load_one.stop(), load_two.stop()]
        for tally in tallies:
            assert (tally.errors, tally.lost, tally.duplicated, tally.wrong, tally.unaccounted) == (
                {}, 0, 0, 0, 0), tally
        wait_until(lambda: worker_view(one, worker.pid).get("stats", {}).get("peak_inputs_held", 0) >= 4, 5,
                   what="the worker's figures")
        stats = worker_view(one, worker.pid)["stats"]
        print(f"two brokers, one continuous worker: {stats}")
        assert stats["peak_inputs_held"] == 4, stats
        # Each broker counts room of its own, so together they offer more than 4: handed back BUSY.
        assert stats["refused_batches"] > 0, stats
        assert worker.popen.poll() is None
    finally:
        one.close()
        two.close()
