"""Where each engine's rules put Q/DQ on a block with HardSwish, a decomposed HardSwish, a
residual Add and Concat + Resize (issue 24), and that the onnxruntime backend's file runs in
onnxruntime's integer kernels.

The onnxruntime backend quantizes the inputs and outputs of the weighted ops (placement
``kernels``): every Conv fuses into a QLinearConv (a Conv whose output has no Q runs in
float), the residual Add and the Concat between quantized tensors fuse too, and what
onnxruntime reads in float (HardSwish, the inside of ``x * Clip(x + 3, 0, 6) / 6``, the Sigmoid
head) gets no Q/DQ of its own. ``placement=all`` (every op onnxruntime has a kernel for) is
kept as an option and checked against.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from qdq_helpers import minmax_ranges, sqnr_db
from qtool.backends import get_backend

import qtool
from qtool.io import serialize
from qtool.planner import build_plan
from qtool.qdq import quantize

C = 8


def block_model() -> onnx.ModelProto:
    """x -> Conv1 -> HardSwish -> Conv2 -> Relu, + residual (HardSwish output), -> Conv3 ->
    x*Clip(x+3,0,6)/6 -> Conv4; Resize x2 of Conv4's output and of the Add, Concat, Conv5,
    Sigmoid (the graph output). Weights in initializers, opset 14 (HardSwish)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             nh.from_array(np.array([], np.float32), "roi"),
             nh.from_array(np.float32(3), "three"), nh.from_array(np.float32(0), "zero"),
             nh.from_array(np.float32(6), "six")]
    nodes = []

    def conv(name, x, cin, cout):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits.extend([nh.from_array(w, f"{name}.w"), nh.from_array(b, f"{name}.b")])
        nodes.append(oh.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                  pads=[1, 1, 1, 1]))
        return name

    nodes.append(oh.make_node("HardSwish", [conv("c1", "x", 3, C)], ["h"], name="hswish"))
    nodes.append(oh.make_node("Relu", [conv("c2", "h", C, C)], ["r"], name="relu"))
    nodes.append(oh.make_node("Add", ["r", "h"], ["s"], name="residual"))
    c3 = conv("c3", "s", C, C)
    nodes += [oh.make_node("Add", [c3, "three"], ["p3"], name="hs_add"),
              oh.make_node("Clip", ["p3", "zero", "six"], ["gate"], name="hs_clip"),
              oh.make_node("Mul", [c3, "gate"], ["m"], name="hs_mul"),
              oh.make_node("Div", ["m", "six"], ["d"], name="hs_div")]
    c4 = conv("c4", "d", C, C)
    nodes += [oh.make_node("Resize", [c4, "roi", "scales"], ["u4"], name="up4", mode="nearest"),
              oh.make_node("Resize", ["s", "roi", "scales"], ["us"], name="ups", mode="nearest"),
              oh.make_node("Concat", ["u4", "us"], ["cat"], name="cat", axis=1)]
    nodes.append(oh.make_node("Sigmoid", [conv("c5", "cat", 2 * C, 2)], ["y"], name="head"))
    graph = oh.make_graph(nodes, "block", [oh.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 3, 16, 16])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 32, 32])],
                          inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    return model


def _plan(backend, **options):
    graph = qtool.load(block_model())
    rules = get_backend(backend, **options)
    return graph, rules, build_plan(graph, rules)


def _activations(plan) -> set[str]:
    return {e.tensor for e in plan.entries("activation")}


def test_onnxruntime_quantizes_weighted_inputs_and_outputs_only():
    _, _, plan = _plan("onnxruntime")
    quantized = _activations(plan)
    # conv inputs (x, h, s, d, cat) and conv outputs as the kernels write them (c1, r after
    # the fused Relu, c3, c4, c5); the Concat's inputs, since its output is quantized
    assert quantized == {"x", "c1", "h", "r", "s", "c3", "d", "c4", "u4", "us", "cat", "c5"}
    # nothing for HardSwish's own sake beyond its producer's output; the decomposed HardSwish
    # (Add, Clip, Mul) is read in float: no Q/DQ on its gate
    assert "gate" not in quantized and "p3" not in quantized and "m" not in quantized
    assert "y" not in quantized  # the Sigmoid head's output stays float
    # the Concat and the Resizes feeding it share one scale (QLinearConcat, Resize in uint8)
    groups = {e.tensor: e.group for e in plan.entries("activation")}
    assert groups["cat"] is not None and groups["u4"] == groups["us"] == groups["cat"]
    assert groups["c4"] == groups["cat"] and groups["s"] == groups["cat"]


def test_onnxruntime_placement_all_quantizes_every_kernel_input():
    _, _, plan = _plan("onnxruntime", placement="all")
    quantized = _activations(plan)
    assert {"gate", "c3"} <= quantized  # the decomposed HardSwish's Add/Mul inputs
    assert _activations(_plan("onnxruntime")[2]) < quantized


def test_tensorrt_and_qnn_rules():
    """tensorrt (graph 2): conv inputs (and Add inputs not fused into a conv); qnn (converter):
    every op output, HardSwish's included, read quantized by all its readers. The block's
    convs have 8 channels, which TensorRT's int8_conv_rule keeps float: off here, to see the
    placement of the rest."""
    _, _, plan = _plan("tensorrt", int8_conv_rule=False)
    quantized = _activations(plan)
    assert {"x", "h", "s", "d", "cat"} <= quantized
    assert "c1" not in quantized  # read by HardSwish only: stays in the conv
    assert "gate" not in quantized and "y" not in quantized
    _, _, plan = _plan("qnn")
    quantized = _activations(plan)
    assert {"h", "r", "s", "gate", "m", "d", "y"} <= quantized
    assert "c2" not in quantized  # only read by the Relu fused into Conv2


@pytest.mark.parametrize("placement", ["kernels", "all"])
def test_onnxruntime_output_runs_in_integer_kernels(placement, tmp_path):
    graph, rules, plan = _plan("onnxruntime", placement=placement, target_cpu="vnni")
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    model = serialize(quantize(graph, rules, minmax_ranges(graph, plan, feeds), plan=plan).graph)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    fused = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 5 and "Conv" not in ops and "FusedConv" not in ops
    assert "QLinearAdd" in ops and "QLinearConcat" in ops  # the residual and the Concat
    if placement == "kernels":
        # the decomposed HardSwish runs in float: no QLinearMul, and its Add is float
        assert "QLinearMul" not in ops and ops.count("QLinearAdd") == 1
    # the kernels hold the Q/DQ simulation
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    simulated = ort.InferenceSession(model, plain, providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(block_model().SerializeToString(), plain,
                                     providers=["CPUExecutionProvider"])
    (ref,) = reference.run(None, feeds)
    (sim,) = simulated.run(None, feeds)
    (ker,) = fused.run(None, feeds)
    assert abs(sqnr_db(ref, sim) - sqnr_db(ref, ker)) < 1.0 and sqnr_db(ref, sim) > 20


def se_block_model(channels: int) -> onnx.ModelProto:
    """PP-OCR's classifier in small: x (3 ch) -> stem Conv 3x3 (channels) -> HardSwish ->
    depthwise 3x3 -> SE (GlobalAveragePool -> Conv 1x1 channels/4 -> Relu -> Conv 1x1 ->
    HardSigmoid -> Mul) -> pointwise Conv 1x1 (channels) -> HardSwish."""
    rng = np.random.default_rng(1)
    inits, nodes = [], []

    def conv(name, x, cin, cout, k, group=1):
        w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(k * k * cin / group))
        inits.append(nh.from_array(w.astype(np.float32), f"{name}.w"))
        inits.append(nh.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32),
                                   f"{name}.b"))
        nodes.append(oh.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                  pads=[k // 2] * 4, group=group, kernel_shape=[k, k]))
        return name

    nodes.append(oh.make_node("HardSwish", [conv("stem", "x", 3, channels, 3)], ["h0"]))
    nodes.append(oh.make_node("HardSwish", [conv("dw", "h0", channels, channels, 3,
                                                 group=channels)], ["h1"]))
    nodes.append(oh.make_node("GlobalAveragePool", ["h1"], ["pooled"]))
    squeeze = conv("se_reduce", "pooled", channels, channels // 4, 1)
    nodes.append(oh.make_node("Relu", [squeeze], ["se_relu"]))
    nodes.append(oh.make_node("HardSigmoid", [conv("se_expand", "se_relu", channels // 4,
                                                   channels, 1)], ["gate"], alpha=0.2))
    nodes.append(oh.make_node("Mul", ["h1", "gate"], ["scaled"]))
    nodes.append(oh.make_node("HardSwish", [conv("pw", "scaled", channels, channels, 1)], ["y"]))
    graph = oh.make_graph(nodes, "se", [oh.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                  [1, 3, 16, 16])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT,
                                                     [1, channels, 16, 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    return model


def test_tensorrt_keeps_float_the_convs_it_has_no_int8_kernel_for():
    """ModelOpt's channel rule (TensorRT's int8 convolutions): with 8 channels the stem (at the
    graph input, a multiple of 8) and the depthwise 3x3 (8 output channels) run in int8; the
    SE convs (8 -> 2 -> 8) and the 8 -> 8 pointwise do not, and stay float with the reason.
    With 32 channels every conv is quantized. Issue 24: PP-OCR's classifier 16.6 -> 33 dB."""
    graph = qtool.load(se_block_model(C))
    rules = get_backend("tensorrt")  # the rule is on by default
    plan = build_plan(graph, rules)
    weights = {e.consumers[0] for e in plan.entries("weight")}
    assert weights == {"stem", "dw"}
    for name in ("se_reduce", "se_expand", "pw"):
        assert "no int8 kernel" in plan.float_nodes[name]
    quantized = _activations(plan)
    assert "scaled" not in quantized and "pooled" not in quantized
    assert {"x", "h0"} <= quantized
    # the QDQ model: no weight of a float conv passes a DequantizeLinear
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    result = quantize(graph, rules, minmax_ranges(graph, plan, feeds), plan=plan)
    read = {t.name for n in result.graph.nodes if n.op == "DequantizeLinear" for t in n.inputs}
    assert any(name.startswith("dw.w") for name in read)
    assert not any(name.startswith(("se_reduce.w", "se_expand.w", "pw.w")) for name in read)
    wide = build_plan(qtool.load(se_block_model(32)), rules)
    assert {e.consumers[0] for e in wide.entries("weight")} == {
        "stem", "dw", "se_reduce", "se_expand", "pw"}
    # off, and on qnn (AIMET's rules): every conv is quantized
    off = get_backend("tensorrt", int8_conv_rule=False)
    assert len(build_plan(graph, off).entries("weight")) == 5
    assert len(build_plan(graph, get_backend("qnn")).entries("weight")) == 5


def test_tensorrt_files_name_the_float_convs(tmp_path):
    """qtool calibrate -b tensorrt on the 8-channel SE block: plan.json and the report give each
    float Conv with its channels; the calibration cache and dynamic ranges hold no tensor that
    only a float Conv reads (TensorRT would otherwise build those convs in int8 from the
    cache)."""
    import json

    from click.testing import CliRunner
    from qtool.cli import main

    model = tmp_path / "se.onnx"
    onnx.save(se_block_model(C), model)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    result = CliRunner().invoke(main, ["calibrate", str(model), "-b", "tensorrt", "--data",
                                       str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    float_nodes = json.loads((out / "plan.json").read_text())["float_nodes"]
    report = (out / "report.md").read_text()
    for name, channels in (("se_reduce", "2 output / 8 input"), ("se_expand", "8 output / 2 input"),
                           ("pw", "8 output / 8 input")):
        assert f"Conv with {channels} channels" in float_nodes[name]
        assert "no int8 kernel" in float_nodes[name]
        assert f"| {name} | Conv with {channels} channels" in report
    cached = {line.split(":")[0] for line in
              (out / "calibration.cache").read_text().splitlines()[1:]}
    assert cached == set(json.loads((out / "dynamic_range.json").read_text()))
    assert {"x", "h0"} <= cached  # the stem's and the depthwise conv's inputs
    assert not cached & {"pooled", "se_relu", "scaled"}  # read only by float convs
