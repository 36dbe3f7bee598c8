"""The gateway's Falcon app, on an event loop (falcon.asgi). gunicorn runs it as
'gateway.app:get_app()' with the uvicorn worker (gateway/gunicorn_conf.py).

create_app() wires routes to an AsyncBrokerClient (or anything with its async request() and
status()); get_app() builds one from DDML_* environment variables. The app is a GatewayApp: Falcon's,
answering the predict route's usual request itself (gateway/hot_path.py). Nothing here creates a zmq
context: the client does that in each gunicorn worker process's own event loop (the lifespan's
startup, or its first request), after the fork, so --preload is safe too. The lifespan's shutdown
closes it once uvicorn has answered the requests in flight.
"""

from __future__ import annotations

import falcon
import falcon.asgi

from ddml_common import tracing
from ddml_common.keys import ClientKeys
from gateway import cohere, management, openinference, tei
from gateway.async_catalog import AsyncCatalog
from gateway.async_transport import AsyncBrokerClient
from gateway.auth import BearerAuth, load_tokens
from gateway.broker_client import BrokerError
from gateway.config import GatewayConfig
from gateway.metrics import MetricsResource
from gateway.errors import handle_broker_error, handle_unexpected, serialize_falcon_error
from gateway.hot_path import ROUTE, GatewayApp
from gateway.openai_api import EmbeddingsResource, RerankResource
from gateway.middleware import RequestMiddleware
from gateway.resources import (
    HealthResource,
    ModelsResource,
    PredictResource,
    ReadyResource,
    StatusResource,
)


class BrokerLifespan:
    """Connect to the brokers when a worker process starts serving, close at its end."""

    def __init__(self, broker):
        self._broker = broker

    async def process_startup(self, scope, event) -> None:
        start = getattr(self._broker, "start", None)
        if start is not None:
            await start()

    async def process_shutdown(self, scope, event) -> None:
        close = getattr(self._broker, "close", None)
        if close is not None:
            await close()


def create_app(broker: AsyncBrokerClient, config: GatewayConfig | None = None) -> falcon.asgi.App:
    config = config or GatewayConfig()
    middleware: list = [RequestMiddleware(), BrokerLifespan(broker)]  # limits, trace, metrics, request id: one
    admin_tokens = load_tokens(config.admin_key_file) if config.admin_key_file else None
    if config.api_key_file:  # an admin key is a key too
        middleware.append(BearerAuth(load_tokens(config.api_key_file) + (admin_tokens or []),
                                     protect_metrics=config.protect_metrics))
    app = GatewayApp(middleware=middleware)
    app.req_options.auto_parse_form_urlencoded = False
    catalog = AsyncCatalog(broker)  # models, metadata and versions, cached briefly
    predict = PredictResource(broker, config, catalog)
    app.add_route(ROUTE, predict)
    if not config.api_key_file:  # its usual request answered without Falcon's machinery (gateway/hot_path.py)
        app.predict = predict
    app.add_route("/v1/embeddings", EmbeddingsResource(broker, config, catalog))
    app.add_route("/v1/rerank", RerankResource(broker, config, catalog))
    app.add_route("/v1/models", ModelsResource(broker))
    management.add_routes(app, broker, config, admin_tokens)  # /v2/repository/..., /v1/models/{model}[/replicas]
    app.add_route("/v1/status", StatusResource(broker))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(broker))
    app.add_route("/metrics", MetricsResource())
    openinference.add_routes(app, broker, config, catalog)
    cohere.add_routes(app, broker, config, catalog)  # Cohere's /v2/rerank, /v1/embed, /v2/embed
    tei.add_routes(app, broker, config, catalog)  # text-embeddings-inference's API, at / and /tei/{model}
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(BrokerError, _on_broker_error)
    app.set_error_serializer(serialize_falcon_error)
    return app


async def _on_broker_error(req, resp, error, params) -> None:
    handle_broker_error(req, resp, error, params)


async def _on_unexpected(req, resp, error, params) -> None:
    handle_unexpected(req, resp, error, params)


def get_app() -> falcon.asgi.App:
    config = GatewayConfig.from_env()
    tracing.configure(config.otlp_endpoint, "ddml-gateway")
    curve = ClientKeys.from_files(config.curve_server_key, config.curve_secret_key)
    return create_app(AsyncBrokerClient(config.broker, curve=curve), config)
