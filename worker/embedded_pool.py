"""A pool worker whose models are Manager classes, not a repository file: the Dispatcher's several models.

`Dispatcher({"bert": ManagedBertModel, "clf": ManagedClf}, ...)` (gateway/dispatcher.py) spawns
`worker_num` of these. Each is an ordinary pool worker (worker/pool.py: placement, loads, drained
unloads, BUSY hand-backs); only its repository is built here from the classes instead of read from
TOML. The classes reach the spawned process as the single-model Dispatcher's class does: pickled by
reference (importable by module and name, or defined in the main script, which spawn re-imports).
The pool loads a handler by its `module:Class` name, so each class is registered here under a
private module, one attribute per model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import types
from dataclasses import dataclass, field

from ddml_common.cli import configure_logging, stop_on_signals
from ddml_common.repository import ModelEntry, Placement, Repository
from worker.config import WorkerConfig
from worker.pool import serve_pool

_MODULE = "ddml_dispatcher_models"  # where this process's handler classes are registered by model


@dataclass(frozen=True)
class EmbeddedModel:
    """One model of an embedded pool: its name, class, constructor options, placement and batch size."""

    name: str
    handler_class: type
    options: dict = field(default_factory=dict)
    placement: Placement = Placement()
    max_batch_size: int = 64


def pool_child_main(base: WorkerConfig, models: list[EmbeddedModel], max_models: int, budget_mb: float,
                    log_level: str) -> None:
    """Entry point of a spawned embedded pool worker: serve until SIGTERM, then drain."""
    level, _, log_format = log_level.partition(":")
    configure_logging(level, log_format or "text")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the single-model form's child_main: never a hub download
    repository, configs = embedded_repository(base, models)
    stop = threading.Event()
    stop_on_signals(stop)
    serve_pool(base, repository, configs, max_models, budget_mb, stop)


def embedded_repository(base: WorkerConfig, models: list[EmbeddedModel]) -> tuple[Repository, dict[str, WorkerConfig]]:
    """The repository and per-model WorkerConfigs for `models`, their classes registered for the pool's loader."""
    module = sys.modules.get(_MODULE)
    if module is None:
        module = sys.modules[_MODULE] = types.ModuleType(_MODULE, "Manager classes of an embedded pool, by model")
    entries, configs = {}, {}
    for index, model in enumerate(models):
        attribute = f"model_{index}"
        setattr(module, attribute, model.handler_class)
        entries[model.name] = ModelEntry(model.name, {}, model.placement)
        configs[model.name] = dataclasses.replace(
            base, model=model.name, handler=f"{_MODULE}:{attribute}", max_batch_size=model.max_batch_size,
            handler_options=dict(model.options))
    return Repository(entries), configs
