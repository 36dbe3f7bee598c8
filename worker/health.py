"""The worker's health file and its watchdog: how a supervisor learns that a worker is stuck.

- **Health file** (--health-file): touched once a heartbeat interval while the worker is
  healthy: some broker answered within its silence window, and no batch has computed for more
  than half the watchdog. A liveness probe that finds it stale restarts the worker.
- **Watchdog** (--watchdog-s): a batch that computes longer than this means a hung model; the
  process ends with EX_TEMPFAIL, so that a supervisor restarts it.

HealthClock, healthy() and hung() decide, with `now` passed in; touch() and exit_hung() act.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: a supervisor should restart us


def hung(now: float, busy_since: float | None, watchdog_s: float) -> bool:
    """A batch (or the oldest pass) has computed for longer than the watchdog allows."""
    return busy_since is not None and now - busy_since > watchdog_s


def healthy(now: float, busy_since: float | None, watchdog_s: float, heard_recently: bool) -> bool:
    """A broker answers, and no batch has computed for more than half the watchdog."""
    return heard_recently and not hung(now, busy_since, watchdog_s / 2)


class HealthClock:
    """When the health file is due a touch: once an interval, if healthy then."""

    def __init__(self, watchdog_s: float, interval_s: float):
        self.watchdog_s = watchdog_s
        self._interval_s = interval_s
        self._due_at = -float("inf")

    def touch_due(self, now: float, busy_since: float | None, heard_recently: bool) -> bool:
        if now < self._due_at:
            return False
        self._due_at = now + self._interval_s
        return healthy(now, busy_since, self.watchdog_s, heard_recently)


def touch(path: str) -> None:
    with open(path, "a"):
        os.utime(path)


def exit_hung(now: float, busy_since: float, watchdog_s: float) -> None:
    logger.critical("batch has computed for %.0f s (watchdog %.0f s): the model is hung; exiting",
                    now - busy_since, watchdog_s)
    logging.shutdown()
    os._exit(WATCHDOG_EXIT_CODE)
