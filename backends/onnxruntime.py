"""onnxruntime's CPU integer kernels: QDQ placed where onnxruntime's QDQ transformers fuse it.

onnxruntime (optimizations on, the default) rewrites ``DQ -> op -> Q`` node units into integer
kernels (``onnxruntime/core/optimizer/qdq_transformer/selectors_actions``): Conv ->
QLinearConv, MatMul -> QLinearMatMul, Gemm -> QGemm, Add/Mul -> QLinearAdd/QLinearMul,
Concat -> QLinearConcat, AveragePool/GlobalAveragePool -> QLinear*, LeakyRelu/Sigmoid ->
QLinear*, and drops the Q/DQ pairs around data movement (MaxPool, Reshape, Transpose,
Flatten, Squeeze, Unsqueeze, Slice, Resize, ...) when both sides share one scale. A Relu or
Clip between an op and its Q is removed when the Q's range starts at 0 (ReluQuantFusion,
ClipQuantFusion). But a Conv fuses only with a Q on its output: ``DQ -> Conv`` read in float
runs as a float Conv (and NNCF's ONNX models, which quantize no HardSwish/SiLU input, run most
of a MobileNetV3/PP-LCNet in float there). onnxruntime has no integer HardSwish or
HardSigmoid kernel (they run in float between a DQ and a Q).

Placements (option ``placement``):

* ``kernels`` (default): the inputs and the output of every Conv/ConvTranspose/Gemm/MatMul
  (after the Relu/Clip fused into it), nothing else. Every weighted op is an integer kernel,
  and an Add, Mul, Concat or pooling between such ops fuses too, since its neighbours are
  quantized anyway; where the op is read in float (the inside of a decomposed HardSwish,
  an SE block's gate, a Concat into a Sigmoid head or a graph output) nothing is quantized
  that no kernel needs, so no noise is added that buys no speed. A Concat ties its inputs'
  scales only when its output is quantized (QLinearConcat); read in float, each input keeps
  its own (0-1 scores beside 0-320 boxes do not collapse).
* ``all``: the placement of qtool 0.x: every activation input of the weighted ops, of Add,
  Mul, Concat, AveragePool/GlobalAveragePool, LeakyRelu, Sigmoid, HardSigmoid, HardSwish and
  of the pass-through ops (they share their input's scale, as the drop rules require).

In both, Relu and Clip run fused (no Q/DQ of their own), and:

* weights per output channel, symmetric int8; int32 biases with ``s_in * s_w`` (what
  QLinearConv and QGemm take);
* activations per tensor, asymmetric uint8 (option ``activations=int8`` for int8: for ARM;
  on x86 onnxruntime shifts int8 activations to uint8 and then fuses only part of the graph).

Option ``target_cpu`` (``--target-cpu``; ``auto``, the default, reads the CPU qtool runs on,
:mod:`qtool.cpu`) decides the weights' width: on x86 CPUs without VNNI (``avx2``) MLAS
multiplies u8 x s8 with ``vpmaddubsw``, which sums pairs into a saturating int16, so weights
use 7 bits, levels -64..63 in int8, as onnxruntime's quantizer does with ``reduce_range``
(255 * 64 * 2 = 32640 cannot overflow, 255 * 128 * 2 can). With VNNI/AMX (``vnni``) and on ARM
(``arm``) nothing saturates and weights keep 8 bits (onnxruntime's own default,
``reduce_range=False``). Option ``reduce_range=false`` keeps 8 bits even for ``avx2``.

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

from qtool.cpu import VNNI_FLAGS, CpuTarget, cpu_flags, resolve_target
from qtool.scheme import QuantScheme

#: Ops with a QLinear/QDQ kernel in onnxruntime whose activation inputs get Q/DQ.
KERNEL_OPS = frozenset(
    {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid",
     "HardSigmoid", "HardSwish"}
)

#: onnxruntime's uint8 Resize (what DQ -> Resize -> Q becomes, laid out NHWC) takes nearest
#: and linear only: a ViT's bicubic position-embedding Resize failed to load with the default
#: optimizations (issue 21); a cubic Resize stays float, and nothing before it is quantized
#: for it.
KERNEL_ATTRIBUTES = {"Resize": {"mode": frozenset({"nearest", "linear"})}}

#: ``placement=all``: every input onnxruntime can fuse (MQBench graph 3).
PLACEMENT_ALL = Placement(
    graph=3,
    weighted_ops=WEIGHTED_OPS,
    activation_ops=KERNEL_OPS | frozenset(PASS_THROUGH_OPS) | SHARING_OPS,
    activation_attributes=KERNEL_ATTRIBUTES,
)
#: ``placement=kernels`` (default): the inputs and outputs of the weighted ops only.
PLACEMENT = Placement(graph=1, weighted_ops=WEIGHTED_OPS, quantize_weighted_outputs=True,
                      kernel_ops=KERNEL_OPS - {"HardSigmoid", "HardSwish"},
                      activation_attributes=KERNEL_ATTRIBUTES)
PLACEMENTS = {"kernels": PLACEMENT, "all": PLACEMENT_ALL}

WEIGHTS = QuantScheme(bits=8, signed=True, symmetric=True)
REDUCED_RANGE_WEIGHTS = QuantScheme(bits=7, signed=True, symmetric=True)
ACTIVATIONS = {
    "uint8": QuantScheme(bits=8, signed=False, symmetric=False),
    "int8": QuantScheme(bits=8, signed=True, symmetric=False),
}


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU has VNNI or AMX (None when its flags cannot be read)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & VNNI_FLAGS)


def target_of(backend: Backend) -> CpuTarget:
    """The CPU the backend's ``target_cpu`` option names (``auto``: this one)."""
    return resolve_target(backend.options["target_cpu"])


def reduces_range(backend: Backend) -> bool:
    """Whether weights use 7 bits: ``reduce_range`` on and a target that saturates."""
    return backend.options["reduce_range"] and target_of(backend).saturates


def target_note(backend: Backend) -> str:
    """One line for the summary: the target assumed, the weights it gave, how to change it."""
    target = target_of(backend)
    bits = backend.weight_scheme.bits
    others = [f"--target-cpu {name} ({_DESCRIPTION[name]})"
              for name in ("vnni", "avx2", "arm") if name != target.name]
    return (f"target CPU: {target.description}, {target.source()}: {bits}-bit weights; "
            f"for another CPU pass {' or '.join(others)}")


def configure(backend: Backend) -> Backend:
    """Apply the options: weights' width, activations' type, placement."""
    activations = backend.option_choice("activations", ACTIVATIONS,
                                        "e.g. --backend-option activations=int8")
    placement = backend.option_choice(
        "placement", PLACEMENTS,
        "e.g. --backend-option placement=all for a Q/DQ around every kernel onnxruntime has")
    weights = REDUCED_RANGE_WEIGHTS if reduces_range(backend) else WEIGHTS
    return dataclasses.replace(backend, weight_scheme=weights, activation_scheme=activations,
                               placement=placement)


#: Weights' width per target in notes.
_DESCRIPTION = {"vnni": "x86 with VNNI/AMX: 8-bit weights", "avx2": "x86 without VNNI: "
                "7-bit weights", "arm": "ARM: 8-bit weights"}

BACKEND = Backend(
    name="onnxruntime",
    summary="onnxruntime's CPU integer kernels: per-channel symmetric int8 weights (7-bit for "
    "x86 without VNNI), uint8 activations, Q/DQ on the inputs and outputs of Conv/Gemm/MatMul",
    weight_scheme=WEIGHTS,
    per_channel_weights=True,
    activation_scheme=ACTIVATIONS["uint8"],
    bias_mode="int32",
    placement=PLACEMENT,
    emitter=qdq_model_file,
    fused_activations=frozenset({"Relu", "Clip"}),
    options={"target_cpu": "auto", "reduce_range": True, "activations": "uint8",
             "placement": "kernels"},
    configure=configure,
)
BACKEND = configure(BACKEND)  # the default's weights follow this CPU
