"""--task classification: a label and its probabilities per text, or per pair of texts.

A sequence classifier from its directory (AutoModelForSequenceClassification), labels from its
id2label. LogitsModel, the part it shares with rerank (text_rerank.py), runs the model to its
logits. The rest (loading, inputs, passes) is hf_text.py's.
"""

from __future__ import annotations

import numpy as np

from worker.models.hf_text import HFTextModel
from worker.models.text_inputs import InputForm, TextInput


class LogitsModel(HFTextModel):
    """A sequence classifier: the model's logits, which each task turns into its outputs (_scores)."""

    auto_class = "AutoModelForSequenceClassification"

    def _logits(self, features: list[dict], inputs: dict | None, encoder):
        """float32 logits: the model's (padded inputs) or the unpadded encoder's."""
        return (self.model(**inputs).logits if encoder is None else encoder.logits(features, self.device)).float()

    def _outputs(self, items: list[TextInput], features: list[dict], inputs: dict | None) -> list:
        return self._scores(items, self._logits(features, inputs, self._unpadded))

    def _scores(self, items: list[TextInput], logits) -> list:
        raise NotImplementedError

    def _comparable(self, features: list[dict], inputs: dict, encoder) -> tuple:
        return self._logits(features, inputs, None), self._logits(features, None, encoder)

    def _described(self) -> dict:
        id2label = self.model.config.id2label
        return {"labels": [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.model.config.num_labels)]}


class TextClassifier(LogitsModel):
    # A classifier also takes a pair of texts (an NLI cross-encoder, say): text and text_pair.
    form = InputForm("classification", ("text",), frozenset({"raw_scores"}), optional_pair="text_pair")

    def _load_head(self, torch) -> None:
        id2label = self.model.config.id2label
        self.labels = [str(id2label.get(i, i)) for i in range(self.model.config.num_labels)]
        self.output_dim = self.model.config.num_labels

    def _scores(self, items: list[TextInput], logits) -> list:
        probabilities = self._torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float32)
        logits = logits.cpu().numpy().astype(np.float32)
        return [
            {"label": self.labels[int(p.argmax())],
             **({"logits": dict(zip(self.labels, raw.tolist()))} if item.raw_scores
                else {"probabilities": dict(zip(self.labels, p.tolist()))})}
            for item, p, raw in zip(items, probabilities, logits)
        ]

    def _with_tokens(self, value, tokens: int):
        return {**value, "tokens": tokens}

    def _tensors(self) -> tuple[list, list]:
        return ([{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}],
                [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, self.output_dim], "key": "probabilities",
                  "labels": self.labels},
                 {"name": "LABEL", "datatype": "BYTES", "shape": [-1, 1], "key": "label"}])
