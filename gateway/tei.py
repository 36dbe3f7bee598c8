"""Hugging Face text-embeddings-inference's HTTP API (TEI), as TEI answers it, for every model served.

Every model has its own base URL, /tei/{model}, and the same routes sit at the root for the model
that --default-model (--default-rerank-model, --default-classify-model) names, or else the only live
model of the task. Where neither decides, the answer is 400 naming the choices.

    POST /embed        {"inputs": str | [str], "normalize"?: true, "truncate"?, "truncation_direction"?:
                        "Left" | "Right", "prompt_name"?, "dimensions"?}       -> [[f32, ...], ...]
    POST /predict      {"inputs": "s" | ["s"] | ["a", "b"] (one pair) | [["a"], ["b", "c"]] (a batch of
                        texts and pairs; a pair is tokenizer(text, text_pair), for NLI cross-encoders),
                        "truncate"?, "truncation_direction"?, "raw_scores"?: false}
                                                    -> [{"score", "label"}] or, for a batch, [[...]]
    POST /rerank       {"query", "texts": [str], "truncate"?, "truncation_direction"?, "raw_scores"?,
                        "return_text"?}                    -> [{"index", "text"?, "score"}], best first
    POST /embed_all    {"inputs", "truncate"?, "truncation_direction"?, "prompt_name"?}
                                                    -> [[[f32, ...] per token] per input]
    POST /similarity   {"inputs": {"source_sentence", "sentences": [str]}, "parameters"?: {"truncate",
                        "truncation_direction", "prompt_name"}}                 -> [cosine, ...]
    POST /tokenize     {"inputs": str | [str], "add_special_tokens"?: true, "prompt_name"?}
                                    -> [[{"id", "text", "special", "start", "stop"}]], byte offsets
    POST /decode       {"ids": [int] | [[int]], "skip_special_tokens"?: true}  -> [str]
    GET  /info         {"model_id", "model_sha", "model_dtype", "model_type": {"embedding": {"pooling"}}
                        | {"classifier" | "reranker": {"id2label", "label2id"}}, "max_input_length",
                        "max_client_batch_size", "version", ...}
    GET  /health, GET /   200 with an empty body while a worker serves the model, else 503
    POST /             as /predict for a classifier, /rerank for a reranker, /embed otherwise; at the
                        root the body decides: "query" with "texts" is a rerank, "inputs" holding
                        "source_sentence" a similarity, anything else an embedding (a classification
                        when --default-model is a classifier). /tei/{model} also takes the similarity
                        body on POST. POST /invocations is the same as POST /.

Unknown fields are ignored, as TEI ignores them. The options the worker must apply (normalize,
truncation, prompt_name, raw_scores, tokenize, decode) travel as per-input options of the built-in
text models (worker/models/hf_text.py); /embed asks for raw vectors and cuts them to `dimensions`
and normalises them here, in TEI's order. /embed_all answers every token's last hidden state
(before pooling). /embed_sparse is for SPLADE models, which ddml does not serve: 424.

Errors are TEI's {"error": message, "error_type": "Validation" | "Empty" | "Backend" | "Overloaded" |
"Unhealthy"}, with TEI's statuses; tei_error() derives them from the gateway's one ErrorCode table.
Answers carry TEI's timing headers in whole milliseconds. x-total-time and x-compute-time are the
gateway's wall time for the request; the others are the figures the request asks the broker for
(Request.timings, docs/protocol.md), each the longest of its inputs': x-queue-time the time queued at
the broker, x-tokenization-time the worker's tokenisation (a continuous worker's prepare(); a batch
worker tokenises inside its forward pass, and reports 0), x-inference-time the forward pass. Each is at
most x-total-time (a guard against clocks of different hosts that run at different rates).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import falcon
import numpy as np
import orjson

from ddml_common.protocol import ErrorCode
from gateway.async_catalog import AsyncCatalog
from gateway.async_transport import AsyncBrokerClient
from gateway.broker_client import BrokerError
from gateway.catalog import split_version
from gateway.config import GatewayConfig
from gateway.errors import http_error
from gateway.resources import check_document, read_body

VERSION = "ddml-0.1.0"  # /info's "version": the server's, which is ddml's
_ROUTES = ("embed", "embed_all", "embed_sparse", "predict", "rerank", "similarity", "tokenize", "decode")
_TASK_OF_ROUTE = {"embed": "embedding", "similarity": "embedding", "predict": "classification",
                  "rerank": "rerank", "embed_all": "embedding", "embed_sparse": "embedding"}
_MODEL_TYPE = {"embedding": "embedding", "classification": "classifier", "rerank": "reranker"}
_TEI_POOLING = {"lasttoken": "last_token"}


class TEIError(Exception):
    """An error answered in TEI's shape, with the status TEI gives it."""

    def __init__(self, status: int, error_type: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.error_type, self.message, self.retry_after_s = status, error_type, message, retry_after_s


def tei_error(error: BrokerError) -> TEIError:
    """The TEI form of a gateway error: its status and Retry-After from the one table (gateway/errors.py),
    turned into TEI's: invalid input is 422 Validation, a full queue 429 Overloaded, no worker 503
    Unhealthy, a model's failure 424 Backend. Statuses TEI has no word for (401, 404, 415, 504) stay."""
    http = http_error(error)
    status, message = http.status, http.message
    if status == 400:
        return TEIError(422, "Validation", f"Input validation error: {message.removeprefix('InputError: ')}")
    if status == 413:
        return TEIError(413, "Validation", f"Input validation error: {message}")
    if error.code is ErrorCode.OVERLOADED:
        return TEIError(429, "Overloaded", f"Model is overloaded: {message}", http.retry_after_s)
    if status == 503:
        return TEIError(503, "Unhealthy", message, http.retry_after_s)
    if status == 500:
        return TEIError(424, "Backend", f"Backend error: {message}")
    return TEIError(status, "Backend" if status >= 500 else "Validation", message)


def _write_error(resp: falcon.Response, error: TEIError) -> None:
    resp.status = error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": error.message, "error_type": error.error_type})
    if error.retry_after_s is not None:
        resp.set_header("Retry-After", str(error.retry_after_s))


async def _answering(resp: falcon.Response, work: Callable[[], Awaitable[None]]) -> None:
    """Run a route; its errors, the broker's and TEI's own, answer in TEI's shape."""
    try:
        await work()
    except BrokerError as error:
        _write_error(resp, tei_error(error))
    except TEIError as error:
        _write_error(resp, error)


def _invalid(message: str) -> TEIError:
    return TEIError(422, "Validation", message)


def _empty(field: str) -> TEIError:
    return TEIError(400, "Empty", f"`{field}` cannot be empty")


class TEI:
    """The routes, for one model chosen per request (by URL, or by the defaults at the root)."""

    def __init__(self, broker: AsyncBrokerClient, config: GatewayConfig, catalog: AsyncCatalog):
        self._broker = broker
        self._config = config
        self._catalog = catalog

    # ------------------------------------------------------------------ which model

    def _live(self) -> dict[str, dict]:
        """name -> metadata of every model a live worker serves (versions left out)."""
        models = self._catalog.status()["models"]
        return {name: info.get("metadata") or {} for name, info in models.items()
                if info.get("workers") and split_version(name)[1] is None}

    def root_model(self, task: str | None) -> str:
        """The model a root route uses for a task (None: any task, for /info, /tokenize, ...)."""
        config = self._config
        named = {"rerank": config.default_rerank_model, "classification": config.default_classify_model}.get(task)
        if named:
            return named
        if config.default_model and (task in (None, "embedding")
                                     or self._catalog.metadata(config.default_model).get("task") == task):
            return config.default_model
        live = self._live()
        fits = sorted(name for name, metadata in live.items() if metadata.get("task") in ((task,) if task else _MODEL_TYPE))
        if len(fits) == 1:
            return fits[0]
        flag = {"rerank": "--default-rerank-model", "classification": "--default-classify-model"}.get(task,
                                                                                                   "--default-model")
        what = f"a {task} model" if task else "a text model"
        choices = ", ".join(fits) if fits else "none is live"
        raise TEIError(400, "Validation", f"no model is chosen for this route: the gateway has no {flag} and "
                                          f"{'no' if not fits else 'more than one'} live {what} ({choices}); "
                                          "name one in the URL, /tei/MODEL/..., or start the gateway with "
                                          f"{flag}")

    def task_of(self, model: str) -> str | None:
        return self._catalog.metadata(model).get("task")

    # ------------------------------------------------------------------ the handler around each route

    async def answer(self, req: falcon.Request, resp: falcon.Response, route: str, model: str | None) -> None:
        """Run a POST route for a model (None: the root's choice), and write its answer or TEI's error."""
        await _answering(resp, lambda: self._answer(req, resp, route, model))

    async def _answer(self, req: falcon.Request, resp: falcon.Response, route: str, model: str | None) -> None:
        started_at = time.monotonic()
        timing = {"characters": 0, "tokens": 0, "queue_ms": 0.0, "prepare_ms": 0.0, "forward_ms": 0.0}
        body = await _body(req, self._config)
        await self._catalog.refresh()
        if route == "":
            route = self._route_of_body(body, model)
        if model is None:
            model = self.root_model(_TASK_OF_ROUTE.get(route))
        document = await getattr(self, "_" + route)(req, body, model, timing)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
        await self._catalog.refresh()
        self._catalog.mark_version(resp, model)
        total_ms = (time.monotonic() - started_at) * 1000
        for name, value in (("x-compute-type", "ddml"), ("x-compute-time", _ms(total_ms, total_ms)),
                            ("x-total-time", _ms(total_ms, total_ms)), ("x-compute-characters", str(timing["characters"])),
                            ("x-compute-tokens", str(timing["tokens"])),
                            ("x-tokenization-time", _ms(timing["prepare_ms"], total_ms)),
                            ("x-queue-time", _ms(timing["queue_ms"], total_ms)),
                            ("x-inference-time", _ms(timing["forward_ms"], total_ms))):
            resp.set_header(name, value)

    def _route_of_body(self, body: dict, model: str | None) -> str:
        """POST / (or /tei/{model}): the route the body and the model call for, as TEI decides it."""
        if "query" in body and "texts" in body:
            return "rerank"
        if isinstance(body.get("inputs"), dict) and "source_sentence" in body["inputs"]:
            return "similarity"
        chosen = model if model is not None else self._config.default_model
        task = self.task_of(chosen) if chosen else None
        return {"classification": "predict", "rerank": "rerank"}.get(task, "embed")

    async def _ask(self, req: falcon.Request, model: str, inputs: list, timing: dict) -> list:
        figures: dict = {}  # where the request's time went (protocol.TIMINGS), from its reply
        outputs = await self._broker.request(model, inputs, timeout_s=self._config.request_timeout_ms / 1000,
                                             request_id_prefix=req.context.request_id, timings=figures)
        for name, value in figures.items():
            timing[name] = max(timing.get(name, 0.0), value)
        return outputs

    def _check_task(self, model: str, task: str) -> None:
        actual = self.task_of(model)
        if actual is not None and actual != task:
            kind = {"embedding": "an embedding", "classification": "a classifier", "rerank": "a re-ranker"}[task]
            raise TEIError(424, "Backend", f"Backend error: model {model!r} is not {kind} model")

    def _batch(self, count: int, field: str) -> None:
        if count == 0:
            raise _empty(field)
        if count > self._config.max_inputs:
            raise _invalid(f"batch size {count} > maximum allowed batch size {self._config.max_inputs}")

    # ------------------------------------------------------------------ routes

    async def _embed(self, req, body: dict, model: str, timing: dict) -> list:
        self._check_task(model, "embedding")
        texts = _strings(body.get("inputs"), "inputs")
        self._batch(len(texts), "inputs")
        normalize = _flag(body, "normalize", True)
        dimensions = body.get("dimensions")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or dimensions < 0):
            raise _invalid(f"`dimensions` must be a positive integer, got {dimensions!r:.40}")
        if dimensions == 0:
            raise _invalid("Input validation error: `dimensions` should be positive")
        vectors = await self._vectors(req, model, texts, _options(body), timing)
        if dimensions is not None:
            if dimensions > vectors.shape[1]:
                raise _invalid("Input validation error: `dimensions` should be smaller than the maximum embedding "
                               "dimension.")
            vectors = np.ascontiguousarray(vectors[:, :dimensions])  # orjson writes contiguous arrays only
        if normalize:
            norms = np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
            vectors = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return vectors

    async def _vectors(self, req, model: str, texts: list[str], options: dict, timing: dict) -> np.ndarray:
        """Raw (unnormalised) vectors of texts, one row each."""
        outputs = await self._ask(req, model, [{"text": text, "normalize": False, "count_tokens": True, **options}
                                         for text in texts], timing)
        rows = [_counted(output, "embedding", model, timing) for output in outputs]
        timing["characters"] += sum(map(len, texts))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1)

    async def _similarity(self, req, body: dict, model: str, timing: dict) -> list:
        self._check_task(model, "embedding")
        inputs = body.get("inputs")
        if not isinstance(inputs, dict) or not isinstance(inputs.get("source_sentence"), str):
            raise _invalid("`inputs` must be {\"source_sentence\": string, \"sentences\": [string]}")
        sentences = _strings(inputs.get("sentences"), "inputs.sentences", single=False)
        if not sentences:
            raise _empty("inputs.sentences")
        self._batch(len(sentences) + 1, "inputs.sentences")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _invalid("`parameters` must be an object")
        vectors = (await self._vectors(req, model, [inputs["source_sentence"], *sentences], _options(parameters),
                                       timing)).astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        norms[norms == 0] = 1.0
        return ((vectors[1:] @ vectors[0]) / (norms[1:] * norms[0])).tolist()  # float64: Python floats, in C

    async def _rerank(self, req, body: dict, model: str, timing: dict) -> list:
        query = body.get("query")
        if not isinstance(query, str):
            raise _invalid(f"`query` must be a string, got {type(query).__name__}")
        texts = _strings(body.get("texts"), "texts", single=False)
        self._batch(len(texts), "texts")
        self._check_task(model, "rerank")
        options = _options(body, prompts=False)
        if _flag(body, "raw_scores", False):
            options["raw_scores"] = True
        return_text = _flag(body, "return_text", False)
        outputs = await self._ask(req, model, [{"query": query, "document": text, "count_tokens": True, **options}
                                         for text in texts], timing)
        scores = [float(_counted(output, "score", model, timing)) for output in outputs]
        timing["characters"] += sum(map(len, texts)) + len(query) * len(texts)
        ranks = []
        for index in sorted(range(len(texts)), key=lambda i: (-scores[i], i)):
            rank: dict[str, Any] = {"index": index}
            if return_text:
                rank["text"] = texts[index]
            rank["score"] = scores[index]
            ranks.append(rank)
        return ranks

    async def _predict(self, req, body: dict, model: str, timing: dict) -> list:
        self._check_task(model, "classification")
        inputs, single = _predict_inputs(body.get("inputs"))
        self._batch(len(inputs), "inputs")
        raw_scores = _flag(body, "raw_scores", False)
        options = {"raw_scores": True, "count_tokens": True, **_options(body, prompts=False)}
        outputs = await self._ask(req, model, [{"text": text, **options} if isinstance(text, str) else
                                         {"text": text[0], "text_pair": text[1], **options} for text in inputs], timing)
        timing["characters"] += sum(len(text) if isinstance(text, str) else len(text[0]) + len(text[1])
                                    for text in inputs)
        answers = []
        for output in outputs:
            if not (isinstance(output, dict) and isinstance(output.get("logits"), dict)):
                raise _backend_shape(model, "{'label', 'logits'}")
            timing["tokens"] += int(output.get("tokens") or 0)
            labels = list(output["logits"])
            scores = _scores(np.asarray([output["logits"][label] for label in labels], dtype=np.float64), raw_scores)
            answers.append([{"score": float(scores[i]), "label": labels[i]}
                            for i in sorted(range(len(labels)), key=lambda i: -scores[i])])
        return answers[0] if single else answers

    async def _tokenize(self, req, body: dict, model: str, timing: dict) -> list:
        value = body.get("inputs")
        texts = _strings(value, "inputs")
        self._batch(len(texts), "inputs")
        option: dict[str, Any] = {"add_special_tokens": _flag(body, "add_special_tokens", True)}
        if body.get("prompt_name") is not None:
            option["prompt_name"] = _string(body, "prompt_name")
        timing["characters"] += sum(map(len, texts))
        return await self._ask(req, model, [{"tokenize": text, **option} for text in texts], timing)

    async def _decode(self, req, body: dict, model: str, timing: dict) -> list:
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise _invalid("`ids` must be a list of token ids, or a list of such lists")
        batch = ids if ids and all(isinstance(item, list) for item in ids) else [ids]
        if not ids:
            raise _empty("ids")
        self._batch(len(batch), "ids")
        for item in batch:
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item):
                raise _invalid("`ids` must hold non-negative integers")
        skip = _flag(body, "skip_special_tokens", True)
        return await self._ask(req, model, [{"decode": item, "skip_special_tokens": skip} for item in batch], timing)

    async def _embed_all(self, req, body: dict, model: str, timing: dict) -> list:
        self._check_task(model, "embedding")
        texts = _strings(body.get("inputs"), "inputs")
        self._batch(len(texts), "inputs")
        outputs = await self._ask(req, model, [{"text": text, "all_tokens": True, "count_tokens": True, **_options(body)}
                                         for text in texts], timing)
        timing["characters"] += sum(map(len, texts))
        return [np.asarray(_counted(output, "embedding", model, timing), dtype=np.float32) for output in outputs]

    async def _embed_sparse(self, req, body: dict, model: str, timing: dict) -> list:
        raise TEIError(424, "Backend", "Backend error: `embed_sparse` is only available for SPLADE models, and ddml "
                                       "serves none")

    # ------------------------------------------------------------------ GET

    async def info(self, resp: falcon.Response, model: str | None) -> None:
        await _answering(resp, lambda: self._info(resp, model))

    async def _info(self, resp: falcon.Response, model: str | None) -> None:
        await self._catalog.refresh()
        model = model or self.root_model(None)
        metadata = self._catalog.metadata(model)
        if not metadata:
            if self._catalog.model(model) is None:
                raise TEIError(404, "Validation", f"no live worker serves model {model!r}")
            raise TEIError(424, "Backend", f"Backend error: model {model!r} is not a built-in text model")
        task = metadata.get("task")
        if task == "embedding":
            pooling = str(metadata.get("pooling", "mean"))
            model_type: dict = {"embedding": {"pooling": _TEI_POOLING.get(pooling, pooling)}}
        else:
            labels = metadata.get("labels") or []
            model_type = {_MODEL_TYPE.get(task, "classifier"): {
                "id2label": {str(i): label for i, label in enumerate(labels)},
                "label2id": {label: i for i, label in enumerate(labels)}}}
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({
            "model_id": model, "model_sha": self._catalog.version_served(model),
            "model_dtype": str(metadata.get("dtype", "float32")), "served_model_name": model,
            "model_type": model_type, "max_concurrent_requests": self._config.max_inputs,
            "max_input_length": int(metadata.get("max_tokens") or 0),
            "max_batch_tokens": int(metadata.get("max_tokens") or 0) * self._config.max_inputs,
            "max_batch_requests": None, "max_client_batch_size": self._config.max_inputs,
            "auto_truncate": bool(metadata.get("auto_truncate", False)), "tokenization_workers": 1,
            "version": VERSION, "sha": None, "docker_label": None})

    async def health(self, resp: falcon.Response, model: str | None) -> None:
        await self._catalog.refresh()
        try:
            live = self._catalog.model(model) is not None if model else bool(self._live())
        except BrokerError:
            live = False
        if live:
            resp.status = 200
            resp.data = b""
        else:
            _write_error(resp, TEIError(503, "Unhealthy", "unhealthy"))


async def _body(req: falcon.Request, config: GatewayConfig) -> dict:
    data = await read_body(req, config)
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise TEIError(422, "Validation", f"Failed to parse the request body as JSON: {error}") from None
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object, got {type(body).__name__}")
    check_document(body, config.max_input_chars)
    return body


def _ms(value_ms: float, total_ms: float) -> str:
    """A timing header: whole milliseconds, as TEI gives them, at most the request's total."""
    return str(int(min(value_ms, total_ms)))


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"`{name}` must be true or false, got {value!r:.40}")
    return value


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise _invalid(f"`{name}` must be a string, got {type(value).__name__}")
    return value


def _options(body: dict, prompts: bool = True) -> dict:
    """The per-input options of the built-in text models that a TEI body (or parameters) sets."""
    options: dict[str, Any] = {}
    if body.get("truncate") is not None:
        options["truncate"] = _flag(body, "truncate", False)
    direction = body.get("truncation_direction")
    if direction is not None:
        if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
            raise _invalid(f"`truncation_direction` must be Left or Right, got {direction!r:.40}")
        if direction.lower() == "left":
            options["truncation_direction"] = "left"
    if prompts and body.get("prompt_name") is not None:
        options["prompt_name"] = _string(body, "prompt_name")
    return options


def _strings(value: Any, field: str, single: bool = True) -> list[str]:
    """A string (when single) or a list of strings. Token ids are refused: a 422 that says so."""
    if single and isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _invalid(f"`{field}` must be {'a string or ' if single else ''}a list of strings, "
                       f"got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            what = "token ids, which ddml does not take: send the text" if isinstance(item, (int, list)) else \
                f"a {type(item).__name__}"
            raise _invalid(f"`{field}` must hold strings; it holds {what}")
    return value


def _predict_inputs(value: Any) -> tuple[list[str | tuple[str, str]], bool]:
    """TEI's /predict rule: "s" and ["s"] are one input, ["a", "b"] one pair, and a list of lists a batch
    of single texts and pairs ([["a"], ["b", "c"]]). Returns (inputs, single): each a text or a pair."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        if len(value) <= 2:
            return [value[0] if len(value) == 1 else (value[0], value[1])], True
        raise _invalid(f"invalid length {len(value)}, expected a string, a pair of strings [string, string] or "
                       "a batch of mixed strings and pairs [[string], [string, string], ...]")
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        inputs: list[str | tuple[str, str]] = []
        for item in value:
            if len(item) not in (1, 2) or not all(isinstance(text, str) for text in item):
                raise _invalid("a batch of `inputs` is [[string], [string, string], ...]: single texts and pairs")
            inputs.append(item[0] if len(item) == 1 else (item[0], item[1]))
        return inputs, False
    if value == []:
        raise _empty("inputs")
    raise _invalid("`inputs` must be a string, a pair of strings [string, string] or a batch of mixed strings "
                   "and pairs [[string], [string, string], ...]")


def _scores(logits: np.ndarray, raw: bool) -> np.ndarray:
    """TEI's scores of a classifier's logits: softmax over several labels, sigmoid of one, or raw."""
    if raw:
        return logits
    if len(logits) == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def _counted(output: Any, key: str, model: str, timing: dict) -> Any:
    if not (isinstance(output, dict) and key in output and isinstance(output.get("tokens"), int)):
        raise _backend_shape(model, f"{{{key!r}, 'tokens'}}")
    timing["tokens"] += output["tokens"]
    return output[key]


def _backend_shape(model: str, shape: str) -> TEIError:
    return TEIError(424, "Backend", f"Backend error: model {model!r} did not answer with {shape}; TEI's routes "
                                    "need a built-in text model (--model-path)")


# ---------------------------------------------------------------------- Falcon resources


class _PostRoute:
    def __init__(self, tei: TEI, route: str):
        self._tei, self._route = tei, route

    async def on_post(self, req: falcon.Request, resp: falcon.Response, model: str | None = None) -> None:
        await self._tei.answer(req, resp, self._route, model)


class _BaseURL:
    """/ and /tei/{model}: GET is the health check, POST decides the route from the body and the model."""

    def __init__(self, tei: TEI):
        self._tei = tei

    async def on_get(self, req: falcon.Request, resp: falcon.Response, model: str | None = None) -> None:
        await self._tei.health(resp, model)

    async def on_post(self, req: falcon.Request, resp: falcon.Response, model: str | None = None) -> None:
        await self._tei.answer(req, resp, "", model)


class _GetRoute:
    def __init__(self, handler: Callable[[falcon.Response, str | None], Awaitable[None]]):
        self._handler = handler

    async def on_get(self, req: falcon.Request, resp: falcon.Response, model: str | None = None) -> None:
        await self._handler(resp, model)


def add_routes(app: falcon.App, broker: AsyncBrokerClient, config: GatewayConfig, catalog: AsyncCatalog) -> None:
    tei = TEI(broker, config, catalog)
    for prefix in ("", "/tei/{model}"):
        for route in _ROUTES:
            app.add_route(f"{prefix}/{route}", _PostRoute(tei, route))
        app.add_route(f"{prefix}/info", _GetRoute(tei.info))
        app.add_route(f"{prefix}/health", _GetRoute(tei.health))
        app.add_route(prefix or "/", _BaseURL(tei))
        app.add_route(f"{prefix}/invocations", _PostRoute(tei, ""))  # TEI's (and SageMaker's) alias of POST /
