"""What serving one image costs over HTTP, and the classifier's throughput (issue #27's figures).

    .venv/bin/python examples/image_classifier/bench.py overhead [REPO] [--before REV] [--rounds 3] [--requests 200]
        [--interleave] [--routes v2_binary,v1_msgpack,v1_json]
    .venv/bin/python examples/image_classifier/bench.py throughput [REPO] [--requests 64]
    .venv/bin/python examples/image_classifier/bench.py hops [REPO] [--requests 300]
    .venv/bin/python examples/image_classifier/bench.py floor [--requests 300]
    .venv/bin/python examples/image_classifier/bench.py codec [REPO]

overhead: one 3x224x224 float32 image at concurrency 1, p50 over HTTP minus p50 of the same
handler's predict() in-process, for v2 binary, /v1 msgpack (`__ndarray__`) and /v1 JSON, and the
CPU per request of the broker, the worker and the gateway (from /proc: less disturbed by a loaded
machine than wall time). Each body is encoded once, before timing: the time is the transport's
and the server's. The handler is a cheap one (two numpy reductions), so that the difference is
what ddml costs. REPO is the checkout whose broker, worker and gateway run (default: this one);
--before REV also runs git revision REV from a temporary worktree, the two taking turns for
--rounds rounds (whoever went first in a round goes last in the next), and the tables give each
round's figure, their median and the ratio of the two within each round. --interleave runs both trees'
clusters at once and takes turns request by request: on a shared machine, a slow spell then lands on
both alike (the CPU figures then include a cluster's idle heartbeats while the other answers).
throughput: issue #27's table: the example's ResNet-18 (examples/image_classifier/model.py, run
from REPO) at c=16 over v2 binary, against the model in-process one image at a time and at its
best batch size (of 2, 4, 8, 16), over the same --requests images.
hops: where one request's time goes, stamp by stamp, in the client, gateway, broker and worker
(hops.py), for v2 binary and msgpack.
floor: the arithmetic of the floor under overhead's figure (floor.py): the client, a bare ASGI
server, one ZMQ hop.
codec: what decoding one image from the wire costs the worker (writable or not), and with
keep_freed_buffers() where REPO has it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np
import requests

CHEAP_HANDLER = '''
import numpy as np
from worker.models import Manager

class Cheap(Manager):
    def metadata(self):
        return {"platform": "python",
                "inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
                "outputs": [{"name": "CLASSES", "datatype": "INT64", "shape": [-1, 3], "key": "classes"},
                            {"name": "MEANS", "datatype": "FP32", "shape": [-1, 3], "key": "means"}]}

    def predict(self, batch):
        outputs = []
        for image in batch:
            image = np.asarray(image, dtype=np.float32)
            means = image.reshape(3, -1).mean(axis=1)
            outputs.append({"classes": np.argsort(-means).astype(np.int64), "means": means.astype(np.float32)})
        return outputs
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, repo: Path, extra_path: str, worker_flags: list[str], log_dir: Path, env: dict | None = None):
        self.processes = []
        env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{extra_path}", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", **(env or {})}
        front, back, port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        for name, flags in (("broker", ["--frontend", f"tcp://127.0.0.1:{front}", "--backend", f"tcp://127.0.0.1:{back}"]),
                            ("worker", ["--broker", f"tcp://127.0.0.1:{back}", *worker_flags]),
                            ("gateway", ["--broker", f"tcp://127.0.0.1:{front}", "--bind", f"127.0.0.1:{port}",
                                         "--workers", "1", "--threads", "32"])):
            log = open(log_dir / f"{name}.log", "wb")
            self.processes.append(subprocess.Popen([sys.executable, "-m", name, *flags], cwd=repo, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/v2/models/m/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"not ready in 300 s; logs in {log_dir}")

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of the broker, the worker and the gateway (with its
        gunicorn worker), from /proc: a figure that a loaded machine disturbs less than wall time."""
        tick = os.sysconf("SC_CLK_TCK")
        return {name: sum(_cpu_ticks(pid) for pid in _with_children(process.pid)) / tick
                for name, process in zip(("broker", "worker", "gateway"), self.processes)}

    def stop(self) -> None:
        for process in self.processes[::-1]:
            process.send_signal(signal.SIGTERM)
        for process in self.processes[::-1]:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _with_children(pid: int) -> list[int]:
    pids, at = [pid], 0
    while at < len(pids):
        for task in Path(f"/proc/{pids[at]}/task").glob("*/children"):
            pids.extend(int(child) for child in task.read_text().split())
        at += 1
    return pids


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def v2_binary(image: np.ndarray) -> tuple[str, bytes, dict]:
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, *image.shape],
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return "/v2/models/m/infer", header + image.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                                          "Content-Type": "application/octet-stream"}


def v1_msgpack(image: np.ndarray) -> tuple[str, bytes, dict]:
    body = msgpack.packb({"inputs": [{"__ndarray__": ["<f4", list(image.shape), image.tobytes()]}]})
    return "/v1/models/m/predict", body, {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}


def v1_json(image: np.ndarray) -> tuple[str, bytes, dict]:
    return "/v1/models/m/predict", json.dumps({"inputs": [image.tolist()]}).encode(), {
        "Content-Type": "application/json"}


def post(session: requests.Session, url: str, request: tuple[str, bytes, dict]) -> None:
    """One request whose body was encoded beforehand: the time is the transport's and the server's."""
    path, body, headers = request
    response = session.post(url + path, data=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text[:300]


def p50_ms(call, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _cheap_handler(directory: str):
    """The cheap handler, written where the cluster's PYTHONPATH finds it, and imported here."""
    Path(directory, "bench_cheap.py").write_text(CHEAP_HANDLER)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    from bench_cheap import Cheap  # noqa: E402 (written just above)

    return Cheap()


ROUTES = (v2_binary, v1_msgpack, v1_json)


def overhead(trees: dict[str, Path], count: int, rounds: int, routes: tuple = ROUTES, interleave: bool = False) -> None:
    """p50 over HTTP minus in-process per route, for each tree, taking turns round by round (or,
    with interleave, request by request, every tree's cluster up at once)."""
    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    figures: dict[str, dict[str, list[float]]] = {name: {r.__name__: [] for r in routes} for name in trees}
    cpu: dict[str, dict[str, list[float]]] = {name: {r.__name__: [] for r in routes} for name in trees}
    with tempfile.TemporaryDirectory() as directory:
        handler = _cheap_handler(directory)
        in_process = p50_ms(lambda: handler.predict([image]), count)
        print(f"in-process p50 {in_process:.3f} ms")
        names = list(trees)
        for round_ in range(rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]  # whoever went first goes last
            for turn in ([order] if interleave else [[name] for name in order]):
                clusters = {}
                try:
                    for name in turn:
                        clusters[name] = Cluster(trees[name], directory, ["--model", "m", "--handler",
                                                                          "bench_cheap:Cheap"], Path(directory))
                    for encode in routes:
                        for name, (http, cpu_us) in _measure(clusters, encode(image), count).items():
                            figures[name][encode.__name__].append(http - in_process)
                            cpu[name][encode.__name__].append(sum(cpu_us.values()))
                            print(f"  round {round_ + 1} {name:8} {encode.__name__:10} p50 {http:7.2f} ms, "
                                  f"over HTTP minus in-process {http - in_process:7.2f} ms; CPU per request "
                                  + ", ".join(f"{role} {us:.0f}" for role, us in cpu_us.items()) + " us", flush=True)
                finally:
                    for cluster in clusters.values():
                        cluster.stop()
    how = "request by request" if interleave else "round by round"
    _table(f"p50 over HTTP minus in-process, ms (median of {rounds} rounds, taking turns {how}; each round's figure)",
           figures, "{:.2f}")
    _table(f"CPU per request of broker + worker + gateway, us (median of {rounds} rounds; each round's figure)",
           cpu, "{:.0f}")


def _measure(clusters: dict[str, Cluster], request: tuple, count: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Each cluster's p50 (ms) and CPU per request per process (us) over `count` requests; with several
    clusters they take turns request by request (whoever went first goes last in the next), so that a slow
    spell of a shared machine lands on all of them."""
    sessions = {name: requests.Session() for name in clusters}
    for name, cluster in clusters.items():
        for _ in range(5):
            post(sessions[name], cluster.url, request)  # warm
    times: dict[str, list[float]] = {name: [] for name in clusters}
    before = {name: cluster.cpu_s() for name, cluster in clusters.items()}
    names = list(clusters)
    for k in range(count):
        for name in names[k % len(names):] + names[:k % len(names)]:
            started = time.perf_counter()
            post(sessions[name], clusters[name].url, request)
            times[name].append((time.perf_counter() - started) * 1000)
    measured = {}
    for name, cluster in clusters.items():
        after = cluster.cpu_s()
        measured[name] = (statistics.median(times[name]),
                          {role: (after[role] - before[name][role]) / count * 1e6 for role in after})
    return measured


def _table(title: str, figures: dict[str, dict[str, list[float]]], form: str) -> None:
    """One Markdown table: a row per route, a column per tree, and the ratio of the first two
    trees' figures of the same round (median over rounds)."""
    names = list(figures)
    print(f"\n{title}\n")
    ratio = f" | {names[0]} / {names[1]}" if len(names) == 2 else ""
    print(f"| route | {' | '.join(names)}{ratio} |\n|---|{'---:|' * (len(names) + bool(ratio))}")
    for route in figures[names[0]]:
        cells = [f"{form.format(statistics.median(figures[n][route]))} "
                 f"({' / '.join(form.format(x) for x in figures[n][route])})" for n in names]
        if ratio:
            cells.append(f"{statistics.median(a / b for a, b in zip(figures[names[0]][route], figures[names[1]][route])):.2f}")
        print(f"| {route} | {' | '.join(cells)} |")


def hops_table(repo: Path, count: int) -> None:
    """Each stamp of one request's way through gateway, broker and worker (hops.py), per route."""
    import hops as stamps  # beside this file (sys.path[0])

    stamps.install("client")  # this process's stamps: the client's calls

    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    with tempfile.TemporaryDirectory() as directory:
        _cheap_handler(directory)
        out = Path(directory, "stamps")
        out.mkdir()
        site = Path(directory, "site")
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport hops\nhops.install()\n")
        os.environ["DDML_HOPS_DIR"] = str(out)
        cluster = Cluster(repo, f"{directory}{os.pathsep}{site}", ["--model", "m", "--handler", "bench_cheap:Cheap"],
                          Path(directory), env={"DDML_HOPS_DIR": str(out)})
        try:
            session = requests.Session()
            for encode in (v2_binary, v1_msgpack):
                request = encode(image)
                for _ in range(5):
                    post(session, cluster.url, request)
                for _ in range(count):
                    stamps.stamp("client", ">", encode.__name__)
                    post(session, cluster.url, request)
                    stamps.stamp("client", "<", encode.__name__)
            stamps.flush()
        finally:
            cluster.stop()
        print(f"repo {repo}\n")
        for encode in (v2_binary, v1_msgpack):
            print(stamps.analyse(out, encode.__name__) + "\n")


def throughput(repo: Path, count: int) -> None:
    """Issue #27's throughput table: the example's ResNet-18 over HTTP (v2 binary, c=16, batched by
    ddml up to 16) against the same model in-process, one image at a time and at its best batch
    size, each over the same images."""
    import torch

    sys.path.insert(0, str(repo))
    from examples.image_classifier.model import build

    model = build()
    images = np.random.default_rng(1).random((count, 3, 224, 224), dtype=np.float32)
    with torch.inference_mode():
        model(torch.from_numpy(images[:2]))  # warm
        started = time.perf_counter()
        for image in images:
            model(torch.from_numpy(image[None]))
        one_at_a_time = count / (time.perf_counter() - started)
        batched = {}
        for size in (2, 4, 8, 16):
            started = time.perf_counter()
            for at in range(0, count, size):
                model(torch.from_numpy(images[at:at + size]))
            batched[size] = count / (time.perf_counter() - started)
    best = max(batched, key=batched.get)
    with tempfile.TemporaryDirectory() as directory:
        cluster = Cluster(repo, "", ["--model", "m", "--handler", "examples.image_classifier.model:ImageClassifier",
                                     "--max-batch-size", "16"], Path(directory))
        try:
            sessions = [requests.Session() for _ in range(16)]
            bodies = [v2_binary(image) for image in images]
            for session in sessions:
                post(session, cluster.url, bodies[0])  # warm: a connection per client
            done = _batches_and_items(cluster.url)
            started = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda k: post(sessions[k % 16], cluster.url, bodies[k]), range(count)))
            http = count / (time.perf_counter() - started)
            batches, items = (now - then for now, then in zip(_batches_and_items(cluster.url), done))
            mean_batch = round(items / batches, 1) if batches else None
        finally:
            cluster.stop()
    print(f"images/s, {count} images each (in-process batches: " +
          ", ".join(f"{size}: {rate:.1f}" for size, rate in batched.items()) + ")\n")
    print("| in-process, one at a time | in-process, best batch | HTTP v2 binary, c=16 | HTTP / one at a time "
          "| HTTP / best batch |\n|---:|---:|---:|---:|---:|")
    print(f"| {one_at_a_time:.1f} | {batched[best]:.1f} (batch {best}) | {http:.1f} (mean batch {mean_batch}) "
          f"| {http / one_at_a_time:.2f} "
          f"| {http / batched[best]:.2f} |")


def _batches_and_items(url: str) -> tuple[int, int]:
    """The batches the broker has sent model m's workers, and the inputs in them, so far."""
    stats = requests.get(f"{url}/v1/status", timeout=10).json()["models"]["m"]
    return stats["batches"], stats["items"]


def codec(repo: Path) -> None:
    """What the worker pays to decode one image from the wire (REPO's protocol), best of 300."""
    import timeit

    sys.path.insert(0, str(repo))
    from ddml_common import protocol

    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    wire = protocol.encode_value(image)
    decode_us = min(timeit.repeat(lambda: protocol.decode_value(wire), number=1, repeat=300)) * 1e6
    try:
        from ddml_common.memory import keep_freed_buffers
    except ImportError:
        try:
            from worker.loop import keep_freed_buffers  # before it moved
        except ImportError:
            keep_freed_buffers = None
    line = f"repo {repo}: decode_value {decode_us:.0f} us, writable {protocol.decode_value(wire).flags.writeable}"
    if keep_freed_buffers is not None:
        keep_freed_buffers()
        kept_us = min(timeit.repeat(lambda: protocol.decode_value(wire), number=1, repeat=300)) * 1e6
        line += f"; after keep_freed_buffers() {kept_us:.0f} us"
    print(line)


HERE = Path(__file__).resolve().parents[2]  # this checkout


def checkout(rev: str, directory: str) -> Path:
    """A detached worktree of this checkout at REV (removed by the caller's cleanup)."""
    tree = Path(directory, f"before-{rev}".replace("/", "_"))
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return tree


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["overhead", "throughput", "codec", "hops", "floor"])
    parser.add_argument("repo", type=Path, nargs="?", default=HERE, help="the checkout to measure (default: this one)")
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--before", metavar="REV", help="overhead: also measure git revision REV, taking turns")
    parser.add_argument("--rounds", type=int, default=1, help="overhead: rounds, each measuring every tree")
    parser.add_argument("--interleave", action="store_true",
                        help="overhead: every tree's cluster up at once, taking turns request by request")
    parser.add_argument("--routes", default=",".join(r.__name__ for r in ROUTES),
                        help="overhead: the routes to measure, comma-separated")
    args = parser.parse_args()
    repo = args.repo.resolve()
    if args.what == "codec":
        codec(repo)
    elif args.what == "overhead":
        with tempfile.TemporaryDirectory() as scratch:
            trees = {"this": repo}
            if args.before:
                trees[args.before] = checkout(args.before, scratch)
            try:
                chosen = tuple(r for r in ROUTES if r.__name__ in args.routes.split(","))
                overhead(trees, args.requests or 200, args.rounds, chosen, args.interleave)
            finally:
                if args.before:
                    subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(trees[args.before])],
                                   check=False)
    elif args.what == "hops":
        hops_table(repo, args.requests or 300)
    elif args.what == "floor":
        from floor import main as floor  # beside this file (sys.path[0])

        floor(args.requests or 300)
    else:
        throughput(repo, args.requests or 64)
