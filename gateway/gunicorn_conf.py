"""gunicorn settings for the gateway: `gunicorn -c python:gateway.gunicorn_conf 'gateway.app:get_app()'`.

Threaded workers (gthread): each request thread sends on its own DEALER and blocks on its
reply, so a few processes with many threads carry many concurrent requests. ddml-gateway sets these through DDML_* variables; the defaults for processes and
threads, and the measurement behind them, are in gateway/config.py.
"""

import os

from gateway.config import DEFAULT_THREADS, DEFAULT_WORKERS

bind = os.environ.get("DDML_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("DDML_WORKERS", DEFAULT_WORKERS))
threads = int(os.environ.get("DDML_THREADS", DEFAULT_THREADS))
worker_class = "gthread"
backlog = 2048
keepalive = 5
# A request waits at most its deadline for a reply; gunicorn's own timeout only catches a stuck process.
timeout = int(os.environ.get("DDML_WORKER_TIMEOUT_S", "120"))
graceful_timeout = int(os.environ.get("DDML_GRACEFUL_TIMEOUT_S", "30"))
preload_app = False  # safe either way: no zmq context exists before a worker's first request
accesslog = os.environ.get("DDML_ACCESS_LOG") or None
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({x-request-id}o)s'  # gunicorn's, then the request id
loglevel = os.environ.get("DDML_LOG_LEVEL", "info").lower()
certfile = os.environ.get("DDML_CERTFILE") or None
# gunicorn >= 25.1 opens a control socket at one fixed path per user ($HOME/.gunicorn/gunicorn.ctl),
# shared by every instance on the host, and its shutdown waits up to 4 s on it: several gateways
# (or a gateway next to another gunicorn app) would fight over the path. ddml does not use it.
control_socket_disable = True
keyfile = os.environ.get("DDML_KEYFILE") or None


def child_exit(server, worker):
    """Drop a dead process's live gauges from the multiprocess metrics directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):
    """The gateway's own log lines (not gunicorn's) in the chosen format, per worker process."""
    from ddml_common.cli import configure_logging

    configure_logging(os.environ.get("DDML_LOG_LEVEL", "INFO").upper(), os.environ.get("DDML_LOG_FORMAT", "text"))
