"""The benchmark workload: seeded single-sentence requests of 5 to 60 words."""

from __future__ import annotations

import random

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were their one all we can her has there been if more when will would who so no model "
    "server request batch worker broker latency throughput queue network memory device graph token sentence "
    "language vector search result system data time people year way day man thing woman life child world "
    "school state family student group country problem hand part place case week company number point "
    "government night water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car city"
).split()


def sentences(count: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        out.append(" ".join(words).capitalize() + ".")
    return out
