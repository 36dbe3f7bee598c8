"""Declared tensors (ddml_common/tensors.py) and the gateway's checks of requests against them
(gateway/tensors.py): parsing, and property tests that every fitting tensor passes and every
mismatched one is refused with the declared tensor's name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ddml_common import protocol
from ddml_common.tensors import (NUMPY_BY_DATATYPE, TensorSpec, check_value, from_metadata, from_table, metadata,
                                 parse_flag, parse_flags)
from gateway.errors import GatewayError
from gateway.tensors import check_v1_inputs, check_v2_inputs

IMAGE = TensorSpec("IMAGE", "FP32", (3, 224, 224))
CLASSES = TensorSpec("CLASSES", "INT64", (5,))
IMAGE_MODEL = metadata([IMAGE], [CLASSES], "pytorch")


def test_flag_parses_name_datatype_and_dims_without_the_batch_dimension():
    assert parse_flag("IMAGE:FP32:3,224,224") == IMAGE
    assert parse_flag("TOKENS:int64:-1") == TensorSpec("TOKENS", "INT64", (-1,))
    assert parse_flag("SCORE:FP32:") == TensorSpec("SCORE", "FP32", ())
    assert IMAGE.shape == [-1, 3, 224, 224]


@pytest.mark.parametrize("flag, why", [
    ("IMAGE:FP32", "NAME:DATATYPE:DIMS"), ("IMAGE:FLOAT:3", "datatype must be one of"),
    ("IMAGE:FP32:3,x", "comma-separated integers"), ("IMAGE:FP32:-2", "each >= 0 or -1"),
    (":FP32:3", "1 to 256 characters"),
])
def test_bad_flag_is_refused_with_the_reason(flag, why):
    with pytest.raises(ValueError, match=why):
        parse_flag(flag)


def test_toml_table_arrays_give_the_same_specs_as_flags():
    table = [{"name": "IMAGE", "datatype": "FP32", "dims": [3, 224, 224]}]
    assert from_table(table, "models.resnet.inputs") == [IMAGE]
    with pytest.raises(ValueError, match=r"models.resnet.inputs\[0\] must be a table"):
        from_table([{"name": "IMAGE", "datatype": "FP32"}], "models.resnet.inputs")
    with pytest.raises(ValueError, match="name a tensor twice"):
        from_table(table * 2, "inputs")


def test_worker_flags_take_every_source_form(tmp_path):
    from worker.__main__ import build_parser

    assert parse_flags("IMAGE:FP32:3,224,224 SCALE:FP32:") == [IMAGE, TensorSpec("SCALE", "FP32", ())]
    config = tmp_path / "w.toml"
    config.write_text('[worker]\ninput = [{name = "IMAGE", datatype = "FP32", dims = [3, 224, 224]}]\n'
                      'output = ["CLASSES:INT64:5"]\n')
    args = build_parser().parse_args(["--config", str(config), "--model-path", "m.pt2"])
    assert (args.input, args.output) == ([IMAGE], [CLASSES])
    args = build_parser().parse_args(["--input", "IMAGE:FP32:3,224,224", "--input", "SCALE:FP32:"])
    assert args.input == [IMAGE, TensorSpec("SCALE", "FP32", ())]


def test_metadata_round_trips_and_free_form_declares_nothing():
    assert from_metadata(IMAGE_MODEL) == ([IMAGE], [CLASSES])
    assert from_metadata({"free_form": True, "inputs": [], "outputs": []}) is None
    assert from_metadata({"inputs": [{"name": "X", "datatype": "FP32", "shape": [3]}], "outputs": []}) is None


def _refusal(call) -> str:
    with pytest.raises(GatewayError) as caught:
        call()
    assert caught.value.code == protocol.ErrorCode.BAD_REQUEST
    return caught.value.message


def v2(datatype="FP32", shape=(1, 3, 224, 224), name="IMAGE"):
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": []}


@pytest.mark.parametrize("tensor, message", [
    (v2("FP64"), "IMAGE expects FP32 [-1,3,224,224], got FP64 [1,3,224,224]"),
    (v2("UINT8"), "IMAGE expects FP32 [-1,3,224,224], got UINT8 [1,3,224,224]"),
    (v2(shape=(3, 224, 224)), "IMAGE expects FP32 [-1,3,224,224], got FP32 [3,224,224]"),
    (v2(shape=(2, 3, 112, 112)), "IMAGE expects FP32 [-1,3,224,224], got FP32 [2,3,112,112]"),
    (v2(name="INPUT"), "model 'resnet' has no input 'INPUT' (its inputs: IMAGE)"),
])
def test_v2_request_that_does_not_fit_is_refused_naming_the_declared_tensor(tensor, message):
    assert message in _refusal(lambda: check_v2_inputs("resnet", IMAGE_MODEL, [tensor]))


def test_v2_request_missing_a_declared_input_is_refused():
    two = metadata([IMAGE, TensorSpec("SCALE", "FP32", ())], [], "python")
    assert "needs input SCALE expects FP32 [-1]" in _refusal(lambda: check_v2_inputs("m", two, [v2()]))
    check_v2_inputs("m", two, [v2(), v2(shape=(1,), name="SCALE")])


def test_v2_free_form_model_and_a_left_out_trailing_one_pass():
    check_v2_inputs("echo", {"free_form": True, "inputs": [], "outputs": []}, [v2("FP64")])
    text = metadata([TensorSpec("TEXT", "BYTES", (1,))], [], "pytorch")
    check_v2_inputs("minilm", text, [v2("BYTES", (2,), "TEXT")])
    check_v2_inputs("minilm", text, [v2("BYTES", (2, 1), "TEXT")])
    assert "TEXT expects BYTES [-1,1], got BYTES [1,2]" in _refusal(
        lambda: check_v2_inputs("minilm", text, [v2("BYTES", (1, 2), "TEXT")]))


def test_v1_ndarray_and_json_rows_are_checked_without_conversion():
    small = metadata([TensorSpec("X", "FP32", (2, -1))], [], "python")
    array = protocol.decode_value(protocol.encode_value(np.zeros((2, 3), np.float64)))
    wire = {"__ndarray__": ["<f8", [2, 3], array.tobytes()]}
    assert "inputs[0]: X expects FP32 [2,-1], got FP64 [2,3]" in _refusal(lambda: check_v1_inputs("m", small, [wire]))
    wire, json_list = check_v1_inputs("m", small, [{"__ndarray__": ["<f4", [2, 5], bytes(40)]}, [[1, 2.5], [3, 4]]])
    assert wire == {"__ndarray__": ["<f4", [2, 5], bytes(40)]}  # msgpack arrays pass untouched
    assert json_list.dtype == np.float32 and json_list.tolist() == [[1, 2.5], [3, 4]]  # JSON: the declared dtype
    small_ints = metadata([TensorSpec("B", "UINT8", (2,))], [], "python")
    assert "B expects UINT8 [2], got integers outside UINT8's range" in _refusal(
        lambda: check_v1_inputs("m", small_ints, [[1, 300]]))
    assert "B expects UINT8 [2], got BOOL [2]" in _refusal(lambda: check_v1_inputs("m", small_ints, [[True, False]]))
    assert "inputs[1]: X expects FP32 [2,-1], got floats [3]" in _refusal(
        lambda: check_v1_inputs("m", small, [[[1.0], [2.0]], [1.0, 2.0, 3.0]]))
    ints = metadata([TensorSpec("IDS", "INT64", (-1,))], [], "python")
    assert "IDS expects INT64 [-1], got floats [2]" in _refusal(lambda: check_v1_inputs("m", ints, [[1, 2.0]]))
    text = metadata([TensorSpec("TEXT", "BYTES", (1,))], [], "python")
    check_v1_inputs("m", text, ["any text", {"text": "x", "truncate": True}])  # text models: not arrays


datatypes = st.sampled_from(sorted(NUMPY_BY_DATATYPE))
dims = st.lists(st.one_of(st.just(-1), st.integers(0, 4)), max_size=4).map(tuple)


@st.composite
def spec_and_fitting_shape(draw):
    spec = TensorSpec("T", draw(datatypes), draw(dims))
    shape = [draw(st.integers(1, 3))] + [draw(st.integers(0, 4)) if d == -1 else d for d in spec.dims]
    return spec, shape


@settings(max_examples=200, deadline=None)
@given(spec_and_fitting_shape())
def test_property_a_fitting_tensor_passes_on_v2_and_v1(case):
    spec, shape = case
    meta = metadata([spec], [], "python")
    check_v2_inputs("m", meta, [{"name": "T", "datatype": spec.datatype, "shape": shape}])
    array = np.zeros(shape[1:], dtype=NUMPY_BY_DATATYPE[spec.datatype])
    assert check_value(spec, array) is None
    wire = protocol.encode_value(array)  # as a msgpack client sends it
    check_v1_inputs("m", meta, [{"__ndarray__": [array.dtype.str, list(array.shape), b""]}])
    assert protocol.decode_value(wire).dtype == array.dtype


@settings(max_examples=300, deadline=None)
@given(spec_and_fitting_shape(), datatypes, st.integers(0, 3), st.integers(1, 5))
def test_property_a_mismatched_tensor_is_refused_with_its_name(case, other_type, which, delta):
    spec, shape = case
    meta = metadata([spec], [], "python")
    if which == 0:  # another datatype
        if other_type == spec.datatype:
            return
        datatype = other_type
    else:
        datatype = spec.datatype
        if which == 1:  # no batch dimension, or an extra one
            shape = shape[1:] if spec.dims and spec.dims[-1] != 1 else [*shape, 2, 2]
        elif which == 2 and any(d != -1 for d in spec.dims):  # a fixed dim off
            k = next(i for i, d in enumerate(spec.dims) if d != -1)
            shape[k + 1] += delta
        else:  # one more dimension
            shape = [*shape, delta + 1]
    message = _refusal(lambda: check_v2_inputs("m", meta, [{"name": "T", "datatype": datatype, "shape": shape}]))
    assert message.startswith(f"T expects {spec.datatype} [") and f"got {datatype}" in message
    array = np.zeros(shape[1:], dtype=NUMPY_BY_DATATYPE[datatype])
    problem = check_value(spec, array)
    if which != 1:
        assert problem is not None and problem.startswith("T expects")


wire_dtypes = st.sampled_from(sorted(v for v in NUMPY_BY_DATATYPE.values()))


@settings(max_examples=200, deadline=None)
@given(wire_dtypes.flatmap(lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=4,
                                                                                      min_side=0, max_side=5))))
def test_property_any_declared_tensor_round_trips_bit_for_bit_writable(array):
    """The worker's codec and a msgpack reply: dtype, shape and every bit kept; predict() may write to it."""
    back = protocol.decode_value(protocol.encode_value(array))
    assert back.dtype == array.dtype and back.shape == array.shape and back.tobytes() == array.tobytes()
    assert back.flags.writeable
    document = protocol.unpack_document(protocol.pack_document({"outputs": [array]}, keep_arrays=True))
    dtype, shape, data = document["outputs"][0]["__ndarray__"]
    assert (dtype, shape, data) == (array.dtype.str, list(array.shape), array.tobytes())
    spec = TensorSpec("T", next(k for k, v in NUMPY_BY_DATATYPE.items() if v == array.dtype.str), array.shape)
    assert check_value(spec, back) is None
