"""The routes embedding clients speak, beside /v1/models/{model}/predict: OpenAI's embeddings, and rerank.

    POST /v1/embeddings  {"model", "input": str | [str], "encoding_format"?: "float" | "base64",
                          "dimensions"?: int, "user"?: str}
         -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
             "usage": {"prompt_tokens", "total_tokens"}}
    POST /v1/rerank      {"model", "query", "documents": [str | {"text"}], "top_n"?: int,
                          "return_documents"?: bool, "truncate"?: bool}
         -> {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}],
             "usage": {"total_tokens"}}, best first (Cohere's, Jina's and text-embeddings-inference's)

As OpenAI does, an input longer than the model's limit is refused (400), unless the worker runs
with --auto-truncate (or a rerank request says "truncate": true). Token counts come from the
worker's tokenizer: each text travels as {"text": ..., "count_tokens": true} (a pair as
{"query", "document", "count_tokens"}), and the built-in text models answer {"embedding" | "score",
"tokens"}. "base64" is the float32 vector's little-endian bytes, as OpenAI sends it (its Python
client asks for it by default). "dimensions" keeps the first n numbers of each vector and
normalises it again. The answer's "model" is `name@version` when the version is known, and so is
X-Model-Version. Lists of token ids are refused: they are ids of OpenAI's tokenizer, not of the
model's (LangChain sends them unless told check_embedding_ctx_length=False).

Errors are OpenAI's shape, as everywhere in the gateway (gateway/errors.py).
"""

from __future__ import annotations

import base64
from typing import Any

import falcon
import numpy as np

from ddml_common.protocol import ErrorCode
from gateway.async_catalog import AsyncCatalog
from gateway.async_transport import AsyncBrokerClient
from gateway.broker_client import BrokerError
from gateway.catalog import check_model_name
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from gateway.resources import check_document, parse_document, read_body, write_document

ENCODING_FORMATS = ("float", "base64")


class _ModelResource:
    """What both routes share: the body, the model, the call to the broker."""

    task = ""  # what the route needs the model to do, as the built-in handlers declare it
    inputs_param = ""  # the request field that holds what the model is given

    def __init__(self, broker: AsyncBrokerClient, config: GatewayConfig, catalog: AsyncCatalog):
        self._broker = broker
        self._config = config
        self._catalog = catalog

    async def _body(self, req: falcon.Request) -> tuple[dict, str]:
        body = parse_document(req, await read_body(req, self._config))
        if not isinstance(body, dict):
            raise invalid(f"the body must be an object, got {type(body).__name__}")
        check_document(body, self._config.max_input_chars)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("'model' must name a model (GET /v1/models lists them)", "model")
        check_model_name(model)
        await self._catalog.refresh()
        task = self._catalog.metadata(model).get("task")
        if task is not None and task != self.task:
            raise invalid(f"model {model!r} is a {task} model; {req.path} needs a {self.task} model", "model")
        return body, model

    async def _ask(self, req: falcon.Request, model: str, inputs: list) -> list:
        """The outputs; then the catalog is fresh enough to name the version that answered."""
        try:
            outputs = await self._broker.request(model, inputs, timeout_s=self._config.request_timeout_ms / 1000,
                                                 request_id_prefix=req.context.request_id)
        except BrokerError as error:
            if error.code is ErrorCode.NO_SUCH_MODEL:
                param = "model"
            elif error.code is ErrorCode.BAD_REQUEST:  # the model refused an input (too long, say)
                param = self.inputs_param
            else:
                raise
            raise GatewayError(error.code, error.message, param, error.retry_after_s) from error
        await self._catalog.refresh()
        return outputs

    def _check_count(self, count: int, param: str) -> None:
        if count == 0:
            raise invalid(f"'{param}' must not be empty", param)
        if count > self._config.max_inputs:
            raise invalid(f"{count} items in '{param}' exceed the limit of {self._config.max_inputs}", param)


class EmbeddingsResource(_ModelResource):
    task = "embedding"
    inputs_param = "input"

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, model = await self._body(req)
        texts = _texts(body.get("input"))
        self._check_count(len(texts), "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ENCODING_FORMATS:
            raise invalid(f"'encoding_format' must be float or base64, got {encoding!r:.40}", "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
                raise invalid(f"'dimensions' must be a positive integer, got {dimensions!r:.40}", "dimensions")
            size = _embedding_size(self._catalog.metadata(model))
            if size is not None and dimensions > size:
                raise invalid(f"'dimensions' is {dimensions}, more than model {model!r} has ({size})", "dimensions")
        outputs = await self._ask(req, model, [{"text": text, "count_tokens": True} for text in texts])
        data, tokens = [], 0
        for index, output in enumerate(outputs):
            vector, count = _counted(output, "embedding", model)
            vector = np.asarray(vector, dtype=np.float32).reshape(-1)
            if dimensions is not None:
                if dimensions > vector.shape[0]:
                    raise invalid(f"'dimensions' is {dimensions}, more than model {model!r} has "
                                  f"({vector.shape[0]})", "dimensions")
                vector = vector[:dimensions]
                norm = float(np.linalg.norm(vector))
                vector = vector / norm if norm > 0 else vector
            embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
            tokens += count
        name = self._catalog.mark_version(resp, model)
        write_document(req, resp, {"object": "list", "data": data, "model": name,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class RerankResource(_ModelResource):
    task = "rerank"
    inputs_param = "documents"

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, model = await self._body(req)
        query = body.get("query")
        if not isinstance(query, str):
            raise invalid(f"'query' must be a string, got {type(query).__name__}", "query")
        documents = body.get("documents")
        if not isinstance(documents, list):
            raise invalid("'documents' must be a list of strings (or of {\"text\": ...} objects)", "documents")
        self._check_count(len(documents), "documents")
        texts = [_document_text(document, index) for index, document in enumerate(documents)]
        top_n = body.get("top_n")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise invalid(f"'top_n' must be a positive integer, got {top_n!r:.40}", "top_n")
        options: dict[str, Any] = {"count_tokens": True}
        for flag in ("return_documents", "truncate"):
            if not isinstance(body.get(flag, False), bool):
                raise invalid(f"'{flag}' must be true or false, got {body[flag]!r:.40}", flag)
        if "truncate" in body:
            options["truncate"] = body["truncate"]
        outputs = await self._ask(req, model, [{"query": query, "document": text, **options} for text in texts])
        scored, tokens = [], 0
        for index, output in enumerate(outputs):
            score, count = _counted(output, "score", model)
            scored.append((float(score), index))
            tokens += count
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        results = []
        for score, index in scored[:top_n]:
            result: dict[str, Any] = {"index": index, "relevance_score": score}
            if body.get("return_documents", False):
                result["document"] = {"text": texts[index]}
            results.append(result)
        name = self._catalog.mark_version(resp, model)
        write_document(req, resp, {"id": req.context.request_id, "model": name, "results": results,
                                   "usage": {"total_tokens": tokens}})


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise invalid(f"'input' must be a string or a list of strings, got {type(value).__name__}", "input")
    for item in value:
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise invalid("'input' holds token ids, which ddml does not take (they would be another tokenizer's); "
                          "send the text itself (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))",
                          "input")
        if not isinstance(item, str):
            raise invalid(f"'input' must be a string or a list of strings; it holds a {type(item).__name__}",
                          "input")
    return value


def _document_text(document: Any, index: int) -> str:
    if isinstance(document, dict):
        document = document.get("text")
    if not isinstance(document, str):
        raise invalid(f"documents[{index}] must be a string or {{\"text\": string}}", "documents")
    return document


def _counted(output: Any, key: str, model: str) -> tuple[Any, int]:
    """The value and token count of a built-in text model's output, {key: value, "tokens": n}."""
    if not (isinstance(output, dict) and key in output and isinstance(output.get("tokens"), int)):
        raise BrokerError(ErrorCode.BAD_REQUEST, f"model {model!r} did not answer with {{{key!r}, 'tokens'}}; this "
                                                 "route needs a built-in text model (--model-path)")
    return output[key], output["tokens"]


def _embedding_size(metadata: dict) -> int | None:
    """The vector size a model declared (its EMBEDDING output's last dimension), if it did."""
    for output in metadata.get("outputs") or []:
        if output.get("name") == "EMBEDDING" and output.get("shape") and output["shape"][-1] > 0:
            return int(output["shape"][-1])
    return None
