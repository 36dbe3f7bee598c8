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
    protocol.BatchResult(batch_id=9, outputs=[b"\x01", b""], errors=[[1, "MODEL_ERROR", "boom"]], compute_ms=1.5),
    protocol.Reply("r1", outputs=[b"\x01"]),
    protocol.Reply("r2", error_code="OVERLOADED", error_message="full", retry_after_ms=300),
    protocol.Disconnect("bye"),
    protocol.StatusRequest("s1"),
    protocol.Status("s1", "inst", models={"m": {"workers": 1}}, workers=[{"worker_id": "00"}], stats={"x": 1}),
    protocol.Error("BAD_VERSION", "speak DDML1"),
    protocol.Replies(["r1", "r2"], [[b"\x01"], [b"\x02", b"\x03"]]),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert protocol.decode(protocol.encode(message)) == message


def test_heartbeat_golden_bytes():
    frames = protocol.encode(protocol.Heartbeat())
    assert frames == [
        b"DDML2\x02"
        + b"\x84" + b"\xabinstance_id" + b"\xa0" + b"\xa5stats" + b"\x80" + b"\xa8draining" + b"\xc2"
        + b"\xacregistration" + b"\x00",
    ]


def test_request_golden_bytes_carry_inputs_as_bin_values_in_one_frame():
    frames = protocol.encode(protocol.Request("r1", "echo", timeout_ms=100, inputs=[b"\xa1x"]))
    assert frames == [
        b"DDML2\x03"
        b"\x87\xaarequest_id\xa2r1\xa5model\xa4echo\xaatimeout_ms\x64\xa6inputs\x91\xc4\x02\xa1x"
        b"\xa5sizes\x90\xa8priority\x00\xabinstance_id\xa0",
    ]


def _frame(kind: int, body) -> list[bytes]:
    return [b"DDML2" + bytes([kind]) + (body if isinstance(body, bytes) else msgpack.packb(body))]


def test_hand_built_request_decodes():
    message = protocol.decode(_frame(3, {"request_id": "7", "model": "m", "timeout_ms": 5, "inputs": [b"\xc0"]}))
    assert message == protocol.Request("7", "m", 5, inputs=[b"\xc0"])


def test_unknown_body_fields_are_ignored():
    message = protocol.decode(_frame(2, {"instance_id": "b", "added_in_a_later_minor": [1, 2]}))
    assert message == protocol.Heartbeat("b")


@pytest.mark.parametrize(
    "frames, complaint",
    [
        ([], "not a ddml message"),
        ([b"DDML2"], "no kind or no body"),
        ([b"DDML2\x02"], "no kind or no body"),
        ([b"HTTP/1.1 200"], "not a ddml message"),
        (_frame(2, {}) + [b"extra"], "one frame, got 2"),
        (_frame(0x63, {}), "unknown message kind 99"),
        (_frame(2, b"\xc1"), "DecodeError|Unpack|ExtraData|ValueError|FormatError"),
        (_frame(2, b"\x93\x01\x02\x03"), "body must be a map"),
        (_frame(3, {"model": "m", "timeout_ms": 1}), "lacks field 'request_id'"),
        (_frame(3, {"request_id": 1, "model": "m", "timeout_ms": 1}), "must be str"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": True}), "must be int"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": 1, "inputs": ["text"]}), "must hold bin"),
        (_frame(3, {"request_id": "1", "model": "m", "timeout_ms": 1, "inputs": b"x"}), "inputs must be list"),
        (_frame(2, b"\xdd\x7f\xff\xff\xff"), "exceeds|ValueError"),  # array of 2^31 in 5 bytes
        (_frame(2, b"\xd4\x01\x00"), "extension type|ExtType|ext"),
        (_frame(1, {"models": [], "max_batch_size": 1}), "at least one model"),
        (_frame(1, {"models": ["m"], "max_batch_size": 0}), "max_batch_size >= 1"),
        (_frame(4, {"batch_id": 1, "model": "m", "request_ids": ["a"], "timeout_ms": 1}),
         "1 request ids for 0 inputs"),
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


@pytest.mark.parametrize("frames", [
    [b"DDML1", b"\x02", b"\x80"],  # how a version-1 peer frames a heartbeat
    [b"DDML3\x02\x80"],
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
            frames[0] = b"DDML2" + bytes([int(rng.integers(1, 11))]) + body
        try:
            protocol.decode(frames)
        except DecodeError:
            pass


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
