"""Array items (issue #27, a tensor at memory speed): encode_value() of an array copies its data once,
decode_value() of an array item copies it once (writable) or not at all (a read-only view), from
bytes or from a view of the frame it came in. The bytes are those msgpack has always made, and an
item that is not exactly one well-formed `__ndarray__` map is decoded, or refused, as before."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ddml_common import protocol
from ddml_common.tensors import NUMPY_BY_DATATYPE

DTYPES = sorted(set(NUMPY_BY_DATATYPE.values()))


def packed_as_ever(dtype: str, shape: list, data: bytes) -> bytes:
    return msgpack.packb({"__ndarray__": [dtype, shape, data]}, use_bin_type=True)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))))
def test_any_array_travels_bit_for_bit_in_the_bytes_msgpack_always_made(array):
    item = protocol.encode_value(array)
    assert item == packed_as_ever(array.dtype.str, list(array.shape), array.tobytes())
    for data in (item, memoryview(item), bytearray(item)):
        decoded = protocol.decode_value(data)
        assert decoded.flags.writeable and decoded.dtype == array.dtype and decoded.shape == array.shape
        assert decoded.tobytes() == array.tobytes()
        view = protocol.decode_value(data, writable=False)
        assert view.tobytes() == array.tobytes() and view.shape == array.shape


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536, 602112])
def test_each_bin_header_width_is_chosen_as_msgpack_chooses_it(size):
    array = np.arange(size, dtype=np.uint8)
    assert protocol.encode_value(array) == packed_as_ever("|u1", [size], array.tobytes())
    assert protocol.decode_value(protocol.encode_value(array)).tobytes() == array.tobytes()


def test_a_msgpack_clients_array_is_passed_on_in_the_same_bytes():
    image = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    form = {"__ndarray__": ["<f4", [3, 4, 4], image.tobytes()]}
    assert protocol.encode_value(form) == packed_as_ever("<f4", [3, 4, 4], image.tobytes())


def test_the_writable_array_owns_its_memory_and_the_read_only_one_is_the_frames():
    array = np.arange(12, dtype="<i4").reshape(3, 4)
    item = protocol.encode_value(array)
    writable = protocol.decode_value(memoryview(item))
    writable += 1  # predict() may work in place: the item is not touched
    assert protocol.decode_value(item).tolist() == array.tolist()
    view = protocol.decode_value(item, writable=False)
    assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(item, np.uint8))


@pytest.mark.parametrize("item, complaint", [
    (packed_as_ever("<f4", [2], b"\0" * 7), "needs 8 bytes"),  # data too short for the shape
    (packed_as_ever("<f4", [2], b"\0" * 8) + b"\x00", "extra"),  # trailing bytes after the map
    (packed_as_ever("object", [1], b"\0" * 8), "not allowed"),
    (packed_as_ever("<f4", [-1], b""), "non-negative"),
    (packed_as_ever("<f4", ["2"], b"\0" * 8), "non-negative"),
    (b"\x81\xab__ndarray__\x93\xa3<f4\x91\x02", "incomplete"),  # cut off before its data
    (b"\x81\xab__ndarray__\x93\xa3<f4\xd4\x01\x00\xc4\x00", "extension"),  # an extension type as the shape
])
def test_a_malformed_array_item_is_refused_as_before(item, complaint):
    for data in (item, memoryview(item)):
        with pytest.raises(protocol.DecodeError, match=complaint):
            protocol.decode_value(data)


def test_an_item_that_only_starts_like_an_array_decodes_as_what_it_is():
    value = {"__ndarray__": ["<f4", [1], b"\0" * 4], "other": 1}  # two keys: a plain map, not an array
    assert protocol.decode_value(protocol.encode_value(value)) == value
