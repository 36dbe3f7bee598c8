"""Clients of the image classifier (examples/image_classifier/model.py), served at URL:

    .venv/bin/python -m examples.image_classifier.client http://127.0.0.1:8000 resnet

Three ways to send one 3x224x224 float32 image, all answered with the same top-5 classes:
tritonclient over KServe v2 with binary tensors (raw bytes both ways), /v1 msgpack with the
`__ndarray__` form (raw bytes both ways, dtype kept), and /v1 JSON (lists: simplest, slowest).
"""

from __future__ import annotations

import sys

import msgpack
import numpy as np
import requests


def with_tritonclient(url: str, model: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    tensor = httpclient.InferInput("IMAGE", [1, *image.shape], "FP32")
    tensor.set_data_from_numpy(image[None], binary_data=True)
    wanted = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ("CLASSES", "PROBABILITIES")]
    result = client.infer(model, [tensor], outputs=wanted)
    return result.as_numpy("CLASSES")[0], result.as_numpy("PROBABILITIES")[0]


def ndarray(array: np.ndarray) -> dict:
    """The msgpack form of an array: dtype, shape and its raw little-endian bytes."""
    array = np.ascontiguousarray(array)
    return {"__ndarray__": [array.dtype.str, list(array.shape), array.tobytes()]}


def from_ndarray(value: dict) -> np.ndarray:
    dtype, shape, data = value["__ndarray__"]
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def with_msgpack(url: str, model: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    body = msgpack.packb({"inputs": [ndarray(image)]}, use_bin_type=True)
    response = requests.post(f"{url}/v1/models/{model}/predict", data=body, timeout=30,
                             headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    response.raise_for_status()
    [output] = msgpack.unpackb(response.content)["outputs"]
    fields = {key.lower(): from_ndarray(value) for key, value in output.items()}  # handler or exported keys
    return fields["classes"], fields["probabilities"]


def with_json(url: str, model: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    response = requests.post(f"{url}/v1/models/{model}/predict", json={"inputs": [image.tolist()]}, timeout=30)
    response.raise_for_status()
    [output] = response.json()["outputs"]
    fields = {key.lower(): np.asarray(value) for key, value in output.items()}
    return fields["classes"], fields["probabilities"]


if __name__ == "__main__":
    url, model = (sys.argv[1:3] + ["http://127.0.0.1:8000", "resnet"][len(sys.argv[1:3]):])[:2]
    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    for call in (with_tritonclient, with_msgpack, with_json):
        classes, probabilities = call(url, model, image)
        print(f"{call.__name__:18} classes {classes.tolist()} probabilities {np.round(probabilities, 4).tolist()}")
