"""infinity-emb's own server (FastAPI under uvicorn), with torch held to BENCH_TORCH_THREADS threads.

    BENCH_TORCH_THREADS=2 bench/.venvs/infinity/bin/python bench/peers/infinity_server.py v2 \
        --model-id DIR --served-model-name minilm --engine torch --device cpu --batch-size 64 --port 8004

The arguments are infinity_emb's CLI (`infinity_emb v2 --help`); this only sets torch's thread
count first, as the other peers do in bench.peers.plain_model, since infinity_emb has no flag
for it. POST /embeddings takes an OpenAI-style {"model": "minilm", "input": ["...", ...]}.
"""

import os
import sys

import torch

torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))

from infinity_emb.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
