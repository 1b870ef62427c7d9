r"""Numerically sensitive patterns: the nodes every backend keeps float by default.

Some float computations lose everything when their inputs are rounded to 8 bits, whatever
the engine (onnxruntime's and NNCF's quantizers ignore the same patterns):

* **Variance before a root or a division.** LayerNorm exported at opset < 17 is
  ``d = x - mean(x); v = mean(d^2); y = d / sqrt(v + eps)``, and many models compute the
  variance as ``E[x^2] - E[x]^2``: the two operands of that ``Sub`` are nearly equal, so
  rounding each to one of 256 levels cancels the variance to zero (or below: then
  ``Max(v, 0)`` gives 0 and ``Rsqrt`` explodes). Power spectra ``re^2 + im^2`` before a
  ``Sqrt`` have the same shape.
* **Centering.** ``x - mean(x)`` (the first step of a decomposed LayerNorm): when the mean
  is large against the spread, rounding ``x`` and its mean to one scale each leaves little of
  the difference.
* **Roots, reciprocals and powers.** ``Sqrt``, ``Reciprocal``, ``Pow`` and a ``Div`` by a
  computed tensor amplify the relative error of small inputs without bound (``1/x`` near 0).
  A ``Div`` by a constant is a scale and stays as the backend plans it.
* **Exponentials.** ``Exp`` (a decomposed Softmax) turns an absolute input error ``e`` into
  a relative output error ``e^e - 1``, and ``Log`` the other way round.
* **Attention masks.** ``+-inf`` or ``finfo.min`` added to the scores before a Softmax
  (:mod:`qtool.masks`): any 8-bit range either rounds the scores to nothing or saturates the
  mask to the scores' range.
* **GELU's cubic term.** ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``: ``x^3`` spans
  the cube of the input range, so one scale for it rounds the term to zero where it matters.

The rules, applied by :func:`sensitive_nodes` and the planner:

1. *Sinks* are kept float: ``Sqrt``, ``Reciprocal``, ``Exp``, ``Log``, ``Pow`` and ``Div``
   with a computed denominator.
2. From the input of a root, reciprocal or logarithm and from a ``Div``'s denominator, the
   walk goes upstream through the ops a variance or a norm is made of (``Add``, ``Sub``,
   ``Max``, ``Clip``, ``Relu``, ``Abs``, reductions, ``Mul``/``Div`` by a constant) and keeps
   them float, up to and including the squares (``Pow(a, 2)``, ``Mul(a, a)``; ``Abs`` in
   an L1 norm and ``Exp`` in a Softmax's sum count as squares), where it stops: both
   operands of ``E[x^2] - E[x]^2`` and of ``re^2 + im^2`` stay float. Only nodes on a
   path that reaches a square are kept: a denominator that leads through ``Add``/``Relu``
   to a Conv without a square is no variance, and its residual trunk stays quantized.
3. ``Sub(x, ReduceMean(x))`` is kept float.
4. From a cube (``Pow(x, 3)`` or ``Mul(x, Mul(x, x))``) the walk goes downstream through
   ``Mul`` by a constant to the ``Add`` that joins it back with ``x``, and keeps those float.
5. From a root of a variance (rule 2 reached a square), the walk goes downstream through
   ``Reciprocal``/``Sqrt`` and ``Mul`` by a constant (LayerNorm's gamma) to the ``Mul`` that
   applies the normalizer to the centered tensor, and keeps those float: ``1/sqrt(var)``
   spans orders of magnitude over the data (a constant row has variance 0, so ``1/sqrt(eps)``
   is huge), and one 8-bit scale for it rounds every typical value to zero (magika's
   LayerNorm on tvm: -18 dB at its Rsqrt, 0 % top-1 agreement).
6. What carries an attention mask's values from its constant to a Softmax, and that
   Softmax, is kept float (:func:`mask_nodes`).

A node kept float reads float inputs; other consumers of the same tensors are quantized as
the backend's rules say. The plan lists every such node with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from qtool.masks import CARRIERS, holds_mask_values, mask_flow

#: Ops that are kept float wherever they read a computed input, and why.
SINKS = {
    "Sqrt": "square root",
    "Reciprocal": "reciprocal",
    "Pow": "power",
    "Div": "division by a computed tensor",
    "Exp": "exponential (Softmax internals)",
    "Log": "logarithm",
}

#: Ops a variance, a norm or a power spectrum is computed with (walked upstream of a sink).
VARIANCE_OPS = frozenset({
    "Add", "Sub", "Max", "Min", "Clip", "Relu", "Abs", "Neg", "Mul", "Div",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "Identity",
    # data movement between the reduction and the root (tf2onnx's BroadcastTo, keepdims
    # emulated with Reshape): walked through by their data input
    "Reshape", "Expand", "Squeeze", "Unsqueeze", "Transpose", "Flatten",
})

#: Sinks whose input is walked upstream (a root, a reciprocal, a logarithm of a variance).
ROOTS = frozenset({"Sqrt", "Reciprocal", "Log"})
#: Ops whose first input is the data and the others shapes or axes.
DATA_MOVEMENT = frozenset({"Reshape", "Expand", "Squeeze", "Unsqueeze", "Transpose",
                           "Flatten"})

#: Ops whose outputs are non-negative like a square's: sums of them are norms too (L1, the
#: sum of a Softmax's exponentials), so the variance walk keeps the path down to them.
NON_NEGATIVE = frozenset({"Abs", "Exp"})

REASON = "numerically sensitive ({what}): kept float on every backend"


def sensitive_nodes(graph: gs.Graph) -> dict[str, str]:
    """The nodes of ``graph`` to keep float, by name, with the reason.

    Args:
        graph: A graph whose nodes have unique names (``qtool.planner.name_nodes``).

    Returns:
        ``{node name: reason}`` in graph order.
    """
    found: dict[str, str] = {}

    def keep(node: gs.Node, what: str) -> bool:
        if node.name in found:
            return False
        found[node.name] = REASON.format(what=what)
        return True

    for node in graph.nodes:
        if node.op not in SINKS:
            continue
        if node.op == "Div":
            if len(node.inputs) < 2 or _is_constant(node.inputs[1]):
                continue
            keep(node, SINKS["Div"])
            _walk_variance(node.inputs[1], keep)
        elif node.op == "Pow":
            if not node.inputs or _is_constant(node.inputs[0]):
                continue
            exponent = _constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if exponent is not None and exponent.size == 1 and float(exponent) == 3.0:
                keep(node, "GELU's cubic term")
                _walk_cubic(node, keep)
            else:
                keep(node, SINKS["Pow"])
                if (exponent is not None and exponent.size == 1 and float(exponent) < 1.0
                        and _walk_variance(node.inputs[0], keep)):  # a root as a Pow
                    _walk_normalizer(node, keep)
        elif node.inputs and not _is_constant(node.inputs[0]):
            keep(node, SINKS[node.op])
            if node.op in ROOTS and _walk_variance(node.inputs[0], keep):
                _walk_normalizer(node, keep)
    for node in graph.nodes:
        if node.op == "Mul" and node.name not in found and _is_cube(node):
            keep(node, "GELU's cubic term")
            _walk_cubic(node, keep)
        elif node.op == "Sub" and _is_centering(node):
            keep(node, "centering x - mean(x)")
    for name, reason in mask_nodes(graph).items():
        found.setdefault(name, reason)
    return found


def mask_nodes(graph: gs.Graph) -> dict[str, str]:
    """The nodes between an attention mask's constant and its Softmax (rule 6), with why."""
    seeds = []
    views = []
    for node in graph.nodes:
        if node.op in ("Constant", "ConstantOfShape"):
            value = node.attrs.get("value")
            if value is not None and holds_mask_values(
                    value.values if isinstance(value, gs.Constant) else value):
                seeds += [t.name for t in node.outputs]
            continue
        if node.op in CARRIERS:  # the weights of a MatMul or Conv are never decoded
            seeds += [t.name for t in node.inputs
                      if isinstance(t, gs.Constant) and holds_mask_values(t.values)]
        views.append((node.name, node.op, [t.name for t in node.inputs],
                      [t.name for t in node.outputs]))
    return mask_flow(views, seeds).kept_float


def _is_centering(node: gs.Node) -> bool:
    """``Sub(x, ReduceMean(x))``."""
    if len(node.inputs) != 2:
        return False
    mean = _producer(node.inputs[1])
    return mean is not None and mean.op == "ReduceMean" and mean.inputs[0] is node.inputs[0]


def _walk_variance(tensor: gs.Tensor, keep) -> bool:
    """Keep float what computes ``tensor`` from squares (rule 2 of the module docstring).

    The walk first explores upstream through :data:`VARIANCE_OPS` and only then keeps the
    nodes that lie on a path from ``tensor`` to a square (or to :data:`NON_NEGATIVE` ops):
    a residual trunk of ``Add``/``Relu`` that a norm's denominator happens to pass through
    on its way to a Conv is not part of a variance and stays quantized.

    Returns:
        Whether the walk reached a square (``tensor`` is a variance or a norm).
    """
    upstream: dict[str, list[gs.Node]] = {}  # explored node -> its explored producers
    nodes: dict[str, gs.Node] = {}
    terminals: set[str] = set()
    start = _producer(tensor)
    stack = [start] if start is not None else []
    while stack:
        node = stack.pop()
        if node.name in nodes:
            continue
        nodes[node.name] = node
        upstream[node.name] = []
        if _is_square(node):
            terminals.add(node.name)
            continue
        if not _walks_through(node):
            continue
        for t in _data_inputs(node):
            producer = _producer(t)
            if producer is not None and not _is_constant(t):
                upstream[node.name].append(producer)
                stack.append(producer)
    reaches: dict[str, bool] = {}

    def reaches_square(name: str) -> bool:
        # iterative post-order: residual trunks can be deeper than Python's recursion limit
        pending = [name]
        while pending:
            current = pending[-1]
            if current in reaches:
                pending.pop()
                continue
            if current in terminals:
                reaches[current] = True
                pending.pop()
                continue
            todo = [p.name for p in upstream[current] if p.name not in reaches]
            if todo:
                pending.extend(todo)
                continue
            # |a| and e^a are non-negative like a square: an L1 norm, Softmax's sum
            reaches[current] = (nodes[current].op in NON_NEGATIVE
                                or (_walks_through(nodes[current])
                                    and any(reaches[p.name] for p in upstream[current])))
            pending.pop()
        return reaches[name]

    if start is None or not reaches_square(start.name):
        return False
    for name in nodes:
        reaches_square(name)
    for name, node in nodes.items():  # exploration order: from the sink upstream
        if name in terminals:
            keep(node, "square inside a variance before a root or division")
        elif reaches.get(name):
            keep(node, "variance before a root or division (LayerNorm, E[x^2] - E[x]^2, "
                       "power spectrum)")
    return True


def _walks_through(node: gs.Node) -> bool:
    """Whether the variance walk continues upstream through ``node``."""
    if node.op not in VARIANCE_OPS and node.op not in ROOTS:
        return False
    if node.op == "Mul" and not any(_is_constant(t) for t in node.inputs):
        return False  # a product of two computed tensors (not a square): not a variance
    if node.op == "Div" and not _is_constant(node.inputs[1]):
        return False  # a sink of its own
    return True


def _walk_normalizer(root: gs.Node, keep) -> None:
    """Keep float what applies ``1/sqrt(variance)`` to its tensor (rule 5)."""
    what = "normalizer 1/sqrt(variance) and where it is applied (LayerNorm)"
    stack = [root]
    for _ in range(16):  # a LayerNorm's tail is a few nodes long
        if not stack:
            return
        node = stack.pop()
        for output in node.outputs:
            for user in output.outputs:
                if user.op in ("Reciprocal", "Sqrt"):
                    keep(user, what)
                    stack.append(user)
                elif user.op == "Mul":
                    keep(user, what)
                    if any(_is_constant(t) for t in user.inputs):
                        stack.append(user)  # times gamma: still the normalizer


def _walk_cubic(node: gs.Node, keep) -> None:
    """Keep float the Mul-by-constant chain after a cube up to its Add (rule 3)."""
    current = node
    for _ in range(4):
        if len(current.outputs) != 1 or len(current.outputs[0].outputs) != 1:
            return
        current = current.outputs[0].outputs[0]
        if current.op == "Mul" and any(_is_constant(t) for t in current.inputs):
            keep(current, "GELU's cubic term")
        elif current.op == "Add":
            keep(current, "GELU's cubic term")
            return
        else:
            return


def _is_square(node: gs.Node) -> bool:
    if node.op == "Mul" and len(node.inputs) == 2:
        return node.inputs[0] is node.inputs[1] and not _is_constant(node.inputs[0])
    if node.op == "Pow" and len(node.inputs) == 2:
        exponent = _constant_value(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent) == 2.0
    return node.op == "ReduceSumSquare"


def _is_cube(node: gs.Node) -> bool:
    """``Mul(x, Mul(x, x))`` or ``Mul(Mul(x, x), x)``."""
    if len(node.inputs) != 2:
        return False
    for a, b in (node.inputs, node.inputs[::-1]):
        inner = _producer(b)
        if inner is not None and inner.op == "Mul" and _is_square(inner) and inner.inputs[0] is a:
            return True
    return False


def _data_inputs(node: gs.Node) -> Iterator[gs.Tensor]:
    """Inputs that carry values (not the axes of a reduction or the bounds of a Clip)."""
    if node.op.startswith("Reduce") or node.op in DATA_MOVEMENT:
        return iter(node.inputs[:1])
    if node.op == "Clip":
        return iter(node.inputs[:1])
    return iter(node.inputs)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _is_constant(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    node = _producer(tensor)
    return node is not None and node.op == "Constant"


def _constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None
