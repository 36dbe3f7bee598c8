"""The optional timing fields (docs/protocol.md): a Request asks for its timings, a Batch says a request of it
did, a BatchResult carries the worker's prepare time, and a Reply (or Replies) the request's figures.
Each is left off the wire while empty, so that messages without them keep their exact bytes and an
older peer, which ignores keys it does not know, still decodes messages with them."""

import math

import msgpack
import pytest

from ddml_common import protocol
from ddml_common.protocol import DecodeError

TIMED = {"queue_ms": 12.5, "prepare_ms": 0.75, "forward_ms": 3}
WITH_TIMINGS = [
    protocol.Request("r1", "m", timeout_ms=100, inputs=[b"\x01"], timings=True),
    protocol.Batch(batch_id=3, model="m", request_ids=["r1"], timeout_ms=10, inputs=[b"\x01"], timed=True),
    protocol.BatchResult(3, [b"\x01"], compute_ms=2.0, prepare_ms=0.5),
    protocol.Reply("r1", outputs=[b"\x01"], timings=TIMED),
    protocol.Replies(["r1", "r2"], [[b"\x01"], [b"\x02"]], timings={"r2": TIMED}),
]
FIELD = {protocol.Request: "timings", protocol.Batch: "timed", protocol.BatchResult: "prepare_ms",
         protocol.Reply: "timings", protocol.Replies: "timings"}


def _body(message) -> dict:
    return msgpack.unpackb(protocol.encode(message)[0][6:])


@pytest.mark.parametrize("message", WITH_TIMINGS, ids=lambda m: type(m).__name__)
def test_timings_round_trip_and_are_left_off_the_wire_while_empty(message):
    assert protocol.decode(protocol.encode(message)) == message
    name = FIELD[type(message)]
    assert name in _body(message)
    bare = protocol.decode(protocol.encode(message))
    setattr(bare, name, type(getattr(message, name))())  # False, 0.0 or {}: the default
    assert name not in _body(bare)
    # Without the field, the bytes are those of a message built without it, as before the field existed.
    fields = {f: getattr(bare, f) for f in bare.__slots__ if f != name}
    assert protocol.encode(bare) == protocol.encode(type(message)(**fields))


@pytest.mark.parametrize("message", WITH_TIMINGS, ids=lambda m: type(m).__name__)
def test_an_older_peer_that_ignores_unknown_keys_reads_the_rest(message):
    """What a peer of the previous release decodes: the same message, less the field it does not know."""
    body = _body(message)
    body.pop(FIELD[type(message)])
    older = protocol.decode([protocol.encode(message)[0][:6] + msgpack.packb(body, use_bin_type=True)])
    assert older == type(message)(**{f: getattr(message, f) for f in message.__slots__ if f != FIELD[type(message)]})


def test_replies_of_carry_each_requests_timings():
    first, second = protocol.replies_of(protocol.decode(protocol.encode(WITH_TIMINGS[-1])))
    assert first.timings == {} and second.timings == TIMED
    assert [r.timings for r in protocol.replies_of(protocol.Replies(["a"], [[b""]]))] == [{}]


HOSTILE = [-1.0, -1, math.nan, math.inf, -math.inf, 2.0**41, 2**41, True, "1", None, [1]]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_figures_are_refused(value):
    for message, where in (
        (protocol.Reply("r1", timings={"queue_ms": value}), r"Reply.timings\['queue_ms'\]"),
        (protocol.Replies(["r1"], [[b""]], timings={"r1": {"forward_ms": value}}),
         r"Replies.timings\['r1'\]\['forward_ms'\]"),
    ):
        with pytest.raises(DecodeError, match=where + " must be a finite number in"):
            protocol.decode(protocol.encode(message))
    if type(value) in (int, float):  # the other types are refused by the field's own type check
        with pytest.raises(DecodeError, match="BatchResult.prepare_ms must be a finite number"):
            protocol.decode(protocol.encode(protocol.BatchResult(1, [b""], prepare_ms=value)))


@pytest.mark.parametrize("message, complaint", [
    (protocol.Reply("r1", timings={"cpu_ms": 1}), "Reply.timings key must be one of forward_ms, prepare_ms, queue_ms"),
    (protocol.Reply("r1", timings={1: 1}), "Reply.timings key|map key"),  # msgpack refuses it first
    (protocol.Replies(["r1"], [[b""]], timings={"r1": [1, 2, 3]}), r"Replies.timings\['r1'\] must be a map"),
    (protocol.Replies(["r1"], [[b""]], timings={"": {}}), "Replies.timings key must be a non-empty str"),
    (protocol.Replies(["r1"], [[b""]], timings={"a": {}, "b": {}}), "2 timings for 1 replies"),
    (protocol.Request("r1", "m", timeout_ms=1, timings=1), "Request.timings must be bool"),
    (protocol.Batch(1, "m", [], timeout_ms=1, timed="yes"), "Batch.timed must be bool"),
])
def test_malformed_timings_are_refused(message, complaint):
    with pytest.raises(DecodeError, match=complaint):
        protocol.decode(protocol.encode(message))


def test_figures_at_the_bounds_are_accepted():
    top = {name: float(protocol.MAX_DURATION_MS) for name in protocol.TIMINGS}
    for message in (protocol.Reply("r1", timings=top), protocol.Reply("r1", timings={"queue_ms": 0}),
                    protocol.BatchResult(1, [b""], prepare_ms=protocol.MAX_DURATION_MS)):
        assert protocol.decode(protocol.encode(message)) == message
