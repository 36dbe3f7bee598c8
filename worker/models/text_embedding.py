"""--task embedding: a vector per text, as sentence-transformers' encode() gives it.

Embeddings follow the directory's own sentence-transformers configuration (st_config.py): its
pooling, Dense layers, normalisation, length limit, lower-casing and default prompt, so that a
vector matches what sentence-transformers' encode() gives. --pooling and --max-length override.
The rest (loading, inputs, passes) is hf_text.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from worker.models.hf_text import HFTextModel, torch_module
from worker.models.st_config import EmbeddingConfig, parse_pooling, read_embedding_config
from worker.models.text_inputs import InputForm, TextInput


class TextEmbedding(HFTextModel):
    auto_class = "AutoModel"
    form = InputForm("embedding", ("text",), frozenset({"normalize", "all_tokens"}))

    def _take_pooling(self, pooling: str | None) -> None:
        self.pooling_override = parse_pooling(pooling) if pooling else None

    def _read_config(self, model_dir: str) -> EmbeddingConfig:
        config = read_embedding_config(model_dir)
        if self.pooling_override:
            config = dataclasses.replace(config, pooling=self.pooling_override,
                                         notes=[*config.notes, f"pooling {'+'.join(self.pooling_override)} (--pooling)"])
        return config

    def _load_head(self, torch) -> None:
        self.prompt_length = self._prompt_length()
        self.dense = [_load_dense(layer, torch, self.device) for layer in self.config.dense]
        self.output_dim = (self.dense[-1][0].out_features if self.dense
                           else self.model.config.hidden_size * len(self.config.pooling))

    def _prompt_length(self) -> int:
        """Tokens of the default prompt that pooling leaves out (include_prompt false), as sentence-transformers counts them."""
        if not self.config.prompt or self.config.include_prompt:
            return 0
        ids = self.tokenizer([self.config.prompt])["input_ids"][0]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def _hidden(self, features: list[dict], inputs: dict | None, encoder) -> tuple:
        """The last hidden states and the attention mask: the model's (padded inputs) or the encoder's."""
        if encoder is None:
            return self.model(**inputs).last_hidden_state, inputs["attention_mask"]
        return encoder.hidden(features, self.device)

    def _outputs(self, items: list[TextInput], features: list[dict], inputs: dict | None) -> list:
        torch = self._torch
        hidden, mask = self._hidden(features, inputs, self._unpadded)
        vectors = self._pool(hidden, mask)
        for linear, activation in self.dense:
            vectors = activation(linear(vectors))
        normalize = [self.config.normalize if item.normalize is None else item.normalize for item in items]
        if all(normalize):
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        elif any(normalize):
            rows = torch.tensor(normalize, device=vectors.device).unsqueeze(1)
            vectors = torch.where(rows, torch.nn.functional.normalize(vectors, p=2, dim=1), vectors)
        vectors = list(vectors.cpu().numpy().astype(np.float32))
        for k, item in enumerate(items):
            if item.all_tokens:  # the real tokens' rows, wherever the padding is
                vectors[k] = hidden[k][mask[k].bool()].float().cpu().numpy()
        return vectors

    def _comparable(self, features: list[dict], inputs: dict, encoder) -> tuple:
        reference = self._hidden(features, inputs, None)[0].float()
        mine = self._hidden(features, None, encoder)[0].float()
        real = inputs["attention_mask"].bool()  # padded on the right, as unpadded outputs are
        return reference[real], mine[real]

    def _pool(self, hidden, mask):
        """The pooled vectors (float32), by sentence-transformers' Pooling arithmetic, padding on either side."""
        torch = self._torch
        pool_mask = _exclude_prompt(mask, self.prompt_length, torch) if self.prompt_length else mask
        vectors = []
        for mode in self.config.pooling:
            if mode == "cls":  # the first token pooling sees
                first = pool_mask.to(torch.int).argmax(dim=1)
                vectors.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first].float())
            elif mode == "max":
                padding = pool_mask.unsqueeze(-1).expand_as(hidden) == 0
                vectors.append(hidden.masked_fill(padding, float("-inf")).max(dim=1).values.float())
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                weights = pool_mask.unsqueeze(-1).to(hidden.dtype)
                total = (hidden * weights).sum(dim=1, dtype=torch.float32)
                count = weights.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
                vectors.append(total / (count if mode == "mean" else torch.sqrt(count)))
            elif mode == "weightedmean":  # weights 1, 2, 3, ... from the first real token
                positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32)
                positions = positions.view(1, -1, 1) - mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
                weights = pool_mask.unsqueeze(-1).to(torch.float32) * positions
                total = (hidden.float() * weights).sum(dim=1)
                vectors.append(total / weights.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken: the last real token, wherever padding is
                length = hidden.shape[1]
                found, from_end = pool_mask.flip(1).max(1)
                from_end = torch.where(found == 0, length - 1, from_end)
                last = length - from_end - 1
                masked = hidden * pool_mask.unsqueeze(-1).to(hidden.dtype)
                vectors.append(masked[torch.arange(hidden.shape[0], device=hidden.device), last].float())
        return vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)

    def _with_tokens(self, value, tokens: int):
        return {"embedding": value, "tokens": tokens}

    def _tensors(self) -> tuple[list, list]:
        return ([{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}],
                [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, self.output_dim]}])

    def _described(self) -> dict:
        return {"pooling": "+".join(self.config.pooling)}  # as text-embeddings-inference's /info (gateway/tei.py)


def _exclude_prompt(mask, prompt_length: int, torch):
    """The attention mask with the prompt's tokens (and any left padding) zeroed, for pooling."""
    mask = mask.clone()
    padding = mask.to(torch.int32).argmax(dim=1)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    mask[positions < (padding + prompt_length).unsqueeze(1)] = 0
    return mask


def _load_dense(layer, torch, device: str):
    """A sentence-transformers Dense module: (linear, activation), in float32 on the device."""
    with open(os.path.join(layer.path, "config.json"), encoding="utf-8") as config_file:
        config = json.load(config_file)
    linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    weights_file = os.path.join(layer.path, "model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors.torch import load_file

        state = load_file(weights_file)
    else:
        state = torch.load(os.path.join(layer.path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    linear.load_state_dict({key.removeprefix("linear."): value for key, value in state.items()})
    return linear.to(device).eval(), torch_module(layer.activation, torch, layer.path)
