"""decode() against hostile peers: whatever arrives, it raises DecodeError or returns a safe message.

"Safe" is assert_safe() below, written from docs/protocol.md ("Field bounds") independently of
the codec's own checks. Like test_protocol.py, this file builds bytes by hand: here to feed decode()
arbitrary msgpack maps and arbitrary bytes. Examples are derandomized, so CI sees the same ones.
"""

import dataclasses
import math
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddml_common import protocol as P
from ddml_common.protocol import DecodeError

# The whole file takes a few seconds: many small properties, each with few examples.
_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=100, **_SETTINGS)  # one property over every kind
PER_KIND = settings(max_examples=25, **_SETTINGS)  # one property per message type
FEW = settings(max_examples=5, **_SETTINGS)  # one property per field and flaw (CASES), many values each
MESSAGE_TYPES = typing.get_args(P.Message)


def _fields(message_type) -> list[str]:
    return [f.name for f in dataclasses.fields(message_type)]


# --------------------------------------------------------------------------- what "safe" means


def _is_int(value) -> bool:
    return type(value) is int  # exact: a bool is not an int


def _is_name(value, empty_ok: bool = False) -> bool:
    return type(value) is str and (empty_ok or value != "") and len(value) <= P.MAX_NAME_LEN


def _is_text(value, max_len: int) -> bool:
    return type(value) is str and len(value) <= max_len


def _is_bins(values, max_len: int = P.MAX_ITEMS) -> bool:
    return type(values) is list and len(values) <= max_len and all(type(v) is bytes for v in values)


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_stat(value) -> bool:
    if type(value) is str:
        return len(value) <= P.MAX_TEXT_LEN
    return value is None or type(value) in (int, bool) or (type(value) is float and math.isfinite(value))


EXPORTED_STATS = ("batches", "items", "mean_batch_latency_ms", "cuda_memory_allocated_bytes")  # broker/metrics.py


def _is_stats(stats) -> bool:
    if type(stats) is not dict:
        return False
    entries = len(stats)
    for name, value in stats.items():
        if not _is_name(name):
            return False
        if type(value) is dict:
            entries += len(value)
            if not all(_is_name(k) and _is_stat(v) for k, v in value.items()):
                return False
        elif not _is_stat(value):
            return False
    numbers = all(_is_number(stats[name]) for name in EXPORTED_STATS if name in stats)
    return entries <= P.MAX_STATS and numbers


def _json_size(value, depth: int) -> int:
    """One per value plus string lengths; fails the test where the value is not JSON-like."""
    if type(value) is dict:
        assert depth > 0, "metadata nests too deep"
        assert all(type(key) is str for key in value), "metadata keys must be str"
        return 1 + sum(len(key) + _json_size(item, depth - 1) for key, item in value.items())
    if type(value) is list:
        assert depth > 0, "metadata nests too deep"
        return 1 + sum(_json_size(item, depth - 1) for item in value)
    if type(value) is str:
        return 1 + len(value)
    assert value is None or type(value) in (int, bool) or (type(value) is float and math.isfinite(value)), value
    return 1


def assert_safe(message) -> None:
    """Every element of the right type and within the documented bounds."""
    match message:
        case P.Ready():
            assert type(message.models) is list and 1 <= len(message.models) <= P.MAX_MODELS
            assert all(_is_name(m) for m in message.models)
            assert _is_int(message.max_batch_size) and 1 <= message.max_batch_size <= P.MAX_ITEMS
            assert _is_int(message.max_batches) and 1 <= message.max_batches <= P.MAX_BATCHES
            assert _is_name(message.device, empty_ok=True) and _is_name(message.host, empty_ok=True)
            assert _is_int(message.pid) and message.pid >= 0
            assert type(message.metadata) is dict
            assert _json_size(message.metadata, P.MAX_DOCUMENT_DEPTH) <= P.MAX_DOCUMENT_SIZE + 1
        case P.Heartbeat():
            assert _is_name(message.instance_id, empty_ok=True)
            assert _is_stats(message.stats)
            assert type(message.draining) is bool
            assert _is_int(message.registration) and message.registration >= 0
        case P.Request():
            assert _is_name(message.request_id) and _is_name(message.model)
            assert _is_name(message.instance_id, empty_ok=True)
            assert _is_int(message.timeout_ms) and abs(message.timeout_ms) <= P.MAX_DURATION_MS
            assert _is_bins(message.inputs)
            assert type(message.sizes) is list and len(message.sizes) in (0, len(message.inputs))
            assert all(_is_int(s) and 0 <= s < 2**31 for s in message.sizes)
            assert _is_int(message.priority) and P.MIN_PRIORITY <= message.priority <= P.MAX_PRIORITY
        case P.Batch():
            assert _is_int(message.batch_id) and message.batch_id >= 0
            assert _is_name(message.model)
            assert type(message.request_ids) is list and all(_is_name(r) for r in message.request_ids)
            assert _is_bins(message.inputs) and len(message.inputs) == len(message.request_ids)
            assert _is_int(message.timeout_ms) and abs(message.timeout_ms) <= P.MAX_DURATION_MS
        case P.BatchResult():
            assert _is_int(message.batch_id) and message.batch_id >= 0
            assert _is_bins(message.outputs)
            assert type(message.errors) is list
            indexes = set()
            for error in message.errors:
                assert type(error) is P.InputFailure
                index, code, text = error.index, error.code, error.message
                assert _is_int(index) and 0 <= index < len(message.outputs) and index not in indexes
                indexes.add(index)
                assert _is_name(code, empty_ok=True) and _is_text(text, P.MAX_TEXT_LEN)
            assert _is_number(message.compute_ms) and 0 <= message.compute_ms <= P.MAX_DURATION_MS
        case P.Reply():
            assert _is_name(message.request_id)
            assert _is_bins(message.outputs)
            assert message.error_code is None or message.error_code in {c.value for c in P.ErrorCode}
            assert _is_text(message.error_message, P.MAX_REPLY_TEXT_LEN)
            assert _is_int(message.retry_after_ms) and 0 <= message.retry_after_ms <= P.MAX_DURATION_MS
        case P.Replies():
            assert type(message.request_ids) is list and all(_is_name(r) for r in message.request_ids)
            assert type(message.outputs) is list and len(message.outputs) == len(message.request_ids)
            assert all(_is_bins(outputs) for outputs in message.outputs)
        case P.Disconnect():
            assert _is_text(message.reason, P.MAX_TEXT_LEN)
            assert _is_int(message.registration) and message.registration >= 0
        case P.StatusRequest():
            assert _is_name(message.request_id, empty_ok=True)
        case P.Status():
            assert _is_name(message.request_id, empty_ok=True) and _is_name(message.instance_id, empty_ok=True)
            assert type(message.models) is dict
            assert all(_is_name(k, empty_ok=True) and type(v) is dict for k, v in message.models.items())
            assert type(message.workers) is list and all(type(w) is dict for w in message.workers)
            assert type(message.stats) is dict and all(_is_name(k, empty_ok=True) for k in message.stats)
        case P.Error():
            assert _is_name(message.code, empty_ok=True) and _is_text(message.message, P.MAX_REPLY_TEXT_LEN)
        case P.Requests():
            assert type(message.requests) is list and 0 < len(message.requests) + len(message.refused) <= P.MAX_ITEMS
            assert sum(len(request.inputs) for request in message.requests) <= P.MAX_ITEMS
            for request in message.requests:
                assert type(request) is P.Request
                assert_safe(request)
            for request_id, why in message.refused:  # decode()'s own account: an id to answer, or none
                assert _is_name(request_id, empty_ok=True) and type(why) is str
        case _:
            raise AssertionError(f"decode() returned {type(message).__name__}")


def decodes_safely(frames: list[bytes]):
    """The property: DecodeError, or a message that passes assert_safe(). Anything else fails the test.
    Returns the message, or None where it was refused."""
    try:
        message = P.decode(frames)
    except DecodeError:
        return None
    assert_safe(message)
    return message


# --------------------------------------------------------------------------- hostile values

EDGE_INTS = [
    0, 1, -1, 63, 64, 65, 2**31 - 1, 2**31, 2**40, 2**40 + 1, -(2**40), -(2**40) - 1, 2**63 - 1, -(2**63), 2**64 - 1,
    P.MAX_ITEMS, P.MAX_ITEMS + 1, P.MIN_PRIORITY, P.MIN_PRIORITY - 1, P.MAX_PRIORITY, P.MAX_PRIORITY + 1,
]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.5, -0.5, 1e308, float(2**40), float(2**40 + 1)]
TEXT_LENGTHS = [0, 1, P.MAX_NAME_LEN, P.MAX_NAME_LEN + 1, P.MAX_TEXT_LEN, P.MAX_TEXT_LEN + 1, P.MAX_REPLY_TEXT_LEN + 1]
WRONG_TYPES = [True, False, None, "1", b"1", [1], [[1]], {"a": 1}]
# Every hostile field value is tried in every example: the cases near each bound all come up,
# whatever Hypothesis draws, and Hypothesis varies the rest (the message, the element replaced).
NUMBERS = EDGE_INTS + EDGE_FLOATS + WRONG_TYPES
NAMES = ["x" * n for n in TEXT_LENGTHS] + ["é\x00\U0001f600"] + WRONG_TYPES
NOT_BINS = ["text", 1, None, True, [b"x"], {"a": b"x"}]
BAD_SCALARS = [math.nan, math.inf, -math.inf, b"x", [], {}, {"deeper": {}}, "x" * (P.MAX_TEXT_LEN + 1)]

# Open-ended values, for the arbitrary bodies below.
texts = st.one_of(st.text(max_size=8), st.sampled_from(TEXT_LENGTHS).map(lambda n: "x" * n))
scalars = st.one_of(
    st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1), st.sampled_from(EDGE_FLOATS), st.floats(),
    texts, st.booleans(), st.none(), st.binary(max_size=8),
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


def _nested(depth: int) -> dict:
    return {"a": _nested(depth - 1)} if depth else {}


def _each_replacing(draw, values: list, replacements: list) -> list[list]:
    """values with the element at a drawn position replaced by each replacement in turn."""
    values = list(values) or [None]
    at = draw(st.integers(0, len(values) - 1))
    return [values[:at] + [replacement] + values[at + 1:] for replacement in replacements]


def _stats(flaw: str) -> list[dict]:
    def figures(**more):
        return {"batches": 3, "items": 7, "mean_batch_latency_ms": 1.5, "gpu": {"name": "H200", "memory": 5}, **more}

    match flaw:
        case "key":
            return [figures(**{key: 1}) for key in ("", "k" * (P.MAX_NAME_LEN + 1))]
        case "value":
            return [figures(note=value) for value in BAD_SCALARS + NUMBERS + NAMES]
        case "nested value":
            return [figures(gpu={"memory": value}) for value in BAD_SCALARS + NUMBERS + NAMES]
        case "exported":
            return [figures(**{name: value}) for name in EXPORTED_STATS for value in WRONG_TYPES + ["3", math.nan]]
        case "too many":  # figures() holds 6 entries, the gpu map's included
            return [figures(**{f"k{i}": i for i in range(n)}) for n in range(P.MAX_STATS - 8, P.MAX_STATS - 3)]
        case "too many nested":
            return [figures(gpu={f"k{i}": i for i in range(n)}) for n in range(P.MAX_STATS - 6, P.MAX_STATS - 1)]
    raise AssertionError(flaw)


def _metadata(flaw: str) -> list[dict]:
    match flaw:
        case "depth":
            return [_nested(depth) for depth in range(P.MAX_DOCUMENT_DEPTH - 1, P.MAX_DOCUMENT_DEPTH + 2)]
        case "value":
            return [{"inputs": [{"name": "x", "shape": [-1, value]}]} for value in BAD_SCALARS + NUMBERS]
        case "key":
            return [{"inputs": [{key: 1}]} for key in (b"k", 1, "", "k" * 1000)]
        case "size":  # around the budget of one per value plus string lengths
            return [{"labels": ["x" * 1000] * n} for n in (1040, 1046, 1047, 1060)]
    raise AssertionError(flaw)


def _errors(draw, flaw: str, outputs: int) -> list[list]:
    """Valid errors (distinct indexes into the outputs), then one flaw, each way it can be."""
    indexes = draw(st.lists(st.integers(0, outputs - 1), unique=True, max_size=outputs))
    errors = [[i, draw(st.sampled_from(["MODEL_ERROR", "NEW_CODE", ""])), "m"] for i in indexes]
    last, rest = (errors[-1], errors[:-1]) if errors else ([0, "MODEL_ERROR", "m"], [])
    match flaw:
        case "duplicate":
            return [errors + [[0, "MODEL_ERROR", "m"]], errors + [last, last]]
        case "entry":
            return _each_replacing(draw, errors, WRONG_TYPES + [[0, "MODEL_ERROR"], [0, "MODEL_ERROR", "m", "m"]])
        case "index":
            return [rest + [[value, *last[1:]]] for value in [outputs, outputs + 1] + NUMBERS]
        case "code":
            return [rest + [[last[0], value, last[2]]] for value in NAMES]
        case "message":
            return [rest + [[*last[:2], value]] for value in NAMES]
    raise AssertionError(flaw)


# (message type, field, flaw): one test case each. A flaw is one thing wrong in an otherwise valid
# value; "any" replaces a plain field by each hostile number or string. Arbitrary values in place
# of whole fields are the business of the arbitrary-body tests below.
FLAWS = {
    "sizes": ["element", "length"],
    "request_ids": ["element"],
    "models": ["element", "count"],
    "inputs": ["element"],
    "outputs": ["element"],
    "errors": ["index", "duplicate", "code", "message", "entry"],
    "stats": ["key", "value", "nested value", "exported", "too many", "too many nested"],
    "metadata": ["depth", "value", "key", "size"],
}
STR_FIELDS = {"request_id", "model", "instance_id", "device", "host", "error_message", "reason", "code", "message"}


def hostile_values(draw, message, field: str, flaw: str) -> list:
    """What a hostile peer might put in this field of this message: a list of values to try."""
    kind = type(message).__name__
    if kind == "Status" and field in ("models", "workers", "stats"):  # the broker's own report: shapes only
        return draw(st.lists(anything | st.dictionaries(texts, anything, max_size=2), min_size=1, max_size=4))
    if field == "stats":
        return _stats(flaw)
    if field == "metadata":
        return _metadata(flaw)
    if field == "errors":
        return _errors(draw, flaw, len(message.outputs))
    if field == "models" and flaw == "count":
        return [[f"m{i}" for i in range(n)] for n in (0, P.MAX_MODELS, P.MAX_MODELS + 1)]
    if field == "sizes":
        sizes = [1] * len(message.inputs)
        return [sizes + [1], sizes[:-1]] if flaw == "length" else _each_replacing(draw, sizes, NUMBERS)
    if field in ("request_ids", "models"):
        return _each_replacing(draw, getattr(message, field), NAMES)
    if kind == "Replies" and field == "outputs":
        return _each_replacing(draw, message.outputs, NOT_BINS + [[value] for value in NOT_BINS])
    if field in ("inputs", "outputs"):
        return _each_replacing(draw, getattr(message, field), NOT_BINS)
    if field == "error_code":
        return [None, "OVERLOADED", "TIMEOUT", "NOPE", ""] + WRONG_TYPES
    if field == "draining":
        return [True, False, 0, 1, None, "true"]
    return NAMES if field in STR_FIELDS else NUMBERS


# Valid messages to start from; one field of each is then given a flaw.
name = st.text(min_size=1, max_size=6)
few_bins = st.lists(st.binary(max_size=4), min_size=1, max_size=3)


@st.composite
def _batch(draw):
    inputs = draw(few_bins)
    return P.Batch(draw(st.integers(0, 9)), draw(name), [f"r{i}" for i in range(len(inputs))], 100, inputs)


@st.composite
def _replies(draw):
    outputs = draw(st.lists(few_bins, min_size=1, max_size=3))
    return P.Replies([f"r{i}" for i in range(len(outputs))], outputs)


VALID = {
    P.Ready: st.builds(P.Ready, models=st.lists(name, min_size=1, max_size=3), max_batch_size=st.integers(1, 64),
                       max_batches=st.integers(1, 4), device=st.text(max_size=6), pid=st.integers(0, 2**22),
                       metadata=st.dictionaries(st.text(max_size=6), st.lists(st.integers(-1, 9), max_size=3))),
    P.Heartbeat: st.builds(P.Heartbeat, instance_id=st.text(max_size=6), registration=st.integers(0, 9),
                           stats=st.dictionaries(name.filter(lambda k: k not in EXPORTED_STATS), st.one_of(
                               st.integers(0, 9), st.floats(0, 9), st.dictionaries(name, st.text(max_size=4))))),
    P.Request: st.builds(P.Request, request_id=name, model=name, timeout_ms=st.integers(-9, 10**6), inputs=few_bins,
                         priority=st.integers(-9, 9)),
    P.Batch: _batch(),
    P.BatchResult: st.builds(P.BatchResult, batch_id=st.integers(0, 9), outputs=few_bins, compute_ms=st.floats(0, 9)),
    P.Reply: st.builds(P.Reply, request_id=name, outputs=few_bins, retry_after_ms=st.integers(0, 9)),
    P.Replies: _replies(),
    P.Disconnect: st.builds(P.Disconnect, reason=st.text(max_size=6), registration=st.integers(0, 9)),
    P.StatusRequest: st.builds(P.StatusRequest, request_id=st.text(max_size=6)),
    P.Status: st.builds(P.Status, request_id=st.text(max_size=6), instance_id=st.text(max_size=6),
                        models=st.just({"m": {"workers": 1}}), workers=st.just([{}])),
    P.Error: st.builds(P.Error, code=name, message=st.text(max_size=6)),
}
VALID[P.Requests] = st.lists(VALID[P.Request], min_size=1, max_size=3).map(P.Requests)
CASES = [
    (t, field, flaw)
    for t in VALID
    for field in _fields(t)
    for flaw in (FLAWS.get(field, ["any"]) if t is not P.Status else ["any"])
]


def test_every_message_type_has_a_valid_strategy():
    assert set(VALID) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message_type", list(VALID), ids=lambda t: t.__name__)
@PER_KIND
@given(data=st.data())
def test_valid_messages_decode_to_themselves(message_type, data):
    message = data.draw(VALID[message_type])
    assert P.decode(P.encode(message)) == message
    assert_safe(message)


@pytest.mark.parametrize("message_type, field, flaw", CASES, ids=[f"{t.__name__}.{f}-{w}" for t, f, w in CASES])
@FEW
@given(data=st.data())
def test_a_hostile_field_decodes_safely_or_raises_decode_error(message_type, field, flaw, data):
    message = data.draw(VALID[message_type])
    for value in hostile_values(data.draw, message, field, flaw):
        setattr(message, field, value)
        try:
            frames = P.encode(message)
        except TypeError:  # encode() refuses what msgpack cannot carry; no peer can send it either
            continue
        try:
            decodes_safely(frames)
        except AssertionError as error:
            raise AssertionError(f"{message_type.__name__}.{field} = {value!r:.300}: {error}") from error


REQUEST_CASES = [(field, flaw) for t, field, flaw in CASES if t is P.Request]


@pytest.mark.parametrize("field, flaw", REQUEST_CASES, ids=[f"{f}-{w}" for f, w in REQUEST_CASES])
@FEW
@given(data=st.data())
def test_a_hostile_request_among_requests_is_refused_alone_exactly_where_a_request_would_be(field, flaw, data):
    """A REQUESTS entry decodes exactly when it decodes as a REQUEST alone. Refused, it is refused alone, with
    its id where it can be read (so the broker answers it BAD_REQUEST and runs the others), or, where its
    inputs' layout is wrong, the whole message is."""
    first, hostile, last = (data.draw(VALID[P.Request]) for _ in range(3))
    first.request_id, last.request_id = "first", "last"
    for value in hostile_values(data.draw, hostile, field, flaw):
        setattr(hostile, field, value)
        try:
            alone, together = P.encode(hostile), P.encode(P.Requests([first, hostile, last]))
        except TypeError:
            continue
        try:
            expected = P.decode(alone)
        except DecodeError:
            expected = None
        try:
            decoded = P.decode(together)
        except DecodeError:
            assert expected is None, f"{field} = {value!r:.100}: a REQUESTS refused for an entry that decodes alone"
            continue
        assert_safe(decoded)
        if expected is not None:
            assert decoded.requests == [first, expected, last] and decoded.refused == []
        else:
            assert decoded.requests == [first, last], f"{field} = {value!r:.100}"
            [(request_id, _)] = decoded.refused
            readable = type(hostile.request_id) is str and _is_name(hostile.request_id)
            assert request_id == (hostile.request_id if readable else "")


# --------------------------------------------------------------------------- arbitrary bodies and bytes

KIND_BYTES = st.sampled_from([*range(1, 13), 0, 99, 255])
FIELD_NAMES = sorted({name for t in MESSAGE_TYPES for name in _fields(t)})
bodies = st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), anything, max_size=8)


@MANY
@given(KIND_BYTES, bodies)
def test_arbitrary_msgpack_maps_under_each_kind_decode_safely_or_raise_decode_error(kind, body):
    decodes_safely([P.PROTOCOL_VERSION + bytes([kind]) + msgpack.packb(body)])


@pytest.mark.parametrize("message_type", list(VALID), ids=lambda t: t.__name__)
@PER_KIND
@given(data=st.data())
def test_valid_bodies_with_arbitrary_msgpack_fields_decode_safely_or_raise_decode_error(message_type, data):
    # From a valid body, so that decoding gets past "lacks field" and the field types to the elements.
    frame = P.encode(data.draw(VALID[message_type]))[0]
    body = msgpack.unpackb(frame[6:])
    changes = data.draw(st.dictionaries(st.sampled_from(_fields(message_type)), anything, max_size=2))
    decodes_safely([frame[:6] + msgpack.packb(body | changes)])


@MANY
@given(st.lists(st.binary(max_size=64), max_size=3))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(frames):
    decodes_safely(frames)


@MANY
@given(KIND_BYTES, st.binary(max_size=64))
def test_arbitrary_bodies_after_a_valid_prefix_never_raise_anything_but_decode_error(kind, body):
    decodes_safely([P.PROTOCOL_VERSION + bytes([kind]) + body])


# --------------------------------------------------------------------------- a REQUEST's or BATCH's inputs
# They travel outside msgpack's bins (docs/protocol.md, "Frames"): lengths in `input_bytes`, small inputs back
# to back in `inline`, each large one in a frame after the first. A peer chooses all three freely.

LARGE = P.INPUT_FRAME_BYTES
lengths = st.one_of(st.integers(0, 3), st.sampled_from([LARGE - 1, LARGE, LARGE + 1, P.MAX_ITEM_BYTES,
                                                         P.MAX_ITEM_BYTES + 1, 2**63, -1]), st.booleans(), anything)
frame_sizes = st.sampled_from([0, 1, 2, LARGE - 1, LARGE, LARGE + 1])


@pytest.mark.parametrize("message_type", [P.Request, P.Batch], ids=lambda t: t.__name__)
@settings(max_examples=200, **_SETTINGS)
@given(data=st.data())
def test_any_layout_of_inputs_decodes_to_exactly_its_inline_bytes_and_frames_or_raises_decode_error(message_type,
                                                                                                   data):
    message = data.draw(VALID[message_type])
    frame = P.encode(message)[0]
    body = msgpack.unpackb(frame[6:])
    body["input_bytes"] = data.draw(st.one_of(st.lists(lengths, max_size=4), anything))
    body["inline"] = data.draw(st.one_of(st.binary(max_size=6), anything))
    if message_type is P.Batch and type(body["input_bytes"]) is list:
        body["request_ids"] = [f"r{i}" for i in range(len(body["input_bytes"]))]  # past the count check
    extra = [bytes(n) for n in data.draw(st.lists(frame_sizes, max_size=3))]
    frames = [frame[:6] + msgpack.packb(body), *extra]
    decoded = decodes_safely(frames)
    if decoded is None:
        return
    # What decoded is exactly what was sent: each length as claimed, the small inputs making up `inline` in
    # order, and the large ones the frames after the first, in order and each whole.
    assert [len(item) for item in decoded.inputs] == body["input_bytes"]
    assert b"".join(item for item in decoded.inputs if len(item) < LARGE) == body["inline"]
    assert [item for item in decoded.inputs if len(item) >= LARGE] == extra


@settings(max_examples=50, **_SETTINGS)
@given(st.lists(st.sampled_from([0, 1, 5, LARGE - 1, LARGE, LARGE + 7]), max_size=5), st.data())
def test_inputs_of_any_sizes_round_trip_in_order_each_large_one_in_a_frame_of_its_own(sizes, data):
    inputs = [bytes([data.draw(st.integers(0, 255))]) * size for size in sizes]
    request = P.Request("r", "m", 1, inputs)
    frames = P.encode(request)
    assert frames[1:] == [item for item in inputs if len(item) >= LARGE]
    assert P.decode(frames) == request


_GONE = "(left out)"  # a field drawn to be left out of the body


@MANY
@given(data=st.data())
def test_any_request_body_decodes_in_a_requests_exactly_as_it_does_alone(data):
    """The REQUESTS entry's own decoding against decode() of a REQUEST, on bodies with any field changed
    to anything or left out."""
    first = P.Request("first", "m", 5, [b"\x01"])
    body = msgpack.unpackb(P.encode(data.draw(VALID[P.Request]))[0][6:])
    changes = data.draw(st.dictionaries(st.sampled_from(sorted(body) + ["trace", "timings"]),
                                        anything | st.just(_GONE), max_size=3))
    body = {key: value for key, value in (body | changes).items() if value != _GONE}
    entries = [msgpack.unpackb(P.encode(first)[0][6:]), body]
    try:
        expected = P.decode([P.PROTOCOL_VERSION + bytes([P.Kind.REQUEST]) + msgpack.packb(body)])
    except DecodeError:
        expected = None
    decoded = decodes_safely([P.PROTOCOL_VERSION + bytes([P.Kind.REQUESTS]) + msgpack.packb({"requests": entries})])
    if decoded is None:
        assert expected is None, "a REQUESTS refused whole for an entry that decodes alone"
    elif expected is None:
        assert decoded.requests == [first] and len(decoded.refused) == 1
    else:
        assert decoded.requests == [first, expected] and decoded.refused == []
