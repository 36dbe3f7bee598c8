"""Built-in handler for a Hugging Face text model: embedding, classification, or rerank.

The only module that imports torch or transformers. Texts travel as strings and are tokenised
here, in the worker.

Embeddings follow the directory's own sentence-transformers configuration (st_config.py): its
pooling, Dense layers, normalisation, length limit, lower-casing and default prompt, so that a
vector matches what sentence-transformers' encode() gives. --pooling and --max-length override.
A rerank model is a cross-encoder (sequence classification with one label): it scores a
(query, document) pair, with the activation sentence-transformers' CrossEncoder applies.

Inputs:
    embedding, classification   "text", or {"text": ..., options}
    classification              {"text": ..., "text_pair": ..., options}: a pair of texts, as an NLI
                                cross-encoder takes them, tokenised as tokenizer(text, text_pair)
                                (truncation cuts the longer text first, as for a rerank pair)
    rerank                      {"query": ..., "document": ..., options}, or [query, document]
    any task                    {"tokenize": str, "add_special_tokens"?: bool (true), "prompt_name"?: str}
                                -> [{"id", "text", "special", "start", "stop"}], offsets in UTF-8 bytes
                                   (null for special tokens), as text-embeddings-inference answers;
                                {"decode": [int, ...], "skip_special_tokens"?: bool (true)} -> str
Options, each optional (the gateway's TEI and Cohere routes set them; the wire format is unchanged):
    "truncate": bool            truncate an input over the limit rather than refuse it
    "truncation_direction":     "right" (default) or "left": which end truncation cuts
    "count_tokens": bool        wrap the output with its token count: {"embedding" | "score": ...,
                                "tokens": n} (classification adds "tokens" to its dict)
    "normalize": bool           embedding: L2-normalise (true) or not (false); absent, as the model's
                                configuration says (its Normalize module)
    "prompt_name": str          embedding: put the model's sentence-transformers prompt of that name
                                before the text, instead of its default prompt
    "raw_scores": bool          classification: {"label", "logits": {label: logit}} instead of
                                "probabilities"; rerank: the logit, without the model's activation
    "all_tokens": bool          embedding: the last hidden state of every token, [tokens, hidden]
                                float32, before pooling (text-embeddings-inference's /embed_all)
An input longer than the model's limit fails alone (InputError: HTTP 400); nothing is cut
silently. "truncate": true, or the worker's --auto-truncate, truncates it instead, as
sentence-transformers does.

Length-aware execution: a batch is tokenised once, sorted by token length, and run in chunks
whose padded size stays within a token budget, so short sentences are not padded to the
longest one in the batch. Outputs are put back in input order. On a CPU, a BERT encoder runs
each pass without padding at all (unpadded.py; --unpadded), so that a pass of mixed lengths, as a
continuous worker forms under light load, costs what its tokens cost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.models import InputError, Manager
from worker.models.st_config import (
    PLAIN_MAX_LENGTH,
    EmbeddingConfig,
    parse_pooling,
    read_embedding_config,
    weights_version,
)

logger = logging.getLogger(__name__)

TASKS = ("embedding", "classification", "rerank")
DTYPES = ("auto", "float32", "float16", "bfloat16")
UNPADDED = ("auto", "on", "off")
ONEDNN = ("auto", "off")
_BOOL_OPTIONS = ("truncate", "count_tokens", "normalize", "raw_scores", "all_tokens")
_INPUT_OPTIONS = (*_BOOL_OPTIONS, "truncation_direction", "prompt_name")
_DIRECTIONS = ("left", "right")
_TOKENIZE_OPTIONS = {"tokenize": str, "add_special_tokens": bool, "prompt_name": str}
_DECODE_OPTIONS = {"decode": list, "skip_special_tokens": bool}
_NO_TOKENIZER_LIMIT = 1 << 30  # a tokenizer's model_max_length above this means "not set"

# Forward-pass size by device: (most inputs, fewest inputs before a batch is halved, most padded
# tokens). A batch is sorted by length and cut into passes. On a CPU, passes of 16 cost less per
# input than one pass of 64 even after sorting (bench/README.md: about 95 against 57 inputs/s for
# MiniLM, 2 threads): less padding, and activations that stay in cache. A smaller batch still
# runs as two sorted halves, down to passes of 8: for random batches of 16, two passes of 8 gave
# 102 inputs/s against 83 for one pass (bench.chunking). A continuous worker forms its passes by
# the same bounds from all it holds (worker/passes.py); a budget of 1024 padded tokens rather than
# 2048 took its in-process rate from 0.89 to 0.93x the length-sorted limit (bench.continuous, 64
# held). A GPU wants the whole batch in one pass.
_CHUNKING = {"cpu": (16, 8, 1024), "cuda": (1024, 1024, 65536)}


@dataclass
class _Input:
    """One input of a batch, parsed."""

    position: int  # in the batch
    text: str | tuple[str, str]  # a text, or a pair: (query, document), or a classifier's (text, text_pair)
    truncate: bool
    count_tokens: bool
    features: dict | None = None  # its tokens: input_ids, and token_type_ids where the model has them
    truncate_left: bool = False  # truncation cuts the start rather than the end
    normalize: bool | None = None  # None: as the model's configuration says
    prompt: str | None = None  # None: the model's default prompt
    raw_scores: bool = False
    all_tokens: bool = False
    done: bool = False  # a tokenize or decode input: its output is already known, no forward pass
    output: Any = None


class HFTextModel(Manager):
    continuous = True  # the worker forms passes from what it holds, by token length (prepare, cost)

    def __init__(
        self,
        device: str = "cpu",
        model_path: str = "",
        task: str = "embedding",
        max_length: int | None = None,
        chunk_tokens: int = 0,
        max_chunk: int = 0,
        dtype: str = "auto",
        pooling: str | None = None,
        revision: str | None = None,
        auto_truncate: bool = False,
        unpadded: str = "auto",
        onednn: str = "auto",
        **options,
    ):
        super().__init__(device=device, **options)
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not model_path:
            raise ValueError("model_path must be a local model directory or a Hugging Face model id")
        if revision and os.path.isdir(model_path):
            raise ValueError(f"--revision picks a version of a Hugging Face model id; {model_path} is a local directory")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if unpadded not in UNPADDED:
            raise ValueError(f"unpadded must be one of {', '.join(UNPADDED)}, got {unpadded!r}")
        if onednn not in ONEDNN:
            raise ValueError(f"onednn must be one of {', '.join(ONEDNN)}, got {onednn!r}")
        if pooling and task != "embedding":
            raise ValueError(f"--pooling applies to --task embedding, not {task}")
        self.model_path = model_path
        self.revision = revision
        self.task = task
        self.max_length = max_length  # None: the model's own limit
        self.pooling_override = parse_pooling(pooling) if pooling else None
        self.auto_truncate = auto_truncate  # truncate over-long inputs that do not say otherwise
        self.unpadded = unpadded  # auto: passes without padding on a CPU, for the models unpadded.py knows
        self.onednn = onednn  # auto: unpadded passes use oneDNN's products on a CPU, where torch has them
        self._unpadded = None  # the UnpaddedBert in use, set by init_model()
        # Per forward pass: inputs, and padded tokens; 0 = what suits the device (_CHUNKING).
        self.chunk_tokens = chunk_tokens
        self.max_chunk = max_chunk
        self.min_chunk = max_chunk
        self.dtype_name = dtype  # auto = float16 on CUDA, float32 on the CPU
        self.labels: list[str] = []
        self.max_tokens = 0  # the limit in force, set by init_model()
        self.model_dir = model_path if os.path.isdir(model_path) else ""  # resolved by init_model()

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
        self.model_dir = _resolve_model_dir(self.model_path, self.revision)
        if self.task == "embedding":
            config = read_embedding_config(self.model_dir)
        else:
            config = EmbeddingConfig(transformer_path=self.model_dir)
        if self.pooling_override:
            config = dataclasses.replace(config, pooling=self.pooling_override,
                                         notes=[*config.notes, f"pooling {'+'.join(self.pooling_override)} (--pooling)"])
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.transformer_path, local_files_only=True)
        self._tokenizing = threading.Lock()  # a truncating call sets the tokenizer's truncation side
        if config.do_lower_case:
            _lower_case(self.tokenizer)
        model_class = AutoModel if self.task == "embedding" else AutoModelForSequenceClassification
        self.model = model_class.from_pretrained(config.transformer_path, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.max_tokens, limit_source = self._limit()
        # Lengths are checked here, input by input: the tokenizer must neither cut nor warn.
        self.tokenizer.model_max_length = _NO_TOKENIZER_LIMIT
        self.prompt_length = self._prompt_length()
        self.dense = [_load_dense(layer, torch, self.device) for layer in config.dense]
        if self.task == "classification":
            id2label = self.model.config.id2label
            self.labels = [str(id2label.get(i, i)) for i in range(self.model.config.num_labels)]
            self.output_dim = self.model.config.num_labels
        elif self.task == "rerank":
            if self.model.config.num_labels != 1:
                raise ValueError(f"a rerank model scores a pair with one label; {self.model_path} has "
                                 f"{self.model.config.num_labels} (serve it with --task classification)")
            self.activation = _score_activation(self.model.config, torch)
            self.output_dim = 1
        else:
            self.output_dim = (self.dense[-1][0].out_features if self.dense
                               else self.model.config.hidden_size * len(config.pooling))
        notes = list(config.notes) if self.task == "embedding" else []
        self._unpadded, note = self._load_unpadded(dtype)
        notes.append(note)
        notes.append(f"at most {self.max_tokens} tokens ({limit_source}); longer inputs are "
                     + ("truncated (--auto-truncate)" if self.auto_truncate else "refused unless they ask to be truncated"))
        logger.info("loaded %s (%s) on %s as %s in %.1f s: %s", self.model_path, self.task, self.device, dtype,
                    time.monotonic() - started_at, "; ".join(notes))

    def _limit(self) -> tuple[int, str]:
        """Tokens per input, and where that figure came from."""
        own_limits = [n for n in (self.tokenizer.model_max_length,
                                  getattr(self.model.config, "max_position_embeddings", None))
                      if isinstance(n, int) and 0 < n < _NO_TOKENIZER_LIMIT]
        own = min(own_limits, default=None)  # sentence-transformers' rule: the tokenizer's, capped by positions
        if self.max_length is not None:
            if own is not None and self.max_length > own:
                logger.warning("--max-length %d exceeds the model's own limit of %d tokens", self.max_length, own)
            return self.max_length, "--max-length"
        if self.task == "embedding" and self.config.sentence_transformers and self.config.max_seq_length:
            return self.config.max_seq_length, "max_seq_length in sentence_bert_config.json"
        if self.task == "rerank" or (self.task == "embedding" and self.config.sentence_transformers):
            if own is None:
                raise ValueError(f"{self.model_path} states no length limit: give --max-length")
            return own, "the tokenizer's model_max_length, within max_position_embeddings"
        if own is not None and own < PLAIN_MAX_LENGTH:
            return own, "the model's max_position_embeddings"
        return PLAIN_MAX_LENGTH, "ddml's default for a plain transformers model"

    def _load_unpadded(self, dtype) -> tuple:
        """The UnpaddedBert to run passes with (or None), and a note saying why."""
        if self.unpadded == "off":
            return None, "padded passes (--unpadded off)"
        if self.unpadded == "auto" and self.device.startswith("cuda"):
            return None, "padded passes (a GPU; --unpadded on to change)"
        encoder, gap = None, 0.0
        if self.tokenizer.padding_side != "right":
            # BERT numbers positions from the start of the padded row: padded on the left, its own
            # passes give an input other vectors than it gets alone, and unpadded ones would differ.
            note = "padded passes (the tokenizer pads on the left)"
        else:
            from worker.models.unpadded import unpadded_encoder

            try:
                encoder, gap = self._onednn_encoder(dtype) if self.onednn == "auto" else (None, 0.0)
                if encoder is None:
                    encoder = unpadded_encoder(self.model, onednn=False)
                    gap = self._unpadded_gap(encoder) if encoder is not None else 0.0
            except Exception:  # a transformers version whose BERT differs from what unpadded.py reads
                logger.warning("passes without padding failed on %s: running padded passes", self.model_path,
                               exc_info=True)
                return None, "padded passes (unpadded ones failed)"
            note = (f"padded passes ({type(self.model).__name__}: unpadded ones run BERT encoders only)"
                    if encoder is None else "")
        if note:
            if self.unpadded == "on":
                logger.warning("--unpadded on: %s", note)
            return None, note
        tolerance = self._tolerance(dtype)
        if not gap <= tolerance:
            logger.warning("passes without padding disagree with %s by %.2g (more than %g): running padded passes",
                           self.model_path, gap, tolerance)
            return None, "padded passes (unpadded ones disagreed with the model)"
        return encoder, "passes without padding" + (", products by oneDNN" if encoder.linear_kind == "oneDNN" else "")

    def _onednn_encoder(self, dtype) -> tuple:
        """An UnpaddedBert on oneDNN's products and its gap from the model, if it is one and agrees
        with the model; else (None, 0.0), and torch's products are tried."""
        from worker.models.unpadded import unpadded_encoder

        try:
            encoder = unpadded_encoder(self.model, onednn=True)
            if encoder is None or encoder.linear_kind != "oneDNN":
                return None, 0.0
            gap = self._unpadded_gap(encoder)
        except Exception:  # a shape or a build of torch the probe did not meet
            logger.warning("oneDNN's products failed on %s: using torch's", self.model_path, exc_info=True)
            return None, 0.0
        if not gap <= self._tolerance(dtype):
            logger.warning("oneDNN's products disagree with %s by %.2g: using torch's", self.model_path, gap)
            return None, 0.0
        return encoder, gap

    def _tolerance(self, dtype) -> float:
        """How far unpadded outputs may be from the model's own (relative to their largest value)."""
        return 1e-4 if dtype == self._torch.float32 else 5e-2

    def _unpadded_gap(self, encoder) -> float:
        """The largest difference of unpadded outputs from the model's own, relative to their largest
        value, for three inputs of different lengths together, for one alone, and for a pass of
        over ONEDNN_LEAST_ROWS tokens."""
        texts = ["a", "a somewhat longer text, of several words and a comma", "two words"]
        inputs = [{"query": text, "document": text, "truncate": True} if self.task == "rerank"
                  else {"text": text, "truncate": True} for text in texts]
        features = [prepared.features for prepared in self.prepare(inputs)]
        from worker.models.unpadded import ONEDNN_LEAST_ROWS, ROWS_MULTIPLE

        # And a pass of enough tokens to run on oneDNN's products, if the encoder uses them, with a
        # token count that is not a multiple of ROWS_MULTIPLE, so that its rounding runs too.
        many = features * (ONEDNN_LEAST_ROWS // sum(len(f["input_ids"]) for f in features) + 1)
        if sum(len(f["input_ids"]) for f in many) % ROWS_MULTIPLE == 0:
            many.append(features[0])
        return max(self._gap(encoder, features), self._gap(encoder, features[1:2]), self._gap(encoder, many))

    def _gap(self, encoder, features: list[dict]) -> float:
        torch = self._torch
        inputs = self._padded(features)
        with torch.inference_mode():
            if self.task == "embedding":
                reference = self.model(**inputs).last_hidden_state.float()
                mine = encoder.hidden(features, self.device)[0].float()
                real = inputs["attention_mask"].bool()  # padded on the right, as unpadded outputs are
                reference, mine = reference[real], mine[real]
            else:
                reference = self.model(**inputs).logits.float()
                mine = encoder.logits(features, self.device).float()
        return float((reference - mine).abs().max() / reference.abs().max().clamp(min=1e-6))

    def _prompt_length(self) -> int:
        """Tokens of the default prompt that pooling leaves out (include_prompt false), as sentence-transformers counts them."""
        if not self.config.prompt or self.config.include_prompt or self.task != "embedding":
            return 0
        ids = self.tokenizer([self.config.prompt])["input_ids"][0]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def version(self) -> str | None:
        return weights_version(self.model_dir) if self.model_dir else None

    # ------------------------------------------------------------------ batches

    def predict(self, batch: list) -> list:
        """Inputs as they come (a batch), or prepare()d ones (a continuous worker's pass)."""
        if batch and all(isinstance(value, _Input) for value in batch):
            return self._run(list(batch), halve=False)
        prepared = self.prepare(batch)
        outputs: list = list(prepared)
        items = []
        for position, value in enumerate(prepared):
            if isinstance(value, _Input):
                value.position = position
                items.append(value)
        for item, output in zip(items, self._run(items, halve=True)):
            outputs[item.position] = output
        return outputs

    def prepare(self, batch: list) -> list:
        """Parse and tokenize each input: an _Input with its tokens, or an InputError for it."""
        prepared: list = [None] * len(batch)
        items = []
        for position, value in enumerate(batch):
            try:
                if isinstance(value, dict) and ("tokenize" in value or "decode" in value):
                    prepared[position] = _Input(position, "", False, False, features={"input_ids": []}, done=True,
                                                output=self._tokens_or_text(value))
                else:
                    items.append(self._parse(position, value))
            except InputError as error:
                prepared[position] = error
        for item, problem in zip(items, self._tokenize(items)):
            prepared[item.position] = item if problem is None else problem
        return prepared

    def cost(self, prepared: _Input) -> int:
        return len(prepared.features["input_ids"])

    def pass_limits(self) -> tuple[int, int, int]:
        return self.max_chunk, self.chunk_tokens, self.min_chunk

    @property
    def padded(self) -> bool:
        """A pass pads its inputs to the longest, unless it runs unpadded (unpadded.py): then it pays
        for its tokens, and the worker forms passes oldest first."""
        return self._unpadded is None

    @property
    def compute_lanes(self) -> int:
        """Two lanes on a CPU with two threads or more, one on a GPU. On 2 CPU cores (MiniLM), a pass
        at one thread costs about the same per input whatever its size (as much is lost to padding
        as is won), so two lanes of one thread let an input that arrives during a pass start at once
        at no cost in throughput. Predict() is thread-safe: inference only, and tokenizer.pad()."""
        return 2 if not self.device.startswith("cuda") and self._torch.get_num_threads() >= 2 else 1

    def _run(self, items: list[_Input], halve: bool) -> list:
        """The outputs of tokenized inputs, in their order: sorted by length, in passes (_chunks)."""
        outputs: list = [item.output for item in items]
        order = sorted((k for k in range(len(items)) if not items[k].done),
                       key=lambda k: len(items[k].features["input_ids"]))
        for chunk in self._chunks(order, [len(items[k].features["input_ids"]) for k in order], halve):
            for k, value in zip(chunk, self._forward([items[k] for k in chunk])):
                item = items[k]
                outputs[k] = self._with_tokens(value, item) if item.count_tokens else value
        return outputs

    def _parse(self, position: int, value) -> _Input:
        options = {}
        if self.task == "rerank":
            if isinstance(value, (list, tuple)) and len(value) == 2:
                value = {"query": value[0], "document": value[1]}
            if not isinstance(value, dict):
                raise InputError(f"a rerank input is {{'query': str, 'document': str}} or [query, document], "
                                 f"got {type(value).__name__}")
            fields = ("query", "document")
        else:
            if isinstance(value, str):
                return _Input(position, value, self.auto_truncate, False)
            if not isinstance(value, dict):
                raise InputError(f"input must be a string or {{'text': str}}, got {type(value).__name__}")
            # A classifier also takes a pair of texts (an NLI cross-encoder, say): text and text_pair.
            fields = ("text", "text_pair") if self.task == "classification" and "text_pair" in value else ("text",)
        unknown = sorted(set(value) - set(fields) - set(_INPUT_OPTIONS), key=str)
        if unknown:
            takes = fields + (("text_pair",) if self.task == "classification" and len(fields) == 1 else ())
            raise InputError(f"unknown field {unknown[0]!r} in an input (it takes {', '.join(takes + _INPUT_OPTIONS)})")
        for name in fields:
            if not isinstance(value.get(name), str):
                raise InputError(f"input field {name!r} must be a string, got {type(value.get(name)).__name__}")
        for name in _BOOL_OPTIONS:
            if name in value and not isinstance(value[name], bool):
                raise InputError(f"input field {name!r} must be true or false, got {value[name]!r:.40}")
            options[name] = value.get(name)
        direction = value.get("truncation_direction", "right")
        if not isinstance(direction, str) or direction.lower() not in _DIRECTIONS:
            raise InputError(f"input field 'truncation_direction' must be left or right, got {direction!r:.40}")
        if options["normalize"] is not None and self.task != "embedding":
            raise InputError(f"input field 'normalize' applies to embedding models, not {self.task}")
        if options["raw_scores"] is not None and self.task == "embedding":
            raise InputError("input field 'raw_scores' applies to classification and rerank models, not embedding")
        if options["all_tokens"] is not None and self.task != "embedding":
            raise InputError(f"input field 'all_tokens' applies to embedding models, not {self.task}")
        text = value["text"] if len(fields) == 1 else (value[fields[0]], value[fields[1]])
        truncate = self.auto_truncate if options["truncate"] is None else options["truncate"]
        return _Input(position, text, truncate, bool(options["count_tokens"]),
                      truncate_left=direction.lower() == "left", normalize=options["normalize"],
                      prompt=self._prompt(value.get("prompt_name"), pair=len(fields) == 2),
                      raw_scores=bool(options["raw_scores"]),
                      all_tokens=bool(options["all_tokens"]))

    def _prompt(self, name, pair: bool = False) -> str | None:
        """The prompt text of a prompt_name (None when none is named): the model's sentence-transformers
        prompts, as text-embeddings-inference takes them. An unknown name is an InputError."""
        if name is None:
            return None
        if not isinstance(name, str):
            raise InputError(f"input field 'prompt_name' must be a string, got {type(name).__name__}")
        if pair or self.task == "rerank":
            raise InputError("`prompt_name` cannot be set with dual inputs")
        prompts = getattr(self.config, "prompts", None) or {}
        if name not in prompts:
            known = f"Available prompts: {sorted(prompts)}" if prompts else "the model has no prompts"
            raise InputError(f"`prompt_name` {name!r} was not found in the Sentence Transformers prompts. {known}")
        if self.prompt_length and prompts[name] != self.config.prompt:
            raise InputError("this model leaves its default prompt out of pooling (include_prompt false), so it "
                             "takes no other prompt_name")
        return prompts[name]

    def _tokens_or_text(self, value: dict):
        """The output of a tokenize or a decode input (see the module docstring)."""
        kinds = _TOKENIZE_OPTIONS if "tokenize" in value else _DECODE_OPTIONS
        unknown = sorted(set(value) - set(kinds), key=str)
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r} in a {next(iter(kinds))} input "
                             f"(it takes {', '.join(kinds)})")
        for name, kind in kinds.items():
            if name in value and not isinstance(value[name], kind):
                raise InputError(f"input field {name!r} must be a {kind.__name__}, got {type(value[name]).__name__}")
        if "decode" in value:
            ids = value["decode"]
            vocabulary = len(self.tokenizer)
            for token_id in ids:
                if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocabulary:
                    raise InputError(f"token id {token_id!r:.40} is not in this model's vocabulary (0 to "
                                     f"{vocabulary - 1})")
            return self.tokenizer.decode(ids, skip_special_tokens=value.get("skip_special_tokens", True))
        prompt = self._prompt(value.get("prompt_name"))
        text = (self.config.prompt if prompt is None else prompt) + value["tokenize"]
        with self._tokenizing:
            encoded = self.tokenizer(text, add_special_tokens=value.get("add_special_tokens", True),
                                     return_offsets_mapping=True, return_special_tokens_mask=True)
        tokens = self.tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        answer = []
        for token_id, token, special, (start, stop) in zip(encoded["input_ids"], tokens,
                                                           encoded["special_tokens_mask"], encoded["offset_mapping"]):
            if special:
                answer.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
            else:
                start_byte = len(text[:start].encode())
                answer.append({"id": token_id, "text": text[start:stop], "special": False,
                               "start": start_byte, "stop": start_byte + len(text[start:stop].encode())})
        return answer

    def _tokenize(self, items: list[_Input]) -> list[InputError | None]:
        """Set each item's features; an input over the limit that may not be truncated gets an InputError."""
        if not items:
            return []
        encoded = self._encode(items, truncate=False)
        keys = [key for key in encoded if key != "attention_mask"]
        problems: list[InputError | None] = []
        for k, item in enumerate(items):
            features = {key: encoded[key][k] for key in keys}
            length = len(features["input_ids"])
            if length > self.max_tokens:
                if not item.truncate:
                    problems.append(InputError(
                        f"the input has {length} tokens, more than this model's limit of {self.max_tokens}; shorten it, "
                        "or ask for truncation (\"truncate\": true on the /v1 predict route, or the worker's "
                        "--auto-truncate)"))
                    continue
                again = self._encode([item], truncate=True)
                features = {key: again[key][0] for key in keys}
            item.features = features
            problems.append(None)
        return problems

    def _encode(self, items: list[_Input], truncate: bool) -> dict:
        """The tokens of items, as tokenizer() answers for a batch. A pair is tokenizer(text, text_pair),
        truncated longest first (the tokenizer's default, and text-embeddings-inference's for pairs)."""
        pairs = [k for k, item in enumerate(items) if isinstance(item.text, tuple)]
        if 0 < len(pairs) < len(items):  # a classifier's singles and pairs together: each kind in one call
            apart = [[k for k, item in enumerate(items) if not isinstance(item.text, tuple)], pairs]
            merged: dict = {}
            for ks in apart:
                for key, rows in self._encode([items[k] for k in ks], truncate).items():
                    column = merged.setdefault(key, [None] * len(items))
                    for k, row in zip(ks, rows):
                        column[k] = row
            return merged
        limits = {"truncation": True, "max_length": self.max_tokens} if truncate else {"truncation": False}
        with self._tokenizing:
            if truncate:  # one item at a time (_tokenize), with its own side
                self.tokenizer.truncation_side = "left" if items[0].truncate_left else "right"
            if pairs:
                return self.tokenizer([item.text[0] for item in items], [item.text[1] for item in items], **limits)
            default = self.config.prompt
            return self.tokenizer([(default if item.prompt is None else item.prompt) + item.text for item in items],
                                  **limits)

    def _with_tokens(self, value, item: _Input):
        tokens = len(item.features["input_ids"])
        if self.task == "classification":
            return {**value, "tokens": tokens}
        return {"score" if self.task == "rerank" else "embedding": value, "tokens": tokens}

    def _chunks(self, order: list[int], lengths: list[int], halve: bool = True):
        """Split length-sorted inputs into passes: at most max_chunk inputs (fewer for a small batch,
        with halve, so that it still runs as two halves, down to min_chunk) and chunk_tokens padded
        tokens. A continuous worker's pass comes already formed and in bounds: one forward pass."""
        most = min(self.max_chunk, max(self.min_chunk, -(-len(order) // 2))) if halve else self.max_chunk
        chunk: list[int] = []
        for position, k in enumerate(order):
            longest = lengths[position]  # sorted ascending: the newest is the longest
            if chunk and (len(chunk) + 1 > most or longest * (len(chunk) + 1) > self.chunk_tokens):
                yield chunk
                chunk = []
            chunk.append(k)
        if chunk:
            yield chunk

    def _forward(self, items: list[_Input]) -> list:
        torch = self._torch
        unpadded = self._unpadded
        features = [item.features for item in items]
        if unpadded is None:
            inputs = self._padded(features)
        with torch.inference_mode():
            if self.task == "embedding":
                if unpadded is None:
                    hidden, mask = self.model(**inputs).last_hidden_state, inputs["attention_mask"]
                else:
                    hidden, mask = unpadded.hidden(features, self.device)
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
            logits = (self.model(**inputs).logits if unpadded is None else unpadded.logits(features, self.device)).float()
            if self.task == "rerank":
                scores = self.activation(logits)[:, 0].cpu().tolist()
                raw = logits[:, 0].cpu().tolist()
                return [r if item.raw_scores else s for item, s, r in zip(items, scores, raw)]
            probabilities = torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float32)
            logits = logits.cpu().numpy().astype(np.float32)
        return [
            {"label": self.labels[int(p.argmax())],
             **({"logits": dict(zip(self.labels, raw.tolist()))} if item.raw_scores
                else {"probabilities": dict(zip(self.labels, p.tolist()))})}
            for item, p, raw in zip(items, probabilities, logits)
        ]

    def _padded(self, features: list[dict]) -> dict:
        """The model's own inputs: features padded to the longest, on the device."""
        padded = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        non_blocking = self.device.startswith("cuda")
        return {key: tensor.to(self.device, non_blocking=non_blocking) for key, tensor in padded.items()}

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

    def warmup(self) -> None:
        """A few passes of short and long inputs, so the first real request pays no first-call costs."""
        for length in (1, 16, 64):
            text = " ".join(["warm"] * length)
            self.predict([[text, text] if self.task == "rerank" else {"text": text, "truncate": True}] * 4)

    def metadata(self) -> dict:
        if self.task == "rerank":
            inputs = [{"name": "query", "datatype": "BYTES", "shape": [-1]},
                      {"name": "document", "datatype": "BYTES", "shape": [-1]}]
            outputs = [{"name": "SCORE", "datatype": "FP32", "shape": [-1]}]
        elif self.task == "embedding":
            inputs = [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
            outputs = [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, self.output_dim]}]
        else:
            inputs = [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
            outputs = [
                {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, self.output_dim], "key": "probabilities",
                 "labels": self.labels},
                {"name": "LABEL", "datatype": "BYTES", "shape": [-1, 1], "key": "label"},
            ]
        described = {"platform": "pytorch", "task": self.task, "max_tokens": self.max_tokens,
                     "auto_truncate": self.auto_truncate, "dtype": str(self.model.dtype).removeprefix("torch."),
                     "inputs": inputs, "outputs": outputs}
        if self.task == "embedding":  # what text-embeddings-inference's /info reports (gateway/tei.py)
            described["pooling"] = "+".join(self.config.pooling)
        else:
            id2label = self.model.config.id2label
            described["labels"] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.model.config.num_labels)]
        return described

    def describe(self) -> dict:
        torch = getattr(self, "_torch", None)
        if torch is not None and self.device.startswith("cuda"):
            return {"cuda_memory_allocated_bytes": int(torch.cuda.memory_allocated(self.device))}
        return {}


def _resolve_model_dir(model_path: str, revision: str | None) -> str:
    """A local directory as it is; anything else is a Hugging Face model id, found in the local
    cache (HF_HUB_OFFLINE=1, ddml-worker's default) or downloaded, at --revision if given."""
    if os.path.isdir(model_path):
        return model_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_path, revision=revision)
    except Exception as error:  # the hub client's errors are many; all mean "not available"
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"{model_path!r} is not a local directory, and no Hugging Face model of that id{at} "
                         f"could be found ({type(error).__name__}: {error})") from None


def _lower_case(tokenizer) -> None:
    """do_lower_case: lower-case before the tokenizer's own normaliser, as sentence-transformers does."""
    if not tokenizer.is_fast:
        tokenizer.do_lower_case = True
        return
    from tokenizers.normalizers import Lowercase, Sequence

    backend = tokenizer.backend_tokenizer
    existing = backend.normalizer
    if existing is None:
        backend.normalizer = Sequence([Lowercase()])
    elif isinstance(existing, Sequence):
        backend.normalizer = Sequence([Lowercase(), *existing])
    else:
        backend.normalizer = Sequence([Lowercase(), existing])


def _exclude_prompt(mask, prompt_length: int, torch):
    """The attention mask with the prompt's tokens (and any left padding) zeroed, for pooling."""
    mask = mask.clone()
    padding = mask.to(torch.int32).argmax(dim=1)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    mask[positions < (padding + prompt_length).unsqueeze(1)] = 0
    return mask


def _torch_module(name: str, torch, where: str):
    module = getattr(torch.nn, name, None)
    if not (isinstance(module, type) and issubclass(module, torch.nn.Module)):
        raise ValueError(f"{where}: activation {name!r} is not a torch.nn module")
    return module()


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
    return linear.to(device).eval(), _torch_module(layer.activation, torch, layer.path)


def _score_activation(config, torch):
    """The activation CrossEncoder.predict() applies: the one the config names, else Sigmoid."""
    named = getattr(config, "sentence_transformers", None)
    path = named.get("activation_fn") if isinstance(named, dict) else None
    path = path or getattr(config, "sbert_ce_default_activation_function", None)
    if not path:
        return torch.nn.Sigmoid()
    if not str(path).startswith("torch.nn."):
        raise ValueError(f"the model's activation {path!r} is not a torch.nn module")
    return _torch_module(str(path).rsplit(".", 1)[-1], torch, "config.json")


def cuda_device_count() -> int:
    """CUDA devices visible to this process; 0 where torch has no CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
