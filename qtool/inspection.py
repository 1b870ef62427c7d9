"""``qtool inspect``: what a model is, and what each backend would make of it.

Reports the opset, IR version and producer, the inputs and outputs with dtypes and shapes
(symbolic dims by name), the op histogram, the number of weights, and for every backend (or
the ones asked for) how many tensors its plan quantizes and which nodes stay float and why.
The per-backend part plans the prepared graph (cleanup, BN folding, opset >= 13) with
:func:`qtool.planner.build_plan`, exactly as ``qtool calibrate`` would.

Float nodes are split in two: those that compute on activations (what costs accuracy or
speed), listed one by one, and shape arithmetic, only counted. A node is shape arithmetic
when none of its outputs depends on the values of the model's inputs: a tensor depends on
them when it is a graph input, or an output of a node other than Shape/Size that reads
such a tensor (Shape -> Gather -> Unsqueeze -> Concat -> the shape input of a Reshape).

A node outside the default ONNX domain (a ``com.microsoft`` op) is marked, and no backend
is planned: qtool cannot run such a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qtool.io import DEFAULT_DOMAINS, ModelSource, default_opset, load, load_model
from qtool.pipeline import op_histogram

SHAPE_SOURCES = frozenset({"Shape", "Size"})  # their outputs depend on shapes, not values


@dataclass
class TensorInfo:
    """A graph input or output: name, element type and shape (str for a symbolic dim)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class BackendView:
    """What one backend's plan does with the model."""

    backend: str
    quantized_tensors: int
    activations: int
    weights: int
    biases: int
    float_nodes: dict[str, str]
    shape_nodes: int = 0


@dataclass
class Inspection:
    """The facts ``qtool inspect`` prints."""

    model: str
    opset: int | None
    ir_version: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    nodes: int
    weights: int
    backends: list[BackendView] = field(default_factory=list)
    foreign_nodes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    def render(self, fmt: str = "text") -> str:
        """Text for a terminal, or JSON."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        lines = [
            f"{self.model}: opset {self.opset}, IR {self.ir_version}, producer "
            f"{self.producer or '?'}",
            f"  {self.nodes} nodes, {self.weights} weights",
        ]
        for label, tensors in (("input ", self.inputs), ("output", self.outputs)):
            for t in tensors:
                lines.append(f"  {label} {t.name}: {t.dtype}[{', '.join(map(str, t.shape))}]")
        lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in self.op_histogram.items()))
        for node, op in self.foreign_nodes.items():
            lines.append(f"  ! node {node} ({op}) is outside the default ONNX domain: qtool "
                         "cannot quantize or run the model; no backend plan")
        if self.backends:
            lines.append("")
            width = max(len(b.backend) for b in self.backends)
            lines.append(
                f"  {'backend'.ljust(width)}  quantized  activations  weights  biases  float nodes"
                "  shape nodes"
            )
            for b in self.backends:
                lines.append(
                    f"  {b.backend.ljust(width)}  {b.quantized_tensors:>9}  {b.activations:>11}  "
                    f"{b.weights:>7}  {b.biases:>6}  {len(b.float_nodes):>11}  "
                    f"{b.shape_nodes:>11}"
                )
            for b in self.backends:
                for node, why in b.float_nodes.items():
                    lines.append(f"  {b.backend}: float {node}: {why}")
        return "\n".join(lines) + "\n"


def inspect_model(source: ModelSource, *, backends: Sequence[str] | None = None) -> Inspection:
    """Describe a model and plan it for each backend.

    Args:
        source: The model.
        backends: Backend names to plan for; None for every registered backend.

    Raises:
        ModelLoadError, InvalidModelError, UnsupportedModelError: The model cannot be read.
        BackendError: An unknown backend name.
    """
    from qtool.backends import backend_names, resolve_backend

    model = load_model(source)
    foreign = _foreign_nodes(model.graph)
    graph = load(model, check=not foreign)
    names = list(backend_names()) if backends is None else list(backends)
    if foreign:
        for name in names:
            resolve_backend(name)  # an unknown name is still an error
        names = []
    prepared = _prepared(model) if names else None
    views = [_backend_view(prepared, name) for name in names]
    return Inspection(
        model=str(source) if isinstance(source, (str, os.PathLike)) else "<model>",
        opset=default_opset(model),
        ir_version=int(model.ir_version),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=[_info(v) for v in _real_inputs(model)],
        outputs=[_info(v) for v in model.graph.output],
        op_histogram=op_histogram(graph),
        nodes=len(graph.nodes),
        weights=_weight_count(graph),
        backends=views,
        foreign_nodes=foreign,
    )


def _foreign_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    """Nodes outside the default domain (subgraphs included): name -> ``domain.op``."""
    found: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in DEFAULT_DOMAINS:
            found[node.name or f"{node.op_type}_{index}"] = f"{node.domain}.{node.op_type}"
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found.update(_foreign_nodes(sub))
    return found


def float_nodes_for_backend(source: ModelSource, backend: str) -> dict[str, str]:
    """Nodes of the prepared model that ``backend``'s plan keeps float, with the reason."""
    return _backend_view(_prepared(load_model(source)), backend).float_nodes


def _prepared(model: onnx.ModelProto) -> gs.Graph:
    from qtool.prepare import prepare

    graph, _ = prepare(load(model))
    return graph


def _backend_view(prepared: gs.Graph, backend: str) -> BackendView:
    from qtool.planner import build_plan

    plan = build_plan(prepared.copy(), backend)
    computing, shape = split_float_nodes(prepared, plan.float_nodes)
    return BackendView(
        backend,
        quantized_tensors=len(plan.tensors),
        activations=len(plan.entries("activation")),
        weights=len(plan.entries("weight")),
        biases=len(plan.entries("bias")),
        float_nodes=computing,
        shape_nodes=len(shape),
    )


def activation_nodes(graph: gs.Graph) -> set[str]:
    """Names of the nodes that compute on activations (see the module docstring).

    If/Loop/Scan bodies count too: a body node computes on activations when it reads one
    (an outer tensor, or a body input of a node that does), and so does the node holding it.
    """
    computing: set[str] = set()
    _mark_computing(graph, {t.name for t in graph.inputs}, computing)
    return computing


def _mark_computing(graph: gs.Graph, dependent: set[str], computing: set[str]) -> None:
    for node in _ordered(graph):
        if node.op in SHAPE_SOURCES:
            continue
        reads = any(t.name in dependent for t in node.inputs)
        for value in node.attrs.values():
            for body in value if isinstance(value, list) else [value]:
                if isinstance(body, gs.Graph):
                    inner = dependent | ({t.name for t in body.inputs} if reads else set())
                    before = len(computing)
                    _mark_computing(body, inner, computing)
                    reads = reads or len(computing) > before
        if reads:
            computing.add(node.name)
            dependent.update(t.name for t in node.outputs)


def _ordered(graph: gs.Graph) -> list[gs.Node]:
    copy = graph.copy()
    copy.toposort()
    return copy.nodes


def split_float_nodes(graph: gs.Graph, float_nodes: dict[str, str]
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """``(on activations, shape arithmetic)``: the float nodes of a plan of ``graph``, sorted."""
    computing = activation_nodes(graph)
    on_activations = {n: why for n, why in sorted(float_nodes.items()) if n in computing}
    shape = {n: why for n, why in sorted(float_nodes.items()) if n not in computing}
    return on_activations, shape


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    shape: list[int | str] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in tensor_type.shape.dim
    ]
    return TensorInfo(value.name, dtype, shape)


def _weight_count(graph: gs.Graph) -> int:
    constants = {
        t.name: t for t in graph.tensors().values()
        if isinstance(t, gs.Constant) and np.issubdtype(t.dtype, np.floating)
    }
    return int(sum(int(np.prod(t.shape)) for t in constants.values()))
