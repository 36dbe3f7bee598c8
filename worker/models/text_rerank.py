"""--task rerank: a score per (query, document) pair, from a cross-encoder.

A rerank model is a cross-encoder (sequence classification with one label): it scores a
(query, document) pair, with the activation sentence-transformers' CrossEncoder applies. The
rest (loading, inputs, passes) is hf_text.py's, and the logits text_classify.py's.
"""

from __future__ import annotations

from worker.models.hf_text import torch_module
from worker.models.text_classify import LogitsModel
from worker.models.text_inputs import InputForm, TextInput


class TextReranker(LogitsModel):
    form = InputForm("rerank", ("query", "document"), frozenset({"raw_scores"}), pairs=True)

    def _load_head(self, torch) -> None:
        if self.model.config.num_labels != 1:
            raise ValueError(f"a rerank model scores a pair with one label; {self.model_path} has "
                             f"{self.model.config.num_labels} (serve it with --task classification)")
        self.activation = _score_activation(self.model.config, torch)
        self.output_dim = 1

    def _stated_limit_required(self) -> bool:
        return True  # a cross-encoder's pairs are long: ddml's default limit for a plain model would be a guess

    def _example(self, text: str):
        return {"query": text, "document": text, "truncate": True}

    def _scores(self, items: list[TextInput], logits) -> list:
        scores = self.activation(logits)[:, 0].cpu().tolist()
        raw = logits[:, 0].cpu().tolist()
        return [r if item.raw_scores else s for item, s, r in zip(items, scores, raw)]

    def _with_tokens(self, value, tokens: int):
        return {"score": value, "tokens": tokens}

    def _tensors(self) -> tuple[list, list]:
        return ([{"name": "query", "datatype": "BYTES", "shape": [-1]},
                 {"name": "document", "datatype": "BYTES", "shape": [-1]}],
                [{"name": "SCORE", "datatype": "FP32", "shape": [-1]}])


def _score_activation(config, torch):
    """The activation CrossEncoder.predict() applies: the one the config names, else Sigmoid."""
    named = getattr(config, "sentence_transformers", None)
    path = named.get("activation_fn") if isinstance(named, dict) else None
    path = path or getattr(config, "sbert_ce_default_activation_function", None)
    if not path:
        return torch.nn.Sigmoid()
    if not str(path).startswith("torch.nn."):
        raise ValueError(f"the model's activation {path!r} is not a torch.nn module")
    return torch_module(str(path).rsplit(".", 1)[-1], torch, "config.json")
