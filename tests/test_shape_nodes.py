"""Float nodes: shape arithmetic is counted apart, only nodes on activations are listed.

The model is what torch.onnx.export (dynamo=False, opset 11, a dynamic sequence axis) writes
for ``x.reshape(1, t, -1)`` followed by a Linear: Shape -> Gather -> Unsqueeze -> Concat
feeding Reshape's shape, a Constant for every literal and the weight, then MatMul + Add,
Softmax. Which nodes depend on the input's values is known by construction.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from qtool.cli import main

from qtool.inspection import activation_nodes, inspect_model
from qtool.io import load
from qtool.planner import build_plan
from qtool.workflow import CalibrateOptions, prepare, quantize_model

SHAPE_CHAIN = {"shape", "gather", "unsqueeze", "concat", "c_index", "c_one", "c_minus1"}
ON_ACTIVATIONS = {"reshape", "matmul", "add", "softmax"}


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name + "_out"], name=name,
                            value=numpy_helper.from_array(value, name + "_value"))


def flatten_linear_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        _const("c_index", np.array(1, np.int64)),
        helper.make_node("Gather", ["s", "c_index_out"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b"], ["b1"], name="unsqueeze", axes=[0]),
        _const("c_one", np.array([1], np.int64)),
        _const("c_minus1", np.array([-1], np.int64)),
        helper.make_node("Concat", ["c_one_out", "b1", "c_minus1_out"], ["new_shape"],
                         name="concat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"], name="reshape"),
        _const("weight", rng.standard_normal((4, 4)).astype(np.float32)),
        helper.make_node("MatMul", ["flat", "weight_out"], ["mm"], name="matmul"),
        _const("bias", rng.standard_normal(4).astype(np.float32)),
        helper.make_node("Add", ["mm", "bias_out"], ["logits"], name="add"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=2),
    ]
    graph = helper.make_graph(
        nodes, "torch_jit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "t", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.producer_name = "pytorch"
    onnx.checker.check_model(model)
    return model


def test_activation_nodes_by_construction():
    graph = load(flatten_linear_model())
    assert activation_nodes(graph) == ON_ACTIVATIONS


def test_inspect_lists_only_float_nodes_on_activations(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(flatten_linear_model(), path)
    prepared, _ = prepare(load(path))
    computing = activation_nodes(prepared)
    info = inspect_model(str(path), backends=["tensorrt"])
    (view,) = info.backends
    assert set(view.float_nodes) <= computing and "softmax" in view.float_nodes
    planned = set(build_plan(prepared.copy(), "tensorrt").float_nodes)
    shape_left = planned - computing
    assert {"shape", "gather", "unsqueeze", "concat"} <= shape_left
    assert not shape_left & ON_ACTIVATIONS
    assert view.shape_nodes == len(shape_left)
    text = CliRunner().invoke(main, ["inspect", str(path), "-b", "tensorrt"]).stdout
    assert "shape nodes" in text
    listed = [line for line in text.splitlines() if ": float " in line]
    assert listed and not any(n in line for line in listed for n in SHAPE_CHAIN)
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(path), "-b", "tensorrt",
                                                   "--format", "json"]).stdout)
    assert as_json["backends"][0]["shape_nodes"] == view.shape_nodes


def test_report_counts_shape_arithmetic_apart(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(flatten_linear_model(), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((8, 3, 4)).astype(np.float32))
    files, report = quantize_model(path, "tensorrt",
                                   CalibrateOptions(data=data, batch_size=1))
    prepared, _ = prepare(load(path))
    computing = activation_nodes(prepared)
    assert set(report["plan"]["float_nodes"]) <= computing
    assert report["plan"]["shape_nodes"] >= 3
    assert f"(+{report['plan']['shape_nodes']} shape arithmetic)" in files["report.md"].decode()
