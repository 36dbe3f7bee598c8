"""This process's id without a system call: os.getpid() is one, and the gateway asked it five times a
request (its request ids, its broker client's fork check, and prometheus_client's per increment).
Kept right across forks (gunicorn's workers, a forked test process)."""

from __future__ import annotations

import os

_pid = os.getpid()


def pid() -> int:
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
