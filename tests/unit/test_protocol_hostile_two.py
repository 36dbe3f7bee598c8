"""Hostile peers, round two (issue #28): msgpack's timestamp extension, and numbers that are not
finite or not integers, on the wire and in the gateway's msgpack bodies."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from ddml_common import protocol

TIMESTAMPS = [msgpack.Timestamp(1, 5), msgpack.Timestamp(2**40, 1), msgpack.Timestamp(2**35, 0),
              msgpack.Timestamp(-1, 0)]  # fixext 4, ext 8 with 96 bits, fixext 8, a negative one


@pytest.mark.parametrize("timestamp", TIMESTAMPS, ids=repr)
@pytest.mark.parametrize("decode", [protocol.decode_value, protocol.unpack_document], ids=lambda f: f.__name__)
def test_the_timestamp_extension_is_refused_like_every_other_one(decode, timestamp):
    """msgpack decodes extension type -1 itself and never calls ext_hook: it used to pass."""
    for value in (timestamp, [1, {"a": [timestamp]}], {"inputs": ["x", timestamp]}):
        with pytest.raises(protocol.DecodeError, match="extension type -1"):
            decode(msgpack.packb(value))


def test_a_timestamp_in_a_large_body_is_refused_too():
    body = msgpack.packb({"inputs": ["x" * 100] * (protocol.MAX_CONTAINER_LEN // 50) + [msgpack.Timestamp(1, 0)]})
    assert len(body) > protocol.MAX_CONTAINER_LEN  # the other branch of the unpacker
    with pytest.raises(protocol.DecodeError, match="extension type -1"):
        protocol.unpack_document(body)


def test_every_other_extension_type_is_refused():
    for code in range(-128, 128):
        if code == -1:
            continue
        fixext1 = bytes([0xD4, code & 0xFF, 0])  # msgpack.ExtType cannot pack the reserved negative codes
        for data in (fixext1, msgpack.packb([1, "x"])[:-2] + fixext1):
            with pytest.raises(protocol.DecodeError, match=f"extension type {code} "):
                protocol.decode_value(data)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=16)
                    | st.text(max_size=16) | st.floats(allow_nan=False),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20))
def test_values_with_the_byte_0xff_but_no_timestamp_still_decode(value):
    """The walk for timestamps runs only when the byte 0xff is present; it must not refuse others."""
    data = msgpack.packb(value, use_bin_type=True)
    assert protocol.decode_value(data) == value


def test_a_timestamp_in_a_wire_message_is_refused():
    request = protocol.Request("r", "m", 1000, inputs=[b"x"])
    body = {**dataclasses.asdict(request), "timeout_ms": msgpack.Timestamp(1, 0)}
    frames = protocol.encode(request)
    prefix = frames[0][:len(frames[0]) - len(msgpack.packb(dataclasses.asdict(request)))]
    with pytest.raises(protocol.DecodeError):
        protocol.decode([prefix + msgpack.packb(body)])


def message_with(message, name: str, value):
    copy = dataclasses.replace(message)
    object.__setattr__(copy, name, value)
    return copy


NUMERIC_FIELDS = [
    (protocol.Request("r", "m", 1000, inputs=[b"x"]), "timeout_ms"),
    (protocol.Request("r", "m", 1000, inputs=[b"x"]), "priority"),
    (protocol.Batch(1, "m", ["r"], 1000, [b"x"]), "timeout_ms"),
    (protocol.Batch(1, "m", ["r"], 1000, [b"x"]), "batch_id"),
    (protocol.BatchResult(1, [b"x"]), "compute_ms"),
    (protocol.BatchResult(1, [b"x"]), "batch_id"),
    (protocol.Reply("r", [b"x"]), "retry_after_ms"),
    (protocol.Ready(["m"], 4), "max_batch_size"),
    (protocol.Ready(["m"], 4), "max_batches"),
    (protocol.Ready(["m"], 4), "max_inputs"),
    (protocol.Ready(["m"], 4), "pid"),
    (protocol.Heartbeat(), "registration"),
]


@pytest.mark.parametrize("message, name", NUMERIC_FIELDS,
                         ids=[f"{type(m).__name__}.{n}" for m, n in NUMERIC_FIELDS])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2**64 - 1, -2**63])
def test_every_numeric_field_on_the_wire_refuses_nan_infinities_and_out_of_range(message, name, value):
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(message_with(message, name, value)))


@pytest.mark.parametrize("message, name", [(m, n) for m, n in NUMERIC_FIELDS if n != "compute_ms"],
                         ids=[f"{type(m).__name__}.{n}" for m, n in NUMERIC_FIELDS if n != "compute_ms"])
def test_integer_fields_on_the_wire_refuse_non_integers(message, name):
    with pytest.raises(protocol.DecodeError):
        protocol.decode(protocol.encode(message_with(message, name, 1.5)))
