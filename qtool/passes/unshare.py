"""The ``unshare_initializers`` pass: one bias (optionally one weight) per layer.

``cleanup`` merges identical initializers, and exporters share them too: every zero bias of
a freshly initialised or zero-bias network becomes one tensor read by all its layers. A pass
that edits a layer's bias per layer (cross-layer equalization scales it per channel,
high-bias absorption and bias correction add to it) must not change the other readers, so
those passes skipped every layer with a shared bias: CLE found "no Conv/Gemm pairs to
equalize" on a zero-bias network and bias correction corrected 0 layers of HF BERT exports.
This pass gives each reader its own copy first; the function is unchanged (the copies hold
the same values).

Which constants: the bias of Conv/ConvTranspose/Gemm (input 2) and the constant operand of
the Add after a ``MatMul`` with a constant weight (a Linear exported as MatMul + Add), and
with ``weights=True`` also the weights (input 1; MatMul's constant operand). Weights that a
model ties on purpose (an embedding shared with the output layer) stay shared by default.
Each reader gets a copy ``<name>_<node name>`` while others still read the tensor; the last
one keeps the original.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qtool.pipeline import note, register_pass

BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


@register_pass("unshare_initializers")
def unshare_initializers(graph: gs.Graph, *, weights: bool = False) -> gs.Graph:
    """Give every layer its own copy of a bias (and, with weights=True, a weight) it shares."""
    copies = unshare_layer_constants(graph, weights=weights)
    if copies:
        note(f"{copies} shared layer constants copied, one per layer")
    else:
        note("no shared layer constants", changed=False)
    return graph.cleanup().toposort()


def unshare_layer_constants(graph: gs.Graph, *, weights: bool = False) -> int:
    """Copy each shared layer bias (and weight, if asked) per reader, in place.

    Returns:
        The number of copies made.
    """
    taken = set(graph.tensors())
    copies = 0
    for node in graph.nodes:
        for holder, index in _layer_constants(node, weights):
            constant = holder.inputs[index]
            base = f"{constant.name}_{holder.name or holder.outputs[0].name}"
            name, suffix = base, 0
            while name in taken:
                suffix += 1
                name = f"{base}_{suffix}"
            taken.add(name)
            holder.inputs[index] = gs.Constant(name, constant.values.copy())
            copies += 1
    return copies


def _layer_constants(node: gs.Node, weights: bool) -> list[tuple[gs.Node, int]]:
    """``(node holding it, input index)`` of the constants of ``node``'s layer to unshare."""
    found = []
    if node.op in BIAS_OPS:
        if weights and len(node.inputs) > 1:
            found.append((node, 1))
        if len(node.inputs) > 2:
            found.append((node, 2))
    elif node.op == "MatMul" and len(node.inputs) == 2:
        weight = next((i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)),
                      None)
        if weight is None:
            return found
        if weights:
            found.append((node, weight))
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            found += [(add, i) for i, t in enumerate(add.inputs) if t is not out]
    return [(holder, i) for holder, i in found if isinstance(holder.inputs[i], gs.Constant)
            and len(holder.inputs[i].outputs) > 1]
