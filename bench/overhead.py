"""What serving costs, per request and per process, next to the floors a Python HTTP server sets.

    .venv/bin/python -m bench.overhead [--duration-s 5] [--rounds 2] [--concurrency 1,16,64] [--before REV]

Systems, all started side by side on 127.0.0.1 and measured in turn:
- ddml: ddml-gateway (whatever it serves: its own gunicorn settings and worker class),
  ddml-broker and ddml-worker --model echo (no model work), this tree's code;
- ddml@REV (with --before REV): the same three from git revision REV, checked out in a
  temporary worktree, so that a change is measured before and after in one run;
- bare ASGI: a Falcon ASGI app that echoes the body (bench/peers/echo_app.py) under gunicorn
  with uvicorn_worker.UvicornWorker, as many processes as the gateway's default: the floor;
- bare gthread: the same app as WSGI under gunicorn's gthread worker, with the gateway's
  default processes and threads.

Load: wrk (bench/wrk/post.lua), single-sentence JSON bodies ({"inputs": ["..."]}), closed loop at
each --concurrency, for --duration-s a run. CPU: utime + stime from /proc/PID/stat of each process
and its descendants, read just before and just after each wrk run, divided by the requests wrk
completed: µs of CPU per request, per process (gateway, broker, worker for ddml). Every round runs
every system at every concurrency, the systems' order rotating from one load to the next, so that a
slow spell of this shared machine lands on all of them. The table gives the median over rounds
and each round's figure; the ratios (whole stack / bare ASGI, gateway / bare ASGI, and the issue's
targets at c64: ≤ 3.5 and ≤ 2) are of figures from the same round, then the median.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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

from bench.compare import LUA, answers, cpu_seconds, descendants, write_bodies
from tests.processes import REPO, free_port

ECHO_PATH = "/echo"
DDML_PATH = "/v1/models/echo/predict"
TARGET_STACK = 3.5  # the targets at c64: whole stack and gateway alone, ÷ bare ASGI
TARGET_GATEWAY = 2.0


class Launched:
    """A process started in its own session from a given checkout, its output in a log file."""

    def __init__(self, args: list[str], log: Path, tree: Path, env: dict | None = None):
        self.log = log
        self.popen = subprocess.Popen(
            args, cwd=tree, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                 **(env or {})})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match:
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            match = re.search(pattern, self.log.read_text(errors="replace"))
            if match:
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        sys.exit(f"{self.popen.args[:4]} never printed {pattern!r}:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


@dataclass
class System:
    """A server under test: its URL and path, and its processes by role."""

    name: str
    url: str
    path: str
    roles: dict[str, Launched] = field(default_factory=dict)  # role -> process (with its descendants)

    def pids(self) -> dict[str, list[int]]:
        return {role: descendants([process.pid]) for role, process in self.roles.items()}

    def stop(self) -> None:
        for role in sorted(self.roles, key=lambda r: r == "broker"):  # the broker last
            self.roles[role].stop()


def start_ddml(name: str, tree: Path, logdir: Path) -> System:
    python = [sys.executable, "-m"]
    broker = Launched([*python, "broker", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0"],
                      logdir / f"{name}-broker.log", tree)
    frontend, backend = broker.wait_for(r"broker ready frontend=(\S+) backend=(\S+)").groups()
    worker = Launched([*python, "worker", "--broker", backend, "--model", "echo"], logdir / f"{name}-worker.log", tree)
    worker.wait_for(r"worker ready", timeout_s=120)
    port = free_port()
    gateway = Launched([*python, "gateway", "--broker", frontend, "--bind", f"127.0.0.1:{port}"],
                       logdir / f"{name}-gateway.log", tree)
    system = System(name, f"http://127.0.0.1:{port}", DDML_PATH,
                    {"gateway": gateway, "broker": broker, "worker": worker})
    wait_ready(system)
    return system


def start_bare(name: str, worker_class: str, logdir: Path) -> System:
    """The echo app under gunicorn with the gateway's default processes (and threads, for gthread)."""
    from gateway.config import build_parser

    defaults = build_parser().parse_args([])
    port = free_port()
    app = "bench.peers.echo_app:asgi" if worker_class.startswith("uvicorn") else "bench.peers.echo_app:wsgi"
    server = Launched([sys.executable, "-m", "gunicorn", "-k", worker_class, "-w", str(defaults.workers or 1),
                       "--threads", str(defaults.threads), "-b", f"127.0.0.1:{port}", "--backlog", "2048",
                       "--keep-alive", "5", "--no-control-socket", app], logdir / f"{name}.log", REPO)
    system = System(name, f"http://127.0.0.1:{port}", ECHO_PATH, {"server": server})
    wait_ready(system)
    return system


def wait_ready(system: System, timeout_s: float = 120) -> None:
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        for role, process in system.roles.items():
            if process.popen.poll() is not None:
                sys.exit(f"{system.name}'s {role} exited:\n{process.log.read_text(errors='replace')[-3000:]}")
        if answers(system.url + system.path, b'{"inputs": ["warm up"]}', 10):
            return
        time.sleep(0.2)
    sys.exit(f"{system.name} was not ready after {timeout_s} s")


@dataclass
class Run:
    """One wrk run against one system."""

    system: str
    concurrency: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: dict[str, float]  # role -> CPU µs per request

    @property
    def total_us(self) -> float:
        return sum(self.cpu_us.values())


def run_wrk(system: System, concurrency: int, seconds: float, bodies: Path) -> Run:
    pids = system.pids()
    before = {role: cpu_seconds(p) for role, p in pids.items()}
    output = subprocess.run(
        ["wrk", "-t", "1" if concurrency < 4 else "2", "-c", str(concurrency), "-d", f"{seconds:g}s",
         "--timeout", "30s", "-s", str(LUA), system.url],
        env={**os.environ, "BENCH_TEXTS": str(bodies), "BENCH_PATH": system.path, "BENCH_INPUTS": "1"},
        capture_output=True, text=True, timeout=seconds + 60).stdout
    after = {role: cpu_seconds(p) for role, p in pids.items()}
    match = re.search(r"BENCH_RESULT (\{.*\})", output)
    if match is None:
        sys.exit(f"wrk printed no result for {system.name} at c{concurrency}:\n{output[-2000:]}")
    result = json.loads(match.group(1))
    done = max(result["requests"], 1)
    cpu_us = {role: sum(after[role][pid] - before[role].get(pid, 0.0) for pid in after[role]) / done * 1e6
              for role in pids}
    return Run(system.name, concurrency, result["requests"] / (result["duration_us"] / 1e6), result["p50_us"] / 1000,
               result["p99_us"] / 1000, result["status_errors"] + result["socket_errors"], cpu_us)


def settle(system: System, timeout_s: float = 30) -> None:
    """Wait until the system is idle: wrk leaves requests in flight behind it."""
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        pids = [pid for group in system.pids().values() for pid in group]
        before = cpu_seconds(pids)
        time.sleep(0.3)
        after = cpu_seconds(pids)
        if sum(after[pid] - before.get(pid, 0.0) for pid in after) / 0.3 < 0.1:
            return


def report(runs: list[Run], names: list[str], concurrencies: list[int]) -> None:
    median = statistics.median
    roles = ["gateway", "broker", "worker"]
    print("\n| c | system | req/s | p50 ms | p99 ms | errors | CPU µs/request | gateway | broker | worker "
          "| ÷ bare ASGI | each round: req/s, µs/request |\n|---|---|---|---|---|---|---|---|---|---|---|---|")

    def of(name: str, concurrency: int) -> list[Run]:
        return [r for r in runs if r.system == name and r.concurrency == concurrency]

    for concurrency in concurrencies:
        floor = of("bare ASGI", concurrency)
        for name in names:
            mine = of(name, concurrency)
            if not mine:
                continue
            per_role = [f"{median(r.cpu_us[role] for r in mine):.0f}" if role in mine[0].cpu_us else ""
                        for role in roles]
            ratio = f"{median(r.total_us / f.total_us for r, f in zip(mine, floor)):.2f}" if floor else ""
            print(f"| {concurrency} | {name} | {median(r.req_per_s for r in mine):,.0f} "
                  f"| {median(r.p50_ms for r in mine):.2f} | {median(r.p99_ms for r in mine):.2f} "
                  f"| {sum(r.errors for r in mine)} | {median(r.total_us for r in mine):.0f} | {' | '.join(per_role)} "
                  f"| {ratio} | {'; '.join(f'{r.req_per_s:,.0f}, {r.total_us:.0f}' for r in mine)} |")
    print()
    for name in [n for n in names if n.startswith("ddml")]:
        for concurrency in concurrencies:
            mine, floor = of(name, concurrency), of("bare ASGI", concurrency)
            if not (mine and floor):
                continue
            stack = [r.total_us / f.total_us for r, f in zip(mine, floor)]
            gateway = [r.cpu_us["gateway"] / f.total_us for r, f in zip(mine, floor)]
            line = (f"- {name} c{concurrency}: whole stack = {median(stack):.2f}× the bare ASGI echo's CPU per "
                    f"request ({', '.join(f'{s:.2f}' for s in stack)}), gateway alone {median(gateway):.2f}× "
                    f"({', '.join(f'{g:.2f}' for g in gateway)})")
            if concurrency == 64:
                line += (f"; targets ≤ {TARGET_STACK:g} and ≤ {TARGET_GATEWAY:g}: "
                         f"{'met' if median(stack) <= TARGET_STACK else 'MISSED'}, "
                         f"{'met' if median(gateway) <= TARGET_GATEWAY else 'MISSED'}")
            print(line)
    before = [n for n in names if n.startswith("ddml@")]
    for name in before:
        for concurrency in concurrencies:
            old, new = of(name, concurrency), of("ddml", concurrency)
            if old and new:
                ratios = {"total": [n.total_us / o.total_us for o, n in zip(old, new)]}
                ratios.update({role: [n.cpu_us[role] / o.cpu_us[role] for o, n in zip(old, new) if o.cpu_us[role]]
                               for role in roles})
                print(f"- c{concurrency}: this tree ÷ {name[5:]}, CPU per request: "
                      + ", ".join(f"{role} {median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})"
                                  for role, v in ratios.items() if v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every system and concurrency")
    parser.add_argument("--concurrency", default="1,16,64", help="wrk connections, comma-separated")
    parser.add_argument("--before", metavar="REV", help="also run git revision REV's broker, worker and gateway")
    parser.add_argument("--systems", default="ddml,bare ASGI,bare gthread",
                        help="of ddml, bare ASGI, bare gthread (ddml@REV comes with --before)")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    logdir = Path(tempfile.mkdtemp(prefix="ddml-overhead-"))
    print(f"logs in {logdir}", flush=True)
    if importlib.util.find_spec("uvicorn_worker") is None:
        sys.exit("the bare ASGI floor needs uvicorn-worker: pip install '.[bench]'")
    # uvicorn picks uvloop and httptools when they are installed, asyncio and h11 otherwise: the floor
    # moves with them (so does an ASGI gateway's), so the table must say which it had.
    print("uvicorn: loop " + ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio") + ", http "
          + ("httptools" if importlib.util.find_spec("httptools") else "h11"), flush=True)
    bodies = logdir / "bodies.jsonl"
    write_bodies(bodies, 1000, seed=3)
    worktree = None
    systems: list[System] = []
    try:
        wanted = args.systems.split(",")
        if args.before:
            worktree = logdir / "before"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                           check=True, capture_output=True)
            systems.append(start_ddml(f"ddml@{args.before}", worktree, logdir))
        for name in wanted:
            if name == "ddml":
                systems.append(start_ddml("ddml", REPO, logdir))
            elif name == "bare ASGI":
                systems.append(start_bare(name, "uvicorn_worker.UvicornWorker", logdir))
            elif name == "bare gthread":
                systems.append(start_bare(name, "gthread", logdir))
            else:
                parser.error(f"unknown system {name!r}")
        for system in systems:
            run_wrk(system, 16, 1.0, bodies)  # warm-up
            settle(system)
        runs: list[Run] = []
        step = 0
        for round_index in range(args.rounds):
            for concurrency in concurrencies:
                shift = step % len(systems)
                step += 1
                for system in systems[shift:] + systems[:shift]:
                    run = run_wrk(system, concurrency, args.duration_s, bodies)
                    settle(system)
                    runs.append(run)
                    print(f"  round {round_index + 1} c{concurrency} {system.name}: {run.req_per_s:,.0f} req/s, "
                          f"p50 {run.p50_ms:.2f} ms, {run.errors} errors, CPU µs/request "
                          + ", ".join(f"{role} {us:.0f}" for role, us in run.cpu_us.items()), flush=True)
        report(runs, [s.name for s in systems], concurrencies)
    finally:
        for system in systems:
            system.stop()
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)


if __name__ == "__main__":
    main()
