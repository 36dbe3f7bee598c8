"""Exported models served without a handler: a TorchScript file and a torch.export program, built
here from a small CNN, answer as the model called in-process, batched under concurrency."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import requests

from tests.processes import http_ready, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]
torch = pytest.importorskip("torch")

TENSORS = ("--input", "IMAGE:FP32:3,16,16", "--output", "LOGITS:FP32:10", "--output", "TOP:INT64:1")


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Linear(32, 10)

    def forward(self, image):
        logits = self.head(self.features(image))
        return logits, logits.argmax(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def served(module_stack, tmp_path_factory):
    directory = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = SmallCNN().eval()
    example = torch.zeros(2, 3, 16, 16)
    torch.jit.save(torch.jit.trace(model, example), str(directory / "cnn.pt"))
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    torch.export.save(program, str(directory / "cnn.pt2"))
    stack = module_stack
    stack.start_broker()
    stack.start_worker("--model", "script", "--model-path", str(directory / "cnn.pt"), "--max-batch-size", "8", *TENSORS)
    stack.start_worker("--model", "export", "--model-path", str(directory / "cnn.pt2"), "--max-batch-size", "8",
                       *TENSORS)
    _, url = stack.start_gateway("--workers", "1", "--threads", "16")
    wait_until(lambda: http_ready(url, "/v2/models/script/ready") and http_ready(url, "/v2/models/export/ready"),
               timeout_s=120, what="both exported models ready")
    return url, model, directory


def infer_v2(url: str, model: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": list(batch.shape),
                                     "parameters": {"binary_data_size": batch.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    response = requests.post(f"{url}/v2/models/{model}/infer", data=header + batch.tobytes(), timeout=60,
                             headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    split = int(response.headers["Inference-Header-Content-Length"])
    outputs, offset = {}, split
    for output in json.loads(response.content[:split])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = {"FP32": np.float32, "INT64": np.int64}[output["datatype"]]
        outputs[output["name"]] = np.frombuffer(response.content[offset:offset + size], dtype).reshape(output["shape"])
        offset += size
    return outputs


@pytest.mark.parametrize("name, platform", [("script", "pytorch_torchscript"), ("export", "pytorch_export")])
def test_exported_model_declares_its_tensors_and_answers_as_in_process_under_concurrency(served, name, platform):
    url, model, _ = served
    metadata = requests.get(f"{url}/v2/models/{name}", timeout=10).json()
    assert metadata["platform"] == platform
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert [o["name"] for o in metadata["outputs"]] == ["LOGITS", "TOP"]
    rng = np.random.default_rng(7)
    requests_ = [rng.standard_normal((int(rng.integers(1, 4)), 3, 16, 16)).astype(np.float32) for _ in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda batch: infer_v2(url, name, batch), requests_))
    with torch.inference_mode():
        for batch, answer in zip(requests_, answers):
            logits, top = model(torch.from_numpy(batch))
            np.testing.assert_allclose(answer["LOGITS"], logits.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(answer["TOP"], top.numpy())
    status = requests.get(f"{url}/v1/status", timeout=10).json()
    [worker] = [w for w in status["workers"] if name in w["models"]]
    assert worker["batches"] < sum(len(b) for b in requests_), "inputs of concurrent requests were batched together"


def test_exported_model_over_v1_msgpack_keeps_dtypes_and_refuses_the_wrong_one(served):
    url, model, _ = served
    image = np.random.default_rng(3).standard_normal((3, 16, 16)).astype(np.float32)
    body = msgpack.packb({"inputs": [{"__ndarray__": ["<f4", [3, 16, 16], image.tobytes()]}]})
    response = requests.post(f"{url}/v1/models/export/predict", data=body, timeout=30,
                             headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    assert response.status_code == 200, response.text
    [output] = msgpack.unpackb(response.content)["outputs"]
    dtype, shape, data = output["LOGITS"]["__ndarray__"]
    with torch.inference_mode():
        expected = model(torch.from_numpy(image[None]))[0][0].numpy()
    assert dtype == "<f4" and shape == [10]
    np.testing.assert_allclose(np.frombuffer(data, np.float32), expected, rtol=1e-4, atol=1e-5)
    wrong = msgpack.packb({"inputs": [{"__ndarray__": ["<f8", [3, 16, 16], image.astype(np.float64).tobytes()]}]})
    refused = requests.post(f"{url}/v1/models/export/predict", data=wrong, timeout=30,
                            headers={"Content-Type": "application/msgpack"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "inputs[0]: IMAGE expects FP32 [3,16,16], got FP64 [3,16,16]"


def test_declared_outputs_the_model_does_not_give_stop_the_worker_at_load_with_the_reason(served, module_stack):
    _, _, directory = served
    worker = module_stack.start_worker("--model", "bad", "--model-path", str(directory / "cnn.pt2"), "--input",
                                       "IMAGE:FP32:3,16,16", "--output", "LOGITS:FP32:7", "--output", "TOP:INT64:1",
                                       wait=False)
    assert worker.popen.wait(120) != 0
    assert "does not give the declared outputs on a dummy batch: LOGITS expects FP32 [7], got FP32 [10]" \
        in worker.output()
