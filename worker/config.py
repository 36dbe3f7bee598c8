"""Worker configuration: a frozen dataclass, units in names, validated on creation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ddml_common import protocol

_MAX_LANES = 64
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


@dataclass(frozen=True)
class WorkerConfig:
    broker: str = "tcp://127.0.0.1:5556"  # the broker's backend endpoint
    model: str = "minilm"  # the name requests use
    handler: str | None = None  # package.module:ClassName of a Manager subclass
    model_path: str | None = None  # a local Hugging Face model directory
    task: str = "embedding"  # for --model-path: embedding, classification or rerank
    model_version: str | None = None  # served as `model@version` too; None: the handler's (a hash of its weights)
    device: str = "auto"  # auto, cpu or cuda:N
    max_batch_size: int = 64  # inputs per batch
    max_batches: int = 2  # batches held at once: 2 lets the next one arrive while one computes
    continuous: str = "auto"  # continuous batching: auto (if the handler declares it), on or off
    max_inputs_held: int = 0  # continuous: inputs held at once; 0 = max_batch_size × max_batches
    compute_lanes: int = 0  # continuous: passes run at once; 0 = the handler's choice
    heartbeat_interval_s: float = 1.0
    liveness: int = 3  # silent broker intervals before reconnecting
    watchdog_s: float = 300.0  # a batch computing longer than this ends the process
    torch_threads: int = 0  # 0 = torch's default (divided among --num-workers on the CPU)
    handler_options: dict = field(default_factory=dict)  # passed to the handler's constructor
    health_file: str | None = None  # touched while healthy, for an exec liveness probe
    curve_server_key: str | None = None  # the broker's public .key; with curve_secret_key turns on CURVE
    curve_secret_key: str | None = None  # this worker's .key_secret
    echo_test_directives: bool = False  # the echo model obeys sleep_s / raise / exit / invalid: tests only

    def __post_init__(self) -> None:
        # The broker refuses a READY outside the protocol's bounds: say so here, not by never registering.
        if not 1 <= self.max_batch_size <= protocol.MAX_ITEMS:
            raise ValueError(f"max_batch_size must be from 1 to {protocol.MAX_ITEMS}, got {self.max_batch_size}")
        if not 1 <= self.max_batches <= protocol.MAX_BATCHES:
            raise ValueError(f"max_batches must be from 1 to {protocol.MAX_BATCHES}, got {self.max_batches}")
        if self.continuous not in ("auto", "on", "off"):
            raise ValueError(f"continuous must be auto, on or off, got {self.continuous!r}")
        if not 0 <= self.max_inputs_held <= protocol.MAX_ITEMS:
            raise ValueError(f"max_inputs_held must be from 0 to {protocol.MAX_ITEMS}, got {self.max_inputs_held}")
        if not 0 <= self.compute_lanes <= _MAX_LANES:
            raise ValueError(f"compute_lanes must be from 0 to {_MAX_LANES}, got {self.compute_lanes}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.watchdog_s <= 0:
            raise ValueError(f"watchdog_s must be > 0, got {self.watchdog_s}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda:N, got {self.device!r}")
        if "@" in self.model:
            raise ValueError(f"model must not contain '@', which separates a version, got {self.model!r}")
        if self.model_version is not None and not _VERSION.fullmatch(self.model_version):
            raise ValueError("model_version must be 1 to 64 letters, digits, '.', '_', '-' or '+', starting with a "
                             f"letter or digit, got {self.model_version!r}")
