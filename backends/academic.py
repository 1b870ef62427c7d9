"""Academic setting (MQBench's baseline): per-tensor symmetric int8 everywhere, graph 1.

Rules: weights and activations per-tensor symmetric signed int8 (``scale = amax / 127``,
zero point 0), Q/DQ only on the inputs of Conv/ConvTranspose/Gemm/MatMul and on their
weights (MQBench Fig. 4(a)); bias, elementwise ops and pooling stay float. A pure
simulation: any activation width from 2 to 16 bits (9 to 16 stored as int16 at opset 21).

Files: ``model.qdq.onnx`` (the QDQ graph).
"""

from __future__ import annotations

from qtool.backends.base import GRAPH_1, Backend, qdq_model_file

from qtool.scheme import QuantScheme

BACKEND = Backend(
    name="academic",
    summary="per-tensor symmetric int8, only inputs of Conv/Gemm/MatMul (MQBench graph 1)",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=True),
    per_channel_weights=False,
    activation_scheme=QuantScheme(bits=8, signed=True, symmetric=True),
    bias_mode="float",
    placement=GRAPH_1,
    emitter=qdq_model_file,
    activation_bits_supported=frozenset(range(2, 17)),  # a simulation: 9-16 bits in int16
)
