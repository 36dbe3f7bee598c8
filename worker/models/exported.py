"""ExportedModel: a `torch.export` program (.pt2) or a TorchScript file (.pt), served without code.

    ddml-worker --model cnn --model-path model.pt2 --input IMAGE:FP32:3,224,224 --output LOGITS:FP32:1000

The declared tensors (--input/--output, ddml_common/tensors.py) are the model's contract: inputs go
to it positionally, in declared order, each with the batch dimension first; it returns a tensor,
or a tuple of tensors in declared output order, with the batch dimension first. A .pt2 program
must have been exported with a dynamic batch dimension (torch.export.Dim on dim 0).

predict() stacks the inputs of equal shapes along dim 0 (inputs with a variable dim may differ:
each shape runs in its own pass, of at most max_batch_size inputs), into pinned host memory on a
GPU before the copy to the device. --dtype float16/bfloat16 runs the model's weights and its
floating inputs in that dtype; its outputs go back in the declared datatype. At load the model
runs a dummy batch of two built from the declarations, and must give outputs that fit them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ddml_common.tensors import TensorSpec, check_value, metadata
from worker.models import InputError, Manager

EXPORT_SUFFIXES = (".pt2", ".pt")


class ExportedModel(Manager):
    def __init__(self, device: str = "cpu", model_path: str = "", inputs: list[TensorSpec] | None = None,
                 outputs: list[TensorSpec] | None = None, dtype: str = "auto", max_batch_size: int | None = None,
                 **options: Any):
        super().__init__(device, **options)
        if not model_path.endswith(EXPORT_SUFFIXES):
            raise ValueError(f"--model-path {model_path}: an exported model is a .pt2 or .pt file")
        if not inputs or not outputs:
            raise ValueError("an exported model needs its tensors declared: --input NAME:DATATYPE:DIMS and "
                             "--output NAME:DATATYPE:DIMS, each in the order the model takes or returns them")
        if any(spec.datatype == "BYTES" for spec in [*inputs, *outputs]):
            raise ValueError("an exported model's tensors are numeric: BYTES cannot be declared")
        self.model_path = model_path
        self.inputs = list(inputs)
        # Several outputs: each input's output is a dict of them by name (the key KServe v2 reads).
        self.outputs = [spec if len(outputs) == 1 else TensorSpec(spec.name, spec.datatype, spec.dims, spec.name)
                        for spec in outputs]
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self._pinned = device.startswith("cuda")

    def init_model(self) -> None:
        import torch

        if not os.path.isfile(self.model_path):
            raise OSError(f"--model-path {self.model_path}: no such file")
        self._torch = torch
        if self.model_path.endswith(".pt2"):
            module = torch.export.load(self.model_path).module()
        else:
            module = torch.jit.load(self.model_path, map_location=self.device)
        self._compute_dtype = None
        if self.dtype in ("float16", "bfloat16", "float32"):
            self._compute_dtype = getattr(torch, self.dtype)
            module = module.to(self._compute_dtype)
        self.module = module.to(self.device)
        if self.model_path.endswith(".pt"):
            self.module.eval()  # (an exported program runs as it was exported, and refuses eval())
        dummy = [{spec.name: np.zeros(spec.example_shape(2)[1:], spec.dtype) for spec in self.inputs}] * 2
        for output in self.predict([d if len(self.inputs) > 1 else d[self.inputs[0].name] for d in dummy]):
            problem = self._output_problem(output)
            if problem is not None:
                raise ValueError(f"{self.model_path} does not give the declared outputs on a dummy batch: {problem}")

    def _output_problem(self, output: Any) -> str | None:
        for spec in self.outputs:
            problem = check_value(spec, output if spec.key is None else output[spec.key])
            if problem is not None:
                return problem
        return None

    def metadata(self) -> dict:
        kind = "pytorch_export" if self.model_path.endswith(".pt2") else "pytorch_torchscript"
        return metadata(self.inputs, self.outputs, kind)

    def predict(self, batch: list) -> list:
        rows = [self._row(value) for value in batch]
        groups: dict[tuple, list[int]] = {}
        for position, row in enumerate(rows):
            if not isinstance(row, Exception):
                groups.setdefault(tuple(a.shape for a in row), []).append(position)
        outputs: list = list(rows)  # an InputError stays in its slot
        most = self.max_batch_size or len(batch)
        for positions in groups.values():
            for start in range(0, len(positions), most):
                part = positions[start:start + most]
                for position, output in zip(part, self._run([rows[i] for i in part])):
                    outputs[position] = output
        return outputs

    def _row(self, value: Any) -> list[np.ndarray] | InputError:
        """One input's arrays, in declared order (the gateway checked them against the declarations)."""
        if len(self.inputs) > 1:
            if not isinstance(value, dict) or set(value) != {s.name for s in self.inputs}:
                return InputError(f"this model takes an object of {', '.join(s.name for s in self.inputs)}")
            values = [value[spec.name] for spec in self.inputs]
        else:
            values = [value]
        arrays = []
        for spec, item in zip(self.inputs, values):
            problem = check_value(spec, item)
            if problem is not None:
                return InputError(problem)
            arrays.append(np.asarray(item, dtype=spec.dtype))
        return arrays

    def _run(self, rows: list[list[np.ndarray]]) -> list:
        """One forward pass of inputs of one shape, stacked along dim 0; one output per input."""
        torch = self._torch
        tensors = []
        for k, spec in enumerate(self.inputs):
            column = [row[k] for row in rows]
            if self._pinned:  # stacked straight into pinned memory: one copy on the host, then the transfer
                host = torch.empty((len(rows), *column[0].shape), dtype=torch.from_numpy(column[0][:0]).dtype,
                                   pin_memory=True)
                np.stack(column, out=host.numpy())
            else:
                host = torch.from_numpy(np.stack(column))
            tensor = host.to(self.device, non_blocking=self._pinned)
            if self._compute_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self._compute_dtype)
            tensors.append(tensor)
        with torch.inference_mode():
            produced = self.module(*tensors)
        if isinstance(produced, torch.Tensor):
            produced = (produced,)
        if not isinstance(produced, (tuple, list)) or len(produced) != len(self.outputs):
            count = len(produced) if isinstance(produced, (tuple, list)) else type(produced).__name__
            raise RuntimeError(f"the model returned {count} outputs, {len(self.outputs)} declared")
        columns = []
        for spec, tensor in zip(self.outputs, produced):
            if tensor.is_floating_point() and spec.datatype.startswith("FP"):
                tensor = tensor.to(getattr(torch, _TORCH_FLOAT[spec.datatype]))  # --dtype back to the declared one
            columns.append(tensor.detach().cpu().numpy())
        if len(self.outputs) == 1:
            return list(columns[0])
        return [{spec.name: column[i] for spec, column in zip(self.outputs, columns)} for i in range(len(rows))]


_TORCH_FLOAT = {"FP16": "float16", "FP32": "float32", "FP64": "float64"}
