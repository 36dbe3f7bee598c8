"""The management API (issue #24): Triton's model repository extension, and a TorchServe-like scale call.

    POST /v2/repository/index                    every model the brokers know, with its state and reason
    POST /v2/repository/models/{model}/load      load a replica (override: min-replicas >= 1); waits until READY
    POST /v2/repository/models/{model}/unload    unload every pool replica (override: unloaded); drains, waits
    PUT  /v1/models/{model}/replicas             {"min": n, "max": n}: the model's min- and max-replicas
    GET  /v1/models/{model}                      one model as GET /v1/models lists it, replicas and workers

The writes need `Authorization: Bearer <admin key>` (--admin-key-file): none is 401, a wrong one 403,
and without --admin-key-file they are refused 403. An operator's change is an Override
(ddml_common/placement.py) with a version past every one the brokers hold: the gateway sends it to
every broker (StatusRequest.overrides), each broker passes it to its pool workers on the heartbeats
that carry its demand, and the workers hand it back on theirs, so that a broker that was down
learns it from them (docs/placement.md). Nothing here decides placement: the pool workers do.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

import falcon
import orjson

from ddml_common.placement import Override, merge_overrides, overrides_from_wire
from ddml_common.protocol import MAX_REPLICAS, ErrorCode
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from gateway.errors import errors_as, invalid, v2_body
from gateway.catalog import check_model_name
from gateway.resources import read_body, write_document
from gateway.status_fanout import gather_status_async

POLL_S = 0.1  # how often a load or unload looks whether it is done
_SEND_TIMEOUT_S = 2.0  # how long the brokers may take to take an override (a down one learns it from the workers)
DISABLED = "management disabled: start the gateway with --admin-key-file"


class AdminKeys:
    """The admin tokens, compared in constant time against every one; None: the writes are refused."""

    def __init__(self, tokens: list[bytes] | None):
        self._tokens = tokens

    def check(self, header: str | None) -> None:
        if self._tokens is None:
            raise falcon.HTTPForbidden(description=DISABLED)
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise BrokerError(ErrorCode.UNAUTHORIZED, "the management API needs 'Authorization: Bearer <admin key>'")
        presented_bytes = presented.strip().encode()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented_bytes, token)
        if not matched:
            raise falcon.HTTPForbidden(description="the bearer token is not an admin key (--admin-key-file)")


# ------------------------------------------------------------------ what the brokers' views say (pure)


def views_of(status: dict) -> list[dict]:
    """The views of the brokers that answered a status (gateway/status_fanout.py)."""
    return [b for b in status.get("brokers", [status]) if "models" in b]


def held_override(views: list[dict], model: str) -> Override | None:
    merged = merge_overrides(*(overrides_from_wire(v.get("overrides")) for v in views))
    return merged.get(model)


def replicas_of(views: list[dict], model: str) -> dict:
    """The model's "replicas" as the first broker that reports its pool limits says, else {}."""
    entries = [v["models"][model].get("replicas", {}) for v in views if model in v["models"]]
    return next((r for r in entries if "max" in r), entries[0] if entries else {})


def in_pool(views: list[dict], model: str) -> bool:
    """Whether a pool worker's repository lists the model (so that placement may load and unload it)."""
    return "max" in replicas_of(views, model)


def fixed_workers(views: list[dict], model: str) -> int:
    return max((sum(model in w["models"] and "pool" not in w for w in v["workers"]) for v in views), default=0)


def known(views: list[dict], model: str) -> bool:
    return any(model in v["models"] for v in views)


def model_state(views: list[dict], model: str) -> tuple[str, str]:
    """Triton's state of a model (READY, LOADING, UNAVAILABLE) and the reason when it is not READY."""
    entries = [v["models"][model] for v in views if model in v["models"]]
    if any(e.get("workers", 0) > 0 for e in entries):
        return "READY", ""
    replicas = replicas_of(views, model)
    if replicas.get("unloaded") or (held_override(views, model) or Override(0)).unloaded:
        return "UNAVAILABLE", "unloaded by operator"
    if any(e.get("replicas", {}).get("loading", 0) > 0 for e in entries):
        return "LOADING", ""
    failed = next((e["replicas"]["failed"] for e in entries if e.get("replicas", {}).get("failed")), None)
    if failed:
        return "UNAVAILABLE", failed
    if in_pool(views, model):
        return "UNAVAILABLE", "no replica; loads on demand"
    return "UNAVAILABLE", "no live worker serves it"


def repository_index(views: list[dict], ready_only: bool = False) -> list[dict]:
    names = sorted({name for v in views for name in v["models"] if "@" not in name})
    index = []
    for name in names:
        state, reason = model_state(views, name)
        if not ready_only or state == "READY":
            index.append({"name": name, "version": "1", "state": state, "reason": reason})
    return index


def next_version(views: list[dict], model: str, now_ns: int) -> int:
    held = held_override(views, model)
    return max(now_ns, held.version + 1 if held is not None else 0)


def load_override(views: list[dict], model: str, version: int) -> Override:
    """min-replicas at least 1 and not unloaded, keeping what the operator set before."""
    held = held_override(views, model)
    replicas = replicas_of(views, model)
    if held is None:
        return Override(version, max(1, replicas.get("min", 0)))
    low = held.min_replicas if held.min_replicas is not None else (0 if held.unloaded else replicas.get("min", 0))
    high = held.max_replicas
    return Override(version, max(1, low), None if high is None else max(1, high, low))


def unload_override(views: list[dict], model: str, version: int) -> Override:
    """unloaded, keeping the min and max the operator set before (a later load restores them)."""
    held = held_override(views, model)
    return Override(version, held.min_replicas if held else None, held.max_replicas if held else None, True)


def scale_override(views: list[dict], model: str, version: int, low: int | None, high: int | None) -> Override:
    held = held_override(views, model)
    if low is None and held is not None:
        low = held.min_replicas
    if high is None and held is not None:
        high = held.max_replicas
    replicas = replicas_of(views, model)
    if low is not None and high is None and low > replicas.get("max", low):
        high = low  # asked for more than the max: the max follows
    if high is not None and low is None and high < replicas.get("min", 0):
        low = high
    return Override(version, low, high, held.unloaded if held is not None else False)


def check_known(views: list[dict], model: str, verb: str) -> None:
    if not known(views, model):
        raise invalid(f"failed to {verb} '{model}': no pool worker's repository lists it and no worker serves it")


def load_plan(views: list[dict], model: str, now_ns: int) -> Override | None:
    """The override a load sends (None: fixed workers serve the model, nothing to change)."""
    check_known(views, model, "load")
    return load_override(views, model, next_version(views, model, now_ns)) if in_pool(views, model) else None


def load_done(views: list[dict], model: str) -> bool:
    """Whether a replica is READY; raises Triton's 400 once every pool worker failed to load it."""
    state, reason = model_state(views, model)
    if state == "UNAVAILABLE" and reason not in ("unloaded by operator", "no replica; loads on demand",
                                                  "no live worker serves it"):
        raise invalid(f"failed to load '{model}': {reason}")
    return state == "READY"


class Conflict(falcon.HTTPConflict):
    """409: the model is served only by fixed workers, which placement never moves."""

    def __init__(self, message: str):
        super().__init__(description=message)


def unload_plan(views: list[dict], model: str, now_ns: int) -> Override:
    check_known(views, model, "unload")
    if not in_pool(views, model):
        raise Conflict(f"model '{model}' is served only by fixed workers (started with --model), which placement "
                       f"never moves: stop those workers to unload it")
    return unload_override(views, model, next_version(views, model, now_ns))


def unload_done(views: list[dict], model: str) -> bool:
    """Whether no pool worker holds or loads the model any more."""
    entries = [v["models"][model].get("replicas", {}) for v in views if model in v["models"]]
    return all(not r.get("pool_workers") and not r.get("loading") for r in entries)


def replicas_body(body: Any) -> tuple[int | None, int | None]:
    """PUT /v1/models/{m}/replicas' {"min": n, "max": n}, either optional, checked."""
    if not isinstance(body, dict) or not body or set(body) - {"min", "max"}:
        raise invalid('the body must be {"min": n, "max": n} (either key optional, nothing else)')
    for key, value in body.items():
        if type(value) is not int or not 0 <= value <= MAX_REPLICAS:
            raise invalid(f"{key} must be an integer in [0, {MAX_REPLICAS}], got {orjson.dumps(value).decode()[:40]}",
                          param=key)
    low, high = body.get("min"), body.get("max")
    if low is not None and high is not None and low > high:
        raise invalid(f"min ({low}) must be at most max ({high})", param="min")
    return low, high


# ------------------------------------------------------------------ the routes


class Management:
    """What the routes share: the brokers, the admin keys, and how long a load or unload may wait."""

    def __init__(self, broker: Any, config: GatewayConfig, admin: AdminKeys):
        self.broker, self.config, self.admin = broker, config, admin
        self.wait_s = config.request_timeout_ms / 1000

    async def views(self) -> list[dict]:
        return views_of(await self.broker.status(timeout_s=1.0))

    async def send(self, model: str, override: Override) -> list[dict]:
        """The override to every broker; the views of those that took it (at least one, else 503)."""
        status = await gather_status_async(self.broker, list(self.broker.links), _SEND_TIMEOUT_S, True,
                                           {model: override.to_wire()})
        return views_of(status)

    async def prepare(self, req: falcon.Request, model: str) -> list[dict]:
        """A write's checks (admin key, name, body), then the brokers' views."""
        self.admin.check(req.get_header("Authorization"))
        check_model_name(model)
        await _json_body(req, self.config)  # Triton's parameters (a config override, unload_dependents): ignored
        return await self.views()

    async def wait_until(self, done, what: str) -> list[dict]:
        """Poll the brokers until done(views) is true, within the request timeout (else 504)."""
        deadline_at = time.monotonic() + self.wait_s
        while True:
            views = await self.views()
            if done(views):
                return views
            if time.monotonic() >= deadline_at:
                raise BrokerError(ErrorCode.TIMEOUT, f"{what} within {self.wait_s:g} s; it goes on")
            await asyncio.sleep(POLL_S)


async def _json_body(req: falcon.Request, config: GatewayConfig) -> Any:
    data = await read_body(req, config)
    if not data.strip():
        return {}
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise invalid(f"the body is not JSON: {error}") from None


class RepositoryIndex:
    def __init__(self, management: Management):
        self._m = management

    @errors_as(v2_body)
    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = await _json_body(req, self._m.config)
        if not isinstance(body, dict) or type(body.get("ready", False)) is not bool:
            raise invalid('the body must be {} or {"ready": true|false}', param="ready")
        write_document(req, resp, repository_index(await self._m.views(), body.get("ready", False)))


class RepositoryLoad:
    def __init__(self, management: Management):
        self._m = management

    @errors_as(v2_body)
    async def on_post(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        m = self._m
        override = load_plan(await m.prepare(req, model), model, time.time_ns())
        if override is not None:
            await m.send(model, override)
        await m.wait_until(lambda views: load_done(views, model), f"model '{model}' was not loaded")
        write_document(req, resp, {})


class RepositoryUnload:
    def __init__(self, management: Management):
        self._m = management

    @errors_as(v2_body)
    async def on_post(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        m = self._m
        await m.send(model, unload_plan(await m.prepare(req, model), model, time.time_ns()))
        await m.wait_until(lambda views: unload_done(views, model), f"model '{model}' was not unloaded")
        write_document(req, resp, {})


class ModelReplicas:
    def __init__(self, management: Management):
        self._m = management

    async def on_put(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        m = self._m
        m.admin.check(req.get_header("Authorization"))
        check_model_name(model)
        low, high = replicas_body(await _json_body(req, m.config))
        views = await m.views()
        if not known(views, model):
            raise BrokerError(ErrorCode.NO_SUCH_MODEL, f"no pool worker's repository lists model {model!r}")
        if not in_pool(views, model):
            raise Conflict(f"model '{model}' is served only by fixed workers (started with --model): start more or "
                           f"fewer of them to scale it")
        override = scale_override(views, model, next_version(views, model, time.time_ns()), low, high)
        replicas = replicas_of(await m.send(model, override), model)
        write_document(req, resp, {"model": model, "replicas": replicas})


class ModelInfo:
    """GET /v1/models/{model}: the model's entry of GET /v1/models."""

    def __init__(self, management: Management):
        self._m = management

    async def on_get(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        check_model_name(model)
        status = await self._m.broker.status(timeout_s=1.0)
        if model not in status["models"]:
            raise BrokerError(ErrorCode.NO_SUCH_MODEL, f"no live worker serves model {model!r}")
        workers = [w for w in status["workers"] if model in w["models"]]
        state, reason = model_state(views_of(status), model)
        write_document(req, resp, {
            "name": model, "ready": bool(workers), "state": state, "reason": reason,
            "workers": [{key: w.get(key) for key in ("worker_id", "host", "pid", "device", "state")} for w in workers],
            **({"replicas": status["models"][model]["replicas"]} if "replicas" in status["models"][model] else {}),
        })


def add_routes(app: falcon.App, broker: Any, config: GatewayConfig, admin_tokens: list[bytes] | None) -> None:
    management = Management(broker, config, AdminKeys(admin_tokens))
    app.add_route("/v2/repository/index", RepositoryIndex(management))
    app.add_route("/v2/repository/models/{model}/load", RepositoryLoad(management))
    app.add_route("/v2/repository/models/{model}/unload", RepositoryUnload(management))
    app.add_route("/v1/models/{model}/replicas", ModelReplicas(management))
    app.add_route("/v1/models/{model}", ModelInfo(management))
