"""The in-process limit: the model called directly, no server. Prints one JSON line.

    python -m bench.peers.limit --model-dir DIR [--seconds 5] [--reference FILE]

- padded: batches in arrival order at sizes 1, 8, 16, 32 and 64 (items/s of each; the best is
  the padded limit);
- length-sorted: the same stream sorted by token length, then cut into batches of 64;
- batch-1 latency: p50 of single-sentence calls (the concurrency-1 target is this + 2 ms);
- with --reference, the embeddings of a few check sentences, for the correctness check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

from bench.peers.plain_model import PlainEmbedder
from bench.workload import sentences

CHECK_SENTENCES = sentences(6, seed=99)


def items_per_s(predict: Callable[[list[str]], list], texts: list[str], batch_size: int, seconds: float) -> float:
    """Inputs/s of predict() over texts in batches of batch_size, in order, for about `seconds`."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for start in range(0, len(texts), batch_size):
            predict(texts[start:start + batch_size])
            done += len(texts[start:start + batch_size])
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def sorted_items_per_s(predict: Callable[[list[str]], list], texts: list[str], tokenizer, seconds: float,
                       batch_size: int) -> float:
    """Inputs/s of predict() over the first 1024 texts sorted by token length, in batches of
    batch_size. Whole passes over the sorted sample: a timed run from the start of a sorted list
    would only ever see its short sentences (the first version of this script reported 182 items/s so)."""
    sample = texts[:1024]
    lengths = [len(ids) for ids in tokenizer(sample)["input_ids"]]
    by_length = [text for _, text in sorted(zip(lengths, sample))]
    done, started = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        for start in range(0, len(by_length), batch_size):
            predict(by_length[start:start + batch_size])
        done += len(by_length)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--reference", help="write the check sentences' embeddings here (JSON)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (float16 on CUDA)")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="padded batch sizes to try; the largest "
                                                                      "is also the length-sorted batch")
    args = parser.parse_args()
    embedder = PlainEmbedder(args.model_dir, args.threads, args.device)
    texts = sentences(4096, seed=7)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    embedder.embed(texts[:max(sizes)])  # warm-up
    padded = {size: items_per_s(embedder.embed, texts, size, args.seconds) for size in sizes}
    sorted64 = sorted_items_per_s(embedder.embed, texts, embedder.tokenizer, args.seconds * 2, max(sizes))
    single = []
    for text in texts[:200]:
        started = time.perf_counter()
        embedder.embed([text])
        single.append((time.perf_counter() - started) * 1000)
    if args.reference:
        with open(args.reference, "w") as out:
            json.dump({"sentences": CHECK_SENTENCES, "embeddings": embedder.embed(CHECK_SENTENCES)}, out)
    print(json.dumps({"padded_items_per_s": padded, "sorted64_items_per_s": sorted64,
                      "batch1_p50_ms": statistics.median(single)}))


if __name__ == "__main__":
    main()
