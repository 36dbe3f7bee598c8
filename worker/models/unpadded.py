"""Forward passes without padding, for BERT encoders (MiniLM, BGE, E5, GTE and the cross-encoders
built on BERT).

A pass of inputs of different lengths, padded to the longest, spends much of its work on the
padding. Sorting by length saves most of it, but only where many inputs are held to sort from: a
continuous worker under light or moderate load runs passes of 2 to 8 inputs of whatever lengths
arrived. Here every layer that works token by token (embeddings, the Q/K/V projections, the
attention output, the feed-forward layers and the layer norms: almost all of the work at lengths
below the hidden size) runs on the tokens of all inputs laid end to end, with no padding.
Attention, which must see each input's own tokens, runs on each input's slice of them, one input
at a time (on a padded copy for passes of more than ATTENTION_LOOP_MOST inputs). It is a small
share of the work at these lengths. text-embeddings-inference does the same on a GPU with
variable-length flash attention.

MiniLM-L6 at 1 thread, random lengths of 5 to 60 words (bench.workload; `python -m bench.unpadded`):
a pass of 4 costs about 1.45× less, a pass of 8 or 16 about 1.5× less, a lone input 1.1× less.

unpadded_encoder() answers None for any model it does not know how to run exactly. A model it
accepts is checked at load against the model's own forward pass (HFTextModel.init_model), and is
served padded if the two disagree.
"""

from __future__ import annotations

from typing import Any

# Up to this many inputs, attention runs one input at a time on its own slice of the tokens (no
# copies: 6-10% faster per pass of 4 to 16 inputs on a CPU, bench.unpadded); beyond, on a padded
# copy, so that a GPU's passes of hundreds of inputs are not a Python loop.
ATTENTION_LOOP_MOST = 64


def unpadded_encoder(model: Any) -> "UnpaddedBert | None":
    """An UnpaddedBert for a transformers BertModel or BertForSequenceClassification of the plain
    encoder kind (absolute positions, no decoder, no chunked feed-forward); else None."""
    from transformers import BertForSequenceClassification, BertModel

    if type(model) is BertModel:
        bert, head = model, None
    elif type(model) is BertForSequenceClassification and model.bert.pooler is not None:
        bert, head = model.bert, model
    else:
        return None
    config = bert.config
    if (getattr(config, "position_embedding_type", "absolute") != "absolute" or config.is_decoder
            or config.add_cross_attention or config.chunk_size_feed_forward
            or getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager")):
        return None
    return UnpaddedBert(bert, head)


class UnpaddedBert:
    """Runs a BERT encoder on tokens laid end to end. Thread-safe: it only reads the weights."""

    def __init__(self, bert: Any, head: Any = None):
        import torch

        self._torch = torch
        self._bert = bert
        self._head = head  # a BertForSequenceClassification, for its pooler and classifier
        self._layers = []
        for layer in bert.encoder.layer:
            attention = layer.attention.self
            # One matrix product for Q, K and V instead of three: a copy of those weights (a tenth of
            # MiniLM's, a fifth of BERT-base's), as the model's own still serve its own forward pass.
            weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]).detach()
            bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]).detach()
            self._layers.append((weight, bias, attention.num_attention_heads, attention.attention_head_size,
                                 attention.scaling, layer))

    def hidden(self, features: list[dict], device: str) -> tuple[Any, Any]:
        """The last hidden states, padded on the right to [inputs, longest, hidden], and the
        attention mask (int64, 1 for a token), as the model's own forward pass would give them."""
        torch = self._torch
        functional = torch.nn.functional
        lengths = [len(f["input_ids"]) for f in features]
        count, longest = len(lengths), max(lengths)
        ids = torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long, device=device)
        types = (torch.tensor([t for f in features for t in f["token_type_ids"]], dtype=torch.long, device=device)
                 if all("token_type_ids" in f for f in features) else torch.zeros_like(ids))
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        embeddings = self._bert.embeddings
        hidden = embeddings.LayerNorm(embeddings.word_embeddings(ids) + embeddings.token_type_embeddings(types)
                                      + embeddings.position_embeddings(positions))
        width = hidden.shape[1]
        mask = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        tokens = mask.reshape(-1).nonzero().squeeze(1)  # where each token sits in [inputs × longest]
        one_at_a_time = count <= ATTENTION_LOOP_MOST
        attend = None if one_at_a_time else mask[:, None, None, :]  # a query attends to its own input's tokens
        for weight, bias, heads, head_size, scaling, layer in self._layers:
            qkv = functional.linear(hidden, weight, bias)
            if one_at_a_time:
                contexts = []
                for own in qkv.split(lengths):
                    q, k, v = own.view(1, -1, 3, heads, head_size).permute(2, 0, 3, 1, 4)
                    context = functional.scaled_dot_product_attention(q, k, v, scale=scaling)
                    contexts.append(context.transpose(1, 2).reshape(-1, width))
                context = torch.cat(contexts) if count > 1 else contexts[0]
            else:
                padded = qkv.new_zeros(count * longest, 3 * width)
                padded[tokens] = qkv
                q, k, v = padded.view(count, longest, 3, heads, head_size).permute(2, 0, 3, 1, 4)
                context = functional.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scaling)
                context = context.transpose(1, 2).reshape(count * longest, width)[tokens]
            attention_output = layer.attention.output
            hidden_in = attention_output.LayerNorm(attention_output.dense(context) + hidden)
            output = layer.output
            hidden = output.LayerNorm(output.dense(layer.intermediate(hidden_in)) + hidden_in)
        padded = hidden.new_zeros(count * longest, width)
        padded[tokens] = hidden
        return padded.view(count, longest, width), mask.to(torch.long)

    def logits(self, features: list[dict], device: str) -> Any:
        """A sequence classifier's logits: its pooler (the first token) and classifier."""
        hidden, _ = self.hidden(features, device)
        return self._head.classifier(self._bert.pooler(hidden))
