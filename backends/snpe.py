"""Qualcomm SNPE / QNN: the float model plus an AIMET encodings file (MQBench graph 3).

Rules: weights and activations per-tensor asymmetric uint8, bias left to the converter
(32-bit, computed by SNPE/QNN itself), Q/DQ on every input of every quantizable op.

Encodings, AIMET 0.6.1 layout (engines.md section 3.1)::

    {"version": "0.6.1",
     "activation_encodings": {tensor: [enc]},
     "param_encodings": {initializer: [enc, ...one per channel]},
     "quantizer_args": {...}}
    enc = {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": ..., "min": ...,
           "offset": ..., "scale": ...}

QNN dequantizes ``x = (q + offset) * scale`` with ``q`` in ``0 .. 2^bitwidth - 1``, so
``offset = qmin - zero_point``: ``-zero_point`` for the unsigned schemes used here (``-128``
for a signed symmetric int8 one, as AIMET writes it). ``min = offset * scale`` and
``max = (offset + qmax - qmin) * scale``, the grid's end points.

Files: ``model.onnx`` (the float graph, tensor names as in the encodings) and
``model.encodings``. The QDQ graph (``QuantizedModel.graph``) is the onnxruntime reference.
"""

from __future__ import annotations

from qtool.backends.base import GRAPH_3, Backend, json_bytes, scalar

from qtool.scheme import QuantScheme

ENCODING_VERSION = "0.6.1"

#: AIMET's name of the range search, by qtool observer name.
QUANT_SCHEMES = {
    "minmax": "post_training_tf",
    "mse": "post_training_tf_enhanced",
    "quantile": "post_training_percentile",
}


def encoding(scheme: QuantScheme, scale: float, zero_point: int) -> dict:
    """One AIMET 0.6.1 encoding entry for one scale and zero point."""
    offset = int(scheme.qmin - zero_point)
    steps = scheme.qmax - scheme.qmin
    return {
        "bitwidth": scheme.bits,
        "dtype": "int",
        "is_symmetric": "True" if scheme.symmetric else "False",
        "max": float(scale) * (offset + steps),
        "min": float(scale) * offset,
        "offset": offset,
        "scale": float(scale),
    }


def encodings(result) -> dict:
    """The encodings document for a quantized model."""
    activations = {}
    for entry in result.plan.entries("activation"):
        qp = result.qparams[entry.tensor]
        activations[entry.tensor] = [
            encoding(qp.scheme, scalar(qp.scale), int(qp.zero_point.reshape(-1)[0]))
        ]
    params = {}
    for entry in result.plan.entries("weight"):
        qp = result.qparams[entry.tensor]
        params[entry.tensor] = [
            encoding(qp.scheme, float(s), int(z))
            for s, z in zip(qp.scale.reshape(-1), qp.zero_point.reshape(-1), strict=True)
        ]
    act_scheme = result.backend.activation_scheme
    weight_entries = result.plan.entries("weight")
    return {
        "version": ENCODING_VERSION,
        "activation_encodings": activations,
        "param_encodings": params,
        "quantizer_args": {
            "activation_bitwidth": max(
                (e.scheme.bits for e in result.plan.entries("activation")),
                default=act_scheme.bits,
            ),
            "dtype": "int",
            "is_symmetric": act_scheme.symmetric,
            "param_bitwidth": max(
                (e.scheme.bits for e in weight_entries), default=result.backend.weight_scheme.bits
            ),
            "per_channel_quantization": result.backend.per_channel_weights,
            "quant_scheme": QUANT_SCHEMES.get(result.weight_method, "post_training_tf"),
        },
    }


def emit(result) -> dict[str, bytes]:
    """The float model and its encodings."""
    from qtool.io import serialize

    return {
        "model.onnx": serialize(result.float_graph),
        "model.encodings": json_bytes(encodings(result)),
    }


BACKEND = Backend(
    name="snpe",
    summary="float ONNX + AIMET encodings, asymmetric uint8 per tensor (graph 3)",
    weight_scheme=QuantScheme(bits=8, signed=False, symmetric=False),
    per_channel_weights=False,
    activation_scheme=QuantScheme(bits=8, signed=False, symmetric=False),
    bias_mode="float",
    placement=GRAPH_3,
    emitter=emit,
)
