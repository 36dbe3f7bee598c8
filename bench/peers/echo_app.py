"""The floors bench.overhead measures ddml's gateway against: a bare Falcon app that echoes the body,
once as WSGI (gunicorn's gthread worker) and once as ASGI (gunicorn with uvicorn_worker.UvicornWorker).

    gunicorn -k gthread --threads 128 bench.peers.echo_app:wsgi
    gunicorn -k uvicorn_worker.UvicornWorker bench.peers.echo_app:asgi
"""

import falcon
import falcon.asgi


class Echo:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = req.bounded_stream.read()
        resp.content_type = falcon.MEDIA_JSON


class AsyncEcho:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = await req.stream.read()
        resp.content_type = falcon.MEDIA_JSON


wsgi = falcon.App()
wsgi.add_route("/echo", Echo())
asgi = falcon.asgi.App()
asgi.add_route("/echo", AsyncEcho())
