"""Declared tensors: what a model takes and gives, in Triton's terms, from one place. Pure.

A TensorSpec is a name, a datatype (BOOL, UINT8 ... FP64, BYTES) and dims without the batch
dimension, -1 for a variable one. Every model is batched: in a model's metadata (KServe v2) a
tensor's shape is [-1, *dims]. Specs come from one of:

- the worker's flags, repeatable: `--input IMAGE:FP32:3,224,224`, `--output LOGITS:FP32:1000`
  (parse_flags; a scalar per row is an empty DIMS: `--input X:FP32:`), or in its TOML table
  `input = ["IMAGE:FP32:3,224,224"]` or `input = [{name = "IMAGE", datatype = "FP32", dims = [3, 224, 224]}]`;
- a handler's metadata(): its "inputs"/"outputs" lists (from_metadata), unless it says
  "free_form": true, which Manager.metadata() does for a handler that declares none. A free-form
  model's requests and outputs are passed as they are, as before.

check_array / check_value tell whether a value fits a spec (no datatype is ever converted into
another) and return the refusal's text, which names the declared tensor and what came.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

#: Triton datatype -> numpy dtype (little-endian), for every numeric datatype. BYTES has none.
NUMPY_BY_DATATYPE = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
DATATYPES = frozenset((*NUMPY_BY_DATATYPE, "BYTES"))
_DATATYPE_BY_DTYPE = {np.dtype(v): k for k, v in NUMPY_BY_DATATYPE.items()}
MAX_DIMS = 16  # no declared tensor has more dimensions (the protocols' nesting bound is larger)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # a Triton datatype
    dims: tuple[int, ...]  # without the batch dimension; -1: variable
    key: str | None = None  # an output's field in a dict output (Manager.metadata()'s "key"); None: the whole output

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 256:
            raise ValueError(f"a tensor's name must be 1 to 256 characters, got {self.name!r:.60}")
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name}: datatype must be one of {', '.join(sorted(DATATYPES))}, "
                             f"got {self.datatype!r:.20}")
        if len(self.dims) > MAX_DIMS or not all(type(d) is int and (d == -1 or d >= 0) for d in self.dims):
            raise ValueError(f"tensor {self.name}: dims must be at most {MAX_DIMS} integers, each >= 0 or -1, "
                             f"got {list(self.dims)!r:.60}")

    @property
    def shape(self) -> list[int]:
        """With the batch dimension, as KServe v2 metadata shows it."""
        return [-1, *self.dims]

    @property
    def dtype(self) -> np.dtype | None:
        """The numpy dtype; None for BYTES."""
        numpy = NUMPY_BY_DATATYPE.get(self.datatype)
        return None if numpy is None else np.dtype(numpy)

    def describe(self, batched: bool = True) -> str:
        """'IMAGE expects FP32 [-1,3,224,224]': how refusals name it (batched: with the batch dimension)."""
        return f"{self.name} expects {self.datatype} {_dims(self.shape if batched else list(self.dims))}"

    def to_metadata(self) -> dict:
        entry = {"name": self.name, "datatype": self.datatype, "shape": self.shape}
        if self.key is not None:
            entry["key"] = self.key
        return entry

    def fits(self, shape: Iterable[int]) -> bool:
        """Whether a shape without the batch dimension fits the declared dims. A trailing declared
        dim of 1 may be left out (TEXT [-1,1] takes [N], as text clients have always sent)."""
        shape = tuple(shape)
        dims = self.dims
        if len(shape) == len(dims) - 1 and dims[-1] == 1:
            dims = dims[:-1]
        return len(shape) == len(dims) and all(d == -1 or d == n for d, n in zip(dims, shape))

    def example_shape(self, batch: int) -> tuple[int, ...]:
        """A shape for a dummy batch: each variable dim 1."""
        return (batch, *(1 if d == -1 else d for d in self.dims))


def _dims(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(n) for n in shape) + "]"


def parse_flag(text: str) -> TensorSpec:
    """`NAME:DATATYPE:DIMS`, DIMS comma-separated (-1 variable; empty for a scalar per row)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"a tensor is NAME:DATATYPE:DIMS (e.g. IMAGE:FP32:3,224,224), got {text!r}")
    name, datatype, dims = parts
    try:
        parsed = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise ValueError(f"tensor {name}: DIMS must be comma-separated integers (-1 variable), got {dims!r}") from None
    return TensorSpec(name, datatype.upper(), parsed)


def parse_flags(raw: Any) -> list[TensorSpec]:
    """--input / --output as any source gives them: one or more `NAME:DATATYPE:DIMS` separated by
    spaces (the command line, a DDML_WORKER_INPUT variable), or a TOML array of such strings or of
    {name, datatype, dims} tables."""
    if isinstance(raw, str):
        return [parse_flag(text) for text in raw.split()]
    if isinstance(raw, list):
        strings = [item for item in raw if isinstance(item, str)]
        if len(strings) == len(raw):
            return [parse_flag(text) for text in strings]
        return from_table(raw, "tensors")
    raise ValueError(f"tensors are NAME:DATATYPE:DIMS strings or {{name, datatype, dims}} tables, got {raw!r:.60}")


def from_table(entries: Any, where: str) -> list[TensorSpec]:
    """The `inputs` or `outputs` array of a model's TOML table: [{name, datatype, dims}, ...]."""
    if not isinstance(entries, list):
        raise ValueError(f"{where} must be an array of {{name, datatype, dims}} tables")
    specs = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"name", "datatype", "dims", "key"} \
                or not {"name", "datatype", "dims"} <= set(entry):
            raise ValueError(f"{where}[{position}] must be a table of name, datatype and dims, got {entry!r:.80}")
        if not isinstance(entry["dims"], list):
            raise ValueError(f"{where}[{position}].dims must be an array of integers, got {entry['dims']!r:.40}")
        datatype = entry["datatype"]
        specs.append(TensorSpec(entry["name"], datatype.upper() if isinstance(datatype, str) else datatype,
                                tuple(entry["dims"]), entry.get("key")))
    return _unique(specs, where)


def from_metadata(metadata: dict) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
    """(inputs, outputs) a model's metadata declares, or None for a free-form model (or one whose
    metadata does not declare tensors that can be checked)."""
    if not isinstance(metadata, dict) or metadata.get("free_form"):
        return None
    try:
        return _specs(metadata.get("inputs"), "inputs"), _specs(metadata.get("outputs"), "outputs")
    except (ValueError, TypeError, KeyError):
        return None


def checked_outputs(metadata: dict) -> list[TensorSpec]:
    """The declared outputs a worker holds each output to: those of a model whose inputs are all
    arrays. None for a free-form model, nor for one with a BYTES input (a text model), whose outputs
    follow each input's options (a rerank query's documents, truncation), as its metadata cannot say."""
    declared = from_metadata(metadata)
    if declared is None or any(spec.datatype == "BYTES" for spec in declared[0]):
        return []
    return declared[1]


def _specs(entries: Any, where: str) -> list[TensorSpec]:
    if not isinstance(entries, list):
        raise ValueError(f"{where} missing")
    specs = []
    for entry in entries:
        shape = entry["shape"]
        if not isinstance(shape, list) or not shape or shape[0] != -1:
            raise ValueError(f"{where}: shape {shape!r} has no batch dimension")
        specs.append(TensorSpec(entry["name"], entry["datatype"], tuple(shape[1:]), entry.get("key")))
    return _unique(specs, where)


def _unique(specs: list[TensorSpec], where: str) -> list[TensorSpec]:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where} name a tensor twice: {', '.join(names)}")
    return specs


def metadata(inputs: list[TensorSpec], outputs: list[TensorSpec], platform: str) -> dict:
    """A model's metadata document from its declared tensors."""
    return {"platform": platform, "inputs": [s.to_metadata() for s in inputs],
            "outputs": [s.to_metadata() for s in outputs]}


def datatype_of(dtype: np.dtype) -> str | None:
    """The Triton datatype of a numpy dtype (any byte order), or None."""
    return _DATATYPE_BY_DTYPE.get(np.dtype(dtype).newbyteorder("<")) or _DATATYPE_BY_DTYPE.get(np.dtype(dtype))


def check_array(spec: TensorSpec, datatype: str | None, shape: Iterable[int], batched: bool) -> str | None:
    """Why a tensor of this datatype and shape does not fit the spec, or None if it does. batched:
    the shape carries the batch dimension first (v2); otherwise it is one row's (v1, an output)."""
    shape = list(shape)
    row = shape[1:] if batched else shape
    if datatype == spec.datatype and (shape or not batched) and spec.fits(row):
        return None
    return f"{spec.describe(batched)}, got {datatype or 'no datatype'} {_dims(shape)}"


def check_value(spec: TensorSpec, value: Any) -> str | None:
    """Why one row's value (an output; a v1 input) does not fit the spec, or None if it does.

    numpy arrays, numpy scalars and torch tensors must have the declared dtype exactly; nested
    lists of Python numbers must have the declared rank and dims, and hold what the datatype can
    hold without a cast (ints for INT/UINT, bools for BOOL, numbers for FP). BYTES: str or bytes
    (or nested lists of them)."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):  # torch, not imported
        value = value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        datatype = "BYTES" if value.dtype.kind in "USO" else datatype_of(value.dtype)
        return check_array(spec, datatype, np.shape(value), batched=False)
    shape, kinds = _nested(value)
    if shape is None:
        return f"{spec.describe(False)}, got {type(value).__name__} that is not a tensor"
    allowed = _KINDS[spec.datatype]
    if not kinds <= allowed or not spec.fits(shape):
        got = _guess(kinds)
        return f"{spec.describe(False)}, got {got} {_dims(shape)}"
    return None


_KINDS = {
    "BOOL": {bool}, "BYTES": {str, bytes},
    **{t: {int} for t in NUMPY_BY_DATATYPE if t.startswith(("INT", "UINT"))},
    **{t: {int, float} for t in NUMPY_BY_DATATYPE if t.startswith("FP")},
}


def _guess(kinds: set) -> str:
    """A name for what a list held: the datatype its elements suggest."""
    if not kinds:
        return "an empty list"
    if kinds <= {bool}:
        return "BOOL"
    if kinds <= {int}:
        return "integers"
    if kinds <= {int, float}:
        return "floats"
    if kinds <= {str, bytes}:
        return "BYTES"
    return "mixed values"


def _nested(value: Any) -> tuple[list[int] | None, set]:
    """(shape, element types) of a scalar or a rectangular nested list; (None, ...) if ragged or odd."""
    if isinstance(value, (bool, int, float, str, bytes)):
        return [], {type(value)}
    if not isinstance(value, list):
        return None, set()
    shape = []
    level = [value]
    while level and all(type(x) is list for x in level):
        length = len(level[0])
        if any(len(x) != length for x in level):
            return None, set()
        shape.append(length)
        if len(shape) > MAX_DIMS:
            return None, set()
        level = [y for x in level for y in x]
    kinds = set(map(type, level))
    if list in kinds or not kinds <= {bool, int, float, str, bytes}:
        return None, set()
    return shape, kinds


def check_output(specs: list[TensorSpec], output: Any) -> str | None:
    """Why one input's output does not fit the declared outputs, or None. An output spec with a
    key is that field of a dict output; one without is the whole output."""
    for spec in specs:
        if spec.key is None:
            value = output
        elif not isinstance(output, dict):
            return f"output {spec.name} is the field '{spec.key}' of a dict, got {type(output).__name__}"
        elif spec.key not in output:
            return f"output {spec.name} is the field '{spec.key}', which the output lacks (it has " \
                   f"{', '.join(map(str, output))[:200]})"
        else:
            value = output[spec.key]
        if isinstance(value, dict):  # {label: probability}: its values are the tensor, as the gateway reads it
            value = list(value.values())
        problem = check_value(spec, value)
        if problem is not None:
            return f"output {problem} per input"
    return None
