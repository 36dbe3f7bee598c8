"""The model repository: one TOML file that declares every model pool workers may load.

    [models.minilm]
    max-batch-size = 64          # any worker flag that describes a model, spelled as in ddml.example.toml
    min-replicas = 0             # placement: 0 allows scale to zero
    max-replicas = 2
    idle-unload-s = 300
    memory-mb = 200              # an estimate, used until the load is measured

    [models.classifier]          # an exported model, its tensors declared as in Triton's config
    model-path = "resnet18.pt2"
    inputs = [{name = "IMAGE", datatype = "FP32", dims = [3, 224, 224]}]
    outputs = [{name = "PROBS", datatype = "FP32", dims = [1000]}]

Pure: parse_repository() takes the text and the worker flags a model table may set (the worker
passes them, from its own parser: ddml_common depends on no role), and returns a Repository or
raises RepositoryError with the file, the table and the key at fault. Worker flags are kept as
TOML gave them (worker/pool.py turns them into command-line flags and lets the worker's own parser
check their values), so that a flag this module has never heard of passes through.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ddml_common import tensors

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MAX_NAME_LEN = 256  # as protocol.MAX_NAME_LEN: a model name travels in every REQUEST
MAX_MODELS = 1024  # models in one repository (each is named in the worker's READY)
PLACEMENT_KEYS = ("min-replicas", "max-replicas", "idle-unload-s", "memory-mb")
# Declared tensors, as Triton's model config spells them: `inputs = [{name, datatype, dims}, ...]`.
# They are the repeatable --input/--output flags (`input = ["IMAGE:FP32:3,224,224"]` works too).
TENSOR_KEYS = {"inputs": "input", "outputs": "output"}


class RepositoryError(ValueError):
    """A repository file that cannot be used; the message names the file, table and key."""


@dataclass(frozen=True)
class Placement:
    min_replicas: int = 0  # replicas kept loaded whatever the demand; 0 allows scale to zero
    max_replicas: int = 1  # most pool replicas at once
    idle_unload_s: float = 300.0  # without demand this long, scale down to min_replicas
    memory_mb: float = 0.0  # estimated memory of one replica, until a load measures it (0: unknown)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    flags: dict[str, Any] = field(default_factory=dict)  # worker flag (as spelled in TOML) -> value
    placement: Placement = Placement()


@dataclass(frozen=True)
class Repository:
    models: dict[str, ModelEntry]

    def describe(self) -> dict:
        """Each model's placement, as pool workers announce it (Ready.pool's catalog)."""
        return {name: {"min": e.placement.min_replicas, "max": e.placement.max_replicas,
                       "idle_unload_s": e.placement.idle_unload_s, "memory_mb": e.placement.memory_mb}
                for name, e in self.models.items()}


def load_repository(path: str, model_flags: Collection[str]) -> Repository:
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RepositoryError(f"cannot read repository {path}: {error}") from error
    return parse_repository(text, path, model_flags)


def parse_repository(text: str, source: str, model_flags: Collection[str]) -> Repository:
    """Parse a repository. model_flags: the worker flags (without --) that a model table may set."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RepositoryError(f"{source}: not valid TOML: {error}") from error
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise RepositoryError(f"{source}: unknown top-level key {unknown[0]!r} (models go in [models.NAME] tables)")
    tables = document.get("models", {})
    if not isinstance(tables, dict) or not tables:
        raise RepositoryError(f"{source}: no models: declare each in a [models.NAME] table")
    if len(tables) > MAX_MODELS:
        raise RepositoryError(f"{source}: {len(tables)} models, more than {MAX_MODELS}")
    allowed = frozenset(model_flags)
    return Repository({name: _entry(name, table, f"{source} [models.{name}]", allowed)
                       for name, table in tables.items()})


def _entry(name: str, table: Any, where: str, allowed: frozenset[str]) -> ModelEntry:
    if not 0 < len(name) <= MAX_NAME_LEN or "@" in name or name != name.strip():
        raise RepositoryError(f"{where}: a model name must be 1 to {MAX_NAME_LEN} characters, without '@' "
                              "or surrounding spaces")
    if not isinstance(table, dict):
        raise RepositoryError(f"{where}: must be a table of settings")
    flags = {}
    for key, value in table.items():
        if key in PLACEMENT_KEYS:
            continue
        if key in TENSOR_KEYS or (key in TENSOR_KEYS.values() and isinstance(value, list)
                                  and any(isinstance(item, dict) for item in value)):
            key, value = TENSOR_KEYS.get(key, key), _tensor_flags(value, f"{where} {key}")
        if key == "model":
            raise RepositoryError(f"{where}: 'model' is the table's name; leave it out")
        if key not in allowed:
            raise RepositoryError(f"{where}: unknown setting {key!r} (a model table takes the worker flags that "
                                  f"describe a model, and {', '.join(PLACEMENT_KEYS)})")
        if not _is_flag_value(value):
            raise RepositoryError(f"{where} {key}: must be a string, number, boolean or array of those")
        flags[key] = value
    placement = Placement(
        min_replicas=_integer(table, "min-replicas", where, 0, Placement.min_replicas),
        max_replicas=_integer(table, "max-replicas", where, 1, Placement.max_replicas),
        idle_unload_s=_number(table, "idle-unload-s", where, Placement.idle_unload_s, positive=True),
        memory_mb=_number(table, "memory-mb", where, Placement.memory_mb, positive=False),
    )
    if placement.min_replicas > placement.max_replicas:
        raise RepositoryError(f"{where}: min-replicas ({placement.min_replicas}) exceeds max-replicas "
                              f"({placement.max_replicas})")
    return ModelEntry(name, flags, placement)


def _tensor_flags(value: Any, where: str) -> list[str]:
    """An `inputs`/`outputs` array (of {name, datatype, dims} tables, or of NAME:DATATYPE:DIMS
    strings) as the --input/--output flags it stands for; RepositoryError naming it if it is not one."""
    try:
        specs = tensors.parse_flags(value if isinstance(value, list) else [value])
    except (ValueError, TypeError) as error:
        raise RepositoryError(f"{where}: {error}") from None
    return [f"{spec.name}:{spec.datatype}:{','.join(str(d) for d in spec.dims)}" for spec in specs]


def _is_flag_value(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value)
    return isinstance(value, (str, int, float, bool))


def _integer(table: dict, key: str, where: str, least: int, default: int) -> int:
    value = table.get(key, default)
    if type(value) is not int or value < least:
        raise RepositoryError(f"{where} {key}: must be an integer of at least {least}, got {value!r}")
    return value


def _number(table: dict, key: str, where: str, default: float, positive: bool) -> float:
    value = table.get(key, default)
    ok = type(value) in (int, float) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise RepositoryError(f"{where} {key}: must be a {'positive' if positive else 'non-negative'} finite "
                              f"number, got {value!r}")
    return float(value)
