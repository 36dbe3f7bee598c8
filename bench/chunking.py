"""How the built-in text model should cut a batch into forward passes on this machine.

    .venv/bin/python -m bench.chunking [--rounds 3] [--seconds 4] [--batch-sizes 16,64]

In one process, in interleaved rounds, inputs/s for random batches (the seeded workload) of
each size: padded in arrival order (what peers do), and HFTextModel (sorted by length, then
run in passes) at several pass sizes and token budgets. This is the measurement behind the
CPU default: passes of at most 16, and a smaller batch still cut into two halves of at least
8 (worker --chunk-size; hf_text._PASS_LIMITS).
"""

from __future__ import annotations

import argparse
import statistics

from bench.peers.limit import items_per_s
from bench.peers.plain_model import PlainEmbedder
from bench.workload import sentences
from worker.models import default_model_path
from worker.models.hf_text import HFTextModel

CONFIGS = {  # name: (pass_size, least_pass_size, pass_tokens)
    "one sorted pass, up to 64 and 4096 tokens": (64, 64, 4096),
    "passes of 16 (a batch of 16 in one pass)": (16, 16, 10**9),
    "passes of 8": (8, 8, 10**9),
    "passes of 16, halves down to 8, 2048 tokens (the CPU default)": (16, 8, 2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch-sizes", default="16,64")
    args = parser.parse_args()
    batch_sizes = [int(n) for n in args.batch_sizes.split(",")]
    texts = sentences(2048, seed=2)
    plain = PlainEmbedder(str(default_model_path()), threads=2)
    candidates = {"padded, arrival order (peers)": plain.embed}
    for name, (pass_size, least_pass_size, pass_tokens) in CONFIGS.items():
        model = HFTextModel(model_path=str(default_model_path()), pass_size=pass_size, pass_tokens=pass_tokens)
        model.init_model()
        model.least_pass_size = least_pass_size
        model.warmup()
        candidates[name] = model.predict
    plain.embed(texts[:64])
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch_size in batch_sizes:
            for name, predict in candidates.items():
                results.setdefault((name, batch_size), []).append(items_per_s(predict, texts, batch_size, args.seconds))
    print("\n| batch | forward passes | inputs/s per round | median |\n|---|---|---|---|")
    for (name, batch_size), rates in results.items():
        print(f"| {batch_size} | {name} | {', '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.1f} |")


if __name__ == "__main__":
    main()
