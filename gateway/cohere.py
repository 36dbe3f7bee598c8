"""Cohere's rerank and embed APIs, as its V1 and V2 clients call them (`cohere.Client`, `cohere.ClientV2`).

    POST /v2/rerank  {"model", "query", "documents": [str | {"text"}], "top_n"?, "max_tokens_per_doc"?,
                      "return_documents"?}
         -> {"id", "results": [{"index", "relevance_score", "document"?: {"text"}}], "meta"}, best first
    POST /v1/embed   {"model", "texts": [str], "input_type"?, "embedding_types"?, "truncate"?}
         -> {"id", "response_type": "embeddings_floats", "embeddings": [[f32]], "texts", "meta"}
    POST /v2/embed   the same body -> {"id", "response_type": "embeddings_by_type",
                                      "embeddings": {"float": [[f32]]}, "texts", "meta"}

/v1/rerank is gateway/openai_api.py's RerankResource, which takes both clients' bodies already.
The vectors are the model's own, as /v1/models/{model}/predict gives them. "embedding_types" may
hold only "float" (others are refused, 400). "truncate" is Cohere's: "END" (its default) cuts the
end of an over-long text, "START" its start, "NONE" refuses it. "input_type" is accepted and not
used: ddml's models have one way to embed (a prompt comes from the model's own configuration).
"max_tokens_per_doc" is ignored: a document is cut at the model's own limit, with "truncate".
Errors are the gateway's usual shape (gateway/errors.py); Cohere's clients read the status.
"""

from __future__ import annotations

from typing import Any

import falcon
import orjson

from ddml_common import protocol
from gateway.errors import invalid
from gateway.openai_api import RerankResource, _counted, _ModelResource
from gateway.resources import write_document

EMBEDDING_TYPES = ("float",)
_TRUNCATE = {"END": {"truncate": True}, "START": {"truncate": True, "truncation_direction": "left"},
             "NONE": {"truncate": False}}


class RerankV2Resource(RerankResource):
    """/v2/rerank: /v1/rerank's answer, with Cohere's "meta"."""

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        await super().on_post(req, resp)
        document = _loads(resp)
        document["meta"] = {"api_version": {"version": "2"},
                            "billed_units": {"search_units": 1}, "tokens": document.get("usage", {})}
        write_document(req, resp, document)


class EmbedResource(_ModelResource):
    """/v1/embed and /v2/embed: the version says the answer's shape."""

    task = "embedding"
    inputs_param = "texts"

    def __init__(self, *args, version: int):
        super().__init__(*args)
        self._version = version

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, model = await self._body(req)
        texts = body.get("texts")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise invalid("'texts' must be a list of strings", "texts")
        self._check_count(len(texts), "texts")
        types = body.get("embedding_types") or ["float"]
        if not isinstance(types, list) or not all(kind in EMBEDDING_TYPES for kind in types):
            raise invalid(f"'embedding_types' may hold only {', '.join(EMBEDDING_TYPES)}, got {types!r:.80}",
                          "embedding_types")
        truncate = body.get("truncate", "END")
        options = _TRUNCATE.get(truncate.upper()) if isinstance(truncate, str) else None  # (a list: unhashable)
        if options is None:
            raise invalid(f"'truncate' must be NONE, START or END, got {truncate!r:.40}", "truncate")
        outputs = await self._ask(req, model, [{"text": text, "count_tokens": True, **options} for text in texts])
        vectors: list[Any] = []
        tokens = 0
        for output in outputs:
            vector, count = _counted(output, "embedding", model)
            vectors.append(vector)
            tokens += count
        self._catalog.mark_version(resp, model)
        meta = {"api_version": {"version": str(self._version)}, "billed_units": {"input_tokens": tokens}}
        if self._version == 1:
            answer = {"id": req.context.request_id, "response_type": "embeddings_floats", "embeddings": vectors,
                      "texts": texts, "meta": meta}
        else:
            answer = {"id": req.context.request_id, "response_type": "embeddings_by_type",
                      "embeddings": {"float": vectors}, "texts": texts, "meta": meta}
        write_document(req, resp, answer)


def _loads(resp: falcon.Response) -> dict:
    """The document a resource wrote, read back."""
    if resp.content_type == falcon.MEDIA_MSGPACK:
        return protocol.unpack_document(resp.data)
    return orjson.loads(resp.data)


def add_routes(app: falcon.App, broker, config, catalog) -> None:
    app.add_route("/v2/rerank", RerankV2Resource(broker, config, catalog))
    app.add_route("/v1/embed", EmbedResource(broker, config, catalog, version=1))
    app.add_route("/v2/embed", EmbedResource(broker, config, catalog, version=2))
