"""Every backend on every test model: placement, sharing, schemes, vendor files, fidelity.

The placement rules are restated here independently of the planner (MQBench Fig. 4):
graph 1 quantizes only the inputs and weights of Conv/ConvTranspose/Gemm/MatMul, graph 2 adds
pooling inputs and the shortcut input of a residual Add (hand-listed per model below), graph 3
every non-constant input of Add/Mul/Concat/pooling too. Every vendor file is parsed back with
an independent reader (struct for the TensorRT cache, jsonschema for the encodings, protobuf's
own text parser for the AMCT record) and compared with numbers computed from the ranges.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import struct
from pathlib import Path

import jsonschema
import models
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from qdq_helpers import (
    BACKENDS,
    EXAMPLES,
    feeds_for,
    is_power_of_two,
    minmax_ranges,
    prepared,
    quantized_inputs,
    run,
    sqnr_db,
)
from qtool.backends import backend_names, get_backend

import qtool
from qtool.errors import BackendError
from qtool.planner import build_plan, shape_tensors
from qtool.qdq import quantize

GOLDEN = Path(__file__).resolve().parent / "golden"
ALL_BACKENDS = (*BACKENDS, "onnxruntime")
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
#: onnxruntime: ops with a QDQ kernel or drop rule; all their float activation inputs are
#: quantized (onnxruntime/core/optimizer/qdq_transformer/selectors_actions).
ORT_OPS = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid",
           "HardSigmoid", "HardSwish", "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze",
           "Unsqueeze", "Slice", "Split", "Pad", "Identity", "Resize", "Sum"}
GRAPH_3_ACTIVATION_OPS = {"Add", "Sum", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}
POOLING = {"AveragePool", "GlobalAveragePool"}
WEIGHT_REQUIRED = {"acl"}  # AMCT quantizes layers with weights only

#: TensorRT (graph 2): which inputs of each Add are quantized. The conv branch feeding only
#: the Add is fused (MQBench keeps the last such input float); the shortcut is quantized.
TRT_ADD_INPUTS = {
    ("resnet", "/Add"): [0],  # both inputs are convs: the last (downsample) is fused
    ("resnet", "/Add_1"): [1],  # shortcut /Relu_output_0
    ("mobilenet_v2", "/Add"): [0],  # shortcut: the stem's ReLU6 output
    ("attention", "/embed/Add"): [],  # bias add fused into its MatMul
    ("attention", "/q/Add"): [],
    ("attention", "/k/Add"): [],
    ("attention", "/v/Add"): [],
    ("attention", "/Add"): [0],  # residual: the embedding; attention @ v is fused
}

#: Convs TensorRT has no int8 kernel for (``int8_conv_rule``, on by default: ModelOpt's channel
#: rule), read off the models by hand: 8 -> 12 channels (neither side 16, not at the graph
#: input) and 8 -> 3. They stay float, weight included.
TRT_FLOAT_CONVS = {("concat", "/b3/b3.2/b3.2.0/Conv"), ("convtranspose", "/out/Conv")}

#: Q and DQ node counts on the ResNet block, derived by hand: 6 conv/gemm activation inputs
#: (the stem ReLU feeds two convs through one pair), 7 weights; TensorRT adds the Add shortcut
#: /a/a.2 output and the pooling input; graph 3 adds all four Add inputs and the pooling input
#: (one of which, /Relu_output_0, is already quantized); acl/tvm add 7 int32 biases. snpe
#: (converter placement) quantizes outputs: the input, the 4 ReLUs (their convs and Adds are
#: fused), the 3 convs feeding an Add, the pooling output and the logits: 11, + 7 weights.
RESNET_COUNTS = {
    "academic": (6, 13),
    "tensorrt": (8, 15),
    "acl": (6, 20),
    "tvm": (10, 24),
    "snpe": (11, 18),
    "fbgemm": (10, 17),
    # placement kernels: the inputs and outputs of the 7 weighted ops, 9 activations (input,
    # the stem's Relu, a.1's Relu, down's and a.2's conv outputs, the first Add's Relu, b.1's
    # Relu, b.2's conv output, the Flatten read by the Gemm; the last Add is read in float:
    # its output feeds only the pooling, which no kernel needs quantized), 7 weights and 7
    # int32 biases
    "onnxruntime": (9, 23),
}

#: What each backend's integers look like.
SCHEMES = {
    #           activation dtype, act symmetric, weight dtype, weight sym, per-channel, int32 bias
    "academic": (np.int8, True, np.int8, True, False, False),
    "tensorrt": (np.int8, True, np.int8, True, True, False),
    "acl": (np.int8, False, np.int8, True, {"Conv"}, True),
    "tvm": (np.int8, True, np.int8, True, False, True),
    "snpe": (np.uint8, False, np.uint8, False, False, False),
    "fbgemm": (np.uint8, False, np.int8, False, True, False),
    "onnxruntime": (np.uint8, False, np.int8, True, True, True),
}


@functools.cache
def _result(model: str, backend: str):
    graph = prepared(model)
    plan = build_plan(graph, backend)
    feeds = feeds_for(graph)
    ranges = minmax_ranges(graph, plan, feeds)
    return graph, feeds, ranges, quantize(graph, backend, ranges, plan=plan)


CASES = [(m, b) for m in models.MODEL_NAMES for b in ALL_BACKENDS]


# ------------------------------------------------------------------------------ registry


def test_registry_names_alias_and_errors():
    assert backend_names() == ["academic", "tensorrt", "acl", "tvm", "snpe", "qnn", "fbgemm",
                               "onnxruntime", "openvino"]
    qnn, snpe = get_backend("qnn"), get_backend("snpe")
    assert qnn.name == "qnn" and qnn.placement == snpe.placement
    assert qnn.activation_scheme == snpe.activation_scheme and qnn.emitter is snpe.emitter
    with pytest.raises(BackendError, match="choose one of: academic, tensorrt, acl, tvm, snpe"):
        get_backend("tflite")
    with pytest.raises(BackendError, match="has no option reduce_range"):
        get_backend("tensorrt", reduce_range=True)
    with pytest.raises(BackendError, match="must be bool"):
        get_backend("fbgemm", reduce_range="yes")
    reduced = get_backend("fbgemm").activation_scheme  # PyTorch's fbgemm qconfig default
    assert (reduced.bits, reduced.signed, reduced.symmetric) == (7, False, False)
    assert (reduced.qmin, reduced.qmax) == (0, 127)
    assert get_backend("fbgemm", reduce_range=False).activation_scheme.qmax == 255
    graphs = {name: get_backend(name).placement_graph for name in backend_names()}
    assert graphs == {"academic": 1, "tensorrt": 2, "acl": 1, "tvm": 3, "snpe": 3, "qnn": 3,
                      "fbgemm": 3, "onnxruntime": 1, "openvino": 3}


def test_backend_options_read_from_text():
    fbgemm = get_backend("fbgemm")
    assert fbgemm.parse_options(["reduce_range=false"]) == {"reduce_range": False}
    assert fbgemm.parse_options({"reduce_range": "Yes"}) == {"reduce_range": True}
    assert get_backend("tensorrt").parse_options(["version = 10000"]) == {"version": 10000}
    ort = get_backend("onnxruntime")
    options = ort.parse_options(["activations=int8", "reduce_range=0"])
    configured = ort.with_options(**options)
    assert configured.activation_scheme.signed and configured.weight_scheme.qmax == 127
    with pytest.raises(BackendError) as info:
        fbgemm.parse_options(["reduce_rang=false"])
    assert "has no option reduce_rang" in info.value.message
    assert "reduce_range (default true)" in info.value.hint
    with pytest.raises(BackendError, match="must be bool"):
        fbgemm.parse_options(["reduce_range=maybe"])
    with pytest.raises(BackendError, match="must be int"):
        get_backend("tensorrt").parse_options(["version=8.6"])
    with pytest.raises(BackendError, match="not KEY=VALUE"):
        fbgemm.parse_options(["reduce_range"])
    with pytest.raises(BackendError, match="activations='int4' is not one of uint8, int8"):
        ort.with_options(activations="int4")


# ----------------------------------------------------------------------------- placement


def _quantized_tensor(q: gs.Node) -> str:
    """The float tensor a QuantizeLinear quantizes (through a Clip to 7-bit levels if any)."""
    tensor = q.inputs[0]
    if tensor.inputs and tensor.inputs[0].op == "Clip" and tensor.name.endswith("_clipped"):
        return tensor.inputs[0].inputs[0].name
    return tensor.name


def _expected_inputs(model, backend, node: gs.Node, shape: set[str]) -> list[int]:
    """Input indices that must be read through a DequantizeLinear (the rules restated)."""
    rules = get_backend(backend)
    if any(o.name in shape for o in node.outputs):
        return []
    variable = [i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant)]
    if rules.placement.quantize_outputs:
        return [i for i, t in enumerate(node.inputs) if _converter_encodes(t, rules, shape)] + (
            [1] if node.op in WEIGHTED and isinstance(node.inputs[1], gs.Constant) else [])
    if node.op in WEIGHTED:
        if backend == "tensorrt" and (model, node.name) in TRT_FLOAT_CONVS:
            return []
        has_weight = isinstance(node.inputs[1], gs.Constant)
        if backend in WEIGHT_REQUIRED and not has_weight:
            return []
        expected = [0, 1]
        if len(node.inputs) > 2 and rules.bias_mode == "int32":
            expected.append(2)
        return expected
    if rules.placement_graph == 2:
        if node.op in POOLING:
            return [0]
        if node.op == "Add":
            return TRT_ADD_INPUTS[(model, node.name)]
        return []
    if backend == "onnxruntime":
        quantized = _ort_kernel_tensors(model, shape)
        return [i for i in variable if node.name in quantized.get(node.inputs[i].name, ())]
    if rules.placement_graph == 3 and node.op in GRAPH_3_ACTIVATION_OPS:
        return variable
    return []


def _ort_kernel_tensors(model: str, shape: set[str]) -> dict[str, set[str]]:
    """onnxruntime (placement ``kernels``): tensor -> the nodes that read it quantized.

    The weighted ops read their inputs quantized; a weighted op's output (after a Relu/Clip
    that alone reads it) is read quantized by every reader. Then, to a fixed point, a kernel
    op or data movement whose output is quantized reads its inputs quantized when each is
    quantized already or is the output of such an op whose own inputs are (the chain fuses);
    a tensor it quantizes so is read quantized by every reader.
    """
    graph = prepared(model)
    readers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            readers.setdefault(t.name, []).append(node)

    def data(t) -> bool:
        return (bool(t.name) and not isinstance(t, gs.Constant) and t.name not in shape
                and t.dtype in (np.float32, None))

    def kernel_output(t):
        uses = readers.get(t.name, [])
        if len(uses) == 1 and uses[0].op in ("Relu", "Clip") and t not in graph.outputs:
            return uses[0].outputs[0]
        return t

    quantized: dict[str, set[str]] = {}
    for node in graph.nodes:
        if node.op in WEIGHTED:
            for t in node.inputs[:2]:
                if data(t):
                    quantized.setdefault(t.name, set()).add(node.name)
            out = kernel_output(node.outputs[0])
            if readers.get(out.name):
                quantized.setdefault(out.name, set()).update(n.name for n in readers[out.name])
    kernels = ORT_OPS - {"HardSigmoid", "HardSwish", "Sum"}

    def is_kernel(n) -> bool:
        return n.op in kernels and (n.op != "Resize" or n.attrs.get("mode", "nearest") in (
            "nearest", b"nearest"))

    def fusable(t) -> bool:
        if t.name in quantized:
            return True
        producer = t.inputs[0] if t.inputs else None
        ins = [i for i in producer.inputs if data(i)] if producer is not None else []
        return producer is not None and is_kernel(producer) and bool(ins) and all(
            i.name in quantized for i in ins)

    grown = True
    while grown:
        grown = False
        for node in graph.nodes:
            outs = [kernel_output(o) for o in node.outputs if data(o)]
            ins = [t for t in node.inputs if data(t)]
            if (not is_kernel(node) or not outs or not ins
                    or not all(o.name in quantized for o in outs)
                    or all(node.name in quantized.get(t.name, ()) for t in ins)
                    or not all(map(fusable, ins))):
                continue
            for t in ins:
                if t.name in quantized:
                    quantized[t.name].add(node.name)
                else:
                    quantized[t.name] = {n.name for n in readers[t.name]}
            grown = True
    return quantized


def _converter_encodes(tensor: gs.Tensor, rules, shape: set[str]) -> bool:
    """SNPE/QNN: a graph input or an op output, except data movement and Conv(+Relu)."""
    if isinstance(tensor, gs.Constant) or tensor.name in shape:
        return False
    if not tensor.inputs:
        return True
    producer = tensor.inputs[0]
    if producer.op in ("Reshape", "Flatten", "Transpose", "MaxPool", "Squeeze", "Unsqueeze"):
        return False
    return not (len(tensor.outputs) == 1 and tensor.outputs[0].op in ("Relu", "Clip"))


@pytest.mark.parametrize("model, backend", CASES)
def test_placement_follows_the_graph_rules(model, backend):
    graph, _, _, result = _result(model, backend)
    shape = shape_tensors(graph)
    got = quantized_inputs(result.graph)
    float_nodes = {n.name: n for n in graph.nodes}
    if get_backend(backend).placement.quantize_outputs:  # Identity: DQ -> graph output
        got = {k: v for k, v in got.items() if k not in {f"{o.name}_output" for o in graph.outputs}}
    # 7-bit levels in 8-bit storage (fbgemm's reduce_range) add a Clip before their Q
    level_clips = {n.name for n in result.graph.nodes
                   if n.op == "Clip" and n.name not in float_nodes
                   and [c.op for c in n.outputs[0].outputs] == ["QuantizeLinear"]}
    assert bool(level_clips) == (get_backend(backend).activation_scheme.bits == 7)
    got = {k: v for k, v in got.items() if k not in level_clips}
    assert set(got) == set(float_nodes)  # no node lost or added besides Q/DQ
    for name, node in float_nodes.items():
        assert got[name] == _expected_inputs(model, backend, node, shape), name
    # Every Q feeds exactly its DQ, and the two read the same scale and zero point.
    quantizers = {}
    for node in result.graph.nodes:
        if node.op == "QuantizeLinear":
            (dq,) = node.outputs[0].outputs
            assert dq.op == "DequantizeLinear"
            assert dq.inputs[1] is node.inputs[1] and dq.inputs[2] is node.inputs[2]
            quantizers[_quantized_tensor(node)] = node
    # Members of a sharing group read one scale and one zero-point initializer.
    for members in result.plan.groups.values():
        assert len({id(quantizers[m].inputs[1]) for m in members}) == 1
        assert len({id(quantizers[m].inputs[2]) for m in members}) == 1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_resnet_qdq_counts_by_hand(backend):
    result = _result("resnet", backend)[3]
    ops = [n.op for n in result.graph.nodes]
    assert (ops.count("QuantizeLinear"), ops.count("DequantizeLinear")) == RESNET_COUNTS[backend]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float_nodes_say_why(backend):
    plan = _result("attention", backend)[3].plan
    if get_backend(backend).placement.quantize_outputs:  # the converter quantizes every op
        assert not {"/Softmax", "/ReduceMean", "/Add"} & set(plan.float_nodes)
        return
    assert "Softmax has no integer kernel" in plan.float_nodes["/Softmax"]
    assert "ReduceMean has no integer kernel" in plan.float_nodes["/ReduceMean"]
    if backend in WEIGHT_REQUIRED:
        assert plan.float_nodes["/MatMul"] == (
            "MatMul without a constant weight: acl quantizes only layers with weights"
        )
    if get_backend(backend).placement.quantize_weighted_outputs:
        assert "/Add" not in plan.float_nodes  # it reads the MatMul's quantized output
    elif get_backend(backend).placement_graph == 1:
        assert "/Add" in plan.float_nodes
    else:
        assert "/Add" not in plan.float_nodes


# ------------------------------------------------------------------------------- sharing


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_concat_inputs_share_one_scale_in_the_model(backend):
    graph, _, _, result = _result("concat", backend)
    quantizers = {_quantized_tensor(n): n for n in result.graph.nodes if n.op == "QuantizeLinear"}
    placement = get_backend(backend).placement_graph
    with_quantized_member = 0
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        members = [t.name for t in [*node.inputs, *node.outputs]]
        q_nodes = [quantizers[m] for m in members if m in quantizers]
        if placement == 3:  # every input of a Concat is quantized
            assert all(m in quantizers for m in members[:-1])
        if q_nodes:
            with_quantized_member += 1
            if (get_backend(backend).placement.quantize_weighted_outputs
                    and members[-1] not in quantizers):
                continue  # onnxruntime reads this Concat in float: each input its own scale
            if get_backend(backend).placement.quantize_outputs:
                # the converter (AIMET's rule) ties only the inputs nothing else reads: the
                # first Concat's output, also read by a Conv, keeps its own scale at the second
                q_nodes = [quantizers[m] for m in members[:-1]
                           if m in quantizers and len(graph.tensors()[m].outputs) == 1]
                q_nodes.append(quantizers[members[-1]])
                assert len(q_nodes) == (4 if node.name == "/Concat" else 2)
            # Exactly one scale and one zero point initializer for all of them.
            assert len({q.inputs[1].name for q in q_nodes}) == 1
            assert len({q.inputs[2].name for q in q_nodes}) == 1
    # The first Concat's output (read by a conv) is an input of the second in every graph.
    assert with_quantized_member == 2
    # The MaxPool branch: its output shares the scale of the stem output it reads (graph 3;
    # the converter placement quantizes the stem output only).
    if placement == 3 and not get_backend(backend).placement.quantize_outputs:
        stem, pooled = quantizers["/stem/stem.1/Relu_output_0"], quantizers[
            "/bp/bp.0/MaxPool_output_0"]
        assert stem.inputs[1] is pooled.inputs[1] and stem.inputs[2] is pooled.inputs[2]
    for members in result.plan.groups.values():
        assert len({float(result.qparams[m].scale) for m in members}) == 1


# ------------------------------------------------------------------------------- schemes


@pytest.mark.parametrize("model, backend", CASES)
def test_scheme_of_every_qdq(model, backend):
    graph, _, _, result = _result(model, backend)
    act_dtype, act_sym, w_dtype, w_sym, per_channel, bias32 = SCHEMES[backend]
    rules = get_backend(backend)
    for node in result.graph.nodes:
        if node.op == "QuantizeLinear":
            scale, zero_point = node.inputs[1].values, node.inputs[2].values
            assert scale.shape == () and zero_point.shape == () and "axis" not in node.attrs
            assert zero_point.dtype == act_dtype
            if act_sym:
                assert zero_point == 0
            if rules.activation_scheme.power_of_two:
                assert is_power_of_two(scale)
        elif node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            levels, scale, zero_point = (t.values for t in node.inputs)
            (user,) = node.outputs[0].outputs  # weights feed one node in the test models
            index = user.inputs.index(node.outputs[0])
            if index == 2:  # bias
                assert bias32 and levels.dtype == np.int32 and not zero_point.any()
                continue
            assert levels.dtype == w_dtype and zero_point.dtype == w_dtype
            if w_sym:
                assert not zero_point.any()
            if per_channel is True or (per_channel and user.op in per_channel):
                axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": levels.ndim - 1}.get(
                    user.op, 0 if user.attrs.get("transB", 0) else 1
                )
                assert node.attrs["axis"] == axis and scale.shape == (levels.shape[axis],)
            else:
                assert scale.shape == () and "axis" not in node.attrs
            if rules.weight_scheme.narrow_range:
                assert levels.min() >= -127
            if rules.weight_scheme.power_of_two:
                assert all(is_power_of_two(s) for s in np.ravel(scale))
    if not bias32:  # TensorRT, SNPE, FBGEMM, academic: bias stays a float initializer
        for node in result.graph.nodes:
            if node.op in WEIGHTED and len(node.inputs) > 2:
                assert isinstance(node.inputs[2], gs.Constant)
                assert node.inputs[2].values.dtype == np.float32


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_tvm_scales_are_exact_powers_of_two(model):
    result = _result(model, "tvm")[3]
    for qp in result.qparams.values():
        assert all(is_power_of_two(s) for s in np.ravel(qp.scale)), qp.tensor
    shifts = json.loads(result.files()["shifts.json"])
    for table in ("activation_shifts", "param_shifts"):
        for tensor, shift in shifts[table].items():
            assert isinstance(shift, int)
            assert 2.0**shift == float(result.qparams[tensor].scale)


def test_tvm_power_of_two_choice_minimises_error():
    """Not just the ceiling: the exponent (floor or ceil of log2(amax/127)) with the lower
    squared error over values spread across the range, checked here by brute force."""
    scheme = get_backend("tvm").activation_scheme
    rng = np.random.default_rng(0)
    picked_floor = 0
    for amax in (0.3, 1.0, 1.1, 2.0, 5.0, 64.0, 100.0):
        x = rng.uniform(-amax, amax, 50000)
        errors = {}
        low = math.floor(math.log2(amax / 127))
        for k in (low, low + 1):
            s = 2.0**k
            errors[k] = float(((np.clip(np.round(x / s), -128, 127) * s - x) ** 2).mean())
        scale, _ = scheme.qparams(-amax, amax)
        best = min(errors, key=errors.get)
        assert float(scale) == 2.0**best, amax
        picked_floor += best == low
    assert picked_floor >= 2  # 1.0 -> 2^-7 clips 1/128 of the range but halves the step


# ------------------------------------------------------------------- vendor files: golden


def _activation_amax(result, ranges, tensor):
    members = result.plan.groups.get(result.plan.tensors[tensor].group, [tensor])
    return max(max(abs(ranges[m][0]), abs(ranges[m][1])) for m in members)


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_tensorrt_cache_and_dynamic_range_round_trip(model):
    _, _, ranges, result = _result(model, "tensorrt")
    files = result.files()
    lines = files["calibration.cache"].decode().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    parsed = {}
    for line in lines[1:]:
        name, _, hex_scale = line.rpartition(": ")
        assert len(hex_scale) == 8
        parsed[name] = struct.unpack("!f", bytes.fromhex(hex_scale))[0]
    assert list(parsed) == [e.tensor for e in result.plan.entries("activation")]
    dynamic = json.loads(files["dynamic_range.json"])
    for tensor, scale in parsed.items():
        amax = _activation_amax(result, ranges, tensor)
        assert scale == np.float32(amax / 127)
        assert math.isclose(dynamic[tensor], amax, rel_tol=1e-6)
        assert dynamic[tensor] == scale * 127


ENCODING = {
    "type": "object",
    "additionalProperties": False,
    "required": ["bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"],
    "properties": {
        "bitwidth": {"type": "integer", "minimum": 1, "maximum": 32},
        "dtype": {"const": "int"},
        "is_symmetric": {"enum": ["True", "False"]},
        "max": {"type": "number"},
        "min": {"type": "number"},
        "offset": {"type": "integer"},
        "scale": {"type": "number", "exclusiveMinimum": 0},
    },
}
ENCODINGS_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "activation_encodings", "param_encodings", "quantizer_args"],
    "properties": {
        "version": {"const": "0.6.1"},
        "activation_encodings": {
            "type": "object",
            "additionalProperties": {"type": "array", "minItems": 1, "maxItems": 1,
                                     "items": ENCODING},
        },
        "param_encodings": {
            "type": "object",
            "additionalProperties": {"type": "array", "minItems": 1, "items": ENCODING},
        },
        "quantizer_args": {
            "type": "object",
            "additionalProperties": False,
            "required": ["activation_bitwidth", "dtype", "is_symmetric", "param_bitwidth",
                         "per_channel_quantization", "quant_scheme"],
            "properties": {
                "activation_bitwidth": {"type": "integer"},
                "dtype": {"const": "int"},
                "is_symmetric": {"type": "boolean"},
                "param_bitwidth": {"type": "integer"},
                "per_channel_quantization": {"type": "boolean"},
                "quant_scheme": {"type": "string"},
            },
        },
    },
}


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_snpe_encodings_round_trip(model):
    """The legacy 0.6.1 layout (backend option encoding_version=0.6.1)."""
    _, _, ranges, result = _result(model, "snpe")
    legacy = get_backend("snpe", encoding_version="0.6.1")
    files = dataclasses.replace(result, backend=legacy).files()
    doc = json.loads(files["model.encodings"])
    jsonschema.validate(doc, ENCODINGS_SCHEMA)
    float_model = onnx.load_from_string(files["model.onnx"])
    onnx.checker.check_model(float_model)
    assert not [n for n in float_model.graph.node if "QuantizeLinear" in n.op_type]
    names = {t for n in float_model.graph.node for t in list(n.input) + list(n.output)}
    assert set(doc["activation_encodings"]) == {e.tensor for e in result.plan.entries("activation")}
    assert set(doc["param_encodings"]) == {e.tensor for e in result.plan.entries("weight")}
    assert set(doc["activation_encodings"]) | set(doc["param_encodings"]) <= names
    for tensor, (enc,) in doc["activation_encodings"].items():
        qp = result.qparams[tensor]
        assert enc["bitwidth"] == 8 and enc["is_symmetric"] == "False"
        assert enc["scale"] == float(qp.scale) and enc["offset"] == -int(qp.zero_point)
        assert -255 <= enc["offset"] <= 0
        assert math.isclose(enc["min"], enc["offset"] * enc["scale"], rel_tol=1e-12)
        assert math.isclose(enc["max"], (enc["offset"] + 255) * enc["scale"], rel_tol=1e-12)
        members = result.plan.groups.get(result.plan.tensors[tensor].group, [tensor])
        lo = min(min(ranges[m][0] for m in members), 0.0)
        hi = max(max(ranges[m][1] for m in members), 0.0)
        step = enc["scale"]
        assert enc["min"] <= lo + step and enc["min"] >= lo - step  # the grid spans the range
        assert hi - step <= enc["max"] <= hi + step
    tensors = result.graph.tensors()
    for tensor, encs in doc["param_encodings"].items():
        (enc,) = encs  # per tensor
        levels = tensors[tensor + "_quantized"].values.astype(np.float64)
        dequantized = (levels + enc["offset"]) * enc["scale"]  # QNN's formula
        original = result.float_graph.tensors()[tensor].values
        assert np.abs(dequantized - original).max() <= enc["scale"] / 2 * (1 + 1e-6)
    args = doc["quantizer_args"]
    assert (args["activation_bitwidth"], args["param_bitwidth"]) == (8, 8)
    assert args["per_channel_quantization"] is False and args["is_symmetric"] is False


def _amct_record_class():
    """AMCT's scale_offset_record_onnx.proto, built from its field list (engines.md)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="scale_offset_record_onnx.proto", package="AMCTOnnx", syntax="proto2"
    )
    F = descriptor_pb2.FieldDescriptorProto
    layer = fdp.message_type.add(name="SingleLayerRecord")
    for name, number, kind, label in [
        ("scale_d", 1, F.TYPE_FLOAT, F.LABEL_OPTIONAL),
        ("offset_d", 2, F.TYPE_INT32, F.LABEL_OPTIONAL),
        ("scale_w", 3, F.TYPE_FLOAT, F.LABEL_REPEATED),
        ("offset_w", 4, F.TYPE_INT32, F.LABEL_REPEATED),
        ("shift_bit", 5, F.TYPE_UINT32, F.LABEL_REPEATED),
        ("skip_fusion", 6, F.TYPE_BOOL, F.LABEL_OPTIONAL),
    ]:
        layer.field.add(name=name, number=number, type=kind, label=label)
    entry = fdp.message_type.add(name="MapFiledEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".AMCTOnnx.SingleLayerRecord")
    record = fdp.message_type.add(name="ScaleOffsetRecord")
    record.field.add(name="record", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                     type_name=".AMCTOnnx.MapFiledEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("AMCTOnnx.ScaleOffsetRecord"))


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_acl_record_round_trip(model):
    graph, _, ranges, result = _result(model, "acl")
    text = result.files()["record.txt"].decode()
    record = text_format.Parse(text, _amct_record_class()())
    nodes = {n.name: n for n in graph.nodes}
    layers = [n for n in graph.nodes
              if n.op in WEIGHTED and isinstance(n.inputs[1], gs.Constant)]
    assert [r.key for r in record.record] == [n.name for n in layers]  # keyed by node name
    for entry in record.record:
        node = nodes[entry.key]
        data, weight = node.inputs[0].name, node.inputs[1].name
        lo, hi = min(ranges[data][0], 0.0), max(ranges[data][1], 0.0)
        scale_d = np.float32((hi - lo) / 255)  # asymmetric int8 over the widened range
        assert np.float32(entry.value.scale_d) == scale_d
        assert entry.value.offset_d == int(np.clip(np.round(-128 - lo / scale_d), -128, 127))
        w = nodes[entry.key].inputs[1].values
        # AMCT takes a scale_w vector for channel-wise Conv only (engines.md 4.2)
        if node.op == "Conv":
            amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        else:
            amax = np.array([np.abs(w).max()])
        assert weight in result.plan.tensors
        assert np.array_equal(np.array(entry.value.scale_w, np.float32),
                              (amax / 127).astype(np.float32))
        assert list(entry.value.offset_w) == [0] * len(amax)


# ------------------------------------------------------------- files: checker, ORT, bytes


@pytest.mark.parametrize("model, backend", CASES)
def test_emitted_models_check_run_and_are_deterministic(model, backend):
    graph, feeds, ranges, result = _result(model, backend)
    files = result.files()
    again = quantize(prepared(model), backend, ranges, plan=result.plan).files()
    assert files == again  # byte-identical across runs
    (want,) = run(graph, feeds)
    onnx_files = [name for name in files if name.endswith(".onnx")]
    assert onnx_files
    for name in onnx_files:
        proto = onnx.load_from_string(files[name])
        onnx.checker.check_model(proto)
        (got,) = run(files[name], feeds)
        assert got.shape == want.shape
        assert sqnr_db(want, got) > 20, f"{model}/{backend}/{name}"


def _golden_ranges(plan):
    """Fixed ranges, independent of onnxruntime, so the golden bytes are machine-independent."""
    return {
        name: (-0.25 * (index % 3), 1.0 + 0.5 * index)
        for index, name in enumerate(plan.activation_schemes())
    }


#: Only SNPE keeps a golden plan; every vendor file is checked above by an independent reader
#: against numbers computed from the ranges (model.encodings: test_qualcomm, AIMET's schema).
GOLDEN_FILES = {"snpe": ["plan.json"]}


@pytest.mark.parametrize("backend", sorted(GOLDEN_FILES))
def test_golden_vendor_files(backend):
    """Vendor files of the digits CNN under fixed ranges match tests/golden byte for byte.

    Regenerate after an intended format change with QTOOL_UPDATE_GOLDEN=1.
    """
    graph = prepared("digits")
    plan = build_plan(graph, backend)
    files = quantize(graph, backend, _golden_ranges(plan), plan=plan).files()
    folder = GOLDEN / backend
    for name in GOLDEN_FILES[backend]:
        path = folder / name
        if os.environ.get("QTOOL_UPDATE_GOLDEN"):
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
        assert path.read_bytes() == files[name], f"{backend}/{name} differs from the golden file"


# ------------------------------------------------------------------------------ fidelity


@functools.lru_cache(maxsize=1)
def _digits():
    graph = prepared("digits")
    calib = np.load(Path(__file__).resolve().parent.parent / "examples" / "digits_calib.npz")
    val = np.load(Path(__file__).resolve().parent.parent / "examples" / "digits_val.npz")
    (logits,) = run(graph, {"input": val["input"]})
    return graph, calib["input"], val["input"], val["labels"], logits


@pytest.mark.parametrize(
    "backend, options",
    [(b, {}) for b in ALL_BACKENDS] + [("fbgemm", {"reduce_range": False})],
)
def test_digits_accuracy_within_one_point_of_float(backend, options):
    graph, calib, images, labels, float_logits = _digits()
    rules = get_backend(backend, **options)
    plan = build_plan(graph, rules)
    ranges = qtool.calibrate(graph, plan.activation_schemes(), [{"input": calib}],
                             method="minmax")
    result = quantize(graph, rules, ranges, plan=plan)
    (logits,) = run(result.graph, {"input": images})
    float_accuracy = float((float_logits.argmax(1) == labels).mean())
    accuracy = float((logits.argmax(1) == labels).mean())
    sqnr = sqnr_db(float_logits, logits)
    print(f"digits {backend}{options or ''}: top-1 {accuracy:.3f} (float {float_accuracy:.3f}), "
          f"SQNR {sqnr:.1f} dB")
    assert float_accuracy == pytest.approx(0.994)
    assert accuracy >= float_accuracy - 0.01
    assert sqnr > 20


# ---------------------------------------------------------------------- TensorRT: widths


@pytest.mark.parametrize("method, header", [("kld", "EntropyCalibration2"),
                                            ("minmax", "MinMaxCalibration"),
                                            ("quantile", "LegacyCalibration"),
                                            ("mse", "EntropyCalibration2")])
def test_tensorrt_cache_header_names_the_calibrator(method, header):
    graph = prepared("digits")
    plan = build_plan(graph, "tensorrt")
    result = quantize(graph, "tensorrt", _golden_ranges(plan), plan=plan,
                      activation_method=method)
    first = result.files()["calibration.cache"].decode().splitlines()[0]
    assert first == f"TRT-8601-{header}"
    version = get_backend("tensorrt", version=10000)
    result = quantize(graph, version, _golden_ranges(plan), plan=plan, activation_method=method)
    assert result.files()["calibration.cache"].startswith(f"TRT-10000-{header}\n".encode())


def test_tensorrt_refuses_other_activation_widths(tmp_path):
    graph = prepared("digits")
    plan = build_plan(graph, "tensorrt", act_bits=4)
    simulated = quantize(graph, "tensorrt", _golden_ranges(plan), plan=plan)  # what-if sweeps
    with pytest.raises(BackendError, match="cannot describe 4-bit activations"):
        simulated.files()  # but no calibration.cache that TensorRT would read as amax 127*s
    from click.testing import CliRunner
    from qtool.cli import main

    out = tmp_path / "out"
    run_cli = CliRunner().invoke(main, ["calibrate", str(EXAMPLES / "digits_cnn.onnx"),
                                        "-b", "tensorrt", "--act-bits", "4", "-o", str(out)])
    assert run_cli.exit_code == 2 and not out.exists()
    assert "use --act-bits 8" in run_cli.output
    run_cli = CliRunner().invoke(main, ["calibrate", str(EXAMPLES / "digits_cnn.onnx"),
                                        "-b", "fbgemm", "--backend-option", "reduce_rang=0",
                                        "-o", str(out)])
    assert run_cli.exit_code == 2 and "its options: reduce_range (default true)" in run_cli.output


# ------------------------------------------------------------------------ int32 biases


def _export(module, shape) -> onnx.ModelProto:
    """``torch.onnx.export`` with its defaults (fixed batch 1, dynamo off)."""
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), buffer, dynamo=False,
                          opset_version=13, input_names=["input"], output_names=["output"])
    return onnx.load_from_string(buffer.getvalue())


def _quantized(model, backend, feeds):
    graph, _ = qtool.Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(qtool.load(model))
    plan = build_plan(graph, backend)
    ranges = qtool.calibrate(graph, plan.activation_schemes(), [feeds], method="minmax")
    return graph, quantize(graph, backend, ranges, plan=plan)


def _bias_scales(result):
    tensors = result.graph.tensors()
    return {name: tensors[name + "_scale"].values for name in
            (e.tensor for e in result.plan.entries("bias"))}


@pytest.mark.parametrize("backend", ["acl", "tvm", "onnxruntime"])
def test_pruned_channel_keeps_its_bias(backend):
    """A Conv whose output channel 2 has all-zero weights (a pruned filter) and bias 0.5:
    that channel's output is 0.5, the bias scale is a normal float32, nothing is clipped."""
    import torch

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[2] = 0.0
        conv.bias[:] = torch.tensor([0.1, -0.2, 0.5, 0.3])
    model = _export(torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)),
                    (1, 3, 8, 8))
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8), np.float32)}
    graph, result = _quantized(model, backend, feeds)
    first = next(n for n in result.graph.nodes if n.op == "Conv")
    probe = {first.outputs[0].name}
    (channel,) = run(_with_output(result.graph, probe), feeds)[1:]
    assert np.allclose(channel[0, 2], 0.5, atol=1e-6)  # acl gave 4e-23 before
    for scale in _bias_scales(result).values():
        assert np.all(np.abs(scale) >= np.finfo(np.float32).tiny)
    assert result.warnings == []  # an all-zero channel loses nothing to the raised scale


@pytest.mark.parametrize("backend", ["acl", "tvm", "onnxruntime"])
def test_input_that_never_fires_keeps_the_biases(backend):
    """A ReLU that never fires (range (0, 0)) feeds a Conv with biases: the output is the
    bias, not the int32-clipped nothing of a 2^-100 x s_w bias scale; the report is told."""
    import torch

    dead = torch.nn.Conv2d(3, 4, 3, padding=1)
    live = torch.nn.Conv2d(4, 3, 1)
    with torch.no_grad():
        dead.bias[:] = -1000.0  # every output negative: the ReLU outputs zeros only
        live.bias[:] = torch.tensor([0.5, -0.25, 2.0])
    model = _export(torch.nn.Sequential(dead, torch.nn.ReLU(), live), (1, 3, 8, 8))
    feeds = {"input": np.random.default_rng(1).standard_normal((1, 3, 8, 8), np.float32)}
    graph, result = _quantized(model, backend, feeds)
    (want,) = run(graph, feeds)
    (got,) = run(result.graph, feeds)
    assert np.allclose(want[0, :, 0, 0], [0.5, -0.25, 2.0])
    assert np.allclose(got, want, atol=1e-6)
    assert any("scale raised" in w for w in result.warnings)
    for scale in _bias_scales(result).values():
        assert np.all(np.abs(scale) >= np.finfo(np.float32).tiny)


def _with_output(graph, names):
    model = qtool.io.to_model(graph)
    for name in sorted(names):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


@functools.cache
def _resnet18_prepared() -> bytes:
    import torchvision

    model = _export(torchvision.models.resnet18(weights=None, num_classes=10), (1, 3, 32, 32))
    graph, _ = qtool.Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(qtool.load(model))
    return qtool.io.serialize(graph)


@pytest.mark.parametrize("backend", ["acl", "tvm"])
def test_shared_bias_is_quantized_per_consumer(backend):
    """torchvision's resnet18 as constructed (BN gamma 1, beta 0): the folded biases are all
    zero and cleanup's dedupe makes the convs of one width share one initializer. Each conv
    gets its own int32 bias with its own s_in * s_w (before: 21 weights, 5 biases)."""
    graph = qtool.load(_resnet18_prepared())
    readers = collections.Counter(n.inputs[2].name for n in graph.nodes
                                  if n.op in ("Conv", "Gemm") and len(n.inputs) > 2)
    assert max(readers.values()) > 1  # the export really shares biases
    plan = build_plan(graph, backend)
    assert (len(plan.entries("weight")), len(plan.entries("bias"))) == (21, 21)
    ranges = {name: (-1.0 - i % 5, 2.0 + i % 7)
              for i, name in enumerate(plan.activation_schemes())}
    result = quantize(graph, backend, ranges, plan=plan)
    layers = [n for n in result.graph.nodes if n.op in ("Conv", "Gemm")]
    assert len(layers) == 21
    for node in layers:
        dq_x, dq_w, dq_b = (t.inputs[0] for t in node.inputs[:3])
        assert dq_b.op == "DequantizeLinear" and dq_b.inputs[0].values.dtype == np.int32
        expected = (np.float32(dq_x.inputs[1].values) * dq_w.inputs[1].values).astype(np.float32)
        assert np.array_equal(dq_b.inputs[1].values, expected), node.name


# ------------------------------------------------------------- scale math vs torch.ao


def test_scale_math_matches_torch_ao_observers():
    """Where a backend's convention is torch.ao's, qtool's scales and zero points equal the
    observers': fbgemm's 7-bit (reduce_range) uint8 activations and per-channel affine int8
    weights, snpe's affine uint8, TensorRT's narrow-range per-channel symmetric weights
    (torch's [-127, 127] qint8 symmetric divides by (127 + 127) / 2 = 127, as TensorRT does)."""
    import torch
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 32)) * 3 + 1).astype(np.float32)
    w = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)

    def torch_qparams(observer, values):
        observer(torch.from_numpy(values))
        scale, zero_point = observer.calculate_qparams()
        return scale.numpy().astype(np.float32), zero_point.numpy().astype(np.int64)

    def qtool_qparams(scheme, values, axis=None):
        if axis is None:
            return scheme.qparams(values.min(), values.max())
        flat = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        return scheme.with_(per_channel_axis=axis).qparams(flat.min(1), flat.max(1))

    fbgemm, snpe, trt = get_backend("fbgemm"), get_backend("snpe"), get_backend("tensorrt")
    cases = [
        (fbgemm.activation_scheme, x, None,  # reduce_range=True: quint8 levels 0..127
         MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=127)),
        (snpe.activation_scheme, x, None, MinMaxObserver(dtype=torch.quint8)),
        (fbgemm.weight_scheme, w, 0,
         PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                  qscheme=torch.per_channel_affine)),
        (trt.weight_scheme, w, 0,
         PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, quant_min=-127, quant_max=127,
                                  qscheme=torch.per_channel_symmetric)),
    ]
    for scheme, values, axis, observer in cases:
        want_scale, want_zp = torch_qparams(observer, values)
        scale, zero_point = qtool_qparams(scheme, values, axis)
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
        np.testing.assert_array_equal(zero_point, want_zp)


@pytest.mark.parametrize("backend", ["acl", "onnxruntime"])
def test_lint_accepts_the_granularity_each_op_gets(backend):
    """acl: per-channel Conv, per-tensor Gemm/MatMul; lint's QT109 knows which op wants which,
    and flags a per-tensor Conv weight."""
    from qtool.lint import lint_model

    result = _result("resnet", backend)[3]
    ops = {e.tensor: e.scheme.per_channel for e in result.plan.entries("weight")}
    assert (False in ops.values()) == (backend == "acl")  # the resnet's Gemm, on acl
    findings = lint_model(result.graph, backend=backend).findings
    assert not [f for f in findings if f.rule_id == "QT109"]
    academic = _result("resnet", "academic")[3]  # per-tensor everywhere
    findings = lint_model(academic.graph, backend=backend).findings
    flagged = {f.node for f in findings if f.rule_id == "QT109"}
    wanted = {"Conv"} if backend == "acl" else WEIGHTED
    per_channel_weights = {n.name for n in academic.graph.nodes if n.op == "DequantizeLinear"
                           and isinstance(n.inputs[0], gs.Constant)
                           and n.outputs[0].outputs[0].op in wanted}
    assert flagged == per_channel_weights
