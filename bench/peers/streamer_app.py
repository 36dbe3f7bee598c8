"""service-streamer's Streamer behind Falcon under gunicorn, as its README shows it.

    BENCH_MODEL_DIR=... gunicorn -k gthread --threads 64 -w 1 -b 127.0.0.1:8002 'bench.peers.streamer_app:app'

One gunicorn process (Streamer spawns its own model process; more gunicorn processes would
each spawn another). Batch 64, 10 ms wait, like mosec's settings in bench.compare. Streamer.predict
takes a list and queues each item on its own, so a request of many sentences is batched by
sentence, with other requests' sentences, in batches of at most 64: nothing to add for bulk.
"""

import falcon
import orjson

from bench.peers.plain_model import ManagedPlain, texts_of

_streamer = None


def streamer():
    global _streamer
    if _streamer is None:
        from service_streamer import Streamer

        _streamer = Streamer(ManagedPlain, batch_size=64, max_latency=0.01, worker_num=1)
    return _streamer


class Embed:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            texts = texts_of(orjson.loads(req.bounded_stream.read()))
        except (ValueError, KeyError, TypeError) as error:
            raise falcon.HTTPBadRequest(description=str(error))
        resp.data = orjson.dumps({"outputs": streamer().predict(texts)})
        resp.content_type = falcon.MEDIA_JSON


app = falcon.App()
app.add_route("/predict", Embed())
