"""How a continuous worker should form its passes on this machine, in process, without servers.

    .venv/bin/python -m bench.continuous [--rounds 3] [--seconds 5] [--held 64] [--configs ...]

In one process, in interleaved rounds, inputs/s of:
- the length-sorted limit, as bench.peers.limit measures it (the seeded workload sorted by
  token length, then one padded pass per 64: PlainEmbedder, the peers' model code);
- the same through HFTextModel (the worker's model code), to separate the model code from
  the batching;
- a simulated continuous worker: it holds --held inputs (a closed loop of that many clients
  that come back at once), forms each pass with worker.passes.plan_pass at the given pass
  size and token budget, runs it through HFTextModel.predict on prepare()d inputs, and
  replaces what it answered with new inputs of the seeded workload.

The ratio of the simulated worker to the limit is the ceiling for ddml at that concurrency:
what the servers (gateway, broker, HTTP) cost comes on top.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.peers.limit import items_per_s, sorted_items_per_s
from bench.peers.plain_model import PlainEmbedder
from bench.workload import sentences
from worker.models import default_model_path
from worker.models.hf_text import HFTextModel
from worker.passes import plan_pass, select_pass


def continuous_items_per_s(model: HFTextModel, texts: list[str], held_count: int, most_inputs: int,
                           budget: int, seconds: float, max_skips: int, least: int = 8) -> tuple[float, float, int]:
    """Inputs/s, mean pass size and the most passes an input waited, of a worker that always holds
    held_count inputs. max_skips < 0: every pass is anchored on the oldest input (select_pass);
    otherwise the densest run goes (densest_pass) until an input has waited max_skips passes."""
    prepared = model.prepare(texts)
    costs = [model.cost(p) for p in prepared]
    stream = iter(range(10**9))
    held = [[next(stream) % len(texts), 0] for _ in range(held_count)]  # oldest first: [text, passes waited]
    # (the held inputs stay at held_count: a pass's clients come back at once)
    done = passes = longest_wait = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        held_costs = [costs[i] for i, _ in held]
        if max_skips < 0:
            chosen = select_pass(held_costs, most_inputs, budget)
        else:
            chosen = plan_pass(held_costs, [w for _, w in held], most_inputs, budget, least, max_skips)
        model.predict([prepared[held[k][0]] for k in chosen])
        taken = set(chosen)
        longest_wait = max([longest_wait] + [held[k][1] for k in chosen])
        held = [[i, waited + 1] for k, (i, waited) in enumerate(held) if k not in taken]
        held.extend([next(stream) % len(texts), 0] for _ in chosen)
        done += len(chosen)
        passes += 1
    return done / (time.perf_counter() - started), done / passes, longest_wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--held", default="16,64", help="inputs held (closed-loop concurrency), comma-separated")
    parser.add_argument("--configs", default="16:2048:-1,16:1024:-1,16:2048:4,16:2048:8",
                        help="INPUTS:TOKENS:SKIPS, comma-separated: pass size, token budget, and how many "
                             "passes an input may wait before it anchors one (-1: every pass is anchored "
                             "on the oldest input)")
    args = parser.parse_args()
    texts = sentences(4096, seed=7)
    plain = PlainEmbedder(str(default_model_path()), threads=2)
    model = HFTextModel(model_path=str(default_model_path()))
    model.init_model()
    model.warmup()
    plain.embed(texts[:64])
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    waits: dict[str, list[int]] = {}
    held_counts = [int(n) for n in args.held.split(",")]
    results: dict[str, list[float]] = {}
    sizes: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        results.setdefault("limit: sorted 64, PlainEmbedder", []).append(
            sorted_items_per_s(plain.embed, texts, plain.tokenizer, args.seconds, 64))
        results.setdefault("sorted 64, HFTextModel (passes of 16)", []).append(
            sorted_items_per_s(model.predict, texts, model.tokenizer, args.seconds, 64))
        results.setdefault("padded 64, arrival order, PlainEmbedder", []).append(
            items_per_s(plain.embed, texts, 64, args.seconds))
        for held in held_counts:
            for most, budget, skips in configs:
                rule = "oldest first" if skips < 0 else f"densest run, oldest after {skips} passes"
                name = f"continuous, {held} held, passes of {most} / {budget} tokens, {rule}"
                rate, mean, waited = continuous_items_per_s(model, texts, held, most, budget, args.seconds, skips)
                results.setdefault(name, []).append(rate)
                sizes.setdefault(name, []).append(mean)
                waits.setdefault(name, []).append(waited)
    limit = statistics.median(results["limit: sorted 64, PlainEmbedder"])
    print("\n| what | inputs/s per round | median | ÷ limit | mean pass | most passes waited |\n"
          "|---|---|---|---|---|---|")
    for name, rates in results.items():
        mean = f"{statistics.mean(sizes[name]):.1f}" if name in sizes else ""
        waited = f"{max(waits[name])}" if name in waits else ""
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.1f} | "
              f"{statistics.median(rates) / limit:.3f} | {mean} | {waited} |")


if __name__ == "__main__":
    main()
