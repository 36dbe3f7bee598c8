"""ddml side by side with its peers, in one run, on the same model, workload and request shape.

    bash bench/peers/setup.sh                       # once: mosec and service-streamer venvs, wrk
    .venv/bin/python -m bench.compare [--seconds 15] [--rounds 2] [--concurrency 1,16,64,256] [--systems ...]
    .venv/bin/python -m bench.compare --echo        # the broker and the gateway alone

Systems (all on 127.0.0.1, all answering POST {"inputs": ["one sentence"]} with its embedding):
- limit: the model in-process, no server (bench.peers.limit): padded at the best batch size,
  and length-sorted in batches of 64;
- ddml: ddml-gateway + ddml-broker + one ddml-worker (max batch 64, 2 torch threads);
- naive-1: Falcon under gunicorn, one sync process with 2 torch threads, one call per request;
- naive-2: the same with 2 processes × 1 torch thread;
- mosec: dynamic batching, max batch 64, 10 ms wait;
- streamer: service-streamer's Streamer (batch 64, 10 ms) behind Falcon under gunicorn.

Before timing, each system's embeddings of six check sentences must match the in-process ones
(cosine >= 0.9999). Load comes from wrk with bench/wrk/post.lua, which sends the seeded workload
(bench/workload.py: single sentences of 5 to 60 words), a different body each time. Server CPU
is the CPU time of every process of the system (its whole process tree), over the wall time.

All systems run side by side, and --rounds rounds (default 2) each measure every system at
every concurrency, in an order that rotates, so that a slow spell of this shared machine lands
on all of them. The in-process limit is measured before the first round and again after each
(with the servers idle), and reported as medians. The idle CPU of each system, while all run,
is printed first. At the end: one
Markdown table of medians over the rounds (with each round's req/s), and the issue's targets
computed from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.peers.limit import CHECK_SENTENCES
from bench.workload import sentences
from tests.processes import REPO, free_port
from worker.models import default_model_path

VENVS = REPO / "bench" / ".venvs"
LUA = REPO / "bench" / "wrk" / "post.lua"
PEER_SYSTEMS = ("naive-1", "naive-2", "mosec", "streamer")


@dataclass
class Point:
    system: str
    concurrency: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_cores: float  # server CPU seconds per wall second, all its processes
    mean_batch: float | None = None
    rounds: list[float] = field(default_factory=list)  # req/s of each round, when medians are reported


@dataclass
class Running:
    """A system under test: its process groups, where to send requests, and its logs."""

    name: str
    url: str
    path: str
    groups: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    stack: object = None  # ddml: the tests.conftest.Stack that owns its processes

    def pids(self) -> list[int]:
        roots = [p.pid for p in self.groups]
        if self.stack is not None:
            roots += [p.pid for p in self.stack.processes]
        return descendants(roots)

    def stop(self) -> None:
        if self.stack is not None:
            # A gateway finishes the requests it holds before it exits (wrk leaves up to 128 of them
            # behind, about 3 s of work at c64), within gunicorn's 30 s graceful timeout.
            for process in self.stack.processes:
                if process.args[2] == "gateway":
                    process.stop(timeout_s=60, expect_clean=False)
            self.stack.stop_all()
        for popen in self.groups:
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait(5)


# --------------------------------------------------------------------------- processes and CPU


def descendants(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def spawn(name: str, args: list[str], env: dict, logdir: Path) -> tuple[subprocess.Popen, Path]:
    log = logdir / f"{name}.log"
    popen = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=open(log, "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    return popen, log


def wait_ready(running: Running, timeout_s: float = 300) -> None:
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        for popen, log in zip(running.groups, running.logs):
            if popen.poll() is not None:
                sys.exit(f"{running.name} exited with {popen.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.post(running.url + running.path, json={"inputs": ["warm up"]}, timeout=30).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    sys.exit(f"{running.name} was not ready after {timeout_s} s")


# --------------------------------------------------------------------------- the systems


def start(name: str, logdir: Path, model_dir: str) -> Running:
    env = {"HF_HUB_OFFLINE": "1", "BENCH_MODEL_DIR": model_dir, "BENCH_TORCH_THREADS": "2",
           "PYTHONPATH": str(REPO)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if name == "ddml":
        from tests.conftest import Stack

        logdir.mkdir(parents=True, exist_ok=True)
        stack = Stack(logdir)
        stack.start_broker(*os.environ.get("BENCH_DDML_BROKER_FLAGS", "").split())
        stack.start_worker("--model", "minilm", "--device", "cpu", "--max-batch-size", "64",
                           *os.environ.get("BENCH_DDML_WORKER_FLAGS", "--torch-threads 2").split())
        _, url = stack.start_gateway(*os.environ.get("BENCH_DDML_GATEWAY_FLAGS", "").split())
        running = Running(name, url, "/v1/models/minilm/predict", stack=stack)
        running.logs = [p.log_path for p in stack.processes]
    elif name.startswith("naive-"):
        processes = int(name.split("-")[1])
        args = [str(REPO / ".venv" / "bin" / "gunicorn"), "-w", str(processes), "-b", f"127.0.0.1:{port}",
                "--timeout", "120", "--backlog", "2048", "--no-control-socket", "bench.peers.naive_app:app"]
        running = Running(name, url, "/predict")
        env["BENCH_TORCH_THREADS"] = str(2 // processes)
        popen, log = spawn(name, args, env, logdir)
        running.groups, running.logs = [popen], [log]
    elif name == "streamer":
        args = [str(VENVS / "streamer" / "bin" / "gunicorn"), "-k", "gthread", "--threads", "64", "-w", "1",
                "-b", f"127.0.0.1:{port}", "--timeout", "120", "--backlog", "2048", "--no-control-socket",
                "bench.peers.streamer_app:app"]
        running = Running(name, url, "/predict")
        popen, log = spawn(name, args, env, logdir)
        running.groups, running.logs = [popen], [log]
    elif name == "mosec":
        args = [str(VENVS / "mosec" / "bin" / "python"), "bench/peers/mosec_server.py", "--port", str(port),
                "--timeout", "30000"]
        running = Running(name, url, "/inference")
        popen, log = spawn(name, args, env, logdir)
        running.groups, running.logs = [popen], [log]
    else:
        raise ValueError(f"unknown system {name!r}")
    wait_ready(running)
    return running


def check_embeddings(running: Running, reference: dict) -> float:
    """Lowest cosine between the system's embeddings and the in-process ones."""
    lowest = 1.0
    for text, expected in zip(reference["sentences"], reference["embeddings"]):
        response = requests.post(running.url + running.path, json={"inputs": [text]}, timeout=60)
        response.raise_for_status()
        [got] = response.json()["outputs"]
        dot = sum(a * b for a, b in zip(got, expected))
        lowest = min(lowest, dot / math.sqrt(sum(a * a for a in got) * sum(b * b for b in expected)))
    return lowest


# --------------------------------------------------------------------------- load


def run_wrk(running: Running, concurrency: int, seconds: float, bodies: Path) -> tuple[dict, float]:
    """One wrk run; returns its figures and the server's CPU cores used meanwhile."""
    threads = 1 if concurrency < 4 else 2
    before_pids = running.pids()
    before, started_at = cpu_seconds(before_pids), time.monotonic()
    output = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "60s",
         "-s", str(LUA), running.url],
        env={**os.environ, "BENCH_BODIES": str(bodies), "BENCH_PATH": running.path},
        capture_output=True, text=True, timeout=seconds + 120,
    ).stdout
    elapsed = time.monotonic() - started_at
    after = cpu_seconds(running.pids())
    cpu = sum(after[pid] - before.get(pid, 0.0) for pid in after)
    match = re.search(r"BENCH_RESULT (\{.*\})", output)
    if match is None:
        sys.exit(f"wrk printed no result for {running.name} at {concurrency}:\n{output[-2000:]}")
    return json.loads(match.group(1)), cpu / elapsed


def batch_histogram(running: Running) -> dict[int, int]:
    status = requests.get(running.url + "/v1/status", timeout=10).json()
    sizes = status["models"].get("minilm", {}).get("batch_sizes", {})
    return {int(k): v for k, v in sizes.items()}


def measure(running: Running, concurrency: int, seconds: float, bodies: Path) -> Point:
    before = batch_histogram(running) if running.name == "ddml" else None
    result, cores = run_wrk(running, concurrency, seconds, bodies)
    ok = result["requests"] - result["status_errors"]
    mean_batch = None
    if before is not None:
        after = batch_histogram(running)
        grown = {k: after[k] - before.get(k, 0) for k in after}
        batches = sum(grown.values())
        mean_batch = sum(k * v for k, v in grown.items()) / batches if batches else 0.0
    return Point(running.name, concurrency, ok / (result["duration_us"] / 1e6), result["p50_us"] / 1000,
                 result["p99_us"] / 1000, result["status_errors"] + result["socket_errors"], cores, mean_batch)


def median_point(points: list[Point]) -> Point:
    """One figure per column over rounds: medians, except errors, which add up."""
    def median(values):
        return statistics.median(values) if values else None

    first = points[0]
    batches = [p.mean_batch for p in points if p.mean_batch is not None]
    return Point(first.system, first.concurrency, median([p.req_per_s for p in points]),
                 median([p.p50_ms for p in points]), median([p.p99_ms for p in points]),
                 sum(p.errors for p in points), median([p.cpu_cores for p in points]), median(batches),
                 rounds=[p.req_per_s for p in points])


def median_limit(limits: list[dict]) -> dict:
    """The in-process limit as medians over its measurements (before the first round and after each)."""
    sizes = limits[0]["padded_items_per_s"]
    return {
        "padded_items_per_s": {size: statistics.median(m["padded_items_per_s"][size] for m in limits) for size in sizes},
        "sorted64_items_per_s": statistics.median(m["sorted64_items_per_s"] for m in limits),
        "batch1_p50_ms": statistics.median(m["batch1_p50_ms"] for m in limits),
        "runs": len(limits),
        "sorted64_each": [m["sorted64_items_per_s"] for m in limits],
        "batch1_each": [m["batch1_p50_ms"] for m in limits],
    }


def settle(running: Running, timeout_s: float = 300.0) -> None:
    """Wait until the system is idle again: wrk stops with up to `concurrency` requests in flight,
    and a server keeps computing them (at c256 on a CPU, that is seconds of work)."""
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        if idle_cores([running], 0.5)[running.name] < 0.1:
            return
    print(f"  ({running.name} still busy {timeout_s:.0f} s after its run)", flush=True)


def idle_cores(systems: list[Running], seconds: float) -> dict[str, float]:
    """CPU each system burns with no load, while the others run too (what it takes from them)."""
    pids = {running.name: running.pids() for running in systems}
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    time.sleep(seconds)
    return {name: sum(cpu_seconds(p).get(pid, 0.0) - before[name].get(pid, 0.0) for pid in p) / seconds
            for name, p in pids.items()}


def write_bodies(path: Path, count: int = 5000) -> None:
    with open(path, "w") as out:
        for text in sentences(count, seed=2):
            out.write(json.dumps({"inputs": [text]}) + "\n")


# --------------------------------------------------------------------------- report


def report(limit: dict, points: list[Point], checks: dict[str, float]) -> None:
    padded_best = max(limit["padded_items_per_s"].values())
    best_size = max(limit["padded_items_per_s"], key=limit["padded_items_per_s"].get)
    sorted64 = limit["sorted64_items_per_s"]
    print(f"\n## In-process limit (2 torch threads), medians of {limit.get('runs', 1)} measurements\n")
    print("| batch | padded items/s |\n|---|---|")
    for size, rate in limit["padded_items_per_s"].items():
        print(f"| {size} | {rate:.1f} |")
    print(f"| 64, length-sorted | {sorted64:.1f} |")
    print(f"\nbatch-1 latency p50: {limit['batch1_p50_ms']:.2f} ms")
    if "sorted64_each" in limit:
        print("each measurement, sorted limit: " + ", ".join(f"{v:.1f}" for v in limit["sorted64_each"])
              + "; batch-1 p50: " + ", ".join(f"{v:.2f}" for v in limit["batch1_each"]) + " ms")
    print()
    print("## Over HTTP (wrk), one run: medians over rounds\n")
    print("| system | concurrency | req/s | req/s per round | p50 ms | p99 ms | errors | ÷ sorted limit "
          "| ÷ padded limit | server CPU (cores) | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        batch = f"{p.mean_batch:.1f}" if p.mean_batch is not None else ""
        print(f"| {p.system} | {p.concurrency} | {p.req_per_s:.1f} | {', '.join(f'{r:.1f}' for r in p.rounds)} "
              f"| {p.p50_ms:.1f} | {p.p99_ms:.1f} | {p.errors} | {p.req_per_s / sorted64:.2f} "
              f"| {p.req_per_s / padded_best:.2f} | {p.cpu_cores:.2f} | {batch} |")
    print(f"\npadded limit: {padded_best:.1f} items/s at batch {best_size}; sorted limit: {sorted64:.1f} items/s")
    print("correctness (lowest cosine to in-process): "
          + ", ".join(f"{name} {value:.6f}" for name, value in checks.items()))

    def at(system: str, concurrency: int) -> Point | None:
        return next((p for p in points if p.system == system and p.concurrency == concurrency), None)

    print("\n## Targets, from this run\n")
    for concurrency in (16, 64):
        ddml = at("ddml", concurrency)
        peers = [p for p in (at(s, concurrency) for s in PEER_SYSTEMS) if p is not None]
        if ddml and peers:
            best = max(peers, key=lambda p: p.req_per_s)
            ratio = ddml.req_per_s / best.req_per_s
            print(f"- c{concurrency}: ddml {ddml.req_per_s:.1f} req/s = {ratio:.2f}× the best peer "
                  f"({best.system}, {best.req_per_s:.1f}); target ≥ 1.3: {'met' if ratio >= 1.3 else 'MISSED'}")
    ddml64, ddml256, ddml1 = at("ddml", 64), at("ddml", 256), at("ddml", 1)
    if ddml64:
        ratio = ddml64.req_per_s / sorted64
        print(f"- c64: ddml = {ratio:.2f}× the length-sorted limit; target ≥ 0.9: {'met' if ratio >= 0.9 else 'MISSED'}")
        peers = [p for p in (at(s, 64) for s in PEER_SYSTEMS) if p is not None]
        if peers:
            best = max(peers, key=lambda p: p.req_per_s)
            ratio = ddml64.p99_ms / best.p99_ms
            print(f"- c64: ddml p99 {ddml64.p99_ms:.0f} ms = {ratio:.2f}× the best peer's ({best.system}, "
                  f"{best.p99_ms:.0f} ms); target ≤ 0.5: {'met' if ratio <= 0.5 else 'MISSED'}")
    if ddml1:
        added = ddml1.p50_ms - limit["batch1_p50_ms"]
        print(f"- c1: ddml p50 {ddml1.p50_ms:.2f} ms = batch-1 latency {added:+.2f} ms; target ≤ +2: "
              f"{'met' if added <= 2 else 'MISSED'}")
    if ddml64 and ddml256:
        ratio = ddml256.req_per_s / ddml64.req_per_s
        ok = ddml256.errors == 0 and ratio >= 0.9
        print(f"- c256: {ddml256.errors} errors, {ratio:.2f}× the c64 throughput; target 0 errors and ≥ 0.9: "
              f"{'met' if ok else 'MISSED'}")


# --------------------------------------------------------------------------- echo mode


def echo_mode(seconds: float, logdir: Path) -> None:
    """The broker and the gateway without a model: what they cost, next to a bare Falcon app."""
    from bench.echo import raw_throughput
    from tests.conftest import Stack

    print("\n## Broker alone: echo worker, bare DEALER clients, single-input requests\n")
    for clients in (1, 2, 3):
        raw_throughput(clients, seconds, 256)

    bodies = logdir / "echo.jsonl"
    with open(bodies, "w") as out:
        for text in sentences(1000, seed=3):
            out.write(json.dumps({"inputs": [text]}) + "\n")
    stack = Stack(logdir)
    try:
        stack.start_broker()
        stack.start_worker("--model", "echo", "--max-batch-size", "256")
        _, url = stack.start_gateway()
        gateway = Running("ddml gateway (echo)", url, "/v1/models/echo/predict", stack=stack)
        wait_ready(gateway)
        port = free_port()
        hello_env = {"DDML_BIND": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
        popen, log = spawn("hello", [str(REPO / ".venv" / "bin" / "gunicorn"), "-c", "python:gateway.gunicorn_conf",
                                     "bench.peers.naive_app:app"], hello_env, logdir)
        hello = Running("bare Falcon hello-world", f"http://127.0.0.1:{port}", "/hello", [popen], [log])
        wait_ready(hello)
        print("\n## Gateway with an echo worker, against a bare Falcon app under the same gunicorn settings\n")
        print("| system | concurrency | req/s | p50 ms | p99 ms | errors | server CPU (cores) |\n|---|---|---|---|---|---|---|")
        rates: dict[tuple[str, int], float] = {}
        for running in (hello, gateway):
            run_wrk(running, 16, 3, bodies)  # warm-up, as for the model systems
        for concurrency in (16, 64):
            for running in (hello, gateway):  # side by side, in turn
                point = measure(running, concurrency, seconds, bodies)
                rates[running.name, concurrency] = point.req_per_s
                print(f"| {running.name} | {concurrency} | {point.req_per_s:,.0f} | {point.p50_ms:.2f} | "
                      f"{point.p99_ms:.2f} | {point.errors} | {point.cpu_cores:.2f} |", flush=True)
        for concurrency in (16, 64):
            ratio = rates[gateway.name, concurrency] / rates[hello.name, concurrency]
            print(f"\n- c{concurrency}: gateway = {ratio:.2f}× the bare Falcon app; target ≥ 0.5: "
                  f"{'met' if ratio >= 0.5 else 'MISSED'}")
        hello.stop()
    finally:
        stack.stop_all()


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="per wrk run")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--systems", default="ddml,naive-1,naive-2,mosec,streamer")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every system and concurrency; "
                        "the table gives medians")
    parser.add_argument("--limit-seconds", type=float, default=5.0, help="per in-process measurement")
    parser.add_argument("--echo", action="store_true", help="only the echo mode: broker and gateway, no model")
    parser.add_argument("--device", default="cpu", help="for the limit (ddml's worker: BENCH_DDML_WORKER_FLAGS)")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="padded batch sizes the limit tries")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    logdir = Path(tempfile.mkdtemp(prefix="ddml-compare-"))
    print(f"logs in {logdir}", flush=True)
    if args.echo:
        return echo_mode(args.seconds, logdir)

    model_dir = str(default_model_path())
    reference_path = logdir / "reference.json"

    def measure_limit() -> dict:
        print("measuring the in-process limit ...", flush=True)
        return json.loads(subprocess.run(
            [sys.executable, "-m", "bench.peers.limit", "--model-dir", model_dir, "--seconds",
             str(args.limit_seconds), "--reference", str(reference_path), "--device", args.device,
             "--batch-sizes", args.batch_sizes],
            cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout.strip().splitlines()[-1])

    limits = [measure_limit()]  # again after every round: the machine's speed drifts
    reference = json.loads(reference_path.read_text())
    assert reference["sentences"] == CHECK_SENTENCES
    bodies = logdir / "bodies.jsonl"
    write_bodies(bodies)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    names = args.systems.split(",")
    checks: dict[str, float] = {}
    systems: dict[str, Running] = {}
    rounds: dict[tuple[str, int], list[Point]] = {}
    try:
        # All systems run side by side, and each round measures every one of them at each
        # concurrency, in an order that rotates: a slow spell of this shared machine then lands
        # on all of them, not on whichever happened to run during it.
        for name in names:
            print(f"starting {name} ...", flush=True)
            systems[name] = running = start(name, logdir, model_dir)
            checks[name] = check_embeddings(running, reference)
            if checks[name] < 0.9999:
                sys.exit(f"{name}: embeddings differ from in-process ones (cosine {checks[name]:.6f}); not timing it")
            run_wrk(running, 16, 3, bodies)  # warm-up
        idle = idle_cores(list(systems.values()), 5.0)
        print("idle CPU (cores) while all run: " + ", ".join(f"{n} {c:.3f}" for n, c in idle.items()), flush=True)
        for round_index in range(args.rounds):
            for step, concurrency in enumerate(concurrencies):
                shift = (round_index + step) % len(names)
                for name in names[shift:] + names[:shift]:
                    point = measure(systems[name], concurrency, args.seconds, bodies)
                    settle(systems[name])  # the requests wrk left behind must not run into the next system's turn
                    rounds.setdefault((name, concurrency), []).append(point)
                    print(f"  round {round_index + 1} {name} c{concurrency}: {point.req_per_s:.1f} req/s, "
                          f"p50 {point.p50_ms:.1f} ms, p99 {point.p99_ms:.1f} ms, errors {point.errors}, "
                          f"CPU {point.cpu_cores:.2f}"
                          + (f", mean batch {point.mean_batch:.1f}" if point.mean_batch is not None else ""), flush=True)
            limits.append(measure_limit())
    finally:
        for running in systems.values():
            running.stop()
    points = [median_point(rounds[name, c]) for name in names for c in concurrencies if (name, c) in rounds]
    limit = median_limit(limits)
    report(limit, points, checks)


if __name__ == "__main__":
    main()
