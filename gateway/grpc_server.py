"""KServe v2 over gRPC: inference.GRPCInferenceService, as tritonclient.grpc and KServe's InferenceGRPCClient call it.

`ddml-gateway --grpc-bind HOST:PORT` serves ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelConfig, ModelInfer, and the model repository's RepositoryIndex,
RepositoryModelLoad and RepositoryModelUnload (the management API, gateway/management.py: the
same steps and the same admin key, as metadata) (the other RPCs of Triton's service answer
UNIMPLEMENTED). Inputs come as raw_input_contents (what tritonclient sends) or as typed
contents; outputs go back as raw_output_contents, which is what InferResult.as_numpy() reads.

The work is the HTTP /v2 routes' own (gateway/openinference.py: the same parsing, checks, limits,
rows to the broker and tensors back); this module only translates protobuf to and from that. The
same --api-key-file tokens, as metadata `authorization: Bearer TOKEN` (ServerLive and ServerReady
stay open, as the HTTP probes do); the same request ids (metadata `x-request-id`, else the
request's id, echoed back in the response's id and as trailing metadata `x-request-id`); the same
deadline rules (parameters.timeout, cut to the call's own gRPC deadline); the same metrics
(ddml_http_requests and its duration, with route "grpc:/inference.GRPCInferenceService/RPC",
method POST and the HTTP status the error would have had); traceparent and tracestate metadata as
on HTTP; TLS with the gateway's --certfile and --keyfile. --max-body-bytes caps a received message.

Errors go through the gateway's one error path (gateway/errors.py: http_error() picks the status
and Retry-After, v2_body() the message, as for /v2 over HTTP), and then one table,
GRPC_CODE_BY_HTTP_STATUS, picks the gRPC status code for that HTTP status.

Where it runs: in its own process, `python -m gateway.grpc_server`, which the gunicorn master
starts once it is ready (gateway/gunicorn_conf.py) with the gateway's flags in its environment,
and stops on exit. grpcio does not survive fork, and gunicorn forks its workers, so no gunicorn
process imports grpc. If the gRPC process dies, the master stops the whole gateway, so that its
supervisor restarts both sides together.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from concurrent import futures

import falcon
import grpc
import numpy as np
from google.protobuf import json_format

from ddml_common import tracing
from ddml_common.cli import configure_logging, stop_on_signals
from ddml_common.keys import ClientKeys
from ddml_common.protocol import MAX_MESSAGE_BYTES, ErrorCode
from gateway import management, openinference
from gateway.auth import check_authorization, load_tokens
from gateway.broker_client import BrokerClient, BrokerError
from gateway.catalog import Catalog
from gateway.config import GatewayConfig, build_parser, graceful_timeout_s
from gateway.errors import http_error, invalid, v2_body
from gateway.metrics import HTTP_DURATION, HTTP_REQUESTS
from gateway.proto import grpc_service_pb2 as pb
from gateway.proto import grpc_service_pb2_grpc as pb_grpc
from gateway.proto import model_config_pb2
from gateway.request_ids import valid_request_id

logger = logging.getLogger("gateway.grpc")

SERVICE = "inference.GRPCInferenceService"
GRPC_CODE_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})  # the probes, as on HTTP
# Typed contents (InferTensorContents) by datatype, for clients that send no raw_input_contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def grpc_code(status: int) -> grpc.StatusCode:
    return GRPC_CODE_BY_HTTP_STATUS.get(status, grpc.StatusCode.INTERNAL)


def request_document(request: pb.ModelInferRequest) -> tuple[dict, bytes]:
    """A ModelInferRequest as the HTTP route's JSON header and binary tail (openinference.infer's input)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for position, tensor in enumerate(request.inputs):
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[position])}
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise invalid(f"input '{tensor.name}' of datatype {tensor.datatype!r:.20} must come as "
                                   "raw_input_contents")
            values = list(getattr(tensor.contents, field))
            entry["data"] = [openinference._text(v) for v in values] if tensor.datatype == "BYTES" else values
        inputs.append(entry)
    document = {"inputs": inputs, "parameters": parameters_of(request.parameters)}
    return document, b"".join(raw)


def parameters_of(parameters) -> dict:
    """map<string, InferParameter> as plain values."""
    return {name: getattr(value, value.WhichOneof("parameter_choice") or "bool_param")
            for name, value in parameters.items()}


def infer_response(model: str, version: str | None, answer_id: str, tensors: dict, wanted: list[str]
                   ) -> pb.ModelInferResponse:
    """The tensors, in the order asked for (every output, in the model's order, when none is named)."""
    names = wanted or list(tensors)
    response = pb.ModelInferResponse(model_name=model, model_version=version or "", id=answer_id)
    for name in names:
        if name not in tensors:
            raise invalid(f"model '{model}' has no output '{name}' (it has {', '.join(tensors)})")
        datatype, array = tensors[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(
            openinference._bytes_tensor_to_raw(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes())
    return response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, broker: BrokerClient, config: GatewayConfig, tokens: list[bytes] | None,
                 admin_tokens: list[bytes] | None = None):
        self._broker = broker
        self._catalog = Catalog(broker)
        self._config = config
        self._tokens = tokens
        self._admin = management.AdminKeys(admin_tokens)

    # ------------------------------------------------------------------ the RPCs

    def ServerLive(self, request, context):
        return self._serve("ServerLive", context, lambda request_id: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request, context):
        def ready(request_id):
            try:
                return pb.ServerReadyResponse(ready=bool(self._catalog.status()["workers"]))
            except BrokerError:
                return pb.ServerReadyResponse(ready=False)

        return self._serve("ServerReady", context, ready)

    def ModelReady(self, request, context):
        def ready(request_id):
            try:
                openinference.model_metadata(self._catalog, request.name, request.version or None)
                return pb.ModelReadyResponse(ready=True)
            except BrokerError:
                return pb.ModelReadyResponse(ready=False)

        return self._serve("ModelReady", context, ready)

    def ServerMetadata(self, request, context):
        return self._serve("ServerMetadata", context, lambda request_id: pb.ServerMetadataResponse(
            name=openinference.SERVER_NAME, version=openinference.SERVER_VERSION,
            extensions=openinference.EXTENSIONS))

    def ModelMetadata(self, request, context):
        return self._serve("ModelMetadata", context, lambda request_id: json_format.ParseDict(
            openinference.model_metadata(self._catalog, request.name, request.version or None),
            pb.ModelMetadataResponse()))

    def ModelConfig(self, request, context):
        return self._serve("ModelConfig", context, lambda request_id: pb.ModelConfigResponse(
            config=json_format.ParseDict(openinference.model_config(self._catalog, request.name, request.version or None),
                                         model_config_pb2.ModelConfig())))

    def ModelInfer(self, request, context):
        def infer(request_id):
            model, version = request.model_name, request.model_version or None
            document, binary = request_document(request)
            remaining_s = context.time_remaining()  # None without a gRPC deadline
            tensors = openinference.infer(self._broker, self._catalog, self._config, model, version, document, binary,
                                          request_id, most_s=remaining_s)
            served = f"{model}@{version}" if version else model
            # As on HTTP: the answer's id is x-request-id when given, else the request's own id.
            given = any(key == "x-request-id" for key, _ in context.invocation_metadata())
            answer_id = request_id if given else (request.id or request_id)
            return infer_response(model, self._catalog.version_served(served), answer_id, tensors,
                                  [output.name for output in request.outputs])

        return self._serve("ModelInfer", context, infer, body_id=request.id)

    # ------------------------------------------------------------------ the model repository (management API)

    def RepositoryIndex(self, request, context):
        def index(request_id):
            entries = management.repository_index(self._views(), request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

        return self._serve("RepositoryIndex", context, index)

    def RepositoryModelLoad(self, request, context):
        def load(request_id):
            model = self._managed(context, request.model_name)
            override = management.load_plan(self._views(), model, time.time_ns())
            if override is not None:
                self._send(model, override)
            self._wait_until(lambda views: management.load_done(views, model), f"model '{model}' was not loaded")
            return pb.RepositoryModelLoadResponse()

        return self._serve("RepositoryModelLoad", context, load)

    def RepositoryModelUnload(self, request, context):
        def unload(request_id):
            model = self._managed(context, request.model_name)
            self._send(model, management.unload_plan(self._views(), model, time.time_ns()))
            self._wait_until(lambda views: management.unload_done(views, model), f"model '{model}' was not unloaded")
            return pb.RepositoryModelUnloadResponse()

        return self._serve("RepositoryModelUnload", context, unload)

    def _managed(self, context, model: str) -> str:
        self._admin.check(dict(context.invocation_metadata()).get("authorization"))
        management.check_model_name(model)
        return model

    def _views(self) -> list[dict]:
        return management.views_of(self._broker.status(timeout_s=1.0))

    def _send(self, model: str, override) -> None:
        self._broker.status(timeout_s=2.0, every_broker=True, overrides={model: override.to_wire()})

    def _wait_until(self, done, what: str) -> None:
        """As management.Management.wait_until, on this thread."""
        wait_s = self._config.request_timeout_ms / 1000
        deadline_at = time.monotonic() + wait_s
        while not done(self._views()):
            if time.monotonic() >= deadline_at:
                raise BrokerError(ErrorCode.TIMEOUT, f"{what} within {wait_s:g} s; it goes on")
            threading.Event().wait(management.POLL_S)

    # ------------------------------------------------------------------ what every RPC shares

    def _serve(self, rpc: str, context, work, body_id: str = ""):
        """Auth, request id, trace, metrics and the error table around one RPC's work(request_id)."""
        started_at = time.perf_counter()
        metadata = dict(context.invocation_metadata())
        status, error = 200, None
        span = tracing.ServerSpan()
        trace = tracing.incoming(metadata.get(tracing.TRACEPARENT_HEADER), metadata.get(tracing.TRACESTATE_HEADER))
        tracing.set_current(span.start(f"{SERVICE}/{rpc}", trace, {"rpc.system": "grpc", "rpc.method": rpc}))
        request_id = metadata.get("x-request-id")
        try:
            if request_id is not None and not valid_request_id(request_id):
                raise invalid(f"x-request-id must be 1 to 128 printable ASCII characters without spaces, got "
                              f"{request_id!r:.60}", param="x-request-id")
            request_id = request_id or (body_id if valid_request_id(body_id) else uuid.uuid4().hex)
            context.set_trailing_metadata((("x-request-id", request_id),))
            if self._tokens is not None and rpc not in _OPEN_RPCS:
                check_authorization(self._tokens, metadata.get("authorization"))
            return work(request_id)
        except BrokerError as failure:  # the gateway's own (GatewayError) and the broker's, as on HTTP
            answer = http_error(failure)
            status, error = answer.status, v2_body(answer)["error"]
            if answer.retry_after_s is not None:
                context.set_trailing_metadata((("x-request-id", str(request_id)),
                                               ("retry-after", str(answer.retry_after_s))))
        except falcon.HTTPError as failure:  # the management API's 403 and 409 (gateway/management.py)
            status, error = failure.status_code, failure.description or failure.title
        except Exception as failure:  # a bug: answered, logged, and the process goes on
            logger.exception("gRPC %s failed (request %s)", rpc, request_id, extra={"request_id": str(request_id)})
            status, error = 500, f"INTERNAL: {type(failure).__name__}: {failure}"[:1000]
        finally:
            tracing.set_current(None)
            route = f"grpc:/{SERVICE}/{rpc}"
            HTTP_REQUESTS.labels(route, "POST", str(status)).inc()
            HTTP_DURATION.labels(route, "POST", str(status)).observe(time.perf_counter() - started_at)
            span.end(f"{SERVICE}/{rpc}", {"rpc.grpc.status_code": grpc_code(status).value[0] if error else 0,
                                          "ddml.request_id": str(request_id)}, error=error if status >= 500 else None)
        if status >= 500:
            logger.warning("request %s: gRPC %s -> %s: %s", request_id, rpc, grpc_code(status).name, error,
                           extra={"request_id": str(request_id)})
        context.abort(grpc_code(status), error)


def build_server(config: GatewayConfig, bind: str, threads: int, certfile: str | None = None,
                 keyfile: str | None = None) -> tuple[grpc.Server, int, BrokerClient]:
    """A started-ready (not yet started) server on `bind`; returns it, the port it bound, and its client."""
    curve = ClientKeys.from_files(config.curve_server_key, config.curve_secret_key)
    broker = BrokerClient(config.broker, curve=curve)
    admin_tokens = load_tokens(config.admin_key_file) if config.admin_key_file else None
    tokens = load_tokens(config.api_key_file) + (admin_tokens or []) if config.api_key_file else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", config.max_body_bytes),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(broker, config, tokens, admin_tokens), server)
    if certfile and keyfile:
        with open(keyfile, "rb") as key, open(certfile, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port(bind, credentials)
    else:
        port = server.add_insecure_port(bind)
    return server, port, broker


def main() -> None:
    """`python -m gateway.grpc_server`: the gateway's flags from the environment, as gunicorn's processes read them."""
    args = build_parser().parse_args([])
    configure_logging(args.log_level, args.log_format)
    config = GatewayConfig.from_args(args)
    if not config.grpc_bind:
        sys.exit("gateway.grpc_server: no --grpc-bind (DDML_GATEWAY_GRPC_BIND) given")
    tracing.configure(config.otlp_endpoint, "ddml-gateway")
    try:
        server, port, broker = build_server(config, config.grpc_bind, config.grpc_threads, args.certfile, args.keyfile)
    except RuntimeError as error:  # grpc's "Failed to bind"
        sys.exit(f"gateway.grpc_server: cannot serve on {config.grpc_bind}: {error}")
    stop = threading.Event()
    stop_on_signals(stop)
    server.start()
    scheme = "TLS" if args.certfile else "plaintext"
    print(f"grpc ready: {SERVICE} on {config.grpc_bind} (port {port}, {scheme})", flush=True)
    parent = os.getppid()
    while not stop.is_set():  # the main thread only reads it (see stop_on_signals)
        time.sleep(0.25)
        if os.getppid() != parent:  # the gunicorn master died without stopping us (SIGKILL)
            logger.warning("the gateway's master process is gone; stopping")
            break
    server.stop(grace=graceful_timeout_s(args)).wait()
    broker.close()
    tracing.shutdown()


if __name__ == "__main__":
    main()
