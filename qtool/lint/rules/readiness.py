"""Readiness rules (``QT0xx``): what stops or limits quantizing a float model.

* QT001 invalid-graph: onnx.checker rejects the model (or graphsurgeon cannot import it).
* QT002 opset-out-of-range: the default-domain opset is outside qtool's 11..21; below 13
  (per-channel QuantizeLinear) it is a note, since the ``upgrade_opset`` pass raises it.
* QT003 unknown-domain: a node of a non-standard domain cannot be quantized or run through.
* QT004 stays-float: with ``--backend``, a node the backend's plan leaves in float (and why).
* QT005 dynamic-dim: a symbolic or unknown input/output dimension; the batch axis is a note,
  any other axis a warning, and an error for a backend that needs static shapes.
* QT006 non-finite-initializer: NaN or Inf in a weight that gets quantized: every scale
  computed from it breaks (a float-only constant, e.g. a ``-inf`` floor, is fine).
* QT007 unused-initializer: an initializer no node reads (dead weight in the file).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.io import DEFAULT_DOMAINS, MAX_OPSET, MIN_OPSET, default_opset
from qtool.lint.registry import Finding, LintContext, rule
from qtool.lint.rules.expectations import backend_expectations
from qtool.lint.rules.qdq import QOPERATORS

QUANTIZE_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis attribute)


@rule("QT001", "invalid-graph", "error", "The ONNX checker rejects the model.")
def invalid_graph(ctx: LintContext) -> Iterator[Finding]:
    """The checker's (or the graph importer's) complaint, as is."""
    if ctx.checker_error:
        yield ctx.rule.finding(
            f"{ctx.checker_error}; fix or re-export the model before quantizing it"
        )


@rule("QT002", "opset-out-of-range", "error", "The model's opset is outside 11..21.")
def opset_out_of_range(ctx: LintContext) -> Iterator[Finding]:
    """Opsets qtool refuses (error) or upgrades before quantizing (note)."""
    opset = default_opset(ctx.model)
    if opset is None:
        yield ctx.rule.finding("the model imports no opset of the default ONNX domain")
    elif not MIN_OPSET <= opset <= MAX_OPSET:
        yield ctx.rule.finding(
            f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}; re-export the model at an "
            "opset in that range or convert it with onnx.version_converter"
        )
    elif opset < QUANTIZE_OPSET and not ctx.is_qdq:
        yield ctx.rule.finding(
            f"opset {opset} has no per-channel QuantizeLinear; qtool upgrades the model to "
            f"opset {QUANTIZE_OPSET} before quantizing it",
            severity="note",
        )


@rule("QT003", "unknown-domain", "error", "A node belongs to a non-standard op domain.")
def unknown_domain(ctx: LintContext) -> Iterator[Finding]:
    """Custom-domain nodes cannot be run in onnxruntime's CPU provider nor quantized."""
    for node in ctx.model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in QOPERATORS:
            continue  # onnxruntime's QOperator format: QT110 says what it is
        if node.domain not in DEFAULT_DOMAINS:
            yield ctx.rule.finding(
                f"node {node.name or '<unnamed>'} ({node.op_type}) is in domain "
                f"'{node.domain}'; export it with standard ONNX ops",
                node=node.name or None,
            )


@rule("QT004", "stays-float", "warning", "The backend would leave a node in float.")
def stays_float(ctx: LintContext) -> Iterator[Finding]:
    """Nodes the backend's quantization plan keeps in float, with the plan's reason."""
    if ctx.backend is None or ctx.is_qdq or ctx.graph is None or ctx.checker_error:
        return
    from qtool.inspection import float_nodes_for_backend

    for node, reason in float_nodes_for_backend(ctx.model, ctx.backend).items():
        yield ctx.rule.finding(f"node {node} stays float on {ctx.backend}: {reason}", node=node)


@rule("QT005", "dynamic-dim", "warning", "An input or output has a symbolic dimension.")
def dynamic_dim(ctx: LintContext) -> Iterator[Finding]:
    """Symbolic dims: fine for onnxruntime, a problem for engines compiled for fixed shapes."""
    static_required = ctx.backend is not None and backend_expectations(ctx.backend).static_shapes
    initializers = {t.name for t in ctx.model.graph.initializer}
    for kind, values in (("input", ctx.model.graph.input), ("output", ctx.model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    continue
                label = dim.dim_param or "unknown"
                if static_required:
                    severity, advice = "error", f"{ctx.backend} needs static shapes: fix it"
                elif axis == 0:
                    severity, advice = "note", "calibration data decides the batch size"
                else:
                    severity, advice = "warning", "engines compiled for fixed shapes need it fixed"
                yield ctx.rule.finding(
                    f"{kind} {value.name} has a dynamic dimension {axis} ('{label}'); {advice}",
                    tensor=value.name,
                    severity=severity,
                )


@rule("QT006", "non-finite-initializer", "error", "A weight that gets quantized holds NaN or Inf.")
def non_finite_initializer(ctx: LintContext) -> Iterator[Finding]:
    """Float initializers and Constant-node values with NaN or Inf that get quantized.

    Only constants read as the weight or bias of a weighted op (Conv, ConvTranspose, Gemm,
    MatMul, as the planner quantizes them) matter: a scalar ``-inf`` used as a ``Max`` floor
    or an attention mask stays float and is fine.
    """
    quantized = _quantized_constants(ctx.model.graph)
    for name, array in _float_constants(ctx.model):
        if name not in quantized:
            continue
        bad = np.isnan(array).sum(), np.isinf(array).sum()
        if bad[0] or bad[1]:
            yield ctx.rule.finding(
                f"initializer {name} holds {bad[0]} NaN and {bad[1]} Inf values; every scale "
                "computed from it would be NaN: fix the weights before quantizing",
                tensor=name,
            )


def _quantized_constants(graph: onnx.GraphProto) -> set[str]:
    """Names read as the weight or bias input of a weighted op (subgraphs included)."""
    from qtool.planner import BIAS_INPUT, WEIGHT_INPUT

    names: set[str] = set()
    for node in graph.node:
        for index in (WEIGHT_INPUT.get(node.op_type), BIAS_INPUT.get(node.op_type)):
            if index is not None and index < len(node.input) and node.input[index]:
                names.add(node.input[index])
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _quantized_constants(sub)
    return names


@rule("QT007", "unused-initializer", "warning", "An initializer is read by no node.")
def unused_initializer(ctx: LintContext) -> Iterator[Finding]:
    """Initializers no node (or subgraph) reads and no graph output names."""
    used = _names_read(ctx.model.graph) | {o.name for o in ctx.model.graph.output}
    for tensor in ctx.model.graph.initializer:
        if tensor.name not in used:
            yield ctx.rule.finding(
                f"initializer {tensor.name} is not used by any node; the cleanup pass "
                "(`qtool run` with passes: [cleanup]) removes it",
                tensor=tensor.name,
            )


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub)
                names |= {o.name for o in sub.output}
    return names


def _float_constants(model: onnx.ModelProto) -> Iterator[tuple[str, np.ndarray]]:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16)
    for tensor in model.graph.initializer:
        if tensor.data_type in floats:
            yield tensor.name, numpy_helper.to_array(tensor).astype(np.float64)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type in floats:
                yield node.output[0], numpy_helper.to_array(attr.t).astype(np.float64)
