"""The Open Inference Protocol (KServe v2, as Triton speaks it) on the gateway, beside /v1.

    GET  /v2/health/live | /v2/health/ready                       200 {"live" | "ready": true}, or 400 and false
    GET  /v2/models/{m}[/versions/{v}]/ready                      200 {"name", "ready": true}, or 400 and false
    GET  /v2                                                      server metadata
    GET  /v2/models/{m}[/versions/{v}]                            model metadata (-1 = batch dimension)
    GET  /v2/models/{m}[/versions/{v}]/config                     max_batch_size, input, output, dynamic_batching
    POST /v2/models/{m}[/versions/{v}]/infer                      JSON tensors or the binary tensor extension

Inference requests may carry their tensors as JSON "data" or as raw bytes after the JSON header
(Inference-Header-Content-Length, per-input binary_data_size; BYTES elements as a 4-byte
little-endian length and the bytes). Outputs come back as JSON or binary per output
(parameters.binary_data, or request-level binary_data_output). gzip and deflate work both
ways. The request's "id" is its request id (X-Request-ID: the header when given, else the body's
"id" when it is a valid one, else a new one), and the answer's "id" is that same id;
parameters.priority (1 = highest) and parameters.timeout
(microseconds) map onto the broker's priority (within the protocol's bounds) and the
request's deadline. The JSON header may nest MAX_NESTING_DEPTH levels, a tensor may have as many
dimensions, and no string (JSON or BYTES element) may exceed --max-input-chars. Each row of the
first input's batch dimension is one broker input, so the broker batches rows from many
requests together. Errors are a non-200 status with {"error": "..."}.

Shapes and datatypes come from what the workers declared in READY (Manager.metadata()). A model's
versions are those its live workers serve (gateway/catalog.py); /versions/{v} routes a request
to the workers of version v only, and the answer's model_version (and X-Model-Version) says
which version served it, when that is known.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import falcon
import numpy as np
import orjson

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from gateway.async_catalog import AsyncCatalog
from gateway.async_transport import AsyncBrokerClient
from gateway.broker_client import BrokerClient, BrokerError
from gateway.catalog import Catalog, check_model_name
from gateway.config import MAX_NESTING_DEPTH, GatewayConfig
from gateway.errors import GatewayError, errors_as, v2_body
from gateway.request_ids import valid_request_id
from gateway.resources import check_document, is_finite_number, read_body
from gateway.tensors import check_v2_inputs

SERVER_NAME = "ddml"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "schedule_policy", "model_configuration"]
_NUMPY_BY_DATATYPE = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
_CONFIG_TYPE = {"BYTES": "TYPE_STRING", **{k: f"TYPE_{k}" for k in _NUMPY_BY_DATATYPE}}
# Triton's priority 1 (highest) becomes broker priority MAX_PRIORITY - 1, larger numbers lower ones
# down to 1; 0 stays the default. Every mapped value is within the protocol's bounds.
_PRIORITY_TOP = protocol.MAX_PRIORITY


# Errors on /v2 are {"error": "..."} with a non-200 status, as tritonclient expects: gateway/errors.py
# chooses the status and Retry-After as for every surface, and v2_body only shapes the body.
_v2_errors = errors_as(v2_body)
# No body can hold more elements than it has bytes (a BYTES element takes at least its 4-byte length,
# a JSON one at least a character), so larger shapes are refused before anything is sized from them.
_MAX_ELEMENTS = 1 << 40


def _bad(message: str) -> GatewayError:
    return GatewayError(ErrorCode.BAD_REQUEST, message)


def _model(catalog: Catalog, name: str, version: str | None) -> dict:
    """The broker's entry for a model (at a version, if one is asked for), or 404."""
    info = catalog.model(f"{name}@{version}" if version else name)
    if info is None:
        if version:
            live = ", ".join(catalog.versions(name)) or "none"
            raise GatewayError(ErrorCode.NO_SUCH_MODEL,
                               f"model '{name}' has no live version '{version}' (live versions: {live})")
        raise GatewayError(ErrorCode.NO_SUCH_MODEL, f"no live worker serves model '{name}'")
    return info


def _write_json(resp: falcon.Response, status: int, document: dict) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(document)


def _public(tensors: list[dict]) -> list[dict]:
    return [{k: t[k] for k in ("name", "datatype", "shape")} for t in tensors]


class ServerLive:
    @_v2_errors
    async def on_get(self, req, resp) -> None:
        _write_json(resp, 200, {"live": True})


class ServerReady:
    def __init__(self, catalog: AsyncCatalog):
        self._catalog = catalog

    async def on_get(self, req, resp) -> None:
        await self._catalog.refresh()
        try:
            ready = bool(self._catalog.status()["workers"])
        except BrokerError:
            ready = False
        _write_json(resp, 200 if ready else 400, {"ready": ready})


class ModelReady:
    def __init__(self, catalog: AsyncCatalog):
        self._catalog = catalog

    async def on_get(self, req, resp, model: str, version: str | None = None) -> None:
        await self._catalog.refresh()
        try:
            _model(self._catalog, model, version)
            ready = True
        except BrokerError:
            ready = False
        _write_json(resp, 200 if ready else 400, {"name": model, "ready": ready})


class ServerMetadata:
    async def on_get(self, req, resp) -> None:
        resp.data = orjson.dumps({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
        resp.content_type = falcon.MEDIA_JSON


class ModelMetadata:
    def __init__(self, catalog: AsyncCatalog):
        self._catalog = catalog

    @_v2_errors
    async def on_get(self, req, resp, model: str, version: str | None = None) -> None:
        await self._catalog.refresh()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(model_metadata(self._catalog, model, version))


def model_metadata(catalog: Catalog, model: str, version: str | None) -> dict:
    """A model's v2 metadata document (HTTP and gRPC). Raises GatewayError."""
    metadata = _model(catalog, model, version)["metadata"]
    versions = [version] if version else catalog.versions(model)
    return {
        "name": model, "versions": versions, "platform": metadata.get("platform", "python"),
        "inputs": _public(metadata.get("inputs", [])), "outputs": _public(metadata.get("outputs", [])),
    }


class ModelConfig:
    def __init__(self, catalog: AsyncCatalog):
        self._catalog = catalog

    @_v2_errors
    async def on_get(self, req, resp, model: str, version: str | None = None) -> None:
        await self._catalog.refresh()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(model_config(self._catalog, model, version))


def model_config(catalog: Catalog, model: str, version: str | None) -> dict:
    """A model's Triton configuration document (HTTP and gRPC). Raises GatewayError."""
    info = _model(catalog, model, version)
    metadata = info["metadata"]

    def config_tensors(tensors: list[dict]) -> list[dict]:
        return [{"name": t["name"], "data_type": _CONFIG_TYPE.get(t["datatype"], "TYPE_STRING"),
                 "dims": t["shape"][1:] or [1]} for t in tensors]

    return {
        "name": model, "platform": metadata.get("platform", "python"),
        "max_batch_size": info["max_batch_size"],
        "input": config_tensors(metadata.get("inputs", [])),
        "output": config_tensors(metadata.get("outputs", [])),
        "dynamic_batching": {"max_queue_delay_microseconds": 0},
    }


class Infer:
    def __init__(self, broker: AsyncBrokerClient, catalog: AsyncCatalog, config: GatewayConfig):
        self._broker = broker
        self._catalog = catalog
        self._config = config

    @_v2_errors
    async def on_post(self, req: falcon.Request, resp: falcon.Response, model: str,
                      version: str | None = None) -> None:
        await self._catalog.refresh()
        _model(self._catalog, model, version)  # 404 before the body is read
        # A view: the JSON header and each binary tensor are read where they lie in the body, not copied out.
        body = memoryview(_decompress(req, await read_body(req, self._config), self._config.max_body_bytes))
        header_length = req.get_header("Inference-Header-Content-Length")
        try:
            split = int(header_length) if header_length is not None else len(body)
            if not 0 <= split <= len(body):
                raise ValueError
        except ValueError:
            raise _bad(f"Inference-Header-Content-Length {header_length!r} does not fit the body") from None
        try:
            request = orjson.loads(body[:split])
        except orjson.JSONDecodeError as error:
            raise _bad(f"malformed JSON inference header: {error}") from None
        if not isinstance(request, dict):
            raise _bad("an inference request needs a non-empty 'inputs' list")
        answer_id = req.context.request_id  # the v2 id is the request id: X-Request-ID if given, else the body's
        if not req.context.request_id_given and "id" in request:
            answer_id = request["id"]
            if valid_request_id(answer_id):
                req.context.request_id = answer_id
        call = prepare(self._catalog, self._config, model, version, request, body[split:])
        outputs = await self._broker.request(call.served, call.rows, timeout_s=call.timeout_s,
                                             priority=call.priority, request_id_prefix=req.context.request_id)
        tensors = _output_tensors(call.output_specs, outputs)
        await self._catalog.refresh()
        served = f"{model}@{version}" if version else model
        self._catalog.mark_version(resp, served)
        parameters = request.get("parameters") or {}
        self._write(req, resp, model, request, tensors, bool(parameters.get("binary_data_output", False)),
                    answer_id, self._catalog.version_served(served))

    def _write(self, req, resp, model: str, request: dict, tensors: dict, binary_default: bool,
               answer_id: Any, model_version: str | None) -> None:
        requested = request.get("outputs") or [{"name": name} for name in tensors]
        described, buffers = [], []
        for wanted in requested:
            name = wanted.get("name") if isinstance(wanted, dict) else None
            if name not in tensors:
                raise _bad(f"model '{model}' has no output '{name}' (it has {', '.join(tensors)})")
            datatype, array = tensors[name]
            binary = bool((wanted.get("parameters") or {}).get("binary_data", binary_default))
            entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            if binary:  # the array's own memory, copied once, into the body (below)
                raw = _bytes_tensor_to_raw(array) if datatype == "BYTES" else _bytes_of(array)
                entry["parameters"] = {"binary_data_size": len(raw)}
                buffers.append(raw)
            else:
                flat = array.reshape(-1)
                entry["data"] = [_text(x) for x in flat] if datatype == "BYTES" else flat.tolist()
            described.append(entry)
        document = {"model_name": model, "id": answer_id, "outputs": described}
        if model_version is not None:
            document["model_version"] = model_version
        header = orjson.dumps(document)
        if buffers:
            resp.set_header("Inference-Header-Content-Length", str(len(header)))
            resp.content_type = "application/octet-stream"
            payload = b"".join((header, *buffers))
        else:
            resp.content_type = falcon.MEDIA_JSON
            payload = header
        resp.data = _compress(req, resp, payload)


def infer(broker: BrokerClient, catalog: Catalog, config: GatewayConfig, model: str, version: str | None,
          request: dict, binary: bytes, request_id: str, most_s: float | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """One v2 inference request, blocking (gRPC's): prepare(), the broker's answer, the tensors.
    The HTTP route does the same with an await. Raises BrokerError (GatewayError)."""
    call = prepare(catalog, config, model, version, request, binary, most_s)
    outputs = broker.request(call.served, call.rows, timeout_s=call.timeout_s, priority=call.priority,
                             request_id_prefix=request_id)
    return _output_tensors(call.output_specs, outputs)


@dataclass(frozen=True, slots=True)
class InferCall:
    """What a v2 inference request asks of the broker, and the tensors its outputs become."""

    served: str  # the model name the broker routes by: `name@version` for a pinned version
    rows: list
    timeout_s: float
    priority: int
    output_specs: list[dict]


def prepare(catalog: Catalog, config: GatewayConfig, model: str, version: str | None, request: dict,
            binary: bytes | memoryview, most_s: float | None = None) -> InferCall:
    """A v2 inference request's checks and limits (HTTP and gRPC), and its rows for the broker.

    `request` is the JSON header's document (inputs with data or binary_data_size; parameters),
    `binary` the tensors' raw bytes in input order (a view of the HTTP body: each numeric input
    becomes a read-only array over it, which encode_value() copies once into its item), `most_s` a deadline the caller already has
    (gRPC's). Raises BrokerError (GatewayError)."""
    metadata = _model(catalog, model, version)["metadata"]
    if not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise _bad("an inference request needs a non-empty 'inputs' list")
    check_document(request, config.max_input_chars)
    check_v2_inputs(model, metadata, request["inputs"])
    rows = _rows(request["inputs"], binary, config)
    timeout_s, priority = _schedule(request.get("parameters") or {}, config)
    if most_s is not None:
        timeout_s = min(timeout_s, most_s)
    served = f"{model}@{version}" if version else model
    check_model_name(served)
    return InferCall(served, rows, timeout_s, priority, metadata.get("outputs", []))


def _schedule(parameters: dict, config: GatewayConfig) -> tuple[float, int]:
    timeout_us = parameters.get("timeout")
    if timeout_us is None:
        timeout_s = config.request_timeout_ms / 1000
    elif not is_finite_number(timeout_us) or timeout_us <= 0:
        raise _bad(f"parameters.timeout must be a positive finite number of microseconds, got {timeout_us!r:.40}")
    else:
        timeout_s = min(timeout_us / 1e6, config.max_request_timeout_ms / 1000)
    priority = parameters.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise _bad(f"parameters.priority must be a non-negative integer, got {priority!r:.40}")
    broker_priority = 0 if priority == 0 else _PRIORITY_TOP - min(priority, _PRIORITY_TOP - 1)
    return timeout_s, broker_priority


def _rows(inputs: list, binary: bytes | memoryview, config: GatewayConfig) -> list:
    """One broker input per row of the batch dimension. With several input tensors, a row is a
    {name: value} map; with one, it is the value itself."""
    offset = 0
    columns: dict[str, list] = {}
    batch = None
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise _bad("each input needs a 'name'")
        name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
        if not (isinstance(shape, list) and shape and all(type(n) is int and n >= 0 for n in shape)):
            raise _bad(f"input '{name}' needs a 'shape' of non-negative integers, got {shape!r:.60}")
        if len(shape) > MAX_NESTING_DEPTH:
            raise _bad(f"input '{name}' has {len(shape)} dimensions, over the limit of {MAX_NESTING_DEPTH}")
        # Exact (Python ints): numpy's int64 product wraps, and [1, 2**32, 2**32] became 0 elements.
        count = math.prod(shape)
        if count > _MAX_ELEMENTS:
            raise _bad(f"input '{name}' has a shape of {count} elements, over the limit of {_MAX_ELEMENTS}")
        size = ((tensor.get("parameters") or {}).get("binary_data_size"))
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _bad(f"input '{name}': binary_data_size {size!r} runs past the body")
            raw, offset = binary[offset:offset + size], offset + size
            elements = _raw_to_elements(name, datatype, raw, count, config.max_input_chars)
        elif "data" in tensor:
            elements = _json_to_elements(name, datatype, tensor["data"], count)
        else:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        rows = shape[0]
        if batch is not None and rows != batch:
            raise _bad(f"input '{name}' has batch size {rows}, others have {batch}")
        batch = rows
        if rows == 0 or rows > config.max_inputs:
            raise _bad(f"batch size {rows} must be between 1 and {config.max_inputs}")
        per_row = count // rows
        values = [elements[i * per_row:(i + 1) * per_row] for i in range(rows)]
        if isinstance(elements, np.ndarray):
            values = [v.reshape(shape[1:]) if len(shape) > 1 else v[0] for v in values]
        else:
            values = [v[0] if per_row == 1 else v for v in values]
        columns[name] = values
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data belong to no input")
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: column[i] for name, column in columns.items()} for i in range(batch)]


def _json_to_elements(name: str, datatype: Any, data: Any, count: int):
    flat = list(_flatten(data))
    if len(flat) != count:
        raise _bad(f"input '{name}' has {len(flat)} elements for a shape of {count}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise _bad(f"input '{name}' is BYTES: its JSON data must be strings")
        return flat
    if datatype not in _NUMPY_BY_DATATYPE:
        raise _bad(f"input '{name}' has an unsupported datatype {datatype!r:.20}")
    try:
        return np.asarray(flat, dtype=_NUMPY_BY_DATATYPE[datatype])
    except (TypeError, ValueError, OverflowError) as error:
        raise _bad(f"input '{name}' data does not fit {datatype}: {error}") from None


def _raw_to_elements(name: str, datatype: Any, raw: bytes | memoryview, count: int, max_chars: int):
    if datatype == "BYTES":
        elements, position = [], 0
        while position < len(raw):
            if position + 4 > len(raw):
                raise _bad(f"input '{name}': truncated BYTES length prefix")
            (length,) = struct.unpack_from("<I", raw, position)
            position += 4
            if position + length > len(raw):
                raise _bad(f"input '{name}': a BYTES element runs past its buffer")
            element = _text(bytes(raw[position:position + length]))
            if len(element) > max_chars:
                raise _bad(f"input '{name}' has a BYTES element of {len(element)} characters, "
                                   f"over the limit of {max_chars} (--max-input-chars)")
            elements.append(element)
            position += length
        if len(elements) != count:
            raise _bad(f"input '{name}' has {len(elements)} BYTES elements for a shape of {count}")
        return elements
    if datatype not in _NUMPY_BY_DATATYPE:
        raise _bad(f"input '{name}' has an unsupported datatype {datatype!r:.20}")
    dtype = np.dtype(_NUMPY_BY_DATATYPE[datatype])
    if len(raw) != count * dtype.itemsize:
        raise _bad(f"input '{name}': {len(raw)} bytes for {count} {datatype} elements")
    return np.frombuffer(raw, dtype=dtype)


def _output_tensors(specs: list[dict], outputs: list) -> dict[str, tuple[str, np.ndarray]]:
    """Stack per-row outputs into the tensors the model declared."""
    if not specs:
        specs = [{"name": "OUTPUT", "datatype": "BYTES", "shape": [-1, 1]}]
    tensors = {}
    for spec in specs:
        key = spec.get("key")
        column = [row.get(key) if key is not None and isinstance(row, dict) else row for row in outputs]
        column = [list(v.values()) if isinstance(v, dict) else v for v in column]
        if spec["datatype"] == "BYTES":
            array = np.empty((len(column), 1), dtype=object)
            for i, value in enumerate(column):
                array[i, 0] = value if isinstance(value, (str, bytes)) else orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
        else:
            try:
                array = np.asarray(column, dtype=_NUMPY_BY_DATATYPE.get(spec["datatype"], "<f4"))
            except (TypeError, ValueError) as error:
                raise GatewayError(ErrorCode.MODEL_ERROR,
                                   f"output '{spec['name']}' cannot be made a {spec['datatype']} tensor: {error}")
        tensors[spec["name"]] = (spec["datatype"], array)
    return tensors


def _bytes_of(array: np.ndarray) -> memoryview:
    """A numeric array's bytes in C order, as a view (a copy only where it is not contiguous)."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _bytes_tensor_to_raw(array: np.ndarray) -> bytes:
    parts = []
    for value in array.reshape(-1):
        data = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def _flatten(data: Any):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    return value


def _decompress(req: falcon.Request, body: bytes, limit: int) -> bytes:
    encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise GatewayError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise _bad(f"body is not valid {encoding}: {error}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise GatewayError(ErrorCode.PAYLOAD_TOO_LARGE, f"decompressed body exceeds {limit} bytes")
    return data


def _compress(req: falcon.Request, resp: falcon.Response, payload: bytes) -> bytes:
    accepted = [part.split(";")[0].strip().lower() for part in (req.get_header("Accept-Encoding") or "").split(",")]
    if "gzip" in accepted:
        resp.set_header("Content-Encoding", "gzip")
        return gzip.compress(payload, compresslevel=1)
    if "deflate" in accepted:
        resp.set_header("Content-Encoding", "deflate")
        return zlib.compress(payload, 1)
    return payload


def add_routes(app: falcon.App, broker: AsyncBrokerClient, config: GatewayConfig, catalog: AsyncCatalog) -> None:
    app.add_route("/v2", ServerMetadata())
    app.add_route("/v2/health/live", ServerLive())
    app.add_route("/v2/health/ready", ServerReady(catalog))
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.add_route(prefix, ModelMetadata(catalog))
        app.add_route(f"{prefix}/ready", ModelReady(catalog))
        app.add_route(f"{prefix}/config", ModelConfig(catalog))
        app.add_route(f"{prefix}/infer", Infer(broker, catalog, config))
