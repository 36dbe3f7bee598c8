"""Requests checked against the tensors a model declares, before they reach the broker. Pure.

The declared tensors are those of the model's metadata in the broker's status (what its workers
declared in READY: gateway/catalog.py; ddml_common/tensors.py reads them). A free-form model
(a handler that declares none) is not checked, as before.

- /v2/.../infer (check_v2_inputs): every declared input, and no other; each with its declared
  datatype, the batch dimension first, then the declared rank and each fixed dim. A trailing
  declared dim of 1 may be left out ([N] for TEXT [-1,1]), as text clients always have.
- /v1/.../predict (check_v1_inputs), where the model's inputs are arrays (no BYTES input): each
  input is one row, without the batch dimension: a nested list of numbers or a msgpack
  `__ndarray__` for a model of one input, an object of them by name for several. A msgpack
  array must have the declared dtype; a JSON list must hold what the datatype holds without a
  cast (integers for INT and UINT, in range; booleans for BOOL; numbers for FP), and becomes an
  array of the declared dtype here.

Refusals are BAD_REQUEST (400), stating the declared tensor and what came:
`IMAGE expects FP32 [-1,3,224,224], got FP64 [3,224,224]`. No datatype is converted into another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddml_common.protocol import ErrorCode
from ddml_common.tensors import TensorSpec, check_array, check_value, datatype_of, from_metadata
from gateway.errors import GatewayError

_NDARRAY_KEY = "__ndarray__"


def _bad(message: str) -> GatewayError:
    return GatewayError(ErrorCode.BAD_REQUEST, message[:1000])


def _names(specs: list[TensorSpec]) -> str:
    return ", ".join(s.name for s in specs) or "none"


# from_metadata() of each metadata dict seen lately, by the dict's id, with the dict itself (so that
# the id cannot be reused while remembered): the catalog hands out one dict per model until its
# next fetch of the broker's status, and a new registration comes in a new dict. Every request
# built the TensorSpecs again otherwise (bench/gateway_parts.py: validation of a text request).
_declared_memo: dict[int, tuple[dict, tuple | None]] = {}
_MEMO_SIZE = 256


def declared_tensors(metadata: dict) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
    """from_metadata(metadata), built once per metadata dict. The dict must not be changed afterwards
    (the catalog's never are: each fetch brings new ones)."""
    if not metadata:
        return None  # unknown model, or a status without metadata: nothing declared
    return _remembered(_declared_memo, metadata, from_metadata)


def _remembered(memo: dict[int, tuple[dict, Any]], metadata: dict, make) -> Any:
    """make(metadata), from `memo` when it was made for this very dict."""
    entry = memo.get(id(metadata))
    if entry is not None and entry[0] is metadata:
        return entry[1]
    value = make(metadata)
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[id(metadata)] = (metadata, value)
    return value


def check_v2_inputs(model: str, metadata: dict, inputs: list) -> None:
    """Refuse (BAD_REQUEST) a v2 request's inputs that do not fit what the model declares. Entries
    that are not well-formed tensors (no name, no shape of ints) are left to the codec's own refusals."""
    declared = declared_tensors(metadata)
    if declared is None:
        return
    specs = {spec.name: spec for spec in declared[0]}
    seen = set()
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            continue
        name = tensor["name"]
        spec = specs.get(name)
        if spec is None:
            raise _bad(f"model '{model}' has no input '{name:.100}' (its inputs: {_names(declared[0])})")
        if name in seen:
            raise _bad(f"input '{name}' is given twice")
        seen.add(name)
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and all(type(n) is int for n in shape)):
            continue
        datatype = tensor.get("datatype")
        datatype = datatype if isinstance(datatype, str) else None
        problem = check_array(spec, datatype and datatype[:20], shape[:20], batched=True)
        if problem is not None:
            raise _bad(problem)
    missing = [spec for name, spec in specs.items() if name not in seen]
    if missing:
        raise _bad(f"model '{model}' needs input {missing[0].describe()}, which the request lacks "
                   f"(its inputs: {_names(declared[0])})")


def check_v1_inputs(model: str, metadata: dict, inputs: list) -> list:
    """The /v1 inputs as the worker gets them, or a refusal (BAD_REQUEST) of those that do not fit
    the arrays the model declares. A JSON list becomes an array of the declared dtype here, in C
    (so it travels as raw bytes, and predict() gets what a msgpack client's `__ndarray__` gives);
    an `__ndarray__` map passes as it came, untouched."""
    specs = _v1_arrays(metadata)
    if specs is None:
        return inputs
    checked = []
    for position, value in enumerate(inputs):
        if len(specs) == 1:
            value, problem = _v1_value(specs[0], value)
        elif not isinstance(value, dict) or set(value) != {s.name for s in specs}:
            got = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
            problem = f"model '{model}' takes an object of {_names(specs)}, got {got:.200}"
        else:
            fields = {spec.name: _v1_value(spec, value[spec.name]) for spec in specs}
            value = {name: field for name, (field, _) in fields.items()}
            problem = next(filter(None, (why for _, why in fields.values())), None)
        if problem is not None:
            raise _bad(f"inputs[{position}]: {problem}")
        checked.append(value)
    return checked


def _v1_arrays(metadata: dict) -> list[TensorSpec] | None:
    """The inputs check_v1_inputs() checks a request against: those declared when they are all arrays
    (none is BYTES), else None. Once per metadata dict, as declared_tensors()."""
    if not metadata:
        return None  # unknown model, or a status without metadata: nothing declared
    return _remembered(_v1_memo, metadata, _only_arrays)


def _only_arrays(metadata: dict) -> list[TensorSpec] | None:
    declared = declared_tensors(metadata)
    if declared is None or not declared[0] or any(spec.datatype == "BYTES" for spec in declared[0]):
        return None
    return declared[0]


_v1_memo: dict[int, tuple[dict, list | None]] = {}


# What a JSON list may hold for each kind of datatype (numpy's kind of the list as np.asarray reads it).
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _v1_value(spec: TensorSpec, value: Any) -> tuple[Any, str | None]:
    """(the value as it travels on, why it does not fit or None)."""
    if isinstance(value, dict) and len(value) == 1 and _NDARRAY_KEY in value:
        fields = value[_NDARRAY_KEY]
        if not (isinstance(fields, list) and len(fields) == 3 and isinstance(fields[1], list)
                and all(type(n) is int for n in fields[1])):
            return value, f"{spec.describe(False)}, got a malformed __ndarray__ (it is [dtype, shape, data])"
        return value, check_array(spec, _datatype(fields[0]), fields[1][:20], batched=False)
    if not isinstance(value, (list, int, float, bool)):
        return value, check_value(spec, value)  # its refusal, which names what came
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):  # ragged, or an int past 64 bits
        return value, check_value(spec, value) or f"{spec.describe(False)}, got a list that is not a tensor"
    dtype = spec.dtype
    if array.dtype.kind not in _JSON_KINDS.get(dtype.kind, "") or not spec.fits(array.shape):
        return value, check_value(spec, value) or f"{spec.describe(False)}, got {array.dtype} {list(array.shape)}"
    converted = array.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(converted, array):
        return value, f"{spec.describe(False)}, got integers outside {spec.datatype}'s range"
    return converted, None


def _datatype(dtype: Any) -> str | None:
    if not isinstance(dtype, str) or len(dtype) > 8:
        return None
    try:
        return datatype_of(np.dtype(dtype))
    except TypeError:
        return None
