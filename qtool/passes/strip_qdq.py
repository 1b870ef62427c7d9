"""An input that is already quantized: refused, or (on request) stripped back to float.

Quantizing a model that already holds QuantizeLinear/DequantizeLinear pairs puts a second
quantizer on top of the first: the summary then compares the model with itself ("exact",
100 % agreement) and the engine gets two scales per tensor. So :func:`float_input` refuses
such a model unless ``requantize`` is asked for, and then strips it back to float first:

* an activation pair ``x -> Q -> DQ -> y`` becomes ``y = x`` (the float value before the
  quantizer);
* a weight ``DQ(const q, scale, zero point)`` becomes the constant ``(q - zp) * scale``
  (the dequantized weight, per axis where the scale is a vector): the float weights are
  gone, and these are the closest values the file holds; ``Q -> DQ`` of a float constant
  becomes the float constant itself.

QOperator models (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger,
DynamicQuantizeLinear, and onnxruntime's com.microsoft QLinear* ops, which loading already
refuses as an unknown domain) are always refused: each such op would have to be rewritten
back into its float op with the quantization parameters of its inputs and output folded
out, a rewrite per op type that cannot be checked against anything but the op itself; the
float model they came from is the input to give. So is a Q/DQ layout the stripping cannot
undo exactly (a DQ reading a graph input, a Q feeding anything but DQ, scales that are not
constants, blocked quantization).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import QuantizedInputError
from qtool.pipeline import note, register_pass

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: ONNX operators that compute in integers on quantized inputs (the QOperator format).
QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax",
    "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
})

_REQUANTIZE_HINT = ("give qtool the float model; or pass --requantize to strip the Q/DQ "
                    "pairs back to float (weights keep their quantized values) and quantize "
                    "again")


def quantized_ops(graph: gs.Graph) -> Counter:
    """Op type -> count of the Q/DQ and QOperator nodes in ``graph`` and its subgraphs."""
    found: Counter = Counter()
    for node in _nodes(graph):
        if node.op in QDQ_OPS or node.op in QOPERATOR_OPS:
            found[node.op] += 1
    return found


def float_input(graph: gs.Graph, *, requantize: bool = False) -> gs.Graph:
    """``graph`` when it holds no quantizer; stripped to float with ``requantize``.

    Raises:
        QuantizedInputError: The graph holds Q/DQ nodes (without ``requantize``), QOperator
            nodes (always), or Q/DQ nodes :func:`strip_qdq` cannot undo.
    """
    found = quantized_ops(graph)
    if not found:
        return graph
    shown = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
    qoperator = sorted(op for op in found if op in QOPERATOR_OPS)
    if qoperator:
        raise QuantizedInputError(
            f"the model is already quantized in the QOperator format ({shown}); qtool "
            "quantizes float models",
            "give qtool the float model the quantized one was made from (QOperator ops "
            "cannot be turned back into float ops exactly)",
        )
    if not requantize:
        raise QuantizedInputError(f"the model is already quantized ({shown})", _REQUANTIZE_HINT)
    stripped = strip_qdq(graph)
    warnings = list(getattr(graph, "load_warnings", ()))
    warnings.append(f"the input was already quantized ({shown}): --requantize stripped it "
                    "back to float (weights keep their quantized values) and quantized it "
                    "again; the comparison is against the input as given")
    stripped.load_warnings = warnings
    return stripped


@register_pass("strip_qdq")
def strip_qdq(graph: gs.Graph) -> gs.Graph:
    """Remove every Q/DQ pair of the main graph, leaving the float values they stood for.

    Raises:
        QuantizedInputError: A pair that cannot be undone exactly (see the module docstring),
            or a quantizer inside a subgraph.
    """
    inside = [n.op for g in _subgraphs(graph) for n in g.nodes if n.op in QDQ_OPS]
    if inside:
        raise _cannot(f"{len(inside)} Q/DQ node(s) inside If/Loop/Scan bodies")
    pairs = folded = 0
    for node in list(graph.nodes):
        if node.op != "DequantizeLinear":
            continue
        source = node.inputs[0]
        out = node.outputs[0]
        if isinstance(source, gs.Constant):
            _fold_to_constant(node, _dequantize(node, source.values))
            folded += 1
            continue
        producer = source.inputs[0] if source.inputs else None
        if producer is None or producer.op != "QuantizeLinear":
            raise _cannot(f"{node.name or out.name} dequantizes {source.name}, which no "
                          "QuantizeLinear produces")
        before = producer.inputs[0]
        if isinstance(before, gs.Constant):
            _fold_to_constant(node, np.asarray(before.values, dtype=np.float32))
            folded += 1
        else:
            node.op, node.attrs, node.inputs = "Identity", {}, [before]
            pairs += 1
    for node in graph.nodes:
        if node.op != "QuantizeLinear":
            continue
        integers = node.outputs[0]
        if integers in graph.outputs or any(c.op != "DequantizeLinear" for c in integers.outputs):
            raise _cannot(f"{node.name or node.outputs[0].name}: a QuantizeLinear whose "
                          "integers leave it for something other than a DequantizeLinear")
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    left = [n.op for n in graph.nodes if n.op in QDQ_OPS]
    if left:
        raise _cannot(f"{len(left)} Q/DQ node(s) left after stripping")
    note(f"{pairs} activation Q/DQ pairs and {folded} quantized constants back to float")
    return graph


def _dequantize(node: gs.Node, values: np.ndarray) -> np.ndarray:
    """``(q - zp) * scale``, per ``axis`` when the scale is a vector (ONNX DequantizeLinear)."""
    if node.attrs.get("block_size", 0):
        raise _cannot(f"{node.name}: blocked quantization (block_size)")
    scale = _constant(node, 1)
    zero_point = _constant(node, 2) if len(node.inputs) > 2 else np.zeros((), np.int64)
    q = np.asarray(values).astype(np.float64)
    scale, zero_point = scale.astype(np.float64), zero_point.astype(np.float64)
    if scale.ndim == 1 and scale.size > 1:
        axis = int(node.attrs.get("axis", 1)) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((q - zero_point) * scale).astype(np.float32)


def _constant(node: gs.Node, index: int) -> np.ndarray:
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        raise _cannot(f"{node.name}: its {('', 'scale', 'zero point')[index]} is not a constant")
    return np.asarray(tensor.values)


def _fold_to_constant(node: gs.Node, values: np.ndarray) -> None:
    """Make the DQ's output the constant ``values`` (its readers keep their input name)."""
    out = node.outputs[0]
    node.outputs.clear()
    out.to_constant(values)


def _cannot(what: str) -> QuantizedInputError:
    return QuantizedInputError(
        f"--requantize cannot strip this model back to float: {what}",
        "give qtool the float model the quantized one was made from",
    )


def _subgraphs(graph: gs.Graph):
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield value
                yield from _subgraphs(value)


def _nodes(graph: gs.Graph):
    yield from graph.nodes
    for sub in _subgraphs(graph):
        yield from sub.nodes


__all__ = ["QDQ_OPS", "QOPERATOR_OPS", "float_input", "quantized_ops", "strip_qdq"]
