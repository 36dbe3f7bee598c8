"""KServe v2 over gRPC (ddml-gateway --grpc-bind) through real processes: tritonclient.grpc unchanged,
errors as gRPC status codes, API keys as metadata, TLS, and the same vectors as the HTTP routes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import requests

from tests.e2e.test_http_security import self_signed
from tests.processes import free_port, http_ready, wait_until

pytestmark = pytest.mark.e2e
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def start(stack, *flags: str) -> tuple[str, str, object]:
    """A gateway with gRPC on a free port: (HTTP url, gRPC host:port, the gateway process)."""
    grpc_address = f"127.0.0.1:{free_port()}"
    process, url = stack.start_gateway("--workers", "1", "--threads", "8", "--grpc-bind", grpc_address, *flags)
    process.wait_for_output(r"grpc ready", timeout_s=60)
    return url, grpc_address, process


@pytest.fixture(scope="module")
def served(module_stack, tiny_bert):
    stack = module_stack
    stack.start_broker()
    stack.start_worker("--model", "echo")
    stack.start_worker("--model", "tiny", "--model-path", str(tiny_bert), "--task", "embedding", "--model-version", "1")
    url, address, process = start(stack, "--max-input-chars", "1000")
    wait_until(lambda: http_ready(url, "/v2/models/tiny/ready") and http_ready(url, "/v2/models/echo/ready"),
               timeout_s=60, what="both models ready")
    return url, address, process


def test_health_metadata_and_config(served):
    _, address, _ = served
    client = grpcclient.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tiny", "2")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "ddml" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata("tiny", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1", "1"]}]
    assert metadata["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": ["-1", "32"]}]
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["data_type"] == "TYPE_STRING"
    assert config["output"][0] == {"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": ["32"]}
    assert "dynamic_batching" in config


def test_infer_bytes_with_a_text_model_matches_http(served):
    url, address, _ = served
    client = grpcclient.InferenceServerClient(address)
    texts = np.array([[b"the quick brown fox"], [b"lazy dog"], [b"model serving"]], dtype=object)
    text = grpcclient.InferInput("TEXT", [3, 1], "BYTES")
    text.set_data_from_numpy(texts)
    result = client.infer("tiny", [text], request_id="grpc-42", priority=1, timeout=20_000_000,
                          outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    embeddings = result.as_numpy("EMBEDDING")
    assert embeddings.shape == (3, 32) and embeddings.dtype == np.float32
    assert result.get_response().id == "grpc-42" and result.get_response().model_version == "1"
    # x-request-id metadata wins over the request's id, as X-Request-ID does on HTTP; it comes back as metadata.
    header_id = client.infer("tiny", [text], request_id="body-id", headers={"x-request-id": "hdr-7"})
    assert header_id.get_response().id == "hdr-7"
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerMetadata.with_call(service_pb2.ServerMetadataRequest(), timeout=10,
                                                metadata=[("x-request-id", "meta-1")])
        assert ("x-request-id", "meta-1") in call.trailing_metadata()
        _, call = stub.ServerMetadata.with_call(service_pb2.ServerMetadataRequest(), timeout=10)
        [made] = [value for key, value in call.trailing_metadata() if key == "x-request-id"]
        assert len(made) == 32  # one the gateway made
    v1 = requests.post(f"{url}/v1/models/tiny/predict", json={"inputs": [t[0].decode() for t in texts]},
                       timeout=30).json()["outputs"]
    np.testing.assert_allclose(np.array(v1, dtype=np.float32), embeddings, atol=1e-6)
    # The same request over HTTP's binary v2 route answers the same tensor.
    import tritonclient.http as httpclient

    http_text = httpclient.InferInput("TEXT", [3, 1], "BYTES")
    http_text.set_data_from_numpy(texts)
    over_http = httpclient.InferenceServerClient(url.removeprefix("http://")).infer("tiny", [http_text])
    np.testing.assert_allclose(over_http.as_numpy("EMBEDDING"), embeddings, atol=1e-6)
    # A pinned version answers too, and one that is not live is NOT_FOUND.
    pinned = client.infer("tiny", [text], model_version="1")
    np.testing.assert_allclose(pinned.as_numpy("EMBEDDING"), embeddings, atol=1e-6)
    with pytest.raises(InferenceServerException) as missing:
        client.infer("tiny", [text], model_version="2")
    assert missing.value.status() == "StatusCode.NOT_FOUND" and "no live version '2'" in missing.value.message()


def test_infer_fp32_and_bytes_through_the_echo_model(served):
    _, address, _ = served
    client = grpcclient.InferenceServerClient(address)
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    tensor = grpcclient.InferInput("INPUT", [2, 3], "FP32")
    tensor.set_data_from_numpy(values)
    result = client.infer("echo", [tensor])
    echoed = result.as_numpy("OUTPUT")  # echo declares no tensors: each row comes back as BYTES (JSON)
    assert echoed.shape == (2, 1)
    assert [json.loads(row[0]) for row in echoed] == values.tolist()
    words = np.array([[b"hello"], ["w\u00f6rld".encode()]], dtype=object)
    text = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(words)
    assert [row[0].decode() for row in client.infer("echo", [text]).as_numpy("OUTPUT")] == ["hello", "w\u00f6rld"]


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
import kserve

async def call(address):
    async with kserve.InferenceGRPCClient(address) as client:
        health = [await client.is_server_live(), await client.is_server_ready(),
                  await client.is_model_ready("tiny"), await client.is_model_ready("nope")]
        text = kserve.InferInput("TEXT", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"the quick brown fox"], [b"lazy dog"]], dtype=object), binary_data=True)
        response = await client.infer(kserve.InferRequest("tiny", [text], request_id="ks-1"))
        [output] = response.outputs
        array = output.as_numpy()
    rest = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=60))
    text = kserve.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([["the quick brown fox"], ["lazy dog"]], dtype=object), binary_data=False)
    answer = await rest.infer(sys.argv[2], kserve.InferRequest("tiny", [text], request_id="ks-2"), model_name="tiny")
    [rest_output] = answer.outputs
    print(json.dumps({"health": health, "id": response.id, "model": response.model_name, "name": output.name,
                      "dtype": str(array.dtype), "embeddings": array.tolist(),
                      "rest": [answer.id, rest_output.name, rest_output.as_numpy().tolist()],
                      "rest_ready": await rest.is_model_ready(sys.argv[2], "tiny")}))

asyncio.run(call(sys.argv[1]))
"""


def test_kserve_grpc_and_rest_clients(served):
    """KServe's own client (the `kserve` package: not in [dev], as it brings about 430 MB, FastAPI, pandas and
    the Kubernetes client among them), from $KSERVE_PYTHON (scripts/test.sh makes .venv-kserve) or this
    interpreter. In a process of its
    own: its generated protobuf module and tritonclient's define the same symbols."""
    python = os.environ.get("KSERVE_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import kserve"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        # scripts/test.sh (CI's command) installs it and sets KSERVE_PYTHON: there, a missing kserve fails.
        assert "KSERVE_PYTHON" not in os.environ, f"KSERVE_PYTHON={python} cannot import kserve: {probe.stderr[-500:]!r}"
        pytest.skip("kserve is not installed (set KSERVE_PYTHON to an interpreter that has it)")
    url, address, _ = served
    done = subprocess.run([python, "-c", KSERVE_CLIENT, address, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["health"] == [True, True, True, False]
    assert (answer["id"], answer["model"], answer["name"], answer["dtype"]) == ("ks-1", "tiny", "EMBEDDING", "float32")
    v1 = requests.post(f"{url}/v1/models/tiny/predict", json={"inputs": ["the quick brown fox", "lazy dog"]},
                       timeout=30).json()["outputs"]
    np.testing.assert_allclose(np.array(answer["embeddings"], dtype=np.float32), np.array(v1, dtype=np.float32),
                               atol=1e-6)
    # Its REST client (InferenceRESTClient, protocol v2) against the HTTP routes of the same gateway.
    rest_id, rest_name, rest_embeddings = answer["rest"]
    assert (rest_id, rest_name, answer["rest_ready"]) == ("ks-2", "EMBEDDING", True)
    np.testing.assert_allclose(np.array(rest_embeddings, dtype=np.float32), np.array(v1, dtype=np.float32), atol=1e-6)


def test_errors_are_grpc_status_codes_with_the_http_routes_messages(served):
    _, address, _ = served
    client = grpcclient.InferenceServerClient(address)

    def failure(model, tensors, **options):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, tensors, **options)
        return caught.value.status(), caught.value.message()

    text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"x"]], dtype=object))
    status, message = failure("nope", [text])
    assert status == "StatusCode.NOT_FOUND" and "no live worker serves model 'nope'" in message
    long_text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    long_text.set_data_from_numpy(np.array([[b"y" * 1001]], dtype=object))
    status, message = failure("echo", [long_text])
    assert status == "StatusCode.INVALID_ARGUMENT" and "over the limit of 1000" in message
    status, message = failure("echo", [text], outputs=[grpcclient.InferRequestedOutput("NOPE")])
    assert status == "StatusCode.INVALID_ARGUMENT" and "has no output 'NOPE'" in message
    status, message = failure("echo", [text], timeout=-5)
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameters.timeout" in message
    status, message = failure("echo", [text], headers={"x-request-id": "has space"})
    assert status == "StatusCode.INVALID_ARGUMENT" and "x-request-id" in message
    # The process is fine after all of that.
    assert client.infer("echo", [text]).as_numpy("OUTPUT")[0][0] == b"x"


def test_grpc_calls_are_counted_in_the_gateways_metrics(served):
    url, address, _ = served
    client = grpcclient.InferenceServerClient(address)
    assert client.is_server_live()
    labels = ('route="grpc:/inference.GRPCInferenceService/ServerLive"', 'method="POST"', 'status="200"')

    def counted():
        text = requests.get(f"{url}/metrics", timeout=10).text
        return [line for line in text.splitlines()
                if line.startswith("ddml_http_requests_total{") and all(label in line for label in labels)]

    [line] = wait_until(counted, timeout_s=10, what="the gRPC call in /metrics")
    assert float(line.rsplit(" ", 1)[1]) >= 1


def test_api_keys_as_metadata_and_tls(stack, tmp_path):
    cert, key = self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("grpc-token\n")
    stack.start_broker()
    stack.start_worker("--model", "echo")
    url, address, _ = start(stack, "--certfile", cert, "--keyfile", key, "--api-key-file", str(tokens),
                            "--max-body-bytes", "4096")
    with open(cert, "rb") as certificate:
        root = certificate.read()
    import grpc

    client = grpcclient.InferenceServerClient(address, ssl=True, root_certificates=cert)
    assert client.is_server_live()  # the probes stay open, as on HTTP
    text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"secret"]], dtype=object))
    for headers in ({}, {"authorization": "Bearer nope"}):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("echo", [text], headers=headers)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED", headers
    good = {"authorization": "Bearer grpc-token"}
    wait_until(lambda: client.is_model_ready("echo", headers=good), timeout_s=30, what="echo ready over TLS")
    assert client.infer("echo", [text], headers=good).as_numpy("OUTPUT")[0][0] == b"secret"
    # --max-body-bytes caps a received message, as it caps an HTTP body.
    large = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    large.set_data_from_numpy(np.array([[b"z" * 5000]], dtype=object))
    with pytest.raises(InferenceServerException) as too_large:
        client.infer("echo", [large], headers=good)
    assert too_large.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # Plaintext to a TLS port does not get an answer.
    plain = grpc.insecure_channel(address)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(plain).result(timeout=2)
    plain.close()
    assert root  # the client above trusted exactly this certificate


def test_a_gateway_whose_grpc_port_is_taken_stops_as_a_whole(stack):
    import socket

    stack.start_broker()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, _ = stack.start_gateway("--workers", "1", "--threads", "2", "--grpc-bind", f"127.0.0.1:{port}")
        process.wait_for_output(r"cannot serve on 127.0.0.1:\d+", timeout_s=60)
        assert process.popen.wait(timeout=30) is not None


def test_the_grpc_process_stops_when_the_gateway_master_is_killed(stack):
    """It runs in a session of its own (a terminal's Ctrl-C goes to the master only), so it watches the
    master itself: SIGKILLed, the master cannot stop it, and the port must not stay taken."""
    import os
    import signal
    import socket

    stack.start_broker()
    _, address, gateway = start(stack)
    host, port = address.split(":")
    os.kill(gateway.pid, signal.SIGKILL)

    def port_free() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex((host, int(port))) != 0

    wait_until(port_free, timeout_s=15, what="the orphaned gRPC process to stop")
