"""Naive: Falcon under gunicorn (sync workers), the model called for each request, no batching across
requests (a request of many sentences runs in passes of at most 64).

    BENCH_MODEL_DIR=... gunicorn -w 1 -b 127.0.0.1:8001 'bench.peers.naive_app:app'
"""

import falcon
import orjson

from bench.peers.plain_model import PlainEmbedder, texts_of

_embedder: PlainEmbedder | None = None  # loaded after fork, in each gunicorn process


class Embed:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        global _embedder
        if _embedder is None:
            _embedder = PlainEmbedder()
        try:
            texts = texts_of(orjson.loads(req.bounded_stream.read()))
        except (ValueError, KeyError, TypeError) as error:
            raise falcon.HTTPBadRequest(description=str(error))
        resp.data = orjson.dumps({"outputs": _embedder.embed_batches(texts)})
        resp.content_type = falcon.MEDIA_JSON


class Hello:
    """The bare hello-world the echo mode compares the gateway against."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = b'{"status":"ok"}'
        resp.content_type = falcon.MEDIA_JSON

    on_post = on_get


app = falcon.App()
app.add_route("/predict", Embed())
app.add_route("/hello", Hello())
