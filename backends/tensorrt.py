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
    placement=GRAPH_2,
    emitter=emit,
    options={"version": 8601},
    file_activation_bits=(8,),
)
