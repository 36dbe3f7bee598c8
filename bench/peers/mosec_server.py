"""mosec with dynamic batching: max batch 64, 10 ms wait, one model process.

    BENCH_MODEL_DIR=... python bench/peers/mosec_server.py --port 8003

POST /inference with {"inputs": ["a sentence", ...]} (mosec's default JSON ingress) answers
{"outputs": [[...], ...]}. mosec batches requests, not sentences: a batch is up to 64 requests of
any number of sentences each, so forward() embeds their sentences together in passes of at most
64 (PlainEmbedder.embed_batches), as a mosec user with multi-sentence requests would.
"""

import sys
from pathlib import Path

from mosec import Server, Worker

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for bench.peers

from bench.peers.plain_model import PlainEmbedder, texts_of  # noqa: E402


class Embed(Worker):
    def __init__(self):
        super().__init__()
        self.embedder = PlainEmbedder()

    def forward(self, data: list) -> list:
        texts = [texts_of(document) for document in data]
        flat = [text for group in texts for text in group]
        vectors = iter(self.embedder.embed_batches(flat))
        return [{"outputs": [next(vectors) for _ in group]} for group in texts]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Embed, num=1, max_batch_size=64, max_wait_time=10)
    server.run()
