"""How the built-in text model should cut a batch into forward passes on this machine.

    .venv/bin/python -m bench.chunking [--rounds 3] [--seconds 4]

In one process, in interleaved rounds, inputs/s for random batches of 64 (the seeded workload):
padded in arrival order (what peers do), and HFTextModel (sorted by length, then run in passes)
at several pass sizes and token budgets. This is the measurement behind the CPU default of
passes of 16 (worker --chunk-size).
"""

from __future__ import annotations

import argparse
import statistics

from bench.peers.limit import items_per_s
from bench.peers.plain_model import PlainEmbedder
from bench.workload import sentences
from worker.models import default_model_path
from worker.models.hf_text import HFTextModel

CONFIGS = {  # name: (max_chunk, chunk_tokens)
    "one sorted pass of 64, 4096 tokens (the old default)": (64, 4096),
    "passes of 16": (16, 10**9),
    "passes of 8": (8, 10**9),
    "passes of at most 1024 tokens": (64, 1024),
    "passes of 16 and at most 2048 tokens (the CPU default)": (16, 2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    texts = sentences(2048, seed=2)
    plain = PlainEmbedder(str(default_model_path()), threads=2)
    candidates = {"padded batch of 64, arrival order (peers)": plain.embed}
    for name, (max_chunk, chunk_tokens) in CONFIGS.items():
        model = HFTextModel(model_path=str(default_model_path()), max_chunk=max_chunk, chunk_tokens=chunk_tokens)
        model.init_model()
        model.warmup()
        candidates[name] = model.predict
    plain.embed(texts[:64])
    results: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, predict in candidates.items():
            results[name].append(items_per_s(predict, texts, 64, args.seconds))
    print("\n| forward passes | inputs/s per round | median |\n|---|---|---|")
    for name, rates in results.items():
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.1f} |")


if __name__ == "__main__":
    main()
