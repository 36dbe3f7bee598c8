"""The wire format: round trips, golden bytes (an independent check on the codec), malformed input."""

import msgpack
import numpy as np
import pytest

from ddml_common import protocol
from ddml_common.protocol import DecodeError, ErrorCode

MESSAGES = [
    protocol.Ready(models=["minilm"], max_batch_size=64, max_batches=2, device="cpu", host="h", pid=7),
    protocol.Heartbeat(instance_id="abc", stats={"batches": 3}, draining=True),
    protocol.Request("r1", "minilm", timeout_ms=1500, inputs=[b"\xa1a", b"\xa1b"], sizes=[1, 1], priority=2),
    protocol.Batch(batch_id=9, model="minilm", request_ids=["r1", "r2"], timeout_ms=10, inputs=[b"\x01", b"\x02"]),
    protocol.BatchResult(batch_id=9, outputs=[b"\x01", b""], errors=[protocol.InputFailure(1, "MODEL_ERROR", "boom")],
                         compute_ms=1.5),
    protocol.Reply("r1", outputs=[b"\x01"]),
    protocol.Reply("r2", error_code="OVERLOADED", error_message="full", retry_after_ms=300),
    protocol.Disconnect("bye"),
    protocol.StatusRequest("s1"),
    protocol.Status("s1", "inst", models={"m": {"workers": 1}}, workers=[{"worker_id": "00"}], stats={"x": 1}),
    protocol.Error("BAD_VERSION", "speak DDML1"),
    protocol.Replies(["r1", "r2"], [[b"\x01"], [b"\x02", b"\x03"]]),
    protocol.Requests([protocol.Request("r1", "minilm", timeout_ms=1500, inputs=[b"\xa1a"], sizes=[1]),
                       protocol.Request("r2", "clf", timeout_ms=9, inputs=[b"\xa1b", b"\xa1c"], priority=-2,
                                        instance_id="i", trace=["00-" + "1" * 32 + "-" + "2" * 16 + "-01", ""],
                                        timings=True)]),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert protocol.decode(protocol.encode(message)) == message


def test_heartbeat_golden_bytes():
    frames = protocol.encode(protocol.Heartbeat())
    assert frames == [
        b"DDML4\x02"
        + b"\x84" + b"\xabinstance_id" + b"\xa0" + b"\xa5stats" + b"\x80" + b"\xa8draining" + b"\xc2"
        + b"\xacregistration" + b"\x00",
    ]


def test_batch_result_golden_bytes_carry_each_input_failure_as_the_list_index_code_message():
    typed = protocol.BatchResult(7, outputs=[b"", b"\x01"], errors=[protocol.InputFailure(0, "BAD_REQUEST", "no")])
    frames = protocol.encode(typed)
    assert frames == [
        b"DDML4\x05"
        + b"\x85" + b"\xa8batch_id" + b"\x07" + b"\xa7outputs" + b"\x92" + b"\xc4\x00" + b"\xc4\x01\x01"
        + b"\xa6errors" + b"\x91" + b"\x93" + b"\x00" + b"\xabBAD_REQUEST" + b"\xa2no"
        + b"\xaacompute_ms" + b"\xcb" + bytes(8) + b"\xa7indices" + b"\x90",
    ]
    # A sender that still writes the wire list sends the same bytes, and a reader gets fields either way.
    as_list = protocol.BatchResult(7, outputs=[b"", b"\x01"], errors=[[0, "BAD_REQUEST", "no"]])
    assert protocol.encode(as_list) == frames
    [failure] = protocol.decode(frames).errors
    assert (failure.index, failure.code, failure.message) == (0, "BAD_REQUEST", "no")


def test_request_golden_bytes_carry_small_inputs_back_to_back_in_one_frame():
    frames = protocol.encode(protocol.Request("r1", "echo", timeout_ms=100, inputs=[b"\xa1x", b"\xa1yz"]))
    assert frames == [
        b"DDML4\x03"
        b"\x88\xaarequest_id\xa2r1\xa5model\xa4echo\xaatimeout_ms\x64"
        b"\xa5sizes\x90\xa8priority\x00\xabinstance_id\xa0"
        b"\xabinput_bytes\x92\x02\x03\xa6inline\xc4\x05\xa1x\xa1yz",
    ]


def test_batch_golden_bytes_carry_each_large_input_in_a_frame_of_its_own_as_it_was_given():
    large = bytes(range(256)) * (protocol.INPUT_FRAME_BYTES // 256)
    view = memoryview(b"\x00" + large)[1:]  # a view of a received frame, as the broker forwards it
    frames = protocol.encode(protocol.Batch(9, "m", ["a", "b", "c"], timeout_ms=5, inputs=[b"\x01", view, b"\x02"]))
    assert frames[0] == (
        b"DDML4\x04"
        b"\x86\xa8batch_id\x09\xa5model\xa1m\xabrequest_ids\x93\xa1a\xa1b\xa1c\xaatimeout_ms\x05"
        b"\xabinput_bytes\x93\x01\xce\x00\x01\x00\x00\x01\xa6inline\xc4\x02\x01\x02"
    )
    assert len(frames) == 2 and frames[1] is view  # handed over, not copied
    decoded = protocol.decode(frames)
    assert decoded.inputs == [b"\x01", large, b"\x02"] and decoded.inputs[1] is view


def _frame(kind: int, body) -> list[bytes]:
    return [protocol.PROTOCOL_VERSION + bytes([kind]) + (body if isinstance(body, bytes) else msgpack.packb(body))]


def test_hand_built_request_decodes():
    message = protocol.decode(_frame(3, {"request_id": "7", "model": "m", "timeout_ms": 5, "input_bytes": [1],
                                         "inline": b"\xc0"}))
    assert message == protocol.Request("7", "m", 5, inputs=[b"\xc0"])


def test_a_request_from_a_version_2_peer_is_refused_with_bad_version():
    with pytest.raises(protocol.VersionMismatch, match="DDML2"):
        protocol.decode([b"DDML2\x03" + msgpack.packb({"request_id": "7", "model": "m", "timeout_ms": 5,
                                                       "inputs": [b"\xc0"]})])


def test_unknown_body_fields_are_ignored():
    message = protocol.decode(_frame(2, {"instance_id": "b", "added_in_a_later_minor": [1, 2]}))
    assert message == protocol.Heartbeat("b")


@pytest.mark.parametrize(
    "frames, complaint",
    [
        ([], "not a ddml message"),
        ([protocol.PROTOCOL_VERSION], "no kind or no body"),
        ([protocol.PROTOCOL_VERSION + b"\x02"], "no kind or no body"),
        ([b"HTTP/1.1 200"], "not a ddml message"),
        (_frame(2, {}) + [b"extra"], "one frame, got 2"),
        (_frame(0x63, {}), "unknown message kind 99"),
        (_frame(2, b"\xc1"), "DecodeError|Unpack|ExtraData|ValueError|FormatError"),
        (_frame(2, b"\x93\x01\x02\x03"), "body must be a map"),
        (_frame(3, {"model": "m", "timeout_ms": 1}), "lacks field 'request_id'"),
        (_frame(3, {"request_id": 1, "model": "m", "timeout_ms": 1}), "must be str"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": True}), "must be int"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": 1, "inputs": [b"x"]}), "lacks field 'input_bytes'"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": 1, "input_bytes": [1], "inline": "x"}),
         "inline must be bin"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": 1, "input_bytes": 1, "inline": b"x"}),
         "input_bytes must be a list"),
        (_frame(2, b"\xdd\x7f\xff\xff\xff"), "exceeds|ValueError"),  # array of 2^31 in 5 bytes
        (_frame(2, b"\xd4\x01\x00"), "extension type|ExtType|ext"),
        (_frame(1, {"models": [], "max_batch_size": 1}), "at least one model"),
        (_frame(1, {"models": ["m"], "max_batch_size": 0}), "max_batch_size must be in"),
        (_frame(4, {"batch_id": 1, "model": "m", "request_ids": ["a"], "timeout_ms": 1, "input_bytes": [],
                    "inline": b""}), "1 request ids for 0 inputs"),
        (_frame(6, {"request_id": "1", "error_code": "NOPE"}), "unknown error code"),
        (_frame(5, {"batch_id": 1, "errors": [[0]]}), "index, code, message"),
        (_frame(2, {1: 2}), "DecodeError|ValueError|keys"),
        (_frame(11, {"request_ids": ["a", "b"], "outputs": [[b"x"]]}), "2 request ids for 1 output lists"),
        (_frame(11, {"request_ids": ["a"], "outputs": [["text"]]}), "lists of bin values"),
    ],
)
def test_malformed_frames_raise_decode_error_and_nothing_else(frames, complaint):
    with pytest.raises(DecodeError, match=complaint):
        protocol.decode(frames)


def _with(message, **changes) -> list[bytes]:
    """The frames of a valid message, with some body fields replaced by what a hostile peer might send."""
    frame = protocol.encode(message)[0]
    body = msgpack.unpackb(frame[6:])
    body.update(changes)
    return [frame[:6] + msgpack.packb(body)]


READY = protocol.Ready(models=["m"], max_batch_size=8)
REQUEST = protocol.Request("r1", "m", timeout_ms=100, inputs=[b"\x01"])
BATCH = protocol.Batch(batch_id=1, model="m", request_ids=["r1"], timeout_ms=100, inputs=[b"\x01"])
RESULT = protocol.BatchResult(batch_id=1, outputs=[b""])
LONG_NAME = "m" * (protocol.MAX_NAME_LEN + 1)
LONG_TEXT = "x" * (protocol.MAX_TEXT_LEN + 1)
NAN, INF = float("nan"), float("inf")


def _nested(depth: int) -> dict:
    return {"a": _nested(depth - 1)} if depth else {}


HEARTBEAT = protocol.Heartbeat()
STATUS = MESSAGES[9]

# (id, frames, what the DecodeError must say): each names the field and what was received.
REFUSALS = [
    ("request-sizes-str", _with(REQUEST, sizes=["a"]),
     r"Request.sizes\[0\] must be an int in \[0, 2\*\*31\), got str 'a'"),
    ("request-sizes-bool", _with(REQUEST, sizes=[True]), r"Request.sizes\[0\].*got bool True"),
    ("request-sizes-negative", _with(REQUEST, sizes=[-1]), r"Request.sizes\[0\]"),
    ("request-sizes-2**31", _with(REQUEST, sizes=[2**31]), r"Request.sizes\[0\]"),
    ("request-sizes-nested", _with(REQUEST, sizes=[[1]]), r"Request.sizes\[0\].*got a list of 1"),
    ("request-priority-too-high", _with(REQUEST, priority=protocol.MAX_PRIORITY + 1),
     r"Request.priority must be in \[-10000, 10000\], got int 10001"),
    ("request-priority-too-low", _with(REQUEST, priority=protocol.MIN_PRIORITY - 1), "Request.priority"),
    ("request-timeout-huge", _with(REQUEST, timeout_ms=2**41), "Request.timeout_ms"),
    ("request-timeout-hugely-negative", _with(REQUEST, timeout_ms=-2**41), "Request.timeout_ms"),
    ("request-id-empty", _with(REQUEST, request_id=""), "Request.request_id must be a non-empty str"),
    ("request-id-too-long", _with(REQUEST, request_id=LONG_NAME), r"Request.request_id.*\(257 characters\)"),
    ("request-model-empty", _with(REQUEST, model=""), "Request.model must be a non-empty str"),
    ("request-model-too-long", _with(REQUEST, model=LONG_NAME), "Request.model"),
    ("request-instance-id-too-long", _with(REQUEST, instance_id=LONG_NAME), "Request.instance_id"),
    ("ready-too-many-models", _with(READY, models=[f"m{i}" for i in range(protocol.MAX_MODELS + 1)]),
     "at most 64, got 65"),
    ("ready-model-name-too-long", _with(READY, models=["m", LONG_NAME]),
     r"Ready.models\[1\] must be a non-empty str of at most 256"),
    ("ready-model-name-empty", _with(READY, models=[""]), r"Ready.models\[0\]"),
    ("ready-model-name-int", _with(READY, models=[7]), r"Ready.models\[0\].*got int 7"),
    ("ready-max-batch-size-too-large", _with(READY, max_batch_size=protocol.MAX_ITEMS + 1),
     "Ready.max_batch_size must be in"),
    ("ready-max-batches-zero", _with(READY, max_batches=0), "Ready.max_batches"),
    ("ready-max-batches-too-many", _with(READY, max_batches=protocol.MAX_BATCHES + 1),
     r"Ready.max_batches must be in \[1, 64\]"),
    ("ready-pid-negative", _with(READY, pid=-1), "Ready.pid"),
    ("ready-device-too-long", _with(READY, device=LONG_NAME), "Ready.device"),
    ("ready-host-too-long", _with(READY, host=LONG_NAME), "Ready.host"),
    ("ready-metadata-too-deep", _with(READY, metadata=_nested(protocol.MAX_DOCUMENT_DEPTH)), "deeper than 8"),
    ("ready-metadata-too-large", _with(READY, metadata={"labels": ["x" * 1000] * 1100}), "Ready.metadata exceeds"),
    ("ready-metadata-too-many-values", _with(READY, metadata={"rows": [[0] * 1024] * 1025}),
     "Ready.metadata exceeds"),
    ("ready-metadata-nan", _with(READY, metadata={"shape": [NAN]}), "Ready.metadata number must be finite"),
    ("ready-metadata-bin", _with(READY, metadata={"blob": b"x"}), "Ready.metadata value must be JSON-like"),
    ("ready-metadata-bin-key", _with(READY, metadata={b"key": 1}), "Ready.metadata key must be a str"),
    ("heartbeat-too-many-stats", _with(HEARTBEAT, stats={f"k{i}": i for i in range(protocol.MAX_STATS + 1)}),
     "at most 256 entries"),
    ("heartbeat-too-many-nested-stats", _with(HEARTBEAT, stats={"gpu": {f"k{i}": i for i in range(256)}}),
     "at most 256 entries, nested ones included"),
    ("heartbeat-stats-two-levels", _with(HEARTBEAT, stats={"gpu": {"memory": {"used": 1}}}),
     r"Heartbeat.stats\['gpu'\]\['memory'\] must be an int, a finite float"),
    ("heartbeat-stats-nan", _with(HEARTBEAT, stats={"mean": NAN}), r"Heartbeat.stats\['mean'\].*got float nan"),
    ("heartbeat-stats-inf", _with(HEARTBEAT, stats={"mean": -INF}), r"Heartbeat.stats\['mean'\]"),
    ("heartbeat-stats-bin", _with(HEARTBEAT, stats={"blob": b"x"}), r"got bin of 1 bytes"),
    ("heartbeat-stats-list", _with(HEARTBEAT, stats={"list": [1]}), r"Heartbeat.stats\['list'\]"),
    ("heartbeat-stats-empty-key", _with(HEARTBEAT, stats={"": 1}), "Heartbeat.stats key"),
    ("heartbeat-stats-text-too-long", _with(HEARTBEAT, stats={"note": LONG_TEXT}), r"Heartbeat.stats\['note'\]"),
    ("heartbeat-exported-stat-not-a-number", _with(HEARTBEAT, stats={"batches": "many"}),
     r"Heartbeat.stats\['batches'\] must be a number"),
    ("heartbeat-registration-negative", _with(HEARTBEAT, registration=-1), "Heartbeat.registration"),
    ("heartbeat-instance-id-too-long", _with(HEARTBEAT, instance_id=LONG_NAME), "Heartbeat.instance_id"),
    ("batch-request-id-int", _with(BATCH, request_ids=[1]), r"Batch.request_ids\[0\].*got int 1"),
    ("batch-request-id-too-long", _with(BATCH, request_ids=[LONG_NAME]), r"Batch.request_ids\[0\]"),
    ("batch-timeout-huge", _with(BATCH, timeout_ms=2**41), "Batch.timeout_ms"),
    ("batch-id-negative", _with(BATCH, batch_id=-1), "Batch.batch_id"),
    ("batch-model-empty", _with(BATCH, model=""), "Batch.model"),
    ("result-error-index-out-of-range-and-list-code", _with(RESULT, errors=[[99, ["x"], "m"]]),
     r"BatchResult.errors\[0\] index must be an int in \[0, 1\)"),
    ("result-error-index-out-of-range", _with(RESULT, errors=[[1, "MODEL_ERROR", "m"]]),
     r"index must be an int in \[0, 1\).*got int 1"),
    ("result-error-index-negative", _with(RESULT, errors=[[-1, "MODEL_ERROR", "m"]]), "index must be"),
    ("result-error-index-bool", _with(RESULT, errors=[[True, "MODEL_ERROR", "m"]]), "index must be.*got bool True"),
    ("result-error-code-list", _with(RESULT, errors=[[0, ["x"], "m"]]),
     r"BatchResult.errors\[0\] code must be a str.*got a list of 1"),
    ("result-error-code-too-long", _with(RESULT, errors=[[0, LONG_NAME, "m"]]), "code must be a str of at most 256"),
    ("result-error-message-too-long", _with(RESULT, errors=[[0, "MODEL_ERROR", LONG_TEXT]]),
     "message must be a str of at most 4096"),
    ("result-error-message-nil", _with(RESULT, errors=[[0, "MODEL_ERROR", None]]), "message must be a str"),
    ("result-error-index-twice", _with(RESULT, errors=[[0, "MODEL_ERROR", "a"], [0, "MODEL_ERROR", "b"]]),
     "names output 0 twice"),
    ("result-error-not-a-list", _with(RESULT, errors=["MODEL_ERROR"]),
     r"errors\[0\] must be \[index, code, message\]"),
    ("result-compute-ms-nan", _with(RESULT, compute_ms=NAN),
     "BatchResult.compute_ms must be a finite number.*got float nan"),
    ("result-compute-ms-inf", _with(RESULT, compute_ms=INF), "BatchResult.compute_ms"),
    ("result-compute-ms-negative", _with(RESULT, compute_ms=-1.0), "BatchResult.compute_ms"),
    ("result-batch-id-negative", _with(RESULT, batch_id=-1), "BatchResult.batch_id"),
    ("reply-retry-after-negative", _with(protocol.Reply("r1"), retry_after_ms=-1), "Reply.retry_after_ms"),
    ("reply-request-id-empty", _with(protocol.Reply("r1"), request_id=""), "Reply.request_id"),
    ("reply-error-message-too-long",
     _with(protocol.Reply("r1"), error_message="x" * (protocol.MAX_REPLY_TEXT_LEN + 1)), "Reply.error_message"),
    ("replies-request-id-empty", _with(protocol.Replies(["r1"], [[b"x"]]), request_ids=[""]),
     r"Replies.request_ids\[0\]"),
    ("replies-too-many-outputs", _with(protocol.Replies(["r1"], [[b"x"]]), outputs=[[b""] * (protocol.MAX_ITEMS + 1)]),
     r"Replies.outputs\[0\] must be lists of bin values, at most 65536"),
    ("disconnect-reason-too-long", _with(protocol.Disconnect(), reason=LONG_TEXT), "Disconnect.reason"),
    ("disconnect-registration-negative", _with(protocol.Disconnect(), registration=-1), "Disconnect.registration"),
    ("status-request-id-too-long", _with(protocol.StatusRequest(), request_id=LONG_NAME), "StatusRequest.request_id"),
    ("status-model-not-a-map", _with(STATUS, models={"m": 1}), r"Status.models\['m'\] must be a map"),
    ("status-worker-not-a-map", _with(STATUS, workers=["w"]), r"Status.workers\[0\] must be a map, got str 'w'"),
    ("status-stats-bin-key", _with(STATUS, stats={b"k": 1}), "Status.stats key"),
    ("error-code-too-long", _with(protocol.Error("X", "m"), code=LONG_NAME), "Error.code"),
]


@pytest.mark.parametrize("frames, complaint", [pytest.param(f, c, id=i) for i, f, c in REFUSALS])
def test_out_of_bounds_elements_are_refused_naming_the_field_and_the_value(frames, complaint):
    with pytest.raises(DecodeError, match=complaint):
        protocol.decode(frames)


HF_METADATA = {
    "platform": "pytorch",
    "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}],
    "outputs": [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 2], "labels": ["neg", "pos"]}],
}
STATS = {"batches": 3, "items": 9, "mean_batch_latency_ms": 1.5, "note": "", "ok": True, "none": None,
         "gpu": {"memory": 1, "name": "H200"}}


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(protocol.Request("r" * 256, "m" * 256, timeout_ms=-5, inputs=[b"\x01"], sizes=[2**31 - 1],
                                      priority=protocol.MIN_PRIORITY, instance_id="i" * 256),
                     id="request-at-the-bounds"),
        pytest.param(protocol.Request("r", "m", timeout_ms=2**40, priority=protocol.MAX_PRIORITY),
                     id="request-at-the-top"),
        pytest.param(protocol.Ready(models=[f"m{i}" for i in range(64)], max_batch_size=protocol.MAX_ITEMS,
                                    max_batches=protocol.MAX_BATCHES,
                                    metadata=_nested(protocol.MAX_DOCUMENT_DEPTH - 1)),
                     id="ready-at-the-bounds"),
        pytest.param(protocol.Ready(models=["m"], max_batch_size=1, metadata=HF_METADATA), id="ready-with-hf-metadata"),
        pytest.param(protocol.Heartbeat(stats=STATS), id="heartbeat-with-one-level-of-nested-stats"),
        pytest.param(protocol.BatchResult(1, [b"", b"\x01"], errors=[protocol.InputFailure(0, "SOMETHING_NEW", "m" * 4096)],
                                          compute_ms=0),
                     id="result-with-unknown-code-and-longest-message"),
        pytest.param(protocol.Reply("r", error_code="OVERLOADED", retry_after_ms=2**40), id="reply-at-the-bounds"),
    ],
)
def test_messages_at_the_bounds_are_accepted(message):
    assert protocol.decode(protocol.encode(message)) == message


@pytest.mark.parametrize("frames", [
    [b"DDML1", b"\x02", b"\x80"],  # how a version-1 peer frames a heartbeat
    [b"DDML5\x02\x80"],
    [b"DDML2\x02\x80"],  # the version before inputs travelled apart from the body
    [b"DDML3\x02\x80"],  # the version before REQUESTS
])
def test_another_protocol_version_is_named_in_the_error(frames):
    version = frames[0][:5].decode()
    with pytest.raises(protocol.VersionMismatch, match=version):
        protocol.decode(frames)


def test_random_bytes_never_raise_anything_but_decode_error():
    rng = np.random.default_rng(0)
    bodies = [protocol.encode(m)[0][6:] for m in MESSAGES]
    for _ in range(3000):
        frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(0, 3)))]
        if rng.random() < 0.7 and frames:
            body = bodies[int(rng.integers(len(bodies)))] if rng.random() < 0.5 else frames[0]
            if rng.random() < 0.5 and body:  # corrupt a valid body in one place
                at = int(rng.integers(len(body)))
                body = body[:at] + rng.bytes(1) + body[at + 1:]
            frames[0] = protocol.PROTOCOL_VERSION + bytes([int(rng.integers(1, 13))]) + body
        try:
            protocol.decode(frames)
        except DecodeError:
            pass


BIG = protocol.INPUT_FRAME_BYTES  # the smallest input that travels in a frame of its own


def _raw(kind_message, sizes, inline: bytes, *extra: bytes) -> list[bytes]:
    """A REQUEST or BATCH whose inputs are laid out by hand: lengths, inline bytes and the frames after."""
    return [*_with(kind_message, input_bytes=sizes, inline=inline), *extra]


# A hostile layout of a REQUEST's or BATCH's inputs: each must be refused with what does not match.
RAW_REFUSALS = [
    ("fewer-lengths-than-inline", _raw(REQUEST, [1], b"\x01\x02"), "inline.*2.*under"),
    ("more-lengths-than-inline", _raw(REQUEST, [1, 1], b"\x01"), r"input_bytes\[1\] ends at byte 2 of inline, which holds 1"),
    ("inline-left-over", _raw(REQUEST, [1, 1], b"\x01\x02\x03"), "inline holds 3 bytes, and its inputs 2"),
    ("a-large-input-inline", _raw(REQUEST, [BIG], bytes(BIG)), r"input_bytes\[0\].*under 65536"),
    ("a-large-input-without-its-frame", _raw(REQUEST, [1, BIG], b"\x01"), "needs frame 1, and the message has 1"),
    ("a-frame-of-another-length", _raw(REQUEST, [BIG], b"", bytes(BIG + 1)), "is 65536, its frame holds 65537"),
    ("a-frame-no-input-claims", _raw(REQUEST, [1, 1], b"\x01\x02", bytes(BIG)), "has 2 frames, and its inputs take 1"),
    ("a-small-input-in-a-frame", _raw(REQUEST, [1], b"", b"\x01"), "input_bytes"),
    ("a-huge-claimed-length", _raw(REQUEST, [2**62, 1], b"\x01"), r"input_bytes\[0\] must be an int in \[0, 67108864\]"),
    ("a-negative-length", _raw(REQUEST, [-1, 2], b"\x01"), r"input_bytes\[0\]"),
    ("a-length-that-is-a-str", _raw(REQUEST, ["1"], b"\x01"), r"input_bytes\[0\]"),
    ("a-length-that-is-a-bool", _raw(REQUEST, [True, 1], b"\x01\x02"), r"input_bytes\[0\].*bool"),
    ("too-many-lengths", _raw(REQUEST, [0] * (protocol.MAX_ITEMS + 1), b""), "a list of at most 65536 lengths"),
    ("no-input-bytes", _with(REQUEST, input_bytes=None), "input_bytes must be a list"),
    ("batch-more-inputs-than-ids", _raw(BATCH, [1, 1], b"\x01\x02"), "1 request ids for 2 inputs"),
    ("batch-a-frame-of-another-length", _raw(BATCH, [1, BIG], b"\x01", bytes(BIG - 1)), "its frame holds 65535"),
    ("request-sizes-for-other-inputs", _raw(protocol.Request("r", "m", 1, [b"\x01"], sizes=[1]), [1, 1], b"\x01\x02"),
     "1 sizes for 2 inputs"),
    ("heartbeat-with-a-frame", [*protocol.encode(HEARTBEAT), b"\x01"], "Heartbeat message is one frame, got 2"),
]


@pytest.mark.parametrize("frames, complaint", [pytest.param(f, c, id=i) for i, f, c in RAW_REFUSALS])
def test_a_hostile_layout_of_inputs_is_refused_with_what_does_not_match(frames, complaint):
    with pytest.raises(DecodeError, match=complaint):
        protocol.decode(frames)


@pytest.mark.parametrize("sizes", [[1], [BIG], [0, BIG, 3, BIG + 1, 0], [BIG - 1, BIG, BIG - 1], []])
def test_inputs_small_and_large_round_trip_in_order(sizes):
    inputs = [bytes([n % 251]) * n for n in sizes]
    request = protocol.Request("r", "m", 1, inputs)
    frames = protocol.encode(request)
    assert len(frames) == 1 + sum(n >= BIG for n in sizes)
    assert protocol.decode(frames) == request
    assert protocol.request_id_of(frames[:1] + [b"x"]) == "r"  # a refused one is still answered


def test_arrays_travel_as_raw_little_endian_buffers():
    array = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian in memory
    encoded = protocol.encode_value({"embedding": array})
    assert array.astype("<f4").tobytes() in encoded  # raw bytes, not a list of floats
    decoded = protocol.decode_value(encoded)["embedding"]
    assert decoded.dtype == np.dtype("<f4") and decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)


def test_array_with_inconsistent_shape_is_refused():
    bad = msgpack.packb({"__ndarray__": ["<f4", [3], b"\x00" * 8]})
    with pytest.raises(DecodeError, match="needs 12 bytes"):
        protocol.decode_value(bad)


def test_object_arrays_cannot_travel_either_way():
    with pytest.raises(TypeError, match="cannot travel"):
        protocol.encode_value(np.array([object()], dtype=object))
    with pytest.raises(DecodeError, match="not allowed"):
        protocol.decode_value(msgpack.packb({"__ndarray__": ["|O", [1], b"\x00" * 8]}))


def test_unencodable_values_raise_type_error():
    with pytest.raises(TypeError, match="cannot encode"):
        protocol.encode_value(object())


def test_error_codes_are_strings_on_the_wire():
    reply = protocol.Reply("r", error_code=ErrorCode.TIMEOUT.value)
    body = msgpack.unpackb(protocol.encode(reply)[0][6:])
    assert body["error_code"] == "TIMEOUT"


def test_http_documents_refuse_extension_types():
    with pytest.raises(DecodeError):
        protocol.unpack_document(b"\xd4\x01\x00")
    assert protocol.unpack_document(protocol.pack_document({"a": np.ones(2, "<f4")})) == {"a": [1.0, 1.0]}


@pytest.mark.parametrize("dtype", ["<f4", "|b1", ">f8", "|u1", "<i8"])
@pytest.mark.parametrize("shape", [(3, 224, 224), (), (0, 3), (2, 5)])
def test_arrays_and_frames_encode_to_the_bytes_they_always_had(dtype, shape):
    """Arrays are packed from a view of their memory and a frame is packed once after its prefix
    (issue #27, fewer copies of a tensor): the bytes on the wire are those of tobytes() and of
    prefix + packb(body), exactly."""
    array = (np.arange(int(np.prod(shape)), dtype=np.int64) % 7).reshape(shape).astype(dtype)
    little = array.astype(array.dtype.newbyteorder("<"))
    item = protocol.encode_value(array)
    assert item == msgpack.packb({"__ndarray__": [little.dtype.str, list(shape), little.tobytes()]}, use_bin_type=True)
    assert protocol.decode_value(item).tobytes() == little.tobytes()
    request = protocol.Request("r1", "m", 1000, inputs=[item, b"x"])
    frames = protocol.encode(request)
    large = len(item) >= protocol.INPUT_FRAME_BYTES  # travels in a frame of its own, as it is
    assert frames[1:] == ([item] if large else [])
    frame = frames[0]
    body = {"request_id": "r1", "model": "m", "timeout_ms": 1000, "sizes": [], "priority": 0, "instance_id": "",
            "input_bytes": [len(item), 1], "inline": b"x" if large else item + b"x"}
    assert frame.startswith(protocol.PROTOCOL_VERSION)
    assert protocol.decode(frames) == request
    assert frame[len(protocol.PROTOCOL_VERSION) + 1:] == msgpack.packb(
        {name: body[name] for name in msgpack.unpackb(frame[len(protocol.PROTOCOL_VERSION) + 1:])},
        use_bin_type=True)


def test_a_frame_that_cannot_be_encoded_leaves_the_next_one_whole():
    """The packer that frames messages keeps its buffer between calls: a failed pack must not leave
    half a body in it for the next message."""
    with pytest.raises(TypeError):
        protocol.encode(protocol.Request("r1", "m", 1000, inputs=[object()]))
    request = protocol.Request("r2", "m", 1000, inputs=[b"ok"])
    assert protocol.decode(protocol.encode(request)) == request


# --------------------------------------------------------------------------- REQUESTS


def test_requests_golden_bytes_hold_each_request_as_a_request_body():
    frames = protocol.encode(protocol.Requests([protocol.Request("r1", "echo", timeout_ms=100, inputs=[b"\xa1x"]),
                                                protocol.Request("r2", "echo", timeout_ms=7, inputs=[])]))
    assert frames == [
        b"DDML4\x0c"
        b"\x81\xa8requests\x92"
        b"\x88\xaarequest_id\xa2r1\xa5model\xa4echo\xaatimeout_ms\x64"
        b"\xa5sizes\x90\xa8priority\x00\xabinstance_id\xa0"
        b"\xabinput_bytes\x91\x02\xa6inline\xc4\x02\xa1x"
        b"\x88\xaarequest_id\xa2r2\xa5model\xa4echo\xaatimeout_ms\x07"
        b"\xa5sizes\x90\xa8priority\x00\xabinstance_id\xa0"
        b"\xabinput_bytes\x90\xa6inline\xc4\x00",
    ]
    # Each entry is exactly the body of the REQUEST it would travel as alone.
    alone = protocol.encode(protocol.Request("r1", "echo", timeout_ms=100, inputs=[b"\xa1x"]))[0]
    assert alone[6:] in frames[0]


def test_requests_carry_the_large_inputs_of_every_entry_in_frames_in_order_and_round_trip():
    large = [bytes([n]) * (BIG + n) for n in range(3)]
    requests = protocol.Requests([protocol.Request("a", "m", 1, [b"\x01", large[0]]),
                                  protocol.Request("b", "m", 1, [b"\x02"]),
                                  protocol.Request("c", "m", 1, [large[1], b"\x03", large[2]])])
    frames = protocol.encode(requests)
    assert frames[1:] == large
    decoded = protocol.decode(frames)
    assert decoded == requests and decoded.refused == []
    with pytest.raises(DecodeError, match="Requests has 5 frames, and its inputs take 4"):
        protocol.decode([*frames, bytes(BIG)])
    with pytest.raises(DecodeError, match=r"Requests.requests\[2\].input_bytes\[0\] is 65537, its frame holds 65538"):
        protocol.decode([*frames[:2], frames[3], frames[2]])
    with pytest.raises(DecodeError, match=r"Requests.requests\[2\].input_bytes\[2\].*needs frame 3"):
        protocol.decode(frames[:3])


@pytest.mark.parametrize("flaw, complaint", [
    ({"model": LONG_NAME}, "Request.model"),
    ({"priority": protocol.MAX_PRIORITY + 1}, "Request.priority"),
    ({"timeout_ms": True}, "Request.timeout_ms must be int"),
    ({"sizes": [1, 2]}, "2 sizes for 1 inputs"),
    ({"trace": ["x" * 56, ""]}, "traceparent"),
])
def test_a_requests_entry_with_a_wrong_field_is_refused_alone_with_its_id(flaw, complaint):
    good = [protocol.Request(f"r{n}", "m", 100, [bytes([n])]) for n in range(3)]
    frame = protocol.encode(protocol.Requests(good))[0]
    body = msgpack.unpackb(frame[6:])
    body["requests"][1].update(flaw)
    decoded = protocol.decode([frame[:6] + msgpack.packb(body)])
    assert decoded.requests == [good[0], good[2]]
    [(request_id, why)] = decoded.refused
    assert request_id == "r1" and complaint in why and why.startswith("Requests.requests[1]")


def test_a_requests_entry_without_a_readable_id_is_refused_without_one():
    frame = protocol.encode(protocol.Requests([REQUEST, protocol.Request("r2", "m", 1, [b"\x02"])]))[0]
    body = msgpack.unpackb(frame[6:])
    body["requests"][0]["request_id"] = LONG_NAME
    decoded = protocol.decode([frame[:6] + msgpack.packb(body)])
    assert [r.request_id for r in decoded.requests] == ["r2"] and decoded.refused[0][0] == ""


@pytest.mark.parametrize("requests, complaint", [
    ([], r"Requests.requests must be a list of 1 to 65536 requests, got a list of 0"),
    ("x", "Requests.requests must be a list"),
    ([REQUEST, 1], r"Requests.requests\[1\] must be a map"),
])
def test_a_requests_message_of_the_wrong_shape_is_refused_whole(requests, complaint):
    with pytest.raises(DecodeError, match=complaint):
        protocol.decode([b"DDML4\x0c" + msgpack.packb({"requests": [
            msgpack.unpackb(protocol.encode(r)[0][6:]) if type(r) is protocol.Request else r for r in requests]
            if type(requests) is list else requests})])


def test_a_requests_entry_with_a_wrong_layout_refuses_the_whole_message():
    frame = protocol.encode(protocol.Requests([REQUEST, protocol.Request("r2", "m", 1, [b"\x02"])]))[0]
    body = msgpack.unpackb(frame[6:])
    body["requests"][1]["input_bytes"] = [2]
    with pytest.raises(DecodeError, match=r"Requests.requests\[1\].input_bytes\[0\]"):
        protocol.decode([frame[:6] + msgpack.packb(body)])
    # and the broker can still answer each request whose id it can read
    assert protocol.request_ids_of([frame[:6] + msgpack.packb(body)]) == ["r1", "r2"]


def test_requests_may_hold_at_most_max_items_inputs_in_all():
    half = protocol.MAX_ITEMS // 2
    ok = protocol.Requests([protocol.Request("a", "m", 1, [b""] * half), protocol.Request("b", "m", 1, [b""] * half)])
    assert protocol.decode(protocol.encode(ok)) == ok
    over = protocol.Requests([*ok.requests, protocol.Request("c", "m", 1, [b""])])
    with pytest.raises(DecodeError, match="65537 inputs in all"):
        protocol.decode(protocol.encode(over))


def test_request_ids_of_reads_only_requests():
    assert protocol.request_ids_of(protocol.encode(REQUEST)) == ["r1"]
    assert protocol.request_ids_of(protocol.encode(HEARTBEAT)) == []
    assert protocol.request_ids_of([]) == [] and protocol.request_id_of([]) is None
    assert protocol.request_ids_of([b"DDML4\x0c\xc1"]) == []  # not msgpack
    assert protocol.request_id_of(protocol.encode(protocol.Requests([REQUEST]))) is None  # REQUEST only
