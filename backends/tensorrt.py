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
* Q/DQ commute through MaxPool, Reshape, Transpose, Concat, Slice; tensors joined by them
  share one scale (TensorRT compares merged scales and refuses to refit when they differ).
* Bias stays float (TensorRT quantizes it internally).

Files:

* ``model.qdq.onnx``: the QDQ graph for explicit quantization.
* ``calibration.cache``: the legacy implicit-quantization cache, first line
  ``TRT-<version>-EntropyCalibration2`` (``version`` option, default 8601 for TensorRT 8.6.1),
  then one line per quantized activation ``<tensor>: <8 hex digits>``, the big-endian IEEE-754
  float32 scale (``amax = scale * 127``).
* ``dynamic_range.json``: ``{tensor: amax}`` for ``ITensor::setDynamicRange(-amax, amax)``.
"""

from __future__ import annotations

import struct

from qtool.backends.base import GRAPH_2, Backend, json_bytes, qdq_model_file, scalar

from qtool.scheme import QuantScheme

CACHE_ALGORITHM = "EntropyCalibration2"


def calibration_cache(result, version: int) -> str:
    """TensorRT's calibration cache text for the quantized activations."""
    lines = [f"TRT-{version}-{CACHE_ALGORITHM}"]
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
    placement=GRAPH_2,
    emitter=emit,
    options={"version": 8601},
)
