"""Load and bookkeeping for the chaos tests: every request sent is accounted for.

- ok: the reply carried exactly this request's input back (echo model);
- errors: a clear error reply, by code (and `reasons`: by code and message);
- lost: no answer before deadline + grace (the client gave up on its own);
- duplicated: a reply the client found nothing waiting for, on either path. That is a second
  reply for a request already answered, or a late one for a request counted as lost or failed
  by the client itself (BrokerClient counts both as `unmatched_replies`; it cannot tell them
  apart, and both must be 0). A second reply to a request the client itself resent to another
  broker is by design, dropped by the client and counted apart (`duplicate_replies`);
- wrong: a reply carried another request's output.

Every request is counted as exactly one of ok, errors, lost or wrong (`unaccounted` must be 0).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterator

from gateway.broker_client import BrokerClient, BrokerError

# How the chaos scenarios' echo workers batch: whole batches (the echo model's default), or
# continuous batching (each pass formed by the worker from up to --max-inputs-held inputs it holds,
# each input answered as its pass is done; tests/integration/test_continuous.py has the details).
WORKER_MODES = {"batch": (), "continuous": ("--continuous", "on")}
REPORT = os.environ.get("DDML_CHAOS_REPORT")  # append a Markdown row per scenario when set
PATHS = ("request", "submit")  # BrokerClient's two paths: its own DEALER per thread, or the I/O thread's
_LOCAL_TIMEOUT = "no reply before the deadline"  # BrokerClient's message when it gave up by itself
_FUTURE_GRACE_S = 5.0  # a submit() future fails by itself at deadline + 1 s, checked every heartbeat
_RETRY_AFTER_CAP_S = 0.25  # the longest a load thread backs off after an error


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    notes: dict = field(default_factory=dict)  # detection / recovery times and the like
    reasons: Counter = field(default_factory=Counter)  # errors by "CODE: reason" (see Load's classify)

    @property
    def unaccounted(self) -> int:
        return self.sent - self.ok - sum(self.errors.values()) - self.lost - self.wrong

    def record(self, scenario: str) -> None:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "0"
        notes = ", ".join(f"{k} {v}" for k, v in self.notes.items())
        row = (f"| {scenario} | {self.sent} | {self.ok} | {errors} | {self.lost} | {self.duplicated} | "
               f"{self.wrong} | {notes} |")
        print(row)
        if REPORT:
            with open(REPORT, "a") as report:
                report.write(row + "\n")


def reason_of(error: BrokerError) -> str:
    """An error's message without the parts that vary from run to run (endpoints, ids)."""
    message = re.sub(r"tcp://\S+", "<endpoint>", error.message)
    return re.sub(r"\b[0-9a-f]{8,}\b", "<id>", message)


class Load:
    """Closed-loop load: `concurrency` threads, each sending one request at a time until stopped.

    Threads alternate between BrokerClient's paths (`paths`): request() waits on the thread's own
    DEALER, submit() goes through the client's I/O thread. `client` should carry nothing but this
    load and status queries, so that its counters are the load's.

    stop() counts everything, the last replies included: each thread finishes the request it has
    in flight; then, once the broker holds no request, the load settles for `settle_s`; then each
    thread sends one more request, a sentinel, on its own path. Replies on one connection arrive
    in the order the broker sent them, so by the time a sentinel's reply arrives its thread (or the
    I/O thread) has read every earlier reply, and any surplus one has been counted.
    """

    def __init__(self, client: BrokerClient, model: str = "echo", concurrency: int = 8,
                 timeout_s: float = 30.0, extra: dict | None = None, paths: tuple[str, ...] = PATHS,
                 settle_s: float = 1.0, classify: Callable[[BrokerError], str] = reason_of):
        self.client = client
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.extra = extra or {}
        self.settle_s = settle_s
        self.classify = classify
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # send no new request
        self._drain = threading.Event()  # the broker has settled: send the sentinel
        self._abort = threading.Event()  # the test failed: skip the sentinel
        self._idle = [threading.Event() for _ in range(concurrency)]  # thread i has its last answer
        self._drain_failures: list[str] = []
        self._ids = itertools.count()
        self._unmatched_at_start = client.unmatched_replies
        self._threads = [
            threading.Thread(target=self._run, args=(i, paths[i % len(paths)]), daemon=True, name=f"load-{i}")
            for i in range(concurrency)
        ]
        self._stopped = False

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.stop()
        elif not self._stopped:  # leave the test's own failure in view; count nothing more
            self._stopped = True
            self._abort.set()
            self._stop.set()
            self._drain.set()

    def stop(self) -> Tally:
        if self._stopped:
            return self.tally
        self._stopped = True
        self._stop.set()
        for index, idle in enumerate(self._idle):
            if not idle.wait(self.timeout_s + _FUTURE_GRACE_S):
                self._abort.set()
                self._drain.set()
                raise AssertionError(f"load thread {index} still waits for an answer after the load stopped")
        settle(self.client, self.settle_s, self.timeout_s)
        self._drain.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name}'s sentinel got no answer in 30 s"
        assert not self._drain_failures, f"could not drain every connection: {self._drain_failures}"
        self.tally.duplicated = self.client.unmatched_replies - self._unmatched_at_start
        return self.tally

    def wait_for_ok(self, count: int, timeout_s: float) -> None:
        start = self.tally.ok
        self.wait_for(lambda tally: tally.ok >= start + count, timeout_s, f"{count} more ok replies")

    def wait_for(self, condition: Callable[[Tally], bool], timeout_s: float, what: str) -> None:
        give_up_at = time.monotonic() + timeout_s
        while not condition(self.tally):
            if time.monotonic() > give_up_at:
                raise AssertionError(f"no {what} in {timeout_s} s: {self.tally}")
            time.sleep(0.01)

    # ------------------------------------------------------------------ internals

    def _run(self, index: int, path: str) -> None:
        try:
            while not self._stop.is_set():
                value = {"n": next(self._ids), **self.extra}
                with self._lock:
                    self.tally.sent += 1
                outcome = self._call(path, value, self.timeout_s)
                backoff_s = self._count(value, outcome)
                if backoff_s:
                    # A client that retried at once would spin on refusals while no worker is up,
                    # and starve the two CI cores that the worker's restart needs.
                    self._stop.wait(backoff_s)
        finally:
            self._idle[index].set()
        self._drain.wait()
        if self._abort.is_set():
            return
        failure = send_sentinel(self.client, self.model, path, index)
        if failure:
            with self._lock:
                self._drain_failures.append(failure)

    def _call(self, path: str, value: dict, timeout_s: float):
        return call(self.client, self.model, path, value, timeout_s)

    def _count(self, value: dict, outcome) -> float:
        """Count one answer; return how long to back off before the next request."""
        with self._lock:
            if isinstance(outcome, BrokerError):
                if outcome.message == _LOCAL_TIMEOUT:
                    self.tally.lost += 1
                    return 0.0
                self.tally.errors[outcome.code.value] += 1
                self.tally.reasons[f"{outcome.code.value}: {self.classify(outcome)}"] += 1
                return min(max(outcome.retry_after_s, 0.05), _RETRY_AFTER_CAP_S)
            if outcome is None:
                self.tally.lost += 1
            elif outcome == [value]:
                self.tally.ok += 1
            else:
                self.tally.wrong += 1
            return 0.0


def call(client: BrokerClient, model: str, path: str, value, timeout_s: float):
    """The outputs of one request on `path`, or the BrokerError it ended in, or None: no answer at all."""
    try:
        if path == "request":
            return client.request(model, [value], timeout_s=timeout_s)
        return client.submit(model, [value], timeout_s=timeout_s).result(timeout=timeout_s + _FUTURE_GRACE_S)
    except BrokerError as error:
        return error
    except FutureTimeout:
        return None


def settle(client: BrokerClient, settle_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Wait until the broker holds no request, then settle_s more, for any reply it might still
    send (a late worker result answered a second time, say). Call it once every request the test
    sent has had its answer: the broker then holds one only if it could still reply to it."""
    give_up_at = time.monotonic() + timeout_s
    while (held := _held_by_broker(client)) != 0:
        if time.monotonic() > give_up_at:
            raise AssertionError(f"the broker still holds {held} requests after every one had its answer")
        time.sleep(0.02)
    # Not a condition: this window is the observation (nothing may arrive), and a stale result
    # from a resumed worker, the slowest way to answer twice here, comes well within it.
    time.sleep(settle_s)


def send_sentinel(client: BrokerClient, model: str, path: str, index: int = 0) -> str | None:
    """One more request on `path`, from this thread, after settle(). Replies on one connection come
    in the order the broker sent them, so when the sentinel's reply arrives, every earlier reply on
    that connection has been read and any surplus one counted in `unmatched_replies`. Returns why
    it failed, or None."""
    sentinel = {"sentinel": index, "path": path}
    outcome = call(client, model, path, sentinel, timeout_s=10)
    return None if outcome == [sentinel] else f"{path} sentinel {index}: {outcome!r}"


def unmatched_after_settling(client: BrokerClient, model: str = "echo", settle_s: float = 1.0) -> int:
    """client.unmatched_replies once the broker has settled and both paths (this thread's) are drained."""
    settle(client, settle_s)
    failures = [f for path in PATHS if (f := send_sentinel(client, model, path))]
    assert not failures, f"could not drain the client's connections: {failures}"
    return client.unmatched_replies


def _held_by_broker(client: BrokerClient) -> int | None:
    """Requests held by the brokers that answer (a client of several lists each under "brokers")."""
    try:
        status = client.status()
    except BrokerError:
        return None  # not answering right now: not settled
    return sum(b["stats"]["in_flight_requests"] for b in status.get("brokers", [status]) if "stats" in b)


@contextlib.contextmanager
def broker_clients(stack) -> Iterator[Callable[[], BrokerClient]]:
    """Make BrokerClients of the stack's broker (the one started last); all are closed on exit."""
    clients: list[BrokerClient] = []

    def make() -> BrokerClient:
        # 0.5 s heartbeats: quick to notice a restarted broker, slow enough not to mistake a
        # starved CPU for a dead one.
        clients.append(BrokerClient(stack.frontend, heartbeat_interval_s=0.5))
        return clients[-1]

    try:
        yield make
    finally:
        for c in clients:
            c.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def live_pids(client: BrokerClient, timeout_s: float = 2.0) -> list[int]:
    """Pids of the workers the broker lists; none while it is down or restarting."""
    try:
        return sorted(w["pid"] for w in client.status(timeout_s=timeout_s)["workers"])
    except BrokerError:
        return []
