"""The management API (issue #24) through real processes: a broker, a pool worker, a fixed worker and
gunicorn. tritonclient.http's repository calls unchanged, with and without the admin key; scale up and
down; an unload while requests run loses none of them, and the model then answers 503 until a load."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests

from gateway.broker_client import BrokerClient
from tests.processes import free_port, http_ready, wait_until

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.e2e

FAST = ("--heartbeat-interval-ms", "200")
ADMIN = "admin-secret-token"


def write_repository(path) -> str:
    path.write_text(
        '[models.alpha]\nhandler = "tests.e2e.management_models:DirectedEcho"\nidle-unload-s = 120\n\n'
        '[models.beta]\nhandler = "worker.models.echo:EchoModel"\nidle-unload-s = 120\n\n'
        '[models.gamma]\nhandler = "worker.models.echo:EchoModel"\nidle-unload-s = 120\n\n'
        '[models.broken]\nhandler = "no_such_module:Nope"\n')
    return str(path)


@pytest.fixture(scope="module")
def cluster(module_stack, tmp_path_factory):
    directory = tmp_path_factory.mktemp("management")
    repository = write_repository(directory / "repository.toml")
    (directory / "admin.keys").write_text(f"# operators\n{ADMIN}\n")
    module_stack.start_broker(*FAST)
    module_stack.start_worker("--pool", "--repository", repository, "--max-models", "3", *FAST)
    module_stack.start_worker("--model", "fixed", "--handler", "worker.models.echo:EchoModel", *FAST)
    grpc_address = f"127.0.0.1:{free_port()}"
    process, url = module_stack.start_gateway("--workers", "1", "--admin-key-file", str(directory / "admin.keys"),
                                              "--request-timeout-ms", "20000", "--grpc-bind", grpc_address)
    process.wait_for_output(r"grpc ready", timeout_s=60)
    _, bare_url = module_stack.start_gateway("--workers", "1")
    for address in (url, bare_url):
        wait_until(lambda a=address: http_ready(a, "/v1/models/fixed"), timeout_s=60, what="the gateways")
    return url, bare_url, grpc_address


def admin(token: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def index(url: str) -> dict:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    return {entry["name"]: entry for entry in client.get_model_repository_index()}


def test_the_writes_need_the_admin_key_and_are_refused_without_an_admin_key_file(cluster):
    url, bare_url, _ = cluster
    for method, path, body in (("post", "/v2/repository/models/alpha/load", None),
                               ("post", "/v2/repository/models/alpha/unload", None),
                               ("put", "/v1/models/alpha/replicas", {"max": 2})):
        missing = requests.request(method, url + path, json=body, timeout=10)
        assert missing.status_code == 401, missing.text
        wrong = requests.request(method, url + path, json=body, headers=admin("not-the-key"), timeout=10)
        assert wrong.status_code == 403, wrong.text
        disabled = requests.request(method, bare_url + path, json=body, headers=admin(), timeout=10)
        assert disabled.status_code == 403 and "--admin-key-file" in disabled.text, disabled.text
    # Reads stay open, as the other reads are.
    assert requests.post(url + "/v2/repository/index", timeout=10).status_code == 200


def test_index_load_predict_scale_and_unload_with_tritonclient(cluster):
    url, _, _ = cluster
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    models = index(url)
    assert models["fixed"]["state"] == "READY"
    assert models["beta"] == {"name": "beta", "version": "1", "state": "UNAVAILABLE",
                              "reason": "no replica; loads on demand"}
    with pytest.raises(InferenceServerException, match="no_such"):  # Triton's 400 with the reason
        client.load_model("broken", headers=admin())
    with pytest.raises(InferenceServerException, match="no pool worker"):
        client.load_model("nowhere", headers=admin())

    started_at = time.monotonic()
    client.load_model("beta", headers=admin())  # returns once a replica is READY
    print(f"\nload of beta: {time.monotonic() - started_at:.2f} s")
    assert index(url)["beta"]["state"] == "READY"
    ready_only = requests.post(url + "/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert {"beta", "fixed"} <= {m["name"] for m in ready_only} and "alpha" not in {m["name"] for m in ready_only}

    info = requests.get(url + "/v1/models/beta", timeout=10).json()
    assert info["replicas"]["loaded"] == 1 and info["replicas"]["min"] == 1 and len(info["workers"]) == 1

    scaled = requests.put(url + "/v1/models/beta/replicas", json={"min": 0, "max": 3}, headers=admin(), timeout=10)
    assert scaled.status_code == 200, scaled.text
    assert scaled.json()["replicas"]["min"] == 0 and scaled.json()["replicas"]["max"] == 3
    bad = requests.put(url + "/v1/models/beta/replicas", json={"min": 3, "max": 1}, headers=admin(), timeout=10)
    assert bad.status_code == 400 and "at most" in bad.text
    negative = requests.put(url + "/v1/models/beta/replicas", json={"min": -1}, headers=admin(), timeout=10)
    assert negative.status_code == 400
    fixed = requests.put(url + "/v1/models/fixed/replicas", json={"max": 2}, headers=admin(), timeout=10)
    assert fixed.status_code == 409 and "fixed workers" in fixed.text
    listed = {m["name"]: m for m in requests.get(url + "/v1/models", timeout=10).json()["models"]}
    assert listed["beta"]["replicas"]["max"] == 3 and listed["beta"]["workers"]

    client.unload_model("beta", headers=admin())  # returns once no replica is loaded
    assert index(url)["beta"] == {"name": "beta", "version": "1", "state": "UNAVAILABLE",
                                  "reason": "unloaded by operator"}
    refused = requests.post(url + "/v1/models/beta/predict", json={"inputs": [1]}, timeout=10)
    assert refused.status_code == 503 and "unloaded by operator" in refused.text
    with pytest.raises(InferenceServerException, match="fixed workers"):
        client.unload_model("fixed", headers=admin())

    client.load_model("beta", headers=admin())  # brings it back
    answer = requests.post(url + "/v1/models/beta/predict", json={"inputs": [7]}, timeout=10)
    assert answer.status_code == 200 and answer.json()["outputs"] == [7]


def test_an_unload_while_requests_run_answers_every_one_of_them(cluster, module_stack):
    url, _, _ = cluster
    broker = BrokerClient(module_stack.frontend, heartbeat_interval_s=0.2)
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    client.load_model("alpha", headers=admin())

    def slow(n: int) -> requests.Response:
        return requests.post(url + "/v1/models/alpha/predict", json={"inputs": [{"sleep_s": 1.5, "n": n}]},
                             timeout=30)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        running = [pool.submit(slow, n) for n in range(16)]
        wait_until(lambda: _accepted(broker, "alpha") == 16, timeout_s=10, what="16 requests at the broker")
        started_at = time.monotonic()
        client.unload_model("alpha", headers=admin())
        unload_s = time.monotonic() - started_at
        answers = [future.result(timeout=30) for future in running]
    broker.close()
    print(f"\nunload of alpha under load: {unload_s:.2f} s")
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    assert sorted(a.json()["outputs"][0]["n"] for a in answers) == list(range(16))
    assert index(url)["alpha"]["state"] == "UNAVAILABLE"


def _accepted(broker: BrokerClient, model: str) -> int:
    """Inputs of `model` the broker holds: queued, or at a worker."""
    status = broker.status(every_broker=False)
    return status["models"][model]["queued_items"] + sum(w["in_flight_items"] for w in status["workers"]
                                                         if model in w["models"])


def test_the_repository_rpcs_over_grpc_with_the_admin_key_as_metadata(cluster):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    url, _, grpc_address = cluster
    client = grpcclient.InferenceServerClient(grpc_address)
    names = {m.name: m for m in client.get_model_repository_index().models}
    assert names["fixed"].state == "READY" and "gamma" in names
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("gamma")
    assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as wrong:
        client.load_model("gamma", headers={"authorization": "Bearer not-the-key"})
    assert wrong.value.status() == "StatusCode.PERMISSION_DENIED"
    client.load_model("gamma", headers={"authorization": f"Bearer {ADMIN}"})
    assert client.is_model_ready("gamma") and index(url)["gamma"]["state"] == "READY"
    client.unload_model("gamma", headers={"authorization": f"Bearer {ADMIN}"})
    assert index(url)["gamma"]["reason"] == "unloaded by operator"
    with pytest.raises(InferenceServerException) as fixed:
        client.unload_model("fixed", headers={"authorization": f"Bearer {ADMIN}"})
    assert fixed.value.status() == "StatusCode.FAILED_PRECONDITION"
