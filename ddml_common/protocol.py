"""Wire format shared by gateways, the broker and workers.

The only module that touches msgpack or builds frames. A message is one frame:

    PROTOCOL_VERSION (5 bytes) + kind (1 byte) + body (a msgpack map)

The body carries every field of the message. Items, the per-input payloads (request inputs,
batch inputs, per-input outputs), are each a separately encoded value, so that the broker can
split, regroup and forward them without decoding them. Outputs sit in the body as a list of
msgpack bin values. The inputs of a REQUEST or a BATCH never pass through msgpack at the broker:
the body gives each one's length (`input_bytes`), the small ones travel back to back in one bin
(`inline`), and each one of INPUT_FRAME_BYTES or more in a frame of its own after the first, so
that the broker forwards a large tensor from the frame it came in, with no copy. One frame for
everything else rather than one per item: every frame costs a send and a receive call, and with
five frames a request the broker spent more time in pyzmq than in its own code (bench.echo).
ROUTER sockets prepend the peer's routing identity; only broker/broker.py handles that frame.

Values travel as msgpack, except numpy arrays, which travel as raw little-endian buffers
with their dtype and shape. Nothing here unpickles, and msgpack extension types are refused.
See docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import msgpack
import numpy as np

PROTOCOL_VERSION = b"DDML4"
_VERSION_PREFIX = b"DDML"
_BODY_AT = len(PROTOCOL_VERSION) + 1  # the body starts after the version and the kind byte

MAX_MESSAGE_BYTES = 256 << 20  # one whole message (sockets refuse larger frames before allocating)
MAX_ITEM_BYTES = 64 << 20  # one encoded input or output
MAX_ITEMS = 1 << 16  # items in one message
# An input of at least this many bytes travels in a frame of its own (REQUEST and BATCH): the size from
# which pyzmq sends and receives a frame from its own buffer rather than a copy (zmq.COPY_THRESHOLD).
INPUT_FRAME_BYTES = 64 << 10
MAX_STR_LEN = 16 << 20  # one string inside a value
MAX_CONTAINER_LEN = 1 << 20  # one list or map inside a value
# Bounds on what a peer may choose. State in the broker is keyed by these, so they bound it too.
MAX_MODELS = 64  # model names in one READY
MAX_CATALOG = 1024  # models a pool worker may load (Ready.pool's catalog), or holds, loads or failed to load
MAX_REPLICAS = 1024  # an operator's override: min_replicas and max_replicas are at most this
MAX_NAME_LEN = 256  # a model name, a request id, an error code, an instance id
MIN_PRIORITY, MAX_PRIORITY = -10_000, 10_000  # REQUEST.priority; outside is a clear error (HTTP 400)
# Bounds on every other element, so that a decoded message is safe to use as it is (docs/protocol.md).
MAX_TEXT_LEN = 4096  # an error message from a worker, a DISCONNECT reason, a string among stats
MAX_REPLY_TEXT_LEN = 16 * MAX_TEXT_LEN  # a REPLY's error message: the broker prefixes a worker's
MAX_BATCHES = 64  # READY.max_batches
MAX_SIZE = 1 << 31  # REQUEST.sizes: one input's cost hint is below this
MAX_TRACEPARENT_LEN = 55  # W3C traceparent, version 00: "00-" + 32 + "-" + 16 + "-" + 2 hex digits
MAX_TRACESTATE_LEN = 512  # W3C tracestate: at most 32 members of a few characters each
MAX_DURATION_MS = 1 << 40  # |timeout_ms|, compute_ms, retry_after_ms: 35 years, exact as a float
MAX_ID = (1 << 63) - 1  # batch ids, pids, registration counts: an int64, as every peer's language can hold
MAX_STATS = 256  # entries in a HEARTBEAT's stats, those of nested maps included
MAX_DOCUMENT_DEPTH = 8  # READY.metadata: lists and maps within each other
MAX_DOCUMENT_SIZE = 1 << 20  # READY.metadata: one per value, plus the length of each string
MAX_POOL_EVENTS = 16  # a pool worker's latest events on one heartbeat (Heartbeat.pool['events'])
MAX_STATUS_POOL_EVENTS = 64  # the broker's latest pool events in one STATUS (Status.pool_events)
# Stats that broker/metrics.py exports as numbers: a string there would break every scrape.
_NUMERIC_STATS = frozenset(("batches", "items", "mean_batch_latency_ms", "cuda_memory_allocated_bytes", "pool_loads",
                            "pool_load_failures", "pool_evictions", "pool_unloads", "pool_load_s_total",
                            "pool_memory_used_mb", "pool_memory_budget_mb"))
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
    REPLIES = 11  # broker -> gateway: several successful replies in one message
    REQUESTS = 12  # gateway -> broker: several requests in one message


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
    BUSY = "BUSY"  # worker -> broker only: not run, the worker already holds --max-batches; requeue it unrun
    PASS_FAILED = "PASS_FAILED"  # worker -> broker only: the forward pass it shared failed as a whole; run it alone
    # worker -> broker only: predict() broke its contract for the whole batch (the wrong number of outputs), so
    # every input would fail the same way alone: answered as MODEL_ERROR, never run again input by input
    BATCH_FAILED = "BATCH_FAILED"


# --------------------------------------------------------------------------- messages
# Plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ sets each field
# through object.__setattr__ and costs three times as much, on every message of the hot path.


@dataclass(slots=True)
class Ready:
    models: list[str]  # model names this worker serves
    max_batch_size: int  # most inputs per batch
    max_batches: int = 2  # batches it may hold at once (credit); 2 lets it pipeline
    device: str = "cpu"  # e.g. "cpu", "cuda:0 (NVIDIA H200)"
    host: str = ""
    pid: int = 0
    metadata: dict = field(default_factory=dict)  # tensors in and out, for KServe v2: {"inputs": [...], ...}
    # Continuous batching: the most inputs it may hold at once, from any number of batches, forming
    # its own forward passes from them and answering each input as it is done (partial BATCH_RESULTs).
    # 0: batch credit only (max_batches whole batches, each answered at once).
    max_inputs: int = 0
    # A pool worker (docs/placement.md): {"id": its pool id, "catalog": [models it may load], "max_models": n,
    # "budget_mb": MB (0: none)}, and optionally "max_batch": {model: n}, each catalog model's own most inputs
    # per batch (max_batch_size for those it leaves out), and "placement": {model: [min_replicas, max_replicas]}
    # of its repository. Its `models` are those it holds now, none at first. Empty: not on the wire.
    pool: dict = field(default_factory=dict)


@dataclass(slots=True)
class Heartbeat:
    instance_id: str = ""  # broker -> peer: changes when the broker restarts
    stats: dict = field(default_factory=dict)  # worker -> broker: batches, items, memory
    draining: bool = False  # worker: send me no more batches; broker: acknowledged
    registration: int = 0  # worker: how many READYs it has sent; echoed in a DISCONNECT it prompts
    # A pool worker's holdings: {"held": {model: MB}, "loading": [model], "failed": {model: why}}; they replace
    # the models of its READY. Empty (and then not on the wire) from any other peer. Optionally also
    # "overrides": the operator's overrides it holds (as StatusRequest.overrides), so that a broker that
    # restarted learns them back from its pool workers.
    pool: dict = field(default_factory=dict)
    # broker -> pool worker: the demand and the pool as this broker sees them (docs/placement.md), a
    # bounded JSON-like map that the worker reads defensively. Empty: not on the wire.
    demand: dict = field(default_factory=dict)


@dataclass(slots=True)
class Request:
    request_id: str  # minted by the gateway; unique per gateway socket
    model: str
    timeout_ms: int  # relative: clocks of different hosts are not comparable
    inputs: list[bytes] = field(default_factory=list)  # items: encode_value() of each input
    sizes: list[int] = field(default_factory=list)  # optional cost hint per input (e.g. chars)
    priority: int = 0  # higher is served first
    instance_id: str = ""  # the broker instance the client last heard; another one refuses it unrun
    # The caller's W3C trace context, [traceparent, tracestate]; empty (and then not on the wire) without one.
    trace: list[str] = field(default_factory=list)
    # Ask for the request's timings in its reply (Reply.timings); false (and then not on the wire) by default.
    timings: bool = False


@dataclass(slots=True)
class Batch:
    batch_id: int
    model: str
    request_ids: list[str]  # one per input: the request it belongs to
    timeout_ms: int  # how long the broker will wait for the result
    inputs: list[bytes] = field(default_factory=list)
    # Traced requests only: request id -> [traceparent, tracestate, ms its input waited at the broker].
    # Empty (and then not on the wire) when no request of the batch carries a trace.
    traces: dict = field(default_factory=dict)
    # A request of the batch asked for its timings: the worker reports prepare_ms. False: not on the wire.
    timed: bool = False


@dataclass(frozen=True, slots=True)
class InputFailure:
    """One input's failure, in a BatchResult. On the wire, the list [index, code, message]."""

    index: int  # of the output it replaces (in a partial result: its position in `indices`)
    code: str  # an ErrorCode value; one this version does not know is kept, and answered as MODEL_ERROR
    message: str

    def to_wire(self) -> list:
        return [self.index, self.code, self.message]


@dataclass(slots=True)
class BatchResult:
    batch_id: int
    outputs: list[bytes] = field(default_factory=list)  # one per input; b"" where it failed
    errors: list[InputFailure] = field(default_factory=list)  # decode() makes them InputFailures; see encode()
    compute_ms: float = 0.0
    # A partial result (continuous batching): outputs[k] answers input indices[k] of the batch, and
    # an error's index is k. Empty: outputs answer every input of the batch, in order.
    indices: list[int] = field(default_factory=list)
    # The worker's time preparing (tokenising) the inputs before their forward pass, not counted in
    # compute_ms; sent for a timed Batch only, by a worker that prepares apart. 0: not on the wire.
    prepare_ms: float = 0.0

    @staticmethod
    def failed(batch_id: int, size: int, code: ErrorCode, message: str) -> "BatchResult":
        return BatchResult(batch_id, [b""] * size, [InputFailure(i, code.value, message) for i in range(size)])


@dataclass(slots=True)
class Reply:
    request_id: str
    outputs: list[bytes] = field(default_factory=list)  # in input order
    error_code: str | None = None  # an ErrorCode value, or None on success
    error_message: str = ""
    retry_after_ms: int = 0  # with OVERLOADED: when the queue is expected to have room
    # Where the request's time went, for a Request that asked (TIMINGS: ms, of the input that took longest
    # at each stage). Empty (and then not on the wire) otherwise.
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_code is None


@dataclass(slots=True)
class Replies:
    """Successful replies to one gateway, together: one batch result often finishes many of its
    requests, and one message costs the broker and the gateway one send and one receive instead
    of one per request."""

    request_ids: list[str]
    outputs: list[list[bytes]]  # per request: its outputs (encoded values) in input order
    timings: dict = field(default_factory=dict)  # request id -> its Reply.timings, for those that asked


@dataclass(slots=True)
class Requests:
    """Several requests of one gateway to one broker, together: the requests a gateway's event loop
    submitted in one turn, so that the gateway and the broker pay one send, one receive and one
    unpacking for all of them rather than one each. On the wire, each entry is a REQUEST's body.

    `refused` is never sent: decode() puts there the entries it refused (request id, or "" where it
    cannot be read; and why), so that the broker answers each BAD_REQUEST and still runs the others."""

    requests: list[Request]
    refused: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Disconnect:
    reason: str = ""
    registration: int = 0  # to a worker: the registration this answers; a worker ignores older ones


@dataclass(slots=True)
class StatusRequest:
    request_id: str = ""
    # gateway -> broker (the management API, docs/placement.md): the operator's per-model overrides,
    # {model: {"version": int, "min_replicas": int, "max_replicas": int, "unloaded": bool}} (min and max
    # optional), merged by version into the broker's before it answers. Empty: not on the wire.
    overrides: dict = field(default_factory=dict)


@dataclass(slots=True)
class Status:
    request_id: str
    instance_id: str
    models: dict  # name -> {"workers", "queued", "batches", "items", "mean_batch_size", ...}
    workers: list  # one map per live worker
    stats: dict = field(default_factory=dict)  # broker-wide counters
    # The latest pool events (ddml_common/pool_events.py), oldest first, each with its worker's "pool_id"
    # and "host" and an "age_s" in place of "age_ms". Empty (and then not on the wire) without pool workers.
    pool_events: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # the operator's overrides the broker holds; empty: not on the wire


@dataclass(slots=True)
class Error:
    code: str
    message: str


Message = Union[
    Ready, Heartbeat, Request, Batch, BatchResult, Reply, Replies, Disconnect, StatusRequest, Status, Error, Requests
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
    Replies: Kind.REPLIES,
    Requests: Kind.REQUESTS,
}
_TYPE_BY_KIND = {int(kind): t for t, kind in _KIND_BY_TYPE.items()}
# The field that holds the items (a list of encoded values) for the kinds that have them.
_ITEMS_FIELD = {BatchResult: "outputs", Reply: "outputs"}  # REQUEST's and BATCH's inputs: _cut_inputs()
_PREFIX = {t: PROTOCOL_VERSION + bytes([kind]) for t, kind in _KIND_BY_TYPE.items()}
# Optional fields added after a kind was first released: left out of the body while empty, so that a
# message without them keeps its exact bytes, and an older peer (which ignores keys it does not
# know) still decodes one with them.
_OMITTED_WHEN_EMPTY = {Ready: ("pool",), Heartbeat: ("pool", "demand"), StatusRequest: ("overrides",),
                       Request: ("trace", "timings"), Batch: ("traces", "timed"), BatchResult: ("prepare_ms",),
                       Status: ("pool_events", "overrides"), Reply: ("timings",), Replies: ("timings",)}
# Reply.timings' names: the ms a request's inputs queued at the broker, were prepared (tokenised) at the
# worker, and ran in the forward pass, each the longest of its inputs'.
TIMINGS = frozenset(("queue_ms", "prepare_ms", "forward_ms"))
_MISSING = object()


def _checker(annotation: Any) -> frozenset[type]:
    """The exact types a body field may have, derived from its annotation.

    Exact, not isinstance(): msgpack yields only plain types, and this way a bool is never an int.
    """
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return frozenset(t for arg in typing.get_args(annotation) for t in _checker(arg))
    base = origin or annotation
    if base is float:
        return frozenset((int, float))
    return frozenset((base,))


def _schema(message_type: type) -> list[tuple[str, frozenset[type], bool]]:
    hints = typing.get_type_hints(message_type)
    return [
        (
            f.name,
            _checker(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(message_type)
    ]


_SCHEMAS = {t: _schema(t) for t in _KIND_BY_TYPE if t is not Requests}  # REQUESTS: _decode_requests()
# REQUEST and BATCH: their inputs are not a body field, but `input_bytes` and `inline` plus frames (see encode()).
_RAW_INPUTS = (Request, Batch, Requests)  # the kinds whose large inputs travel in frames after the first
for _type in (Request, Batch):
    _SCHEMAS[_type] = [entry for entry in _SCHEMAS[_type] if entry[0] != "inputs"]
_FIELD_NAMES = {t: tuple(name for name, _, _ in schema) for t, schema in _SCHEMAS.items()}


def encode(message: Message) -> list[bytes]:
    """The frames of one message (one frame, and one more per large input), without the ROUTER identity frame."""
    message_type = type(message)
    if message_type is Request:
        return _encode_request(message)
    if message_type is Requests:
        return _encode_requests(message)
    return _encode_fields(message, message_type)


# A REQUEST's body fields, in _FIELD_NAMES' order (tests/unit/test_protocol.py holds the two equal).
_REQUEST_FIELDS = ("request_id", "model", "timeout_ms", "sizes", "priority", "instance_id", "trace", "timings")


def _request_body(message: Request) -> dict:
    """A REQUEST's body but its inputs: the same map as _encode_fields() builds, from one dict display
    rather than its loops over the field names (the gateway encodes one for every HTTP request)."""
    body = {"request_id": message.request_id, "model": message.model, "timeout_ms": message.timeout_ms,
            "sizes": message.sizes, "priority": message.priority, "instance_id": message.instance_id}
    if message.trace:
        body["trace"] = message.trace
    if message.timings:
        body["timings"] = message.timings
    return body


def _encode_request(message: Request) -> list[bytes]:
    return _with_raw_inputs(_PREFIX[Request], _request_body(message), message.inputs)


def _encode_requests(message: Requests) -> list[bytes]:
    """A REQUESTS message: each entry a REQUEST's body, its small inputs in its own `inline`; then the
    large inputs of every entry, one frame each, in the entries' order."""
    entries, large = [], []
    for request in message.requests:
        if type(request) is not Request:
            raise TypeError(f"a REQUESTS message holds Requests, not {type(request).__name__}")
        body = _request_body(request)
        _lay_out_inputs(body, request.inputs, large)
        entries.append(body)
    return [_packb_after(_PREFIX[Requests], {"requests": entries}), *large]


def _encode_fields(message: Message, message_type: type) -> list[bytes]:
    body = {name: getattr(message, name) for name in _FIELD_NAMES[message_type]}
    if message_type is BatchResult and message.errors:
        # Also takes errors still written as wire lists: the same bytes either way.
        body["errors"] = [e.to_wire() if type(e) is InputFailure else e for e in message.errors]
    for name in _OMITTED_WHEN_EMPTY.get(message_type, ()):
        if not body[name]:
            del body[name]
    if message_type in _RAW_INPUTS:
        return _with_raw_inputs(_PREFIX[message_type], body, message.inputs)
    return [_packb_after(_PREFIX[message_type], body)]


def _with_raw_inputs(prefix: bytes, body: dict, inputs: list) -> list:
    """A REQUEST's or BATCH's frames: the body with its inputs laid out (_lay_out_inputs), then its large inputs."""
    large = []
    _lay_out_inputs(body, inputs, large)
    return [_packb_after(prefix, body), *large]


def _lay_out_inputs(body: dict, inputs: list, large: list) -> None:
    """Put each input's length and the small inputs back to back in `inline` into `body`, and append each
    input of INPUT_FRAME_BYTES or more to `large` (a frame of its own, in order). The large inputs are
    handed over as they are (bytes, or a view of the frame they came in): never copied."""
    if len(inputs) == 1:  # most requests: one small input, inline as it is (join would copy it)
        item = inputs[0]
        size = len(item)
        if size < INPUT_FRAME_BYTES:
            body["input_bytes"], body["inline"] = [size], item
            return
        body["input_bytes"], body["inline"] = [size], b""
        large.append(item)
        return
    sizes = [len(item) for item in inputs]
    big = [item for item, size in zip(inputs, sizes) if size >= INPUT_FRAME_BYTES]
    body["input_bytes"] = sizes
    body["inline"] = b"".join([item for item, size in zip(inputs, sizes) if size < INPUT_FRAME_BYTES]
                              if big else inputs)
    large.extend(big)


def decode(frames: Sequence[bytes]) -> Message:
    """Parse frames from a peer. Raises DecodeError (never anything else) on bad input.

    Every field and every element is checked against the bounds above, so the message that
    comes back is safe to use as it is.
    """
    frame = frames[0] if frames else b""
    version = bytes(frame[: len(PROTOCOL_VERSION)])
    if version != PROTOCOL_VERSION:
        if version.startswith(_VERSION_PREFIX):
            raise VersionMismatch(
                f"peer speaks protocol {version[:16]!r}, this process speaks {PROTOCOL_VERSION!r}"
            )
        raise DecodeError(f"not a ddml message: first frame {bytes(frame[:16])!r}")
    if len(frame) < _BODY_AT + 1:
        raise DecodeError("message has no kind or no body")
    message_type = _TYPE_BY_KIND.get(frame[_BODY_AT - 1])
    if message_type is None:
        raise DecodeError(f"unknown message kind {frame[_BODY_AT - 1]}")
    if len(frames) != 1 and message_type not in _RAW_INPUTS:
        raise DecodeError(f"a {message_type.__name__} message is one frame, got {len(frames)}")
    if len(frame) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = _unpackb(memoryview(frame)[_BODY_AT:], max_len=MAX_ITEM_BYTES)
    if type(body) is not dict:
        raise DecodeError(f"body must be a map, got {type(body).__name__}")
    if message_type is Requests:
        return _decode_requests(body, frames)
    kwargs = _fields_of(body, message_type)
    if message_type in _RAW_INPUTS:
        kind = message_type.__name__
        kwargs["inputs"], used, _ = _cut_inputs(body, frames, 1, kind)
        if used != len(frames):
            raise DecodeError(f"{kind} has {len(frames)} frames, and its inputs take {used}")
    items_field = _ITEMS_FIELD.get(message_type)
    if items_field is not None and items_field in kwargs:
        items = kwargs[items_field]
        if len(items) > MAX_ITEMS:
            raise DecodeError(f"{len(items)} items exceed the limit of {MAX_ITEMS}")
        _check_bins(items, f"{message_type.__name__}.{items_field} must hold bin values")
    message = message_type(**kwargs)
    _CHECKS[message_type](message)
    return message


def _fields_of(body: dict, message_type: type) -> dict:
    """The body's fields of `message_type`, each of its exact types; the required ones present."""
    kwargs = {}
    for name, allowed, required in _SCHEMAS[message_type]:
        value = body.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise DecodeError(f"{message_type.__name__} lacks field {name!r}")
            continue
        if type(value) not in allowed:
            raise DecodeError(
                f"{message_type.__name__}.{name} must be "
                f"{'/'.join(sorted(t.__name__ for t in allowed))}, got {type(value).__name__}"
            )
        kwargs[name] = value
    return kwargs


def _decode_requests(body: dict, frames: Sequence[bytes]) -> Requests:
    """A REQUESTS message. Its layout (the entries' inputs, their lengths, `inline`s and frames) must hold
    as a whole, or nothing decodes. An entry whose own fields are wrong (a model name too long, a
    priority out of range: what a gateway passes on from its clients) is refused alone, into
    `refused`, with its request id where it can be read: every other entry still decodes."""
    entries = body.get("requests", _MISSING)
    if type(entries) is not list or not 0 < len(entries) <= MAX_ITEMS:
        raise _refuse("Requests.requests", f"a list of 1 to {MAX_ITEMS} requests", entries)
    requests, refused = [], []
    frame_index, items, total = 1, 0, 0
    for position, entry in enumerate(entries):
        where = f"Requests.requests[{position}]"
        if type(entry) is not dict:
            raise _refuse(where, "a map", entry)
        inputs, frame_index, size = _cut_inputs(entry, frames, frame_index, where)
        items += len(inputs)
        total += size
        try:
            kwargs = _fields_of(entry, Request)
            kwargs["inputs"] = inputs
            request = Request(**kwargs)
            _check_request(request)
        except DecodeError as error:
            refused.append((_readable_id(entry), f"{where}: {error}"))
            continue
        requests.append(request)
    if frame_index != len(frames):
        raise DecodeError(f"Requests has {len(frames)} frames, and its inputs take {frame_index}")
    if items > MAX_ITEMS:
        raise DecodeError(f"Requests holds {items} inputs in all, over the limit of {MAX_ITEMS}")
    if total > MAX_MESSAGE_BYTES:
        raise DecodeError(f"Requests' inputs of {total} bytes exceed {MAX_MESSAGE_BYTES}")
    return Requests(requests, refused)


def _readable_id(body: Any) -> str:
    """A request's id, where its body holds a valid one; else ""."""
    request_id = body.get("request_id") if type(body) is dict else None
    return request_id if type(request_id) is str and 0 < len(request_id) <= MAX_NAME_LEN else ""


def _cut_inputs(body: dict, frames: Sequence[bytes], frame_index: int, kind: str) -> tuple[list, int, int]:
    """A REQUEST's or BATCH's inputs (or a REQUESTS entry's), as encode() laid them out: cut from `inline`
    and the frames from `frame_index` on by the lengths in `input_bytes`, without looking inside any.
    Returns the inputs, the index of the first frame they left, and their bytes in all. Every length must
    match: the inline bytes are used up exactly, each input of INPUT_FRAME_BYTES or more is exactly one
    frame, and none exceeds MAX_ITEM_BYTES, nor all of them MAX_MESSAGE_BYTES. (The caller checks that
    the message's frames are used up.)"""
    sizes, inline = body.get("input_bytes", _MISSING), body.get("inline", _MISSING)
    if sizes is _MISSING or inline is _MISSING:
        raise DecodeError(f"{kind} lacks field {'input_bytes' if sizes is _MISSING else 'inline'!r}")
    if type(sizes) is not list or len(sizes) > MAX_ITEMS:
        raise _refuse(f"{kind}.input_bytes", f"a list of at most {MAX_ITEMS} lengths", sizes)
    if type(inline) is not bytes:
        raise _refuse(f"{kind}.inline", "bin", inline)
    if len(sizes) == 1 and frame_index == len(frames):  # the usual case: one small input, all of `inline`
        size = sizes[0]
        if type(size) is not int or size != len(inline) or size >= INPUT_FRAME_BYTES:
            raise _refuse(f"{kind}.input_bytes[0]", f"the length of inline ({len(inline)} bytes) and under "
                          f"{INPUT_FRAME_BYTES}", size)
        return [inline], frame_index, size
    inputs, at, total = [], 0, 0
    for index, size in enumerate(sizes):
        if type(size) is not int or not 0 <= size <= MAX_ITEM_BYTES:
            raise _refuse(f"{kind}.input_bytes[{index}]", f"an int in [0, {MAX_ITEM_BYTES}]", size)
        total += size
        if size < INPUT_FRAME_BYTES:
            if at + size > len(inline):
                raise DecodeError(f"{kind}.input_bytes[{index}] ends at byte {at + size} of inline, "
                                  f"which holds {len(inline)}")
            inputs.append(inline[at:at + size])
            at += size
            continue
        if frame_index >= len(frames):
            raise DecodeError(f"{kind}.input_bytes[{index}] ({size} bytes) needs frame {frame_index}, "
                              f"and the message has {len(frames)}")
        item = frames[frame_index]
        if len(item) != size:
            raise DecodeError(f"{kind}.input_bytes[{index}] is {size}, its frame holds {len(item)} bytes")
        inputs.append(item)
        frame_index += 1
    if at != len(inline):
        raise DecodeError(f"{kind}.inline holds {len(inline)} bytes, and its inputs {at}")
    if total > MAX_MESSAGE_BYTES:
        raise DecodeError(f"{kind}'s inputs of {total} bytes exceed {MAX_MESSAGE_BYTES}")
    return inputs, frame_index, total


# --------------------------------------------------------------------------- element checks
# decode() has checked each field's own type. These check what the fields hold, one function per
# message type, so that the broker, workers and gateways can use a decoded message as it is.
# Each costs a few comparisons per field, and a loop only over fields that have elements.


def _check_ready(message: Ready) -> None:
    models = message.models
    if not (0 if message.pool else 1) <= len(models) <= MAX_MODELS:
        raise DecodeError(f"READY must name at least one model (none only from a pool worker) and at most "
                          f"{MAX_MODELS}, got {len(models)}")
    _check_names(models, "Ready.models")
    if not 1 <= message.max_batch_size <= MAX_ITEMS:
        raise _refuse("Ready.max_batch_size", f"in [1, {MAX_ITEMS}]", message.max_batch_size)
    if not 1 <= message.max_batches <= MAX_BATCHES:
        raise _refuse("Ready.max_batches", f"in [1, {MAX_BATCHES}]", message.max_batches)
    _check_text(message.device, "Ready.device", MAX_NAME_LEN)
    _check_text(message.host, "Ready.host", MAX_NAME_LEN)
    if not 0 <= message.pid <= MAX_ID:
        raise _refuse("Ready.pid", "an int in [0, 2**63)", message.pid)
    if not 0 <= message.max_inputs <= MAX_ITEMS:
        raise _refuse("Ready.max_inputs", f"in [0, {MAX_ITEMS}]", message.max_inputs)
    _check_document(message.metadata, "Ready.metadata", MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_SIZE)
    if message.pool:
        _check_pool_registration(message.pool)


def _check_pool_registration(pool: dict) -> None:
    pool_id, catalog = pool.get("id"), pool.get("catalog")
    if type(pool_id) is not str or not 0 < len(pool_id) <= MAX_NAME_LEN:
        raise _refuse("Ready.pool['id']", _NAME, pool_id)
    if type(catalog) is not list or not 0 < len(catalog) <= MAX_CATALOG:
        raise _refuse("Ready.pool['catalog']", f"a list of 1 to {MAX_CATALOG} model names", catalog)
    _check_names(catalog, "Ready.pool['catalog']")
    max_models = pool.get("max_models")
    if type(max_models) is not int or not 1 <= max_models <= MAX_CATALOG:
        raise _refuse("Ready.pool['max_models']", f"an int in [1, {MAX_CATALOG}]", max_models)
    _check_megabytes(pool.get("budget_mb"), "Ready.pool['budget_mb']")
    if "max_batch" in pool:
        _check_pool_batch_caps(pool["max_batch"], catalog)
    placement = pool.get("placement", {})
    if type(placement) is not dict or not set(placement) <= set(catalog):
        raise _refuse("Ready.pool['placement']", "a map of catalog models to [min_replicas, max_replicas]", placement)
    for model, pair in placement.items():
        if (type(pair) is not list or len(pair) != 2 or any(type(n) is not int or not 0 <= n <= MAX_REPLICAS
                                                            for n in pair)):
            raise _refuse(f"Ready.pool['placement'][{model!r}]", f"[min, max], ints in [0, {MAX_REPLICAS}]", pair)


def _check_pool_batch_caps(caps: Any, catalog: list[str]) -> None:
    """Ready.pool's optional "max_batch": {model: most inputs per batch}, each a model of its catalog (the
    broker forms that model's batches up to it; a model not named here gets Ready.max_batch_size)."""
    if type(caps) is not dict or len(caps) > len(catalog):
        raise _refuse("Ready.pool['max_batch']", "a map of catalog models to batch sizes", caps)
    names = frozenset(catalog)
    for model, size in caps.items():
        if model not in names:
            raise _refuse("Ready.pool['max_batch']", "keyed by models of Ready.pool['catalog']", model)
        if type(size) is not int or not 1 <= size <= MAX_ITEMS:
            raise _refuse(f"Ready.pool['max_batch'][{model!r}]", f"an int in [1, {MAX_ITEMS}]", size)


def _check_megabytes(value: Any, where: str) -> None:
    if type(value) not in (int, float) or not 0 <= value <= MAX_DURATION_MS:
        raise _refuse(where, "a finite number of MB in [0, 2**40]", value)


def _check_heartbeat(message: Heartbeat) -> None:
    _check_text(message.instance_id, "Heartbeat.instance_id", MAX_NAME_LEN)
    if message.stats:
        _check_stats(message.stats)
    if not 0 <= message.registration <= MAX_ID:
        raise _refuse("Heartbeat.registration", "an int in [0, 2**63)", message.registration)
    if message.pool:
        _check_holdings(message.pool)
    if message.demand:
        _check_document(message.demand, "Heartbeat.demand", MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_SIZE)


def _check_holdings(pool: dict) -> None:
    """A pool worker's heartbeat: what it holds (MB each), loads, and failed to load (why)."""
    held, loading, failed = pool.get("held", {}), pool.get("loading", []), pool.get("failed", {})
    if type(held) is not dict or len(held) > MAX_CATALOG:
        raise _refuse("Heartbeat.pool['held']", f"a map of at most {MAX_CATALOG} models to MB", held)
    _check_names(list(held), "Heartbeat.pool['held']")
    for model, megabytes in held.items():
        _check_megabytes(megabytes, f"Heartbeat.pool['held'][{model!r}]")
    if type(loading) is not list or len(loading) > MAX_CATALOG:
        raise _refuse("Heartbeat.pool['loading']", f"a list of at most {MAX_CATALOG} models", loading)
    _check_names(loading, "Heartbeat.pool['loading']")
    if type(failed) is not dict or len(failed) > MAX_CATALOG:
        raise _refuse("Heartbeat.pool['failed']", f"a map of at most {MAX_CATALOG} models to reasons", failed)
    _check_names(list(failed), "Heartbeat.pool['failed']")
    for model, why in failed.items():
        _check_text(why, f"Heartbeat.pool['failed'][{model!r}]", MAX_TEXT_LEN)
    if "events" in pool:
        _check_pool_events(pool["events"], "Heartbeat.pool['events']", MAX_POOL_EVENTS, "age_ms", ())
    if "overrides" in pool:
        check_overrides(pool["overrides"], "Heartbeat.pool['overrides']")


_OVERRIDE_KEYS = frozenset(("version", "min_replicas", "max_replicas", "unloaded"))


def check_overrides(overrides: Any, where: str) -> None:
    """{model: {"version", "min_replicas"?, "max_replicas"?, "unloaded"}}, each element within bounds."""
    if type(overrides) is not dict or len(overrides) > MAX_CATALOG:
        raise _refuse(where, f"a map of at most {MAX_CATALOG} models to overrides", overrides)
    _check_names(list(overrides), where)
    for model, override in overrides.items():
        at = f"{where}[{model!r}]"
        if type(override) is not dict or not set(override) <= _OVERRIDE_KEYS:
            raise _refuse(at, "a map of version, min_replicas, max_replicas and unloaded", override)
        version = override.get("version")
        if type(version) is not int or not 0 <= version <= MAX_ID:
            raise _refuse(f"{at}['version']", "an int in [0, 2**63)", version)
        if type(override.get("unloaded", False)) is not bool:
            raise _refuse(f"{at}['unloaded']", "a bool", override.get("unloaded"))
        for key in ("min_replicas", "max_replicas"):
            count = override.get(key, 0)
            if type(count) is not int or not 0 <= count <= MAX_REPLICAS:
                raise _refuse(f"{at}[{key!r}]", f"an int in [0, {MAX_REPLICAS}]", count)
        if override.get("min_replicas", 0) > override.get("max_replicas", MAX_REPLICAS):
            raise _refuse(at, "min_replicas at most max_replicas", override)


def _check_pool_events(events: Any, where: str, most: int, age: str, extra: tuple[str, ...]) -> None:
    """Pool events (ddml_common/pool_events.py): a worker's, on its heartbeat, or a broker's, in STATUS (with
    the `extra` names of the worker, and an age in s)."""
    if type(events) is not list or len(events) > most:
        raise _refuse(where, f"a list of at most {most} events", events)
    for index, event in enumerate(events):
        at = f"{where}[{index}]"
        if type(event) is not dict or len(event) > 7 + len(extra):
            raise _refuse(at, f"a map of at most {7 + len(extra)} entries", event)
        if type(event.get("seq")) is not int or not 0 <= event["seq"] <= MAX_ID:
            raise _refuse(f"{at}['seq']", "an int in [0, 2**63)", event.get("seq"))
        for key in (age, "seconds"):
            value = event.get(key)
            if type(value) not in (int, float) or not 0 <= value <= MAX_DURATION_MS:  # NaN fails too
                raise _refuse(f"{at}[{key!r}]", "a finite number in [0, 2**40]", value)
        for key in ("kind", "model"):
            if type(event.get(key)) is not str or not 0 < len(event[key]) <= MAX_NAME_LEN:
                raise _refuse(f"{at}[{key!r}]", _NAME, event.get(key))
        for key in extra:
            _check_text(event.get(key), f"{at}[{key!r}]", MAX_NAME_LEN)
        _check_text(event.get("reason"), f"{at}['reason']", MAX_TEXT_LEN)
        _check_text(event.get("error", ""), f"{at}['error']", MAX_TEXT_LEN)


def _check_request(message: Request) -> None:
    # The hot path (one per request): the name checks are written out rather than called.
    if not 0 < len(message.request_id) <= MAX_NAME_LEN:
        raise _refuse("Request.request_id", _NAME, message.request_id)
    if not 0 < len(message.model) <= MAX_NAME_LEN:
        raise _refuse("Request.model", _NAME, message.model)
    if len(message.instance_id) > MAX_NAME_LEN:
        raise _refuse("Request.instance_id", f"a str of at most {MAX_NAME_LEN} characters", message.instance_id)
    if not -MAX_DURATION_MS <= message.timeout_ms <= MAX_DURATION_MS:
        raise _refuse("Request.timeout_ms", "an int in [-2**40, 2**40]", message.timeout_ms)
    if not MIN_PRIORITY <= message.priority <= MAX_PRIORITY:
        raise _refuse("Request.priority", f"in [{MIN_PRIORITY}, {MAX_PRIORITY}]", message.priority)
    sizes = message.sizes
    if sizes:
        if len(sizes) != len(message.inputs):
            raise DecodeError(f"{len(sizes)} sizes for {len(message.inputs)} inputs")
        _check_counts(sizes, "Request.sizes", MAX_SIZE, "2**31")
    if message.trace:
        _check_trace(message.trace, "Request.trace", 2)


def _check_trace(trace: list, where: str, length: int) -> None:
    """[traceparent, tracestate] (a Batch's: and the ms queued): bounded strings, then a bounded duration."""
    if len(trace) != length:
        raise _refuse(where, f"a list of {length}", trace)
    _check_text(trace[0], f"{where}[0] (traceparent)", MAX_TRACEPARENT_LEN)
    _check_text(trace[1], f"{where}[1] (tracestate)", MAX_TRACESTATE_LEN)
    if length == 3 and (type(trace[2]) is not int or not 0 <= trace[2] <= MAX_DURATION_MS):
        raise _refuse(f"{where}[2] (queued ms)", "an int in [0, 2**40]", trace[2])


def _check_batch(message: Batch) -> None:
    if not 0 <= message.batch_id <= MAX_ID:
        raise _refuse("Batch.batch_id", "an int in [0, 2**63)", message.batch_id)
    if not 0 < len(message.model) <= MAX_NAME_LEN:
        raise _refuse("Batch.model", _NAME, message.model)
    if len(message.request_ids) != len(message.inputs):
        raise DecodeError(f"{len(message.request_ids)} request ids for {len(message.inputs)} inputs")
    _check_names(message.request_ids, "Batch.request_ids")
    if not -MAX_DURATION_MS <= message.timeout_ms <= MAX_DURATION_MS:
        raise _refuse("Batch.timeout_ms", "an int in [-2**40, 2**40]", message.timeout_ms)
    if message.traces:
        _check_by_request(message.traces, "Batch.traces", len(message.inputs), "inputs", _check_batch_trace)


def _check_batch_trace(trace: Any, where: str) -> None:
    if type(trace) is not list:
        raise _refuse(where, "a list", trace)
    _check_trace(trace, where, 3)


def _check_by_request(values: dict, where: str, most: int, of: str, check: Any) -> None:
    """A map from request ids (names) to values that `check(value, where)` checks: at most one per `of`."""
    if len(values) > most:
        raise DecodeError(f"{len(values)} {where.split('.')[1]} for {most} {of}")
    for request_id, value in values.items():
        if type(request_id) is not str or not 0 < len(request_id) <= MAX_NAME_LEN:
            raise _refuse(f"{where} key", _NAME, request_id)
        check(value, f"{where}[{request_id!r}]")


def _check_batch_result(message: BatchResult) -> None:
    if not 0 <= message.batch_id <= MAX_ID:
        raise _refuse("BatchResult.batch_id", "an int in [0, 2**63)", message.batch_id)
    # One chained comparison refuses NaN (every comparison with it is false) and infinities.
    if not 0 <= message.compute_ms <= MAX_DURATION_MS:
        raise _refuse("BatchResult.compute_ms", "a finite number in [0, 2**40]", message.compute_ms)
    if not 0 <= message.prepare_ms <= MAX_DURATION_MS:
        raise _refuse("BatchResult.prepare_ms", "a finite number in [0, 2**40]", message.prepare_ms)
    indices = message.indices
    if indices:
        if len(indices) != len(message.outputs):
            raise DecodeError(f"{len(indices)} indices for {len(message.outputs)} outputs")
        _check_counts(indices, "BatchResult.indices", MAX_ITEMS, str(MAX_ITEMS))
        if len(set(indices)) != len(indices):
            raise DecodeError("BatchResult.indices names an input twice")
    errors = message.errors
    if not errors:
        return
    size = len(message.outputs)
    seen = set()
    typed = []
    for position, error in enumerate(errors):
        where = f"BatchResult.errors[{position}]"
        if type(error) is not list or len(error) != 3:
            raise _refuse(where, "[index, code, message]", error)
        index, code, text = error
        if type(index) is not int or not 0 <= index < size:
            raise _refuse(f"{where} index", f"an int in [0, {size}) (one per output)", index)
        if index in seen:
            raise DecodeError(f"BatchResult.errors names output {index} twice")
        seen.add(index)
        # Unknown codes are allowed: the broker answers them as MODEL_ERROR.
        if type(code) is not str or len(code) > MAX_NAME_LEN:
            raise _refuse(f"{where} code", f"a str of at most {MAX_NAME_LEN} characters", code)
        if type(text) is not str or len(text) > MAX_TEXT_LEN:
            raise _refuse(f"{where} message", f"a str of at most {MAX_TEXT_LEN} characters", text)
        typed.append(InputFailure(index, code, text))
    message.errors = typed  # every reader uses fields, never positions


def _check_reply(message: Reply) -> None:
    if not 0 < len(message.request_id) <= MAX_NAME_LEN:
        raise _refuse("Reply.request_id", _NAME, message.request_id)
    if message.error_code is not None and message.error_code not in ErrorCode._value2member_map_:
        raise DecodeError(f"unknown error code {_describe(message.error_code)}")
    _check_text(message.error_message, "Reply.error_message", MAX_REPLY_TEXT_LEN)
    if not 0 <= message.retry_after_ms <= MAX_DURATION_MS:
        raise _refuse("Reply.retry_after_ms", "an int in [0, 2**40]", message.retry_after_ms)
    if message.timings:
        _check_timings(message.timings, "Reply.timings")


def _check_timings(timings: Any, where: str) -> None:
    """A map of some of TIMINGS' names to a finite number of ms in [0, 2**40]."""
    if type(timings) is not dict:
        raise _refuse(where, "a map", timings)
    for name, value in timings.items():
        if name not in TIMINGS:
            raise _refuse(f"{where} key", f"one of {', '.join(sorted(TIMINGS))}", name)
        if type(value) not in (int, float) or not 0 <= value <= MAX_DURATION_MS:
            raise _refuse(f"{where}[{name!r}]", "a finite number in [0, 2**40]", value)


def _check_replies(message: Replies) -> None:
    if len(message.request_ids) != len(message.outputs):
        raise DecodeError(f"{len(message.request_ids)} request ids for {len(message.outputs)} output lists")
    _check_names(message.request_ids, "Replies.request_ids")
    for position, outputs in enumerate(message.outputs):
        if type(outputs) is not list or len(outputs) > MAX_ITEMS:
            raise _refuse(f"Replies.outputs[{position}]", f"lists of bin values, at most {MAX_ITEMS}", outputs)
        _check_bins(outputs, "REPLIES outputs must be lists of bin values")
    if message.timings:
        _check_by_request(message.timings, "Replies.timings", len(message.request_ids), "replies", _check_timings)


def _check_disconnect(message: Disconnect) -> None:
    _check_text(message.reason, "Disconnect.reason", MAX_TEXT_LEN)
    if not 0 <= message.registration <= MAX_ID:
        raise _refuse("Disconnect.registration", "an int in [0, 2**63)", message.registration)


def _check_status_request(message: StatusRequest) -> None:
    _check_text(message.request_id, "StatusRequest.request_id", MAX_NAME_LEN)
    if message.overrides:
        check_overrides(message.overrides, "StatusRequest.overrides")


def _check_status(message: Status) -> None:
    """The broker's own report: only its shape is checked, as the gateway and ddml-status read it."""
    _check_text(message.request_id, "Status.request_id", MAX_NAME_LEN)
    _check_text(message.instance_id, "Status.instance_id", MAX_NAME_LEN)
    for name, model in message.models.items():
        _check_text(name, "Status.models key", MAX_NAME_LEN)
        if type(model) is not dict:
            raise _refuse(f"Status.models[{name!r}]", "a map", model)
    for position, worker in enumerate(message.workers):
        if type(worker) is not dict:
            raise _refuse(f"Status.workers[{position}]", "a map", worker)
    for name in message.stats:
        _check_text(name, "Status.stats key", MAX_NAME_LEN)
    if message.pool_events:
        _check_pool_events(message.pool_events, "Status.pool_events", MAX_STATUS_POOL_EVENTS, "age_s",
                           ("pool_id", "host"))
    if message.overrides:
        check_overrides(message.overrides, "Status.overrides")


def _check_error(message: Error) -> None:
    _check_text(message.code, "Error.code", MAX_NAME_LEN)
    _check_text(message.message, "Error.message", MAX_REPLY_TEXT_LEN)


_CHECKS = {
    Ready: _check_ready,
    Heartbeat: _check_heartbeat,
    Request: _check_request,
    Batch: _check_batch,
    BatchResult: _check_batch_result,
    Reply: _check_reply,
    Replies: _check_replies,
    Disconnect: _check_disconnect,
    StatusRequest: _check_status_request,
    Status: _check_status,
    Error: _check_error,
}
_NAME = f"a non-empty str of at most {MAX_NAME_LEN} characters"
_SCALARS = frozenset((int, float, str, bool, type(None)))
_SCALAR = f"an int, a finite float, a str of at most {MAX_TEXT_LEN} characters, a bool or nil"
_isfinite = math.isfinite


def _refuse(where: str, expected: str, value: Any) -> DecodeError:
    return DecodeError(f"{where} must be {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    """A short account of a received value: never its whole text, nor a container's contents."""
    kind = type(value)
    if kind is str:
        return f"str {value!r}" if len(value) <= 40 else f"str {value[:40]!r}... ({len(value)} characters)"
    if kind is list:
        return f"a list of {len(value)}"
    if kind is dict:
        return f"a map of {len(value)}"
    if kind is bytes:
        return f"bin of {len(value)} bytes"
    if value is None:
        return "nil"
    return f"{kind.__name__} {value!r:.40}"  # an int (64 bits at most), a float or a bool


def _check_text(value: Any, where: str, max_len: int) -> None:
    if type(value) is not str or len(value) > max_len:
        raise _refuse(where, f"a str of at most {max_len} characters", value)


def _check_names(values: list, where: str) -> None:
    for value in values:
        if type(value) is not str or not 0 < len(value) <= MAX_NAME_LEN:
            raise _refuse(f"{where}[{values.index(value)}]", _NAME, value)


def _check_counts(values: list, where: str, bound: int, bound_text: str) -> None:
    """Every element an int in [0, bound)."""
    for index, value in enumerate(values):
        if type(value) is not int or not 0 <= value < bound:
            raise _refuse(f"{where}[{index}]", f"an int in [0, {bound_text})", value)


def _check_stats(stats: dict) -> None:
    """A worker's figures: names to scalars, or to one level of maps of scalars."""
    count = len(stats)
    if count > MAX_STATS:
        raise _too_many_stats(count)
    for name, value in stats.items():
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
            raise _refuse("Heartbeat.stats key", _NAME, name)
        if type(value) is dict:
            count += len(value)
            if count > MAX_STATS:
                raise _too_many_stats(count)
            for inner, inner_value in value.items():
                if type(inner) is not str or not 0 < len(inner) <= MAX_NAME_LEN:
                    raise _refuse(f"Heartbeat.stats[{name!r}] key", _NAME, inner)
                if not _is_scalar(inner_value):
                    raise _refuse(f"Heartbeat.stats[{name!r}][{inner!r}]", _SCALAR, inner_value)
        elif not _is_scalar(value):
            raise _refuse(f"Heartbeat.stats[{name!r}]", _SCALAR, value)
    for name in _NUMERIC_STATS.intersection(stats):
        if type(stats[name]) not in (int, float):
            raise _refuse(f"Heartbeat.stats[{name!r}]", "a number", stats[name])


def _too_many_stats(count: int) -> DecodeError:
    return DecodeError(f"Heartbeat.stats must hold at most {MAX_STATS} entries, nested ones included, "
                       f"got at least {count}")


def _is_scalar(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return _isfinite(value)
    if kind is str:
        return len(value) <= MAX_TEXT_LEN
    return kind in _SCALARS


def document_size(value: Any) -> int:
    """The size of a JSON-like value that decode() let through (READY.metadata), in the units of
    MAX_DOCUMENT_SIZE: one per value plus the length of each string."""
    return MAX_DOCUMENT_SIZE - _check_document(value, "document", MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_SIZE)


def _check_document(value: Any, where: str, depth: int, budget: int) -> int:
    """A JSON-like value (str keys, finite floats, no bin) of bounded depth and size.

    The size is one per value plus the length of each string, about its encoded size; a
    container is charged for its elements before they are visited. Returns what is left.
    """
    kind = type(value)
    if kind is dict or kind is list:
        if depth == 0:
            raise DecodeError(f"{where} nests lists and maps deeper than {MAX_DOCUMENT_DEPTH}")
        budget -= len(value)
        if budget < 0:
            raise _too_large(where)
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    raise _refuse(f"{where} key", "a str", key)
                budget = _check_document(item, where, depth - 1, budget - len(key))
        else:
            for item in value:
                budget = _check_document(item, where, depth - 1, budget)
    elif kind is str:
        budget -= len(value)
    elif kind is float:
        if not _isfinite(value):
            raise _refuse(f"{where} number", "finite", value)
    elif kind not in _SCALARS:
        raise _refuse(f"{where} value", "JSON-like (no bin)", value)
    if budget < 0:
        raise _too_large(where)
    return budget


def _too_large(where: str) -> DecodeError:
    return DecodeError(f"{where} exceeds {MAX_DOCUMENT_SIZE} (one per value, plus the length of each string)")


def _check_bins(items: list, complaint: str) -> None:
    """Items are bin values; their sizes were bounded while unpacking (max_bin_len)."""
    for item in items:
        if type(item) is not bytes:
            raise DecodeError(f"{complaint}, got {type(item).__name__}")


def request_id_of(frames: Sequence[bytes]) -> str | None:
    """The request id of a REQUEST that decode() refused, where one can be read safely: so that the
    broker can answer BAD_REQUEST at once instead of leaving its sender to wait for its deadline."""
    ids = request_ids_of(frames) if frames and bytes(frames[0][:_BODY_AT]) == _PREFIX[Request] else []
    return ids[0] if ids else None


def request_ids_of(frames: Sequence[bytes]) -> list[str]:
    """The request ids of a REQUEST or a REQUESTS that decode() refused, those that can be read safely
    (at most MAX_ITEMS): so that the broker answers each BAD_REQUEST at once."""
    frame = frames[0] if frames else b""
    prefix = bytes(frame[:_BODY_AT])
    if prefix not in (_PREFIX[Request], _PREFIX[Requests]) or len(frame) > MAX_MESSAGE_BYTES:
        return []
    try:
        body = _unpackb(memoryview(frame)[_BODY_AT:], max_len=MAX_ITEM_BYTES)
    except DecodeError:
        return []
    if prefix == _PREFIX[Request]:
        request_id = _readable_id(body)
        return [request_id] if request_id else []
    entries = body.get("requests") if type(body) is dict else None
    if type(entries) is not list:
        return []
    return [request_id for request_id in map(_readable_id, entries[:MAX_ITEMS]) if request_id]


def replies_of(message: Message) -> list[Reply]:
    """The replies that a REPLY or a REPLIES message carries; none for any other kind."""
    if isinstance(message, Reply):
        return [message]
    if isinstance(message, Replies):
        timings = message.timings
        if timings:
            return [Reply(request_id, outputs, timings=timings.get(request_id) or {})
                    for request_id, outputs in zip(message.request_ids, message.outputs)]
        return [Reply(request_id, outputs) for request_id, outputs in zip(message.request_ids, message.outputs)]
    return []


# --------------------------------------------------------------------------- values


def encode_value(value: Any) -> bytes:
    """One input or output as an item frame. numpy arrays (and tensors) travel as raw buffers."""
    kind = type(value)
    if kind is np.ndarray:
        return _array_item(*_ndarray_fields(value))
    if kind is dict and len(value) == 1 and _NDARRAY_KEY in value:  # a msgpack client's array, passed on as it came
        fields = value[_NDARRAY_KEY]
        if type(fields) is list and len(fields) == 3 and type(fields[0]) is str and type(fields[2]) is bytes:
            return _array_item(*fields)
    return _packb(value)


def decode_value(data: bytes | memoryview, writable: bool = True) -> Any:
    """Inverse of encode_value(). Raises DecodeError on anything malformed. An array item (a buffer,
    e.g. a view of the frame it came in, that holds one `__ndarray__` map) becomes an array with one
    copy of its data, writable; with writable=False, none: a read-only view of `data`."""
    if len(data) > MAX_ITEM_BYTES:
        raise DecodeError(f"item of {len(data)} bytes exceeds {MAX_ITEM_BYTES}")
    if data[:_ARRAY_HEAD_LEN] == _ARRAY_HEAD:
        array = _array_of_item(data, writable)
        if array is not None:
            return array
    return _unpackb(data, max_len=MAX_ITEM_BYTES, object_hook=_decode_ndarray)


# An array item, as msgpack packs {"__ndarray__": [dtype, shape, data]}: a map of one key, the key (a
# fixstr of 11), an array of 3; then the dtype (str), the shape (array of ints), the data (bin).
_ARRAY_HEAD = b"\x81\xab" + _NDARRAY_KEY.encode() + b"\x93"
_ARRAY_HEAD_LEN = len(_ARRAY_HEAD)
_ARRAY_FIELDS_MAX = 256  # the dtype and the shape of any allowed array take fewer bytes (16 dims of 9 bytes)
_BIN_HEADS = ((1 << 8, b"\xc4", 1), (1 << 16, b"\xc5", 2), (1 << 32, b"\xc6", 4))  # msgpack bin 8, 16, 32


def _array_item(dtype: str, shape: list, data) -> bytes:
    """encode_value() of an array, with one copy of its data: the small head packed, then joined to
    the data's buffer. The same bytes as packing {"__ndarray__": [dtype, shape, data]} (msgpack
    chooses the shortest bin header, as here)."""
    size = len(data) if type(data) is bytes else memoryview(data).nbytes
    for bound, marker, width in _BIN_HEADS:
        if size < bound:
            break
    else:
        raise TypeError(f"an array of {size} bytes cannot travel")
    head = _ARRAY_HEAD + _packb(dtype) + _packb(shape) + marker + size.to_bytes(width, "big")
    return b"".join((head, data))


def _array_of_item(data: bytes | memoryview, writable: bool) -> np.ndarray | None:
    """The array of an item that is exactly one `__ndarray__` map, or None when it is anything else
    (then the general path decodes it, or says why it cannot). Its dtype and shape are checked as
    _decode_ndarray checks them, and its data must fill the rest of the item."""
    try:
        unpacker = msgpack.Unpacker(raw=False, ext_hook=_refuse_ext, max_buffer_size=_ARRAY_FIELDS_MAX)
        unpacker.feed(bytes(data[_ARRAY_HEAD_LEN:_ARRAY_HEAD_LEN + _ARRAY_FIELDS_MAX]))
        dtype, shape = unpacker.unpack(), unpacker.unpack()
        at = _ARRAY_HEAD_LEN + unpacker.tell()
    except Exception:  # msgpack: "unpack may raise exception other than subclass of UnpackException"
        return None
    if type(dtype) is not str or dtype not in _ALLOWED_DTYPES or type(shape) is not list \
            or not all(type(n) is int and n >= 0 for n in shape):
        return None
    marker = data[at:at + 1]
    for _, head, width in _BIN_HEADS:
        if marker == head:
            break
    else:
        return None
    start = at + 1 + width
    size = int.from_bytes(data[at + 1:start], "big")
    itemsize = np.dtype(dtype).itemsize
    if start + size != len(data) or size != itemsize * math.prod(shape):
        return None
    if writable:  # torch.from_numpy takes it without a warning, and predict() may work in place
        return np.frombuffer(bytearray(memoryview(data)[start:]), dtype=dtype).reshape(shape)
    return np.frombuffer(data, dtype=dtype, count=size // itemsize, offset=start).reshape(shape)


_packers = threading.local()


def _packb(value: Any) -> bytes:
    # A Packer per thread: msgpack.packb() builds one per call, which costs as much as the packing.
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, default=_encode_special)
    try:
        return packer.pack(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"cannot encode {type(value).__name__} for the wire: {error}") from error


def _packb_after(prefix: bytes, value: Any) -> bytes:
    """prefix + _packb(value), with one copy of the packed bytes rather than two: pack() copies its
    buffer into a bytes object, and `prefix + that` copies it again (a Request or Batch carrying a
    602 KB image paid 2 x 0.6 MB of copies, and of fresh pages to fault in, in gateway and broker)."""
    packer = getattr(_packers, "framer", None)
    if packer is None:
        packer = _packers.framer = msgpack.Packer(use_bin_type=True, default=_encode_special, autoreset=False)
    try:
        packer.pack(value)
        view = packer.getbuffer()
        try:
            return b"".join((prefix, view))
        finally:
            view.release()
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"cannot encode {type(value).__name__} for the wire: {error}") from error
    finally:
        packer.reset()


def _unpackb(data: bytes, max_len: int, object_hook=None) -> Any:
    try:
        if len(data) <= MAX_CONTAINER_LEN:
            # msgpack derives its own caps from len(data) (maps: half of it), and up to this size they
            # are exactly the caps below. Passing them costs more than the unpacking (5 µs vs 2.5).
            if object_hook is None:
                value = msgpack.unpackb(data, ext_hook=_refuse_ext)
            else:
                value = msgpack.unpackb(data, ext_hook=_refuse_ext, object_hook=object_hook)
        else:
            value = msgpack.unpackb(
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
    whole = data.obj if type(data) is memoryview else data
    # The usual case inline (a function call per message costs more than the search itself).
    if (b"\xff" in whole) if type(whole) is bytes else _may_hold_timestamp(data):
        _refuse_timestamps(value)
    return value


def _may_hold_timestamp(data: bytes | memoryview) -> bool:
    """msgpack decodes extension type -1 (a timestamp) itself and never calls ext_hook, whatever its
    options. Its encoding holds the byte 0xff (the type), so only data with that byte is walked."""
    whole = data.obj if isinstance(data, memoryview) else data  # (`in` on a memoryview compares ints)
    try:
        return whole.find(b"\xff") >= 0
    except (AttributeError, TypeError):
        return True


def _refuse_timestamps(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is list:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.values())
        elif kind is msgpack.Timestamp:
            raise DecodeError("msgpack extension type -1 (timestamp) is not accepted")


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
    # A view of the array's memory, not tobytes(): msgpack packs any buffer as bin, the same bytes, so
    # the packer's copy is the only one.
    return [little.dtype.str, list(little.shape), memoryview(np.ascontiguousarray(little).reshape(-1).view(np.uint8))]


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
    # A writable array (torch.from_numpy takes it without a warning, and predict() may work in place):
    # one copy of the raw bytes, never a per-element conversion.
    return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def unpack_document(data: bytes) -> Any:
    """A msgpack HTTP body (the gateway's application/msgpack). Same limits, no extension types."""
    return _unpackb(data, max_len=MAX_ITEM_BYTES)


def pack_document(value: Any, keep_arrays: bool = False) -> bytes:
    """A msgpack HTTP response body; arrays become plain lists, as in JSON. keep_arrays: arrays
    travel as `__ndarray__` maps ([dtype, shape, raw little-endian bytes]: the form a client sends),
    their dtype kept; bytes still become text."""
    return _packb(to_jsonable(value, keep_arrays))


def to_jsonable(value: Any, keep_arrays: bool = False) -> Any:
    """Turn decoded values into plain JSON types (keep_arrays: but numpy arrays). Only the HTTP edge calls this."""
    if isinstance(value, np.ndarray):
        return value if keep_arrays else value.tolist()
    if isinstance(value, dict):
        return {k: to_jsonable(v, keep_arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [to_jsonable(v, keep_arrays) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
