"""gateway/grpc_server.py's translation between protobuf and the HTTP /v2 route's documents (no sockets)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from gateway import grpc_server  # noqa: E402
from gateway.errors import HTTP_STATUS_BY_CODE  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402
from gateway.proto import grpc_service_pb2 as pb  # noqa: E402


def test_every_status_the_gateway_answers_has_a_grpc_code():
    for status in set(HTTP_STATUS_BY_CODE.values()) | {400, 404, 413, 415}:
        assert status in grpc_server.GRPC_CODE_BY_HTTP_STATUS, status
    assert grpc_server.grpc_code(401) is grpc.StatusCode.UNAUTHENTICATED
    assert grpc_server.grpc_code(504) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_server.grpc_code(418) is grpc.StatusCode.INTERNAL  # anything unforeseen


def test_raw_inputs_become_the_binary_tail_with_their_sizes():
    request = pb.ModelInferRequest(model_name="m", id="abc")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2, 1])
    request.inputs.add(name="X", datatype="FP32", shape=[2, 2])
    text = b"".join(struct.pack("<I", len(w)) + w for w in (b"hi", b"there"))
    numbers = np.arange(4, dtype="<f4").tobytes()
    request.raw_input_contents.extend([text, numbers])
    request.parameters["priority"].uint64_param = 3
    request.parameters["timeout"].int64_param = 2_000_000
    request.parameters["binary_data_output"].bool_param = True
    document, binary = grpc_server.request_document(request)
    assert document == {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "parameters": {"binary_data_size": len(text)}},
                   {"name": "X", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}],
        "parameters": {"priority": 3, "timeout": 2_000_000, "binary_data_output": True},
    }
    assert binary == text + numbers


def test_typed_contents_become_json_data():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"a", "\u00e9".encode()])
    numbers = request.inputs.add(name="N", datatype="INT64", shape=[2])
    numbers.contents.int64_contents.extend([1, -2])
    document, binary = grpc_server.request_document(request)
    assert [entry["data"] for entry in document["inputs"]] == [["a", "\u00e9"], [1, -2]]
    assert binary == b""


@pytest.mark.parametrize("build, message", [
    (lambda r: (r.inputs.add(name="A", datatype="FP32", shape=[1]), r.inputs.add(name="B", datatype="FP32", shape=[1]),
                r.raw_input_contents.append(b"\0\0\0\0")), "1 raw_input_contents for 2 inputs"),
    (lambda r: r.inputs.add(name="H", datatype="FP16", shape=[1]), "must come as raw_input_contents"),
])
def test_requests_that_cannot_be_mapped_are_refused(build, message):
    request = pb.ModelInferRequest(model_name="m")
    build(request)
    with pytest.raises(GatewayError, match=message) as refused:
        grpc_server.request_document(request)
    assert HTTP_STATUS_BY_CODE[refused.value.code] == 400


def test_outputs_go_back_raw_in_the_order_asked_for():
    tensors = {"EMBEDDING": ("FP32", np.ones((2, 3), dtype=np.float32)),
               "LABEL": ("BYTES", np.array([["x"], ["yz"]], dtype=object))}
    response = grpc_server.infer_response("m", "1", "id-1", tensors, ["LABEL", "EMBEDDING"])
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "id-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("LABEL", "BYTES", [2, 1]),
                                                                              ("EMBEDDING", "FP32", [2, 3])]
    assert response.raw_output_contents[0] == b"\x01\0\0\0x\x02\0\0\0yz"
    assert np.frombuffer(response.raw_output_contents[1], dtype="<f4").tolist() == [1.0] * 6
    every = grpc_server.infer_response("m", None, "id-2", tensors, [])
    assert [o.name for o in every.outputs] == ["EMBEDDING", "LABEL"] and every.model_version == ""
    with pytest.raises(GatewayError, match="has no output 'NOPE'"):
        grpc_server.infer_response("m", None, "id", tensors, ["NOPE"])


def test_the_generated_code_loads_beside_another_copy_of_tritons_protos():
    """tritonclient registers its own model_config.proto and grpc_service.proto (package inference) in
    protobuf's default pool; another version's copy differs from ours. Ours live in a pool of their own
    (gateway/proto/__init__.py), so both load in one process, as in this suite, whatever the versions."""
    import subprocess
    import sys

    from tests.processes import REPO

    script = """
from google.protobuf import descriptor_pb2, descriptor_pool
other = descriptor_pb2.FileDescriptorProto(name="model_config.proto", package="inference")
other.message_type.add(name="ModelConfig").field.add(name="name", number=1, type=9, label=1)
descriptor_pool.Default().Add(other)  # what an older tritonclient's generated module does
from gateway.proto import grpc_service_pb2 as pb, model_config_pb2 as mc
config = pb.ModelConfigResponse(config=mc.ModelConfig(name="m", max_batch_size=4))
assert pb.ModelConfigResponse.FromString(config.SerializeToString()).config.max_batch_size == 4
print("loaded")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "loaded"), done.stderr[-2000:]
