"""HTTP resources of the /v1 API. Thin: read and check the body, ask the broker, write the reply.

    POST /v1/models/{model}/predict   {"inputs": [...], "timeout_ms"?: number, "priority"?: int,
                                       "truncate"?: bool}
                                      (JSON, or the same as application/msgpack; at most
                                      MAX_NESTING_DEPTH levels deep, every string within
                                      --max-input-chars, priority within the protocol's bounds)
         -> 200 {"model": ..., "outputs": [...]}, outputs in input order, in the media type accepted
    GET  /v1/models                   models, their versions and live workers, as the broker reports
                                      them; and the same as OpenAI's model list ("data")
    GET  /v1/status                   the broker's full status (queues, workers, counters)
    GET  /healthz                     200 while this process is up
    GET  /readyz                      200 when the broker answers and a worker is registered, else 503

A model may be named `name@version` to be served only by workers of that version; answers carry
the version that served them as X-Model-Version when it is known (gateway/catalog.py). "truncate"
asks the built-in text models to truncate inputs over their length limit rather than refuse them:
each string input travels as {"text": ..., "truncate": ...} (an object input gets the key added).

Errors are {"error": {"message", "type", "param", "code"}}; gateway/errors.py picks the status.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import falcon
import orjson

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from gateway.async_catalog import AsyncCatalog
from gateway.async_transport import AsyncBrokerClient
from gateway.broker_client import BrokerError
from gateway.catalog import check_model_name, split_version, worker_version
from gateway.config import MAX_NESTING_DEPTH, GatewayConfig
from gateway.tensors import check_v1_inputs

_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_SCALAR_TYPES = frozenset({int, float, bool, type(None), bytes})
# Accept headers that prefer JSON (or send none), known without parsing them: most clients' requests
_JSON_ACCEPTS = frozenset({None, "", "*/*", falcon.MEDIA_JSON})
# A server that knows puts this in a request's ASGI scope once the whole body has arrived
# (gateway/asgi_server.py): read_body then needs no timer to bound the wait for it.
BODY_ARRIVED = "ddml.body_arrived"


async def read_body(req: falcon.Request, config: GatewayConfig) -> bytes:
    """The whole body, at most --max-body-bytes (413), within --body-timeout-s (408: a client that
    trickles its body holds no thread, but it must not hold its connection for ever either)."""
    max_bytes = config.max_body_bytes
    if req.content_length is not None and req.content_length > max_bytes:
        raise BrokerError(ErrorCode.PAYLOAD_TOO_LARGE, f"body of {req.content_length} bytes exceeds {max_bytes}")
    try:
        if req.scope.get(BODY_ARRIVED):  # all there (the usual case): no wait to bound
            data = await req.bounded_stream.read(max_bytes + 1)
        else:
            data = await _read_within(req.bounded_stream, max_bytes + 1, config.body_timeout_s)
    except TimeoutError:
        raise falcon.HTTPError(falcon.HTTP_408, description=f"the body did not arrive within "
                                                            f"{config.body_timeout_s:g} s (--body-timeout-s)",
                               headers={"Connection": "close"}) from None
    if len(data) > max_bytes:
        raise BrokerError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {max_bytes} bytes")
    if req.content_length is not None and len(data) < req.content_length:
        raise BrokerError(ErrorCode.BAD_REQUEST, f"body cut short: {len(data)} of {req.content_length} bytes")
    return data


async def _read_within(stream, size: int, timeout_s: float) -> bytes:
    """stream.read(size), or TimeoutError after timeout_s. asyncio.timeout() (3.11+) puts a timer on
    this task, where wait_for() made a task and a future per request: a tenth of the app's own CPU per
    request (falcon.testing, cProfile)."""
    if _HAS_TIMEOUT:
        async with asyncio.timeout(timeout_s):
            return await stream.read(size)
    return await asyncio.wait_for(stream.read(size), timeout_s)  # pragma: no cover (3.10)


_HAS_TIMEOUT = hasattr(asyncio, "timeout")


def parse_document(req: falcon.Request, data: bytes) -> Any:
    """JSON by default; msgpack when the Content-Type says so. Anything else is refused."""
    return parse_body(req.content_type, data)


def parse_body(content_type: str | None, data: bytes) -> Any:
    """parse_document(), from the Content-Type header's value (None: none sent)."""
    media = (content_type or falcon.MEDIA_JSON).split(";")[0].strip().lower()
    if media in _MSGPACK_TYPES:
        try:
            return protocol.unpack_document(data)
        except protocol.DecodeError as error:
            raise BrokerError(ErrorCode.BAD_REQUEST, f"malformed msgpack body: {error}") from None
    if media not in (falcon.MEDIA_JSON, "text/json") and not media.endswith("+json"):
        raise BrokerError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {media!r} is not supported; send application/json or application/msgpack",
        )
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise BrokerError(ErrorCode.BAD_REQUEST, f"malformed JSON body: {error}") from None


def is_finite_number(value: Any) -> bool:
    """An int, or a float that is neither NaN nor an infinity (bool is not a number here)."""
    kind = type(value)
    return kind is int or (kind is float and math.isfinite(value))


def check_document(document: dict | list, max_chars: int) -> None:
    """Refuse (BAD_REQUEST) a document that nests arrays and objects more than MAX_NESTING_DEPTH
    levels deep, or holds a string (a value or a key, anywhere) over max_chars characters.

    Iterative, so that no depth exhausts the stack. Other leaves (numbers, bytes, numpy arrays)
    pass. A long list of scalars (a numeric tensor) is passed over by one set() of its types, in C.
    """
    stack = [(document, 1, None, None)]  # (node, depth, parent entry, key in parent): paths only on error
    while stack:
        entry = stack.pop()
        node, depth = entry[0], entry[1]
        if depth > MAX_NESTING_DEPTH:
            raise BrokerError(ErrorCode.BAD_REQUEST,
                              f"{_path(entry)} nests arrays and objects more than {MAX_NESTING_DEPTH} levels deep")
        if type(node) is dict:
            for key in node:
                if type(key) is str and len(key) > max_chars:
                    raise _too_long(f"a key in {_path(entry)}", len(key), max_chars)
            children = node.items()
        elif len(node) > 16 and set(map(type, node)) <= _SCALAR_TYPES:
            continue
        else:
            children = enumerate(node)
        for key, child in children:
            kind = type(child)
            if kind is str:
                if len(child) > max_chars:
                    raise _too_long(_path((child, depth, entry, key)), len(child), max_chars)
            elif kind is list or kind is dict:
                stack.append((child, depth + 1, entry, key))


def _too_long(where: str, length: int, max_chars: int) -> BrokerError:
    return BrokerError(ErrorCode.BAD_REQUEST,
                       f"{where} has {length} characters, over the limit of {max_chars} (--max-input-chars)")


def _path(entry: tuple) -> str:
    """Where an entry of check_document's stack is, e.g. inputs[0]['text']; "the body" for the root."""
    keys = []
    while entry[2] is not None:
        keys.append(entry[3])
        entry = entry[2]
    if not keys:
        return "the body"
    keys.reverse()
    first = keys[0] if isinstance(keys[0], str) else f"[{keys[0]}]"
    return (first + "".join(f"[{k}]" if isinstance(k, int) else f"[{k!r}]" for k in keys[1:]))[:200]


def write_document(req: falcon.Request, resp: falcon.Response, document: dict, keep_arrays: bool = False) -> None:
    """JSON, or msgpack if the client prefers it (keep_arrays: arrays as `__ndarray__`, dtype kept)."""
    if req.get_header("Accept") not in _JSON_ACCEPTS and (
            req.client_prefers([falcon.MEDIA_JSON, falcon.MEDIA_MSGPACK]) == falcon.MEDIA_MSGPACK):
        resp.content_type = falcon.MEDIA_MSGPACK
        resp.data = protocol.pack_document(document, keep_arrays)
    else:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = render_json(document)


def render_json(document: dict) -> bytes:
    return orjson.dumps(document, option=_JSON_OPTIONS, default=protocol.to_jsonable)


class PredictResource:
    def __init__(self, broker: AsyncBrokerClient, config: GatewayConfig, catalog: AsyncCatalog):
        self.broker = broker
        self.config = config
        self.catalog = catalog

    async def on_post(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        check_model_name(model)
        body = parse_document(req, await read_body(req, self.config))
        inputs, timeout_s, priority = await self.checked(model, body)
        outputs = await self.broker.request(model, inputs, timeout_s=timeout_s, priority=priority,
                                            request_id_prefix=req.context.request_id)
        self.catalog.mark_version(resp, model)
        write_document(req, resp, {"model": model, "outputs": outputs}, keep_arrays=True)

    async def checked(self, model: str, body: Any) -> tuple[list, float, int]:
        """(inputs as they travel, timeout in seconds, priority) of a parsed body, or a refusal."""
        inputs, timeout_s, priority = self._validate(body)
        await self.catalog.refresh()  # declared tensors, and the version served (a copy at most CACHE_S old)
        return check_v1_inputs(model, self.catalog.metadata(model), inputs), timeout_s, priority

    def _validate(self, body: Any) -> tuple[list, float, int]:
        config = self.config
        if not isinstance(body, dict):
            raise BrokerError(ErrorCode.BAD_REQUEST, f"body must be an object with 'inputs', got {type(body).__name__}")
        inputs = body.get("inputs")
        if not isinstance(inputs, list):
            raise BrokerError(ErrorCode.BAD_REQUEST, "'inputs' must be a list")
        if not inputs:
            raise BrokerError(ErrorCode.BAD_REQUEST, "'inputs' must not be empty")
        if len(inputs) > config.max_inputs:
            raise BrokerError(ErrorCode.BAD_REQUEST, f"{len(inputs)} inputs exceed the limit of {config.max_inputs}")
        check_document(body, config.max_input_chars)
        timeout_ms = body.get("timeout_ms", config.request_timeout_ms)
        if not is_finite_number(timeout_ms) or timeout_ms <= 0:
            raise BrokerError(ErrorCode.BAD_REQUEST, f"'timeout_ms' must be a positive finite number, "
                                                     f"got {timeout_ms!r:.40}")
        priority = body.get("priority", 0)
        if (isinstance(priority, bool) or not isinstance(priority, int)
                or not protocol.MIN_PRIORITY <= priority <= protocol.MAX_PRIORITY):
            raise BrokerError(ErrorCode.BAD_REQUEST, f"'priority' must be an integer from {protocol.MIN_PRIORITY} "
                                                     f"to {protocol.MAX_PRIORITY}, got {priority!r:.40}")
        truncate = body.get("truncate")
        if truncate is not None:
            if not isinstance(truncate, bool):
                raise BrokerError(ErrorCode.BAD_REQUEST, f"'truncate' must be true or false, got {truncate!r:.40}")
            inputs = [_with_truncate(value, truncate) for value in inputs]
        return inputs, min(timeout_ms, config.max_request_timeout_ms) / 1000, priority


def _with_truncate(value: Any, truncate: bool) -> Any:
    """An input as the built-in text models read a truncation request ({"text": ..., "truncate": ...})."""
    if isinstance(value, str):
        return {"text": value, "truncate": truncate}
    if isinstance(value, dict) and "truncate" not in value:
        return {**value, "truncate": truncate}
    return value


class ModelsResource:
    def __init__(self, broker: AsyncBrokerClient):
        # Cached for Catalog.CACHE_S per process: clients polling this must not multiply the broker's work.
        self._status = AsyncCatalog(broker, every_broker=True)

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        await self._status.refresh()
        status = self._status.status()
        now_s = time.time()  # OpenAI's "created" is a Unix time
        models, listed = [], []
        for name, info in status["models"].items():
            if split_version(name)[1] is not None:
                continue  # `name@version`: shown as a version of its model
            workers = [w for w in status["workers"] if name in w["models"]]
            versions = sorted({v for v in (worker_version(w, name) for w in workers) if v is not None})
            models.append({
                "name": name,
                "ready": bool(workers),
                "versions": versions,
                "queued_requests": sum(other["queued_requests"] for key, other in status["models"].items()
                                       if split_version(key)[0] == name),
                "workers": [
                    {**{key: w[key] for key in ("worker_id", "host", "pid", "device", "state", "max_batch_size")},
                     "version": worker_version(w, name)}
                    for w in workers
                ],
                **({"replicas": info["replicas"]} if "replicas" in info else {}),  # with pool workers (#24)
            })
            if workers:
                created = int(now_s - max(w.get("uptime_s", 0.0) for w in workers))
                listed.extend({"id": model_id, "object": "model", "created": created, "owned_by": "ddml"}
                              for model_id in [name, *(f"{name}@{v}" for v in versions)])
        write_document(req, resp, {"models": models, "object": "list", "data": listed})


class StatusResource:
    def __init__(self, broker: AsyncBrokerClient):
        self._status = AsyncCatalog(broker, every_broker=True)  # cached briefly, as /v1/models

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        await self._status.refresh()
        write_document(req, resp, self._status.status())


class HealthResource:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        write_document(req, resp, {"status": "ok"})


class ReadyResource:
    def __init__(self, broker: AsyncBrokerClient):
        self._broker = broker

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = await self._broker.status(timeout_s=1.0)
        # Ready while some broker that answers has a worker (with several brokers, any one will do).
        serving = [b for b in status.get("brokers", [status]) if b.get("workers")]
        if not serving:
            raise BrokerError(ErrorCode.UNAVAILABLE, "the broker answers but no worker is registered")
        write_document(req, resp, {"ready": True, "workers": len(serving[0]["workers"]),
                                   "models": sorted(serving[0]["models"])})
