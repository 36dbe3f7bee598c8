"""Wire format shared by gateways, the broker and workers.

The only module that touches msgpack or builds frames. A message is:

    [PROTOCOL_VERSION, kind (1 byte), header (msgpack map), item, item, ...]

The header carries everything the broker routes on. Items are the per-input payloads
(request inputs, batch inputs, per-input outputs), each one a separately encoded value, so
that the broker can split, regroup and forward them without decoding them. ROUTER sockets
prepend the peer's routing identity; only broker/broker.py handles that frame.

Values travel as msgpack, except numpy arrays, which travel as raw little-endian buffers
with their dtype and shape. Nothing here unpickles, and msgpack extension types are refused.
See docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import msgpack
import numpy as np

PROTOCOL_VERSION = b"DDML1"
_VERSION_PREFIX = b"DDML"

MAX_HEADER_BYTES = 1 << 20  # the routing header; items are bounded separately
MAX_ITEM_BYTES = 64 << 20  # one encoded input or output
MAX_ITEMS = 1 << 16  # items (frames) in one message
MAX_STR_LEN = 16 << 20  # one string inside a value
MAX_CONTAINER_LEN = 1 << 20  # one list or map inside a value
_NDARRAY_KEY = "__ndarray__"
_ALLOWED_DTYPES = frozenset(
    "|b1 |i1 |u1 <i2 <u2 <i4 <u4 <i8 <u8 <f2 <f4 <f8".split()
)


class DecodeError(ValueError):
    """Frames that are not a valid message of this protocol version."""


class VersionMismatch(DecodeError):
    """A message from a peer that speaks another version of this protocol."""


class Kind(enum.IntEnum):
    READY = 1  # worker -> broker: I serve these models, up to max_batch_size per batch
    HEARTBEAT = 2  # both ways; the broker's carries its instance id, a worker's its stats
    REQUEST = 3  # gateway -> broker: one request, items = its inputs
    BATCH = 4  # broker -> worker: items = inputs, each tagged with its request id
    BATCH_RESULT = 5  # worker -> broker: items = per-input outputs, or per-input errors
    REPLY = 6  # broker -> gateway: items = outputs in input order, or an error
    DISCONNECT = 7  # either side is leaving (or: broker -> worker "register again")
    STATUS_REQUEST = 8  # anyone -> broker: describe models, queues and workers
    STATUS = 9  # broker -> asker
    ERROR = 10  # broker -> peer: your message could not be understood


class ErrorCode(str, enum.Enum):
    """Why a request failed. gateway/errors.py maps each one to exactly one HTTP status."""

    BAD_REQUEST = "BAD_REQUEST"  # malformed or invalid input
    NO_SUCH_MODEL = "NO_SUCH_MODEL"  # no live worker serves this model
    OVERLOADED = "OVERLOADED"  # the model's queue is full; retry after retry_after_ms
    UNAVAILABLE = "UNAVAILABLE"  # broker unreachable, restarted, or shutting down
    TIMEOUT = "TIMEOUT"  # the request's deadline passed
    MODEL_ERROR = "MODEL_ERROR"  # the model raised on this input
    WORKER_LOST = "WORKER_LOST"  # workers died running this input too many times
    BAD_VERSION = "BAD_VERSION"  # the peer speaks another protocol version
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"  # gateway only: body over --max-body-bytes
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"  # gateway only: body neither JSON nor msgpack
    UNAUTHORIZED = "UNAUTHORIZED"  # gateway only: missing or wrong bearer token
    INTERNAL = "INTERNAL"  # a bug; the message says where


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Ready:
    models: list[str]  # model names this worker serves
    max_batch_size: int  # most inputs per batch
    max_batches: int = 2  # batches it may hold at once (credit); 2 lets it pipeline
    device: str = "cpu"  # e.g. "cpu", "cuda:0 (NVIDIA H200)"
    host: str = ""
    pid: int = 0
    metadata: dict = field(default_factory=dict)  # tensors in and out, for KServe v2: {"inputs": [...], ...}


@dataclass(frozen=True, slots=True)
class Heartbeat:
    instance_id: str = ""  # broker -> peer: changes when the broker restarts
    stats: dict = field(default_factory=dict)  # worker -> broker: batches, items, memory
    draining: bool = False  # worker: send me no more batches; broker: acknowledged
    registration: int = 0  # worker: how many READYs it has sent; echoed in a DISCONNECT it prompts


@dataclass(frozen=True, slots=True)
class Request:
    request_id: str  # minted by the gateway; unique per gateway socket
    model: str
    timeout_ms: int  # relative: clocks of different hosts are not comparable
    inputs: list[bytes] = field(default_factory=list)  # items: encode_value() of each input
    sizes: list[int] = field(default_factory=list)  # optional cost hint per input (e.g. chars)
    priority: int = 0  # higher is served first
    instance_id: str = ""  # the broker instance the client last heard; another one refuses it unrun


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: int
    model: str
    request_ids: list[str]  # one per input: the request it belongs to
    timeout_ms: int  # how long the broker will wait for the result
    inputs: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BatchResult:
    batch_id: int
    outputs: list[bytes] = field(default_factory=list)  # one per input; b"" where it failed
    errors: list[list] = field(default_factory=list)  # [[index, ErrorCode value, message], ...]
    compute_ms: float = 0.0

    @staticmethod
    def failed(batch_id: int, size: int, code: ErrorCode, message: str) -> "BatchResult":
        return BatchResult(batch_id, [b""] * size, [[i, code.value, message] for i in range(size)])


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: str
    outputs: list[bytes] = field(default_factory=list)  # in input order
    error_code: str | None = None  # an ErrorCode value, or None on success
    error_message: str = ""
    retry_after_ms: int = 0  # with OVERLOADED: when the queue is expected to have room

    @property
    def ok(self) -> bool:
        return self.error_code is None


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: str = ""
    registration: int = 0  # to a worker: the registration this answers; a worker ignores older ones


@dataclass(frozen=True, slots=True)
class StatusRequest:
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Status:
    request_id: str
    instance_id: str
    models: dict  # name -> {"workers", "queued", "batches", "items", "mean_batch_size", ...}
    workers: list  # one map per live worker
    stats: dict = field(default_factory=dict)  # broker-wide counters


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str


Message = Union[
    Ready, Heartbeat, Request, Batch, BatchResult, Reply, Disconnect, StatusRequest, Status, Error
]

_KIND_BY_TYPE: dict[type, Kind] = {
    Ready: Kind.READY,
    Heartbeat: Kind.HEARTBEAT,
    Request: Kind.REQUEST,
    Batch: Kind.BATCH,
    BatchResult: Kind.BATCH_RESULT,
    Reply: Kind.REPLY,
    Disconnect: Kind.DISCONNECT,
    StatusRequest: Kind.STATUS_REQUEST,
    Status: Kind.STATUS,
    Error: Kind.ERROR,
}
_TYPE_BY_KIND = {kind: t for t, kind in _KIND_BY_TYPE.items()}
# The field that travels as item frames rather than inside the header.
_ITEMS_FIELD = {Request: "inputs", Batch: "inputs", BatchResult: "outputs", Reply: "outputs"}
_KIND_BYTES = {kind: bytes([kind]) for kind in Kind}


def _checker(annotation: Any) -> tuple[type, ...]:
    """The isinstance() check for a header field, derived from its annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _checker(arg))
    base = origin or annotation
    if base is type(None):
        return (type(None),)
    if base is float:
        return (int, float)
    return (base,)


def _schema(message_type: type) -> list[tuple[str, tuple[type, ...], bool]]:
    hints = typing.get_type_hints(message_type)
    items_field = _ITEMS_FIELD.get(message_type)
    return [
        (
            f.name,
            _checker(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(message_type)
        if f.name != items_field
    ]


_SCHEMAS = {t: _schema(t) for t in _KIND_BY_TYPE}


def encode(message: Message) -> list[bytes]:
    """Frames for one message, without the ROUTER identity frame."""
    message_type = type(message)
    items_field = _ITEMS_FIELD.get(message_type)
    header = {
        name: getattr(message, name)
        for name, _, _ in _SCHEMAS[message_type]
    }
    frames = [PROTOCOL_VERSION, _KIND_BYTES[_KIND_BY_TYPE[message_type]], _packb(header)]
    if items_field is not None:
        frames.extend(getattr(message, items_field))
    return frames


def decode(frames: Sequence[bytes]) -> Message:
    """Parse frames from a peer. Raises DecodeError (never anything else) on bad input."""
    if len(frames) < 3:
        raise DecodeError(f"expected at least 3 frames, got {len(frames)}")
    version = bytes(frames[0])
    if version != PROTOCOL_VERSION:
        if version.startswith(_VERSION_PREFIX):
            raise VersionMismatch(
                f"peer speaks protocol {version[:16]!r}, this process speaks {PROTOCOL_VERSION!r}"
            )
        raise DecodeError(f"not a ddml message: first frame {version[:16]!r}")
    kind_frame = frames[1]
    if len(kind_frame) != 1 or kind_frame[0] not in _TYPE_BY_KIND.keys():
        raise DecodeError(f"unknown message kind {bytes(kind_frame[:8])!r}")
    message_type = _TYPE_BY_KIND[kind_frame[0]]  # IntEnum keys match plain ints; no Enum() call per message
    items_field = _ITEMS_FIELD.get(message_type)
    items = list(frames[3:])
    if items and items_field is None:
        raise DecodeError(f"{message_type.__name__} takes no item frames, got {len(items)}")
    if len(items) > MAX_ITEMS:
        raise DecodeError(f"{len(items)} item frames exceed the limit of {MAX_ITEMS}")
    if len(frames[2]) > MAX_HEADER_BYTES:
        raise DecodeError(f"header of {len(frames[2])} bytes exceeds {MAX_HEADER_BYTES}")
    header = _unpackb(frames[2], max_len=MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise DecodeError(f"header must be a map, got {type(header).__name__}")
    kwargs = {}
    for name, expected, required in _SCHEMAS[message_type]:
        if name not in header:
            if required:
                raise DecodeError(f"{message_type.__name__} lacks field {name!r}")
            continue
        value = header[name]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise DecodeError(
                f"{message_type.__name__}.{name} must be "
                f"{'/'.join(t.__name__ for t in expected)}, got {type(value).__name__}"
            )
        kwargs[name] = value
    if items_field is not None:
        for item in items:
            if len(item) > MAX_ITEM_BYTES:
                raise DecodeError(f"item of {len(item)} bytes exceeds {MAX_ITEM_BYTES}")
        kwargs[items_field] = [bytes(item) for item in items]
    message = message_type(**kwargs)
    _check_invariants(message)
    return message


def _check_invariants(message: Message) -> None:
    """Cross-field rules that types alone do not express."""
    if isinstance(message, Request):
        if message.sizes and len(message.sizes) != len(message.inputs):
            raise DecodeError(f"{len(message.sizes)} sizes for {len(message.inputs)} inputs")
    elif isinstance(message, Batch):
        if len(message.request_ids) != len(message.inputs):
            raise DecodeError(f"{len(message.request_ids)} request ids for {len(message.inputs)} inputs")
    elif isinstance(message, BatchResult):
        for error in message.errors:
            if not (isinstance(error, list) and len(error) == 3 and isinstance(error[0], int)):
                raise DecodeError(f"batch result error must be [index, code, message], got {error!r:.80}")
    elif isinstance(message, Reply) and message.error_code is not None:
        if message.error_code not in ErrorCode._value2member_map_:
            raise DecodeError(f"unknown error code {message.error_code!r:.40}")
    elif isinstance(message, Ready):
        if not message.models or not all(isinstance(m, str) for m in message.models):
            raise DecodeError("READY must name at least one model")
        if message.max_batch_size < 1 or message.max_batches < 1:
            raise DecodeError(
                f"READY needs max_batch_size >= 1 and max_batches >= 1, "
                f"got {message.max_batch_size} and {message.max_batches}"
            )


# --------------------------------------------------------------------------- values


def encode_value(value: Any) -> bytes:
    """One input or output as an item frame. numpy arrays (and tensors) travel as raw buffers."""
    return _packb(value)


def decode_value(data: bytes) -> Any:
    """Inverse of encode_value(). Raises DecodeError on anything malformed."""
    if len(data) > MAX_ITEM_BYTES:
        raise DecodeError(f"item of {len(data)} bytes exceeds {MAX_ITEM_BYTES}")
    return _unpackb(data, max_len=MAX_ITEM_BYTES, object_hook=_decode_ndarray)


def _packb(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True, default=_encode_special)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"cannot encode {type(value).__name__} for the wire: {error}") from error


def _unpackb(data: bytes, max_len: int, object_hook=None) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=min(len(data), MAX_STR_LEN),
            max_bin_len=min(len(data), max_len),
            max_array_len=min(len(data), MAX_CONTAINER_LEN),
            max_map_len=min(len(data) // 2, MAX_CONTAINER_LEN),
            max_ext_len=min(len(data), MAX_STR_LEN),  # let _refuse_ext name the type, rather than a length
            ext_hook=_refuse_ext,
            object_hook=object_hook,
        )
    except DecodeError:
        raise
    except Exception as error:  # msgpack: "unpack may raise exception other than subclass of UnpackException"
        raise DecodeError(f"{type(error).__name__}: {error}"[:300]) from error


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not accepted")


def _encode_special(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {_NDARRAY_KEY: _ndarray_fields(value)}
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return {_NDARRAY_KEY: _ndarray_fields(value.detach().cpu().numpy())}
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"unsupported type {type(value).__name__}")


def _ndarray_fields(array: np.ndarray) -> list:
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if little.dtype.str not in _ALLOWED_DTYPES:
        raise TypeError(f"arrays of dtype {array.dtype} cannot travel; use a numeric dtype")
    return [little.dtype.str, list(little.shape), np.ascontiguousarray(little).tobytes()]


def _decode_ndarray(obj: dict) -> Any:
    if len(obj) != 1 or _NDARRAY_KEY not in obj:
        return obj
    fields = obj[_NDARRAY_KEY]
    if not (isinstance(fields, list) and len(fields) == 3):
        raise DecodeError("ndarray must be [dtype, shape, data]")
    dtype, shape, data = fields
    if dtype not in _ALLOWED_DTYPES:
        raise DecodeError(f"dtype {dtype!r:.20} is not allowed on the wire")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise DecodeError("ndarray shape must be a list of non-negative ints")
    if not isinstance(data, bytes):
        raise DecodeError("ndarray data must be bytes")
    itemsize = np.dtype(dtype).itemsize
    expected = itemsize * int(np.prod(shape, dtype=np.int64)) if shape else itemsize
    if expected != len(data):
        raise DecodeError(f"ndarray of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def unpack_document(data: bytes) -> Any:
    """A msgpack HTTP body (the gateway's application/msgpack). Same limits, no extension types."""
    return _unpackb(data, max_len=MAX_ITEM_BYTES)


def pack_document(value: Any) -> bytes:
    """A msgpack HTTP response body; arrays become plain lists, as in JSON."""
    return _packb(to_jsonable(value))


def to_jsonable(value: Any) -> Any:
    """Turn decoded values into plain JSON types. Only the HTTP edge calls this."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
