"""encode()'s path for REQUEST (one dict display) gives the bytes of the general path, for every shape."""

import pytest

from ddml_common import protocol
from ddml_common.protocol import INPUT_FRAME_BYTES, Request, _encode_fields, _FIELD_NAMES, _REQUEST_FIELDS

LARGE = b"x" * INPUT_FRAME_BYTES

REQUESTS = [
    Request("r/1-1", "echo", 30000, [protocol.encode_value("hello")], [5]),
    Request("r/1-2", "m@2", 1, [protocol.encode_value(v) for v in ("a", 2, [1.5])], [1, 0, 0], priority=-3,
            instance_id="abc"),
    Request("r/1-3", "echo", 5, [LARGE, protocol.encode_value("small"), LARGE], [0, 5, 0],
            trace=["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "k=v"], timings=True),
    Request("r/1-4", "echo", 5, [LARGE], [0], timings=True),
    Request("r/1-5", "echo", 5, [], []),
]


def test_request_fields_are_the_schemas():
    assert _REQUEST_FIELDS == _FIELD_NAMES[Request]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: m.request_id)
def test_request_encodes_to_the_general_paths_bytes_and_back(message):
    frames = protocol.encode(message)
    assert [bytes(f) for f in frames] == [bytes(f) for f in _encode_fields(message, Request)]
    assert protocol.decode(frames) == message
