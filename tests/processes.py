"""Real processes for integration and e2e tests: start them, wait until ready, stop them strictly.

stop() sends SIGTERM, waits, and if the process has not exited it is killed and the test fails:
a process that ignores SIGTERM is a bug worth seeing (Falcon's test_wsgi_servers.py does this).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout_s: float, interval_s: float = 0.02, what: str = ""):
    """Poll a condition until it returns something truthy; fail the test after timeout_s."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > give_up_at:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(interval_s)


class Process:
    """A subprocess whose output goes to a log file that tests can search."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # PYTHONFAULTHANDLER: SIGABRT writes every thread's stack to the log, which stop() uses
        # to show where a process that ignored SIGTERM was stuck.
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                    **(env or {})}
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout_s: float) -> re.Match:
        def found():
            if self.popen.poll() is not None:
                pytest.fail(f"{self.args[2:4]} exited with {self.popen.returncode}:\n{self.output()[-3000:]}")
            return re.search(pattern, self.output())

        return wait_until(found, timeout_s, what=f"{pattern!r} from {self.args}")

    def signal(self, signum: int) -> None:
        os.kill(self.popen.pid, signum)

    def stop(self, timeout_s: float = 20.0, expect_clean: bool = True) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGABRT)  # the stacks, into the log (PYTHONFAULTHANDLER)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)  # its children too
                except ProcessLookupError:
                    pass  # the whole group has gone
                self.popen.wait(5)
                self._log.close()
                if expect_clean:
                    pytest.fail(f"{self.args} ignored SIGTERM for {timeout_s} s:\n{self.output()[-12000:]}")
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def python_module(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def http_ready(url: str, path: str = "/readyz", **kwargs) -> bool:
    """True once GET url+path answers 200; any connection trouble or slowness means not yet."""
    import requests

    try:
        return requests.get(f"{url}{path}", timeout=5, **kwargs).status_code == 200
    except requests.RequestException:
        return False


def scrape(url: str) -> dict[tuple, float]:
    """A Prometheus page as {(sample name, sorted labels): value}, for every sample on it."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum of a scrape's samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def wait_for_models(url: str, names: set[str], timeout_s: float = 60,
                    also: Callable[[list[dict]], bool] = lambda models: True) -> list[dict]:
    """Wait until the gateway at `url` is ready and its /v1/models lists every model in `names` as
    ready (and `also(models)` holds); return that list."""
    import requests

    def listed():
        if not http_ready(url):
            return None
        models = requests.get(f"{url}/v1/models", timeout=5).json()["models"]
        ready = {m["name"] for m in models if m["ready"]} >= names and also(models)
        return models if ready else None

    return wait_until(listed, timeout_s=timeout_s, what=f"models {sorted(names)} ready at {url}")
