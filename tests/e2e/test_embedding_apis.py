"""What embedding clients speak, through gunicorn, a broker and real workers, all in one stack:
the official OpenAI client, rerank, models served as sentence-transformers would (the real
MiniLM included), one request id followed through the three processes' logs, and two versions
of one model with requests pinned to each."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import numpy as np
import pytest
import requests

from tests.conftest import WORDS
from tests.processes import wait_for_models, wait_until
from worker.models import default_model_path

pytestmark = pytest.mark.e2e

SENTENCE = "ddml micro-batches requests from many clients onto one or many GPUs."
TINY_TEXTS = ["the quick brown fox", "lazy dog", "model serving batch request reply worker broker"]
TINY_LONG = " ".join(WORDS * 12)  # 192 words: over the tiny models' limits (16, and 128 positions)
MINILM_LONG = " ".join(["serving"] * 300)  # over MiniLM's 256 tokens


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def cluster(module_stack, tiny_st_cls, tiny_st_mean, tiny_cross_encoder):
    """One broker (JSON logs), six workers, one gateway; broker, gateway and the st-mean worker log at DEBUG."""
    stack = module_stack
    broker = stack.start_broker("--log-level", "DEBUG", "--log-format", "json")
    workers = {
        "minilm": stack.start_worker("--model", "minilm", "--device", "cpu", wait=False),
        "st-cls": stack.start_worker("--model", "st-cls", "--model-path", str(tiny_st_cls), "--device", "cpu",
                                     "--auto-truncate", wait=False),
        "st-mean": stack.start_worker("--model", "st-mean", "--model-path", str(tiny_st_mean), "--device", "cpu",
                                      "--log-level", "DEBUG", wait=False),
        "ranker": stack.start_worker("--model", "ranker", "--model-path", str(tiny_cross_encoder), "--task", "rerank",
                                     "--device", "cpu", wait=False),
        "rev-v1": stack.start_worker("--model", "rev", "--handler", "tests.handlers:ReverseModel", "--device", "cpu",
                                     "--model-version", "v1", wait=False),
        "rev-v2": stack.start_worker("--model", "rev", "--handler", "tests.handlers:ReverseModel", "--device", "cpu",
                                     "--model-version", "v2", wait=False),
    }
    for worker in workers.values():
        worker.wait_for_output(r"worker ready", timeout_s=180)
    gateway, url = stack.start_gateway("--workers", "1", "--threads", "8", "--log-level", "DEBUG")
    wait_for_models(url, {"minilm", "st-cls", "st-mean", "ranker", "rev"},
                    also=lambda models: next(m for m in models if m["name"] == "rev")["versions"] == ["v1", "v2"])
    return {"url": url, "broker": broker, "gateway": gateway, "workers": workers, "frontend": stack.frontend}


def predict(url: str, model: str, inputs: list, **extra) -> requests.Response:
    return requests.post(f"{url}/v1/models/{model}/predict", json={"inputs": inputs, **extra}, timeout=60)


def test_openai_client_float_and_base64_single_and_list_match_the_predict_route(cluster):
    import openai
    from transformers import AutoTokenizer

    url = cluster["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    texts = [SENTENCE, "short"]
    reference = np.array(predict(url, "minilm", texts).json()["outputs"], dtype=np.float32)

    as_base64 = client.embeddings.with_raw_response.create(model="minilm", input=SENTENCE)  # the client's default
    assert isinstance(as_base64.http_response.json()["data"][0]["embedding"], str)  # base64 on the wire
    version = as_base64.headers["x-model-version"]
    single = as_base64.parse()
    assert single.model == f"minilm@{version}" and len(single.data) == 1
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [d.index for d in as_float.data] == [0, 1]
    for vectors in ([single.data[0].embedding], [d.embedding for d in as_float.data]):
        for got, want in zip(vectors, reference):
            assert len(got) == 384 and cosine(got, want) >= 0.9999
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    assert as_float.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert as_float.usage.total_tokens == as_float.usage.prompt_tokens

    short = client.embeddings.create(model=f"minilm@{version}", input=texts, dimensions=64)
    for got, want in zip(short.data, reference):
        assert len(got.embedding) == 64 and np.linalg.norm(got.embedding) == pytest.approx(1.0, abs=1e-5)
        assert cosine(got.embedding, want[:64]) >= 0.9999

    with pytest.raises(openai.NotFoundError, match="no live worker serves model 'nope'"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="minilm", input="x", dimensions=385)
    assert refused.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.embeddings.create(model="minilm", input=[[101, 2023, 102]])
    with pytest.raises(openai.BadRequestError, match="more than this model's limit of 256"):
        client.embeddings.create(model="minilm", input=[SENTENCE, MINILM_LONG])
    with pytest.raises(openai.BadRequestError, match="is a rerank model"):
        client.embeddings.create(model="ranker", input="x")
    assert [m.id for m in client.models.list()][:2] == ["minilm", f"minilm@{version}"]


@pytest.mark.parametrize("model, fixture, pooling", [
    ("st-cls", "tiny_st_cls", "cls"), ("st-mean", "tiny_st_mean", "mean"), ("minilm", None, "mean")])
def test_each_model_matches_sentence_transformers_encode_long_inputs_included(cluster, request, model, fixture,
                                                                               pooling):
    from sentence_transformers import SentenceTransformer

    path = request.getfixturevalue(fixture) if fixture else default_model_path()
    reference = SentenceTransformer(str(path), device="cpu")
    assert reference[1].pooling_mode == pooling
    url = cluster["url"]
    long = MINILM_LONG if model == "minilm" else TINY_LONG
    texts = (TINY_TEXTS if fixture else [SENTENCE, "short"]) + [long]
    expected = reference.encode(texts)  # sentence-transformers truncates the long one
    if model == "st-cls":  # its worker runs with --auto-truncate: the OpenAI route takes the long input as it is
        body = requests.post(f"{url}/v1/embeddings", json={"model": model, "input": texts}, timeout=60).json()
        served = [d["embedding"] for d in body["data"]]
    else:
        assert predict(url, model, [long]).status_code == 400  # no silent truncation
        served = predict(url, model, texts, truncate=True).json()["outputs"]
    cosines = [cosine(got, want) for got, want in zip(served, expected)]
    print(f"\n{model}: pooling {pooling}, cosine against sentence-transformers {min(cosines):.6f} (lowest of "
          f"{len(cosines)}, long input included)")
    assert min(cosines) >= 0.9999, cosines


def test_rerank_scores_match_cross_encoder_best_first(cluster, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    documents = ["the quick brown fox jumps over the lazy dog", "batch request reply", "model serving", "dog"]
    response = requests.post(f"{cluster['url']}/v1/rerank", json={
        "model": "ranker", "query": "lazy dog", "documents": documents, "top_n": 3, "return_documents": True},
        timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = CrossEncoder(str(tiny_cross_encoder), device="cpu").predict([("lazy dog", d) for d in documents])
    best = sorted(range(len(documents)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in results] == best
    for result in results:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-5)
        assert result["document"] == {"text": documents[result["index"]]}


def test_one_request_id_is_in_the_gateway_broker_and_worker_logs(cluster):
    url = cluster["url"]
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    response = requests.post(f"{url}/v1/embeddings", json={"model": "st-mean", "input": "lazy dog"},
                             headers={"X-Request-ID": request_id}, timeout=60)
    assert response.status_code == 200 and response.headers["x-request-id"] == request_id

    def lines(process, parse=False):
        found = [line for line in process.output().splitlines() if request_id in line]
        return [json.loads(line) for line in found] if parse else found

    gateway = wait_until(lambda: lines(cluster["gateway"]), 10, what="the id in the gateway's log")
    broker = wait_until(lambda: lines(cluster["broker"], parse=True), 10, what="the id in the broker's JSON log")
    worker = wait_until(lambda: lines(cluster["workers"]["st-mean"]), 10, what="the id in the worker's log")
    print("\n" + "\n".join(["gateway: " + gateway[0], "broker:  " + json.dumps(broker[0]), "worker:  " + worker[0]]))
    assert any(entry.get("request_id", "").startswith(f"{request_id}/") for entry in broker)

    # The KServe v2 id is the same id.
    v2 = requests.post(f"{url}/v2/models/st-mean/infer", headers={"X-Request-ID": request_id}, json={
        "inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["lazy dog"]}]}, timeout=60)
    assert v2.status_code == 200 and v2.json()["id"] == request_id and v2.headers["x-request-id"] == request_id


def test_pinned_requests_go_only_to_their_version_and_status_shows_both(cluster):
    url = cluster["url"]
    pids = {version: cluster["workers"][f"rev-{version}"].pid for version in ("v1", "v2")}
    for version, pid in pids.items():
        for _ in range(10):
            response = predict(url, f"rev@{version}", ["abc", "de"])
            assert response.status_code == 200, response.text
            assert {output["pid"] for output in response.json()["outputs"]} == {pid}
            assert response.headers["x-model-version"] == version
    unpinned = {o["pid"] for _ in range(20) for o in predict(url, "rev", ["abc"]).json()["outputs"]}
    assert unpinned <= set(pids.values())
    assert predict(url, "rev@v3", ["abc"]).status_code == 404

    models = {m["name"]: m for m in requests.get(f"{url}/v1/models", timeout=5).json()["models"]}
    assert models["rev"]["versions"] == ["v1", "v2"]
    assert requests.get(f"{url}/v2/models/rev", timeout=5).json()["versions"] == ["v1", "v2"]
    status = subprocess.run([sys.executable, "-m", "gateway.status_cli", "--broker", cluster["frontend"]],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "model rev is served at 2 versions: v1, v2" in status.stdout
    print("\n" + status.stdout)
