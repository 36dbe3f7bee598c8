"""OpenAI embeddings, rerank, request ids and model versions on the Falcon app, with a fake broker."""

from __future__ import annotations

import base64

import falcon.testing
import numpy as np
import pytest

from ddml_common.protocol import ErrorCode
from gateway.app import create_app
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from tests.fakes import Awaitable, FakeBrokerClient

WORKERS = [
    {"worker_id": "a1", "models": ["emb", "emb@v1"], "host": "h", "pid": 1, "device": "cpu", "state": "idle",
     "max_batch_size": 8, "uptime_s": 5.0},
    {"worker_id": "b2", "models": ["ranker", "ranker@r1"], "host": "h", "pid": 2, "device": "cpu", "state": "idle",
     "max_batch_size": 8, "uptime_s": 5.0},
    {"worker_id": "c3", "models": ["ranker", "ranker@r2"], "host": "h", "pid": 3, "device": "cpu", "state": "idle",
     "max_batch_size": 8, "uptime_s": 5.0},
]


class TextBroker(FakeBrokerClient):
    """Answers as the built-in text models would: {"embedding", "tokens"} or {"score", "tokens"}."""

    def __init__(self, error: BrokerError | None = None):
        super().__init__(error=error, workers=WORKERS)

    def request(self, model, inputs, timeout_s, priority=0, request_id_prefix=""):
        super().request(model, inputs, timeout_s, priority, request_id_prefix)
        if model.startswith("ranker"):
            return [{"score": len(x["document"]) / 100, "tokens": 3} for x in inputs]
        return [{"embedding": np.array([3, 4, 0, 12], dtype=np.float32) * (i + 1), "tokens": 2 + len(x["text"])}
                for i, x in enumerate(inputs)]

    def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
        status = super().status(timeout_s)
        embedding = {"task": "embedding", "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 4]}]}
        for name, info in status["models"].items():
            info["metadata"] = embedding if name.startswith("emb") else {"task": "rerank"}
        return status


@pytest.fixture
def broker() -> TextBroker:
    return TextBroker()


@pytest.fixture
def app(broker) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Awaitable(broker), GatewayConfig()))


def embed(app, **body):
    return app.simulate_post("/v1/embeddings", json={"model": "emb", **body})


def test_embeddings_float_and_base64_with_usage_version_and_request_id(app, broker):
    response = embed(app, input=["ab", "abcd"])
    assert response.status_code == 200, response.text
    body = response.json
    assert body["object"] == "list" and body["model"] == "emb@v1"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    assert body["data"][1]["embedding"] == [6.0, 8.0, 0.0, 24.0]
    assert body["usage"] == {"prompt_tokens": 4 + 6, "total_tokens": 10}
    assert response.headers["x-model-version"] == "v1"
    assert len(response.headers["x-request-id"]) == 32  # made here: a uuid4, in hex
    assert broker.request_ids == [response.headers["x-request-id"]]
    assert broker.calls[0][1] == [{"text": "ab", "count_tokens": True}, {"text": "abcd", "count_tokens": True}]

    encoded = embed(app, input="ab", encoding_format="base64").json["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == [3.0, 4.0, 0.0, 12.0]


def test_dimensions_truncate_and_normalise_again_and_are_bounded_by_the_model(app):
    [vector] = [d["embedding"] for d in embed(app, input="ab", dimensions=2).json["data"]]
    assert vector == pytest.approx([0.6, 0.8])
    too_many = embed(app, input="ab", dimensions=5)
    assert too_many.status_code == 400
    assert too_many.json["error"]["param"] == "dimensions" and "(4)" in too_many.json["error"]["message"]


@pytest.mark.parametrize("body, param, message", [
    ({"input": [[1, 2, 3]]}, "input", "check_embedding_ctx_length=False"),
    ({"input": [1, 2, 3]}, "input", "token ids"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": {"text": "a"}}, "input", "a string or a list of strings"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "float or base64"),
    ({"input": "a", "dimensions": 0}, "dimensions", "positive integer"),
    ({"input": "a", "model": ""}, "model", "must name a model"),
    ({"input": "a", "model": "ranker"}, "model", "is a rerank model"),
])
def test_bad_embedding_requests_get_openai_shaped_400s(app, body, param, message):
    response = app.simulate_post("/v1/embeddings", json={"model": "emb", **body})
    assert response.status_code == 400
    error = response.json["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "BAD_REQUEST"


def test_broker_errors_keep_their_statuses_in_openai_shape():
    refused = falcon.testing.TestClient(create_app(Awaitable(TextBroker(BrokerError(ErrorCode.BAD_REQUEST, "too long")))))
    response = refused.simulate_post("/v1/embeddings", json={"model": "emb", "input": "a"})
    assert response.status_code == 400 and response.json["error"]["param"] == "input"
    missing = falcon.testing.TestClient(create_app(Awaitable(TextBroker(BrokerError(ErrorCode.NO_SUCH_MODEL, "none")))))
    response = missing.simulate_post("/v1/embeddings", json={"model": "nope", "input": "a"})
    assert response.status_code == 404 and response.json["error"]["param"] == "model"
    full = falcon.testing.TestClient(create_app(Awaitable(TextBroker(BrokerError(ErrorCode.OVERLOADED, "full", 2.0)))))
    response = full.simulate_post("/v1/embeddings", json={"model": "emb", "input": "a"})
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert response.json["error"]["type"] == "server_error"


def test_request_id_is_taken_checked_returned_and_carried_to_the_broker(app, broker):
    response = app.simulate_post("/v1/models/emb/predict", json={"inputs": ["a"]},
                                 headers={"X-Request-ID": "trace-7/abc"})
    assert response.headers["x-request-id"] == "trace-7/abc" and broker.request_ids == ["trace-7/abc"]
    for bad in ("", "has space", "x" * 129, "caf\u00e9"):
        response = app.simulate_get("/v1/models", headers={"X-Request-ID": bad})
        assert response.status_code == 400 and "X-Request-ID" in response.json["error"]["message"]
        assert len(response.headers["x-request-id"]) == 32
    assert app.simulate_get("/nope").headers["x-request-id"]  # errors from Falcon carry one too


def test_predict_truncate_wraps_inputs_for_the_text_models(app, broker):
    app.simulate_post("/v1/models/emb/predict", json={"inputs": ["a", {"text": "b"}, {"text": "c", "truncate": False}],
                                                      "truncate": True})
    assert broker.calls[-1][1] == [{"text": "a", "truncate": True}, {"text": "b", "truncate": True},
                                   {"text": "c", "truncate": False}]
    app.simulate_post("/v1/models/emb/predict", json={"inputs": ["a"]})
    assert broker.calls[-1][1] == ["a"]  # unchanged unless asked
    assert app.simulate_post("/v1/models/emb/predict", json={"inputs": ["a"], "truncate": 1}).status_code == 400


def test_pinned_version_is_sent_to_the_broker_and_named_in_the_answer(app, broker):
    response = app.simulate_post("/v1/models/ranker@r2/predict", json={"inputs": [{"query": "q", "document": "d"}]})
    assert broker.calls[-1][0] == "ranker@r2" and response.headers["x-model-version"] == "r2"
    response = app.simulate_post("/v1/models/ranker/predict", json={"inputs": [{"query": "q", "document": "d"}]})
    assert "x-model-version" not in response.headers  # two versions serve it: which one answered is unknown


def test_rerank_sorts_by_score_and_honours_top_n_and_return_documents(app, broker):
    documents = ["short", "the longest document", {"text": "a medium one"}]
    response = app.simulate_post("/v1/rerank", json={"model": "ranker@r1", "query": "q", "documents": documents,
                                                     "top_n": 2, "return_documents": True})
    assert response.status_code == 200, response.text
    body = response.json
    assert [r["index"] for r in body["results"]] == [1, 2]
    assert body["results"][0] == {"index": 1, "relevance_score": pytest.approx(0.2),
                                  "document": {"text": "the longest document"}}
    assert body["model"] == "ranker@r1" and body["usage"] == {"total_tokens": 9}
    assert broker.calls[-1][1][0] == {"query": "q", "document": "short", "count_tokens": True}
    bare = app.simulate_post("/v1/rerank", json={"model": "ranker", "query": "q", "documents": ["a", "bb"]}).json
    assert [r["index"] for r in bare["results"]] == [1, 0] and "document" not in bare["results"][0]
    for bad, param in [({"documents": []}, "documents"), ({"documents": [3]}, "documents"),
                       ({"query": None}, "query"), ({"top_n": 0}, "top_n"), ({"model": "emb"}, "model")]:
        response = app.simulate_post("/v1/rerank", json={"model": "ranker", "query": "q", "documents": ["a"], **bad})
        assert response.status_code == 400 and response.json["error"]["param"] == param, bad


def test_models_list_versions_and_the_openai_model_list(app):
    body = app.simulate_get("/v1/models").json
    assert [m["name"] for m in body["models"]] == ["emb", "ranker"]
    ranker = body["models"][1]
    assert ranker["versions"] == ["r1", "r2"] and [w["version"] for w in ranker["workers"]] == ["r1", "r2"]
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["emb", "emb@v1", "ranker", "ranker@r1", "ranker@r2"]
    assert all(m["object"] == "model" and m["owned_by"] == "ddml" and m["created"] > 0 for m in body["data"])


def test_v2_health_routes_answer_with_the_spec_bodies_and_versions(app):
    assert app.simulate_get("/v2/health/live").json == {"live": True}
    assert app.simulate_get("/v2/health/ready").json == {"ready": True}
    assert app.simulate_get("/v2/models/emb/ready").json == {"name": "emb", "ready": True}
    assert app.simulate_get("/v2/models/emb/versions/v1/ready").status_code == 200
    missing = app.simulate_get("/v2/models/emb/versions/v9/ready")
    assert missing.status_code == 400 and missing.json == {"name": "emb", "ready": False}
    assert app.simulate_get("/v2/models/ranker").json["versions"] == ["r1", "r2"]
    down = falcon.testing.TestClient(create_app(Awaitable(TextBroker(BrokerError(ErrorCode.UNAVAILABLE, "down")))))
    assert down.simulate_get("/v2/health/ready").json == {"ready": False}


def test_text_log_lines_carry_the_ids_their_message_does_not_name():
    import logging

    from ddml_common.cli import TextFormatter

    formatter = TextFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("broker", logging.DEBUG, __file__, 1, "batch %d to worker %s", (7, "ab"), None)
    record.request_id, record.batch_id, record.worker_id = "trace-1/12-3", 7, "ab"
    assert formatter.format(record) == "DEBUG batch 7 to worker ab [request_id=trace-1/12-3]"
    plain = logging.LogRecord("broker", logging.INFO, __file__, 1, "bound", (), None)
    assert formatter.format(plain) == "INFO bound"
