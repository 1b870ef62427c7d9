"""TVM (Relay-era automatic quantization, ``weight_scale="power2"``): power-of-two scales, graph 3.

Rules: weights and activations per-tensor symmetric int8 with scales restricted to powers of
two, so requantization is a bit shift; bias int32 with ``scale = s_in * s_w`` (itself a power
of two); Q/DQ on every input of every quantizable op including both inputs of Add (MQBench
Fig. 4(c)).

The exponent is not simply rounded up (TVM's "power2" rounds ``amax`` up, which never clips
but can waste half of the levels): qtool's scheme picks ``k`` in ``{floor, ceil}`` of
``log2(amax / 127)`` with the lower expected squared error for values spread over the observed
range (see :mod:`qtool.scheme`).

Files: ``model.qdq.onnx`` and ``shifts.json``::

    {"scale_form": "2^shift",
     "activation_shifts": {tensor: shift}, "param_shifts": {initializer: shift}}

with ``scale == 2 ** shift`` exactly (biases included under ``param_shifts``).
"""

from __future__ import annotations

import math

from qtool.backends.base import GRAPH_3, Backend, json_bytes, qdq_model_file, scalar

from qtool.errors import BackendError
from qtool.scheme import QuantScheme


def shift(tensor: str, scale: float) -> int:
    """``k`` with ``scale == 2**k``.

    Raises:
        BackendError: The scale is not a power of two (a plan edited by hand).
    """
    mantissa, exponent = math.frexp(scale)
    if mantissa != 0.5:
        raise BackendError(f"tvm: scale {scale} of {tensor} is not a power of two")
    return exponent - 1


def shifts(result) -> dict:
    """The shift table of a quantized model."""
    table = {"scale_form": "2^shift", "activation_shifts": {}, "param_shifts": {}}
    for entry in result.plan.tensors.values():
        key = "activation_shifts" if entry.role == "activation" else "param_shifts"
        table[key][entry.tensor] = shift(entry.tensor, scalar(result.qparams[entry.tensor].scale))
    return table


def emit(result) -> dict[str, bytes]:
    """QDQ model with power-of-two scales and the shift table."""
    files = qdq_model_file(result)
    files["shifts.json"] = json_bytes(shifts(result))
    return files


BACKEND = Backend(
    name="tvm",
    summary="power-of-two per-tensor symmetric int8, every Add input quantized (graph 3)",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=True, power_of_two=True),
    per_channel_weights=False,
    activation_scheme=QuantScheme(bits=8, signed=True, symmetric=True, power_of_two=True),
    bias_mode="int32",
    placement=GRAPH_3,
    emitter=emit,
)
