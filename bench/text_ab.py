"""The built-in text model (MiniLM) of another checkout against this one's, in one process.

    .venv/bin/python -m bench.text_ab --before /path/to/other/checkout [--rounds 30] [--long-share 0.1]

Both checkouts' HFTextModel run in one process, taking turns on the same random draws: a batch
of 64 sentences through predict() (tokenised, sorted, cut into passes), prepare()d passes of 8
and of 1, and a continuous worker's passes of mixed lengths: from 32 inputs held, the pass the
worker forms (worker.passes.plan_pass: at most 16 inputs and the token budget, summed for a
model that pads nothing, padded otherwise), as it runs them. Each checkout's modules are
imported in turn (sys.modules cleared between), and each model is built and loaded while its own
modules are current; predict() imports nothing after that. The figure is inputs per CPU second
of the calling thread at 1 torch thread, which the other processes of a shared machine disturb
less than wall time. The model loaded first runs 1-2% faster (memory placement), so the run is
made twice, in both load orders, each in a fresh process, and the ratio is their mean. The
largest difference between the two checkouts' vectors is reported (0 where they agree bit for
bit; a change in how inputs are grouped into passes moves float rounding by about 1e-7).
--long-share mixes longer inputs (80 to 160 words, about 100 to 200 tokens) into the workload's
sentences of 5 to 60 words, in that share.
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
KINDS = (("batch of 64", 64), ("pass of 8", 8), ("pass of 1", 1), ("worker pass, 32 held", 0))
HELD = 32  # inputs a continuous worker holds, from which it forms the "worker pass" kind


def _texts(long_share: float) -> list[str]:
    """The seeded workload's sentences, with that share of them longer inputs in their place."""
    from bench.workload import sentences

    texts = sentences(2000, seed=1)
    longer = sentences(2000, seed=2, min_words=80, max_words=160)
    rng = random.Random(3)
    return [longer[k] if rng.random() < long_share else text for k, text in enumerate(texts)]


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
        return model, importlib.import_module("worker.passes")
    finally:
        sys.path.remove(path)


def one_order(checkouts: dict[str, str], rounds: int, long_share: float = 0.0) -> dict:
    """CPU seconds per input of each kind, each checkout, loaded in the order given; the largest
    difference between their vectors; the worker's passes: their mean size, and the share of them
    over the padded budget (those a handler that cuts by it runs as more than one model call)."""
    import torch

    torch.set_num_threads(1)
    loaded = {name: _load(path) for name, path in checkouts.items()}
    texts = _texts(long_share)
    prepared = {name: model.prepare(texts) for name, (model, _) in loaded.items()}
    costs = [loaded["after"][0].cost(p) for p in prepared["after"]]
    rng = random.Random(0)
    cpu: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in checkouts} for kind, _ in KINDS}
    formed = []  # the worker's passes, as (inputs, padded tokens > the budget)
    for index in range(rounds):
        batch = rng.sample(range(len(texts)), 64)
        draws = {"pass of 8": [rng.sample(range(len(texts)), 8) for _ in range(6)],
                 "pass of 1": [rng.sample(range(len(texts)), 1) for _ in range(6)]}
        held = [rng.sample(range(len(texts)), HELD) for _ in range(6)]
        for name in (list(checkouts) if index % 2 else list(checkouts)[::-1]):
            model, passes = loaded[name]
            started = time.thread_time()
            model.predict([texts[k] for k in batch])
            cpu["batch of 64"][name].append((time.thread_time() - started) / len(batch))
            most, budget, least = model.pass_limits()
            worker_passes = [[chosen[i] for i in passes.plan_pass([costs[k] for k in chosen], [0] * HELD, most,
                                                                   budget, least, padded=model.padded)]
                             for chosen in held]
            for kind, chosen_lists in {**draws, "worker pass, 32 held": worker_passes}.items():
                for chosen in chosen_lists:
                    inputs = [prepared[name][k] for k in chosen]
                    started = time.thread_time()
                    model.predict(inputs)
                    cpu[kind][name].append((time.thread_time() - started) / len(chosen))
                    if kind == "worker pass, 32 held" and name == "after":
                        formed.append((len(chosen), len(chosen) > 1 and len(chosen) * max(costs[k] for k in chosen)
                                       > budget))
    check = [texts[k] for k in rng.sample(range(len(texts)), 64)]
    gap = 0.0
    for one in ("batch", "worker pass"):
        before, after = (loaded[name][0].predict(check if one == "batch"
                                                 else [prepared[name][k] for k in worker_passes[0]])
                         for name in ("before", "after"))
        gap = max(gap, max(float(abs(a - b).max()) for a, b in zip(before, after)))
    figures = {kind: {name: statistics.median(times) for name, times in by_name.items()}
               for kind, by_name in cpu.items()}
    return {"cpu_s_per_input": figures, "max_abs_difference": gap,
            "worker_pass_inputs": statistics.mean(n for n, _ in formed),
            "worker_passes_over_padded_budget": statistics.mean(over for _, over in formed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the other checkout (e.g. a worktree of main)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--long-share", type=float, default=0.0,
                        help="share of the inputs that are 80 to 160 words long (default 0: 5 to 60 words)")
    parser.add_argument("--order", choices=("before-first", "after-first"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkouts = {"before": str(Path(args.before).resolve()), "after": str(REPO)}
    if args.order:  # one load order, in this process
        if args.order == "after-first":
            checkouts = {"after": checkouts["after"], "before": checkouts["before"]}
        print(json.dumps(one_order(checkouts, args.rounds, args.long_share)))
        return
    results = {}
    for order in ("before-first", "after-first"):
        ran = subprocess.run([sys.executable, "-m", "bench.text_ab", "--before", args.before, "--rounds",
                              str(args.rounds), "--long-share", str(args.long_share), "--order", order], cwd=REPO, capture_output=True, text=True,
                             timeout=3600)
        if ran.returncode != 0:
            raise SystemExit(f"{order}: {ran.stderr[-3000:]}")
        results[order] = json.loads(ran.stdout.strip().splitlines()[-1])
    mix = f", {args.long_share:.0%} long" if args.long_share else ""
    print(f"| {args.rounds} rounds, 1 torch thread{mix} | load order | before, inputs/CPU-s | after, inputs/CPU-s | "
          "after ÷ before |\n|---|---|---|---|---|")
    for kind, _ in KINDS:
        ratios = []
        for order, figures in results.items():
            before, after = (1 / figures["cpu_s_per_input"][kind][name] for name in ("before", "after"))
            ratios.append(after / before)
            print(f"| {kind} | {order} | {before:.1f} | {after:.1f} | {after / before:.3f} |")
        print(f"| {kind} | mean of both orders | | | **{statistics.mean(ratios):.3f}** |")
    worker = next(iter(results.values()))
    print(f"\nworker passes (the same in both checkouts): {worker['worker_pass_inputs']:.1f} inputs on average, "
          f"{worker['worker_passes_over_padded_budget']:.0%} of them over the padded token budget")
    print("largest difference between the two checkouts' vectors: "
          f"{max(figures['max_abs_difference'] for figures in results.values()):.2g}")


if __name__ == "__main__":
    main()
