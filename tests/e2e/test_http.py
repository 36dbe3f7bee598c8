"""gunicorn + broker + worker processes, HTTP through the front door on 127.0.0.1."""

import concurrent.futures

import msgpack
import numpy as np
import pytest
import requests

from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e

JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}


def predict(url: str, model: str, inputs: list, **extra) -> requests.Response:
    return requests.post(f"{url}/v1/models/{model}/predict", json={"inputs": inputs, **extra}, timeout=60)


def test_tiny_bert_embeddings_over_http_through_gunicorn(stack, tiny_bert):
    stack.start_broker()
    stack.start_worker("--model", "tiny", "--model-path", str(tiny_bert), "--task", "embedding")
    _, url = stack.start_gateway("--workers", "2", "--threads", "8")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")

    texts = ["the quick brown fox", "lazy dog", "model serving batch request reply worker broker"]
    response = predict(url, "tiny", texts)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny" and len(body["outputs"]) == 3
    vectors = np.array(body["outputs"])
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # L2-normalised

    # The same text alone gives the same embedding as inside a batch (length-aware chunking is exact).
    alone = np.array(predict(url, "tiny", [texts[1]]).json()["outputs"][0])
    np.testing.assert_allclose(alone, vectors[1], atol=1e-5)

    models = requests.get(f"{url}/v1/models", timeout=5).json()["models"]
    assert [m["name"] for m in models] == ["tiny"] and models[0]["workers"][0]["device"] == "cpu"


def test_tiny_bert_classifier_returns_probabilities_with_labels(stack, tiny_bert_classifier):
    stack.start_broker()
    stack.start_worker("--model", "cls", "--model-path", str(tiny_bert_classifier), "--task", "classification")
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    [output] = predict(url, "cls", ["the quick brown fox"]).json()["outputs"]
    assert set(output["probabilities"]) == {"negative", "positive"}
    assert output["label"] == max(output["probabilities"], key=output["probabilities"].get)
    assert sum(output["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    bad = predict(url, "cls", [123])
    assert bad.status_code == 400 and "must be a string" in bad.json()["error"]["message"]


def test_http_errors_are_json_with_the_right_status(stack):
    stack.start_broker()
    stack.start_worker("--model", "echo")
    _, url = stack.start_gateway("--workers", "1", "--threads", "4", "--max-body-bytes", "1000",
                                 "--max-input-chars", "40")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    wait_until(lambda: predict(url, "nope", ["x"]).status_code == 404, timeout_s=10, interval_s=0.2,
               what="404 once the broker is past its start-up grace")
    cases = [
        (predict(url, "nope", ["x"]), 404, "NO_SUCH_MODEL"),
        (predict(url, "echo", []), 400, "BAD_REQUEST"),
        (predict(url, "echo", [{"raise": "boom"}]), 500, "MODEL_ERROR"),
        (predict(url, "echo", [{"sleep_s": 2}], timeout_ms=200), 504, "TIMEOUT"),
        (requests.post(f"{url}/v1/models/echo/predict", data="{", headers=JSON, timeout=10), 400, "BAD_REQUEST"),
        (requests.post(f"{url}/v1/models/echo/predict", data="x" * 2000, headers=JSON, timeout=10), 413,
         "PAYLOAD_TOO_LARGE"),
        (requests.post(f"{url}/v1/models/echo/predict", data='{"inputs": [' + "[" * 300 + "]" * 300 + "]}",
                       headers=JSON, timeout=10), 400, "BAD_REQUEST"),  # was a 500 from the reply's encoder
        (requests.post(f"{url}/v1/models/echo/predict", data=b"\x81\xa6inputs\x91" + b"\x91" * 300 + b"\x90",
                       headers=MSGPACK, timeout=10), 400, "BAD_REQUEST"),
        (predict(url, "echo", [{"a": ["ok", "x" * 41]}]), 400, "BAD_REQUEST"),
        (predict(url, "echo", ["a"], priority=10_001), 400, "BAD_REQUEST"),
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    value = "x"
    for _ in range(31):  # with the body and 'inputs', 33 levels
        value = [value]
    deep = requests.post(f"{url}/v1/models/echo/predict", data=msgpack.packb({"inputs": [value]}), headers=MSGPACK,
                         timeout=10)
    assert deep.status_code == 400 and "more than 32 levels deep" in deep.json()["error"]["message"]
    long = predict(url, "echo", [{"a": ["ok", "x" * 41]}])
    assert long.json()["error"]["message"] == \
        "inputs[0]['a'][1] has 41 characters, over the limit of 40 (--max-input-chars)"


def test_echo_directives_are_inert_without_the_test_flag_and_obeyed_with_it(stack):
    stack.start_broker()
    plain = stack.start_worker("--model", "echo", echo_test_directives=False)
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    directives = [{"exit": 3}, {"raise": "boom"}, {"invalid": "no"}, {"sleep_s": 3600}]
    response = predict(url, "echo", directives, timeout_ms=10_000)
    assert response.status_code == 200 and response.json()["outputs"] == directives
    assert plain.popen.poll() is None, "a client's {'exit': 3} must not end a worker started without the flag"
    assert predict(url, "echo", ["still here"]).json()["outputs"] == ["still here"]
    plain.stop()

    # With the flag, through the supervisor to its child process: the poison input ends the child.
    supervisor = stack.start_worker("--model", "echo", "--supervise")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the supervised worker ready")
    assert predict(url, "echo", [{"exit": 3}], timeout_ms=2000).status_code >= 500
    supervisor.wait_for_output(r"exited with 3", timeout_s=30)


def test_many_concurrent_http_clients_each_get_their_own_reply(stack):
    stack.start_broker()
    stack.start_worker("--model", "echo")
    _, url = stack.start_gateway("--workers", "2", "--threads", "16")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")

    def one(n: int):
        with requests.Session() as session:
            return [session.post(f"{url}/v1/models/echo/predict", json={"inputs": [f"r{n}-{k}"]}, timeout=30)
                    .json()["outputs"] for k in range(10)]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [[[f"r{n}-{k}"] for k in range(10)] for n in range(32)]


def test_readyz_is_503_until_a_worker_registers(stack):
    stack.start_broker()
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")
    wait_until(lambda: http_ready(url, "/healthz"), timeout_s=30, what="gateway up")
    response = requests.get(f"{url}/readyz", timeout=5)
    assert response.status_code == 503 and response.headers["Retry-After"]
    stack.start_worker("--model", "echo")
    wait_until(lambda: http_ready(url), timeout_s=30, what="ready after a worker joins")


def test_user_handler_served_by_name(stack):
    stack.start_broker()
    stack.start_worker("--model", "rev", "--handler", "tests.handlers:ReverseModel")
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")
    wait_until(lambda: http_ready(url), timeout_s=60, what="gateway ready")
    outputs = predict(url, "rev", ["abc", "xy"]).json()["outputs"]
    assert [o["reversed"] for o in outputs] == ["cba", "yx"]
