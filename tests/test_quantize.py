"""quantize(): scales from ranges, offline weights, int32 bias, axes, storage types, errors."""

from __future__ import annotations

import dataclasses

import models
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from qdq_helpers import dq_producer, feeds_for, minmax_ranges, prepared, run, sqnr_db

import qtool
from qtool.errors import BackendError, PlanError
from qtool.io import serialize
from qtool.planner import build_plan
from qtool.qdq import quantize


def _quantize(name, backend, opset=13, plan=None):
    graph = prepared(name, opset)
    plan = plan or build_plan(graph, backend)
    feeds = feeds_for(graph)
    ranges = minmax_ranges(graph, plan, feeds)
    return graph, feeds, ranges, quantize(graph, backend, ranges, plan=plan)


def _weight_dq(result, weight):
    return next(n for n in result.graph.nodes if n.name == f"{weight}_DequantizeLinear")


# ------------------------------------------------------------------------------ weights


def test_per_channel_conv_weight_levels_are_hand_computed():
    graph, _, _, result = _quantize("resnet", "tensorrt")
    weight = "a.0.0.weight_bnfold"
    w = graph.tensors()[weight].values.astype(np.float64)
    amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    scale = (amax / 127).astype(np.float32)
    dq = _weight_dq(result, weight)
    levels, scale_t, zp_t = (t.values for t in dq.inputs)
    assert dq.attrs["axis"] == 0
    assert np.array_equal(scale_t, scale)
    assert zp_t.dtype == np.int8 and not zp_t.any()
    expected = np.clip(np.round(w / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    assert np.array_equal(levels, expected)
    assert np.all(np.abs(levels).reshape(len(scale), -1).max(axis=1) == 127)
    assert levels.min() >= -127  # narrow range


@pytest.mark.parametrize(
    "model, backend, weight, axis, channels",
    [
        ("resnet", "fbgemm", "stem.0.0.weight_bnfold", 0, 16),  # Conv: output channels
        ("convtranspose", "tensorrt", "up.weight_bnfold", 1, 4),  # ConvTranspose (16, 8/2, 4, 4)
        ("resnet", "tensorrt", "fc.weight", 0, 10),  # Gemm transB=1: (N, K)
        ("attention", "tensorrt", "/q/Transpose_output_0", 1, 16),  # MatMul: last axis
    ],
)
def test_per_channel_axis_by_op(model, backend, weight, axis, channels):
    graph, _, _, result = _quantize(model, backend)
    dq = _weight_dq(result, weight)
    assert dq.attrs["axis"] == axis
    assert dq.inputs[1].values.shape == (channels,)
    rows = np.moveaxis(graph.tensors()[weight].values, axis, 0).reshape(channels, -1)
    if dq.inputs[2].values.any():  # fbgemm: asymmetric over the range widened to include 0
        expected = (np.maximum(rows.max(axis=1), 0) - np.minimum(rows.min(axis=1), 0)) / 255
    else:  # symmetric int8 (TensorRT narrow [-127, 127], ACL)
        expected = np.abs(rows).max(axis=1) / 127
    assert np.allclose(dq.inputs[1].values, expected, rtol=1e-6)


def test_gemm_without_transb_uses_axis_1():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3)).astype(np.float32)  # (K, N)
    graph_proto = oh.make_graph(
        [oh.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")],
        "gemm",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [nh.from_array(w, "w"), nh.from_array(np.array([0.1, -0.2, 0.3], np.float32), "b")],
    )
    graph = qtool.load(oh.make_model(graph_proto, opset_imports=[oh.make_opsetid("", 13)]))
    # onnxruntime at 8 bits: per-channel symmetric weights, int32 bias (acl: per tensor)
    backend = qtool.backends.get_backend("onnxruntime", reduce_range=False)
    result = quantize(graph, backend, {"x": (-1.0, 2.0)})
    dq = _weight_dq(result, "w")
    assert dq.attrs["axis"] == 1
    assert np.allclose(dq.inputs[1].values, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    bias_dq = _weight_dq(result, "b")
    s_in = np.float32(3.0 / 255)  # asymmetric uint8 over [-1, 2]
    assert np.array_equal(bias_dq.inputs[1].values, s_in * dq.inputs[1].values)


@pytest.mark.parametrize("backend", ["acl", "tvm"])
def test_int32_bias_scale_is_input_times_weight_scale(backend):
    _, _, _, result = _quantize("convtranspose", backend)
    for entry in result.plan.entries("bias"):
        act, weight = (result.qparams[name] for name in entry.bias_inputs)
        bias_dq = _weight_dq(result, entry.tensor)
        levels, scale, zero_point = (t.values for t in bias_dq.inputs)
        assert levels.dtype == np.int32 and zero_point.dtype == np.int32 and not zero_point.any()
        w_scale = weight.scale
        if w_scale.ndim:  # grouped ConvTranspose: per-channel weight scales repeat per group
            w_scale = np.tile(w_scale, len(levels) // len(w_scale))
        assert np.array_equal(scale, (act.scale * w_scale).astype(np.float32))
        bias = result.float_graph.tensors()[entry.tensor].values
        assert np.array_equal(levels, np.round(bias / scale).astype(np.int32))
        assert bias_dq.attrs.get("axis") == (0 if scale.ndim else None)


def test_convtranspose_grouped_bias_tiles_per_group_scales():
    _, _, _, result = _quantize("convtranspose", "onnxruntime")
    w_scale = result.qparams["up.weight_bnfold"].scale
    entry = next(e for e in result.plan.entries("bias") if e.bias_inputs[1] == "up.weight_bnfold")
    bias = result.qparams[entry.tensor]
    assert w_scale.shape == (4,) and bias.scale.shape == (8,)
    s_in = result.qparams["/enc/enc.1/Relu_output_0"].scale
    assert np.array_equal(bias.scale[:4], bias.scale[4:])
    assert np.array_equal(bias.scale[:4], (s_in * w_scale).astype(np.float32))


@pytest.mark.parametrize("method", ["mse", "quantile"])
def test_weight_method_selects_the_observer(method):
    graph = prepared("resnet")
    plan = build_plan(graph, "tensorrt")
    ranges = minmax_ranges(graph, plan, feeds_for(graph))
    minmax = quantize(graph, "tensorrt", ranges, plan=plan)
    other = quantize(graph, "tensorrt", ranges, plan=plan, weight_method=method)
    assert other.weight_method == method
    for entry in plan.entries("weight"):
        a, b = minmax.qparams[entry.tensor].scale, other.qparams[entry.tensor].scale
        assert np.all(b <= a * (1 + 1e-6))  # a clip search never widens MinMax's range
    assert any(
        np.any(other.qparams[e.tensor].scale < minmax.qparams[e.tensor].scale)
        for e in plan.entries("weight")
    )
    with pytest.raises(qtool.QtoolError, match="unknown calibration method"):
        quantize(graph, "tensorrt", ranges, plan=plan, weight_method="average")


# ---------------------------------------------------------------------------- activations


def test_shared_group_scale_is_the_union_of_member_ranges():
    graph, _, ranges, result = _quantize("concat", "fbgemm")
    for members in result.plan.groups.values():
        lo = min(ranges[m][0] for m in members)
        hi = max(ranges[m][1] for m in members)
        scale, zero_point = result.plan.tensors[members[0]].scheme.qparams(lo, hi)
        for member in members:
            assert result.qparams[member].scale == scale
            assert result.qparams[member].zero_point == zero_point
        q_nodes = [n for n in result.graph.nodes if n.op == "QuantizeLinear"  # 7-bit: Clip
                   and n.inputs[0].name.removesuffix("_clipped") in members]
        assert len(q_nodes) == len(members)
        assert len({id(n.inputs[1]) for n in q_nodes}) == 1  # one scale initializer
        assert len({id(n.inputs[2]) for n in q_nodes}) == 1  # one zero-point initializer


def test_one_qdq_pair_per_tensor_and_only_planned_consumers_read_it():
    _, _, _, result = _quantize("resnet", "academic")
    # /Relu_output_0 feeds conv b.0 (quantized) and the residual Add (float in graph 1).
    add = next(n for n in result.graph.nodes if n.name == "/Add_1")
    conv = next(n for n in result.graph.nodes if n.name == "/b/b.0/b.0.0/Conv")
    assert dq_producer(conv.inputs[0]) is not None
    assert add.inputs[1].name == "/Relu_output_0" and dq_producer(add.inputs[1]) is None
    q_inputs = [n.inputs[0].name for n in result.graph.nodes if n.op == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))


def test_reduce_range_uses_levels_0_to_127():
    graph = prepared("resnet")
    backend = qtool.backends.get_backend("fbgemm", reduce_range=True)
    plan = build_plan(graph, backend)
    feeds = feeds_for(graph)
    ranges = minmax_ranges(graph, plan, feeds)
    result = quantize(graph, backend, ranges, plan=plan)
    lo, hi = ranges["input"]
    assert np.isclose(result.qparams["input"].scale, (hi - lo) / 127, rtol=1e-6)
    q = next(n for n in result.graph.nodes if n.name == "input_QuantizeLinear")
    assert q.inputs[2].values.dtype == np.uint8
    assert 0 <= int(q.inputs[2].values) <= 127


# ------------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    "backend, weight_type, act_type, low, high",
    [
        ("academic", TensorProto.INT4, TensorProto.INT4, -8, 7),  # symmetric (tensorrt: 8-bit)
        ("snpe", TensorProto.UINT4, TensorProto.UINT4, 0, 15),
    ],
)
def test_int4_storage_at_opset_21(backend, weight_type, act_type, low, high):
    graph = prepared("resnet", opset=21)
    plan = build_plan(graph, backend).with_precision("W4A4")
    feeds = feeds_for(graph)
    result = quantize(graph, backend, minmax_ranges(graph, plan, feeds), plan=plan)
    model = qtool.io.to_model(result.graph)
    onnx.checker.check_model(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["fc.weight_quantized"] == weight_type
    assert types["input_zero_point"] == act_type
    stored = next(t for t in model.graph.initializer if t.name == "fc.weight_quantized")
    levels = nh.to_array(stored).astype(np.int16)
    assert levels.min() >= low and levels.max() <= high
    assert levels.min() == low or levels.max() == high
    (want,), (got,) = run(graph, feeds), run(result.graph, feeds)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert sqnr_db(want, got) > 5  # 4 bits: coarse but correlated


def test_opset_below_13_is_raised():
    graph = qtool.load(models.torch_model("resnet", 11))
    graph, _ = qtool.Pipeline(["cleanup", "fold_bn"]).run(graph)
    assert graph.opset == 11
    feeds = feeds_for(graph)
    result = quantize(graph, "tensorrt", {name: (-4.0, 4.0) for name in
                                           build_plan(graph, "tensorrt").activation_schemes()})
    assert result.graph.opset == 13 and result.float_graph.opset == 13
    assert graph.opset == 11
    assert run(result.graph, feeds)[0].shape == run(graph, feeds)[0].shape


# -------------------------------------------------------------------------------- errors


def test_missing_ranges_are_named():
    graph = prepared("resnet")
    plan = build_plan(graph, "tensorrt")
    ranges = minmax_ranges(graph, plan, feeds_for(graph))
    del ranges["/Relu_1_output_0"]
    with pytest.raises(PlanError, match=r"activation\(s\): /Relu_1_output_0"):
        quantize(graph, "tensorrt", ranges, plan=plan)


def test_plan_for_another_backend_or_graph_is_refused():
    graph = prepared("resnet")
    plan = build_plan(graph, "tensorrt")
    with pytest.raises(PlanError, match="built for backend tensorrt, not tvm"):
        quantize(graph, "tvm", {}, plan=plan)
    other = build_plan(prepared("concat"), "tensorrt")
    with pytest.raises(PlanError, match="is not in the graph"):
        quantize(graph, "tensorrt", {}, plan=other)


def test_non_finite_range_is_refused():
    graph = prepared("resnet")
    plan = build_plan(graph, "academic")
    ranges = {name: (-1.0, 1.0) for name in plan.activation_schemes()}
    ranges["input"] = (float("-inf"), 1.0)
    with pytest.raises(PlanError, match="input is not finite"):
        quantize(graph, "academic", ranges, plan=plan)


def test_unknown_backend_lists_names():
    with pytest.raises(BackendError, match="academic, tensorrt, acl, tvm, snpe, qnn, fbgemm"):
        quantize(prepared("resnet"), "tensorrt8", {})


# ---------------------------------------------------------------------------- the result


def test_top_level_api():
    graph = prepared("resnet")
    plan = qtool.build_plan(graph, "tensorrt")
    ranges = {name: (-1.0, 1.0) for name in plan.activation_schemes()}
    result = qtool.quantize(graph, backend="tensorrt", ranges=ranges)
    assert isinstance(result.plan, qtool.QuantPlan) and result.plan == plan
    assert float(result.qparams["input"].scale) == np.float32(1 / 127)


def test_input_graph_is_not_modified_and_save_writes_files(tmp_path):
    graph = prepared("mobilenet_v2")
    before = serialize(graph)
    plan = build_plan(graph, "snpe")
    result = quantize(graph, "snpe", minmax_ranges(graph, plan, feeds_for(graph)), plan=plan)
    assert serialize(graph) == before
    written = result.save(tmp_path / "out")
    assert sorted(p.name for p in written) == ["model.encodings", "model.onnx", "plan.json"]
    for path in written:
        assert path.read_bytes() == result.files()[path.name]
    assert dataclasses.asdict(result.plan.tensors["input"].scheme)["bits"] == 8
    float_model = onnx.load_from_string((tmp_path / "out" / "model.onnx").read_bytes())
    assert not [n for n in float_model.graph.node if n.op_type.endswith("QuantizeLinear")]
    assert isinstance(result.graph, gs.Graph)


@pytest.mark.parametrize("backend, precision, opset", [
    ("academic", "W4A4", 13), ("fbgemm", None, 13), ("academic", "W4A4", 21),
])
def test_levels_narrower_than_storage_saturate_at_their_own_range(backend, precision, opset):
    # x -> MatMul(W): x's range is calibrated to [-1, 1]; feeding 5.0 must saturate at the
    # scheme's top level, not at the int8/uint8 storage limit.
    import onnx_graphsurgeon as gs

    weight = np.eye(4, dtype=np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=(1, 4))
    y = gs.Variable("y", dtype=np.float32, shape=(1, 4))
    graph = gs.Graph(
        nodes=[gs.Node("MatMul", "mm", inputs=[x, gs.Constant("w", weight)], outputs=[y])],
        inputs=[x], outputs=[y], opset=opset,
    )
    options = {"reduce_range": True} if backend == "fbgemm" else {}
    plan = build_plan(graph, qtool.backends.get_backend(backend, **options))
    if precision:
        plan = plan.with_precision(precision)
    ranges = {name: (-1.0, 1.0) for name in plan.activation_schemes()}
    result = quantize(graph, qtool.backends.get_backend(backend, **options), ranges, plan=plan)
    (scheme,) = plan.activation_schemes().values()
    qp = result.qparams["x"]
    top = float((scheme.qmax - int(qp.zero_point)) * np.float32(qp.scale))
    out = run(result.graph, {"x": np.full((1, 4), 5.0, dtype=np.float32)})[0]
    np.testing.assert_allclose(out, np.full((1, 4), top, dtype=np.float32), rtol=0.3)
    assert top < 1.2  # the clip, not the storage limit (which would let ~5.0 through)
