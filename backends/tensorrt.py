"""TensorRT explicit quantization (MQBench graph 2, NVIDIA's Q/DQ placement rules).

Rules (engines.md section 2.4):

* int8 is symmetric: weights per output channel in ``[-127, 127]`` (narrow range), activations
  per tensor in ``[-128, 127]`` with ``scale = amax / 127``; zero points are 0.
* Q/DQ on every input of Conv/ConvTranspose/Gemm/MatMul and on their weights, on pooling
  inputs (AveragePool, GlobalAveragePool), and on the *shortcut* of a residual Add: the other
  input, produced by a Conv (BN folded) that feeds only the Add, stays float because TensorRT
  fuses the Add into that conv's output. When both inputs are such conv outputs (a
  downsampling block), the last one is fused and the other quantized, as MQBench does. A bias
  Add after a MatMul is fused the same way. Weighted-op outputs are not quantized.
* Only residual Adds get Q/DQ (:mod:`qtool.residual_add`, as ModelOpt): an Add of a constant
  (``x + 3`` of a HardSwish, a detector's anchor grid) or of two results of one tensor (a
  YOLOv8 head's ``(anchor - lt) + (anchor + rb)``) is fused into the kernel before it and
  runs in float. Quantized, the YOLOv8 box decoding cost 15 points of mAP (issue 24).
* Q/DQ commute through MaxPool, Reshape, Transpose, Concat, Slice; tensors joined by them
  share one scale (TensorRT compares merged scales and refuses to refit when they differ).
* ``int8_conv_rule`` (default true; ``--backend-option int8_conv_rule=false`` turns it off):
  a Conv TensorRT has no int8 kernel for stays float (:func:`int8_conv_kernel`, ModelOpt's
  ``find_nodes_from_convs_to_exclude``): fewer than 16 input or output channels, except a
  dense Conv with a multiple of 8 channels on one side (square kernel; at the graph input, or
  16 channels on the other side) and a grouped one with a multiple of 8 output channels and
  kernels of at least 3. TensorRT runs such a conv in float anyway (its Q/DQ are honoured as
  fake quantization), so the rule costs no speed and removes noise: PP-OCR's classifier
  16.6 -> 33.2 dB, ahead of ModelOpt's 24.7 (issue 24, ``benchmarks/bench_peers.py``). Each
  such Conv is in the plan's ``float_nodes`` (plan.json, the report's plan table) with its
  channels; its input is in the calibration cache only when a quantized op also reads it.
* Bias stays float (TensorRT quantizes it internally).
* Activations are 8-bit only: TensorRT reads ``amax = 127 * scale`` from the cache, so any
  other width would be read wrong; a plan with other widths is refused.

Files:

* ``model.qdq.onnx``: the QDQ graph for explicit quantization.
* ``calibration.cache``: the legacy implicit-quantization cache, first line
  ``TRT-<version>-<algorithm>`` (``version`` option, default 8601 for TensorRT 8.6.1; the
  algorithm is TensorRT's calibrator name for the calibration method, :data:`ALGORITHMS`),
  then one line per quantized activation ``<tensor>: <8 hex digits>``, the big-endian IEEE-754
  float32 scale (``amax = scale * 127``).
* ``dynamic_range.json``: ``{tensor: amax}`` for ``ITensor::setDynamicRange(-amax, amax)``.
"""

from __future__ import annotations

import dataclasses
import struct

from qtool.backends.base import GRAPH_2, Backend, json_bytes, qdq_model_file, scalar

from qtool.errors import BackendError
from qtool.scheme import QuantScheme

#: TensorRT's calibrator (``CalibrationAlgoType``) names by qtool calibration method: KL
#: divergence is IInt8EntropyCalibrator2, min/max IInt8MinMaxCalibrator, a quantile
#: IInt8LegacyCalibrator (quantile and regression cutoff). Methods TensorRT has no calibrator
#: for get its default, EntropyCalibration2 (TensorRT compares only the name on reading).
ALGORITHMS = {
    "kld": "EntropyCalibration2",
    "minmax": "MinMaxCalibration",
    "quantile": "LegacyCalibration",
}
DEFAULT_ALGORITHM = "EntropyCalibration2"


#: TensorRT's int8 convolutions want this many channels on each side (ModelOpt's rule).
MIN_INT8_CHANNELS = 16
#: ... or a multiple of this many on one side (the exceptions of :func:`int8_conv_kernel`).
CHANNEL_MULTIPLE = 8


def int8_conv_kernel(node) -> str | None:
    """Why TensorRT has no int8 kernel for this Conv (None: it has one).

    ModelOpt's ``find_nodes_from_convs_to_exclude`` (int8), which encodes TensorRT's int8
    convolution kernels: below 16 input or output channels only a dense Conv with a square
    kernel and a multiple of 8 channels on one side (at the graph input or with 16 channels
    on the other side), or a grouped one with a multiple of 8 output channels and every
    kernel dim >= 3, runs in int8. Weights not constant: left to the placement.
    """
    weight = node.inputs[1] if node.op == "Conv" and len(node.inputs) > 1 else None
    shape = getattr(weight, "shape", None)
    if weight is None or getattr(weight, "values", None) is None or not shape or len(shape) < 3:
        return None
    out_channels, in_channels = int(shape[0]), int(shape[1])
    if out_channels >= MIN_INT8_CHANNELS and in_channels >= MIN_INT8_CHANNELS:
        return None
    group = int(node.attrs.get("group", 1))
    kernel = [int(k) for k in node.attrs.get("kernel_shape", shape[2:])]
    source = node.inputs[0]
    at_graph_input = not source.inputs and getattr(source, "values", None) is None
    if group == 1:
        if ((out_channels % CHANNEL_MULTIPLE == 0 or in_channels % CHANNEL_MULTIPLE == 0)
                and (at_graph_input or max(out_channels, in_channels) >= MIN_INT8_CHANNELS)
                and len(set(kernel)) == 1):
            return None
    elif out_channels % CHANNEL_MULTIPLE == 0 and all(k >= 3 for k in kernel):
        return None
    return (f"Conv with {out_channels} output / {in_channels} input channels (group {group}): "
            "TensorRT has no int8 kernel for it (ModelOpt's channel rule); it runs in float")


#: MQBench's graph 2 with TensorRT's int8 convolution kernels (``int8_conv_rule=true``).
PLACEMENT = dataclasses.replace(GRAPH_2, weighted_kernel=int8_conv_kernel)


def configure(backend: Backend) -> Backend:
    """``int8_conv_rule``: the placement with or without TensorRT's int8 convolution rule."""
    placement = PLACEMENT if backend.options["int8_conv_rule"] else GRAPH_2
    return dataclasses.replace(backend, placement=placement)


def algorithm(method: str | None) -> str:
    """The cache header's calibrator name for a calibration method name."""
    return ALGORITHMS.get(method or "", DEFAULT_ALGORITHM)


def calibration_cache(result, version: int) -> str:
    """TensorRT's calibration cache text for the quantized activations.

    Raises:
        BackendError: An activation is not 8-bit (TensorRT reads ``amax = 127 * scale``).
    """
    result.backend.check_plan(result.plan)
    lines = [f"TRT-{version}-{algorithm(getattr(result, 'activation_method', None))}"]
    for entry in result.plan.entries("activation"):
        scale = scalar(result.qparams[entry.tensor].scale)
        lines.append(f"{entry.tensor}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def dynamic_ranges(result) -> dict[str, float]:
    """``{tensor: amax}`` with ``amax = scale * qmax`` (float32 scale; qmax 127 for int8)."""
    return {
        entry.tensor: scalar(result.qparams[entry.tensor].scale) * entry.scheme.qmax
        for entry in result.plan.entries("activation")
    }


def emit(result) -> dict[str, bytes]:
    """QDQ model, calibration cache and dynamic-range JSON."""
    files = qdq_model_file(result)
    version = result.backend.options["version"]
    if version <= 0:
        raise BackendError(f"tensorrt: version={version} must be TensorRT's version digits",
                           "e.g. --backend-option version=8601 for TensorRT 8.6.1")
    files["calibration.cache"] = calibration_cache(result, version).encode("utf-8")
    files["dynamic_range.json"] = json_bytes(dynamic_ranges(result))
    return files


BACKEND = Backend(
    name="tensorrt",
    summary="symmetric int8, per-channel [-127,127] weights, residual shortcut only (graph 2)",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=True, narrow_range=True),
    per_channel_weights=True,
    activation_scheme=QuantScheme(bits=8, signed=True, symmetric=True),
    bias_mode="float",
    placement=PLACEMENT,  # int8_conv_rule's default (configure() only runs on options)
    emitter=emit,
    options={"version": 8601, "int8_conv_rule": True},
    configure=configure,
    file_activation_bits=(8,),
)
