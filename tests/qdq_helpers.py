"""Shared helpers for the plan/quantize/backend tests: prepared models, ranges, QDQ inspection."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import models
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from qtool.backends import get_backend
from qtool.calibration import calibrate

import qtool
from qtool.io import serialize

BACKENDS = ("academic", "tensorrt", "acl", "tvm", "snpe", "fbgemm")
#: TensorRT with every Conv quantized (``int8_conv_rule=false``): for the tests about other
#: things (AdaRound, bias correction, analyses, reports) on models with 8-channel convs (the
#: digits CNN), which the default rule keeps float as TensorRT runs them.
TENSORRT_ALL_CONVS = get_backend("tensorrt", int8_conv_rule=False)
ALL_CONVS_OPTION = ("--backend-option", "int8_conv_rule=false")
ALL_CONVS = {"int8_conv_rule": False}  # CalibrateOptions(backend_options=...)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@functools.cache
def _prepared_bytes(name: str, opset: int) -> bytes:
    if name == "digits":
        source = str(EXAMPLES / "digits_cnn.onnx")
    elif name == "anchor_grid":
        source = anchor_grid_model()
    else:
        source = models.torch_model(name, opset)
    graph = qtool.load(source)
    graph, _ = qtool.Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(graph)
    return serialize(graph)


def prepared(name: str, opset: int = 13) -> gs.Graph:
    """A fresh prepared graph (cleanup, fold_bn, upgrade_opset) of a test model."""
    return qtool.load(_prepared_bytes(name, opset))


def feeds_for(graph: gs.Graph, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a graph."""
    return models.random_inputs(qtool.io.to_model(graph), batch=batch, seed=seed)


def minmax_ranges(graph: gs.Graph, plan, feeds) -> dict:
    """MinMax ranges of the plan's activations over one batch, through qtool's calibration."""
    return calibrate(graph, plan.activation_schemes(), [feeds], method="minmax")


def run(graph, feeds):
    """Outputs in onnxruntime with optimizations off."""
    return models.run(graph, feeds)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = float(((reference.astype(np.float64) - test) ** 2).sum())
    signal = float((reference.astype(np.float64) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def dq_producer(tensor: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear node producing ``tensor``, or None."""
    if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
        return tensor.inputs[0]
    return None


def quantized_inputs(graph: gs.Graph) -> dict[str, list[int]]:
    """For every non-Q/DQ node: indices of its inputs read through a DequantizeLinear."""
    result = {}
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        result[node.name] = [i for i, t in enumerate(node.inputs) if dq_producer(t)]
    return result


def is_power_of_two(value: float) -> bool:
    """True when ``value`` is exactly 2**k."""
    mantissa, _ = math.frexp(float(value))
    return mantissa == 0.5


def anchor_grid_model() -> onnx.ModelProto:
    """A detection-head pattern: Shape -> Gather -> Cast -> Range whose step is computed from a
    float feature map (mean/mean + 0 * mean = 1.0), a grid added to the features, one conv.

    A step quantized to anything but 1.0 changes the grid's length and breaks the Add.
    """
    rng = np.random.default_rng(0)
    initializers = [
        nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        nh.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b1"),
        nh.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32), "w2"),
        nh.from_array(np.array(2, np.int64), "height_axis"),
        nh.from_array(np.array(0.0, np.float32), "zero"),
        nh.from_array(np.array([1, 1, -1, 1], np.int64), "grid_shape"),
    ]
    nodes = [
        oh.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["conv1"], ["feat"], name="relu1"),
        oh.make_node("Shape", ["feat"], ["feat_shape"], name="shape"),
        oh.make_node("Gather", ["feat_shape", "height_axis"], ["height"], name="gather_height"),
        oh.make_node("Cast", ["height"], ["height_f"], name="cast_height", to=TensorProto.FLOAT),
        oh.make_node("ReduceMean", ["feat"], ["feat_mean"], name="feat_mean", keepdims=0),
        oh.make_node("Div", ["feat_mean", "feat_mean"], ["one"], name="one"),
        oh.make_node("Mul", ["feat_mean", "zero"], ["nothing"], name="nothing"),
        oh.make_node("Add", ["one", "nothing"], ["step"], name="step"),
        oh.make_node("Range", ["zero", "height_f", "step"], ["grid"], name="range"),
        oh.make_node("Reshape", ["grid", "grid_shape"], ["grid_column"], name="grid_column"),
        oh.make_node("Add", ["feat", "grid_column"], ["with_grid"], name="add_grid"),
        oh.make_node("Conv", ["with_grid", "w2"], ["output"], name="conv2"),
    ]
    graph = oh.make_graph(
        nodes,
        "anchor_grid",
        [oh.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializers,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])


#: Tensors of the anchor-grid model on its shape path.
ANCHOR_GRID_SHAPE_PATH = (
    "feat_shape", "height", "height_f", "feat_mean", "one", "nothing", "step", "grid",
    "grid_column",
)
