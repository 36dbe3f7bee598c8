"""KServe v2 / Open Inference Protocol through gunicorn: tritonclient unchanged, and raw bodies from the spec."""

from __future__ import annotations

import gzip
import http.client
import json
import struct

import numpy as np
import pytest
import requests

from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kserve(module_stack, tiny_bert, tiny_bert_classifier):
    stack = module_stack
    stack.start_broker()
    stack.start_worker("--model", "tiny", "--model-path", str(tiny_bert), "--task", "embedding", "--model-version", "1")
    stack.start_worker("--model", "cls", "--model-path", str(tiny_bert_classifier), "--task", "classification")
    _, url = stack.start_gateway("--workers", "1", "--threads", "8")

    wait_until(lambda: http_ready(url, "/v2/models/cls/ready") and http_ready(url, "/v2/models/tiny/ready"),
               timeout_s=60, what="both models ready")
    return url


def test_tritonclient_health_metadata_and_infer_json_and_binary(kserve):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=kserve.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tiny", "2")
    server = client.get_server_metadata()
    assert server["name"] == "ddml" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata("tiny")
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
    assert metadata["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 32]}]
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 64 and config["input"][0]["data_type"] == "TYPE_STRING"
    assert "dynamic_batching" in config

    texts = np.array([[b"the quick brown fox"], [b"lazy dog"], [b"model serving"]], dtype=object)

    def infer(binary: bool, **options):
        text = httpclient.InferInput("TEXT", [3, 1], "BYTES")
        text.set_data_from_numpy(texts, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput("EMBEDDING", binary_data=binary)]
        return client.infer("tiny", [text], outputs=wanted, **options)

    as_json = infer(False, request_id="42")
    assert as_json.get_response()["id"] == "42"
    embeddings = as_json.as_numpy("EMBEDDING")
    assert embeddings.shape == (3, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    as_binary = infer(True, priority=1, timeout=20_000_000)
    np.testing.assert_allclose(as_binary.as_numpy("EMBEDDING"), embeddings, atol=1e-6)
    compressed = infer(True, request_compression_algorithm="gzip", response_compression_algorithm="deflate")
    np.testing.assert_allclose(compressed.as_numpy("EMBEDDING"), embeddings, atol=1e-6)

    # The same texts through /v1 give the same vectors: one model, two front doors.
    v1 = requests.post(f"{kserve}/v1/models/tiny/predict", json={"inputs": [t[0].decode() for t in texts]},
                       timeout=30).json()["outputs"]
    np.testing.assert_allclose(np.array(v1, dtype=np.float32), embeddings, atol=1e-6)

    # The classifier: FP32 probabilities with labels, default (binary) outputs.
    text = httpclient.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(texts[:2], binary_data=True)
    result = client.infer("cls", [text])
    probabilities = result.as_numpy("PROBABILITIES")
    assert probabilities.shape == (2, 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    labels = result.as_numpy("LABEL").reshape(-1)
    assert [label.decode() for label in labels] == [["negative", "positive"][int(p.argmax())] for p in probabilities]

    with pytest.raises(InferenceServerException, match="no live worker serves model 'nope'"):
        client.infer("nope", [text])
    with pytest.raises(InferenceServerException, match="TIMEOUT"):
        slow = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        slow.set_data_from_numpy(np.array([[b"x " * 40]], dtype=object))
        client.infer("tiny", [slow], timeout=1)  # one microsecond
    client.close()


def _raw_post(url: str, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def test_raw_binary_request_written_byte_by_byte(kserve):
    # Header JSON, then the BYTES tensor: a 4-byte little-endian length and the UTF-8 bytes.
    header = (b'{"id":"raw-1","inputs":[{"name":"TEXT","shape":[1,1],"datatype":"BYTES",'
              b'"parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}')
    tensor = b"\x08\x00\x00\x00" + b"lazy dog"
    status, headers, data = _raw_post(kserve, "/v2/models/tiny/infer", header + tensor, {
        "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    assert status == 200, data[:300]
    split = int(headers["inference-header-content-length"])
    document = json.loads(data[:split])
    assert document["id"] == "raw-1" and document["model_name"] == "tiny"
    [output] = document["outputs"]
    assert output == {"name": "EMBEDDING", "datatype": "FP32", "shape": [1, 32],
                      "parameters": {"binary_data_size": 128}}
    vector = np.frombuffer(data[split:], dtype="<f4")
    assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_raw_json_request_with_gzip_both_ways_and_clear_errors(kserve):
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [2], "datatype": "BYTES", "data": ["lazy dog", "fox"]}]})
    status, headers, data = _raw_post(kserve, "/v2/models/cls/infer", gzip.compress(body.encode()),
                                      {"Content-Encoding": "gzip", "Accept-Encoding": "gzip",
                                       "Content-Type": "application/json"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    document = json.loads(gzip.decompress(data))
    probabilities = next(o for o in document["outputs"] if o["name"] == "PROBABILITIES")
    assert probabilities["shape"] == [2, 2] and len(probabilities["data"]) == 4

    bad = [
        (b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
        (b'{"inputs": [{"name": "TEXT", "shape": [2], "datatype": "BYTES", "data": ["one"]}]}', {}, 400,
         "1 elements for a shape of 2"),
        (b'{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", '
         b'"parameters": {"binary_data_size": 99}}]}', {"Inference-Header-Content-Length": "85"}, 400, ""),
        (b"{nope", {}, 400, "malformed JSON"),
        (b"x", {"Content-Encoding": "br"}, 415, "not supported"),
        (b'{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "INT32", "data": ' + b"[" * 300 + b"0"
         + b"]" * 300 + b"}]}", {}, 400, "more than 32 levels deep"),
        (json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 2], "datatype": "BYTES",
                                 "data": ["fox", "x" * ((1 << 20) + 1)]}]}).encode(), {}, 400,
         "over the limit of 1048576 (--max-input-chars)"),  # a second element per row was not checked
    ]
    for body, headers, status, message in bad:
        got, _, data = _raw_post(kserve, "/v2/models/tiny/infer", body, headers)
        assert got == status, data
        assert message in json.loads(data)["error"]
    got, _, data = _raw_post(kserve, "/v2/models/tiny/versions/7/infer", b"{}", {})
    assert got == 404 and "no live version '7' (live versions: 1)" in json.loads(data)["error"]
    assert struct.calcsize("<I") == 4
