r"""Empirical bias correction of quantized layers.

Nagel et al. 2019; AIMET's empirical bias correction, NNCF's FastBiasCorrection.

Quantizing a layer's weights (and everything upstream) shifts the mean of its output: the
rounding errors of a channel's weights do not cancel, and the next layers read a biased
input. For each Conv/Gemm (or MatMul + Add of a constant) whose weight is quantized, in
topological order, with every layer upstream already corrected, the per-channel mean of the
error on the calibration data

    delta_c = E[y_float_c] - E[y_quant_c]     (mean over rows and spatial positions)

is added to the layer's bias (a zero bias is created where the layer has none), so that the
corrected quantized model has the float model's mean at every corrected layer's output.
Correcting a layer changes what its downstream layers see, not what any layer upstream or
beside it sees, so the layers go in *stages*: a stage holds the layers with no uncorrected
weighted layer upstream, and one pass of the quantized model over the data corrects all of
them. The cost is one pass of the float model plus one pass per stage (the depth in weighted
layers, not their number), each running only the nodes its layers depend on; the quantized
graph's biases are updated in place between stages. Memory is one batch plus a sum and a
count per channel. Measured: 1.9x the time of a run without it on a ResNet-18 (18 stages, 64
samples of 32x32), +0.8 s on the digits CNN.

Int32 biases are re-quantized from the corrected float bias with the layer's ``s_in * s_w``,
so the residual mean error is below half a bias step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qtool.graph_walk import name_nodes
from qtool.io import load, load_model, serialize

log = logging.getLogger(__name__)

LAYERS = frozenset({"Conv", "Gemm"})  # and MatMul followed by an Add of a constant


@dataclass
class BiasCorrection:
    """What :func:`correct_biases` did.

    Attributes:
        layers: Corrected layer name -> largest absolute bias change.
        stages: Passes of the quantized model over the data.
        samples: Rows of calibration data used.
        sqnr_db: Output name -> ``[without, with]`` the correction, on the evaluation data
            (filled by :meth:`measure`).
        reverted: The correction lowered an output's SQNR on the evaluation data, so the
            model written is the uncorrected one.
    """

    layers: dict[str, float] = field(default_factory=dict)
    stages: int = 0
    samples: int = 0
    sqnr_db: dict[str, list] = field(default_factory=dict)
    reverted: bool = False

    def measure(self, without, with_) -> None:
        """Record each output's SQNR without and with the correction (two Evaluations)."""
        self.sqnr_db = {
            a.name: [a.sqnr_db, b.sqnr_db]
            for a, b in zip(without.outputs, with_.outputs, strict=True)
        }

    def worse(self, tolerance_db: float = 0.05) -> list[str]:
        """Outputs whose SQNR the correction lowered by more than ``tolerance_db``."""
        return [name for name, (a, b) in self.sqnr_db.items()
                if b is not None and (a is None or b < a - tolerance_db)]

    def to_dict(self) -> dict[str, Any]:
        """For report.json (floats rounded to 6 significant digits: stable bytes)."""
        from qtool.analysis.evaluate import _rounded

        return _rounded({"layers": dict(self.layers), "stages": self.stages,
                         "samples": self.samples, "sqnr_db": dict(self.sqnr_db),
                         "reverted": self.reverted})


def correct_biases(graph: gs.Graph, backend, ranges: Mapping[str, Any], plan,
                   batches: Callable[[], Iterable[Mapping[str, np.ndarray]]], *,
                   weight_method: str = "minmax", activation_method: str | None = None):
    """Quantize ``graph`` with the biases corrected (see the module docstring).

    Args:
        graph: The prepared float graph; not modified (a corrected copy is quantized).
        backend: Backend name or object.
        ranges: Activation ranges from calibration.
        plan: The plan to apply.
        batches: Calibration data: a callable giving fresh batches on every call.
        weight_method: Observer for the weight ranges.
        activation_method: The calibration method (named in vendor files).

    Returns:
        ``(result, report)``: the :class:`qtool.qdq.QuantizedModel` of the corrected graph
        and a :class:`BiasCorrection`.
    """
    from qtool.qdq import quantize

    work = load(serialize(graph))
    name_nodes(work)
    quantized_weights = {e.tensor for e in plan.entries("weight")}
    targets = [t for n in work.nodes if (t := _target(n, quantized_weights)) is not None]
    report = BiasCorrection()
    if not targets:
        return quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                      activation_method=activation_method), report
    axes = {t.output: t.axis for t in targets}
    float_means, report.samples = channel_means(work, list(axes), batches, axes)
    result = quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                      activation_method=activation_method)
    quantized_nodes = {n.name: n for n in result.graph.nodes}
    for stage in _stages(work, targets):
        quant_means, _ = channel_means(result.graph, [t.output for t in stage], batches, axes)
        report.stages += 1
        for target in stage:
            delta = (float_means[target.output] - quant_means[target.output]) / target.divisor
            bias = target.bias()
            corrected = np.asarray(bias.values, dtype=np.float64).reshape(-1) + delta
            _set(bias, corrected)
            holder = quantized_nodes[target.holder.name]
            if not _set_quantized_bias(holder, target.index, corrected):
                result = quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                      activation_method=activation_method)
                quantized_nodes = {n.name: n for n in result.graph.nodes}
            report.layers[target.layer.name] = float(np.abs(delta).max())
    # the final model comes out of quantize() like any other, from the corrected float graph
    result = quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                      activation_method=activation_method)
    log.info("bias correction: %d layers in %d stages", len(report.layers), report.stages)
    return result, report


def channel_means(graph, names: list[str], batches, axes: Mapping[str, int] | None = None
                  ) -> tuple[dict[str, np.ndarray], int]:
    """Per-channel mean of each tensor over the data, streamed in float64.

    The channel axis is ``axes[name]`` (default 1: NCHW and (rows, features)).

    Only the nodes the tensors depend on run: an early stage costs a fraction of a pass.
    """
    from qtool.analysis.common import exposed, feeds_of, iterate_batches, session
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    proto = load_model(_pruned(graph, names))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    specs = model_inputs(graph)
    run = session(exposed(proto, names))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    rows = 0
    # the batches already fit the model (its fixed batch size, each input's batch axis)
    for index, batch in enumerate(iterate_batches(batches)):
        feeds = feeds_of(batch, [i.name for i in inputs], index)
        rows += batch_rows(feeds, specs)
        for name, value in zip(names, run.run(names, feeds), strict=True):
            value = np.asarray(value, dtype=np.float64)
            axis = (axes or {}).get(name, 1)
            per_channel = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
            sums[name] = sums.get(name, 0.0) + per_channel.sum(axis=1)
            counts[name] += per_channel.shape[1]
    return {name: sums[name] / counts[name] for name in names}, rows


def _pruned(graph, names: list[str]) -> gs.Graph:
    """A copy of ``graph`` with ``names`` as its outputs and only the nodes they need."""
    copy = load(serialize(graph), check=False)
    tensors = copy.tensors()
    inputs = list(copy.inputs)
    copy.outputs = [tensors[name] for name in names]
    copy.cleanup(remove_unused_graph_inputs=False)
    copy.inputs = inputs
    return copy


def _stages(graph: gs.Graph, targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by how many corrected layers lie upstream (graph order within)."""
    layer_of = {id(t.layer): t for t in targets}
    depth: dict[str, int] = {}  # tensor -> weighted layers on the longest path to it
    stage_of: dict[int, int] = {}
    for node in graph.nodes:  # topological order
        level = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in layer_of:
            stage_of[id(node)] = level
            level += 1
        for out in node.outputs:
            depth[out.name] = level
    stages: dict[int, list[Target]] = {}
    for target in targets:
        stages.setdefault(stage_of[id(target.layer)], []).append(target)
    return [stages[k] for k in sorted(stages)]


@dataclass
class Target:
    """One layer to correct: the weighted node, where its bias lives, how to read its output.

    Conv/Gemm hold their bias as input 2 (Gemm's scaled by ``beta``: the divisor), channel
    axis 1. A MatMul with a constant weight followed by an Add of a constant (a Linear layer
    as exporters write it for 3-D inputs) holds it in the Add; the channel is the last axis.
    """

    layer: gs.Node
    holder: gs.Node
    index: int
    axis: int
    divisor: float = 1.0

    @property
    def output(self) -> str:
        """The tensor whose mean is corrected."""
        return self.holder.outputs[0].name

    def bias(self) -> gs.Constant:
        """The bias constant (a zero bias is added to a Conv/Gemm without one)."""
        if self.index >= len(self.holder.inputs):
            return _bias(self.holder)
        return self.holder.inputs[self.index]


def _target(node: gs.Node, quantized_weights: set[str]) -> Target | None:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    if node.inputs[1].name not in quantized_weights:
        return None
    if node.op in LAYERS:
        if not _bias_ok(node):
            return None
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        return Target(node, node, 2, 1, beta)
    if node.op != "MatMul" or node.inputs[1].values.ndim != 2 or len(node.outputs[0].outputs) != 1:
        return None
    add = node.outputs[0].outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    bias = add.inputs[index]
    channels = node.inputs[1].values.shape[1]
    if (not isinstance(bias, gs.Constant) or len(bias.outputs) != 1
            or bias.values.size != channels or bias.values.shape[-1:] != (channels,)):
        return None
    return Target(node, add, index, -1)


def _bias_ok(node: gs.Node) -> bool:
    """The layer has a 1-D constant bias read only by it, or none (one is then added)."""
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 0.0:
        return False
    if len(node.inputs) > 2:
        bias = node.inputs[2]
        return isinstance(bias, gs.Constant) and len(bias.outputs) == 1 and (
            bias.values.size == max(bias.values.shape, default=1))
    return True


def _set(constant: gs.Constant, values: np.ndarray) -> None:
    old = np.asarray(constant.values)
    constant.values = np.asarray(values).reshape(old.shape).astype(old.dtype)


def _set_quantized_bias(node: gs.Node, index: int, values: np.ndarray) -> bool:
    """Write a corrected bias into the quantized graph's layer; False if it cannot."""
    if index >= len(node.inputs):
        return False  # the layer had no bias: quantize again
    bias = node.inputs[index]
    if isinstance(bias, gs.Constant):
        _set(bias, values)
        return True
    producer = bias.inputs[0] if bias.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not all(
        isinstance(t, gs.Constant) for t in producer.inputs
    ):
        return False
    integers, scale = producer.inputs[0], np.asarray(producer.inputs[1].values, np.float64)
    info = np.iinfo(integers.values.dtype)
    _set(integers, np.clip(np.round(values / scale), info.min, info.max))
    return True


def _bias(node: gs.Node) -> gs.Constant:
    if len(node.inputs) > 2:
        return node.inputs[2]
    w = node.inputs[1].values
    channels = w.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else w.shape[1]
    bias = gs.Constant(f"{node.name}_bias", np.zeros(channels, dtype=w.dtype))
    node.inputs.append(bias)
    return bias
