"""Graph edits of weight-only quantization: AWQ's input scaling, and each layer's new form.

Input scaling (``X -> X / s`` in front of the layers that read ``X``) is folded backwards
when every step is exact, else it is an explicit float ``Mul``:

* into a LayerNormalization's ``gamma`` and ``beta`` (``LN(x) / s``);
* into the output columns (and bias) of a MatMul/Gemm layer whose output it is: blockwise
  quantization runs along ``K`` within each output column, so scaling a column scales its
  blocks' scales and nothing else rounds differently;
* through a bias ``Add`` with a constant (both the constant and the other input scaled);
* through ``Relu`` (``relu(x) / s = relu(x / s)`` for ``s > 0``);
* into a ``Mul`` by a constant.

Each tensor on the way must feed only that path. Layer forms:

* ``matmulnbits``: onnxruntime's ``com.microsoft.MatMulNBits`` (:mod:`.formats`);
* ``dq``: ``DequantizeLinear(axis=0, block_size)`` of INT4/UINT4 (INT8/UINT8) levels into a
  plain MatMul (opset 21), zero point only when asymmetric;
* ``float``: the dequantized weight as a float initializer (the model beside QNN encodings).

A Gemm becomes MatMul (+ ``Add`` of ``beta * C``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from qtool.weight_only.formats import BlockQuantized, integer_tensor, matmul_nbits_arrays, onnx_type
from qtool.weight_only.layers import Layer

MICROSOFT = "com.microsoft"


def scale_input(graph: gs.Graph, tensor: gs.Variable, group: Sequence[Layer],
                inverse: np.ndarray, layers_by_output: Mapping[str, Layer]) -> str:
    """Divide ``tensor`` by ``s`` for the layers of ``group`` (``inverse = 1 / s``).

    Returns:
        How it was done, for the report (``folded into LayerNormalization ln1``, ...).
    """
    group_nodes = {id(layer.node) for layer in group}
    actions: list[Callable[[], None]] = []
    where = None
    if (tensor not in graph.outputs and tensor.outputs
            and all(id(n) in group_nodes for n in tensor.outputs)):
        where = _fold(graph, tensor, inverse, layers_by_output, actions)
    if where is not None:
        for action in actions:
            action()
        return f"folded into {where}"
    scaled = gs.Variable(f"{tensor.name}_awq_scaled", dtype=np.float32)
    graph.nodes.append(gs.Node(
        "Mul", name=f"{tensor.name}_awq_Mul",
        inputs=[tensor, gs.Constant(f"{tensor.name}_awq_inverse_scale", inverse)],
        outputs=[scaled]))
    for layer in group:
        layer.node.inputs[0] = scaled
        layer.input = scaled
    return "an explicit Mul"


def _fold(graph, tensor, inverse, layers_by_output, actions) -> str | None:
    """Queue the edits that divide ``tensor`` by ``s`` at its producer; None if not exact."""
    if not tensor.inputs:
        return None
    producer = tensor.inputs[0]
    layer = layers_by_output.get(tensor.name)
    if layer is not None:
        def scale_layer():
            layer.weight = (layer.weight * inverse[None, :]).astype(np.float32)
            if layer.bias is not None:
                layer.bias = (np.broadcast_to(layer.bias, inverse.shape) * inverse).astype(
                    np.float32)
        actions.append(scale_layer)
        return f"{layer.node.op} {layer.name}"
    op = producer.op
    if op == "Relu":
        source = producer.inputs[0]
        if _single_use(graph, source, producer):
            return _fold(graph, source, inverse, layers_by_output, actions)
        return None
    if op == "LayerNormalization" and producer.attrs.get("axis", -1) in (-1, len(
            tensor.shape or ()) - 1):
        consts = [t for t in producer.inputs[1:] if t is not None and t.name]
        if all(isinstance(t, gs.Constant) for t in consts):
            for index in range(1, len(producer.inputs)):
                _queue_scaled_constant(producer, index, inverse, actions)
            return f"LayerNormalization {producer.name}"
        return None
    if op in ("Add", "Mul") and len(producer.inputs) == 2:
        consts = [i for i, t in enumerate(producer.inputs) if isinstance(t, gs.Constant)]
        if len(consts) != 1 or not _broadcasts(producer.inputs[consts[0]], inverse):
            return None
        _queue_scaled_constant(producer, consts[0], inverse, actions)
        if op == "Mul":
            return f"Mul {producer.name}"
        source = producer.inputs[1 - consts[0]]
        if not _single_use(graph, source, producer):
            return None
        inner = _fold(graph, source, inverse, layers_by_output, actions)
        return None if inner is None else f"{inner} and Add {producer.name}"
    return None


def _single_use(graph, tensor, consumer) -> bool:
    return (isinstance(tensor, gs.Variable) and tensor not in graph.outputs
            and len(tensor.outputs) == 1 and tensor.outputs[0] is consumer)


def _broadcasts(constant: gs.Constant, inverse: np.ndarray) -> bool:
    shape = np.shape(constant.values)
    return not shape or shape[-1] in (1, inverse.shape[0])


def _queue_scaled_constant(node, index, inverse, actions) -> None:
    old = node.inputs[index]

    def replace():
        values = (np.asarray(old.values, np.float32) * inverse).astype(np.float32)
        node.inputs[index] = gs.Constant(f"{old.name}_awq", values)
    actions.append(replace)


def replace_layer(graph: gs.Graph, layer: Layer, quantized: BlockQuantized, form: str) -> None:
    """Replace the layer's node by its weight-only form (see the module docstring)."""
    node, name = layer.node, layer.node.name
    output = node.outputs[0]
    node.outputs.clear()
    product = output if layer.bias is None else gs.Variable(f"{name}_matmul", dtype=np.float32)
    fmt = quantized.fmt
    rows, cols = quantized.levels.shape
    if form == "matmulnbits":
        arrays = matmul_nbits_arrays(quantized)
        inputs = [layer.input, gs.Constant(f"{name}_B_q{fmt.bits}", arrays["B"]),
                  gs.Constant(f"{name}_B_scales", arrays["scales"])]
        if "zero_points" in arrays:
            inputs.append(gs.Constant(f"{name}_B_zero_points", arrays["zero_points"]))
        graph.nodes.append(gs.Node(
            "MatMulNBits", name=f"{name}_MatMulNBits", domain=MICROSOFT, inputs=inputs,
            outputs=[product],
            attrs={"K": rows, "N": cols, "bits": fmt.bits, "block_size": fmt.block_size}))
    else:
        if form == "dq":
            weight = block_dequantize(graph, name, quantized)
        else:
            weight = gs.Constant(f"{name}_weight_dequantized", quantized.dequantize())
        graph.nodes.append(gs.Node("MatMul", name=name, inputs=[layer.input, weight],
                                   outputs=[product]))
    if layer.bias is not None:
        graph.nodes.append(gs.Node(
            "Add", name=f"{name}_bias", outputs=[output],
            inputs=[product, gs.Constant(f"{name}_bias_value", layer.bias)]))


def block_dequantize(graph: gs.Graph, name: str, quantized: BlockQuantized) -> gs.Variable:
    """``DequantizeLinear(levels, scale[, zero_point], axis=0, block_size)`` of a weight."""
    fmt = quantized.fmt
    data_type = onnx_type(fmt)
    inputs = [
        gs.Constant(f"{name}_weight_q{fmt.bits}",
                    LazyValues(integer_tensor(f"{name}_weight_q{fmt.bits}", quantized.levels,
                                              data_type))),
        gs.Constant(f"{name}_weight_scale", quantized.scale.astype(np.float32)),
    ]
    if not fmt.symmetric:
        inputs.append(gs.Constant(
            f"{name}_weight_zero_point",
            LazyValues(integer_tensor(f"{name}_weight_zero_point", quantized.zero_point,
                                      data_type))))
    weight = gs.Variable(f"{name}_weight_dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node(
        "DequantizeLinear", name=f"{name}_weight_DequantizeLinear", inputs=inputs,
        outputs=[weight], attrs={"axis": 0, "block_size": fmt.block_size}))
    return weight
