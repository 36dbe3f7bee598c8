"""The wire format: round trips, golden bytes (an independent check on the codec), malformed input."""

import msgpack
import numpy as np
import pytest

from broker import protocol
from broker.protocol import DecodeError, ErrorCode

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
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert protocol.decode(protocol.encode(message)) == message


def test_heartbeat_golden_bytes():
    frames = protocol.encode(protocol.Heartbeat())
    assert frames == [
        b"DDML1",
        b"\x02",
        b"\x84" + b"\xabinstance_id" + b"\xa0" + b"\xa5stats" + b"\x80" + b"\xa8draining" + b"\xc2"
        + b"\xacregistration" + b"\x00",
    ]


def test_request_golden_bytes_put_inputs_in_their_own_frames():
    frames = protocol.encode(protocol.Request("r1", "echo", timeout_ms=100, inputs=[b"\xa1x"]))
    assert frames == [
        b"DDML1",
        b"\x03",
        b"\x86\xaarequest_id\xa2r1\xa5model\xa4echo\xaatimeout_ms\x64\xa5sizes\x90\xa8priority\x00"
        b"\xabinstance_id\xa0",
        b"\xa1x",
    ]


def test_hand_built_request_decodes():
    header = msgpack.packb({"request_id": "7", "model": "m", "timeout_ms": 5})
    message = protocol.decode([b"DDML1", b"\x03", header, b"\xc0"])
    assert message == protocol.Request("7", "m", 5, inputs=[b"\xc0"])


@pytest.mark.parametrize(
    "frames, complaint",
    [
        ([], "at least 3 frames"),
        ([b"DDML1", b"\x02"], "at least 3 frames"),
        ([b"HTTP/1.1", b"\x02", b"\x80"], "not a ddml message"),
        ([b"DDML1", b"\x63", b"\x80"], "unknown message kind"),
        ([b"DDML1", b"\x02\x02", b"\x80"], "unknown message kind"),
        ([b"DDML1", b"\x02", b"\xc1"], "DecodeError|Unpack|ExtraData|ValueError|FormatError"),
        ([b"DDML1", b"\x02", b"\x93\x01\x02\x03"], "header must be a map"),
        ([b"DDML1", b"\x03", msgpack.packb({"model": "m", "timeout_ms": 1})], "lacks field 'request_id'"),
        ([b"DDML1", b"\x03", msgpack.packb({"request_id": 1, "model": "m", "timeout_ms": 1})], "must be str"),
        ([b"DDML1", b"\x03", msgpack.packb({"request_id": "1", "model": "m", "timeout_ms": True})], "must be int"),
        ([b"DDML1", b"\x02", msgpack.packb({}), b"extra"], "takes no item frames"),
        ([b"DDML1", b"\x02", b"\xdd\x7f\xff\xff\xff"], "exceeds|ValueError"),  # array of 2^31 in 5 bytes
        ([b"DDML1", b"\x02", b"\xd4\x01\x00"], "extension type|ExtType|ext"),
        ([b"DDML1", b"\x01", msgpack.packb({"models": [], "max_batch_size": 1})], "at least one model"),
        ([b"DDML1", b"\x01", msgpack.packb({"models": ["m"], "max_batch_size": 0})], "max_batch_size >= 1"),
        ([b"DDML1", b"\x04", msgpack.packb({"batch_id": 1, "model": "m", "request_ids": ["a"], "timeout_ms": 1})],
         "1 request ids for 0 inputs"),
        ([b"DDML1", b"\x06", msgpack.packb({"request_id": "1", "error_code": "NOPE"})], "unknown error code"),
        ([b"DDML1", b"\x05", msgpack.packb({"batch_id": 1, "errors": [[0]]})], "index, code, message"),
        ([b"DDML1", b"\x02", msgpack.packb({1: 2})], "DecodeError|ValueError|keys"),
    ],
)
def test_malformed_frames_raise_decode_error_and_nothing_else(frames, complaint):
    with pytest.raises(DecodeError, match=complaint):
        protocol.decode(frames)


def test_another_protocol_version_is_named_in_the_error():
    with pytest.raises(protocol.VersionMismatch, match="DDML2"):
        protocol.decode([b"DDML2", b"\x02", b"\x80"])


def test_random_bytes_never_raise_anything_but_decode_error():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(0, 6)))]
        if rng.random() < 0.5 and frames:
            frames[0] = b"DDML1"
        if rng.random() < 0.5 and len(frames) > 1:
            frames[1] = bytes([int(rng.integers(1, 11))])
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
    header = msgpack.unpackb(protocol.encode(reply)[2])
    assert header["error_code"] == "TIMEOUT"


def test_http_documents_refuse_extension_types():
    with pytest.raises(DecodeError):
        protocol.unpack_document(b"\xd4\x01\x00")
    assert protocol.unpack_document(protocol.pack_document({"a": np.ones(2, "<f4")})) == {"a": [1.0, 1.0]}
