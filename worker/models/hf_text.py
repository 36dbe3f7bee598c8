"""Built-in handler for a Hugging Face text model: what the three tasks share.

HFTextModel(task=...) is the handler of `--model-path DIR --task embedding|classification|rerank`;
the task picks its class, once: TextEmbedding (text_embedding.py), TextClassifier
(text_classify.py) or TextReranker (text_rerank.py). Each holds its task's model head, forward
pass, outputs and metadata. This module holds the rest: loading, the length limit, running a
batch in passes, and, through text_inputs.py, reading and tokenising inputs, and through
unpadded.py, passes without padding and their check at load. torch and transformers are
imported only as a model loads (init_model), not with these modules. Texts travel as strings
and are tokenised in the worker.

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

Length-aware execution: a batch is tokenised once, sorted by token length, and run in passes
whose padded size (unpadded: whose sum of tokens) stays within a token budget (worker/passes.py:
sorted_passes), so short sentences are not padded to the longest one in the batch. Outputs are put back in input order.
On a CPU, a BERT encoder runs each pass without padding at all (unpadded.py; --unpadded), so
that a pass of mixed lengths, as a continuous worker forms under light load, costs what its
tokens cost.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from worker.models import Manager
from worker.models.st_config import PLAIN_MAX_LENGTH, EmbeddingConfig, weights_version
from worker.models.text_inputs import NO_TOKENIZER_LIMIT, InputForm, TextInput, TextInputs
from worker.passes import sorted_passes

logger = logging.getLogger(__name__)

TASKS = ("embedding", "classification", "rerank")
DTYPES = ("auto", "float32", "float16", "bfloat16")
UNPADDED = ("auto", "on", "off")
ONEDNN = ("auto", "off")

# Pass size by device: (most inputs, fewest inputs before a batch is halved, most tokens: padded,
# or, for passes without padding, their sum).
# A batch is sorted by length and cut into passes. On a CPU, passes of 16 cost less per input than
# one pass of 64 even after sorting (bench/README.md: about 95 against 57 inputs/s for MiniLM, 2
# threads): less padding, and activations that stay in cache. A smaller batch still runs as two
# sorted halves, down to passes of 8: for random batches of 16, two passes of 8 gave 102 inputs/s
# against 83 for one pass (bench.chunking). A continuous worker forms its passes by the same
# bounds from all it holds (worker/passes.py); a budget of 1024 padded tokens rather than 2048
# took its in-process rate from 0.89 to 0.93x the length-sorted limit (bench.continuous, 64
# held). A GPU wants the whole batch in one pass.
_PASS_LIMITS = {"cpu": (16, 8, 1024), "cuda": (1024, 1024, 65536)}


def _task_class(task: str) -> type[HFTextModel]:
    """The handler class of a task (imported here, since each task's module imports this one)."""
    if task == "embedding":
        from worker.models.text_embedding import TextEmbedding as chosen
    elif task == "classification":
        from worker.models.text_classify import TextClassifier as chosen
    elif task == "rerank":
        from worker.models.text_rerank import TextReranker as chosen
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return chosen


class HFTextModel(Manager):
    """The shared part of the built-in text handlers; HFTextModel(task=...) builds the task's own."""

    continuous = True  # the worker forms passes from what it holds, by token length (prepare, cost)
    form: InputForm  # the task, and what its inputs look like (text_inputs.py)
    auto_class: str  # the transformers class that loads the model

    def __new__(cls, device: str = "cpu", model_path: str = "", task: str | None = None, *args, **options):
        if cls is HFTextModel:
            cls = _task_class("embedding" if task is None else task)
        elif task is not None and task != cls.form.task:
            raise ValueError(f"{cls.__name__} serves --task {cls.form.task}, not {task}")
        return super().__new__(cls)

    @property
    def task(self) -> str:
        return self.form.task

    def __init__(
        self,
        device: str = "cpu",
        model_path: str = "",
        task: str | None = None,
        max_length: int | None = None,
        pass_tokens: int = 0,
        pass_size: int = 0,
        dtype: str = "auto",
        pooling: str | None = None,
        revision: str | None = None,
        auto_truncate: bool = False,
        unpadded: str = "auto",
        onednn: str = "auto",
        **options,
    ):
        super().__init__(device=device, **options)
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
        self._take_pooling(pooling)
        self.model_path = model_path
        self.revision = revision
        self.max_length = max_length  # None: the model's own limit
        self.auto_truncate = auto_truncate  # truncate over-long inputs that do not say otherwise
        self.unpadded = unpadded  # auto: passes without padding on a CPU, for the models unpadded.py knows
        self.onednn = onednn  # auto: unpadded passes use oneDNN's products on a CPU, where torch has them
        self._unpadded = None  # the UnpaddedBert in use, set by init_model()
        # Per pass: inputs, and padded tokens; 0 = what suits the device (_PASS_LIMITS).
        self.pass_tokens = pass_tokens
        self.pass_size = pass_size
        self.least_pass_size = pass_size
        self.dtype_name = dtype  # auto = float16 on CUDA, float32 on the CPU
        self.max_tokens = 0  # the limit in force, set by init_model()
        self.prompt_length = 0  # tokens of the default prompt that pooling leaves out (embedding)
        self.model_dir = model_path if os.path.isdir(model_path) else ""  # resolved by init_model()

    # ------------------------------------------------------------------ what each task gives

    def _take_pooling(self, pooling: str | None) -> None:
        """--pooling, which only an embedding takes."""
        if pooling:
            raise ValueError(f"--pooling applies to --task embedding, not {self.task}")

    def _read_config(self, model_dir: str) -> EmbeddingConfig:
        """The sentence-transformers configuration that applies (only an embedding reads one)."""
        return EmbeddingConfig(transformer_path=model_dir)

    def _load_head(self, torch) -> None:
        """Whatever the task adds to the loaded model; sets output_dim."""
        raise NotImplementedError

    def _stated_limit_required(self) -> bool:
        """True if the model must state its own length limit (ddml's default would be a guess)."""
        return False

    def _example(self, text: str):
        """An input of this task made of text, truncated if long (for warmup and the unpadded check)."""
        return {"text": text, "truncate": True}

    def _outputs(self, items: list[TextInput], features: list[dict], inputs: dict | None) -> list:
        """One pass's outputs: run the model (padded inputs) or the unpadded encoder (inputs None)."""
        raise NotImplementedError

    def _comparable(self, features: list[dict], inputs: dict, encoder) -> tuple:
        """The model's outputs for padded inputs and the encoder's for the same features, as two
        tensors to compare (init_model's check of unpadded passes)."""
        raise NotImplementedError

    def _with_tokens(self, value, tokens: int):
        """An output wrapped with its token count (the count_tokens option)."""
        raise NotImplementedError

    def _tensors(self) -> tuple[list, list]:
        """The input and output tensors of metadata()."""
        raise NotImplementedError

    def _described(self) -> dict:
        """What metadata() adds for this task."""
        return {}

    # ------------------------------------------------------------------ loading

    def init_model(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers

        started_at = time.monotonic()
        self._torch = torch
        auto_size, auto_least_size, auto_tokens = _PASS_LIMITS["cuda" if self.device.startswith("cuda") else "cpu"]
        self.pass_size = self.pass_size or auto_size
        self.least_pass_size = min(auto_least_size, self.pass_size)
        self.pass_tokens = self.pass_tokens or auto_tokens
        dtype = {"auto": torch.float16 if self.device.startswith("cuda") else torch.float32,
                 "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype_name]
        self.model_dir = _resolve_model_dir(self.model_path, self.revision)
        config = self.config = self._read_config(self.model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.transformer_path, local_files_only=True)
        if config.do_lower_case:
            _lower_case(self.tokenizer)
        model_class = getattr(transformers, self.auto_class)
        self.model = model_class.from_pretrained(config.transformer_path, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.max_tokens, limit_source = self._limit()
        # Lengths are checked here, input by input: the tokenizer must neither cut nor warn.
        self.tokenizer.model_max_length = NO_TOKENIZER_LIMIT
        self._load_head(torch)
        self._inputs = TextInputs(self.tokenizer, config, self.form, self.max_tokens, self.auto_truncate,
                                  self.prompt_length)
        from worker.models.unpadded import load_unpadded

        notes = list(config.notes)
        self._unpadded, note = load_unpadded(self, dtype)
        notes.append(note)
        notes.append(f"at most {self.max_tokens} tokens ({limit_source}); longer inputs are "
                     + ("truncated (--auto-truncate)" if self.auto_truncate else "refused unless they ask to be truncated"))
        logger.info("loaded %s (%s) on %s as %s in %.1f s: %s", self.model_path, self.task, self.device, dtype,
                    time.monotonic() - started_at, "; ".join(notes))

    def _limit(self) -> tuple[int, str]:
        """Tokens per input, and where that figure came from."""
        own_limits = [n for n in (self.tokenizer.model_max_length,
                                  getattr(self.model.config, "max_position_embeddings", None))
                      if isinstance(n, int) and 0 < n < NO_TOKENIZER_LIMIT]
        own = min(own_limits, default=None)  # sentence-transformers' rule: the tokenizer's, capped by positions
        if self.max_length is not None:
            if own is not None and self.max_length > own:
                logger.warning("--max-length %d exceeds the model's own limit of %d tokens", self.max_length, own)
            return self.max_length, "--max-length"
        if self.config.sentence_transformers and self.config.max_seq_length:
            return self.config.max_seq_length, "max_seq_length in sentence_bert_config.json"
        if self._stated_limit_required() or self.config.sentence_transformers:
            if own is None:
                raise ValueError(f"{self.model_path} states no length limit: give --max-length")
            return own, "the tokenizer's model_max_length, within max_position_embeddings"
        if own is not None and own < PLAIN_MAX_LENGTH:
            return own, "the model's max_position_embeddings"
        return PLAIN_MAX_LENGTH, "ddml's default for a plain transformers model"

    def version(self) -> str | None:
        return weights_version(self.model_dir) if self.model_dir else None

    # ------------------------------------------------------------------ batches and passes

    def predict(self, batch: list) -> list:
        """Inputs as they come (a batch), or prepare()d ones (a continuous worker's pass)."""
        if batch and all(isinstance(value, TextInput) for value in batch):
            return self._run(list(batch), halve=False)
        prepared = self.prepare(batch)
        outputs: list = list(prepared)
        items = []
        for position, value in enumerate(prepared):
            if isinstance(value, TextInput):
                value.position = position
                items.append(value)
        for item, output in zip(items, self._run(items, halve=True)):
            outputs[item.position] = output
        return outputs

    def prepare(self, batch: list) -> list:
        """Parse and tokenize each input: a TextInput with its tokens, or an InputError for it."""
        return self._inputs.prepare(batch)

    def cost(self, prepared: TextInput) -> int:
        return len(prepared.features["input_ids"])

    def pass_limits(self) -> tuple[int, int, int]:
        return self.pass_size, self.pass_tokens, self.least_pass_size

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

    def _run(self, items: list[TextInput], halve: bool) -> list:
        """The outputs of tokenized inputs, in their order, run in passes sorted by length.

        halve (a batch, whole): cut by sorted_passes() within the pass limits, the token budget
        padded or, unpadded, summed, as the continuous worker's passes are; it may run as two
        halves, down to least_pass_size. Not halve (a continuous worker's pass): the worker formed
        it within the same limits (worker/passes.py), so it runs as it is, one model call. Cutting
        it again against the padded budget would split an unpadded pass the worker formed within
        the summed one (15 inputs of 10 tokens and one of 100: 250 tokens, 1600 padded)."""
        outputs: list = [item.output for item in items]
        running = [k for k in range(len(items)) if not items[k].done]
        costs = [self.cost(items[k]) for k in running]
        if halve:
            passes = sorted_passes(costs, self.pass_size, self.pass_tokens, self.least_pass_size, padded=self.padded)
        else:
            passes = [sorted(range(len(costs)), key=lambda k: (costs[k], k))] if costs else []
        for chosen in passes:
            in_pass = [items[running[i]] for i in chosen]
            for i, value in zip(chosen, self._pass(in_pass)):
                item = items[running[i]]
                outputs[running[i]] = self._with_tokens(value, self.cost(item)) if item.count_tokens else value
        return outputs

    def _pass(self, items: list[TextInput]) -> list:
        """One pass: the outputs of its inputs, in its order."""
        features = [item.features for item in items]
        inputs = self._padded(features) if self._unpadded is None else None
        with self._torch.inference_mode():
            return self._outputs(items, features, inputs)

    def _padded(self, features: list[dict]) -> dict:
        """The model's own inputs: features padded to the longest, on the device."""
        padded = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        non_blocking = self.device.startswith("cuda")
        return {key: tensor.to(self.device, non_blocking=non_blocking) for key, tensor in padded.items()}

    def warmup(self) -> None:
        """A few passes of short and long inputs, so the first real request pays no first-call costs."""
        for length in (1, 16, 64):
            self.predict([self._example(" ".join(["warm"] * length))] * 4)

    def metadata(self) -> dict:
        inputs, outputs = self._tensors()
        return {"platform": "pytorch", "task": self.task, "max_tokens": self.max_tokens,
                "auto_truncate": self.auto_truncate, "dtype": str(self.model.dtype).removeprefix("torch."),
                "inputs": inputs, "outputs": outputs, **self._described()}

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


def torch_module(name: str, torch, where: str):
    """An instance of the torch.nn module of that name (an activation a configuration names)."""
    module = getattr(torch.nn, name, None)
    if not (isinstance(module, type) and issubclass(module, torch.nn.Module)):
        raise ValueError(f"{where}: activation {name!r} is not a torch.nn module")
    return module()


def cuda_device_count() -> int:
    """CUDA devices visible to this process; 0 where torch has no CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
