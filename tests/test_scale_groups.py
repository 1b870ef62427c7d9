"""Shared-scale groups whose ranges are far apart are split, given 16 bits or kept float.

The YOLOv8-style head of :mod:`tests.detect_head` (pixel boxes concatenated with sigmoid
scores) is quantized by every registered backend at its defaults; the score slice of the
output must keep >= 20 dB against float on held-out images, measured here with numpy on
onnxruntime's outputs (the plan before this split gave 0-2.6 dB on tvm, snpe, qnn, fbgemm
and onnxruntime).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from detect_head import head_bytes, images
from qtool.backends import backend_names

from qtool.options import CalibrateOptions
from qtool.planner import build_plan
from qtool.prepare import prepare
from qtool.scale_groups import MIN_LEVELS, member_levels, min_levels, split_wide_groups
from qtool.scheme import QuantScheme
from qtool.workflow import quantize_model


def _sqnr(x: np.ndarray, q: np.ndarray) -> float:
    noise = float(np.sum((x.astype(np.float64) - q) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(x.astype(np.float64) ** 2))
                                                       / noise)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("head")
    model = folder / "head.onnx"
    model.write_bytes(head_bytes())
    np.savez(folder / "calib.npz", images=images(48, 1))
    np.savez(folder / "val.npz", images=images(24, 2))
    return folder


@pytest.mark.parametrize("backend", backend_names())
def test_score_slice_survives_every_backend(head, backend):
    files, report = quantize_model(
        head / "head.onnx", backend,
        CalibrateOptions(data=head / "calib.npz", eval_data=head / "val.npz",
                         kernel_check=False, analysis="none"))
    held_out = images(16, 3)
    reference = ort.InferenceSession(head_bytes(), providers=["CPUExecutionProvider"]).run(
        None, {"images": held_out})[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        quant = ort.InferenceSession(files["model.qdq.onnx"], options,
                                     providers=["CPUExecutionProvider"]).run(
            None, {"images": held_out})[0]
        assert _sqnr(reference[:, 4:], quant[:, 4:]) >= 20.0, (backend, level)
        assert _sqnr(reference[:, :4], quant[:, :4]) >= 20.0, (backend, level)
    # the split output is what the backend's rules accept (no mixed scales at an int Concat)
    from qtool.lint import lint_model

    found = lint_model(files["model.qdq.onnx"], backend=backend).findings
    assert not [f for f in found if f.rule_id == "QT104"], backend


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("backend", ["onnxruntime", "qnn"])
def test_score_slice_survives_other_opsets(tmp_path, opset, backend):
    model = tmp_path / "head.onnx"
    model.write_bytes(head_bytes(opset))
    np.savez(tmp_path / "calib.npz", images=images(32, 1))
    files, _ = quantize_model(model, backend, CalibrateOptions(
        data=tmp_path / "calib.npz", kernel_check=False, analysis="none",
        bias_correction=False))
    held_out = images(8, 3)
    reference = ort.InferenceSession(head_bytes(opset), providers=["CPUExecutionProvider"]).run(
        None, {"images": held_out})[0]
    quant = ort.InferenceSession(files["model.qdq.onnx"], providers=["CPUExecutionProvider"]).run(
        None, {"images": held_out})[0]
    assert _sqnr(reference[:, 4:], quant[:, 4:]) >= 20.0


def _concat_then_conv() -> gs.Graph:
    """Boxes (0-300) and sigmoid scores (0-1) concatenated, then a 1x1 Conv reads both."""
    x = gs.Variable("x", np.float32, [1, 2, 4, 4])
    rng = np.random.default_rng(0)
    w1 = gs.Constant("w1", rng.normal(size=(4, 2, 1, 1)).astype(np.float32))
    w2 = gs.Constant("w2", rng.normal(size=(3, 2, 1, 1)).astype(np.float32))
    w3 = gs.Constant("w3", rng.normal(size=(2, 7, 1, 1)).astype(np.float32))
    boxes_raw = gs.Variable("boxes_raw", np.float32)
    boxes = gs.Variable("boxes", np.float32)
    logits = gs.Variable("logits", np.float32)
    scores = gs.Variable("scores", np.float32)
    joined = gs.Variable("joined", np.float32)
    out = gs.Variable("out", np.float32)
    nodes = [
        gs.Node("Conv", "box_conv", inputs=[x, w1], outputs=[boxes_raw]),
        gs.Node("Mul", "to_pixels",
                inputs=[boxes_raw, gs.Constant("k", np.array(100.0, np.float32))],
                outputs=[boxes]),
        gs.Node("Conv", "cls_conv", inputs=[x, w2], outputs=[logits]),
        gs.Node("Sigmoid", "sigmoid", inputs=[logits], outputs=[scores]),
        gs.Node("Concat", "concat", inputs=[boxes, scores], outputs=[joined],
                attrs={"axis": 1}),
        gs.Node("Conv", "reader", inputs=[joined, w3], outputs=[out]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[out], opset=13)


RANGES = {"x": (-1.0, 1.0), "boxes_raw": (-3.0, 3.0), "boxes": (-300.0, 300.0),
          "logits": (-5.0, 5.0), "scores": (0.0, 1.0), "joined": (-300.0, 300.0),
          "out": (-500.0, 500.0)}


def test_tvm_splits_the_group_and_keeps_the_mixed_tensor_float():
    graph, _ = prepare(_concat_then_conv())
    plan = build_plan(graph, "tvm")
    assert plan.tensors["scores"].group == plan.tensors["boxes"].group is not None
    split, decisions = split_wide_groups(graph, plan, RANGES, "tvm")
    assert [d.action for d in decisions] == ["float"]
    assert "joined" not in split.tensors  # both ranges in one tensor: read float
    # only the Concat read them, and it runs float: no scale forced on either
    assert "scores" not in split.tensors and "boxes" not in split.tensors
    assert "one 8-bit scale" in split.float_nodes["concat"]
    # the Conv reading the Concat's output reads it float; its weight stays quantized
    assert "reader" not in split.float_nodes and split.tensors["w3"].consumers == ("reader",)
    assert "scores" in split.notes and "concat runs float" in split.notes["scores"]
    assert split.to_dict()["notes"] == dict(split.notes)  # the plan says why
    from qtool.plan import QuantPlan

    assert QuantPlan.from_json(split.to_json()) == split


def test_converter_backends_get_sixteen_bits():
    graph, _ = prepare(_concat_then_conv())
    for backend in ("snpe", "qnn"):
        plan = build_plan(graph, backend)
        split, decisions = split_wide_groups(graph, plan, RANGES, backend)
        assert [d.action for d in decisions] == ["16-bit"]
        group = split.tensors["scores"].group
        assert group is not None
        assert {split.tensors[m].scheme.bits for m in split.groups[group]} == {16}


def test_close_ranges_keep_one_scale():
    graph, _ = prepare(_concat_then_conv())
    plan = build_plan(graph, "tvm")
    close = {**RANGES, "boxes": (-3.0, 3.0), "joined": (-3.0, 3.0)}
    split, decisions = split_wide_groups(graph, plan, close, "tvm")
    assert decisions == [] and split is plan


def test_member_levels_formula():
    scheme = QuantScheme(bits=8, signed=False, symmetric=False)
    levels = member_levels(scheme, {"a": (0.0, 320.0), "b": (0.0, 1.0)})
    assert levels["a"] == pytest.approx(255.0)
    assert levels["b"] == pytest.approx(255.0 / 320.0)
    assert levels["b"] < MIN_LEVELS <= levels["a"]
    assert min_levels(scheme) == pytest.approx(255 / 8)
    assert min_levels(scheme.with_(bits=16)) == MIN_LEVELS
    assert min_levels(scheme.with_(bits=4)) == pytest.approx(15 / 8)  # 4 bits: 8x narrower


def test_four_bit_groups_of_like_ranges_stay_shared():
    graph, _ = prepare(_concat_then_conv())
    plan = build_plan(graph, "tvm", act_bits=4)
    close = {**RANGES, "boxes": (-3.0, 3.0), "joined": (-3.0, 3.0), "scores": (0.0, 1.0)}
    split, decisions = split_wide_groups(graph, plan, close, "tvm")
    assert decisions == [] and split is plan  # 1/3 of the range: 5 of 15 levels kept
    split, decisions = split_wide_groups(graph, plan, RANGES, "tvm")
    assert [d.action for d in decisions] == ["float"]


def test_plan_without_notes_keeps_its_json():
    graph, _ = prepare(_concat_then_conv())
    plan = build_plan(graph, "tvm")
    assert "notes" not in plan.to_dict()


def test_quantize_splits_on_every_path():
    """qtool.qdq.quantize itself splits: fallback, sensitivity, QAT and compare get it too."""
    from qtool.qdq import quantize

    graph, _ = prepare(_concat_then_conv())
    result = quantize(graph, "tvm", RANGES)
    assert "concat" in result.plan.float_nodes and "joined" not in result.plan.tensors
    again = quantize(graph, "tvm", RANGES, plan=result.plan)  # a split plan stays as it is
    assert again.plan == result.plan


def test_a_reader_left_without_quantized_inputs_is_listed_float():
    """ViT's shape: a class token concatenated with patch embeddings, then a float Add."""
    x = gs.Variable("x", np.float32, [1, 4, 8])
    token = gs.Variable("token", np.float32)
    joined = gs.Variable("joined", np.float32)
    out = gs.Variable("out", np.float32)
    nodes = [
        gs.Node("Mul", "tiny", inputs=[x, gs.Constant("k", np.array(0.001, np.float32))],
                outputs=[token]),
        gs.Node("Concat", "cat", inputs=[token, x], outputs=[joined], attrs={"axis": 1}),
        gs.Node("Add", "pos", inputs=[joined, gs.Constant(
            "pos_embed", np.ones((1, 8, 8), np.float32))], outputs=[out]),
    ]
    graph, _ = prepare(gs.Graph(nodes=nodes, inputs=[x], outputs=[out], opset=13))
    plan = build_plan(graph, "tvm")
    assert plan.tensors["joined"].consumers == ("pos",)
    ranges = {"x": (-50.0, 50.0), "token": (-0.05, 0.05), "joined": (-50.0, 50.0)}
    split, _ = split_wide_groups(graph, plan, ranges, "tvm")
    assert "joined" not in split.tensors
    assert "too far apart" in split.float_nodes["pos"] and "cat" in split.float_nodes
