"""Zipf demand over 12 small models whose popularity shifts every --phase-s (issue #24): two pool
workers that may hold 3 models each, against the same two workers holding all 12 (the upper bound).

Real processes, as tests/conftest.py's Stack starts them: per configuration one broker and two
workers (`--pool --repository FILE`, `--torch-threads 1`). The models are real: tiny random-weight
BERT text-embedding models (`task = "embedding"`), each built in its own directory, so that a load
reads files and builds a model (its cost is printed). Popularity follows a Zipf law (rank k is
chosen with weight k^-s, s = 1.1) over a seeded random permutation of the models, a new one each
phase; both configurations get the same permutations.

    upper bound: `--max-models 12`, every model `min-replicas = 2`: all 24 replicas are loaded
                 before the run starts, so nothing is loaded or evicted while it runs;
    pool:        `--max-models 3`, `min-replicas = 0`, `max-replicas = 2`: placement by demand.

The client is the gateway's BrokerClient in this process, not HTTP: what differs between the two
configurations is placement, and a gunicorn gateway would only add the same HTTP cost to both while
taking CPU from the workers on a small machine. A closed loop of --concurrency clients (threads),
each sending one sentence at a time with a --timeout-s deadline; no request starts after a phase's
end, and those in flight are waited for. The configurations take turns phase by phase (pool, upper
bound, pool, ...), so that a slow spell of the machine lands on both; the one not measured is idle
(`idle-unload-s` is longer than a run, so the pool keeps what it held).

Per configuration: requests, goodput (ok requests per second of its phases), errors, p50/p99 of
the ok requests, loads and evictions during the measured phases, and for each popularity shift the
seconds until the new top 3 were all held (polled from the broker's status every --poll-s).

    .venv/bin/python -m bench.zipf_pool                    # 4 phases x 30 s per configuration: about 5 minutes
    .venv/bin/python -m bench.zipf_pool --phase-s 10 --phases 2   # a smoke test
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.workload import sentences
from gateway.broker_client import BrokerClient, BrokerError
from tests.conftest import WORDS, Stack, _tokenizer_of_vocab

MODELS = [f"m{i:02d}" for i in range(12)]
TOP = 3  # the shift is placed once the new top TOP are all held


def build_models(directory: Path, hidden: int, layers: int) -> dict[str, Path]:
    """One random-weight BERT embedding model per name, each with its own files and weights."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    paths = {}
    for index, name in enumerate(MODELS):
        path = directory / name
        path.mkdir(parents=True)
        (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        _tokenizer_of_vocab(path, BertTokenizerFast)
        config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=128)
        torch.manual_seed(index)
        BertModel(config).save_pretrained(path)
        paths[name] = path
    return paths


def write_repository(path: Path, models: dict[str, Path], min_replicas: int) -> Path:
    tables = [f'[models.{name}]\nmodel-path = "{directory}"\ntask = "embedding"\nmin-replicas = {min_replicas}\n'
              f'max-replicas = 2\nidle-unload-s = 3600\n' for name, directory in models.items()]
    path.write_text("\n".join(tables))
    return path


def zipf_weights(count: int, s: float) -> list[float]:
    return [1.0 / (rank ** s) for rank in range(1, count + 1)]


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)  # of ok requests
    errors: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    loads: int = 0
    evictions: int = 0
    load_s: float = 0.0
    placed_s: list[float | None] = field(default_factory=list)  # per shift; None: not within the phase

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())


class Configuration:
    """One broker and two workers of one kind, and the client that loads them."""

    def __init__(self, name: str, client: BrokerClient):
        self.name = name
        self.client = client
        self.tally = Tally()

    @classmethod
    def start(cls, name: str, stack: Stack, repository: Path, max_models: int, heartbeat_ms: float) -> Configuration:
        heartbeat = ("--heartbeat-interval-ms", f"{heartbeat_ms:g}")
        stack.start_broker(*heartbeat)
        for _ in range(2):
            stack.start_worker("--pool", "--repository", str(repository), "--max-models", str(max_models),
                               "--torch-threads", "1", *heartbeat)
        return cls(name, BrokerClient(stack.frontend, heartbeat_interval_s=heartbeat_ms / 1000))

    def pool_workers(self) -> list[dict]:
        return [w for w in self.client.status()["workers"] if "pool" in w]

    def held(self) -> set[str]:
        return {m for w in self.pool_workers() for m in w["models"]}

    def figures(self) -> Counter:
        return Counter({name: sum(w["stats"].get(name, 0) for w in self.pool_workers())
                        for name in ("pool_loads", "pool_evictions", "pool_load_s_total")})

    def wait_ready(self, replicas: int, timeout_s: float) -> None:
        """Until both workers have registered and `replicas` replicas are held in all."""
        give_up_at = time.monotonic() + timeout_s
        while True:
            workers = self.pool_workers()
            if len(workers) == 2 and sum(len(w["models"]) for w in workers) >= replicas:
                return
            if time.monotonic() > give_up_at:
                raise SystemExit(f"{self.name}: not ready after {timeout_s} s: {workers}")
            time.sleep(0.2)


def run_phase(config: Configuration, order: list[str], weights: list[float], args, texts: list[str],
              seed: int) -> None:
    """A closed loop of args.concurrency clients for args.phase_s; measures when the top TOP are all held."""
    tally = config.tally
    before = config.figures()
    started_at = time.monotonic()
    end_at = started_at + args.phase_s
    lock = threading.Lock()

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while time.monotonic() < end_at:
            model = rng.choices(order, weights)[0]
            sent_at = time.monotonic()
            try:
                config.client.request(model, [rng.choice(texts)], timeout_s=args.timeout_s)
            except BrokerError as error:
                with lock:
                    tally.errors[error.code.name] += 1
                continue
            with lock:
                tally.latencies_s.append(time.monotonic() - sent_at)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.concurrency)]
    for thread in threads:
        thread.start()
    placed_s = None
    top = set(order[:TOP])
    while time.monotonic() < end_at:
        if placed_s is None and top <= config.held():
            placed_s = time.monotonic() - started_at
        time.sleep(args.poll_s)
    for thread in threads:
        thread.join(timeout=args.timeout_s + 5)
    tally.elapsed_s += time.monotonic() - started_at
    tally.placed_s.append(placed_s)
    after = config.figures()
    tally.loads += after["pool_loads"] - before["pool_loads"]
    tally.evictions += after["pool_evictions"] - before["pool_evictions"]
    tally.load_s += after["pool_load_s_total"] - before["pool_load_s_total"]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def table(configs: list[Configuration], args) -> str:
    lines = [f"| configuration | requests | goodput (ok req/s) | errors | p50 ms | p99 ms | loads | evictions "
             f"| mean load s | shift → top {TOP} held, s (per phase) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config in configs:
        t = config.tally
        errors = ", ".join(f"{k} {v}" for k, v in sorted(t.errors.items())) or "0"
        placed = ", ".join("-" if s is None else f"{s:.1f}" for s in t.placed_s)
        mean_load = f"{t.load_s / t.loads:.2f}" if t.loads else "-"
        lines.append(f"| {config.name} | {t.requests} | {len(t.latencies_s) / t.elapsed_s:.1f} | {errors} | "
                     f"{percentile(t.latencies_s, 0.5) * 1000:.1f} | {percentile(t.latencies_s, 0.99) * 1000:.1f} | "
                     f"{t.loads} | {t.evictions} | {mean_load} | {placed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--phases", type=int, default=4, help="popularity shifts per configuration")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds between shifts")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="each request's deadline")
    parser.add_argument("--zipf-s", type=float, default=1.1, help="the Zipf exponent")
    parser.add_argument("--hidden", type=int, default=256, help="the tiny BERTs' hidden size")
    parser.add_argument("--layers", type=int, default=4, help="the tiny BERTs' layers")
    parser.add_argument("--heartbeat-interval-ms", type=float, default=1000.0,
                        help="brokers' and workers' (a pool worker drains an evicted model for two intervals)")
    parser.add_argument("--poll-s", type=float, default=0.2, help="how often placement is read from the broker")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    orders = [rng.sample(MODELS, len(MODELS)) for _ in range(args.phases)]
    weights = zipf_weights(len(MODELS), args.zipf_s)
    texts = sentences(200, seed=args.seed, max_words=20)
    root = Path(tempfile.mkdtemp(prefix="ddml-zipf-"))
    built_at = time.monotonic()
    models = build_models(root / "models", args.hidden, args.layers)
    print(f"built {len(models)} models (hidden {args.hidden}, {args.layers} layers) in "
          f"{time.monotonic() - built_at:.1f} s under {root}", flush=True)
    stack = Stack(root / "logs")
    (root / "logs").mkdir()
    configs: list[Configuration] = []
    try:
        configs.append(Configuration.start("pool: 2 workers × 3 models", stack,
                                           write_repository(root / "pool.toml", models, min_replicas=0), 3,
                                           args.heartbeat_interval_ms))
        configs.append(Configuration.start("upper bound: 2 workers × all 12", stack,
                                           write_repository(root / "all.toml", models, min_replicas=2), 12,
                                           args.heartbeat_interval_ms))
        pool, upper = configs
        pool.wait_ready(0, timeout_s=120)
        upper.wait_ready(2 * len(MODELS), timeout_s=300)
        print(f"ready; {args.phases} phases × {args.phase_s:g} s per configuration, taking turns; "
              f"c={args.concurrency}, deadline {args.timeout_s:g} s; orders {[o[:TOP] for o in orders]}", flush=True)
        for phase, order in enumerate(orders):
            for config in configs:
                run_phase(config, order, weights, args, texts, seed=args.seed * 100 + phase)
                t = config.tally
                print(f"phase {phase + 1} {config.name}: {t.requests} requests so far, loads {t.loads}, "
                      f"top {TOP} held after {t.placed_s[-1]} s", flush=True)
    finally:
        for config in configs:
            config.client.close()
        stack.stop_all()
    print(f"\n## Zipf (s={args.zipf_s:g}) over {len(MODELS)} models, popularity shifting every {args.phase_s:g} s, "
          f"{args.phases} phases per configuration, c={args.concurrency}, heartbeats every "
          f"{args.heartbeat_interval_ms:g} ms\n")
    print(table(configs, args))


if __name__ == "__main__":
    main()
