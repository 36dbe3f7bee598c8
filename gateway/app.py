"""The gateway's Falcon app. gunicorn runs it as 'gateway.app:get_app()'.

create_app() wires routes to a BrokerClient; get_app() builds one from DDML_* environment
variables. Nothing here creates a zmq context: the client does that lazily, in each gunicorn
worker process after fork, so --preload is safe too.
"""

from __future__ import annotations

import falcon

from ddml_common import tracing
from ddml_common.keys import ClientKeys
from gateway import cohere, openinference, tei
from gateway.auth import BearerAuth, load_tokens
from gateway.broker_client import BrokerClient, BrokerError
from gateway.catalog import Catalog
from gateway.config import GatewayConfig
from gateway.metrics import MetricsMiddleware, MetricsResource
from gateway.errors import handle_broker_error, handle_unexpected, serialize_falcon_error
from gateway.openai_api import EmbeddingsResource, RerankResource
from gateway.request_ids import RequestIdMiddleware
from gateway.tracing import TraceMiddleware
from gateway.resources import (
    HealthResource,
    ModelsResource,
    PredictResource,
    ReadyResource,
    StatusResource,
)


def create_app(broker: BrokerClient, config: GatewayConfig | None = None) -> falcon.App:
    config = config or GatewayConfig()
    middleware: list = [TraceMiddleware(), MetricsMiddleware(), RequestIdMiddleware()]
    if config.api_key_file:
        middleware.append(BearerAuth(load_tokens(config.api_key_file), protect_metrics=config.protect_metrics))
    app = falcon.App(middleware=middleware)
    app.req_options.auto_parse_form_urlencoded = False
    catalog = Catalog(broker)  # models, metadata and versions, cached briefly
    app.add_route("/v1/models/{model}/predict", PredictResource(broker, config, catalog))
    app.add_route("/v1/embeddings", EmbeddingsResource(broker, config, catalog))
    app.add_route("/v1/rerank", RerankResource(broker, config, catalog))
    app.add_route("/v1/models", ModelsResource(broker))
    app.add_route("/v1/status", StatusResource(broker))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(broker))
    app.add_route("/metrics", MetricsResource())
    openinference.add_routes(app, broker, config, catalog)
    cohere.add_routes(app, broker, config, catalog)  # Cohere's /v2/rerank, /v1/embed, /v2/embed
    tei.add_routes(app, broker, config, catalog)  # text-embeddings-inference's API, at / and /tei/{model}
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(BrokerError, handle_broker_error)
    app.set_error_serializer(serialize_falcon_error)
    return app


def get_app() -> falcon.App:
    config = GatewayConfig.from_env()
    tracing.configure(config.otlp_endpoint, "ddml-gateway")
    curve = ClientKeys.from_files(config.curve_server_key, config.curve_secret_key)
    return create_app(BrokerClient(config.broker, curve=curve), config)
