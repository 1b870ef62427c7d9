"""Warnings that are true (issue 21): coverage, advice that fits the flags, lint of qtool's output.

A warning that fires on a good run teaches users to ignore warnings:

* coverage counted a BERT's embedding tables (Gather) as weights, so every BERT run read
  "almost nothing was quantized: only 6% of the weight values" with all 12 MatMuls quantized;
* ``--backend onnxruntime --backend-option reduce_range=false`` advised "or quantize with
  --backend onnxruntime";
* ``qtool lint`` flagged qtool's own onnxruntime output (QT109 on the one-output-channel
  Conv of a YOLOv8 DFL head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo  # tests/ is on sys.path (conftest)
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from qtool.backends import backend_names, get_backend
from qtool.calibration import calibrate

from qtool.io import load, serialize
from qtool.lint import lint_model
from qtool.plan import QuantPlan
from qtool.planner import build_plan
from qtool.qdq import quantize
from qtool.workflow import CalibrateOptions, advice_for_flags, prepare, quantize_model

ROOT = Path(__file__).resolve().parent.parent


def embedding_mlp(vocab: int = 1000, dim: int = 32, hidden: int = 64) -> onnx.ModelProto:
    """Token ids -> embedding Gather -> MatMul + Relu -> MatMul: the table dwarfs the MLP."""
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(rng.normal(size=(vocab, dim)).astype(np.float32), "table"),
        nh.from_array((rng.normal(size=(dim, hidden)) / dim**0.5).astype(np.float32), "w1"),
        nh.from_array((rng.normal(size=(hidden, 10)) / hidden**0.5).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("MatMul", ["embedded", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "embedding_mlp", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                               ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6, 10])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("backend", ["onnxruntime", "snpe"])
def test_embedding_tables_do_not_count_against_coverage(tmp_path, backend):
    model = tmp_path / "embedding_mlp.onnx"
    onnx.save(embedding_mlp(), model)
    np.savez(tmp_path / "ids.npz",
             ids=np.random.default_rng(1).integers(0, 1000, (8, 6)).astype(np.int64))
    files, report = quantize_model(model, backend, CalibrateOptions(
        data=tmp_path / "ids.npz", analysis="none"))
    plan = QuantPlan.from_json(files["plan.json"].decode())
    quantized = {entry.tensor for entry in plan.entries("weight")}
    assert {"w1", "w2"} <= quantized and "table" not in quantized
    # every weight a backend quantizes is quantized (the 32000-value table is 92 % of the
    # values: counted, coverage read 8 %)
    assert not [w for w in report["warnings"] if "quantized" in w], report["warnings"]
    # and a run that keeps the MLP float still warns
    _, report = quantize_model(model, backend, CalibrateOptions(
        data=tmp_path / "ids.npz", analysis="none", skip=("MatMul",)))
    assert [w for w in report["warnings"] if "nothing was quantized" in w]


def test_no_advice_to_use_the_backend_already_given(tmp_path):
    _, report = quantize_model(ROOT / "examples/digits_cnn.onnx", "onnxruntime", CalibrateOptions(
        data=ROOT / "examples/digits_calib.npz", backend_options=("reduce_range=false",)))
    assert not [w for w in report["warnings"] if "--backend onnxruntime" in w]
    # the advice names the flag that made the difference instead
    rules = get_backend("onnxruntime", reduce_range=False)
    line = ("x overflow u8 x s8 kernels without VNNI: run it with optimizations off, or "
            "quantize with --backend onnxruntime")
    assert advice_for_flags([line], rules) == [
        line.replace("quantize with --backend onnxruntime",
                     "quantize without --backend-option reduce_range=false")]
    # default options: the clause goes; another backend keeps its advice
    assert advice_for_flags(["a (use --backend onnxruntime, or reduce_range)"],
                            get_backend("onnxruntime")) == ["a (reduce_range)"]
    assert advice_for_flags([line], get_backend("tvm")) == [line]


def dfl_head() -> onnx.ModelProto:
    """YOLOv8's distribution focal loss decode: Softmax over 16 bins, a 16 -> 1 Conv."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.normal(size=(64, 8, 1, 1)) * 0.3).astype(np.float32), "w1"),
             nh.from_array(np.zeros(64, np.float32), "b1"),
             nh.from_array(np.array([0, 4, 16, 16], np.int64), "bins"),
             nh.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "project"),
             nh.from_array(np.array([0, 4, 16], np.int64), "boxes_shape")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"]),
             helper.make_node("Reshape", ["c", "bins"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Softmax", ["t"], ["p"], axis=1),
             helper.make_node("Conv", ["p", "project"], ["d"]),
             helper.make_node("Reshape", ["d", "boxes_shape"], ["boxes"])]
    graph = helper.make_graph(
        nodes, "dfl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 4, 4])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 4, 16])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _new_findings(float_model: bytes, qdq_model: bytes, backend: str) -> list[str]:
    """Lint warnings and errors of qtool's output that its float input does not have."""
    def found(model):
        return {(f.rule_id, f.message) for f in lint_model(model, backend=backend).findings
                if f.severity in ("warning", "error")}

    return sorted(f"{rule} {message}" for rule, message in
                  found(qdq_model) - found(float_model))


def _qdq(float_bytes: bytes, backend: str, samples) -> bytes:
    graph, _ = prepare(load(float_bytes))
    plan = build_plan(graph, get_backend(backend))
    ranges = calibrate(graph, plan.activation_schemes(), samples, batch_size=4)
    return serialize(quantize(graph, get_backend(backend), ranges, plan=plan).graph)


ZOO = ("detector", "ocr", "multi", "legacy", "transformer")


@pytest.mark.parametrize("name", [*ZOO, "dfl_head"])
def test_lint_accepts_qtool_output_on_its_own_backend(name):
    if name == "dfl_head":
        float_bytes = dfl_head().SerializeToString()
        rng = np.random.default_rng(1)
        samples = [{"x": rng.normal(size=(1, 8, 4, 4)).astype(np.float32)} for _ in range(4)]
    else:
        opset = 17 if name == "transformer" else 13
        float_bytes = zoo.zoo_bytes(name, opset)
        samples = zoo.samples(name, 4)
    for backend in backend_names():
        new = _new_findings(float_bytes, _qdq(float_bytes, backend, samples), backend)
        assert not new, f"{name} on {backend}: {new}"
