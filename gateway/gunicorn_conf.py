"""gunicorn settings for the gateway: `gunicorn -c python:gateway.gunicorn_conf 'gateway.app:get_app()'`.

Each process serves the ASGI app on one event loop (gateway/asgi_server.py's GatewayWorker: uvicorn's
worker, with a timeout on request heads), and talks to the brokers on one DEALER per broker
(gateway/async_transport.py), so a process carries any number of concurrent requests and slow
clients without a thread each. The settings come from the gateway's own flags, read from the
environment as ddml-gateway leaves them (gateway/config.py); the default number of processes,
and the measurement behind it, are there too.

Stopping: on SIGTERM (or SIGINT) an idle gateway exits at once, and one with requests in flight
waits for them up to their deadlines (graceful_timeout, from --max-request-timeout-ms): uvicorn
stops listening, closes idle connections, and answers what it holds before the process exits.
"""

import os
import signal
import subprocess
import sys
import threading

from gateway.config import DEFAULT_WORKERS, build_parser, graceful_timeout_s

_args = build_parser().parse_args([])  # the gateway's flags, from DDML_GATEWAY_* / DDML_* (and DDML_CONFIG)

bind = _args.bind
workers = _args.workers or DEFAULT_WORKERS
worker_class = "gateway.asgi_server.GatewayWorker"
backlog = 2048
keepalive = 5  # seconds an idle kept-alive connection stays open (uvicorn's timeout_keep_alive)
# A request waits at most its deadline for a reply; gunicorn's own timeout only catches a stuck process.
timeout = _args.worker_timeout_s
graceful_timeout = graceful_timeout_s(_args)
preload_app = _args.preload  # safe either way: no zmq context exists before a worker's first request
accesslog = _args.access_log
# (uvicorn writes the access log, in its own format: client, request line, status. The request id
# is in the gateway's own log lines, gateway/request_ids.py.)
loglevel = _args.log_level.lower()
certfile = _args.certfile
keyfile = _args.keyfile
# gunicorn >= 25.1 opens a control socket at one fixed path per user ($HOME/.gunicorn/gunicorn.ctl),
# shared by every instance on the host, and its shutdown waits up to 4 s on it: several gateways
# (or a gateway next to another gunicorn app) would fight over the path. ddml does not use it.
control_socket_disable = True


def child_exit(server, worker):
    """Drop a dead process's live gauges from the multiprocess metrics directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):
    """The gateway's own log lines (not gunicorn's) in the chosen format, per worker process."""
    from ddml_common.cli import configure_logging

    configure_logging(_args.log_level, _args.log_format)


# --grpc-bind: KServe v2 over gRPC in one more process beside gunicorn's (gateway/grpc_server.py
# says why not inside them). Started once the master is ready, stopped when it exits; if it dies,
# the master stops too, so that the gateway's supervisor restarts both sides together.
_grpc = {"process": None, "stopping": False}


def when_ready(server):
    if not _args.grpc_bind:
        return
    # Its own session: a terminal's Ctrl-C reaches the master, which stops it in on_exit (after the HTTP side).
    process = _grpc["process"] = subprocess.Popen([sys.executable, "-m", "gateway.grpc_server"],
                                                  start_new_session=True)

    def watch():
        process.wait()  # gunicorn's reaping may take its status first: then this says 0
        if not _grpc["stopping"]:
            server.log.error("the gRPC server process (pid %d) exited; stopping the gateway", process.pid)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="grpc-watch", daemon=True).start()


def on_exit(server):
    process = _grpc["process"]
    if process is None:
        return
    _grpc["stopping"] = True
    if process.poll() is None:
        process.terminate()  # it finishes the calls in flight, up to the same graceful timeout
        try:
            process.wait(timeout=graceful_timeout + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
