"""Graph edits: the layers to correct, where their biases live, how a bias is rewritten."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

LAYERS = frozenset({"Conv", "Gemm"})  # and MatMul followed by an Add of a constant

def stages(graph: gs.Graph, targets: list[Target]) -> list[list[Target]]:
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
    added: bool = False

    @property
    def output(self) -> str:
        """The tensor whose mean is corrected."""
        return self.holder.outputs[0].name

    def bias_added(self) -> bool:
        """The layer had no bias: a zero one was made for it."""
        return self.added

    def bias(self) -> gs.Constant:
        """The bias constant."""
        return self.holder.inputs[self.index]

    def add(self, delta: np.ndarray) -> np.ndarray:
        """Add ``delta`` to the bias (in the float graph); returns the new bias, flat."""
        bias = self.bias()
        corrected = np.asarray(bias.values, dtype=np.float64).reshape(-1) + delta
        set_values(bias, corrected)
        return corrected


def target_of(node: gs.Node, quantized_weights: set[str]) -> tuple[Target | None, str | None]:
    """The node as a layer to correct, or None and why not (None: not a weighted layer)."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None, None
    if node.inputs[1].name not in quantized_weights:
        return None, None
    if node.op in LAYERS:
        why = bias_problem(node)
        if why:
            return None, why
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        added = len(node.inputs) < 3
        width = channels(node)
        if added:
            node.inputs.append(gs.Constant(f"{node.name}_bias",
                                           np.zeros(width, node.inputs[1].values.dtype)))
        elif node.inputs[2].values.size != width:  # Gemm's broadcast C: one value
            old = node.inputs[2]
            node.inputs[2] = gs.Constant(old.name, np.broadcast_to(
                old.values.reshape(-1), (width,)).astype(old.values.dtype))
        return Target(node, node, 2, 1, beta, added), None
    if node.op != "MatMul" or node.inputs[1].values.ndim != 2 or len(node.outputs[0].outputs) != 1:
        return None, None
    add = node.outputs[0].outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None, "no Add of a constant after it"
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    bias = add.inputs[index]
    width = node.inputs[1].values.shape[1]
    if not isinstance(bias, gs.Constant):
        return None, "its Add's other input is not a constant"
    if len(bias.outputs) != 1:
        return None, f"its bias {bias.name} is shared with other nodes"
    if bias.values.size != width or bias.values.shape[-1:] != (width,):
        return None, f"its bias {bias.name} has shape {list(bias.values.shape)}"
    return Target(node, add, index, -1), None


def channels(node: gs.Node) -> int:
    """The layer's output channels (its weight's output axis)."""
    w = node.inputs[1].values
    return w.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else w.shape[1]


def bias_problem(node: gs.Node) -> str | None:
    """Why the layer's bias cannot be corrected, or None.

    Correctable: a 1-D constant bias read only by the layer, a single broadcast value, or
    none (one is then added).
    """
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 0.0:
        return "Gemm with beta 0"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    if len(node.inputs) > 2:
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant):
            return "its bias is not a constant"
        if len(bias.outputs) != 1:
            # cleanup merges identical initializers; one value cannot serve two corrections
            return f"its bias {bias.name} is shared with other layers"
        if bias.values.size not in (1, channels(node)) or bias.values.size != max(
                bias.values.shape, default=1):
            return f"its bias has shape {list(bias.values.shape)}"
    return None


def set_values(constant: gs.Constant, values: np.ndarray) -> None:
    """Write ``values`` into ``constant``, keeping its shape and dtype."""
    old = np.asarray(constant.values)
    constant.values = np.asarray(values).reshape(old.shape).astype(old.dtype)


def set_quantized_bias(node: gs.Node, index: int, values: np.ndarray) -> bool:
    """Write a corrected bias into the quantized graph's layer; False if it cannot."""
    if index >= len(node.inputs):
        return False
    bias = node.inputs[index]
    if isinstance(bias, gs.Constant):
        set_values(bias, values)
        return True
    producer = bias.inputs[0] if bias.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not all(
        isinstance(t, gs.Constant) for t in producer.inputs
    ):
        return False
    integers, scale = producer.inputs[0], np.asarray(producer.inputs[1].values, np.float64)
    info = np.iinfo(integers.values.dtype)
    set_values(integers, np.clip(np.round(values / scale), info.min, info.max))
    return True
def plan_biases(plan, backend, targets: list[Target]):
    """``plan`` with an int32 entry for each layer's added bias, as the planner plans one.

    Only where the backend adds biases in the accumulator and the layer's input and weight
    are quantized.
    """
    import dataclasses

    from qtool.plan import TensorPlan
    from qtool.scheme import QuantScheme

    if backend.bias_mode != "int32" or not targets:
        return plan
    tensors = dict(plan.tensors)
    added = {}
    for target in targets:
        layer = target.layer
        data, weight = layer.inputs[0].name, layer.inputs[1].name
        entry = tensors.get(data)
        if entry is None or entry.role != "activation" or layer.name not in entry.consumers:
            continue
        bias = target.bias()
        added.setdefault(weight, []).append(TensorPlan(
            bias.name, "bias",
            QuantScheme(bits=32, signed=True, symmetric=True,
                        per_channel_axis=0 if tensors[weight].scheme.per_channel else None),
            (layer.name,), bias_inputs=(data, weight)))
    ordered = {}
    for name, entry in tensors.items():  # each bias right after its weight (graph order)
        ordered[name] = entry
        for bias in added.get(name, ()):
            ordered[bias.tensor] = bias
    return dataclasses.replace(plan, tensors=ordered)


def has_bodies(graph: gs.Graph) -> bool:
    """Whether a node holds a subgraph (If, Loop, Scan)."""
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(
        v[0], gs.Graph)) for n in graph.nodes for v in n.attrs.values())


