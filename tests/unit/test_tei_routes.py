"""text-embeddings-inference's and Cohere's routes on the Falcon app, with a fake broker that answers as
the built-in text models do: shapes, options sent to the worker, model choice, errors and headers."""

from __future__ import annotations

import falcon.testing
import numpy as np
import pytest

from ddml_common.protocol import ErrorCode
from gateway import tei
from gateway.app import create_app
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from tests.fakes import Awaitable, FakeBrokerClient


def _worker(worker_id: str, *models: str) -> dict:
    return {"worker_id": worker_id, "models": list(models), "host": "h", "pid": 1, "device": "cpu", "state": "idle",
            "max_batch_size": 8, "uptime_s": 5.0}


METADATA = {
    "emb": {"task": "embedding", "pooling": "lasttoken", "max_tokens": 256, "dtype": "float32",
            "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 4]}]},
    "ranker": {"task": "rerank", "max_tokens": 48, "labels": ["LABEL_0"]},
    "cls": {"task": "classification", "max_tokens": 64, "labels": ["negative", "positive"]},
    "cls1": {"task": "classification", "max_tokens": 64, "labels": ["yes"]},
}
VECTOR = [3.0, 4.0, 0.0, 12.0]  # norm 13


class TextBroker(FakeBrokerClient):
    """Answers as hf_text.py does to the per-input options the TEI routes send."""

    def __init__(self, models=("emb", "ranker", "cls"), error: BrokerError | None = None):
        super().__init__(error=error, workers=[_worker(f"w{i}", m, f"{m}@v{i}") for i, m in enumerate(models)])
        self.figures: dict = {}  # the timings each reply carries, for a request that asks
        self.asked_timings: list[bool] = []

    def request(self, model, inputs, timeout_s, priority=0, request_id_prefix="", timings=None):
        super().request(model, inputs, timeout_s, priority, request_id_prefix)
        self.asked_timings.append(timings is not None)
        if timings is not None:
            timings.update(self.figures)
        answers = []
        for i, x in enumerate(inputs):
            if "tokenize" in x:
                answers.append([{"id": 7, "text": x["tokenize"], "special": False, "start": 0,
                                 "stop": len(x["tokenize"].encode())}])
            elif "decode" in x:
                answers.append(" ".join(map(str, x["decode"])))
            elif x.get("all_tokens"):
                answers.append({"embedding": np.arange(len(x["text"]) * 4, dtype=np.float32).reshape(-1, 4),
                                "tokens": len(x["text"])})
            elif model == "ranker":
                answers.append({"score": len(x["document"]) / 100 - (100 if x.get("raw_scores") else 0), "tokens": 3})
            elif model.startswith("cls"):
                labels = METADATA[model]["labels"]
                answers.append({"label": labels[0], "logits": {label: float(k + 1) for k, label in enumerate(labels)},
                                "tokens": 2})
            else:
                answers.append({"embedding": np.array(VECTOR, dtype=np.float32) * (i + 1), "tokens": 2})
        return answers

    def status(self, timeout_s: float = 2.0, every_broker: bool = True) -> dict:
        status = super().status(timeout_s)
        for name, info in status["models"].items():
            info["metadata"] = METADATA[name.partition("@")[0]]
        return status


def client(broker, **config) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Awaitable(broker), GatewayConfig(**config)))


@pytest.fixture
def broker() -> TextBroker:
    return TextBroker()


@pytest.fixture
def app(broker) -> falcon.testing.TestClient:
    return client(broker, default_model="emb")


def test_embed_is_always_two_dimensional_normalised_unless_asked_with_options_sent_per_input(app, broker):
    for prefix in ("", "/tei/emb"):
        one = app.simulate_post(f"{prefix}/embed", json={"inputs": "ab", "unknown_field": 1})
        assert one.status_code == 200, one.text
        assert one.json == [pytest.approx([v / 13 for v in VECTOR])]
    raw = app.simulate_post("/embed", json={"inputs": ["a", "b"], "normalize": False, "truncate": True,
                                            "truncation_direction": "Left", "prompt_name": "query"})
    assert raw.json == [VECTOR, [2 * v for v in VECTOR]]
    assert broker.calls[-1][1][0] == {"text": "a", "normalize": False, "count_tokens": True, "truncate": True,
                                      "truncation_direction": "left", "prompt_name": "query"}
    short = app.simulate_post("/embed", json={"inputs": ["a"], "dimensions": 2}).json
    assert short == [pytest.approx([0.6, 0.8])]  # cut first, then normalised, as TEI does
    raw_short = app.simulate_post("/embed", json={"inputs": ["a", "b"], "dimensions": 2, "normalize": False})
    assert raw_short.status_code == 200 and raw_short.json == [[3.0, 4.0], [6.0, 8.0]]
    for name in ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert raw.headers[name].isdigit()
    assert raw.headers["x-compute-tokens"] == "4" and raw.headers["x-compute-characters"] == "2"


def test_errors_are_teis_shape_and_status(app, broker):
    cases = [
        ({"inputs": []}, 400, "Empty", "`inputs` cannot be empty"),
        ({"inputs": ["a"] * 5000}, 422, "Validation", "batch size 5000 > maximum allowed batch size 4096"),
        ({"inputs": [[101, 102]]}, 422, "Validation", "token ids"),
        ({"inputs": "a", "dimensions": 0}, 422, "Validation", "`dimensions` should be positive"),
        ({"inputs": "a", "dimensions": 5}, 422, "Validation", "smaller than the maximum embedding dimension"),
        ({"inputs": "a", "truncation_direction": "up"}, 422, "Validation", "Left or Right"),
        ({"inputs": "a", "normalize": "no"}, 422, "Validation", "`normalize` must be true or false"),
    ]
    for body, status, error_type, message in cases:
        response = app.simulate_post("/embed", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json["error_type"] == error_type and message in response.json["error"]
        assert set(response.json) == {"error", "error_type"}
    not_json = app.simulate_post("/embed", body=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json["error_type"] == "Validation"
    wrong_task = app.simulate_post("/tei/ranker/embed", json={"inputs": "a"})
    assert wrong_task.status_code == 424 and wrong_task.json["error_type"] == "Backend"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_a_tei_status_and_type(code):
    error = tei.tei_error(BrokerError(code, "it failed", retry_after_s=2.0))
    expected = {ErrorCode.BAD_REQUEST: (422, "Validation"), ErrorCode.PAYLOAD_TOO_LARGE: (413, "Validation"),
                ErrorCode.OVERLOADED: (429, "Overloaded"), ErrorCode.UNAVAILABLE: (503, "Unhealthy"),
                ErrorCode.BUSY: (503, "Unhealthy"), ErrorCode.MODEL_ERROR: (424, "Backend"),
                ErrorCode.WORKER_LOST: (424, "Backend"), ErrorCode.INTERNAL: (424, "Backend"),
                ErrorCode.BAD_VERSION: (424, "Backend"), ErrorCode.PASS_FAILED: (424, "Backend"),
                ErrorCode.BATCH_FAILED: (424, "Backend"),
                ErrorCode.TIMEOUT: (504, "Backend"), ErrorCode.NO_SUCH_MODEL: (404, "Validation"),
                ErrorCode.UNAUTHORIZED: (401, "Validation"),
                ErrorCode.UNSUPPORTED_MEDIA_TYPE: (415, "Validation")}[code]
    assert (error.status, error.error_type) == expected and "it failed" in error.message


def test_broker_errors_on_a_route_are_teis_with_retry_after():
    overloaded = client(TextBroker(error=BrokerError(ErrorCode.OVERLOADED, "queue full", retry_after_s=3.2)))
    response = overloaded.simulate_post("/tei/emb/embed", json={"inputs": "a"})
    assert response.status_code == 429 and response.headers["retry-after"] == "4"
    assert response.json == {"error": "Model is overloaded: queue full", "error_type": "Overloaded"}
    refused = client(TextBroker(error=BrokerError(ErrorCode.BAD_REQUEST, "InputError: the input has 300 tokens")))
    response = refused.simulate_post("/tei/emb/embed", json={"inputs": "a"})
    assert response.status_code == 422
    assert response.json == {"error": "Input validation error: the input has 300 tokens", "error_type": "Validation"}


def test_rerank_best_first_with_text_and_raw_scores(app, broker):
    texts = ["a", "abc", "ab"]
    ranks = app.simulate_post("/rerank", json={"query": "q", "texts": texts, "return_text": True}).json
    assert ranks == [{"index": 1, "text": "abc", "score": pytest.approx(0.03)},
                     {"index": 2, "text": "ab", "score": pytest.approx(0.02)},
                     {"index": 0, "text": "a", "score": pytest.approx(0.01)}]
    assert list(ranks[0]) == ["index", "text", "score"]
    raw = app.simulate_post("/rerank", json={"query": "q", "texts": texts, "raw_scores": True}).json
    assert [r["index"] for r in raw] == [1, 2, 0] and raw[0]["score"] == pytest.approx(0.03 - 100)
    assert "text" not in raw[0]
    assert broker.calls[-1][1][0] == {"query": "q", "document": "a", "count_tokens": True, "raw_scores": True}
    empty = app.simulate_post("/rerank", json={"query": "q", "texts": []})
    assert empty.status_code == 400 and empty.json == {"error": "`texts` cannot be empty", "error_type": "Empty"}


def test_predict_keeps_teis_pair_and_batch_rule_and_its_scores():
    broker = TextBroker(models=("cls", "cls1"))
    app = client(broker, default_classify_model="cls")
    softmax = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    single = app.simulate_post("/predict", json={"inputs": "good"}).json
    assert single == [{"score": pytest.approx(softmax[1]), "label": "positive"},
                      {"score": pytest.approx(softmax[0]), "label": "negative"}]
    assert app.simulate_post("/predict", json={"inputs": ["good"]}).json == single
    batch = app.simulate_post("/predict", json={"inputs": [["good"], ["bad"]], "raw_scores": True}).json
    assert batch == [[{"score": 2.0, "label": "positive"}, {"score": 1.0, "label": "negative"}]] * 2
    pair = app.simulate_post("/predict", json={"inputs": ["a", "b"], "truncate": True})
    assert pair.status_code == 200 and pair.json == single  # one pair: one answer, not a batch
    assert broker.calls[-1][1] == [{"text": "a", "text_pair": "b", "raw_scores": True, "count_tokens": True,
                                        "truncate": True}]
    mixed = app.simulate_post("/tei/cls", json={"inputs": [["a", "b"], ["c"]]})  # POST / of a classifier
    assert mixed.status_code == 200 and mixed.json == [single, single]
    assert [x.get("text_pair") for x in broker.calls[-1][1]] == ["b", None]
    for bad in (["a", "b", "c"], [["a", "b", "c"]], [["a", 1]], [[]]):
        refused = app.simulate_post("/predict", json={"inputs": bad})
        assert refused.status_code == 422 and refused.json["error_type"] == "Validation", bad
    sigmoid = app.simulate_post("/tei/cls1/predict", json={"inputs": "x"}).json
    assert sigmoid == [{"score": pytest.approx(1 / (1 + np.exp(-1.0))), "label": "yes"}]


def test_similarity_is_the_cosine_of_raw_vectors(app, broker):
    body = {"inputs": {"source_sentence": "a", "sentences": ["b", "c"]}, "parameters": {"truncate": True}}
    for route in ("/similarity", "/"):
        response = app.simulate_post(route, json=body)
        assert response.status_code == 200, response.text
        assert response.json == [pytest.approx(1.0), pytest.approx(1.0)]  # parallel vectors
        assert broker.calls[-1][1][0] == {"text": "a", "normalize": False, "count_tokens": True, "truncate": True}
    empty = app.simulate_post("/similarity", json={"inputs": {"source_sentence": "a", "sentences": []}})
    assert empty.status_code == 400 and empty.json["error"] == "`inputs.sentences` cannot be empty"


def test_tokenize_and_decode_travel_as_inputs_and_answer_in_batches(app, broker):
    tokens = app.simulate_post("/tokenize", json={"inputs": "hé", "add_special_tokens": False}).json
    assert tokens == [[{"id": 7, "text": "hé", "special": False, "start": 0, "stop": 3}]]
    assert broker.calls[-1][1] == [{"tokenize": "hé", "add_special_tokens": False}]
    assert app.simulate_post("/decode", json={"ids": [1, 2]}).json == ["1 2"]
    assert app.simulate_post("/decode", json={"ids": [[1], [2]], "skip_special_tokens": False}).json == ["1", "2"]
    assert broker.calls[-1][1] == [{"decode": [1], "skip_special_tokens": False},
                                   {"decode": [2], "skip_special_tokens": False}]
    assert app.simulate_post("/decode", json={"ids": []}).status_code == 400


def test_post_root_decides_by_body_and_root_model_by_flags_or_the_only_live_model(broker):
    app = client(broker)  # emb, ranker, cls live; one of each task: each decides itself
    assert app.simulate_post("/", json={"inputs": "a"}).json == [pytest.approx([v / 13 for v in VECTOR])]
    assert broker.calls[-1][0] == "emb"
    assert [r["index"] for r in app.simulate_post("/", json={"query": "q", "texts": ["a", "ab"]}).json] == [1, 0]
    assert broker.calls[-1][0] == "ranker"
    assert app.simulate_post("/predict", json={"inputs": "a"}).status_code == 200 and broker.calls[-1][0] == "cls"
    assert app.simulate_post("/tei/cls", json={"inputs": "a"}).json[0]["label"] == "positive"
    assert app.simulate_post("/tei/ranker", json={"query": "q", "texts": ["a"]}).status_code == 200
    assert app.simulate_post("/invocations", json={"query": "q", "texts": ["a"]}).status_code == 200
    assert broker.calls[-1][0] == "ranker"
    assert app.simulate_post("/tei/cls/invocations", json={"inputs": "a"}).json[0]["label"] == "positive"

    two = TextBroker(models=("emb", "cls", "cls1"))
    undecided = client(two).simulate_post("/predict", json={"inputs": "a"})
    assert undecided.status_code == 400 and "cls, cls1" in undecided.json["error"]
    assert "--default-classify-model" in undecided.json["error"]
    as_default = client(two, default_model="cls1").simulate_post("/", json={"inputs": "a"})
    assert as_default.json == [{"score": pytest.approx(1 / (1 + np.exp(-1.0))), "label": "yes"}]


def test_info_and_health(app):
    info = app.simulate_get("/info").json
    assert info["model_id"] == "emb" and info["model_sha"] == "v0"
    assert info["model_type"] == {"embedding": {"pooling": "last_token"}}
    assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 4096
    assert isinstance(info["version"], str)
    ranker = app.simulate_get("/tei/ranker/info").json["model_type"]
    assert ranker == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    for path in ("/health", "/", "/tei/emb/health", "/tei/emb"):
        response = app.simulate_get(path)
        assert response.status_code == 200 and response.content == b""
    gone = app.simulate_get("/tei/nope/health")
    assert gone.status_code == 503 and gone.json == {"error": "unhealthy", "error_type": "Unhealthy"}
    assert app.simulate_get("/tei/nope/info").status_code == 404


def test_cohere_embed_v1_v2_and_rerank_v2(app, broker):
    v1 = app.simulate_post("/v1/embed", json={"model": "emb", "texts": ["a", "b"], "input_type": "search_query"})
    assert v1.status_code == 200, v1.text
    assert v1.json["response_type"] == "embeddings_floats" and v1.json["embeddings"] == [VECTOR, [2 * v for v in VECTOR]]
    assert v1.json["texts"] == ["a", "b"] and v1.json["meta"]["billed_units"] == {"input_tokens": 4}
    assert broker.calls[-1][1][0] == {"text": "a", "count_tokens": True, "truncate": True}
    v2 = app.simulate_post("/v2/embed", json={"model": "emb", "texts": ["a"], "embedding_types": ["float"],
                                              "truncate": "START"})
    assert v2.json["response_type"] == "embeddings_by_type" and v2.json["embeddings"] == {"float": [VECTOR]}
    assert broker.calls[-1][1][0]["truncation_direction"] == "left"
    int8 = app.simulate_post("/v2/embed", json={"model": "emb", "texts": ["a"], "embedding_types": ["int8"]})
    assert int8.status_code == 400 and int8.json["error"]["param"] == "embedding_types"
    rerank = app.simulate_post("/v2/rerank", json={"model": "ranker", "query": "q", "documents": ["a", "abc"],
                                                   "top_n": 1})
    assert rerank.status_code == 200, rerank.text
    assert rerank.json["results"] == [{"index": 1, "relevance_score": pytest.approx(0.03)}]
    assert rerank.json["meta"]["api_version"] == {"version": "2"} and rerank.json["id"]
    objects = app.simulate_post("/v1/rerank", json={"model": "ranker", "query": "q",
                                                    "documents": [{"text": "a"}, {"text": "abc"}]})
    assert [r["index"] for r in objects.json["results"]] == [1, 0]


def test_embed_all_answers_a_vector_per_token_and_embed_sparse_424(app, broker):
    response = app.simulate_post("/embed_all", json={"inputs": ["ab", "c"], "truncate": True})
    assert response.status_code == 200, response.text
    assert response.json == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1, 2, 3]]]
    assert broker.calls[-1][1][1] == {"text": "c", "all_tokens": True, "count_tokens": True, "truncate": True}
    sparse = app.simulate_post("/embed_sparse", json={"inputs": "a"})
    assert sparse.status_code == 424 and sparse.json["error_type"] == "Backend"


class _Clock:
    """time.monotonic for gateway/tei.py: each call advances by step_s."""

    def __init__(self, step_s: float):
        self.now, self.step_s = 1000.0, step_s

    def monotonic(self) -> float:
        self.now += self.step_s
        return self.now


def test_timing_headers_are_the_brokers_figures_in_whole_ms_within_the_gateways_total(app, broker, monkeypatch):
    monkeypatch.setattr(tei, "time", _Clock(step_s=0.0505))  # the request's wall time, start to end: 50.5 ms
    broker.figures = {"queue_ms": 12.7, "prepare_ms": 3.2, "forward_ms": 20.9}
    for route, body in (("/embed", {"inputs": ["a", "b"]}), ("/tei/cls/predict", {"inputs": ["a", "b"]}),
                        ("/rerank", {"query": "q", "texts": ["a"]}), ("/tokenize", {"inputs": "a"})):
        answer = app.simulate_post(route, json=body)
        assert answer.status_code == 200, (route, answer.text)
        assert broker.asked_timings[-1], route
        headers = {name: answer.headers[name] for name in ("x-total-time", "x-compute-time", "x-queue-time",
                                                           "x-tokenization-time", "x-inference-time")}
        assert headers == {"x-total-time": "50", "x-compute-time": "50", "x-queue-time": "12",
                           "x-tokenization-time": "3", "x-inference-time": "20"}, route
    broker.figures = {"queue_ms": 80.0}  # a broker on a host whose clock runs fast: never above the total
    late = app.simulate_post("/embed", json={"inputs": "a"})
    assert late.headers["x-queue-time"] == "50" and late.headers["x-inference-time"] == "0"
    assert late.headers["x-tokenization-time"] == "0"
