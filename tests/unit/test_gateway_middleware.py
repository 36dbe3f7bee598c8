"""The gateway's one per-request middleware (gateway/middleware.py) keeps what its four parts did,
the declared tensors are built once per metadata dict (gateway/tensors.py), and the HTTP metrics
kept for a loop turn are written as one observe() per request would write them (gateway/metrics.py)."""

import asyncio
import re
import uuid

import falcon.testing
import pytest
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.app import create_app
from gateway.asgi_server import MAX_REQUEST_LINE_BYTES
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.request_ids import new_request_id
from gateway.tensors import check_v1_inputs, declared_tensors
from tests.fakes import Awaitable, FakeBrokerClient

JSON = {"Content-Type": "application/json"}
PREDICT = "/v1/models/{model}/predict"


def client() -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Awaitable(FakeBrokerClient()), GatewayConfig()))


def counted(route: str, status: int) -> float:
    return REGISTRY.get_sample_value("ddml_http_requests_total",
                                     {"route": route, "method": "POST", "status": str(status)}) or 0.0


def test_answered_request_carries_its_given_id_and_is_counted_under_its_route_template():
    before = counted(PREDICT, 200)
    response = client().simulate_post("/v1/models/echo/predict", body='{"inputs": ["a"]}',
                                      headers={**JSON, "X-Request-ID": "mine-1"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "mine-1"
    assert counted(PREDICT, 200) == before + 1


def test_invalid_request_id_is_refused_with_a_made_id_and_still_counted():
    before = counted("unmatched", 400)  # refused before routing: no template
    response = client().simulate_post("/v1/models/echo/predict", body='{"inputs": ["a"]}',
                                      headers={**JSON, "X-Request-ID": "has space"})
    assert response.status_code == 400
    assert "X-Request-ID" in response.json["error"]["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert counted("unmatched", 400) == before + 1


def test_target_over_the_limit_gets_414_with_an_id_and_is_not_counted():
    before = counted("unmatched", 414) + counted(PREDICT, 414)
    response = client().simulate_post("/v1/models/echo/predict", query_string="q=" + "x" * MAX_REQUEST_LINE_BYTES,
                                      body='{"inputs": ["a"]}', headers=JSON)
    assert response.status_code == 414
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert counted("unmatched", 414) + counted(PREDICT, 414) == before


TEXT = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}], "outputs": []}
IMAGE = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 2]}], "outputs": []}


def test_declared_tensors_are_built_once_per_metadata_dict_and_a_new_dict_is_read_afresh():
    first = declared_tensors(TEXT)
    assert first is declared_tensors(TEXT)
    assert first[0][0].datatype == "BYTES"
    changed = {**TEXT, "inputs": IMAGE["inputs"]}  # a new registration: a new dict from the catalog
    assert declared_tensors(changed)[0][0].datatype == "FP32"
    assert declared_tensors({}) is None and declared_tensors({"free_form": True}) is None


def test_v1_check_uses_what_the_current_metadata_declares():
    assert check_v1_inputs("m", TEXT, [[1.0, 2.0]]) == [[1.0, 2.0]]  # a text model: not checked
    [array] = check_v1_inputs("m", dict(IMAGE), [[1.0, 2.0]])
    assert array.dtype.name == "float32" and array.tolist() == [1.0, 2.0]
    image = dict(IMAGE)  # the same dict again (the catalog's, until its next fetch): checked from memory
    for _ in range(2):
        with pytest.raises(GatewayError, match="expects FP32"):
            check_v1_inputs("m", image, [[1.0, 2.0, 3.0]])
    assert check_v1_inputs("m", {**image, "inputs": TEXT["inputs"]}, [[1.0, 2.0, 3.0]]) == [[1.0, 2.0, 3.0]]


def test_a_made_request_id_has_uuid4s_shape():
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(uuid.UUID(i).hex == i and uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122
               for i in ids)


def test_samples_kept_for_the_turn_are_written_as_observe_writes_them():
    """metrics.flush(): the counter, the histogram's buckets and its sum as one observe() per request left them."""
    from prometheus_client import CollectorRegistry, Histogram

    reference = Histogram("reference_seconds", "", ["route"], registry=CollectorRegistry(),
                          buckets=metrics._SECONDS_BUCKETS).labels("r")
    durations = [0.0004, 0.001, 0.0011, 0.3, 0.3, 7.0, 40.0, 0.0025]
    key = ("/test/{flush}", "GET", 200)
    metrics.flush()

    async def answer_all():
        for seconds in durations:
            reference.observe(seconds)
            metrics._pending.setdefault(key, []).append(seconds)
        await asyncio.sleep(0)

    asyncio.run(answer_all())
    metrics.flush()
    requests, duration = metrics._children[key]
    assert requests._value.get() == len(durations)
    assert duration._sum.get() == reference._sum.get()  # the same float, added in the same order
    assert [b.get() for b in duration._buckets] == [b.get() for b in reference._buckets]


def test_a_sample_is_written_by_the_end_of_its_turn_without_a_scrape():
    before = REGISTRY.get_sample_value("ddml_http_requests_total", {"route": "/t", "method": "other", "status": "201"}) or 0

    async def answer():
        metrics.count("/t", "PURGE", 201, 0.0)
        assert metrics._pending
        await asyncio.sleep(0)  # the turn ends
        assert not metrics._pending

    asyncio.run(answer())
    assert REGISTRY.get_sample_value("ddml_http_requests_total",
                                     {"route": "/t", "method": "other", "status": "201"}) == before + 1
    metrics.count("/t", "PURGE", 201, 0.0)  # no event loop: written at once
    assert REGISTRY.get_sample_value("ddml_http_requests_total",
                                     {"route": "/t", "method": "other", "status": "201"}) == before + 2
