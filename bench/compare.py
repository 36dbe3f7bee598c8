"""ddml side by side with its peers, in one run, on the same model, workloads and request shape.

    bash bench/peers/setup.sh                       # once: mosec, service-streamer and infinity venvs, wrk
    .venv/bin/python -m bench.compare [--workloads closed,bulk,open] [--systems ...] [--rounds 2] [--quick]
    .venv/bin/python -m bench.compare --echo        # the broker and the gateway alone

Systems (all on 127.0.0.1, all answering a POST of N sentences with their embeddings):
- limit: the model in-process, no server (bench.peers.limit): padded at the best batch size,
  and length-sorted in batches of 64; always measured, since every ratio is to it;
- in-process best (with ddml and the closed workload): ddml's own worker code, its compute lanes
  and unpadded passes, fed by a closed loop of N single-sentence clients with no HTTP and no
  broker (bench.peers.worker_limit), at each --concurrency: what ddml would serve at cN if
  serving cost nothing, and #25's target (ddml ≥ 0.95× it at c64). With the ratio at each cN comes
  where the rest goes: the cores ddml's processes used against the cores the best used (idle time,
  or CPU others took), and ddml's CPU per request by process (gateway, broker, worker) against the
  best's CPU per input (what serving costs on top of the compute);
- ddml: ddml-gateway + ddml-broker + one ddml-worker (max batch 64, 2 torch threads);
- naive-1: Falcon under gunicorn, one sync process with 2 torch threads, one call per request;
- naive-2: the same with 2 processes × 1 torch thread;
- mosec: dynamic batching, max batch 64, 10 ms wait;
- streamer: service-streamer's Streamer (batch 64, 10 ms) behind Falcon under gunicorn;
- infinity: infinity-emb's own server (torch engine on the CPU, batch 64, 2 torch threads),
  POST /embeddings with an OpenAI-style body.
The peers' model passes hold at most 64 inputs, as ddml's and infinity's batches do.

Workloads (--workloads, all three by default):
- closed: wrk (bench/wrk/post.lua), single-sentence requests, at each --concurrency;
- bulk: requests of 32 and of 256 sentences at concurrency 2 and 4, closed loop
  (bench.openloop: no request starts after --bulk-seconds, and the ones in flight are waited
  for, so that items/s = inputs answered / time to the last reply);
- open: single-sentence requests with Poisson arrivals at 50% and 80% of the best peer's
  closed-loop capacity (the highest req/s of any peer, at any concurrency, in the first round
  of this run, or --capacity), from a generator that does not wait for replies; latency runs
  from each request's scheduled time, and a request has --openloop-timeout seconds.

Before timing, each system's embeddings of six check sentences must match the in-process ones
(cosine >= 0.9999). Load is the seeded workload (bench/workload.py: sentences of 5 to 60
words), a different body each time. Server CPU is the CPU time of every process of the system
(its whole process tree), over the wall time.

All systems run side by side, and --rounds rounds (default 2) each measure every system at
every load of every workload, in an order that rotates, so that a slow spell of this shared
machine lands on all of them. The in-process limit is measured before the first round and
again after each (with the servers idle), and reported as medians. The idle CPU of each
system, while all run, is printed first. At the end: one Markdown table over the rounds
(medians of req/s and items/s with each round's figure; bulk and open-loop percentiles over
the requests of all rounds together), and the issue's targets computed from them, each with
where its figures came from.
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Callable, Coroutine

import requests

from bench import openloop
from bench.peers.limit import CHECK_SENTENCES
from bench.workload import sentences
from tests.processes import REPO, free_port
from worker.models import default_model_path

VENVS = REPO / "bench" / ".venvs"
LUA = REPO / "bench" / "wrk" / "post.lua"
PEER_SYSTEMS = ("naive-1", "naive-2", "mosec", "streamer", "infinity")
BATCHING_PEERS = ("mosec", "streamer", "infinity")
SERVERS = ("ddml",) + PEER_SYSTEMS
WORKLOADS = ("closed", "bulk", "open")
BULK_INPUTS = (32, 256)
BULK_CONCURRENCY = (2, 4)
OPEN_FRACTIONS = (0.5, 0.8)
TEXTS_SEED = 2  # the sentences every workload draws its bodies from
DDML_WORKER_FLAGS = ("--model", "minilm", "--device", "cpu", "--max-batch-size", "64")  # + ddml_worker_flags()


def ddml_worker_flags() -> list[str]:
    """ddml's worker flags for experiments, from BENCH_DDML_WORKER_FLAGS (the in-process best gets them too)."""
    return os.environ.get("BENCH_DDML_WORKER_FLAGS", "--torch-threads 2").split()


@dataclass
class Point:
    system: str
    concurrency: int  # clients of a closed loop; 0 for the open loop
    req_per_s: float  # replies/s
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_cores: float  # server CPU seconds per wall second, all its processes
    mean_batch: float | None = None
    cpu_split: dict[str, float] = field(default_factory=dict)  # ddml: cpu_cores by process (gateway, broker, worker)
    rounds: list[float] = field(default_factory=list)  # each round's req/s (bulk: items/s; open: p99 ms)
    workload: str = "closed"
    inputs: int = 1  # sentences a request
    fraction: float | None = None  # open loop: the rate as a fraction of the best peer's capacity
    rate: float | None = None  # open loop: the offered req/s
    requests: int = 0
    timeouts: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # bulk and open: every request's
    note: str = ""  # bulk and open: how the generator did

    @property
    def items_per_s(self) -> float:
        return self.req_per_s * self.inputs

    @property
    def load(self) -> str:
        if self.workload == "open":
            return f"{self.fraction:.0%} of capacity, {self.rate:.1f} req/s"
        return f"{self.inputs}×c{self.concurrency}" if self.workload == "bulk" else f"c{self.concurrency}"

    def per_round(self) -> float:
        """The figure each round's column shows."""
        return {"closed": self.req_per_s, "bulk": self.items_per_s, "open": self.p99_ms}[self.workload]


@dataclass
class Running:
    """A system under test: its process groups, where to send requests, and its logs."""

    name: str
    url: str
    path: str
    groups: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    stack: object = None  # ddml: the tests.conftest.Stack that owns its processes
    shape: str = "inputs"  # its body shape: a key of bench.openloop.SHAPES

    def body(self, texts: list[str]) -> bytes:
        return openloop.body(self.shape, texts)

    def pids(self) -> list[int]:
        roots = [p.pid for p in self.groups]
        if self.stack is not None:
            roots += [p.pid for p in self.stack.processes]
        return descendants(roots)

    def roles(self) -> dict[str, list[int]]:
        """ddml: the pids of each of its processes (gateway, broker, worker: the module each runs); else {}."""
        if self.stack is None:
            return {}
        return {process.args[2]: descendants([process.pid]) for process in self.stack.processes}

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
        if answers(running.url + running.path, running.body(["warm up"]), 30):
            return
        time.sleep(0.5)
    sys.exit(f"{running.name} was not ready after {timeout_s} s")


def answers(url: str, body: bytes, timeout_s: float) -> bool:
    """Whether a JSON POST of body to url succeeds (False on a refused connection, too)."""
    try:
        return requests.post(url, data=body, timeout=timeout_s, headers={"Content-Type": "application/json"}).ok
    except requests.RequestException:
        return False


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
        stack.start_worker(*DDML_WORKER_FLAGS, *ddml_worker_flags())
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
    elif name in ("streamer", "mosec", "infinity"):
        if not (VENVS / name / "bin" / "python").exists():
            sys.exit(f"{name}: no {VENVS / name}; run bash bench/peers/setup.sh")
        if name == "streamer":
            args = [str(VENVS / name / "bin" / "gunicorn"), "-k", "gthread", "--threads", "64", "-w", "1",
                    "-b", f"127.0.0.1:{port}", "--timeout", "120", "--backlog", "2048", "--no-control-socket",
                    "bench.peers.streamer_app:app"]
            running = Running(name, url, "/predict")
        elif name == "mosec":
            args = [str(VENVS / name / "bin" / "python"), "bench/peers/mosec_server.py", "--port", str(port),
                    "--timeout", "30000"]
            running = Running(name, url, "/inference")
        else:
            # Its defaults otherwise: no torch.compile, and BetterTransformer asked for but inactive
            # (it needs optimum < 2, which infinity-emb[server,torch] does not bring). The sorting of
            # its queue by length, its warm-up and no vector cache are its defaults too.
            args = [str(VENVS / name / "bin" / "python"), "bench/peers/infinity_server.py", "v2",
                    "--model-id", model_dir, "--served-model-name", "minilm", "--engine", "torch",
                    "--device", "cpu", "--batch-size", "64", "--host", "127.0.0.1", "--port", str(port),
                    "--log-level", "warning"]
            env.update(DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
            running = Running(name, url, "/embeddings", shape="openai")
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
        response = requests.post(running.url + running.path, data=running.body([text]), timeout=60,
                                 headers={"Content-Type": "application/json"})
        response.raise_for_status()
        [got] = openloop.embeddings(running.shape, response.json())
        dot = sum(a * b for a, b in zip(got, expected))
        lowest = min(lowest, dot / math.sqrt(sum(a * a for a in got) * sum(b * b for b in expected)))
    return lowest


# --------------------------------------------------------------------------- load


def cpu_meter(running: Running) -> Callable[[], float]:
    """Starts counting the server's CPU time; the function returned gives the cores it used since."""
    before, started_at = cpu_seconds(running.pids()), time.monotonic()

    def cores() -> float:
        elapsed = time.monotonic() - started_at
        after = cpu_seconds(running.pids())
        return sum(after[pid] - before.get(pid, 0.0) for pid in after) / elapsed

    return cores


def split_meter(running: Running) -> Callable[[], dict[str, float]]:
    """ddml: like cpu_meter, by process (gateway, broker, worker); {} for the others."""
    roles = running.roles()
    before, started_at = {role: cpu_seconds(pids) for role, pids in roles.items()}, time.monotonic()

    def cores() -> dict[str, float]:
        elapsed = time.monotonic() - started_at
        after = {role: cpu_seconds(pids) for role, pids in roles.items()}
        return {role: sum(cpu - before[role].get(pid, 0.0) for pid, cpu in used.items()) / elapsed
                for role, used in after.items()}

    return cores


def batch_meter(running: Running) -> Callable[[], float | None]:
    """ddml only: the function returned gives the mean number of inputs per predict() call (a
    pass, for a continuous worker; a batch otherwise) that its workers ran since, from the figures
    their heartbeats carry (so up to one heartbeat interval late)."""
    if running.name != "ddml":
        return lambda: None
    before = worker_figures(running)

    def mean_batch() -> float:
        after = worker_figures(running)
        batches, items = after[0] - before[0], after[1] - before[1]
        return items / batches if batches else 0.0

    return mean_batch


def run_wrk(running: Running, concurrency: int, seconds: float, bodies: Path) -> tuple[dict, float]:
    """One wrk run over the sentences in `bodies` (write_bodies), one a request, in the system's body
    shape; returns wrk's figures and the server's CPU cores used meanwhile."""
    threads = 1 if concurrency < 4 else 2
    prefix, suffix = openloop.SHAPES[running.shape]
    cores = cpu_meter(running)
    output = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "60s",
         "-s", str(LUA), running.url],
        env={**os.environ, "BENCH_TEXTS": str(bodies), "BENCH_PATH": running.path, "BENCH_BODY_PREFIX": prefix,
             "BENCH_BODY_SUFFIX": suffix, "BENCH_INPUTS": "1"},
        capture_output=True, text=True, timeout=seconds + 120,
    ).stdout
    used = cores()
    match = re.search(r"BENCH_RESULT (\{.*\})", output)
    if match is None:
        sys.exit(f"wrk printed no result for {running.name} at {concurrency}:\n{output[-2000:]}")
    return json.loads(match.group(1)), used


def worker_figures(running: Running) -> tuple[int, int]:
    """predict() calls and inputs, over all of ddml's workers, as their last heartbeats said."""
    status = requests.get(running.url + "/v1/status", timeout=10).json()
    workers = [w for w in status["workers"] if "minilm" in w.get("models", [])]
    return (sum(w.get("stats", {}).get("batches", 0) for w in workers),
            sum(w.get("stats", {}).get("items", 0) for w in workers))


def measure(running: Running, concurrency: int, seconds: float, bodies: Path) -> Point:
    """The closed workload: single-sentence requests from wrk."""
    mean_batch = batch_meter(running)
    by_process = split_meter(running)
    result, cores = run_wrk(running, concurrency, seconds, bodies)
    by_process = by_process()
    ok = result["requests"] - result["status_errors"]
    return Point(running.name, concurrency, ok / (result["duration_us"] / 1e6), result["p50_us"] / 1000,
                 result["p99_us"] / 1000, result["status_errors"] + result["socket_errors"], cores, mean_batch(),
                 by_process, requests=result["requests"], timeouts=result.get("timeouts", 0))


def measure_loop(running: Running, workload: str, load: Coroutine, inputs: int = 1, concurrency: int = 0,
                 fraction: float | None = None, rate: float | None = None) -> Point:
    """The bulk or open workload: one bench.openloop run (the coroutine `load`) against the system."""
    mean_batch, cores, by_process = batch_meter(running), cpu_meter(running), split_meter(running)
    result = asyncio.run(load)
    used, by_process = cores(), by_process()
    figures = result.summary()
    return Point(running.name, concurrency, figures["req_per_s"], figures["p50_ms"], figures["p99_ms"],
                 result.error_count, used, mean_batch(), by_process, workload=workload, inputs=inputs, fraction=fraction,
                 rate=rate, requests=result.requests, timeouts=result.errors["timeout"],
                 latencies_ms=result.latencies_ms,
                 note=f"generator: {result.connections} connections, lag ≤ {result.lag_ms_max:.1f} ms, "
                      f"{result.cpu_s:.2f} s CPU" + "".join(f", {n} {kind}" for kind, n in result.errors.items()))


def median_point(points: list[Point]) -> Point:
    """One figure per column over rounds: medians of rates, errors added up; closed-loop percentiles
    are medians of each round's, bulk and open-loop ones are over every request of every round."""
    def median(values):
        return statistics.median(values) if values else None

    first = points[0]
    batches = [p.mean_batch for p in points if p.mean_batch is not None]
    pooled = [latency for p in points for latency in p.latencies_ms]
    if first.workload == "closed" or not pooled:
        p50, p99 = median([p.p50_ms for p in points]), median([p.p99_ms for p in points])
    else:
        p50, p99 = openloop.percentile(pooled, 50), openloop.percentile(pooled, 99)
    return Point(first.system, first.concurrency, median([p.req_per_s for p in points]), p50, p99,
                 sum(p.errors for p in points), median([p.cpu_cores for p in points]), median(batches),
                 {role: median([p.cpu_split[role] for p in points if role in p.cpu_split]) for role in first.cpu_split},
                 rounds=[p.per_round() for p in points], workload=first.workload, inputs=first.inputs,
                 fraction=first.fraction, rate=first.rate, requests=sum(p.requests for p in points),
                 timeouts=sum(p.timeouts for p in points))


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


def median_best(bests: list[dict]) -> dict:
    """The in-process best per concurrency, as medians over its measurements; {} if not measured."""
    bests = [b for b in bests if b]
    if not bests:
        return {}
    out = {"lanes": bests[0]["lanes"], "closed": {}}
    for concurrency in bests[0]["closed"]:
        runs = [b["closed"][concurrency] for b in bests]
        out["closed"][int(concurrency)] = {
            "items_per_s": statistics.median(r["items_per_s"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "each": [r["items_per_s"] for r in runs],
            "cpu_cores": statistics.median(r.get("cpu_cores", math.nan) for r in runs),
            "cpu_ms_per_input": statistics.median(r.get("cpu_ms_per_input", math.nan) for r in runs),
        }
    return out


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


def write_bodies(path: Path, count: int = 5000, seed: int = TEXTS_SEED) -> None:
    """The sentences wrk sends (bench/wrk/post.lua), one JSON string a line."""
    with open(path, "w") as out:
        for text in sentences(count, seed=seed):
            out.write(json.dumps(text) + "\n")


# --------------------------------------------------------------------------- report


def report(limit: dict, points: list[Point], checks: dict[str, float], capacity: Capacity | None = None,
           timeout_s: float = 10.0, best: dict | None = None) -> None:
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
    print("## Over HTTP, one run: every system and workload\n")
    print("- closed: wrk, one sentence a request, N clients (cN); medians over rounds.")
    print("- bulk: N sentences a request × c clients, closed loop (bench.openloop); items/s: medians over rounds; "
          "p50/p99: over every request of every round.")
    if capacity is not None:
        print(f"- open: Poisson arrivals of one-sentence requests at a share of the best peer's closed-loop capacity "
              f"({capacity.describe()}); latency from each request's scheduled time; p50/p99 over every request "
              f"of every round, timeouts (> {timeout_s:g} s) counted at {timeout_s:g} s; per round: p99 ms.")
    print()
    print("| workload | load | system | req/s | items/s | per round | requests | p50 ms | p99 ms | errors "
          "| ÷ sorted limit | ÷ padded limit | server CPU (cores) | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        rows = [p for p in points if p.workload == workload]
        if workload == "closed" and rows and best:
            for concurrency, figures in best["closed"].items():
                rate = figures["items_per_s"]
                print(f"| closed | c{concurrency} | limit (in-process best: worker code, {best['lanes']} lanes) "
                      f"| {rate:.1f} | {rate:.1f} | {', '.join(f'{v:.1f}' for v in figures['each'])} | "
                      f"| {figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} | | {rate / sorted64:.2f} "
                      f"| {rate / padded_best:.2f} | | |")
        if workload == "bulk" and rows:
            print(f"| bulk | batches of 64 | limit (length-sorted) | | {sorted64:.1f} "
                  f"| {', '.join(f'{v:.1f}' for v in limit.get('sorted64_each', []))} | | | | | 1.00 "
                  f"| {sorted64 / padded_best:.2f} | | |")
        for p in rows:
            batch = f"{p.mean_batch:.1f}" if p.mean_batch is not None else ""
            errors = f"{p.errors}" + (f" ({p.timeouts} timeouts)" if p.timeouts else "")
            ratios = (f"{p.items_per_s / sorted64:.2f} | {p.items_per_s / padded_best:.2f}" if workload != "open"
                      else " | ")
            print(f"| {workload} | {p.load} | {p.system} | {p.req_per_s:.1f} | {p.items_per_s:.1f} "
                  f"| {', '.join(f'{r:.1f}' for r in p.rounds)} | {p.requests} | {p.p50_ms:.1f} | {p.p99_ms:.1f} "
                  f"| {errors} | {ratios} | {p.cpu_cores:.2f} | {batch} |")
    print(f"\npadded limit: {padded_best:.1f} items/s at batch {best_size}; sorted limit: {sorted64:.1f} items/s")
    print("correctness (lowest cosine to in-process): "
          + ", ".join(f"{name} {value:.6f}" for name, value in checks.items()))
    targets(points, limit, capacity, best or {})


def at(points: list[Point], workload: str, system: str, concurrency: int = 0, inputs: int = 1,
       fraction: float | None = None) -> Point | None:
    return next((p for p in points if p.workload == workload and p.system == system and p.inputs == inputs
                 and (p.fraction == fraction if workload == "open" else p.concurrency == concurrency)), None)


def origin(p: Point, figure: str) -> str:
    """Where a figure of a table row came from, for the targets."""
    tool = {"closed": "wrk", "bulk": "bench.openloop, closed loop", "open": "bench.openloop, open loop"}[p.workload]
    rounds = f"{len(p.rounds)} round{'s' if len(p.rounds) != 1 else ''}"
    each = ", ".join(f"{r:.1f}" for r in p.rounds)
    if p.workload == "open":
        return (f"{p.system} at {p.fraction:.0%}: {tool}, {figure} of all {p.requests} requests of {rounds} "
                f"(each round's p99: {each} ms)")
    if figure in ("p50", "p99"):
        return f"{p.system} {p.load}: {tool}, {figure}, median of {rounds}"
    return f"{p.system} {p.load}: {tool}, median of {rounds} ({each} {'items/s' if p.inputs > 1 else 'req/s'})"


def where_it_goes(ddml: Point, best: dict) -> str:
    """ddml's ratio to the in-process best, taken apart: a rate is cores ÷ CPU per input, so the ratio is
    (cores ddml's processes used ÷ cores the best used) × (the best's CPU per input ÷ ddml's CPU per
    request), up to taking medians of each. The first factor is idle time, or CPU that others took (wrk,
    the idle peers, the machine's other users); the second, what serving costs beyond the worker's own
    compute: the gateway, the broker, and the worker's CPU beyond the best's (its broker I/O thread, the
    messages). '' without the figures."""
    cores, per_input_ms = best.get("cpu_cores", math.nan), best.get("cpu_ms_per_input", math.nan)
    if not ddml.cpu_split or not ddml.req_per_s or math.isnan(cores) or math.isnan(per_input_ms):
        return ""
    used = sum(ddml.cpu_split.values())
    per_request_ms = {role: c * 1000 / ddml.req_per_s for role, c in ddml.cpu_split.items()}
    total_ms = sum(per_request_ms.values())
    worker_ms = per_request_ms.get("worker")
    beyond = f"; the worker {worker_ms - per_input_ms:+.2f} ms beyond it" if worker_ms is not None else ""
    return (f"where it goes: cores used {used:.2f} against the best's {cores:.2f} (×{used / cores:.2f}); CPU per "
            f"request {total_ms:.2f} ms (" + ", ".join(f"{role} {ms:.2f}" for role, ms in per_request_ms.items())
            + f") against the best's {per_input_ms:.2f} per input (×{per_input_ms / total_ms:.2f}{beyond})")


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(points: list[Point], limit: dict, capacity: Capacity | None, inprocess: dict | None = None) -> None:
    sorted64 = limit["sorted64_items_per_s"]
    limit_from = (f"length-sorted limit {sorted64:.1f} items/s, in-process, median of {limit.get('runs', 1)}: "
                  + ", ".join(f"{v:.1f}" for v in limit.get("sorted64_each", [sorted64])))

    def best(candidates: list[Point | None], key, lowest: bool = False) -> Point | None:
        present = [p for p in candidates if p is not None]
        return (min if lowest else max)(present, key=key) if present else None

    print("\n## Targets, from this run\n")
    if not any(p.system == "ddml" for p in points):
        return print("(ddml was not in this run)")
    ddml1, ddml16, ddml64 = (at(points, "closed", "ddml", c) for c in (1, 16, 64))
    if ddml64:
        ratio = ddml64.req_per_s / sorted64
        print(f"- c64: ddml {ddml64.req_per_s:.1f} req/s = {ratio:.2f}× the length-sorted limit; target ≥ 0.95: "
              f"{met(ratio >= 0.95)}\n  ({origin(ddml64, 'req/s')}; {limit_from})")
    peers16 = best([at(points, "closed", s, 16) for s in PEER_SYSTEMS], key=lambda p: p.req_per_s)
    if ddml16 and peers16:
        ratio = ddml16.req_per_s / peers16.req_per_s
        print(f"- c16: ddml {ddml16.req_per_s:.1f} req/s = {ratio:.2f}× the best peer ({peers16.system}, "
              f"{peers16.req_per_s:.1f}); target ≥ 1.3: {met(ratio >= 1.3)}\n"
              f"  ({origin(ddml16, 'req/s')}; {origin(peers16, 'req/s')})")
    for concurrency, figures in (inprocess or {}).get("closed", {}).items():
        ddml = at(points, "closed", "ddml", concurrency)
        if ddml:
            ratio = ddml.req_per_s / figures["items_per_s"]
            goal = f"; target ≥ 0.95 (#25): {met(ratio >= 0.95)}" if concurrency == 64 else " (#25: must not fall)"
            print(f"- c{concurrency}: ddml {ddml.req_per_s:.1f} req/s = {ratio:.2f}× the in-process best "
                  f"({figures['items_per_s']:.1f} inputs/s){goal}\n  ({origin(ddml, 'req/s')}; in-process best: "
                  f"bench.peers.worker_limit, {inprocess['lanes']} lanes, median of {len(figures['each'])}: "
                  f"{', '.join(f'{v:.1f}' for v in figures['each'])})")
            where = where_it_goes(ddml, figures)
            if where:
                print(f"  {where}")
    naive1 = at(points, "closed", "naive-1", 1)
    if ddml1 and naive1:
        added = ddml1.p50_ms - naive1.p50_ms
        print(f"- c1: ddml p50 {ddml1.p50_ms:.2f} ms = naive-1's {naive1.p50_ms:.2f} ms {added:+.2f} ms; "
              f"target ≤ +2: {met(added <= 2)}\n  ({origin(ddml1, 'p50')}; {origin(naive1, 'p50')})")
    for concurrency in BULK_CONCURRENCY:
        bulk = at(points, "bulk", "ddml", concurrency, inputs=256)
        if bulk:
            ratio = bulk.items_per_s / sorted64
            print(f"- bulk 256×c{concurrency}: ddml {bulk.items_per_s:.1f} items/s = {ratio:.2f}× the length-sorted "
                  f"limit; target ≥ 0.95: {met(ratio >= 0.95)}\n  ({origin(bulk, 'items/s')}; {limit_from})")
    fraction = OPEN_FRACTIONS[-1]
    ddml_open = at(points, "open", "ddml", fraction=fraction)
    peer_open = best([at(points, "open", s, fraction=fraction) for s in PEER_SYSTEMS], key=lambda p: p.p99_ms,
                     lowest=True)
    batching_open = best([at(points, "open", s, fraction=fraction) for s in BATCHING_PEERS], key=lambda p: p.p99_ms,
                         lowest=True)
    if ddml_open and peer_open and batching_open:
        ok = (ddml_open.p99_ms <= peer_open.p99_ms and ddml_open.p99_ms <= 0.5 * batching_open.p99_ms
              and ddml_open.errors == 0)
        print(f"- open loop at {fraction:.0%} ({ddml_open.rate:.1f} req/s): ddml p99 {ddml_open.p99_ms:.0f} ms, "
              f"{ddml_open.errors} errors; best peer's p99 {peer_open.p99_ms:.0f} ms ({peer_open.system}), "
              f"best batching peer's {batching_open.p99_ms:.0f} ms ({batching_open.system}, half: "
              f"{0.5 * batching_open.p99_ms:.0f}); target ≤ both and 0 errors: {met(ok)}\n"
              f"  ({'; '.join(dict.fromkeys(origin(p, 'p99') for p in (ddml_open, peer_open, batching_open)))}; "
              f"the rate: {fraction:.0%} of {capacity.describe() if capacity else '?'})")

    print("\nEarlier issues' targets:")
    peers64 = best([at(points, "closed", s, 64) for s in PEER_SYSTEMS], key=lambda p: p.req_per_s)
    if ddml64 and peers64:
        ratio = ddml64.p99_ms / peers64.p99_ms
        print(f"- c64: ddml p99 {ddml64.p99_ms:.0f} ms = {ratio:.2f}× the best peer's ({peers64.system}, "
              f"{peers64.p99_ms:.0f} ms); target ≤ 0.5: {met(ratio <= 0.5)}")
    if ddml1:
        added = ddml1.p50_ms - limit["batch1_p50_ms"]
        print(f"- c1: ddml p50 {ddml1.p50_ms:.2f} ms = in-process batch-1 latency {added:+.2f} ms; target ≤ +2: "
              f"{met(added <= 2)}")
    ddml256 = at(points, "closed", "ddml", 256)
    if ddml64 and ddml256:
        ratio = ddml256.req_per_s / ddml64.req_per_s
        print(f"- c256: {ddml256.errors} errors, {ratio:.2f}× the c64 throughput; target 0 errors and ≥ 0.9: "
              f"{met(ddml256.errors == 0 and ratio >= 0.9)}")


# --------------------------------------------------------------------------- echo mode


def echo_mode(seconds: float, logdir: Path) -> None:
    """The broker and the gateway without a model: what they cost, next to a bare Falcon app."""
    from bench.echo import raw_throughput
    from tests.conftest import Stack

    print("\n## Broker alone: echo worker, bare DEALER clients, single-input requests\n")
    for clients in (1, 2, 3):
        raw_throughput(clients, seconds, 256)

    bodies = logdir / "echo.jsonl"
    write_bodies(bodies, 1000, seed=3)
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


@dataclass
class Capacity:
    """The best peer's closed-loop capacity, of which the open loop's rates are shares."""

    req_per_s: float
    source: str

    def describe(self) -> str:
        return f"{self.req_per_s:.1f} req/s: {self.source}"


def best_peer_capacity(closed: list[Point], round_number: int) -> Capacity | None:
    """The highest closed-loop req/s of any peer at any concurrency (one-sentence requests)."""
    peers = [p for p in closed if p.system in PEER_SYSTEMS]
    if not peers:
        return None
    top = max(peers, key=lambda p: p.req_per_s)
    return Capacity(top.req_per_s, f"{top.system} at c{top.concurrency}, closed loop (wrk), round {round_number}")


QUICK = {"seconds": 3.0, "bulk_seconds": 3.0, "openloop_seconds": 5.0, "rounds": 1, "limit_seconds": 1.0,
         "concurrency": "1,16,64"}
FULL = {"seconds": 9.0, "bulk_seconds": 5.0, "openloop_seconds": 10.0, "rounds": 2, "limit_seconds": 4.0,
        "concurrency": "1,16,64,256"}


def estimate_s(args, servers: int, workloads: list[str]) -> float:
    """Rough wall time of a run on this 2-core machine, from the figures of earlier runs."""
    limit = (args.rounds + 1) * (args.limit_seconds * (len(args.batch_sizes.split(",")) + 2) + 12)
    starting = 15 * servers + 20  # start, check, warm up; infinity warms itself up for ~15 s more
    per_round = 0.0
    if "closed" in workloads:
        per_round += servers * len(args.concurrency.split(",")) * (args.seconds + 2)  # + settling
    if "bulk" in workloads:  # + the requests in flight at the end (up to ~10 s at 256×c4), + settling
        per_round += servers * len(BULK_INPUTS) * len(BULK_CONCURRENCY) * (args.bulk_seconds + 5)
    if "open" in workloads:
        per_round += servers * len(OPEN_FRACTIONS) * (args.openloop_seconds + 3)
    return limit + starting + args.rounds * per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="of closed, bulk, open")
    parser.add_argument("--systems", default=",".join(("limit",) + SERVERS),
                        help="of " + ", ".join(("limit",) + SERVERS) + " (the limit is measured in any case)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: " + ", ".join(
        f"--{k.replace('_', '-')} {v:g}" if not isinstance(v, str) else f"--{k} {v}" for k, v in QUICK.items())
        + " unless given")
    parser.add_argument("--seconds", type=float, help=f"per wrk run (closed; default {FULL['seconds']:g})")
    parser.add_argument("--concurrency", help=f"closed-loop clients (default {FULL['concurrency']})")
    parser.add_argument("--bulk-seconds", type=float, help="per bulk run: no request starts after it, those in "
                        f"flight are waited for (default {FULL['bulk_seconds']:g})")
    parser.add_argument("--openloop-seconds", type=float, help="per open-loop run, of arrivals; each system and "
                        f"rate gets this once a round (default {FULL['openloop_seconds']:g})")
    parser.add_argument("--openloop-timeout", type=float, default=10.0, help="seconds an open-loop request is "
                        "given from its scheduled time; later is an error (timeout)")
    parser.add_argument("--capacity", type=float, help="req/s that the open loop's rates are shares of (default: "
                        "the best peer's closed-loop req/s in round 1 of this run)")
    parser.add_argument("--seed", type=int, default=1, help="of the open loop's arrival times")
    parser.add_argument("--rounds", type=int, help="rounds over every system and load; the table gives medians "
                        f"(default {FULL['rounds']})")
    parser.add_argument("--limit-seconds", type=float, help="per in-process measurement "
                        f"(default {FULL['limit_seconds']:g})")
    parser.add_argument("--echo", action="store_true", help="only the echo mode: broker and gateway, no model")
    parser.add_argument("--device", default="cpu", help="for the limit (ddml's worker: BENCH_DDML_WORKER_FLAGS)")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="padded batch sizes the limit tries")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    os.environ["HF_HUB_OFFLINE"] = "1"
    logdir = Path(tempfile.mkdtemp(prefix="ddml-compare-"))
    print(f"logs in {logdir}", flush=True)
    if args.echo:
        return echo_mode(args.seconds, logdir)

    workloads = args.workloads.split(",")
    names = [name for name in args.systems.split(",") if name != "limit"]
    for unknown in [w for w in workloads if w not in WORKLOADS] + [n for n in names if n not in SERVERS]:
        parser.error(f"unknown workload or system {unknown!r}")
    print(f"estimated duration: about {estimate_s(args, len(names), workloads) / 60:.0f} minutes "
          f"({len(names)} server(s), workloads {', '.join(workloads)}, {args.rounds} round(s))", flush=True)
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

    def measure_best() -> dict:
        """The in-process best at each closed-loop concurrency: ddml's worker code, no server."""
        if "closed" not in workloads or "ddml" not in names:
            return {}
        print("measuring the in-process best (the worker's own code) ...", flush=True)
        return json.loads(subprocess.run(
            [sys.executable, "-m", "bench.peers.worker_limit", "--concurrency", args.concurrency, "--seconds",
             str(args.limit_seconds), "--", *DDML_WORKER_FLAGS, *ddml_worker_flags()],
            cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout.strip().splitlines()[-1])

    limits = [measure_limit()]  # again after every round: the machine's speed drifts
    bests = [measure_best()]
    reference = json.loads(reference_path.read_text())
    assert reference["sentences"] == CHECK_SENTENCES
    bodies = logdir / "bodies.jsonl"
    write_bodies(bodies)
    texts = sentences(5000, seed=TEXTS_SEED)  # the same sentences, for bench.openloop
    steps: list[tuple[str, int, int | float]] = []  # (workload, inputs, concurrency or fraction), in a round's order
    if "closed" in workloads:
        steps += [("closed", 1, int(c)) for c in args.concurrency.split(",")]
    if "bulk" in workloads:
        steps += [("bulk", inputs, c) for inputs in BULK_INPUTS for c in BULK_CONCURRENCY]
    if "open" in workloads:
        steps += [("open", 1, fraction) for fraction in OPEN_FRACTIONS]
    capacity = Capacity(args.capacity, "given (--capacity)") if args.capacity else None
    checks: dict[str, float] = {}
    systems: dict[str, Running] = {}
    rounds: dict[tuple[str, int, int | float, str], list[Point]] = {}

    def run_step(running: Running, workload: str, inputs: int, load: int | float, round_index: int) -> Point:
        url = running.url + running.path
        if workload == "closed":
            return measure(running, load, args.seconds, bodies)
        if workload == "bulk":
            payloads = openloop.bodies(running.shape, texts, inputs, 64, offset=round_index * 997)
            return measure_loop(running, "bulk", openloop.closed_loop(url, payloads, load, args.bulk_seconds,
                                                                      inputs=inputs), inputs, concurrency=load)
        rate = load * capacity.req_per_s
        # The same arrival times for every system in a round (and other ones in the next round).
        arrivals = openloop.poisson_arrivals(rate, args.openloop_seconds,
                                             seed=args.seed * 1000 + round_index * 10 + OPEN_FRACTIONS.index(load))
        payloads = openloop.bodies(running.shape, texts, 1, len(texts), offset=round_index * 997)
        return measure_loop(running, "open", openloop.open_loop(url, payloads, arrivals, args.openloop_timeout),
                            fraction=load, rate=rate)

    try:
        # All systems run side by side, and each round measures every one of them at each load of
        # each workload, in an order that rotates: a slow spell of this shared machine then lands
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
            for step_index, (workload, inputs, load) in enumerate(steps):
                if workload == "open" and capacity is None:
                    capacity = best_peer_capacity([points[0] for key, points in rounds.items() if key[0] == "closed"],
                                                  round_index + 1)
                    if capacity is None:
                        print("open loop skipped: no peer's closed-loop capacity in this run (give --capacity)")
                        steps = [step for step in steps if step[0] != "open"]
                        break
                    print(f"open-loop rates: {', '.join(f'{f:.0%}' for f in OPEN_FRACTIONS)} of "
                          f"{capacity.describe()}", flush=True)
                shift = (round_index + step_index) % len(names)
                for name in names[shift:] + names[:shift]:
                    point = run_step(systems[name], workload, inputs, load, round_index)
                    settle(systems[name])  # the requests left behind must not run into the next system's turn
                    rounds.setdefault((workload, inputs, load, name), []).append(point)
                    print(f"  round {round_index + 1} {name} {workload} {point.load}: {point.req_per_s:.1f} req/s, "
                          + (f"{point.items_per_s:.1f} items/s, " if inputs > 1 else "")
                          + f"p50 {point.p50_ms:.1f} ms, p99 {point.p99_ms:.1f} ms, "
                          f"{point.requests} requests, errors {point.errors}"
                          + (f" ({point.timeouts} timeouts)" if point.timeouts else "")
                          + f", CPU {point.cpu_cores:.2f}"
                          + (" (" + ", ".join(f"{role} {c:.2f}" for role, c in point.cpu_split.items()) + ")"
                             if point.cpu_split else "")
                          + (f", mean batch {point.mean_batch:.1f}" if point.mean_batch is not None else "")
                          + (f"; {point.note}" if point.note else ""), flush=True)
            limits.append(measure_limit())
            bests.append(measure_best())
    finally:
        for running in systems.values():
            running.stop()
    points = [median_point(rounds[workload, inputs, load, name]) for workload, inputs, load in steps for name in names
              if (workload, inputs, load, name) in rounds]
    report(median_limit(limits), points, checks, capacity, args.openloop_timeout, median_best(bests))


if __name__ == "__main__":
    main()
