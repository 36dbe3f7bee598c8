"""What a forward pass costs per input, padded against unpadded, in one process.

    .venv/bin/python -m bench.unpadded [--threads 1] [--sizes 1,2,4,8,16] [--passes 20] [--device cuda:0]

The worker's built-in text model (HFTextModel) twice, once with --unpadded off and once with
auto, on the seeded workload (bench.workload), on prepare()d inputs as a continuous worker runs
them: passes of N inputs drawn at random, so of mixed lengths, the two models taking turns on
the same draw. Prints the median pass time and time per input of each, and their ratio.
On a GPU (--device cuda:0, as bench/gpu_check.sh runs it) the second model runs with
--unpadded on, since auto means padded passes there.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench.workload import sentences
from worker.models import default_model_path
from worker.models.hf_text import HFTextModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a compute lane on 2 cores has 1)")
    parser.add_argument("--sizes", default="1,2,4,8,16", help="inputs per pass")
    parser.add_argument("--passes", type=int, default=20, help="passes per size and model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--linear", action="store_true",
                        help="compare unpadded passes with torch's products (MKL on a CPU) against oneDNN's, "
                             "instead of padded against unpadded")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    models = {}
    for setting in ("off", "auto"):
        unpadded = "on" if (setting == "auto" and args.device.startswith("cuda")) or args.linear else setting
        model = HFTextModel(device=args.device, model_path=str(default_model_path()), unpadded=unpadded)
        model.init_model()
        models[setting] = model
    assert models["auto"].padded is False, "unpadded passes are not in use: see the worker's log note"
    names = ("padded", "unpadded")
    if args.linear:
        from worker.models.unpadded import unpadded_encoder

        models["off"]._unpadded = unpadded_encoder(models["off"].model, onednn=False)
        assert models["auto"]._unpadded.linear_kind == "oneDNN", "oneDNN's products are not in use here"
        names = ("torch linear", "oneDNN linear")
    prepared = models["off"].prepare(sentences(2000, seed=1))
    rng = random.Random(args.seed)
    print(f"| inputs a pass | {names[0]} ms (per input) | {names[1]} ms (per input) | ÷ |  "
          f"({args.device}, {args.threads} torch thread(s))\n|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        times: dict[str, list[float]] = {"off": [], "auto": []}
        for index in range(args.passes):
            chosen = rng.sample(prepared, size)
            for setting in ("off", "auto") if index % 2 else ("auto", "off"):
                started = time.perf_counter()
                models[setting].predict(chosen)
                times[setting].append(time.perf_counter() - started)
        padded, unpadded = (statistics.median(times[s]) * 1000 for s in ("off", "auto"))
        print(f"| {size} | {padded:.1f} ({padded / size:.1f}) | {unpadded:.1f} ({unpadded / size:.1f}) | "
              f"{padded / unpadded:.2f} |", flush=True)


if __name__ == "__main__":
    main()
