"""The inputs of the built-in text models: read, checked and tokenised once, as they arrive.

The forms of an input and its options are in hf_text.py's docstring. TextInputs.prepare() turns
each input into a TextInput with its tokens, or an InputError for it alone; a tokenize or a
decode input gets its output here, and runs in no pass. The task's InputForm says what its
inputs look like, so that nothing here asks which task it serves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from worker.models import InputError

NO_TOKENIZER_LIMIT = 1 << 30  # a tokenizer's model_max_length above this means "not set"
_BOOL_OPTIONS = ("truncate", "count_tokens", "normalize", "raw_scores", "all_tokens")
_INPUT_OPTIONS = (*_BOOL_OPTIONS, "truncation_direction", "prompt_name")
#: The options only some tasks take, and which (an InputForm lists those its task takes).
TASK_OPTIONS = {"normalize": "embedding models", "raw_scores": "classification and rerank models",
                "all_tokens": "embedding models"}
_DIRECTIONS = ("left", "right")
_TOKENIZE_OPTIONS = {"tokenize": str, "add_special_tokens": bool, "prompt_name": str}
_DECODE_OPTIONS = {"decode": list, "skip_special_tokens": bool}


@dataclass(frozen=True)
class InputForm:
    """What a task's inputs look like."""

    task: str
    fields: tuple[str, ...]  # the text fields of a dict input
    options: frozenset[str]  # the TASK_OPTIONS it takes
    optional_pair: str | None = None  # a field that may join the first, making a pair (a classifier's text_pair)
    pairs: bool = False  # every input is a pair of fields, also given as a two-item list (rerank)


@dataclass
class TextInput:
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
    done: bool = False  # a tokenize or decode input: its output is already known, no pass
    output: Any = None


class TextInputs:
    """Reads and tokenises one model's inputs. Thread-safe: a truncating call holds a lock, since
    it sets the tokenizer's truncation side."""

    def __init__(self, tokenizer, config, form: InputForm, max_tokens: int, auto_truncate: bool,
                 prompt_length: int = 0):
        self.tokenizer = tokenizer
        self.config = config  # the EmbeddingConfig in force: default prompt and named prompts
        self.form = form
        self.max_tokens = max_tokens
        self.auto_truncate = auto_truncate
        self.prompt_length = prompt_length  # tokens of the default prompt left out of pooling
        self._tokenizing = threading.Lock()

    def prepare(self, batch: list) -> list:
        """Parse and tokenize each input: a TextInput with its tokens, or an InputError for it."""
        prepared: list = [None] * len(batch)
        items = []
        for position, value in enumerate(batch):
            try:
                if isinstance(value, dict) and ("tokenize" in value or "decode" in value):
                    prepared[position] = TextInput(position, "", False, False, features={"input_ids": []},
                                                   done=True, output=self._tokens_or_text(value))
                else:
                    items.append(self._parse(position, value))
            except InputError as error:
                prepared[position] = error
        for item, problem in zip(items, self._tokenize(items)):
            prepared[item.position] = item if problem is None else problem
        return prepared

    def _parse(self, position: int, value) -> TextInput:
        form = self.form
        options = {}
        if form.pairs:
            first, second = form.fields
            if isinstance(value, (list, tuple)) and len(value) == 2:
                value = {first: value[0], second: value[1]}
            if not isinstance(value, dict):
                raise InputError(f"a {form.task} input is {{'{first}': str, '{second}': str}} or [{first}, {second}], "
                                 f"got {type(value).__name__}")
            fields = takes = form.fields
        else:
            if isinstance(value, str):
                return TextInput(position, value, self.auto_truncate, False)
            if not isinstance(value, dict):
                raise InputError(f"input must be a string or {{'text': str}}, got {type(value).__name__}")
            pair = (form.optional_pair,) if form.optional_pair else ()
            fields = form.fields + pair if form.optional_pair in value else form.fields
            takes = form.fields + pair
        unknown = sorted(set(value) - set(fields) - set(_INPUT_OPTIONS), key=str)
        if unknown:
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
        for name, takers in TASK_OPTIONS.items():
            if options[name] is not None and name not in form.options:
                raise InputError(f"input field {name!r} applies to {takers}, not {form.task}")
        text = value[fields[0]] if len(fields) == 1 else (value[fields[0]], value[fields[1]])
        truncate = self.auto_truncate if options["truncate"] is None else options["truncate"]
        return TextInput(position, text, truncate, bool(options["count_tokens"]),
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
        if pair or self.form.pairs:
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
        """The output of a tokenize or a decode input (see hf_text.py's docstring)."""
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

    def _tokenize(self, items: list[TextInput]) -> list[InputError | None]:
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

    def _encode(self, items: list[TextInput], truncate: bool) -> dict:
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
