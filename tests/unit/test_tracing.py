"""W3C trace context: parsing, the optional wire fields (old and new peers), and the broker carrying it."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from broker.core import BrokerCore, Peer
from ddml_common import protocol, tracing
from tests.unit.test_core import CONFIG, Wire, frames, step

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value, expected", [
    (PARENT, (TRACE_ID, "00f067aa0ba902b7", 1)),
    (f"  {PARENT} ", (TRACE_ID, "00f067aa0ba902b7", 1)),
    (f"01-{TRACE_ID}-00f067aa0ba902b7-00-later-field", (TRACE_ID, "00f067aa0ba902b7", 0)),  # a later version
    (f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),  # version ff is invalid
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent id
    (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", None),  # upper case is not allowed
    ("00-abc-def-01", None), ("", None), (None, None), (42, None),
])
def test_traceparent_is_parsed_as_w3c_says(value, expected):
    assert tracing.parse_traceparent(value) == expected


def test_incoming_keeps_a_valid_context_and_drops_an_overlong_tracestate():
    assert tracing.incoming(PARENT, "rojo=00f067aa0ba902b7") == [PARENT, "rojo=00f067aa0ba902b7"]
    assert tracing.incoming(PARENT, None) == [PARENT, ""]
    assert tracing.incoming(PARENT, "x" * 513) == [PARENT, ""]
    assert tracing.incoming("garbage", "rojo=1") is None
    # a later version is carried as version 00, the only one this process speaks
    assert tracing.incoming(f"01-{TRACE_ID}-00f067aa0ba902b7-01-more", "") == [PARENT, ""]


def test_a_request_without_a_trace_keeps_its_exact_bytes():
    """The golden-bytes rule: the new field is not on the wire while empty."""
    message = protocol.Request("r1", "m", 1000, inputs=[b"\x01"], sizes=[1], priority=2)
    body = {"request_id": "r1", "model": "m", "timeout_ms": 1000, "sizes": [1], "priority": 2, "instance_id": "",
            "input_bytes": [1], "inline": b"\x01"}
    assert protocol.encode(message) == [protocol.PROTOCOL_VERSION + b"\x03" + msgpack.packb(body, use_bin_type=True)]
    batch = protocol.Batch(7, "m", ["r1"], 500, inputs=[b"\x01"])
    body = {"batch_id": 7, "model": "m", "request_ids": ["r1"], "timeout_ms": 500, "input_bytes": [1], "inline": b"\x01"}
    assert protocol.encode(batch) == [protocol.PROTOCOL_VERSION + b"\x04" + msgpack.packb(body, use_bin_type=True)]


def test_traces_round_trip_and_an_older_peer_still_decodes_them():
    request = protocol.Request("r1", "m", 1000, inputs=[b"\x01"], trace=[PARENT, "a=b"])
    [frame] = protocol.encode(request)
    assert protocol.decode([frame]) == request
    batch = protocol.Batch(7, "m", ["r1"], 500, inputs=[b"\x01"], traces={"r1": [PARENT, "", 12]})
    assert protocol.decode(protocol.encode(batch)) == batch
    # An older peer knows no "trace" field; decode() of a body with a key it does not know ignores it,
    # which is what an older decode() does with ours.
    body = msgpack.unpackb(frame[len(protocol.PROTOCOL_VERSION) + 1:])
    body["a_field_from_the_future"] = [1, 2]
    newer = protocol.PROTOCOL_VERSION + b"\x03" + msgpack.packb(body, use_bin_type=True)
    assert protocol.decode([newer]) == request


@pytest.mark.parametrize("trace", [[PARENT], [PARENT, "", ""], [PARENT, 1], ["x" * 56, ""], [PARENT, "s" * 513]])
def test_a_malformed_request_trace_is_refused(trace):
    body = {"request_id": "r1", "model": "m", "timeout_ms": 1000, "input_bytes": [1], "inline": b"\x01", "trace": trace}
    with pytest.raises(protocol.DecodeError, match="trace"):
        protocol.decode([protocol.PROTOCOL_VERSION + b"\x03" + msgpack.packb(body, use_bin_type=True)])


@pytest.mark.parametrize("traces", [{"r1": [PARENT, ""]}, {"r1": [PARENT, "", -1]}, {"": [PARENT, "", 1]},
                                    {"r1": "x"}, {"r1": [PARENT, "", 1], "r2": [PARENT, "", 1]}])
def test_malformed_batch_traces_are_refused(traces):
    body = {"batch_id": 1, "model": "m", "request_ids": ["r1"], "timeout_ms": 5, "input_bytes": [1], "inline": b"\x01",
            "traces": traces}
    with pytest.raises(protocol.DecodeError):
        protocol.decode([protocol.PROTOCOL_VERSION + b"\x04" + msgpack.packb(body, use_bin_type=True)])


def test_the_broker_carries_each_traced_requests_context_and_queue_time_into_its_batch():
    core, wire = BrokerCore(CONFIG, "i1", now=0.0), Wire()
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.Ready(["m"], max_batch_size=4, max_batches=1)), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", frames(protocol.Request("busy", "m", 5000, inputs=[b"\xa1x"])), 0.0)
    step(core, wire, 0.0)
    [first] = wire.take(b"w1", protocol.Batch)  # the worker's only credit: what follows queues
    assert first.traces == {}
    traced = protocol.Request("traced", "m", 5000, inputs=[protocol.encode_value("a")], trace=[PARENT, "k=v"])
    plain = protocol.Request("plain", "m", 5000, inputs=[protocol.encode_value("b")])
    core.on_frames(Peer.GATEWAY, b"gw", frames(traced), 1.0)
    core.on_frames(Peer.GATEWAY, b"gw", frames(plain), 1.0)
    step(core, wire, 1.0)
    core.on_frames(Peer.WORKER, b"w1", frames(protocol.BatchResult(first.batch_id, first.inputs)), 1.25)
    step(core, wire, 1.25)
    [batch] = wire.take(b"w1", protocol.Batch)
    assert sorted(batch.request_ids) == ["plain", "traced"]
    assert batch.traces == {"traced": [PARENT, "k=v", 250]}


def test_nothing_imports_opentelemetry_without_an_endpoint():
    code = ("import sys, gateway.app, gateway.tracing, worker.loop, broker.broker\n"
            "from ddml_common import tracing\n"
            "assert not tracing.enabled()\n"
            "assert tracing.ServerSpan().start('GET', ['t', ''], {}) == ['t', '']\n"
            "assert not [m for m in sys.modules if m.startswith(('opentelemetry', 'grpc'))], 'imported'\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DDML_")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


def test_the_endpoint_gets_the_traces_path_once():
    assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
