"""examples/image_classifier: its ResNet-18, served by its handler and as an exported file, answers
its three clients (tritonclient binary, msgpack __ndarray__, JSON) as the model does in-process."""

from __future__ import annotations

import numpy as np
import pytest

from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def served(module_stack, tmp_path_factory):
    from examples.image_classifier.model import export

    path = tmp_path_factory.mktemp("resnet") / "model.pt2"
    export(str(path))
    stack = module_stack
    stack.start_broker()
    stack.start_worker("--model", "handler", "--handler", "examples.image_classifier.model:ImageClassifier",
                       "--max-batch-size", "4")
    stack.start_worker("--model", "exported", "--model-path", str(path), "--max-batch-size", "4",
                       "--input", "IMAGE:FP32:3,224,224", "--output", "CLASSES:INT64:5",
                       "--output", "PROBABILITIES:FP32:5")
    _, url = stack.start_gateway("--workers", "1", "--threads", "8")
    wait_until(lambda: http_ready(url, "/v2/models/handler/ready") and http_ready(url, "/v2/models/exported/ready"),
               timeout_s=120, what="the example served both ways")
    return url


@pytest.mark.parametrize("model", ["handler", "exported"])
def test_every_example_client_gets_the_in_process_answer(served, model):
    from examples.image_classifier import client
    from examples.image_classifier.model import build

    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    with torch.inference_mode():
        classes, probabilities = (t[0].numpy() for t in build()(torch.from_numpy(image[None])))
    for call in (client.with_tritonclient, client.with_msgpack, client.with_json):
        got_classes, got_probabilities = call(served, model, image)
        np.testing.assert_array_equal(got_classes, classes)
        np.testing.assert_allclose(got_probabilities, probabilities, rtol=1e-4)
        assert np.asarray(got_probabilities).dtype == (np.float64 if call is client.with_json else np.float32)
