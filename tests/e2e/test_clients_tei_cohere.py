"""The real clients of text-embeddings-inference's API and Cohere's, unchanged, against a real gateway,
broker and workers: each answer checked against /v1/models/{m}/predict (cosine >= 0.9999, equal scores).
Also TEI's own example bodies and error cases, field by field.

The gateway serves an embedder (MiniLM), a reranker and a classifier side by side, with
--default-model minilm: clients given the root URL, and clients given /tei/{model}, must all work.
huggingface_hub refuses every URL while HF_HUB_OFFLINE=1 is set in its own environment, so its
clients (InferenceClient, and Haystack's embedders, which go through it) run in a child process
without that variable, as a user's program would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.processes import wait_for_models

pytestmark = pytest.mark.e2e

TEXTS = ["ddml micro-batches requests from many clients.", "The lazy dog sleeps.", "short"]
QUERY = "lazy dog"
DOCUMENTS = ["the quick brown fox jumps over the lazy dog", "batch request reply", "model serving", "dog"]


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def cluster(module_stack, tiny_cross_encoder, tiny_bert_classifier):
    stack = module_stack
    stack.start_broker()
    workers = [
        stack.start_worker("--model", "minilm", "--device", "cpu", wait=False),
        stack.start_worker("--model", "ranker", "--model-path", str(tiny_cross_encoder), "--task", "rerank",
                           "--device", "cpu", wait=False),
        stack.start_worker("--model", "cls", "--model-path", str(tiny_bert_classifier), "--task", "classification",
                           "--device", "cpu", wait=False),
        # One batch at a time, and test directives ({"sleep_s"}): a request can be made to wait at the broker.
        stack.start_worker("--model", "echo", "--max-batches", "1", wait=False),
    ]
    for worker in workers:
        worker.wait_for_output(r"worker ready", timeout_s=180)
    _, url = stack.start_gateway("--workers", "1", "--threads", "8", "--default-model", "minilm")
    wait_for_models(url, {"minilm", "ranker", "cls", "echo"})
    return url


def predict(url: str, model: str, inputs: list) -> list:
    response = requests.post(f"{url}/v1/models/{model}/predict", json={"inputs": inputs}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def assert_same_vectors(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w) and cosine(g, w) >= 0.9999


_HUB_CLIENTS = r"""
import json, sys
from huggingface_hub import InferenceClient
from haystack import Document
from haystack_integrations.components.embedders.huggingface_api import (
    HuggingFaceAPIDocumentEmbedder, HuggingFaceAPITextEmbedder)

base, texts = sys.argv[1], json.loads(sys.argv[2])
client = InferenceClient(base_url=base)
answer = {
    "feature_extraction": client.feature_extraction(texts[0]).tolist(),
    "feature_extraction_list": client.feature_extraction(texts).tolist(),
    "sentence_similarity": client.sentence_similarity(texts[0], other_sentences=texts[1:]),
}
text_embedder = HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params={"url": base})
answer["haystack_text"] = text_embedder.run(text=texts[0])["embedding"]
documents = HuggingFaceAPIDocumentEmbedder(api_type="text_embeddings_inference", api_params={"url": base}).run(
    documents=[Document(content=t) for t in texts])["documents"]
answer["haystack_documents"] = [d.embedding for d in documents]
print(json.dumps(answer))
"""


@pytest.mark.parametrize("base", ["/tei/minilm", ""])
def test_huggingface_hub_and_haystack_embedders_match_predict(cluster, base):
    environment = {**os.environ, "HF_HUB_OFFLINE": "0"}  # the client's own environment: see the docstring
    done = subprocess.run([sys.executable, "-c", _HUB_CLIENTS, cluster + base, json.dumps(TEXTS)], env=environment,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    reference = predict(cluster, "minilm", TEXTS)
    assert np.asarray(answer["feature_extraction"]).shape in ((384,), (1, 384))
    assert_same_vectors(np.asarray(answer["feature_extraction"]).reshape(1, -1), reference[:1])
    assert_same_vectors(answer["feature_extraction_list"], reference)
    expected = [cosine(reference[0], other) for other in reference[1:]]
    assert answer["sentence_similarity"] == pytest.approx(expected, abs=1e-5)
    assert_same_vectors([answer["haystack_text"]], reference[:1])
    assert_same_vectors(answer["haystack_documents"], reference)
    # Haystack sends "normalize": false, and TEI then answers the model's raw vector: MiniLM's is not unit length
    assert abs(np.linalg.norm(answer["haystack_text"]) - 1.0) > 0.01


def test_llamaindex_text_embeddings_inference_matches_predict(cluster):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    reference = predict(cluster, "minilm", TEXTS)
    for base in (f"{cluster}/tei/minilm", cluster):
        embedder = TextEmbeddingsInference(model_name="minilm", base_url=base, timeout=60)
        assert_same_vectors(embedder.get_text_embedding_batch(TEXTS), reference)
        assert_same_vectors([embedder.get_query_embedding(TEXTS[0])], reference[:1])


def test_haystack_tei_ranker_at_the_root_matches_predict(cluster):
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    scores = predict(cluster, "ranker", [[QUERY, d] for d in DOCUMENTS])
    for url in (cluster, f"{cluster}/tei/ranker"):  # it calls /rerank at the host root either way
        ranked = HuggingFaceTEIRanker(url=url, top_k=3).run(query=QUERY, documents=[Document(content=d)
                                                                                      for d in DOCUMENTS])
        documents = ranked["documents"]
        best = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])[:3]
        assert [d.content for d in documents] == [DOCUMENTS[i] for i in best]
        assert [d.score for d in documents] == pytest.approx([scores[i] for i in best], abs=1e-6)


def test_cohere_v2_rerank_and_embed_and_v1_embed_match_predict(cluster):
    import cohere

    scores = predict(cluster, "ranker", [[QUERY, d] for d in DOCUMENTS])
    client = cohere.ClientV2(api_key="unused", base_url=cluster)
    reranked = client.rerank(model="ranker", query=QUERY, documents=DOCUMENTS, top_n=2)
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])[:2]
    assert [r.index for r in reranked.results] == best
    assert [r.relevance_score for r in reranked.results] == pytest.approx([scores[i] for i in best], abs=1e-6)

    reference = predict(cluster, "minilm", TEXTS)
    embedded = client.embed(model="minilm", texts=TEXTS, input_type="search_document", embedding_types=["float"])
    assert_same_vectors(embedded.embeddings.float_, reference)
    v1 = cohere.Client(api_key="unused", base_url=cluster).embed(model="minilm", texts=TEXTS,
                                                                 input_type="search_query")
    assert_same_vectors(v1.embeddings, reference)
    v1_rerank = cohere.Client(api_key="unused", base_url=cluster).rerank(
        model="ranker", query=QUERY, documents=[{"text": d} for d in DOCUMENTS], return_documents=True)
    assert [r.index for r in v1_rerank.results][:2] == best
    assert v1_rerank.results[0].document.text == DOCUMENTS[best[0]]


def test_teis_example_bodies_answer_field_by_field(cluster):
    url = cluster
    embedded = requests.post(f"{url}/embed", json={"inputs": "What is Deep Learning?"}, timeout=60)
    assert embedded.status_code == 200, embedded.text
    [vector] = embedded.json()
    assert len(vector) == 384 and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert_same_vectors([vector], predict(url, "minilm", ["What is Deep Learning?"]))
    for header in ("x-compute-time", "x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time"):
        assert embedded.headers[header].isdigit()
    assert int(embedded.headers["x-compute-tokens"]) == 7  # [CLS] what is deep learning ? [SEP]

    [token_rows] = requests.post(f"{url}/embed_all", json={"inputs": "What is Deep Learning?"}, timeout=60).json()
    assert np.asarray(token_rows).shape == (7, 384)  # MiniLM pools by the mean of these
    assert_same_vectors([np.mean(token_rows, axis=0)], [vector])

    texts = ["Deep Learning is not...", "Deep learning is..."]
    ranks = requests.post(f"{url}/rerank", json={"query": "What is Deep Learning?", "texts": texts,
                                                 "return_text": True}, timeout=60).json()
    scores = predict(url, "ranker", [["What is Deep Learning?", t] for t in texts])
    assert [set(r) for r in ranks] == [{"index", "score", "text"}] * 2
    assert [r["index"] for r in ranks] == sorted(range(2), key=lambda i: -scores[i])
    assert [r["score"] for r in ranks] == pytest.approx([scores[r["index"]] for r in ranks], abs=1e-6)
    assert [r["text"] for r in ranks] == [texts[r["index"]] for r in ranks]

    predicted = requests.post(f"{url}/predict", json={"inputs": "I like you. I love you"}, timeout=60).json()
    [probabilities] = predict(url, "cls", ["I like you. I love you"])
    assert [set(p) for p in predicted] == [{"score", "label"}] * 2
    assert {p["label"]: p["score"] for p in predicted} == pytest.approx(probabilities["probabilities"], abs=1e-6)
    assert predicted[0]["score"] >= predicted[1]["score"]
    batch = requests.post(f"{url}/predict", json={"inputs": [["I like you."], ["I love you"]]}, timeout=60).json()
    assert len(batch) == 2 and all(len(p) == 2 for p in batch)

    similarity = requests.post(f"{url}/similarity", json={"inputs": {
        "source_sentence": "What is Deep Learning?", "sentences": ["What is Machine Learning?"]}}, timeout=60).json()
    vectors = predict(url, "minilm", ["What is Deep Learning?", "What is Machine Learning?"])
    assert similarity == [pytest.approx(cosine(*vectors), abs=1e-5)]

    [tokens] = requests.post(f"{url}/tokenize", json={"inputs": "test"}, timeout=60).json()
    assert tokens[1] == {"id": 3231, "text": "test", "special": False, "start": 0, "stop": 4}
    assert tokens[0]["special"] and tokens[0]["start"] is None
    decoded = requests.post(f"{url}/decode", json={"ids": [t["id"] for t in tokens]}, timeout=60).json()
    assert decoded == ["test"]

    info = requests.get(f"{url}/info", timeout=10).json()
    assert info["model_id"] == "minilm" and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and isinstance(info["max_client_batch_size"], int)
    assert requests.get(f"{url}/info", timeout=10).headers["content-type"].startswith("application/json")
    assert list(requests.get(f"{url}/tei/ranker/info", timeout=10).json()["model_type"]) == ["reranker"]
    for path in ("/health", "/", "/tei/cls/health"):
        response = requests.get(f"{url}{path}", timeout=10)
        assert response.status_code == 200 and response.content == b""


def test_predict_scores_sentence_pairs_as_transformers_and_v1_predict_do(cluster, tiny_bert_classifier):
    """TEI's ["a", "b"] is one pair and [["a", "b"], ["c"]] a batch: each pair is tokenizer(text, text_pair), scored
    by softmax over the labels as TEI does, the same as transformers' own classifier and as /v1 predict."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_classifier))
    reference = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_classifier)).eval()
    labels = [reference.config.id2label[i] for i in range(reference.config.num_labels)]

    def expected(*texts):
        with torch.inference_mode():
            logits = reference(**tokenizer(*texts, return_tensors="pt")).logits[0].double()
        return dict(zip(labels, torch.softmax(logits, dim=-1).tolist()))

    url = cluster
    pair = requests.post(f"{url}/tei/cls/predict", json={"inputs": ["lazy dog", "the quick brown fox"]}, timeout=60)
    assert pair.status_code == 200, pair.text
    scores = {p["label"]: p["score"] for p in pair.json()}
    assert scores == pytest.approx(expected("lazy dog", "the quick brown fox"), abs=1e-5)
    assert pair.json()[0]["score"] >= pair.json()[1]["score"]
    assert scores != pytest.approx(expected("lazy dog"), abs=1e-5)  # the second text counted
    [v1] = predict(url, "cls", [{"text": "lazy dog", "text_pair": "the quick brown fox"}])
    assert scores == pytest.approx(v1["probabilities"], abs=1e-6)
    batch = requests.post(f"{url}/tei/cls", json={"inputs": [["lazy dog", "the quick brown fox"], ["lazy dog"]]},
                          timeout=60)  # POST / of a classifier is /predict
    assert batch.status_code == 200, batch.text
    assert [{p["label"]: p["score"] for p in answer} for answer in batch.json()] == [
        pytest.approx(expected("lazy dog", "the quick brown fox"), abs=1e-5), pytest.approx(expected("lazy dog"),
                                                                                            abs=1e-5)]


TIMING_HEADERS = ("x-queue-time", "x-tokenization-time", "x-inference-time", "x-compute-time", "x-total-time")


def timings_of(response: requests.Response) -> dict[str, int]:
    """TEI's five timing headers, each whole milliseconds, none above x-total-time."""
    assert response.status_code == 200, response.text
    assert all(response.headers[name].isdigit() for name in TIMING_HEADERS), dict(response.headers)
    figures = {name: int(response.headers[name]) for name in TIMING_HEADERS}
    assert all(value <= figures["x-total-time"] for value in figures.values()), figures
    return figures


def test_timing_headers_tell_where_the_time_went_on_a_real_stack(cluster):
    """x-queue-time is the time the request waited at the broker: behind a 3 s batch on the echo worker
    (which holds one batch at a time), most of it; x-tokenization-time and x-inference-time are the
    worker's, and none exceeds x-total-time, the gateway's own wall time. (/v1/status, which tells when
    the slow batch runs, is cached for 1 s: the queued request may go up to that much later, and still
    waits over a second.)"""
    from tests.processes import wait_until

    url = cluster
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(requests.post, f"{url}/v1/models/echo/predict", json={"inputs": [{"sleep_s": 3.0}]},
                           timeout=60)

        def echo_busy() -> bool:
            workers = requests.get(f"{url}/v1/status", timeout=5).json()["workers"]
            return any("echo" in w["models"] and w["state"] == "busy" for w in workers)

        wait_until(echo_busy, timeout_s=10, what="the echo worker running the slow batch")
        queued = requests.post(f"{url}/tei/echo/tokenize", json={"inputs": "x"}, timeout=60)
        assert slow.result().status_code == 200
    figures = timings_of(queued)
    # At most the slow batch's 3 s plus the dispatch of the queued one behind it (CI once saw 3003 ms).
    assert 1000 <= figures["x-queue-time"] <= 3500 and figures["x-total-time"] >= figures["x-queue-time"], figures
    assert figures["x-inference-time"] < 500, figures  # its own batch is quick: the wait was in the queue

    # A text model's worker (continuous: it tokenises apart from the forward pass), nothing queued.
    embedded = requests.post(f"{url}/embed", json={"inputs": ["What is Deep Learning?"] * 4}, timeout=60)
    figures = timings_of(embedded)
    assert figures["x-queue-time"] < 500 and figures["x-total-time"] >= figures["x-inference-time"], figures


def test_teis_error_cases_field_by_field(cluster):
    url = cluster
    cases = [
        ("/embed", {"inputs": []}, 400, "Empty", "`inputs` cannot be empty"),
        ("/embed", {"inputs": " ".join(["serving"] * 300)}, 422, "Validation", "more than this model's limit of 256"),
        ("/embed", {"inputs": "x", "prompt_name": "query"}, 422, "Validation", "Sentence Transformers prompts"),
        ("/rerank", {"query": "q", "texts": []}, 400, "Empty", "`texts` cannot be empty"),
        ("/tei/minilm/rerank", {"query": "q", "texts": ["a"]}, 424, "Backend", "not a re-ranker model"),
        ("/tei/nope/embed", {"inputs": "x"}, 404, "Validation", "nope"),
    ]
    for path, body, status, error_type, message in cases:
        response = requests.post(f"{url}{path}", json=body, timeout=60)
        assert response.status_code == status, (path, body, response.text)
        assert set(response.json()) == {"error", "error_type"}
        assert response.json()["error_type"] == error_type and message in response.json()["error"], response.text
    truncated = requests.post(f"{url}/embed", json={"inputs": " ".join(["serving"] * 300), "truncate": True,
                                                    "truncation_direction": "Left"}, timeout=60)
    assert truncated.status_code == 200 and len(truncated.json()[0]) == 384


def test_openai_route_clients_that_worked_before_still_do(cluster):
    """LangChain, LlamaIndex and Haystack through /v1/embeddings, as docs/clients.md says to set them up."""
    from haystack.components.embedders import OpenAITextEmbedder
    from haystack.utils import Secret
    from langchain_openai import OpenAIEmbeddings
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    reference = predict(cluster, "minilm", TEXTS)
    base = f"{cluster}/v1"
    langchain = OpenAIEmbeddings(model="minilm", base_url=base, api_key="unused", check_embedding_ctx_length=False)
    assert_same_vectors(langchain.embed_documents(TEXTS), reference)
    assert_same_vectors([langchain.embed_query(TEXTS[0])], reference[:1])
    like = OpenAILikeEmbedding(model_name="minilm", api_base=base, api_key="unused")
    assert_same_vectors(like.get_text_embedding_batch(TEXTS), reference)
    llama = OpenAIEmbedding(model_name="minilm", api_base=base, api_key="unused")
    assert_same_vectors([llama.get_text_embedding(TEXTS[0])], reference[:1])
    haystack = OpenAITextEmbedder(api_base_url=base, model="minilm", api_key=Secret.from_token("unused"))
    assert_same_vectors([haystack.run(text=TEXTS[0])["embedding"]], reference[:1])
