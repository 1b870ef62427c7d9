"""onnxruntime's CPU integer kernels: QDQ placed where onnxruntime's QDQ transformers fuse it.

onnxruntime (optimizations on, the default) rewrites ``DQ -> op -> Q`` node units into integer
kernels (``onnxruntime/core/optimizer/qdq_transformer/selectors_actions``): Conv ->
QLinearConv, MatMul -> QLinearMatMul, Gemm -> QGemm, Add/Mul -> QLinearAdd/QLinearMul,
Concat -> QLinearConcat, AveragePool/GlobalAveragePool -> QLinear*, LeakyRelu/Sigmoid ->
QLinear*, and drops the Q/DQ pairs around data movement (MaxPool, Reshape, Transpose,
Flatten, Squeeze, Unsqueeze, Slice, Resize, ...) when both sides share one scale. A Relu or
Clip between an op and its Q is removed when the Q's range starts at 0 (ReluQuantFusion,
ClipQuantFusion). So, unlike the engines that fuse a placement of their own, every activation
that flows between such ops is quantized, which puts a Q after each op's output:

* every activation input of Conv/ConvTranspose/Gemm/MatMul and of every op above, pass-through
  ops included (they share their input's scale, as the drop rules require);
* Relu and Clip run fused (no Q/DQ of their own); LeakyRelu, Sigmoid, HardSigmoid and
  HardSwish get quantized inputs (onnxruntime has QLinear kernels for them);
* weights per output channel, symmetric int8; int32 biases with ``s_in * s_w`` (what
  QLinearConv and QGemm take);
* activations per tensor, asymmetric uint8 (option ``activations=int8`` for int8: for ARM;
  on x86 onnxruntime shifts int8 activations to uint8 and then fuses only part of the graph).

Option ``reduce_range`` (default True, safe everywhere): weights use 7 bits, levels
-64..63 in int8, as onnxruntime's own quantizer does with ``reduce_range``: on x86 CPUs without
VNNI, MLAS multiplies u8 x s8 with ``vpmaddubsw``, which sums pairs into a saturating int16,
and 255 * 64 * 2 = 32640 cannot overflow (255 * 128 * 2 can). Set ``reduce_range=false`` for
targets with VNNI (avx512_vnni/avx_vnni) or ARM; :func:`cpu_has_vnni` tells whether this
machine has it.

Files: ``model.qdq.onnx`` (run it with onnxruntime's default graph optimizations).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qtool.backends.base import (
    PASS_THROUGH_OPS,
    SHARING_OPS,
    WEIGHTED_OPS,
    Backend,
    Placement,
    qdq_model_file,
)

from qtool.errors import BackendError
from qtool.scheme import QuantScheme

#: Ops with a QLinear/QDQ kernel in onnxruntime whose activation inputs get Q/DQ.
KERNEL_OPS = frozenset(
    {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid",
     "HardSigmoid", "HardSwish"}
)

PLACEMENT = Placement(
    graph=3,
    weighted_ops=WEIGHTED_OPS,
    activation_ops=KERNEL_OPS | frozenset(PASS_THROUGH_OPS) | SHARING_OPS,
    # onnxruntime's uint8 Resize (what DQ -> Resize -> Q becomes, laid out NHWC) takes
    # nearest and linear only: a ViT's bicubic position-embedding Resize failed to load with
    # the default optimizations (issue 21); a cubic Resize stays float.
    activation_attributes={"Resize": {"mode": frozenset({"nearest", "linear"})}},
)

WEIGHTS = QuantScheme(bits=8, signed=True, symmetric=True)
REDUCED_RANGE_WEIGHTS = QuantScheme(bits=7, signed=True, symmetric=True)
ACTIVATIONS = {
    "uint8": QuantScheme(bits=8, signed=False, symmetric=False),
    "int8": QuantScheme(bits=8, signed=True, symmetric=False),
}


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU has VNNI (None when /proc/cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def configure(backend: Backend) -> Backend:
    """Apply ``reduce_range`` (7-bit weights) and ``activations`` (uint8 or int8)."""
    kind = backend.options["activations"]
    if kind not in ACTIVATIONS:
        raise BackendError(
            f"backend onnxruntime: activations={kind!r} is not one of "
            f"{', '.join(ACTIVATIONS)}",
            "e.g. --backend-option activations=int8",
        )
    weights = REDUCED_RANGE_WEIGHTS if backend.options["reduce_range"] else WEIGHTS
    return dataclasses.replace(backend, weight_scheme=weights, activation_scheme=ACTIVATIONS[kind])


BACKEND = Backend(
    name="onnxruntime",
    summary="onnxruntime's CPU integer kernels: per-channel symmetric int8 weights (7-bit by "
    "default), uint8 activations, a Q/DQ around every kernel onnxruntime fuses",
    weight_scheme=REDUCED_RANGE_WEIGHTS,
    per_channel_weights=True,
    activation_scheme=ACTIVATIONS["uint8"],
    bias_mode="int32",
    placement=PLACEMENT,
    emitter=qdq_model_file,
    fused_activations=frozenset({"Relu", "Clip"}),
    options={"reduce_range": True, "activations": "uint8"},
    configure=configure,
)
