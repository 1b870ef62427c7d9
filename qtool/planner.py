"""Build a :class:`qtool.plan.QuantPlan` from a float graph and a backend's rules.

Three steps, each a plain walk over the graph:

1. **Shape and index tensors are never quantized.** A tensor is a shape tensor if
   (a) it feeds a shape/index input (the shape of Reshape/Expand/ConstantOfShape/Tile, every
   input of Range, Slice starts/ends/axes/steps, Resize roi/scales/sizes, Gather indices, TopK
   k, ... see :data:`SHAPE_INPUTS`); or (b) every value-reading consumer of it is on the shape
   path (walking back from (a): the computation that produced a Range step, even when it
   starts from a float feature map, stops where a tensor also feeds real data consumers); or
   (c) it is the output of Shape/Size, or of a node all of whose non-constant inputs are shape
   tensors (what is computed from shapes) and that reads no float constant at a data input
   (an embedding Gather of a float table by token ids is data, not a shape). Rules (a)-(c)
   run to a fixed point. Shape/Size read no values, so their input edges count for neither
   side. Integer tensors are never quantized either.
2. **Placement** walks the main graph and every If/Loop/Scan body (a body's nodes are
   planned like the main graph's; the state a Loop/Scan carries between iterations is never
   quantized) and follows ``backend.placement`` (MQBench Fig. 4): weighted ops get their
   activation inputs and their constant weight quantized (a per-channel weight's axis is Conv 0,
   ConvTranspose 1, Gemm 0 if ``transB`` else 1, MatMul the last), ``activation_ops`` get
   every activation input quantized, ``shortcut_ops`` (TensorRT's residual Add) every input
   except the branch fused into its producer: walking the inputs from last to first, the
   first produced by a fusable op and read by nothing else (MQBench's choice). Where the
   backend wants an int32 bias, a Conv/ConvTranspose/Gemm bias whose input and weight are both
   quantized gets one. Every other compute node goes to ``float_nodes`` with its reason.
   The converter placement (``placement.quantize_outputs``: SNPE/QNN, as AIMET's QuantSim)
   instead quantizes the graph inputs and every activation output (all readers take the
   quantized value), except data-movement outputs and an output read only by a fused
   activation; nothing is float there (see :func:`_converter_activations`).
   The numerically sensitive nodes of :mod:`qtool.sensitive_patterns` (variance
   decompositions, roots, reciprocals, Exp, GELU's cube) stay float on every backend.
3. **Sharing** is one union-find over tensors: a sharing op (Concat) joins its inputs and
   output; a pass-through op (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool, Slice,
   Split, Pad, Resize nearest) joins its data input and outputs. Quantized activations with
   one root share one scale (a group of two or more gets an id).

Node names are the plan's handles: unnamed or duplicate node names are replaced in the given
graph by ``<op>_<index>`` before planning (the same renaming quantize() applies).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import PlanError
from qtool.graph_walk import (  # noqa: F401  (also read from here)
    all_graphs,
    all_nodes,
    all_tensors,
    consumer_map,
    name_nodes,
    owner_graph,
    walk,
)
from qtool.plan import QuantPlan, TensorPlan
from qtool.residual_add import ResidualAdds
from qtool.scheme import QuantScheme
from qtool.sensitive_patterns import sensitive_nodes

log = logging.getLogger(__name__)

#: Inputs (by index) that carry shapes, sizes, indices or counts, per op type.
SHAPE_INPUTS: Mapping[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ScatterND": (1,),
    "ScatterElements": (1,),
    "TopK": (1,),
    "Pad": (1, 3),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "OneHot": (1,),
    "CumSum": (1,),
    "Trilu": (1,),
    "Compress": (1,),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
    "RoiAlign": (2,),
    "NonMaxSuppression": (2, 3, 4),
}

#: Ops whose outputs are shapes or sizes of their input (they read no values).
SHAPE_SOURCES = frozenset({"Shape", "Size"})

#: Index of the weight input of each weighted op.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}

#: Ops that take a bias as input 2.
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}

#: Ops whose compute lives in subgraph bodies (planned node by node, inside the bodies).
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})

#: Below this share of the model's weight values quantized, a run warns loudly.
MIN_WEIGHT_COVERAGE = 0.25
#: Ops that read rows of a constant table by index (embeddings): not weights for coverage.
LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND"})


def build_plan(
    graph: gs.Graph,
    backend,
    *,
    skip: Sequence[str] = (),
    weight_bits: int | None = None,
    act_bits: int | None = None,
) -> QuantPlan:
    """Plan where and how ``graph`` is quantized for ``backend``.

    The phases of the module docstring, in order: walk the graph once (:class:`_Planning`),
    place each node's quantizers by the backend's placement, let the converter placement
    quantize outputs instead, let a kernel placement fuse what its engine runs in
    integers, then group shared scales and apply the overrides.

    Args:
        graph: The float graph, prepared (cleanup, BN folded, opset >= 13).
        backend: A backend name or :class:`qtool.backends.base.Backend`.
        skip: Nodes to keep in float: names, op types or regexes (see QuantPlan.skip).
        weight_bits: Force the weight bit width (e.g. 4 for W4A8).
        act_bits: Force the activation bit width.

    Returns:
        The plan.

    Raises:
        PlanError: A skip pattern matches no node.
        BackendError: Unknown backend name, or ``act_bits`` it cannot run.
    """
    from qtool.backends import resolve_backend

    planning = _Planning(graph, resolve_backend(backend))
    for node in planning.nodes:
        _place(planning, node)
    _quantize_converter_outputs(planning)
    _fuse_kernels(planning)
    plan = _assemble(planning)
    return _override(plan, planning.backend, skip, weight_bits, act_bits)


class _Planning:
    """One walk of the graph (readers, constants, shape tensors) and the plan being built."""

    def __init__(self, graph: gs.Graph, backend):
        from qtool.bias import split_shared_biases

        self.graph, self.backend, self.placement = graph, backend, backend.placement
        name_nodes(graph)
        if backend.bias_mode == "int32":
            split_shared_biases(graph)  # one int32 bias per consumer (its own s_in * s_w)
        self.sensitive = sensitive_nodes(graph)  # qtool.sensitive_patterns: float everywhere
        self.nodes = all_nodes(graph)
        self.consumers = consumer_map(self.nodes)
        self.graph_outputs = {t.name for g in all_graphs(graph) for t in g.outputs}
        self.constant = _constant_tensors(self.nodes)
        self.carried = _loop_state(self.nodes)
        self.shape = shape_tensors(graph)
        self.shape_nodes = {n.name for n in self.nodes
                            if n.outputs and all(o.name in self.shape for o in n.outputs)}
        self.act_consumers: dict[str, list[str]] = {}
        self.weights: dict[str, TensorPlan] = {}
        self.biases: dict[str, TensorPlan] = {}
        self.float_nodes: dict[str, str] = {}
        self.order: list[str] = []
        self.residual_adds: ResidualAdds | None = None

    def is_activation(self, tensor: gs.Tensor) -> bool:
        """A float tensor computed from the inputs: not a constant, shape or loop state."""
        return (
            bool(tensor.name)
            and not isinstance(tensor, gs.Constant)
            and tensor.name not in self.constant
            and tensor.name not in self.shape
            and tensor.name not in self.carried
            and _is_float(tensor)
        )

    def quantize_input(self, tensor: gs.Tensor, node: gs.Node) -> None:
        """``node`` reads ``tensor`` quantized."""
        users = self.act_consumers.setdefault(tensor.name, [])
        if tensor.name not in self.order:
            self.order.append(tensor.name)
        if node.name not in users:
            users.append(node.name)


def _place(planning: _Planning, node: gs.Node) -> None:
    """One node's quantizers by the placement (MQBench Fig. 4), or its reason to stay float."""
    op, placement, backend = node.op, planning.placement, planning.backend
    if node.name in planning.shape_nodes:
        planning.float_nodes[node.name] = "shape/index computation: never quantized"
    elif op == "Constant" or op in SHAPE_SOURCES or op in CONTROL_FLOW:
        return  # control flow: the nodes of its bodies are planned one by one
    elif node.name in planning.sensitive:
        planning.float_nodes[node.name] = planning.sensitive[node.name]
    elif op in placement.weighted_ops:
        _place_weighted(planning, node)
    elif op in placement.shortcut_ops:
        _place_shortcut(planning, node)
    elif op in placement.activation_ops and placement.runs_quantized(op, node.attrs):
        for tensor in node.inputs:
            if planning.is_activation(tensor):
                planning.quantize_input(tensor, node)
    elif (
        backend.passes_scale_through(op, node.attrs)
        or op in backend.sharing_ops
        or op in backend.fused_activations
    ):
        return  # data movement keeps the scale; fused activations run with their producer
    elif placement.quantize_outputs:
        return  # the converter quantizes every op (its output, _quantize_converter_outputs)
    else:
        planning.float_nodes[node.name] = (
            f"{op} has no integer kernel under the {backend.name} rules "
            f"(MQBench graph {placement.graph}); it runs in float"
        )


def _place_weighted(planning: _Planning, node: gs.Node) -> None:
    """A Conv/Gemm/MatMul: its activation inputs, its weight, its int32 bias, its output."""
    op, placement, backend = node.op, planning.placement, planning.backend
    weight = _weight_of(node)
    if weight is None and placement.requires_weight:
        planning.float_nodes[node.name] = (
            f"{op} without a constant weight: {backend.name} quantizes only layers with weights"
        )
        return
    reason = placement.weighted_kernel(node) if placement.weighted_kernel else None
    if reason:
        planning.float_nodes[node.name] = reason
        return
    inputs = [t for t in node.inputs[:2] if planning.is_activation(t)]
    for tensor in inputs:
        planning.quantize_input(tensor, node)
    if placement.quantize_weighted_outputs:
        output = _kernel_output(node, planning.consumers, backend, planning.graph_outputs)
        if output is not None and planning.is_activation(output):
            for reader, _ in planning.consumers.get(output.name, ()):
                # a reader the engine's kernels refuse (a cubic Resize) reads float: a Q/DQ
                # pair before it would let onnxruntime fuse it into one
                if (reader.op not in SHAPE_SOURCES and reader.name not in planning.sensitive
                        and placement.runs_quantized(reader.op, reader.attrs)):
                    planning.quantize_input(output, reader)
    weights = planning.weights
    if weight is not None:
        entry = weights.get(weight.name)
        if entry is None:
            scheme = backend.weight_scheme.with_(
                per_channel_axis=_weight_axis(node, weight)
                if backend.weight_per_channel(op) else None
            )
            entry = TensorPlan(weight.name, "weight", scheme, ())
            planning.order.append(weight.name)
        weights[weight.name] = _add_consumer(entry, node.name)
    bias = _bias_of(node)
    if (backend.bias_mode == "int32" and bias is not None and weight is not None and inputs
            and inputs[0] is node.inputs[0]):
        scheme = QuantScheme(
            bits=32, signed=True, symmetric=True,
            per_channel_axis=0 if weights[weight.name].scheme.per_channel else None,
        )
        planning.biases[bias.name] = TensorPlan(
            bias.name, "bias", scheme, (node.name,),
            bias_inputs=(node.inputs[0].name, weight.name),
        )
        planning.order.append(bias.name)


def _place_shortcut(planning: _Planning, node: gs.Node) -> None:
    """TensorRT's residual Add: every input but the branch fused into its producer."""
    placement = planning.placement
    if placement.residual_shortcuts_only:  # not a residual Add: float (qtool.residual_add)
        if planning.residual_adds is None:
            planning.residual_adds = ResidualAdds(planning.is_activation)
        reason = planning.residual_adds.why_not_residual(node)
        if reason:
            planning.float_nodes[node.name] = reason
            return
    inputs = [(i, t) for i, t in enumerate(node.inputs) if planning.is_activation(t)]
    fused = next(
        (
            i
            for i, t in reversed(inputs)
            if t.inputs
            and t.inputs[0].op in placement.fusable_producers
            and len(planning.consumers[t.name]) == 1
            and t.name not in planning.graph_outputs
        ),
        None,
    )
    for i, tensor in inputs:
        if i != fused:
            planning.quantize_input(tensor, node)


def _quantize_converter_outputs(planning: _Planning) -> None:
    """The converter placement (SNPE/QNN): graph inputs and every op's output instead."""
    if not planning.placement.quantize_outputs:
        return
    planning.act_consumers = _converter_activations(
        planning.graph, planning.backend, planning.consumers, planning.is_activation,
        kept_float=set(planning.sensitive))
    planning.order = _converter_order(planning.graph, planning.act_consumers,
                                      set(planning.weights) | set(planning.biases))


def _fuse_kernels(planning: _Planning) -> None:
    """A kernel placement (onnxruntime): fuse the ops its engine runs in integers."""
    placement = planning.placement
    if not placement.quantize_weighted_outputs:
        return
    if placement.kernel_ops:
        _fuse_kernel_chains(planning.nodes, planning.consumers, planning.backend,
                            planning.act_consumers, planning.order, planning.is_activation,
                            set(planning.sensitive) | set(planning.float_nodes)
                            - _kernel_names(planning.nodes, placement))
    for readers in planning.act_consumers.values():  # a node reading a quantized output
        for reader in readers:
            planning.float_nodes.pop(reader, None)


def _assemble(planning: _Planning) -> QuantPlan:
    """The plan's entries in graph order, activations grouped by shared scale (union-find)."""
    backend, act_consumers = planning.backend, planning.act_consumers
    shared_nodes = planning.nodes
    if planning.placement.quantize_weighted_outputs:  # a Concat read in float: own scales
        shared_nodes = [n for n in planning.nodes if n.op not in backend.sharing_ops
                        or all(o.name in act_consumers for o in n.outputs)]
    # the converter (SNPE/QNN) requantizes a Concat input read elsewhere too (AIMET's rule)
    readers = planning.consumers if planning.placement.quantize_outputs else None
    groups = _sharing_groups(shared_nodes, backend, planning.shape, planning.constant,
                             readers, planning.graph_outputs)
    group_ids = _group_ids(planning.order, act_consumers, groups)
    tensors: dict[str, TensorPlan] = {}
    for name in planning.order:
        if name in act_consumers:
            tensors[name] = TensorPlan(name, "activation", backend.activation_scheme,
                                       tuple(act_consumers[name]), group=group_ids.get(name))
        elif name in planning.weights:
            tensors[name] = planning.weights[name]
        else:
            tensors[name] = planning.biases[name]
    return QuantPlan(
        backend=backend.name,
        placement_graph=planning.placement.graph,
        tensors=tensors,
        float_nodes=planning.float_nodes,
        nodes={n.name: n.op for n in planning.nodes},
    )


def _override(plan: QuantPlan, backend, skip: Sequence[str], weight_bits: int | None,
              act_bits: int | None) -> QuantPlan:
    """``--bits`` and ``--skip`` on the plan built."""
    if act_bits is not None:
        backend.check_activation_bits(act_bits)
    if weight_bits is not None or act_bits is not None:
        plan = plan.with_bits(weight_bits, act_bits)
    if skip:
        plan = plan.skip(*skip)
    log.info(
        "plan for %s: %d activations, %d weights, %d biases, %d float nodes",
        backend.name,
        len(plan.entries("activation")),
        len(plan.entries("weight")),
        len(plan.entries("bias")),
        len(plan.float_nodes),
    )
    return plan


def _converter_activations(
    graph: gs.Graph, backend, consumers, is_activation, kept_float: set[str] = frozenset()
) -> dict[str, list[str]]:
    """The tensors a converter (SNPE/QNN, AIMET) quantizes, each with all its readers.

    Graph inputs and every activation output of a node, except the output of a
    data-movement op (it keeps its input's quantizer) and an output whose only reader is a
    fused activation (Conv+Relu, Add+Relu: quantized after the activation). Every node that
    reads such a tensor's values reads the quantized one, except the nodes ``kept_float``
    (numerically sensitive ones): they read float values, so a tensor only they read gets
    no encoding.
    """
    graph_outputs = {t.name for t in graph.outputs}

    def readers(name: str) -> list[str]:
        return [n.name for n, _ in consumers.get(name, ())
                if n.op not in SHAPE_SOURCES and n.name not in kept_float]

    encoded: dict[str, list[str]] = {}
    for tensor in graph.inputs:
        if is_activation(tensor):
            encoded[tensor.name] = readers(tensor.name)
    for node in graph.nodes:
        if node.op == "Constant" or backend.passes_scale_through(node.op, node.attrs):
            continue
        for tensor in node.outputs:
            if not is_activation(tensor) or tensor.name in encoded:
                continue
            uses = consumers.get(tensor.name, ())
            fused = (
                tensor.name not in graph_outputs
                and len(uses) == 1
                and uses[0][0].op in backend.fused_activations
            )
            values_read_by = [n.name for n, _ in uses if n.op not in SHAPE_SOURCES]
            only_float_readers = bool(values_read_by) and all(
                n in kept_float for n in values_read_by)
            if not fused and (not only_float_readers or tensor.name in graph_outputs):
                encoded[tensor.name] = readers(tensor.name)
    return encoded


def _kernel_output(node: gs.Node, consumers, backend, graph_outputs: set[str]):
    """A weighted op's output as its integer kernel writes it.

    That is the output of the Relu/Clip that is its only reader (fused into it), else its own.
    """
    if not node.outputs:
        return None
    output = node.outputs[0]
    uses = consumers.get(output.name, ())
    if (output.name not in graph_outputs and len(uses) == 1
            and uses[0][0].op in backend.fused_activations and uses[0][0].outputs):
        return uses[0][0].outputs[0]
    return output


def _kernel_names(nodes, placement) -> set[str]:
    return {n.name for n in nodes if n.op in placement.kernel_ops}


def _fuse_kernel_chains(nodes, consumers, backend, act_consumers: dict[str, list[str]],
                        order: list[str], is_activation, kept_float: set[str]) -> None:
    """Quantize the inputs of kernel ops whose output is quantized, where that fuses them.

    Data-movement ops count as kernels (onnxruntime drops their Q/DQ pairs). Run to a
    fixed point; see :attr:`qtool.backends.base.Placement.kernel_ops`. A node of
    ``kept_float`` (numerically sensitive) is never fused.
    """
    producer = {o.name: n for n in nodes for o in n.outputs}

    def is_kernel(node) -> bool:  # data movement keeps the integers (onnxruntime drops Q/DQ)
        if not backend.placement.runs_quantized(node.op, node.attrs):
            return False  # an attribute the integer kernel refuses (a cubic Resize)
        return (node.op in backend.placement.kernel_ops
                or backend.passes_scale_through(node.op, node.attrs))

    def inputs(node):
        return [t for t in node.inputs if is_activation(t)]

    def output_quantized(node) -> bool:
        outs = [o for o in node.outputs if is_activation(o)]
        for out in outs:
            uses = consumers.get(out.name, ())
            if len(uses) == 1 and uses[0][0].op in backend.fused_activations:
                out = uses[0][0].outputs[0]
            if out.name not in act_consumers:
                return False
        return bool(outs)

    def fusable_input(tensor) -> bool:
        if tensor.name in act_consumers:
            return True
        node = producer.get(tensor.name)
        return (node is not None and is_kernel(node) and node.name not in kept_float
                and bool(inputs(node)) and all(t.name in act_consumers for t in inputs(node)))

    changed = True
    while changed:
        changed = False
        for node in nodes:
            if not is_kernel(node) or node.name in kept_float or not output_quantized(node):
                continue
            todo = [t for t in inputs(node) if node.name not in act_consumers.get(t.name, ())]
            if not todo or not all(fusable_input(t) for t in inputs(node)):
                continue
            for tensor in todo:
                if tensor.name not in act_consumers:
                    order.append(tensor.name)
                    # every reader takes the quantized value, as a kernel's output Q gives it
                    act_consumers[tensor.name] = []
                    for reader, _ in consumers.get(tensor.name, ()):
                        if reader.op not in SHAPE_SOURCES and reader.name not in act_consumers[
                                tensor.name]:
                            act_consumers[tensor.name].append(reader.name)
                elif node.name not in act_consumers[tensor.name]:
                    act_consumers[tensor.name].append(node.name)
            changed = True


def _converter_order(
    graph: gs.Graph, act_consumers: Mapping[str, list[str]], params: set[str]
) -> list[str]:
    """Graph order: inputs, then per node its weight/bias entries and its encoded outputs."""
    result = [t.name for t in graph.inputs if t.name in act_consumers]
    seen = set(result)
    for node in graph.nodes:
        names = [t.name for t in node.inputs if t.name in params]
        names += [t.name for t in node.outputs if t.name in act_consumers]
        for name in names:
            if name not in seen:
                seen.add(name)
                result.append(name)
    return result


def drop_unreached(plan: QuantPlan, ranges: Mapping[str, Any], graph: gs.Graph) -> QuantPlan:
    """The plan without the body activations that calibration never saw.

    Such a tensor sits in an If branch no sample took: its consumers stay float, with the
    reason in ``float_nodes``. Only tensors inside If/Loop/Scan bodies of ``graph`` are
    dropped so; a missing range for any other tensor stays an error of
    :func:`qtool.qdq.quantize`.
    """
    in_bodies = {name for body in all_graphs(graph)[1:] for name in body.tensors()}
    unreached = [e for e in plan.entries("activation")
                 if e.tensor not in ranges and e.pinned_range is None and e.tensor in in_bodies]
    if not unreached:
        return plan
    nodes = sorted({c for e in unreached for c in e.consumers})
    kept = plan.skip(*(f"name:{n}" for n in nodes))
    reason = "reads a tensor the calibration data never computed (an If branch no sample took)"
    return dataclasses.replace(kept, float_nodes={**kept.float_nodes,
                                                  **dict.fromkeys(nodes, reason)})


def coverage_warning(graph: gs.Graph, plan: QuantPlan) -> str | None:
    """A warning when (almost) nothing gets quantized, else None.

    "Almost nothing" is less than :data:`MIN_WEIGHT_COVERAGE` of the weight values; the
    warning names the likely cause (compute inside subgraph bodies). Weights are the float
    constants of rank >= 2 of the graph and its subgraphs, except lookup tables (read only
    as the data of a Gather: a BERT's embedding tables are most of its values, and no
    backend quantizes a table a lookup reads a few rows of).
    """
    weights: dict[str, int] = {}
    body_nodes = 0
    for depth, node in walk(graph):
        body_nodes += depth > 0
        for index, tensor in enumerate(node.inputs):
            if (isinstance(tensor, gs.Constant) and len(tensor.shape) >= 2
                    and _is_float(tensor)):
                if not (node.op in LOOKUPS and index == 0):
                    weights[tensor.name] = int(np.prod(tensor.shape))
    total = sum(weights.values())
    quantized = sum(weights.get(e.tensor, 0) for e in plan.entries("weight"))
    why = (f"; {body_nodes} node(s) run inside If/Loop/Scan bodies (a branch no calibration "
           "sample takes stays float)" if body_nodes else "")
    if not plan.entries("activation") and not plan.entries("weight"):
        return (f"nothing was quantized: the {plan.backend} plan has no tensor to quantize"
                f"{why}; the output model runs in float")
    if total and quantized / total < MIN_WEIGHT_COVERAGE:
        return (f"almost nothing was quantized: only {quantized / total:.0%} of the weight "
                f"values ({quantized} of {total}) get quantized{why}")
    return None


def shape_tensors(graph: gs.Graph) -> set[str]:
    """Names of the tensors on shape/index paths (rules (a)-(c) of the module docstring)."""
    nodes = all_nodes(graph)
    consumers = consumer_map(nodes)
    constant = _constant_tensors(nodes)
    graph_outputs = {t.name for g in all_graphs(graph) for t in g.outputs}
    shape: set[str] = set()

    def add(name: str) -> bool:
        if name and name not in shape:
            shape.add(name)
            return True
        return False

    changed = True
    while changed:
        changed = False
        for node in nodes:
            # (a) shape/index inputs.
            for index in SHAPE_INPUTS.get(node.op, ()):
                if index < len(node.inputs) and not isinstance(node.inputs[index], gs.Constant):
                    changed |= add(node.inputs[index].name)
            # (c) computed from shapes only.
            if node.op in SHAPE_SOURCES:
                for out in node.outputs:
                    changed |= add(out.name)
                continue
            variables = [
                t for t in node.inputs
                if t.name and not isinstance(t, gs.Constant) and t.name not in constant
            ]
            if (
                variables
                and all(t.name in shape for t in variables)
                and not _reads_constant_data(node, constant)
            ):
                for out in node.outputs:
                    changed |= add(out.name)
        # (b) every value-reading consumer is on the shape path.
        for name, uses in consumers.items():
            if name in shape or name in constant or name in graph_outputs:
                continue
            reads = [(n, i) for n, i in uses if n.op not in SHAPE_SOURCES]
            if reads and all(_is_shape_edge(n, i, shape) for n, i in reads):
                changed |= add(name)
    return shape


def _loop_state(nodes: Iterable[gs.Node]) -> set[str]:
    """The state Loop and Scan bodies carry from one iteration to the next.

    Loop's iteration count and condition too. Never quantized: its rounding would compound
    over the iterations. Scan's scanned slices are data and stay candidates.
    """
    state: set[str] = set()
    for node in nodes:
        body = node.attrs.get("body")
        if node.op not in ("Loop", "Scan") or not isinstance(body, gs.Graph):
            continue
        inputs = list(body.inputs)
        if node.op == "Scan":
            inputs = inputs[: len(inputs) - int(node.attrs.get("num_scan_inputs", 0))]
        state.update(t.name for t in inputs)
    return state


def _reads_constant_data(node: gs.Node, constant: set[str]) -> bool:
    """Whether a data (not shape/index) input is a float constant.

    The output is then data looked up or broadcast from it (an embedding Gather, an Expand
    of a class token), not a shape.
    """
    shape_inputs = SHAPE_INPUTS.get(node.op, ())
    return any(
        i not in shape_inputs
        and (isinstance(t, gs.Constant) or t.name in constant)
        and _is_float(t)
        and t.dtype is not None
        for i, t in enumerate(node.inputs)
    )


def _is_shape_edge(node: gs.Node, index: int, shape: set[str]) -> bool:
    if index in SHAPE_INPUTS.get(node.op, ()):
        return True
    return bool(node.outputs) and all(o.name in shape for o in node.outputs)


def _constant_tensors(nodes: Sequence[gs.Node]) -> set[str]:
    """Tensors whose value is fixed: initializers, Constant outputs, and what only they feed."""
    constant: set[str] = set()
    for node in nodes:  # topological order: producers first
        if node.op == "Constant" or (
            node.inputs
            and node.op not in SHAPE_SOURCES
            and not _has_subgraph(node)  # If/Loop/Scan bodies read outer tensors implicitly
            and all(
                isinstance(t, gs.Constant) or t.name in constant or not t.name
                for t in node.inputs
            )
        ):
            constant.update(o.name for o in node.outputs)
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                constant.add(tensor.name)
    return constant


def _has_subgraph(node: gs.Node) -> bool:
    return any(
        isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(g, gs.Graph) for g in v))
        for v in node.attrs.values()
    )


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = tensor.dtype
    if dtype is None:
        return True
    try:
        return np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:
        return False


def _weight_of(node: gs.Node) -> gs.Constant | None:
    index = WEIGHT_INPUT[node.op]
    if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index]
    return None


def _bias_of(node: gs.Node) -> gs.Constant | None:
    index = BIAS_INPUT.get(node.op)
    if index is None or index >= len(node.inputs):
        return None
    bias = node.inputs[index]
    if isinstance(bias, gs.Constant) and len(bias.shape) == 1:
        return bias
    return None


def _weight_axis(node: gs.Node, weight: gs.Constant) -> int | None:
    """Output-channel axis of a weight: Conv 0, ConvTranspose 1, Gemm by transB, MatMul last."""
    rank = len(weight.shape)
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return rank - 1 if rank >= 2 else None
    raise PlanError(f"node {node.name}: no weight axis rule for {node.op}")


def _add_consumer(entry: TensorPlan, node_name: str) -> TensorPlan:
    if node_name in entry.consumers:
        return entry
    return TensorPlan(
        entry.tensor, entry.role, entry.scheme, entry.consumers + (node_name,),
        entry.group, entry.pinned_range, entry.bias_inputs,
    )


class UnionFind:
    """Disjoint sets of tensor names (path compression); shared scales are its sets."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        """The root of ``item``'s set (``item`` joins as its own set when new)."""
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        """Join the sets of ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _sharing_groups(nodes, backend, shape: set[str], constant: set[str],
                    readers=None, graph_outputs: set[str] = frozenset()) -> UnionFind:
    """Union-find over data tensors: sharing ops join all, pass-through ops join input/outputs.

    With ``readers`` (tensor -> ``(node, index)`` readers: the converter placement), a sharing
    op joins only the inputs whose values nothing else reads, through data movement: an
    input another node reads too keeps its own scale there, and the op requantizes it to the
    output's, as AIMET's QuantSim ties a Concat's quantizers and the converter runs it. Tying
    it would widen the input for its other readers to the union of the Concat's ranges.
    """
    moves = UnionFind()  # data movement only: what one input's values reach unchanged
    groups = UnionFind()

    def data(t: gs.Tensor) -> bool:
        return (
            bool(t.name) and not isinstance(t, gs.Constant)
            and t.name not in shape and t.name not in constant
        )

    sharing = []
    for node in nodes:
        if any(o.name in shape for o in node.outputs):
            continue
        if node.op in backend.sharing_ops:
            sharing.append(node)
            continue
        if backend.passes_scale_through(node.op, node.attrs) and node.inputs:
            members = [t for t in [node.inputs[0], *node.outputs] if data(t)]
            for other in members[1:]:
                groups.union(members[0].name, other.name)
                moves.union(members[0].name, other.name)
    if readers is not None:
        reach: dict[str, set[str]] = {}  # move-set root -> names of its non-moving readers
        for name in list(moves.parent):
            root = moves.find(name)
            seen = reach.setdefault(root, set())
            seen.update(n.name for n, _ in readers.get(name, ())
                        if not backend.passes_scale_through(n.op, n.attrs))
            if name in graph_outputs:
                seen.add("")

    def readers_of(name: str) -> set[str]:
        """Who reads ``name``'s values, through data movement ("": a graph output)."""
        if name in moves.parent:
            return reach[moves.find(name)]
        return ({n.name for n, _ in readers.get(name, ())}
                | ({""} if name in graph_outputs else set()))

    for node in sharing:
        inputs = [t for t in node.inputs if data(t)]
        if readers is not None:
            inputs = [t for t in inputs if readers_of(t.name) == {node.name}]
        members = [*inputs, *(t for t in node.outputs if data(t))]
        for other in members[1:]:
            groups.union(members[0].name, other.name)
    return groups


def _group_ids(
    order: list[str], act_consumers: Mapping[str, list[str]], groups: UnionFind
) -> dict[str, str]:
    """Group id per quantized activation, for roots with two or more quantized members."""
    members: dict[str, list[str]] = {}
    for name in order:
        if name in act_consumers:
            members.setdefault(groups.find(name), []).append(name)
    ids: dict[str, str] = {}
    for index, names in enumerate(m for m in members.values() if len(m) > 1):
        for name in names:
            ids[name] = f"group{index}"
    return ids
