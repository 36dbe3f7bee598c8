"""The built-in text model (MiniLM) of another checkout against this one's, in one process.

    .venv/bin/python -m bench.text_ab --before /path/to/other/checkout [--rounds 30]

Both checkouts' HFTextModel run in one process, taking turns on the same random draws: a batch
of 64 sentences through predict() (tokenised, sorted, cut into passes), and prepare()d passes
of 8 and of 1, as a continuous worker runs them. Each checkout's modules are imported in turn
(sys.modules cleared between), and each model is built and loaded while its own modules are
current; predict() imports nothing after that. The figure is inputs per CPU second of the
calling thread at 1 torch thread, which the other processes of a shared machine disturb less
than wall time. The model loaded first runs 1-2% faster (memory placement), so the run is made
twice, in both load orders, each in a fresh process, and the ratio is their mean. The outputs
of the two must also agree bit for bit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = (("batch of 64", 64), ("pass of 8", 8), ("pass of 1", 1))


def _load(path: str):
    for name in [m for m in sys.modules if m.split(".")[0] in ("worker", "bench", "ddml_common")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        hf_text = importlib.import_module("worker.models.hf_text")
        models = importlib.import_module("worker.models")
        if not hf_text.__file__.startswith(path):
            raise SystemExit(f"{path}: imported {hf_text.__file__} instead")
        model = hf_text.HFTextModel(device="cpu", model_path=str(models.default_model_path()))
        model.init_model()
        model.warmup()
        return model, importlib.import_module("bench.workload").sentences(2000, seed=1)
    finally:
        sys.path.remove(path)


def one_order(checkouts: dict[str, str], rounds: int) -> dict:
    """CPU seconds per call of each kind, each checkout, loaded in the order given."""
    import torch

    torch.set_num_threads(1)
    loaded = {name: _load(path) for name, path in checkouts.items()}
    texts = next(iter(loaded.values()))[1]
    prepared = {name: model.prepare(texts) for name, (model, _) in loaded.items()}
    rng = random.Random(0)
    cpu: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in checkouts} for kind, _ in KINDS}
    for index in range(rounds):
        batch = rng.sample(range(len(texts)), 64)
        draws = {"pass of 8": [rng.sample(range(len(texts)), 8) for _ in range(6)],
                 "pass of 1": [rng.sample(range(len(texts)), 1) for _ in range(6)]}
        for name in (list(checkouts) if index % 2 else list(checkouts)[::-1]):
            model = loaded[name][0]
            started = time.thread_time()
            model.predict([texts[k] for k in batch])
            cpu["batch of 64"][name].append(time.thread_time() - started)
            for kind, chosen_lists in draws.items():
                for chosen in chosen_lists:
                    inputs = [prepared[name][k] for k in chosen]
                    started = time.thread_time()
                    model.predict(inputs)
                    cpu[kind][name].append(time.thread_time() - started)
    check = [texts[k] for k in rng.sample(range(len(texts)), 64)]
    before, after = (loaded[name][0].predict(check) for name in ("before", "after"))
    if not all((a == b).all() for a, b in zip(before, after)):
        raise SystemExit("the two checkouts' vectors differ")
    return {kind: {name: statistics.median(times) for name, times in by_name.items()} for kind, by_name in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the other checkout (e.g. a worktree of main)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--order", choices=("before-first", "after-first"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkouts = {"before": str(Path(args.before).resolve()), "after": str(REPO)}
    if args.order:  # one load order, in this process
        if args.order == "after-first":
            checkouts = {"after": checkouts["after"], "before": checkouts["before"]}
        print(json.dumps(one_order(checkouts, args.rounds)))
        return
    results = {}
    for order in ("before-first", "after-first"):
        ran = subprocess.run([sys.executable, "-m", "bench.text_ab", "--before", args.before, "--rounds",
                              str(args.rounds), "--order", order], cwd=REPO, capture_output=True, text=True,
                             timeout=3600)
        if ran.returncode != 0:
            raise SystemExit(f"{order}: {ran.stderr[-3000:]}")
        results[order] = json.loads(ran.stdout.strip().splitlines()[-1])
    print(f"| {args.rounds} rounds, 1 torch thread | load order | before, inputs/CPU-s | after, inputs/CPU-s | "
          "after ÷ before |\n|---|---|---|---|---|")
    for kind, size in KINDS:
        ratios = []
        for order, figures in results.items():
            before, after = size / figures[kind]["before"], size / figures[kind]["after"]
            ratios.append(after / before)
            print(f"| {kind} | {order} | {before:.1f} | {after:.1f} | {after / before:.3f} |")
        print(f"| {kind} | mean of both orders | | | **{statistics.mean(ratios):.3f}** |")


if __name__ == "__main__":
    main()
