"""The MatMul/Gemm layers whose weights weight-only quantization takes, and why others stay.

A layer is a MatMul with a constant 2-D ``B`` ``[K, N]``, or a Gemm with ``transA = 0`` and a
constant ``B`` (``transB`` undone, ``alpha`` folded into the weight, ``beta * C`` kept as a
float bias), whose ``K`` is a multiple of the block size. Each layer owns a copy of its
weight: a shared initializer is quantized once per consumer, each on its own input's data.
Only the main graph is searched (not If/Loop/Scan bodies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Layer:
    """One weight-only layer.

    Attributes:
        node: The MatMul or Gemm node.
        input: Its activation input tensor.
        weight: float32 ``[K, N]`` (Gemm: ``alpha * B``, transposed when ``transB``).
        bias: float32 ``[N]``-broadcastable ``beta * C`` of a Gemm, else None.
    """

    node: gs.Node
    input: gs.Variable
    weight: np.ndarray
    bias: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The node's name."""
        return self.node.name

    @property
    def channels(self) -> int:
        """``K``: input channels of the weight."""
        return self.weight.shape[0]


def find_layers(graph: gs.Graph, block_size: int) -> tuple[list[Layer], dict[str, str]]:
    """``(layers, {node name: why it stays float})`` for the MatMul/Gemm nodes of ``graph``."""
    layers, kept = [], {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm"):
            continue
        reason, layer = _layer(node)
        if layer is not None and layer.channels % block_size:
            reason = (f"K = {layer.channels} input channels is not a multiple of the block "
                      f"size {block_size}")
        if reason:
            kept[node.name] = reason
        else:
            layers.append(layer)
    return layers, kept


def _layer(node: gs.Node) -> tuple[str, Layer | None]:
    a, b = node.inputs[0], node.inputs[1]
    if isinstance(a, gs.Constant):
        return "the activation input is a constant", None
    if not isinstance(b, gs.Constant):
        return "the weight is not a constant", None
    weight = np.asarray(b.values)
    if weight.dtype != np.float32:
        return f"the weight is {weight.dtype}, not float32", None
    if weight.ndim != 2:
        return f"the weight has rank {weight.ndim}, not 2", None
    if node.op == "MatMul":
        return "", Layer(node, a, weight.astype(np.float32))
    attrs = node.attrs
    if attrs.get("transA", 0):
        return "Gemm with transA = 1", None
    weight = weight.T if attrs.get("transB", 0) else weight
    weight = (float(attrs.get("alpha", 1.0)) * weight).astype(np.float32)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        c = node.inputs[2]
        if not isinstance(c, gs.Constant):
            return "the Gemm's C input is not a constant", None
        bias = (float(attrs.get("beta", 1.0)) * np.asarray(c.values, np.float32)).astype(
            np.float32)
    return "", Layer(node, a, weight, bias)
