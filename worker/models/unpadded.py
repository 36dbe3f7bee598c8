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

On a CPU, the matrix products of passes of ONEDNN_LEAST_ROWS tokens or more run through oneDNN
(onednn_linear(); --onednn), with the exact GELU fused into the feed-forward's first product:
5-10% less per pass of 4 to 16 inputs than torch's MKL products (`python -m bench.unpadded
--linear`; in steady state, products built, 1.05-1.09× at 1 thread, 1.07-1.16× at 2).

unpadded_encoder() answers None for any model it does not know how to run exactly. A model it
accepts is checked at load against the model's own forward pass (load_unpadded(), from
HFTextModel.init_model), and is served padded if the two disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Up to this many inputs, attention runs one input at a time on its own slice of the tokens (no
# copies: 6-10% faster per pass of 4 to 16 inputs on a CPU, bench.unpadded); beyond, on a padded
# copy, so that a GPU's passes of hundreds of inputs are not a Python loop.
ATTENTION_LOOP_MOST = 64
# oneDNN's products run passes of at least ONEDNN_LEAST_ROWS tokens (below, they gain nothing on
# MKL's), with the token count rounded up to a multiple of ROWS_MULTIPLE (see hidden()).
ONEDNN_LEAST_ROWS = 64
ROWS_MULTIPLE = 16


def unpadded_encoder(model: Any, onednn: bool = True) -> "UnpaddedBert | None":
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
    return UnpaddedBert(bert, head, onednn)


def onednn_linear(torch: Any) -> "Callable | None":
    """F.linear for fp32 on a CPU through oneDNN, with an optional fused "gelu"; None if this
    torch lacks it or it disagrees with F.linear on a probe.

    torch runs F.linear through MKL's sgemm. On the AMD EPYC (AVX-512) CPUs of our CI machines,
    oneDNN's products of a pass's shapes take 5-11% less time at 1 thread, and the GELU fused
    into the feed-forward's first product saves a pass over its output (bench.unpadded
    --linear). _linear_pointwise is the op torch's own compiler (inductor) emits for a linear on
    a CPU: private, so it is probed here, and every model is still checked at load against its
    own forward pass (load_unpadded)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((5, 24), (7, 24), (7,)))
        reference = torch.nn.functional.linear(x, weight, bias)
        if not (torch.allclose(op(x, weight, bias, "none", [], ""), reference, atol=1e-5)
                and torch.allclose(op(x, weight, bias, "gelu", [], "none"),
                                   torch.nn.functional.gelu(reference), atol=1e-5)):
            return None
    except (AttributeError, RuntimeError, NotImplementedError):
        return None

    def linear(x, weight, bias, activation: str = "none"):
        return op(x, weight, bias, activation, [], "none" if activation == "gelu" else "")

    return linear


def _dense(module: Any) -> tuple[Any, Any]:
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights, as hidden() uses them."""
    qkv_weight: Any
    qkv_bias: Any
    heads: int
    head_size: int
    scaling: float
    attention_dense: tuple[Any, Any]
    attention_norm: Any
    intermediate_dense: tuple[Any, Any]
    activation: Any  # the model's, after the intermediate product
    output_dense: tuple[Any, Any]
    output_norm: Any


class UnpaddedBert:
    """Runs a BERT encoder on tokens laid end to end. Thread-safe: it only reads the weights."""

    def __init__(self, bert: Any, head: Any = None, onednn: bool = True):
        import torch

        self._torch = torch
        self._bert = bert
        self._head = head  # a BertForSequenceClassification, for its pooler and classifier
        weights = next(bert.parameters())
        linear = None
        if onednn and weights.device.type == "cpu" and weights.dtype == torch.float32:
            linear = onednn_linear(torch)
        self._onednn = linear
        self.linear_kind = "oneDNN" if linear else "torch"
        # The feed-forward's GELU fused into its first product, where oneDNN runs it and the model's
        # is the exact (erf) GELU; else the model's own activation after it.
        self._fuse_gelu = bert.config.hidden_act == "gelu"
        self._layers = []
        for layer in bert.encoder.layer:
            attention = layer.attention.self
            # One matrix product for Q, K and V instead of three: a copy of those weights (a tenth of
            # MiniLM's, a fifth of BERT-base's), as the model's own still serve its own forward pass.
            weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]).detach()
            bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]).detach()
            intermediate = layer.intermediate
            self._layers.append(_Layer(
                weight, bias, attention.num_attention_heads, attention.attention_head_size, attention.scaling,
                _dense(layer.attention.output.dense), layer.attention.output.LayerNorm,
                _dense(intermediate.dense), intermediate.intermediate_act_fn,
                _dense(layer.output.dense), layer.output.LayerNorm))

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
        total = len(ids)
        onednn = self._onednn is not None and total >= ONEDNN_LEAST_ROWS
        linear = self._onednn if onednn else functional.linear
        fuse_gelu = onednn and self._fuse_gelu
        # oneDNN builds a product for each shape it meets (about 1 ms each) and keeps the last 1024:
        # token counts rounded up to a multiple of ROWS_MULTIPLE keep a worker's shapes few, so it
        # builds them once. The extra rows (token 0 at position 0) are never read back: attention
        # and the result take the first `total` rows.
        extra = -total % ROWS_MULTIPLE if onednn else 0
        if extra:
            ids, types, positions = (torch.cat([t, t.new_zeros(extra)]) for t in (ids, types, positions))
        embeddings = self._bert.embeddings
        hidden = embeddings.LayerNorm(embeddings.word_embeddings(ids) + embeddings.token_type_embeddings(types)
                                      + embeddings.position_embeddings(positions))
        width = hidden.shape[1]
        mask = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        tokens = mask.reshape(-1).nonzero().squeeze(1)  # where each token sits in [inputs × longest]
        one_at_a_time = count <= ATTENTION_LOOP_MOST
        attend = None if one_at_a_time else mask[:, None, None, :]  # a query attends to its own input's tokens
        for layer in self._layers:
            heads, head_size = layer.heads, layer.head_size
            qkv = linear(hidden, layer.qkv_weight, layer.qkv_bias)
            if one_at_a_time:
                contexts = []
                for own in qkv[:total].split(lengths):
                    q, k, v = own.view(1, -1, 3, heads, head_size).permute(2, 0, 3, 1, 4)
                    context = functional.scaled_dot_product_attention(q, k, v, scale=layer.scaling)
                    contexts.append(context.transpose(1, 2).reshape(-1, width))
            else:
                padded = qkv.new_zeros(count * longest, 3 * width)
                padded[tokens] = qkv[:total]
                q, k, v = padded.view(count, longest, 3, heads, head_size).permute(2, 0, 3, 1, 4)
                context = functional.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=layer.scaling)
                contexts = [context.transpose(1, 2).reshape(count * longest, width)[tokens]]
            if extra:
                contexts.append(qkv.new_zeros(extra, width))
            context = torch.cat(contexts) if len(contexts) > 1 else contexts[0]
            hidden_in = layer.attention_norm(linear(context, *layer.attention_dense) + hidden)
            if fuse_gelu:
                inner = linear(hidden_in, *layer.intermediate_dense, "gelu")
            else:
                inner = layer.activation(linear(hidden_in, *layer.intermediate_dense))
            hidden = layer.output_norm(linear(inner, *layer.output_dense) + hidden_in)
        padded = hidden.new_zeros(count * longest, width)
        padded[tokens] = hidden[:total]
        return padded.view(count, longest, width), mask.to(torch.long)

    def logits(self, features: list[dict], device: str) -> Any:
        """A sequence classifier's logits: its pooler (the first token) and classifier."""
        hidden, _ = self.hidden(features, device)
        return self._head.classifier(self._bert.pooler(hidden))


# ------------------------------------------------------------------ the choice, at load


def load_unpadded(handler: Any, dtype: Any) -> tuple["UnpaddedBert | None", str]:
    """The UnpaddedBert a built-in text handler (hf_text.HFTextModel, its model loaded) runs its
    passes with, or None for padded passes; and a note saying why, for its log."""
    if handler.unpadded == "off":
        return None, "padded passes (--unpadded off)"
    if handler.unpadded == "auto" and handler.device.startswith("cuda"):
        return None, "padded passes (a GPU; --unpadded on to change)"
    encoder, gap = None, 0.0
    if handler.tokenizer.padding_side != "right":
        # BERT numbers positions from the start of the padded row: padded on the left, its own
        # passes give an input other vectors than it gets alone, and unpadded ones would differ.
        note = "padded passes (the tokenizer pads on the left)"
    else:
        try:
            encoder, gap = _onednn_encoder(handler, dtype) if handler.onednn == "auto" else (None, 0.0)
            if encoder is None:
                encoder = unpadded_encoder(handler.model, onednn=False)
                gap = _gap_from_model(handler, encoder) if encoder is not None else 0.0
        except Exception:  # a transformers version whose BERT differs from what this module reads
            logger.warning("passes without padding failed on %s: running padded passes", handler.model_path,
                           exc_info=True)
            return None, "padded passes (unpadded ones failed)"
        note = (f"padded passes ({type(handler.model).__name__}: unpadded ones run BERT encoders only)"
                if encoder is None else "")
    if note:
        if handler.unpadded == "on":
            logger.warning("--unpadded on: %s", note)
        return None, note
    tolerance = _tolerance(handler, dtype)
    if not gap <= tolerance:
        logger.warning("passes without padding disagree with %s by %.2g (more than %g): running padded passes",
                       handler.model_path, gap, tolerance)
        return None, "padded passes (unpadded ones disagreed with the model)"
    return encoder, "passes without padding" + (", products by oneDNN" if encoder.linear_kind == "oneDNN" else "")


def _onednn_encoder(handler: Any, dtype: Any) -> tuple:
    """An UnpaddedBert on oneDNN's products and its gap from the model, if it is one and agrees
    with the model; else (None, 0.0), and torch's products are tried."""
    try:
        encoder = unpadded_encoder(handler.model, onednn=True)
        if encoder is None or encoder.linear_kind != "oneDNN":
            return None, 0.0
        gap = _gap_from_model(handler, encoder)
    except Exception:  # a shape or a build of torch the probe did not meet
        logger.warning("oneDNN's products failed on %s: using torch's", handler.model_path, exc_info=True)
        return None, 0.0
    if not gap <= _tolerance(handler, dtype):
        logger.warning("oneDNN's products disagree with %s by %.2g: using torch's", handler.model_path, gap)
        return None, 0.0
    return encoder, gap


def _tolerance(handler: Any, dtype: Any) -> float:
    """How far unpadded outputs may be from the model's own (relative to their largest value)."""
    return 1e-4 if dtype == handler._torch.float32 else 5e-2


def _gap_from_model(handler: Any, encoder: "UnpaddedBert") -> float:
    """The largest difference of unpadded outputs from the model's own, relative to their largest
    value, for three inputs of different lengths together, for one alone, and for a pass of
    over ONEDNN_LEAST_ROWS tokens."""
    texts = ["a", "a somewhat longer text, of several words and a comma", "two words"]
    features = [prepared.features for prepared in handler.prepare([handler._example(text) for text in texts])]
    # And a pass of enough tokens to run on oneDNN's products, if the encoder uses them, with a
    # token count that is not a multiple of ROWS_MULTIPLE, so that its rounding runs too.
    many = features * (ONEDNN_LEAST_ROWS // sum(len(f["input_ids"]) for f in features) + 1)
    if sum(len(f["input_ids"]) for f in many) % ROWS_MULTIPLE == 0:
        many.append(features[0])
    return max(_gap(handler, encoder, features), _gap(handler, encoder, features[1:2]), _gap(handler, encoder, many))


def _gap(handler: Any, encoder: "UnpaddedBert", features: list[dict]) -> float:
    inputs = handler._padded(features)
    with handler._torch.inference_mode():
        reference, mine = handler._comparable(features, inputs, encoder)
    return float((reference - mine).abs().max() / reference.abs().max().clamp(min=1e-6))
