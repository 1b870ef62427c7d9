"""QDQ validity rules (``QT1xx``): is a quantized graph well formed, and right for a backend?

A QuantizeLinear/DequantizeLinear node quantizes a *weight* when its data input is a
constant (an int32 constant is a *bias*), else an *activation*. Its parameters are the
constant scale and zero point inputs (zero point absent: 0 of type uint8).

* QT101 q-without-dq: a QuantizeLinear output read by something other than DequantizeLinear.
* QT102 dq-without-q: a DequantizeLinear of a computed tensor that no QuantizeLinear made.
* QT103 double-quantization: Q -> DQ -> Q -> DQ, the same tensor quantized twice in a row.
* QT104 shared-scale-mismatch: a Concat (or an op that only moves data) whose quantized
  inputs and outputs do not share one scale and zero point.
* QT105 invalid-scale: a scale that is zero, negative, NaN or Inf.
* QT106 asymmetric-zero-point: a nonzero zero point where the backend's scheme is symmetric.
* QT107 dtype-mismatch: integer type (int8/uint8/...) not the one the backend's scheme uses.
* QT108 non-pot-scale: a scale that is not a power of two where the backend needs one.
* QT109 granularity-mismatch: per-channel weight scales where the backend wants one per
  tensor, or the reverse (a weight with one output channel has one scale either way).
* QT110 qoperator-format: onnxruntime's QOperator format (QLinearConv, QLinearMatMul,
  ConvInteger, ...): integer operators that take the quantized tensors themselves. Q feeding
  them directly is how that format works, so QT101/QT102 do not flag it; engines that read
  QDQ (TensorRT, SNPE/QNN, ...) need the QDQ format instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qtool.lint.registry import Finding, LintContext, rule
from qtool.lint.rules.expectations import backend_expectations, shares_scale
from qtool.scheme import QuantScheme

_QDQ = ("QuantizeLinear", "DequantizeLinear")
# onnxruntime's QOperator format: operators on quantized tensors (quantize_static with
# quant_format=QuantFormat.QOperator, and its com.microsoft contrib ops)
QOPERATORS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd",
    "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean",
    "QLinearWhere", "QLinearConvTranspose", "QGemm", "QAttention", "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
})


@dataclass(frozen=True)
class QuantParams:
    """The constant parameters of one Q or DQ node."""

    node: gs.Node
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    zero_point_dtype: np.dtype
    role: str  # "weight", "bias" or "activation"

    @property
    def key(self) -> tuple[bytes, bytes] | None:
        """Hashable (scale, zero point) for comparing shared parameters."""
        if self.scale is None:
            return None
        zp = self.zero_point if self.zero_point is not None else np.zeros((), np.int64)
        return (
            np.asarray(self.scale, np.float32).tobytes(),
            np.asarray(zp, np.int64).tobytes(),
        )


def quant_params(node: gs.Node) -> QuantParams:
    """Scale, zero point and role of a Q/DQ node."""
    data = node.inputs[0]
    scale = node.inputs[1].values if len(node.inputs) > 1 and _constant(node.inputs[1]) else None
    zp_tensor = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    zero_point = zp_tensor.values if zp_tensor is not None and _constant(zp_tensor) else None
    if zero_point is not None:
        zp_dtype = np.dtype(zero_point.dtype)
    elif node.op == "DequantizeLinear" and isinstance(data, gs.Constant):
        zp_dtype = np.dtype(data.values.dtype)
    else:
        zp_dtype = np.dtype(np.uint8)
    role = "activation"
    if isinstance(data, gs.Constant):
        role = "bias" if np.dtype(data.values.dtype) == np.int32 else "weight"
    return QuantParams(node, scale, zero_point, zp_dtype, role)


def _constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def _qdq_nodes(ctx: LintContext) -> list[gs.Node]:
    return [] if ctx.graph is None else [n for n in ctx.graph.nodes if n.op in _QDQ]


@rule("QT101", "q-without-dq", "error", "A QuantizeLinear output is not dequantized.")
def q_without_dq(ctx: LintContext) -> Iterator[Finding]:
    """Q outputs read by other ops: those ops would compute on integer levels."""
    if ctx.graph is None:
        return
    outputs = {t.name for t in ctx.graph.outputs}
    for node in _qdq_nodes(ctx):
        if node.op != "QuantizeLinear":
            continue
        out = node.outputs[0]
        readers = [c for c in out.outputs if c.op != "DequantizeLinear" and c.op not in QOPERATORS]
        if readers:
            names = ", ".join(sorted(c.name for c in readers))
            yield ctx.rule.finding(
                f"QuantizeLinear {node.name} feeds {names} directly; put a DequantizeLinear "
                "between them",
                node=node.name,
                tensor=out.name,
            )
        elif not out.outputs and out.name not in outputs:
            yield ctx.rule.finding(
                f"QuantizeLinear {node.name} output {out.name} is read by nothing",
                node=node.name,
                tensor=out.name,
                severity="warning",
            )


@rule("QT102", "dq-without-q", "warning", "A DequantizeLinear reads a tensor no Q made.")
def dq_without_q(ctx: LintContext) -> Iterator[Finding]:
    """DQ of a computed tensor that does not come from a QuantizeLinear."""
    if ctx.graph is None:
        return
    inputs = {t.name for t in ctx.graph.inputs}
    for node in _qdq_nodes(ctx):
        if node.op != "DequantizeLinear":
            continue
        data = node.inputs[0]
        if isinstance(data, gs.Constant) or data.name in inputs:
            continue
        producer = data.inputs[0] if data.inputs else None
        if producer is not None and producer.op in QOPERATORS:
            continue  # QOperator format: QT110
        if producer is None or producer.op != "QuantizeLinear":
            what = producer.op if producer is not None else "nothing"
            yield ctx.rule.finding(
                f"DequantizeLinear {node.name} reads {data.name}, made by {what}, not by a "
                "QuantizeLinear",
                node=node.name,
                tensor=data.name,
            )


@rule("QT103", "double-quantization", "warning", "A tensor is quantized twice in a row.")
def double_quantization(ctx: LintContext) -> Iterator[Finding]:
    """Q -> DQ -> Q -> DQ: the second pair adds error (or, with equal parameters, nothing)."""
    for node in _qdq_nodes(ctx):
        if node.op != "QuantizeLinear" or isinstance(node.inputs[0], gs.Constant):
            continue
        dq = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if dq is None or dq.op != "DequantizeLinear":
            continue
        q0 = dq.inputs[0].inputs[0] if dq.inputs[0].inputs else None
        if q0 is None or q0.op != "QuantizeLinear":
            continue
        same = quant_params(q0).key == quant_params(node).key
        detail = "with the same scale: remove the second pair" if same else (
            "with another scale: requantization error, keep one scale"
        )
        yield ctx.rule.finding(
            f"{node.inputs[0].name} is quantized again by {node.name} right after {q0.name} "
            f"({detail})",
            node=node.name,
            tensor=node.inputs[0].name,
        )


@rule(
    "QT104", "shared-scale-mismatch", "error",
    "A Concat or data-movement op's quantized inputs and outputs do not share one scale.",
)
def shared_scale_mismatch(ctx: LintContext) -> Iterator[Finding]:
    """Concat inputs (and ops that only move data) must share scale and zero point.

    Every backend requires it (a Concat cannot rescale its inputs in integer arithmetic);
    without ``--backend`` the finding is a warning, since onnxruntime itself runs the graph.
    The converter backends (SNPE/QNN) requantize a Concat input that another node reads too
    (AIMET ties only the inputs the Concat alone reads), so such an input may differ.
    """
    if ctx.graph is None:
        return
    severity = None if ctx.backend else "warning"
    requantized = _converter_requantizes(ctx.backend)
    for node in ctx.graph.nodes:
        if node.op in _QDQ or not shares_scale(node.op, node.attrs, ctx.backend):
            continue
        if node.op == "Concat" and not any(r.op == "QuantizeLinear" for t in node.outputs
                                           for r in t.outputs):
            continue  # read in float (onnxruntime's placement=kernels): no integer Concat
        sides: list[tuple[str, QuantParams]] = []
        data_inputs = node.inputs if node.op == "Concat" else node.inputs[:1]
        for tensor in data_inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if requantized and node.op == "Concat" and len(tensor.outputs) > 1:
                continue
            if producer is not None and producer.op == "DequantizeLinear":
                sides.append((tensor.name, quant_params(producer)))
        for tensor in node.outputs:
            for reader in tensor.outputs:
                if reader.op == "QuantizeLinear":
                    sides.append((tensor.name, quant_params(reader)))
        keys = {p.key for _, p in sides if p.key is not None}
        if len(keys) > 1:
            listed = ", ".join(
                f"{name} (scale {_short(p.scale)}, zp {_short(p.zero_point)})" for name, p in sides
            )
            yield ctx.rule.finding(
                f"{node.op} {node.name} mixes quantization parameters: {listed}; give its "
                "inputs and output one shared scale and zero point",
                node=node.name,
                severity=severity,
            )


def _converter_requantizes(backend: str | None) -> bool:
    """True for a backend with the converter placement (SNPE/QNN: every op output encoded)."""
    if backend is None:
        return False
    from qtool.backends import get_backend

    return get_backend(backend).placement.quantize_outputs


@rule("QT105", "invalid-scale", "error", "A scale is zero, negative, NaN or Inf.")
def invalid_scale(ctx: LintContext) -> Iterator[Finding]:
    """Scales must be finite and positive."""
    for node in _qdq_nodes(ctx):
        params = quant_params(node)
        if params.scale is None:
            continue
        scale = np.asarray(params.scale, dtype=np.float64)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            yield ctx.rule.finding(
                f"{node.op} {node.name} has scale {_short(scale)}; scales must be finite and "
                "positive: recalibrate",
                node=node.name,
                tensor=node.inputs[1].name,
            )


@rule("QT106", "asymmetric-zero-point", "error", "Nonzero zero point on a symmetric backend.")
def asymmetric_zero_point(ctx: LintContext) -> Iterator[Finding]:
    """The backend's scheme fixes the zero point at 0."""
    for params, scheme in _with_schemes(ctx):
        if not scheme.symmetric or params.zero_point is None or params.role == "bias":
            continue
        if np.any(np.asarray(params.zero_point) != 0):
            yield ctx.rule.finding(
                f"{params.node.op} {params.node.name} ({params.role}) has zero point "
                f"{_short(params.zero_point)}; {ctx.backend} quantizes {params.role}s "
                "symmetrically (zero point 0)",
                node=params.node.name,
                tensor=params.node.inputs[0].name,
            )


@rule("QT107", "dtype-mismatch", "error", "Integer type differs from the backend's scheme.")
def dtype_mismatch(ctx: LintContext) -> Iterator[Finding]:
    """int8 where the backend uses uint8 (or the reverse), or another width."""
    for params, scheme in _with_schemes(ctx):
        if params.role == "bias":
            continue
        dtype = params.zero_point_dtype
        signed = np.issubdtype(dtype, np.signedinteger)
        if signed != scheme.signed:
            want = "signed" if scheme.signed else "unsigned"
            yield ctx.rule.finding(
                f"{params.node.op} {params.node.name} ({params.role}) is {dtype.name}; "
                f"{ctx.backend} uses {want} {scheme.bits}-bit {params.role}s",
                node=params.node.name,
                tensor=params.node.inputs[0].name,
            )


@rule("QT108", "non-pot-scale", "error", "A scale is not a power of two.")
def non_pot_scale(ctx: LintContext) -> Iterator[Finding]:
    """Backends that requantize with shifts need scales of the form 2^k."""
    for params, scheme in _with_schemes(ctx):
        if not scheme.power_of_two or params.scale is None or params.role == "bias":
            continue
        scale = np.asarray(params.scale, dtype=np.float64).reshape(-1)
        bad = [s for s in scale if s <= 0 or not math.log2(s).is_integer()]
        if bad:
            yield ctx.rule.finding(
                f"{params.node.op} {params.node.name} ({params.role}) has scale {bad[0]:.6g}, "
                f"not a power of two; {ctx.backend} requantizes with shifts",
                node=params.node.name,
                tensor=params.node.inputs[1].name,
            )


@rule("QT109", "granularity-mismatch", "warning", "Per-channel vs per-tensor weight scales.")
def granularity_mismatch(ctx: LintContext) -> Iterator[Finding]:
    """Weights quantized per channel where the backend wants per tensor, or the reverse."""
    if ctx.backend is None:
        return
    expected = backend_expectations(ctx.backend)
    for params, _ in _with_schemes(ctx):
        if params.role != "weight" or params.scale is None:
            continue
        readers = [n for o in params.node.outputs for n in o.outputs]
        users = {n.op for n in readers}
        wanted = expected.per_channel_weights and (
            expected.per_channel_ops is None or bool(users & expected.per_channel_ops)
        )
        per_channel = np.asarray(params.scale).size > 1
        if per_channel != wanted and not _one_output_channel(params.node, readers):
            have, want = ("per-channel", "per-tensor") if per_channel else (
                "per-tensor", "per-channel")
            yield ctx.rule.finding(
                f"{params.node.op} {params.node.name} quantizes a weight {have}; "
                f"{ctx.backend} uses {want} weight scales",
                node=params.node.name,
                tensor=params.node.inputs[0].name,
            )


def _one_output_channel(node: gs.Node, readers: list[gs.Node]) -> bool:
    """Whether the weight a DQ reads has one output channel for every reader.

    Then one scale is per-tensor and per-channel alike (YOLOv8's DFL head: a 16 -> 1 Conv).
    """
    weight = node.inputs[0]
    shape = getattr(weight, "shape", None)
    if not readers or not shape:
        return False
    for reader in readers:
        if reader.op == "Conv":
            axis = 0
        elif reader.op == "ConvTranspose":
            axis = 1
        elif reader.op == "Gemm":
            axis = 0 if reader.attrs.get("transB", 0) else 1
        elif reader.op == "MatMul":
            axis = len(shape) - 1
        else:
            return False
        if len(shape) <= axis or shape[axis] != 1:
            return False
    return True


@rule("QT110", "qoperator-format", "warning",
      "onnxruntime QOperator model (QLinearConv...): not QDQ.")
def qoperator_format(ctx: LintContext) -> Iterator[Finding]:
    """One finding per model in onnxruntime's QOperator format, naming its integer ops."""
    found = sorted({n.op_type for n in ctx.model.graph.node if n.op_type in QOPERATORS})
    if not found:
        return
    count = sum(n.op_type in QOPERATORS for n in ctx.model.graph.node)
    yield ctx.rule.finding(
        f"onnxruntime QOperator format: {count} integer operator(s) ({', '.join(found)}) "
        "compute on quantized tensors; that is not QDQ, so the Q/DQ rules do not apply to "
        "them. onnxruntime runs it as is; engines that read QDQ (tensorrt, snpe, qnn, ...) "
        "need the float model quantized with quant_format=QuantFormat.QDQ (or qtool "
        "calibrate)",
        node=None,
    )


def _with_schemes(ctx: LintContext) -> Iterator[tuple[QuantParams, QuantScheme]]:
    """Each Q/DQ node's parameters with the backend scheme for its role (backend given)."""
    if ctx.backend is None:
        return
    expected = backend_expectations(ctx.backend)
    for node in _qdq_nodes(ctx):
        # Q nodes, and DQ nodes of stored constants; a DQ after a Q shares the Q's parameters.
        if node.op == "DequantizeLinear" and not isinstance(node.inputs[0], gs.Constant):
            continue
        params = quant_params(node)
        if params.role == "bias":
            continue
        yield params, expected.weight if params.role == "weight" else expected.activation


def _short(values: np.ndarray | None) -> str:
    if values is None:
        return "none"
    flat = np.asarray(values).reshape(-1)
    shown = ", ".join(f"{v:.6g}" if np.issubdtype(flat.dtype, np.floating) else str(v)
                      for v in flat[:3])
    return shown + (f", ... ({flat.size} values)" if flat.size > 3 else "")
