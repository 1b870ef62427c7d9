"""The ``cleanup`` pass: make a freshly exported graph plain and canonical.

Steps, in order (each keeps the graph numerically the same):

1. ``Constant`` nodes become initializers. Some exporters keep every weight in a Constant node;
   a quantizer that does not see them as initializers cannot treat them as weights. The value
   keeps its exact dtype (``value_float`` is float32, ``value_int`` int64), which
   onnx-graphsurgeon's own lowering does not guarantee.
2. ``Identity`` and inference ``Dropout`` (mask output unused, ``training_mode`` absent or a
   constant false) are bypassed. When the removed tensor is a graph output, the producer is
   renamed onto it instead, so graph outputs keep their names.
3. ``Shape`` of a tensor whose shape is fully static *by fresh shape inference from the graph
   inputs* becomes a constant. Stale ``value_info`` left by exporters is ignored, so a symbolic
   (dynamic) batch dimension is never frozen into a constant.
4. Constant subgraphs are folded with onnx-graphsurgeon's ``fold_constants``, evaluated in
   onnxruntime in the tensors' own dtypes (no shape-cast elision, which would redo float
   arithmetic in integers; random ops are never folded; graph outputs stay node outputs).
5. Identical initializers (same dtype, shape and bytes) are merged into one.
6. Dead nodes and unused initializers are removed, and the graph is sorted topologically.

Initializers that an old exporter also listed as graph inputs are plain initializers after
import (onnx-graphsurgeon drops them from the inputs). Subgraphs of ``If``/``Loop``/``Scan``
are left as they are: no tensor a subgraph reads is renamed or merged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from qtool.pipeline import note, register_pass

log = logging.getLogger(__name__)

# Ops whose output is not a function of their inputs: folding them would freeze one draw.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli"}
)


@register_pass("cleanup")
def cleanup(graph: gs.Graph, *, fold_constants: bool = True) -> gs.Graph:
    """Lower Constant nodes, drop Identity/Dropout, fold constants, dedupe initializers.

    Args:
        graph: The graph, edited in place.
        fold_constants: Evaluate constant subgraphs (and static ``Shape`` nodes).

    Returns:
        The cleaned, topologically sorted graph.
    """
    from qtool.graph_walk import all_graphs

    nodes_before = len(graph.nodes)
    lowered = lower_constant_nodes(graph)
    # weights in If/Loop/Scan bodies too (silero-vad's Convs read Constant nodes there)
    in_bodies = sum(lower_constant_nodes(body) for body in all_graphs(graph)[1:])
    bypassed = bypass_identities(graph)
    graph.cleanup().toposort()
    dead = nodes_before - lowered - sum(bypassed.values()) - len(graph.nodes)
    lowered += in_bodies
    folded_shapes = folded_nodes = 0
    if fold_constants:
        graph = infer_shapes(graph)
        folded_shapes = fold_static_shapes(graph)
        graph.cleanup().toposort()
        count = len(graph.nodes)
        # graphsurgeon prints its warnings (a partition onnxruntime cannot evaluate stays as
        # it is); qtool only logs, so keep them quiet.
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):
            graph.fold_constants(
                fold_shapes=False,
                recurse_subgraphs=False,
                flatten_subgraphs=False,
                partitioning="recursive",
                should_exclude_node=lambda node: node.op in NONDETERMINISTIC_OPS
                or any(out in graph.outputs for out in node.outputs),
            )
        restore_constant_outputs(graph)
        graph.cleanup().toposort()
        folded_nodes = count - len(graph.nodes)
    merged = dedupe_initializers(graph)
    graph.cleanup().toposort()
    parts = [
        (lowered, "Constant nodes made initializers"),
        *[(n, f"{op} removed") for op, n in sorted(bypassed.items())],
        (folded_shapes, "static Shape nodes folded"),
        (folded_nodes, "constant nodes folded"),
        (merged, "duplicate initializers merged"),
        (dead, "dead nodes removed"),
    ]
    said = [f"{n} {what}" for n, what in parts if n > 0]
    if said:
        note(", ".join(said))
    return graph


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """A copy of ``graph`` with shapes and dtypes re-inferred from its inputs.

    Existing ``value_info`` is dropped first, so stale shapes an exporter left behind (a traced
    batch size) cannot override the symbolic dims of the inputs. Returns ``graph`` itself when
    inference fails, or for a model over 2 GB (:func:`qtool.io.is_large`).
    """
    from qtool.io import is_large, to_model

    if is_large(graph):
        return graph  # one protobuf cannot hold it: a copy would only double the memory
    try:
        model = to_model(graph)
        model.graph.ClearField("value_info")
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        return gs.import_onnx(inferred)
    except Exception as exc:  # inference is best effort; the graph stays usable without it
        log.debug("shape inference failed: %s", exc)
        return graph


def lower_constant_nodes(graph: gs.Graph) -> int:
    """Turn the ``Constant`` nodes of ``graph`` (not of its bodies) into initializers.

    Each keeps its exact dtype; ``cleanup`` calls this on the main graph and on each body.

    Returns:
        How many Constant nodes were lowered.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.attrs) != 1 or len(node.outputs) != 1:
            continue
        values = _constant_node_value(node)
        if values is None:
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            # An output stays a node output; give it the exact dtype in a `value` tensor.
            node.attrs = {"value": gs.Constant(f"{out.name}_value", values)}
            continue
        node.outputs.clear()
        out.to_constant(values)
        count += 1
    return count


def restore_constant_outputs(graph: gs.Graph) -> None:
    """Graph outputs that folding turned into constants become ``Constant`` node outputs again.

    A graph output should be produced by a node; an initializer listed as an output is not
    accepted by every runtime.
    """
    for i, out in enumerate(graph.outputs):
        if not isinstance(out, gs.Constant):
            continue
        name, values = out.name, out.values
        out.name = f"{name}_value"  # the value itself, still read by any other consumer
        var = gs.Variable(name, dtype=values.dtype, shape=list(values.shape))
        graph.nodes.append(gs.Node("Constant", attrs={"value": out}, outputs=[var]))
        graph.outputs[i] = var


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    (attr, value), = node.attrs.items()
    if isinstance(value, gs.Node.AttributeRef):
        return None
    if attr == "value" and isinstance(value, gs.Constant):
        return value.values
    if attr == "value_float":
        return np.array(value, dtype=np.float32)
    if attr == "value_floats":
        return np.array(value, dtype=np.float32).reshape(-1)
    if attr == "value_int":
        return np.array(value, dtype=np.int64)
    if attr == "value_ints":
        return np.array(value, dtype=np.int64).reshape(-1)
    return None  # strings and sparse values stay as nodes


def bypass_identities(graph: gs.Graph) -> dict[str, int]:
    """Remove ``Identity`` and inference ``Dropout`` nodes, keeping graph output names.

    Returns:
        Number of nodes removed per op type.
    """
    in_subgraphs = subgraph_nodes(graph)
    removed: dict[str, int] = {}
    for node in list(graph.nodes):
        if node.op == "Identity" or (node.op == "Dropout" and _is_inference_dropout(node)):
            if _bypass(graph, node, in_subgraphs):
                removed[node.op] = removed.get(node.op, 0) + 1
    return removed


def _is_inference_dropout(node: gs.Node) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False  # the mask is used
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant) or bool(np.any(mode.values)):
            return False
    return True


def _bypass(graph: gs.Graph, node: gs.Node, in_subgraphs: set[int]) -> bool:
    src, dst = node.inputs[0], node.outputs[0]
    if id(node) in in_subgraphs or any(id(c) in in_subgraphs for c in dst.outputs):
        return False
    if dst in graph.outputs:
        # Rename the producer's output onto the graph output, when src is a private tensor.
        producer_owned = len(src.inputs) == 1 and not isinstance(src, gs.Constant)
        if not producer_owned or src in graph.outputs or src in graph.inputs:
            return False
        if any(id(c) in in_subgraphs for c in src.outputs):
            return False
        producer = src.inputs[0]
        for consumer in list(src.outputs):
            if consumer is node:
                continue
            _replace_inputs(consumer, src, dst)
        node.inputs.clear()
        node.outputs.clear()
        producer.outputs[producer.outputs.index(src)] = dst
        return True
    for consumer in list(dst.outputs):
        _replace_inputs(consumer, dst, src)
    node.inputs.clear()
    node.outputs.clear()
    return True


def _replace_inputs(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def subgraph_nodes(graph: gs.Graph) -> set[int]:
    """``id()`` of every node inside a subgraph (If/Loop/Scan bodies), recursively."""
    found: set[int] = set()

    def visit(g: gs.Graph) -> None:
        for sub in g.subgraphs():
            for node in sub.nodes:
                found.add(id(node))
            visit(sub)

    visit(graph)
    return found


def fold_static_shapes(graph: gs.Graph) -> int:
    """Replace ``Shape`` nodes whose input shape is fully static by int64 constants.

    The graph's shapes must come from :func:`infer_shapes`, so dynamic dims stay symbolic.

    Returns:
        How many Shape nodes were folded.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "Shape":
            continue
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        rank = len(shape)
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end", rank)
        values = np.array(shape, dtype=np.int64)[slice(start, end)]
        node.outputs.clear()
        out.to_constant(values)
        count += 1
    return count


def dedupe_initializers(graph: gs.Graph) -> int:
    """Point every user of a duplicate initializer (same dtype, shape, bytes) at the first one.

    Graph outputs and tensors read inside subgraphs are left alone.

    Returns:
        How many initializers were merged away.
    """
    in_subgraphs = subgraph_nodes(graph)
    keep: dict[tuple, gs.Constant] = {}
    merged = 0
    for tensor in _constants_in_order(graph):
        if tensor in graph.outputs or any(id(c) in in_subgraphs for c in tensor.outputs):
            continue
        # np.asarray, not np.ascontiguousarray: the latter makes a 0-d scalar 1-d, and a
        # scalar 0 would then merge with a [0] (a Slice end must stay 1-d, a Concat axis 0-d).
        values = np.asarray(tensor.values)
        data = np.ascontiguousarray(values).tobytes()
        key = (str(values.dtype), values.shape, hashlib.sha256(data).hexdigest())
        first = keep.setdefault(key, tensor)
        if first is tensor or np.ascontiguousarray(first.values).tobytes() != data:
            continue
        for consumer in list(tensor.outputs):
            _replace_inputs(consumer, tensor, first)
        merged += 1
    return merged


def _constants_in_order(graph: gs.Graph) -> Iterable[gs.Constant]:
    seen: set[int] = set()
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor
