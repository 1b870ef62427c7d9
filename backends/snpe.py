"""Qualcomm SNPE: the float model plus an AIMET encodings file (converter placement).

Rules: weights and activations per-tensor asymmetric uint8, bias left to the converter
(32-bit, computed by SNPE itself), minimum range 0.01 (SNPE widens narrower ranges).

Which tensors get an encoding: exactly those the converter (and AIMET's QuantSim) quantizes,
``placement.quantize_outputs``: the graph inputs and every activation output of an op (Add,
Concat, pooling, the graph outputs...), except a data-movement op's output (Reshape, Flatten,
MaxPool...: it keeps its input's encoding) and an op output read only by a fused activation
(Conv+Relu, Add+Relu: the activation's output is encoded). A Concat's output shares one
encoding with the inputs only it reads; an input another node reads too keeps its own and
the converter requantizes it (AIMET's QuantSim ties them the same way). The QDQ reference
(``model.qdq.onnx``) has one Q/DQ per encoded tensor, read by every consumer, and its graph
outputs are the dequantized values.

Encodings, version 1.0.0 (AIMET 2.x's default; ``encoding_version=0.6.1`` writes the legacy
layout; engines.md section 3.1)::

    {"version": "1.0.0",
     "activation_encodings": [{"name": tensor, "enc_type": "PER_TENSOR", "dtype": "INT",
                               "bw": 8, "is_sym": false, "scale": [s], "offset": [o]}, ...],
     "param_encodings": [{"name": initializer, "enc_type": "PER_TENSOR" | "PER_CHANNEL",
                          ..., "scale": [s, ...one per channel], "offset": [...]}, ...],
     "quantizer_args": {...}}

    0.6.1: {"version": "0.6.1", "activation_encodings": {tensor: [enc]},
            "param_encodings": {initializer: [enc, ...one per channel]}, "quantizer_args": ...}
           enc = {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": ...,
                  "min": ..., "offset": ..., "scale": ...}

QNN dequantizes ``x = (q + offset) * scale`` with ``q`` in ``0 .. 2^bitwidth - 1``, so
``offset = qmin - zero_point``: ``-zero_point`` for the unsigned schemes used here (``-128``
for a signed symmetric int8 one, as AIMET writes it). ``min = offset * scale`` and
``max = (offset + qmax - qmin) * scale``, the grid's end points.

Activation widths: 8 and 16 (``--act-bits 16``: uint16, ``bw`` 16, A16W8), and 2 to 7 for
simulation studies (SNPE's own quantizer takes 8 or 16; ``qnn`` refuses them).

Files: ``model.onnx`` (the float graph, tensor names as in the encodings) and
``model.encodings``. The QDQ graph (``QuantizedModel.graph``) is the onnxruntime reference.
"""

from __future__ import annotations

import dataclasses

from qtool.backends.base import GRAPH_3, Backend, json_bytes, scalar

from qtool.errors import BackendError
from qtool.scheme import QuantScheme

ENCODING_VERSIONS = ("1.0.0", "0.6.1")

#: SNPE's smallest quantization range (its quantizer widens narrower ones).
MIN_RANGE = 0.01

#: Every activation output, as the converter quantizes it (Fig. 4(c) plus outputs).
CONVERTER = dataclasses.replace(GRAPH_3, quantize_outputs=True)

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


def encoding_1_0_0(name: str, qp) -> dict:
    """One AIMET 1.0.0 entry: per tensor or per channel (lists of scales and offsets)."""
    scheme = qp.scheme
    scales = [float(s) for s in qp.scale.reshape(-1)]
    offsets = [int(scheme.qmin - z) for z in qp.zero_point.reshape(-1)]
    return {
        "name": name,
        "enc_type": "PER_CHANNEL" if qp.scale.ndim else "PER_TENSOR",
        "dtype": "INT",
        "bw": scheme.bits,
        "is_sym": scheme.symmetric,
        "scale": scales,
        "offset": offsets,
    }


def _legacy(qp) -> list[dict]:
    if not qp.scale.ndim:
        return [encoding(qp.scheme, scalar(qp.scale), int(qp.zero_point.reshape(-1)[0]))]
    return [
        encoding(qp.scheme, float(s), int(z))
        for s, z in zip(qp.scale.reshape(-1), qp.zero_point.reshape(-1), strict=True)
    ]


def encodings(result) -> dict:
    """The encodings document for a quantized model, in the backend's ``encoding_version``."""
    version = result.backend.options.get("encoding_version", ENCODING_VERSIONS[0])
    sections = {}
    for role, key in (("activation", "activation_encodings"), ("weight", "param_encodings")):
        entries = result.plan.entries(role)
        if version == "0.6.1":
            sections[key] = {e.tensor: _legacy(result.qparams[e.tensor]) for e in entries}
        else:
            sections[key] = [encoding_1_0_0(e.tensor, result.qparams[e.tensor]) for e in entries]
    return {"version": version, **sections, "quantizer_args": _quantizer_args(result)}


def _quantizer_args(result) -> dict:
    backend = result.backend
    activations = result.plan.entries("activation")
    weights = result.plan.entries("weight")
    return {
        "activation_bitwidth": max(
            (e.scheme.bits for e in activations), default=backend.activation_scheme.bits
        ),
        "dtype": "int",
        "is_symmetric": backend.weight_scheme.symmetric,
        "param_bitwidth": max((e.scheme.bits for e in weights), default=backend.weight_scheme.bits),
        "per_channel_quantization": backend.per_channel_weights,
        "quant_scheme": QUANT_SCHEMES.get(result.weight_method, "post_training_tf"),
    }


def emit(result) -> dict[str, bytes]:
    """The float model and its encodings."""
    from qtool.io import serialize

    return {
        "model.onnx": serialize(result.float_graph),
        "model.encodings": json_bytes(encodings(result)),
    }


def configure(backend: Backend) -> Backend:
    """Check ``encoding_version`` (``1.0.0`` or ``0.6.1``).

    Raises:
        BackendError: Another version.
    """
    version = backend.options["encoding_version"]
    if version not in ENCODING_VERSIONS:
        raise BackendError(
            f"backend {backend.name}: encoding_version {version!r} is not supported",
            f"use one of: {', '.join(ENCODING_VERSIONS)}",
        )
    return backend


BACKEND = Backend(
    name="snpe",
    summary="float ONNX + AIMET encodings (1.0.0), asymmetric uint8 per tensor, every op output",
    weight_scheme=QuantScheme(bits=8, signed=False, symmetric=False, min_range=MIN_RANGE),
    per_channel_weights=False,
    activation_scheme=QuantScheme(bits=8, signed=False, symmetric=False, min_range=MIN_RANGE),
    bias_mode="float",
    placement=CONVERTER,
    emitter=emit,
    options={"encoding_version": ENCODING_VERSIONS[0]},
    configure=configure,
    activation_bits_supported=frozenset({*range(2, 9), 16}),
)
