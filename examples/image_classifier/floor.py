"""The floor under bench.py's overhead figure, as arithmetic: what one 602 KB image costs with no ddml.

    .venv/bin/python examples/image_classifier/bench.py floor [--requests 300]

Each line is a p50 over --requests calls at concurrency 1, on 127.0.0.1, after 20 to warm:
- client + raw server: the same `requests` client and bodies as bench.py, against a server of a
  few lines of blocking sockets (reads the head and Content-Length bytes into one buffer, answers
  100 bytes): what the client and the kernel's loopback cost, with as little server as there is;
  the client's own CPU per call (time.process_time) beside it;
- client + ASGI server: the same bodies against a Falcon ASGI app that reads the body and answers
  100 bytes, under the gateway's own gunicorn worker (gateway.asgi_server.GatewayWorker: uvicorn,
  httptools, uvloop): the floor of any Python HTTP front end, as the gateway is one;
- one ZMQ hop: a DEALER in this process and a ROUTER in another (tcp and ipc), a frame of the given
  size one way and 10 bytes back, sent with copy=False and received as a copy or as a view; the
  round trip of 10 bytes both ways is two small hops.
ddml's path adds, over the ASGI server's: gateway -> broker -> worker with the image (two large hops)
and back with the answer (two small hops), plus each process's own work (bench.py hops).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import requests

HERE = Path(__file__).resolve().parents[2]
IMAGE_BYTES = 3 * 224 * 224 * 4
WARM = 20

RAW_SERVER = textwrap.dedent('''
    import socket, sys
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(listener.getsockname()[1], flush=True)
    answer = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/octet-stream\\r\\nContent-Length: 100\\r\\n\\r\\n" + b"x" * 100
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    while True:
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        while True:
            while b"\\r\\n\\r\\n" not in pending:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                pending += chunk
            if b"\\r\\n\\r\\n" not in pending:
                break
            head, _, rest = pending.partition(b"\\r\\n\\r\\n")
            length = 0
            for line in head.split(b"\\r\\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            have = min(len(rest), length)
            view[:have] = rest[:have]
            pending = rest[length:]
            while have < length:
                have += connection.recv_into(view[have:length])
            connection.sendall(answer)
        connection.close()
''')

SINK_APP = textwrap.dedent('''
    import falcon.asgi

    class Sink:
        async def on_post(self, req, resp):
            body = await req.stream.read()
            resp.data = b"x" * 100
            resp.content_type = "application/octet-stream"

    app = falcon.asgi.App()
    app.add_route("/sink", Sink())
''')

ZMQ_PEER = textwrap.dedent('''
    import sys, zmq
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(sys.argv[1])
    copy = sys.argv[2] == "copy"
    print("ready", flush=True)
    while True:
        identity = router.recv()
        frame = router.recv(copy=copy)
        if not copy:
            frame = frame.buffer
        router.send_multipart([identity, b"0123456789"])
''')


def p50_ms(call, count: int) -> tuple[float, float]:
    """(p50 wall ms, mean CPU ms of this process per call)."""
    for _ in range(WARM):
        call()
    times = []
    cpu_started = time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), (time.process_time() - cpu_started) * 1000 / count


def http_floor(url: str, count: int) -> dict[str, tuple[float, float]]:
    session = requests.Session()
    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32).tobytes()
    figures = {}
    for label, body in (("100 B", b"x" * 100), ("602 KB", image)):
        def call(body=body):
            response = session.post(url, data=body, headers={"Content-Type": "application/octet-stream"}, timeout=30)
            assert response.status_code == 200 and len(response.content) == 100, response.status_code
        figures[label] = p50_ms(call, count)
    return figures


def zmq_hops(endpoint: str, copy: bool, count: int) -> dict[str, float]:
    import zmq

    peer = subprocess.Popen([sys.executable, "-c", ZMQ_PEER, endpoint, "copy" if copy else "view"],
                            stdout=subprocess.PIPE, text=True)
    try:
        peer.stdout.readline()
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.connect(endpoint)
        figures = {}
        image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32).tobytes()
        for label, frame in (("10 B", b"0123456789"), ("602 KB", image)):
            def call(frame=frame):
                dealer.send(frame, copy=False)
                if not dealer.poll(10_000):
                    raise SystemExit("the zmq peer did not answer")
                dealer.recv()
            figures[label] = p50_ms(call, count)[0]
        dealer.close(linger=0)
        context.term()
        return figures
    finally:
        peer.kill()
        peer.wait()


def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        raw = subprocess.Popen([sys.executable, "-c", RAW_SERVER], stdout=subprocess.PIPE, text=True)
        try:
            port = int(raw.stdout.readline())
            raw_figures = http_floor(f"http://127.0.0.1:{port}/sink", count)
        finally:
            raw.kill()
            raw.wait()
        Path(directory, "floor_sink.py").write_text(SINK_APP)
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{directory}"}
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "gateway.asgi_server.GatewayWorker",
                                   "--workers", "1", "--bind", f"127.0.0.1:{port}", "floor_sink:app"],
                                  cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/sink")
            asgi_figures = http_floor(f"http://127.0.0.1:{port}/sink", count)
        finally:
            server.terminate()
            server.wait(30)
        hops = {f"{transport} {'copy' if copy else 'view'}": zmq_hops(endpoint, copy, count)
                for transport, endpoint in (("tcp", f"tcp://127.0.0.1:{_free_port()}"),
                                            ("ipc", f"ipc://{directory}/hop"))
                for copy in (True, False)}
    print(f"p50 of {count} calls, ms (client CPU per call in brackets)\n")
    print("| body in, 100 B out | client + raw server | client + ASGI server (GatewayWorker) |\n|---|---:|---:|")
    for label in raw_figures:
        (raw_ms, raw_cpu), (asgi_ms, asgi_cpu) = raw_figures[label], asgi_figures[label]
        print(f"| {label} | {raw_ms:.2f} ({raw_cpu:.2f}) | {asgi_ms:.2f} ({asgi_cpu:.2f}) |")
    print("\n| ZMQ round trip, 10 B back | 10 B there | 602 KB there | one 602 KB hop (602 KB - 10 B RTT + half the 10 B RTT) |"
          "\n|---|---:|---:|---:|")
    for label, figures in hops.items():
        small, big = figures["10 B"], figures["602 KB"]
        print(f"| {label} | {small:.3f} | {big:.3f} | {big - small + small / 2:.3f} |")
    tcp = hops["tcp view"]
    small_hop, big_hop = tcp["10 B"] / 2, tcp["602 KB"] - tcp["10 B"] / 2
    asgi = asgi_figures["602 KB"][0]
    print(f"\nfloor for ddml's path = client + ASGI server ({asgi:.2f}) + 2 large hops ({2 * big_hop:.2f}) "
          f"+ 2 small hops ({2 * small_hop:.2f}) = {asgi + 2 * big_hop + 2 * small_hop:.2f} ms (tcp, views), before any "
          f"work in the gateway, broker and worker; the in-process call is not in it")
    floor = asgi + 2 * big_hop + 2 * small_hop
    print(f"the target (p50 over HTTP minus in-process <= 2 ms) leaves 2 - {floor:.2f} = {2 - floor:.2f} ms for the "
          f"gateway's, the broker's and the worker's own work on the request (bench.py hops: each step of it)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.post(url, data=b"x", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer in 60 s")
