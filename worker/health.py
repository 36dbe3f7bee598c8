"""The worker's health file and its watchdog: how a supervisor learns that a worker is stuck.

- **Health file** (--health-file): touched once a heartbeat interval while the worker is
  healthy: some broker answered within its silence window, and no batch has computed for more
  than half the watchdog. A probe that finds it stale restarts the worker.
- **Watchdog** (--watchdog-s): a batch that computes longer than this means a hung model; the
  process ends with EX_TEMPFAIL, so that a supervisor restarts it.

The decisions (healthy(), hung()) are pure and take `now`; Health does the file and the exit.
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


class Health:
    """The health file and the watchdog of one worker process."""

    def __init__(self, path: str, watchdog_s: float, interval_s: float):
        self._path = path
        self._watchdog_s = watchdog_s
        self._interval_s = interval_s
        self._due_at = -float("inf")

    def check(self, now: float, busy_since: float | None, heard_recently: bool) -> None:
        """After every poll: end a hung process; touch the file when due and healthy."""
        if now >= self._due_at:
            self._due_at = now + self._interval_s
            if self._path and healthy(now, busy_since, self._watchdog_s, heard_recently):
                with open(self._path, "a"):
                    os.utime(self._path)
        if hung(now, busy_since, self._watchdog_s):
            logger.critical("batch has computed for %.0f s (watchdog %.0f s): the model is hung; exiting",
                            now - busy_since, self._watchdog_s)
            logging.shutdown()
            os._exit(WATCHDOG_EXIT_CODE)
