"""What a model directory says about how to embed with it: read once, before the model loads.

A sentence-transformers directory names its modules in modules.json: a Transformer, then Pooling
(its config.json: cls, mean, max, mean_sqrt_len_tokens, weightedmean or lasttoken, several of
them concatenated), then optionally Dense layers and Normalize. sentence_bert_config.json may
carry max_seq_length and do_lower_case, and config_sentence_transformers.json a default prompt.
A module this reader does not know is refused, by name: a model we cannot run exactly is never
served approximately. A directory without modules.json is a plain transformers model; it gets
ddml's defaults (mean pooling, L2 normalisation, 256 tokens), as it always did.

Pure: reads JSON files only, no torch. hf_text.py applies what it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Legacy Pooling config keys (sentence-transformers < 6), in the order their vectors are concatenated.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
PLAIN_MAX_LENGTH = 256  # tokens, for a plain transformers directory: ddml's default before it read configs
# Files that are not part of what a worker runs: left out of the version hash.
_NOT_THE_MODEL = (".md", ".gitattributes", ".gitignore")
_OTHER_RUNTIMES = {"onnx", "openvino", ".git", ".cache"}


@dataclass(frozen=True)
class DenseLayer:
    path: str  # the module's directory: config.json and its weights
    activation: str  # a torch.nn class name, e.g. Tanh or Identity


@dataclass(frozen=True)
class EmbeddingConfig:
    """How to turn a text into a vector with this directory, as sentence-transformers would."""

    transformer_path: str  # the directory holding the transformers model and tokenizer
    pooling: tuple[str, ...] = ("mean",)  # concatenated in this order
    normalize: bool = True
    max_seq_length: int | None = None  # from sentence_bert_config.json; None: the tokenizer's own limit
    do_lower_case: bool = False
    dense: tuple[DenseLayer, ...] = ()
    prompt: str = ""  # the default prompt, put before every text
    prompts: dict = field(default_factory=dict, compare=False)  # sentence-transformers' named prompts (prompt_name)
    include_prompt: bool = True  # False: the prompt's tokens are left out of pooling
    sentence_transformers: bool = False  # False: a plain transformers directory with ddml's defaults
    notes: list[str] = field(default_factory=list, compare=False)  # where each setting came from, for the log


def read_embedding_config(model_path: str) -> EmbeddingConfig:
    """The directory's own configuration. Raises ValueError for a module we cannot apply exactly."""
    modules_file = os.path.join(model_path, "modules.json")
    if not os.path.isfile(modules_file):
        return EmbeddingConfig(transformer_path=model_path, max_seq_length=None, notes=[
            "no modules.json: a plain transformers model, served with ddml's defaults (mean pooling, "
            f"L2 normalisation, at most {PLAIN_MAX_LENGTH} tokens)"])
    modules = _load_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{modules_file} must be a non-empty list of modules")
    transformer_path = None
    pooling: tuple[str, ...] | None = None
    include_prompt, normalize, dense, notes = True, False, [], []
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = os.path.join(model_path, module.get("path", ""))
        if kind == "Transformer" and transformer_path is None and pooling is None:
            transformer_path = path
        elif kind == "Pooling" and transformer_path is not None and pooling is None:
            pooling, include_prompt = _read_pooling(os.path.join(path, "config.json"))
            notes.append(f"pooling {'+'.join(pooling)} from {os.path.relpath(path, model_path)}/config.json")
        elif kind == "Dense" and pooling is not None and not normalize:
            dense.append(_read_dense(path))
        elif kind == "Normalize" and pooling is not None:
            normalize = True
        else:
            raise ValueError(f"{modules_file}: module {module.get('type')!r} at position {module.get('idx')} is not "
                             "one ddml can apply (Transformer, Pooling, Dense, Normalize, in that order)")
    if transformer_path is None or pooling is None:
        raise ValueError(f"{modules_file} needs a Transformer module followed by a Pooling module")
    notes.append("L2-normalised (Normalize module)" if normalize else "not normalised (no Normalize module)")
    bert_config = _load_json(os.path.join(transformer_path, "sentence_bert_config.json"), default={})
    max_seq_length = bert_config.get("max_seq_length")
    if max_seq_length is not None and (type(max_seq_length) is not int or max_seq_length < 1):
        raise ValueError(f"sentence_bert_config.json: max_seq_length must be a positive integer, got {max_seq_length!r}")
    st_config = _load_json(os.path.join(model_path, "config_sentence_transformers.json"), default={})
    prompt_name = st_config.get("default_prompt_name")
    prompt = ""
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict):
        raise ValueError(f"config_sentence_transformers.json: prompts must be an object, got {type(prompts).__name__}")
    prompts = {str(name): str(text) for name, text in prompts.items()}
    if prompt_name:
        if prompt_name not in prompts:
            raise ValueError(f"config_sentence_transformers.json: default prompt {prompt_name!r} is not among "
                             f"its prompts {sorted(prompts)}")
        prompt = str(prompts[prompt_name])
        notes.append(f"default prompt {prompt_name!r}: {prompt!r}")
    return EmbeddingConfig(
        transformer_path=transformer_path, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length,
        do_lower_case=bool(bert_config.get("do_lower_case", False)), dense=tuple(dense), prompt=prompt,
        prompts=prompts, include_prompt=include_prompt, sentence_transformers=True, notes=notes,
    )


def parse_pooling(value: str) -> tuple[str, ...]:
    """--pooling: one mode, or several joined by '+' (concatenated, as sentence-transformers does)."""
    modes = tuple(part.strip() for part in value.split("+"))
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)} (or several joined by +), "
                             f"got {value!r}")
    return modes


def _read_pooling(config_file: str) -> tuple[tuple[str, ...], bool]:
    config = _load_json(config_file)
    mode = config.get("pooling_mode")
    if mode is None:  # the legacy form: one boolean per mode
        modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for name in modes:
        if name not in POOLING_MODES:
            raise ValueError(f"{config_file}: pooling mode {name!r} is not one of {', '.join(POOLING_MODES)}")
    return modes, bool(config.get("include_prompt", True))


def _read_dense(path: str) -> DenseLayer:
    config = _load_json(os.path.join(path, "config.json"))
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if not activation.startswith("torch.nn."):
        raise ValueError(f"{path}/config.json: activation {activation!r} is not a torch.nn module")
    if config.get("use_residual"):
        raise ValueError(f"{path}/config.json: Dense with use_residual is not supported")
    return DenseLayer(path=path, activation=activation.rsplit(".", 1)[-1])


def _load_json(path: str, default=None):
    if default is not None and not os.path.isfile(path):
        return default
    try:
        with open(path, encoding="utf-8") as config_file:
            return json.load(config_file)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def weights_version(model_path: str) -> str:
    """A short identity of what a directory serves: 12 hex digits of a sha256 over the names and
    contents of its files (weights, configs, tokenizer), skipping READMEs and other runtimes' copies."""
    digest = hashlib.sha256()
    for root, directories, files in os.walk(model_path):
        directories[:] = sorted(d for d in directories if d not in _OTHER_RUNTIMES)
        for name in sorted(files):
            if name.endswith(_NOT_THE_MODEL) or name.startswith("."):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, model_path).encode() + b"\0")
            file_digest = hashlib.sha256()
            with open(path, "rb") as model_file:
                while block := model_file.read(1 << 20):
                    file_digest.update(block)
            digest.update(file_digest.digest())
    return digest.hexdigest()[:12]
