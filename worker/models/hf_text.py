"""Built-in handler for a local Hugging Face model directory: text embedding or classification.

The only module that imports torch or transformers. Texts travel as strings and are tokenised
here, in the worker.

Length-aware execution: a batch is tokenised once, sorted by token length, and run in chunks
whose padded size stays within a token budget, so short sentences are not padded to the
longest one in the batch. Outputs are put back in input order.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from worker.models import InputError, Manager

logger = logging.getLogger(__name__)

TASKS = ("embedding", "classification")

# Forward-pass size by device: (most inputs, fewest inputs before a batch is halved, most padded
# tokens). A batch is sorted by length and cut into passes. On a CPU, passes of 16 cost less per
# input than one pass of 64 even after sorting (bench/README.md: about 95 against 57 inputs/s for
# MiniLM, 2 threads): less padding, and activations that stay in cache. A smaller batch still
# runs as two sorted halves, down to passes of 8: for random batches of 16, two passes of 8 gave
# 102 inputs/s against 83 for one pass (bench.chunking). A GPU wants the whole batch in one pass.
_CHUNKING = {"cpu": (16, 8, 2048), "cuda": (1024, 1024, 65536)}


class HFTextModel(Manager):
    def __init__(
        self,
        device: str = "cpu",
        model_path: str = "",
        task: str = "embedding",
        max_length: int = 256,
        chunk_tokens: int = 0,
        max_chunk: int = 0,
        dtype: str = "auto",
        **options,
    ):
        super().__init__(device=device, **options)
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not model_path or not os.path.isdir(model_path):
            raise ValueError(f"model_path must be a local model directory, got {model_path!r}")
        self.model_path = model_path
        self.task = task
        self.max_length = max_length  # tokens per input; longer inputs are truncated
        # Per forward pass: inputs, and padded tokens; 0 = what suits the device (_CHUNKING).
        self.chunk_tokens = chunk_tokens
        self.max_chunk = max_chunk
        self.min_chunk = max_chunk
        self.dtype_name = dtype  # auto = float16 on CUDA, float32 on the CPU
        self.labels: list[str] = []

    def init_model(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        started_at = time.monotonic()
        self._torch = torch
        auto_chunk, auto_min_chunk, auto_tokens = _CHUNKING["cuda" if self.device.startswith("cuda") else "cpu"]
        self.max_chunk = self.max_chunk or auto_chunk
        self.min_chunk = min(auto_min_chunk, self.max_chunk)
        self.chunk_tokens = self.chunk_tokens or auto_tokens
        dtype = {"auto": torch.float16 if self.device.startswith("cuda") else torch.float32,
                 "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype_name]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        model_class = AutoModel if self.task == "embedding" else AutoModelForSequenceClassification
        self.model = model_class.from_pretrained(self.model_path, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        if self.task == "classification":
            id2label = self.model.config.id2label
            self.labels = [str(id2label.get(i, i)) for i in range(self.model.config.num_labels)]
        self.output_dim = (
            self.model.config.hidden_size if self.task == "embedding" else self.model.config.num_labels
        )
        logger.info(
            "loaded %s (%s) on %s as %s in %.1f s",
            self.model_path, self.task, self.device, dtype, time.monotonic() - started_at,
        )

    def predict(self, batch: list) -> list:
        outputs: list = [None] * len(batch)
        texts, positions = [], []
        for i, text in enumerate(batch):
            if isinstance(text, str):
                texts.append(text)
                positions.append(i)
            else:
                outputs[i] = InputError(f"input must be a string, got {type(text).__name__}")
        if not texts:
            return outputs
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        ids = encoded["input_ids"]
        order = sorted(range(len(texts)), key=lambda k: len(ids[k]))
        for chunk in self._chunks(order, [len(ids[k]) for k in order]):
            for k, value in zip(chunk, self._forward([ids[k] for k in chunk])):
                outputs[positions[k]] = value
        return outputs

    def _chunks(self, order: list[int], lengths: list[int]):
        """Split length-sorted inputs into passes: at most max_chunk inputs (fewer for a small batch,
        so that it still runs as two halves, down to min_chunk) and chunk_tokens padded tokens."""
        most = min(self.max_chunk, max(self.min_chunk, -(-len(order) // 2)))
        chunk: list[int] = []
        for position, k in enumerate(order):
            longest = lengths[position]  # sorted ascending: the newest is the longest
            if chunk and (len(chunk) + 1 > most or longest * (len(chunk) + 1) > self.chunk_tokens):
                yield chunk
                chunk = []
            chunk.append(k)
        if chunk:
            yield chunk

    def _forward(self, ids: list[list[int]]) -> list:
        torch = self._torch
        padded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        non_blocking = self.device.startswith("cuda")
        input_ids = padded["input_ids"].to(self.device, non_blocking=non_blocking)
        mask = padded["attention_mask"].to(self.device, non_blocking=non_blocking)
        with torch.inference_mode():
            if self.task == "embedding":
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                result = torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().numpy()
                return list(result.astype(np.float32))
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            probabilities = torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float32)
        return [
            {"label": self.labels[int(p.argmax())], "probabilities": dict(zip(self.labels, p.tolist()))}
            for p in probabilities
        ]

    def warmup(self) -> None:
        """A few passes of short and long inputs, so the first real request pays no first-call costs."""
        for length in (1, 16, 64):
            self.predict([" ".join(["warm"] * length)] * 4)

    def metadata(self) -> dict:
        inputs = [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
        if self.task == "embedding":
            outputs = [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, self.output_dim]}]
        else:
            outputs = [
                {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, self.output_dim], "key": "probabilities",
                 "labels": self.labels},
                {"name": "LABEL", "datatype": "BYTES", "shape": [-1, 1], "key": "label"},
            ]
        return {"platform": "pytorch", "inputs": inputs, "outputs": outputs}

    def describe(self) -> dict:
        torch = getattr(self, "_torch", None)
        if torch is not None and self.device.startswith("cuda"):
            return {"cuda_memory_allocated_bytes": int(torch.cuda.memory_allocated(self.device))}
        return {}


def cuda_device_count() -> int:
    """CUDA devices visible to this process; 0 where torch has no CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
