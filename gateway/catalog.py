"""What the broker serves, as this gateway process last heard: models, their metadata, their versions.

A worker serving model `m` at version `v` registers both `m` and `m@v` (worker/serve.py), so the
broker's STATUS lists `m@v` beside `m`, and a request for `m@v` reaches only workers of that
version. The live versions of `m` are therefore the `m@...` names that have workers. The status
is fetched at most once per CACHE_S per process, by one thread at a time; the others keep
answering from the copy they have.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import falcon

from ddml_common.protocol import MAX_NAME_LEN
from gateway.broker_client import BrokerClient, BrokerError
from gateway.errors import invalid

CACHE_S = 1.0  # models change only when workers come and go
_STATUS_TIMEOUT_S = 2.0


def check_model_name(model: str) -> None:
    """A name the wire can carry, or a 400 that names the client's field (not the wire's Request.model)."""
    if not 0 < len(model) <= MAX_NAME_LEN:
        raise invalid(f"'model' must be 1 to {MAX_NAME_LEN} characters, got {len(model)}", "model")


def split_version(model: str) -> tuple[str, str | None]:
    """'m@v' -> ('m', 'v'); 'm' -> ('m', None)."""
    name, at, version = model.partition("@")
    return (name, version) if at else (model, None)


class Catalog:
    def __init__(self, broker: BrokerClient, clock: Callable[[], float] = time.monotonic,
                 every_broker: bool = False):
        self._broker = broker
        self._every_broker = every_broker  # ask every broker (/v1/status, /v1/models), or the first that answers
        self._clock = clock
        self._status: dict | None = None
        self._fetched_at = 0.0
        self._refreshing = threading.Lock()

    def status(self) -> dict:
        """The broker's status, at most CACHE_S old unless a refresh is under way. Raises BrokerError
        when there is no copy and the broker does not answer."""
        cached = self._status
        if cached is not None and self._clock() - self._fetched_at <= CACHE_S:
            return cached
        if not self._refreshing.acquire(blocking=cached is None):
            return cached  # another thread is refreshing it
        try:
            if self._status is None or self._clock() - self._fetched_at > CACHE_S:
                self._status = self._broker.status(timeout_s=_STATUS_TIMEOUT_S, every_broker=self._every_broker)
                self._fetched_at = self._clock()
            return self._status
        finally:
            self._refreshing.release()

    def model(self, model: str) -> dict | None:
        """The broker's entry for a model name (or `name@version`), if a live worker serves it. Its
        metadata is filled in from the entry that carries it (STATUS sends a READY's metadata once)."""
        models = self.status()["models"]
        info = models.get(model)
        if not info or not info.get("workers"):
            return None
        source = info.get("metadata_from")
        if source is not None:
            info = {**info, "metadata": (models.get(source) or {}).get("metadata") or {}}
        return info

    def versions(self, name: str) -> list[str]:
        """The versions of a model that live workers serve, sorted."""
        return live_versions(self.status(), name)

    def version_served(self, model: str) -> str | None:
        """The version that answers a request for `model`: the one it pins, or the only live one.
        None when it cannot be told (no version, two during a rollout, or no status). Never raises."""
        name, pinned = split_version(model)
        if pinned is not None:
            return pinned
        try:
            versions = self.versions(name)
        except BrokerError:
            return None
        return versions[0] if len(versions) == 1 else None

    def metadata(self, model: str) -> dict:
        """The model's metadata as its workers declared it ({} if unknown). Never raises."""
        try:
            info = self.model(model)
        except BrokerError:
            return {}
        return (info or {}).get("metadata") or {}

    def mark_version(self, resp: falcon.Response, model: str) -> str:
        """Set X-Model-Version when the version is known; the model's name as answers give it: `m@v` then."""
        version = self.version_served(model)
        if version is None:
            return model
        resp.set_header("X-Model-Version", version)
        return f"{split_version(model)[0]}@{version}"


def live_versions(status: dict, name: str) -> list[str]:
    prefix = name + "@"
    return sorted(key[len(prefix):] for key, info in status["models"].items()
                  if key.startswith(prefix) and info.get("workers"))


def worker_version(worker: dict, name: str) -> str | None:
    """The version a worker (as STATUS describes it) serves of a model, if it has one."""
    prefix = name + "@"
    return next((m[len(prefix):] for m in worker["models"] if m.startswith(prefix)), None)
