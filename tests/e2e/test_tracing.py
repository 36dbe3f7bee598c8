"""The caller's trace through real processes: gateway (HTTP and gRPC) -> broker -> worker, into an OTLP
collector that this test runs (a small HTTP server decoding OTLP/HTTP protobuf posts)."""

from __future__ import annotations

import gzip
import http.server
import threading

import numpy as np
import pytest
import requests

from tests.processes import free_port, http_ready, wait_until

pytestmark = pytest.mark.e2e
trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """Receives OTLP/HTTP protobuf span exports; spans() is every span so far, as plain dicts."""

    def __init__(self):
        self._spans: list[dict] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service.ExportTraceServiceRequest.FromString(body)
                found = []
                for resource_spans in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            found.append({"name": span.name, "service": service, "trace_id": span.trace_id.hex(),
                                          "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                          "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                          "attributes": {a.key: a.value for a in span.attributes}})
                with collector._lock:
                    collector._spans.extend(found)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def spans(self, trace_id: str) -> list[dict]:
        with self._lock:
            return [span for span in self._spans if span["trace_id"] == trace_id]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 0.1 s rather than 5 s
    collector = Collector()
    yield collector
    collector.close()


def _by_name(spans: list[dict]) -> dict[str, dict]:
    named = {}
    for span in spans:
        assert span["name"] not in named or span["name"].startswith(("POST", "GET")), spans
        named[span["name"]] = span
    return named


def test_one_trace_from_the_clients_traceparent_to_the_workers_forward_pass(stack, collector):
    stack.start_broker()
    stack.start_worker("--model", "echo", "--otlp-endpoint", collector.url)
    grpc_address = f"127.0.0.1:{free_port()}"
    gateway, url = stack.start_gateway("--workers", "1", "--threads", "4", "--otlp-endpoint", collector.url,
                                       "--grpc-bind", grpc_address)
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway ready")

    # HTTP: the client's span is the parent of the gateway's, which is the parent of the worker's.
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    answer = requests.post(f"{url}/v1/models/echo/predict", json={"inputs": ["traced"]}, timeout=10,
                           headers={"traceparent": traceparent, "tracestate": "vendor=1", "X-Request-ID": "t-1"})
    assert answer.status_code == 200 and answer.json()["outputs"] == ["traced"]
    wanted = {"POST /v1/models/{model}/predict", "ddml.broker.queue", "ddml.worker.batch", "ddml.worker.forward"}
    spans = wait_until(lambda: (found := collector.spans(TRACE_ID)) and wanted <= {s["name"] for s in found} and found,
                       timeout_s=30, what="the trace's four spans at the collector")
    named = _by_name(spans)
    gateway_span = named["POST /v1/models/{model}/predict"]
    assert gateway_span["service"] == "ddml-gateway" and gateway_span["parent"] == CLIENT_SPAN
    assert gateway_span["attributes"]["ddml.request_id"].string_value == "t-1"
    assert gateway_span["attributes"]["http.response.status_code"].int_value == 200
    for name in ("ddml.broker.queue", "ddml.worker.batch"):
        assert named[name]["service"] == "ddml-worker" and named[name]["parent"] == gateway_span["span_id"], name
    assert named["ddml.worker.forward"]["parent"] == named["ddml.worker.batch"]["span_id"]
    assert named["ddml.worker.batch"]["attributes"]["ddml.request_id"].string_value.startswith("t-1/")
    queue, batch = named["ddml.broker.queue"], named["ddml.worker.batch"]
    assert queue["start"] <= queue["end"] == batch["start"] <= batch["end"]
    assert gateway_span["start"] <= queue["start"] and batch["end"] <= gateway_span["end"]

    # gRPC: traceparent as metadata, the same chain under the gRPC span.
    import tritonclient.grpc as grpcclient

    grpc_trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"over grpc"]], dtype=object))
    client = grpcclient.InferenceServerClient(grpc_address)
    wait_until(lambda: client.is_server_live(), timeout_s=30, what="the gRPC side")
    result = client.infer("echo", [text], headers={"traceparent": f"00-{grpc_trace}-{CLIENT_SPAN}-01"})
    assert result.as_numpy("OUTPUT")[0][0] == b"over grpc"
    wanted = {"inference.GRPCInferenceService/ModelInfer", "ddml.worker.batch", "ddml.worker.forward"}
    spans = wait_until(lambda: (found := collector.spans(grpc_trace)) and wanted <= {s["name"] for s in found} and found,
                       timeout_s=30, what="the gRPC trace's spans")
    named = _by_name(spans)
    rpc = named["inference.GRPCInferenceService/ModelInfer"]
    assert rpc["parent"] == CLIENT_SPAN and named["ddml.worker.batch"]["parent"] == rpc["span_id"]

    # Without a traceparent the gateway starts a trace of its own, and the worker's spans join it.
    requests.post(f"{url}/v1/models/echo/predict", json={"inputs": ["untraced"]}, timeout=10).raise_for_status()


def test_without_gateway_spans_the_callers_context_still_reaches_the_worker(stack, collector):
    """The gateway exports nothing (no --otlp-endpoint) but carries the context: the worker's spans
    are children of the client's own span."""
    stack.start_broker()
    stack.start_worker("--model", "echo", "--otlp-endpoint", collector.url)
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")
    wait_until(lambda: http_ready(url), timeout_s=60, what="the gateway ready")
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4736"
    answer = requests.post(f"{url}/v1/models/echo/predict", json={"inputs": ["carried"]}, timeout=10,
                           headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    assert answer.status_code == 200
    spans = wait_until(lambda: (found := collector.spans(trace_id)) and len(found) >= 3 and found,
                       timeout_s=30, what="the worker's spans")
    named = _by_name(spans)
    assert set(named) == {"ddml.broker.queue", "ddml.worker.batch", "ddml.worker.forward"}
    assert named["ddml.worker.batch"]["parent"] == CLIENT_SPAN == named["ddml.broker.queue"]["parent"]
    # A malformed traceparent is ignored (W3C): the request is answered, and no span claims it.
    bad = requests.post(f"{url}/v1/models/echo/predict", json={"inputs": ["x"]}, timeout=10,
                        headers={"traceparent": "00-nothex-00f067aa0ba902b7-01"})
    assert bad.status_code == 200


def test_a_continuous_worker_exports_the_batch_and_a_forward_span_for_each_pass_of_the_request(
        stack, collector, tiny_bert):
    """The built-in text models batch continuously by default: a request's inputs run in whichever
    passes take them. Its worker.batch span lasts until its last input is answered, and each pass
    that ran any of them is a worker.forward span under it."""
    stack.start_broker()
    stack.start_worker("--model", "tiny", "--model-path", str(tiny_bert), "--task", "embedding",
                       "--otlp-endpoint", collector.url)
    _, url = stack.start_gateway("--workers", "1", "--threads", "4")
    wait_until(lambda: http_ready(url, "/v2/models/tiny/ready"), timeout_s=60, what="the text model ready")
    trace_id = "7bf92f3577b34da6a3ce929d0e0e4736"
    answer = requests.post(f"{url}/v1/models/tiny/predict", timeout=30,
                           json={"inputs": ["the quick brown fox", "lazy dog", "model serving batch"]},
                           headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    assert answer.status_code == 200 and len(answer.json()["outputs"]) == 3

    def complete():
        found = collector.spans(trace_id)
        names = [span["name"] for span in found]
        return found if {"ddml.broker.queue", "ddml.worker.batch", "ddml.worker.forward"} <= set(names) else None

    spans = wait_until(complete, timeout_s=30, what="the continuous worker's spans")
    [queue] = [s for s in spans if s["name"] == "ddml.broker.queue"]
    [batch] = [s for s in spans if s["name"] == "ddml.worker.batch"]
    forwards = [s for s in spans if s["name"] == "ddml.worker.forward"]
    assert queue["parent"] == batch["parent"] == CLIENT_SPAN
    assert batch["attributes"]["ddml.continuous"].bool_value
    assert all(f["parent"] == batch["span_id"] and batch["start"] <= f["start"] <= f["end"] <= batch["end"]
               for f in forwards), forwards
    assert sum(f["attributes"]["ddml.inputs"].int_value for f in forwards) == 3  # every input, in some pass
    assert max(f["end"] for f in forwards) == batch["end"]  # it ends with the pass of its last input
