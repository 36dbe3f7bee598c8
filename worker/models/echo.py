"""EchoModel: returns each input unchanged. CPU-only and deterministic, for tests and bench.

With test_directives (ddml-worker --echo-test-directives, for test suites only), a dict input may
carry directives, so that tests can make one input misbehave: {"sleep_s": 0.5} sleeps before the
batch returns, {"invalid": "why"} fails that input alone (InputError), {"raise": "why"} makes the
whole batch raise, as a crashing model would, and {"exit": 3} ends the worker process at once (a
poison input). Without it, which is the default, such dicts are echoed like any other input: no
client can stop or stall a worker that serves echo.
"""

from __future__ import annotations

import os
import time
from typing import Any

from worker.models import InputError, Manager


class EchoModel(Manager):
    max_batch_size = None

    def __init__(self, device: str = "cpu", test_directives: bool = False, **options: Any):
        super().__init__(device, **options)
        self.test_directives = test_directives

    def predict(self, batch: list) -> list:
        if not self.test_directives:
            return list(batch)
        directives = [x for x in batch if isinstance(x, dict)]
        for directive in directives:
            if "exit" in directive:
                os._exit(int(directive["exit"]))
            if "raise" in directive:
                raise RuntimeError(f"echo model told to raise: {directive['raise']}")
        sleep_s = max((float(d.get("sleep_s", 0)) for d in directives), default=0.0)
        if sleep_s > 0:
            time.sleep(sleep_s)
        return [
            InputError(str(x["invalid"])) if isinstance(x, dict) and "invalid" in x else x
            for x in batch
        ]
