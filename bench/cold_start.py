"""Cold start with two real models (issue #24): a request for a model that no worker holds, against the
same model's load time measured alone. Target: the first request answered within load alone + 0.5 s.

The models: MiniLM (the built-in `minilm`, HF_HUB_OFFLINE=1) and the image classifier example's
ResNet-18, exported to model.pt2 in a temp dir and declared in the repository with its tensors
(`input`/`output`, as examples/image_classifier/README.md serves it). One repository holds both.

Per model and round, side by side (the order of the two measurements alternates by round, so that
the page cache favours neither):

- **load alone**: a fresh process with no serving system (`--load-alone MODEL`) builds the model's
  WorkerConfig from the repository as a pool worker does (worker/pool.py's model_configs, through the
  worker's own parser), resolves the device (which imports torch, as the pool worker does before any
  load) and sets --torch-threads, and then times worker.serve.load_model(): handler, weights, warmup,
  exactly the call the pool worker's placement thread times. torch's import is outside the figure on
  both sides; what a load imports (transformers for MiniLM) is inside it on both sides.
- **cold start**: a fresh stack, one broker and one pool worker (`--pool --max-models 1`, nothing
  loaded); once the worker has registered, the first request's latency from send to answer (through
  the gateway's BrokerClient in this process, no HTTP), and the pool worker's own seconds for that
  load (its `loaded` event in the broker's STATUS, the figure `ddml_model_load_seconds` observes);
- **warm**: then --warm requests one after another, their median.

A fresh pool worker per measurement. Unless --no-evict, the same worker then gets a request for the
other model, which evicts the first (--max-models 1): a second table, apart, whose first request also
waits until the evicted model has been resident min_residency_s (2 s, ddml_common/placement.py) and
for its drain (until every broker has acknowledged the unload, docs/placement.md), so that it misses
the target by design.

The last column, first request − the worker's own load, is what serving adds to the load: the
placement's reaction, the request's hops and its compute. Load alone and the worker's load are the
same work in two processes; on a busy machine they differ by the machine's noise.

    .venv/bin/python -m bench.cold_start                # 3 rounds: a few minutes on a CPU
    .venv/bin/python -m bench.cold_start --rounds 1     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "resnet")
TARGET_S = 0.5  # the first request within load alone + this
_ALONE_MARK = "LOAD_ALONE "


# ---------------------------------------------------------------------------- the repository


def write_repository(directory: Path) -> Path:
    """Both models, scale to zero, one replica each; the ResNet exported to model.pt2 beside it."""
    from examples.image_classifier.model import export

    pt2 = directory / "model.pt2"
    export(str(pt2))
    path = directory / "repository.toml"
    placement = "min-replicas = 0\nmax-replicas = 1\nidle-unload-s = 3600\n"
    path.write_text(
        f"[models.minilm]\n{placement}\n"
        f'[models.resnet]\nmodel-path = "{pt2}"\ninput = ["IMAGE:FP32:3,224,224"]\n'
        f'output = ["CLASSES:INT64:5", "PROBABILITIES:FP32:5"]\n{placement}'
    )
    return path


def example_input(model: str) -> object:
    if model == "minilm":
        return "A cold start is a request that waits while its model loads."
    return np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)


def worker_flags(args) -> list[str]:
    flags = ["--heartbeat-interval-ms", f"{args.heartbeat_interval_ms:g}"]
    return flags + (["--torch-threads", str(args.torch_threads)] if args.torch_threads else [])


# ---------------------------------------------------------------------------- load alone


def load_alone_main(model: str, repository: str, flags: list[str]) -> None:
    """In a fresh process: the model's load as the pool worker performs it, timed the same way."""
    from ddml_common.repository import load_repository
    from worker.__main__ import build_parser, config_from_args
    from worker.pool import model_configs, model_flags
    from worker.serve import load_model, resolve_device

    parser = build_parser()
    base = config_from_args(parser.parse_args(["--pool", "--repository", repository, *flags]))
    configs = model_configs(load_repository(repository, model_flags(parser)), base,
                            lambda argv: config_from_args(parser.parse_args(argv)))
    device = resolve_device(base)  # imports torch, as serve_pool does before its first load
    if base.torch_threads:
        from worker.models.hf_text import set_torch_threads

        set_torch_threads(base.torch_threads)
    started_at = time.monotonic()
    load_model(configs[model], device)
    load_s = time.monotonic() - started_at
    print(_ALONE_MARK + json.dumps({"model": model, "device": device, "load_s": load_s}), flush=True)


def load_alone(model: str, repository: Path, args) -> float:
    command = [sys.executable, "-m", "bench.cold_start", "--load-alone", model, "--repository", str(repository),
               *worker_flags(args)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout_s,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in done.stdout.splitlines():
        if line.startswith(_ALONE_MARK):
            return json.loads(line[len(_ALONE_MARK):])["load_s"]
    raise SystemExit(f"load alone of {model} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


# ---------------------------------------------------------------------------- cold start


@dataclass
class Cold:
    first_s: float  # the first request, send to answer
    worker_load_s: float  # the pool worker's own load time (its `loaded` event)
    warm_ms: float  # median of the warm requests after it


def _loaded_seconds(client, model: str, after: int, timeout_s: float) -> float:
    """The seconds of the pool worker's `after`+1-th `loaded` event of `model`, from STATUS."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        events = [e for e in client.status().get("pool_events", [])
                  if e["kind"] == "loaded" and e["model"] == model]
        if len(events) > after:
            return events[after]["seconds"]
        if time.monotonic() > give_up_at:
            raise SystemExit(f"no `loaded` event for {model} within {timeout_s} s")
        time.sleep(0.1)


def _timed_request(client, model: str, timeout_s: float) -> float:
    sent_at = time.monotonic()
    client.request(model, [example_input(model)], timeout_s=timeout_s)
    return time.monotonic() - sent_at


def cold_start(models: list[str], repository: Path, logs: Path, args) -> list[Cold]:
    """A fresh broker and pool worker; each model in turn: its first request, its load, its warm requests.
    The second model's first request evicts the first (--max-models 1)."""
    from gateway.broker_client import BrokerClient
    from tests.conftest import Stack

    logs.mkdir(parents=True)
    stack = Stack(logs)
    client = None
    try:
        stack.start_broker("--heartbeat-interval-ms", f"{args.heartbeat_interval_ms:g}")
        stack.start_worker("--pool", "--repository", str(repository), "--max-models", "1", *worker_flags(args))
        client = BrokerClient(stack.frontend, heartbeat_interval_s=args.heartbeat_interval_ms / 1000)
        give_up_at = time.monotonic() + 60
        while not any("pool" in w for w in client.status()["workers"]):
            if time.monotonic() > give_up_at:
                raise SystemExit("the pool worker did not register within 60 s")
            time.sleep(0.1)
        measured = []
        for model in models:
            first_s = _timed_request(client, model, args.timeout_s)
            warm_s = [_timed_request(client, model, args.timeout_s) for _ in range(args.warm)]
            measured.append(Cold(first_s, _loaded_seconds(client, model, 0, timeout_s=10),
                                 statistics.median(warm_s) * 1000))
        return measured
    finally:
        if client is not None:
            client.close()
        stack.stop_all()


# ---------------------------------------------------------------------------- the table


@dataclass
class Row:
    model: str
    alone_s: float
    cold: Cold

    @property
    def over_s(self) -> float:
        return self.cold.first_s - self.alone_s

    @property
    def met(self) -> bool:
        return self.over_s <= TARGET_S


def median_row(label: str, rows: list[Row]) -> Row:
    med = statistics.median
    return Row(label, med(r.alone_s for r in rows),
               Cold(med(r.cold.first_s for r in rows), med(r.cold.worker_load_s for r in rows),
                    med(r.cold.warm_ms for r in rows)))


def table(rows: list[Row]) -> str:
    lines = [f"| model | load alone (s) | worker's load (s) | first request (s) | first − load alone (s) | warm (ms) "
             f"| target ≤ load + {TARGET_S:g} s | first − worker's load (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.model} | {row.alone_s:.2f} | {row.cold.worker_load_s:.2f} | {row.cold.first_s:.2f} | "
                     f"{row.over_s:+.2f} | {row.cold.warm_ms:.1f} | {'met' if row.met else 'MISSED'} | "
                     f"{row.cold.first_s - row.cold.worker_load_s:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per model")
    parser.add_argument("--warm", type=int, default=5, help="warm requests after the first (their median)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="each request's deadline, and a load alone's")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="the pool worker's and the load alone's (0: torch's default)")
    parser.add_argument("--heartbeat-interval-ms", type=float, default=1000.0, help="the broker's and the worker's")
    parser.add_argument("--no-evict", dest="evict", action="store_false",
                        help="leave out the second table (the other model's first request, evicting the first)")
    parser.add_argument("--load-alone", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--repository", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.load_alone:
        load_alone_main(args.load_alone, args.repository, worker_flags(args))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="ddml-cold-"))
    repository = write_repository(root)
    print(f"repository {repository}; {args.rounds} rounds; load {os.getloadavg()[0]:.1f} (1-min average)", flush=True)
    fresh: dict[str, list[Row]] = {m: [] for m in MODELS}
    evicting: dict[str, list[Row]] = {m: [] for m in MODELS}
    for round_ in range(args.rounds):
        for model in MODELS:
            other = next(m for m in MODELS if m != model)
            order = [model, other] if args.evict else [model]
            logs = root / f"round{round_}-{model}"
            if round_ % 2 == 0:
                alone = {m: load_alone(m, repository, args) for m in order}
                colds = cold_start(order, repository, logs, args)
            else:
                colds = cold_start(order, repository, logs, args)
                alone = {m: load_alone(m, repository, args) for m in order}
            fresh[model].append(Row(model, alone[model], colds[0]))
            if args.evict:
                evicting[other].append(Row(f"{other}, evicting {model}", alone[other], colds[1]))
            print(f"round {round_ + 1} {model}: alone {alone[model]:.2f} s, first {colds[0].first_s:.2f} s, "
                  f"worker's load {colds[0].worker_load_s:.2f} s", flush=True)
    print(f"\n## Cold start: a fresh pool worker (--max-models 1) per measurement, {args.rounds} rounds; "
          f"torch threads {args.torch_threads or 'default'}, heartbeats every {args.heartbeat_interval_ms:g} ms; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    rows = [r for m in MODELS for r in fresh[m]] + [median_row(f"{m} (median)", fresh[m]) for m in MODELS]
    print(table(rows))
    if args.evict:
        print("\n## The other model's first request on the same worker, evicting the first (it waits for the "
              "evicted model's 2 s minimum residency and its drain)\n")
        rows = [r for m in MODELS for r in evicting[m]] + [median_row(f"{evicting[m][0].model} (median)", evicting[m])
                                                           for m in MODELS]
        print(table(rows))


if __name__ == "__main__":
    main()
