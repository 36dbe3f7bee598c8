"""Load and bookkeeping for the chaos tests: every request sent is accounted for.

- ok: the reply carried exactly this request's input back (echo model);
- errors: a clear error reply, by code;
- lost: no reply from the broker before deadline + grace (the client gave up on its own);
- duplicated: a reply arrived for a request already answered;
- wrong: a reply carried another request's output.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from gateway.broker_client import BrokerClient, BrokerError

REPORT = os.environ.get("DDML_CHAOS_REPORT")  # append a Markdown row per scenario when set


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    notes: dict = field(default_factory=dict)  # detection / recovery times and the like

    def record(self, scenario: str) -> None:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "0"
        notes = ", ".join(f"{k} {v}" for k, v in self.notes.items())
        row = (f"| {scenario} | {self.sent} | {self.ok} | {errors} | {self.lost} | {self.duplicated} | "
               f"{self.wrong} | {notes} |")
        print(row)
        if REPORT:
            with open(REPORT, "a") as report:
                report.write(row + "\n")


class Load:
    """Closed-loop load: `concurrency` threads, each sending one request at a time until stopped."""

    def __init__(self, client: BrokerClient, model: str = "echo", concurrency: int = 8,
                 timeout_s: float = 30.0, extra: dict | None = None):
        self.client = client
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.extra = extra or {}
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Tally:
        if not self._stop.is_set():
            self._stop.set()
            for thread in self._threads:
                thread.join(self.timeout_s + 10)
            self.tally.lost += self.client.expired_locally
            self.tally.duplicated += self.client.unmatched_replies
        return self.tally

    def _run(self) -> None:
        while not self._stop.is_set():
            value = {"n": next(self._ids), **self.extra}
            with self._lock:
                self.tally.sent += 1
            try:
                outputs = self.client.request(self.model, [value], timeout_s=self.timeout_s)
                with self._lock:
                    if outputs == [value]:
                        self.tally.ok += 1
                    else:
                        self.tally.wrong += 1
            except BrokerError as error:
                with self._lock:
                    if error.message == "no reply before the deadline":
                        pass  # counted as lost from the client's expired_locally
                    else:
                        self.tally.errors[error.code.value] += 1

    def wait_for_ok(self, count: int, timeout_s: float) -> None:
        give_up_at = time.monotonic() + timeout_s
        start = self.tally.ok
        while self.tally.ok < start + count:
            if time.monotonic() > give_up_at:
                raise AssertionError(f"fewer than {count} replies in {timeout_s} s")
            time.sleep(0.01)


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
