r"""Attention masks: which tensors a mask constant's values reach, and what stays float.

Transformers mask padding by adding a very negative number to the attention scores before
the Softmax. Exporters write it as a constant: the TorchScript exporter's
``Where(mask, 0, -inf)``, HF's ``masked_fill(mask, finfo(float32).min)`` (a ``Where`` that
reads ``-3.4e38``), the older ``(1 - mask) * finfo.min`` (a ``Mul``). Those values are no
data: a range that reaches them gives every real score the same code, and a range that
leaves them out saturates the mask to the smallest score, so the Softmax gives padding
weight. So:

* A *mask constant* is a float initializer, ``Constant`` or ``ConstantOfShape`` value that
  holds ``+-inf`` or a value of magnitude :data:`MASK_MAGNITUDE` or more.
* Its values flow forward through the :data:`CARRIERS` (elementwise arithmetic, ``Where``,
  casts and data movement); every tensor they reach is a *mask tensor*. Calibration accepts
  ``Inf`` in a mask tensor (the observers leave mask values out of every range) and refuses
  it anywhere else (an overflow).
* The carriers on a path from a mask constant to a ``Softmax``/``LogSoftmax``, and that
  Softmax, are kept float on every backend (:func:`qtool.sensitive_patterns.sensitive_nodes`):
  the masked scores reach the Softmax exactly as in float. So is the guard torch's
  ``scaled_dot_product_attention`` export puts after it, ``Where(IsNaN(p), 0, p)``: a row
  masked whole is NaN after the Softmax, and the guard, not an observer, turns it into
  zeros. A mask that reaches no Softmax
  (``-inf`` padding before a MaxPool) is quantized: its values saturate to the low end of the
  range, which a max ignores.

Only the main graph is walked (masks live there in every exporter's output).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Values at least this large in magnitude are mask values, not data (``finfo.min`` masks;
#: no real activation of a float32 model comes near).
MASK_MAGNITUDE = 1e30

#: Ops that carry a mask's values from their inputs to their outputs.
CARRIERS = frozenset({
    "Where", "Add", "Sub", "Mul", "Min", "Max", "Neg", "Cast", "CastLike", "Identity",
    "Expand", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Slice", "Concat",
    "Tile", "Gather", "Pad",
})
#: Ops whose input may hold a mask and whose output does not.
SOFTMAXES = frozenset({"Softmax", "LogSoftmax"})

REASON = ("attention mask (+-inf or finfo.min values) and the Softmax it feeds: kept float "
          "on every backend (a quantized mask saturates to the scores' range)")

#: A node as the walk sees it: ``(name, op, input names, output names)``.
NodeView = tuple[str, str, Sequence[str], Sequence[str]]


@dataclass(frozen=True)
class MaskFlow:
    """Where mask values go in a graph.

    Attributes:
        tensors: Every tensor that may hold mask values (the mask constants included).
        kept_float: ``{node name: reason}`` for the carriers between a mask constant and a
            Softmax, and that Softmax, in graph order.
    """

    tensors: frozenset[str] = frozenset()
    kept_float: dict[str, str] = field(default_factory=dict)


def holds_mask_values(array) -> bool:
    """Whether a constant's values include a mask value (``+-inf`` or ``|x| >= 1e30``)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return False
    return bool((np.abs(array) >= MASK_MAGNITUDE).any())


def mask_flow(nodes: Iterable[NodeView], seeds: Iterable[str]) -> MaskFlow:
    """Walk mask values forward from ``seeds`` (the mask constants) through the carriers.

    Args:
        nodes: The graph's nodes in topological order.
        seeds: Names of the tensors that hold mask constants.
    """
    nodes = list(nodes)
    tensors = set(seeds)
    if not tensors:
        return MaskFlow()
    producer: dict[str, NodeView] = {}
    softmaxes: list[NodeView] = []
    for node in nodes:
        _, op, inputs, outputs = node
        if not any(name in tensors for name in inputs):
            continue
        if op in CARRIERS:
            for name in outputs:
                if name:
                    tensors.add(name)
                    producer[name] = node
        elif op in SOFTMAXES:
            softmaxes.append(node)
    keep: set[str] = set()
    for softmax in softmaxes:
        keep.add(softmax[0])
        keep.update(_nan_guard(nodes, softmax[3][0]))
        stack = [name for name in softmax[2] if name in producer]
        while stack:
            name, _, inputs, _ = producer[stack.pop()]
            if name not in keep:
                keep.add(name)
                stack.extend(i for i in inputs if i in producer)
    kept = {node[0]: REASON for node in nodes if node[0] in keep}
    return MaskFlow(frozenset(tensors), kept)


def _nan_guard(nodes: Sequence[NodeView], probabilities: str) -> list[str]:
    """``IsNaN(p)`` and ``Where(IsNaN(p), c, p)`` after a masked Softmax's output ``p``."""
    checks = {outputs[0]: name for name, op, inputs, outputs in nodes
              if op == "IsNaN" and probabilities in inputs}
    guards = [name for name, op, inputs, _ in nodes
              if op == "Where" and probabilities in inputs and inputs[0] in checks]
    return [*checks.values(), *guards] if guards else []


def proto_mask_flow(graph) -> MaskFlow:
    """:func:`mask_flow` of an ``onnx.GraphProto`` (the calibration session's model).

    Only initializers a carrier reads are looked at, one at a time: the weights of a
    MatMul or Conv are never decoded.
    """
    from onnx import numpy_helper

    read_by_carriers = {name for node in graph.node if node.op_type in CARRIERS
                        for name in node.input}
    seeds = [t.name for t in graph.initializer
             if t.name in read_by_carriers and t.data_type in _FLOAT_TYPES
             and holds_mask_values(numpy_helper.to_array(t))]
    views = []
    for index, node in enumerate(graph.node):
        if node.op_type in ("Constant", "ConstantOfShape"):
            value = next((a for a in node.attribute if a.name in ("value", "value_float",
                                                                   "value_floats")), None)
            if value is not None and holds_mask_values(_attribute_array(value)):
                seeds += [name for name in node.output if name]
            continue
        views.append((node.name or f"#{index}", node.op_type, tuple(node.input),
                      tuple(node.output)))
    return mask_flow(views, seeds)


_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _attribute_array(attribute) -> np.ndarray:
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attribute)
    if hasattr(value, "data_type"):
        return numpy_helper.to_array(value) if value.data_type in _FLOAT_TYPES else np.zeros(0)
    return np.asarray(value, dtype=np.float64)
