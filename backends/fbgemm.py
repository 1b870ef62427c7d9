"""FBGEMM / x86 (PyTorch's server CPU backend): graph 3, asymmetric uint8 activations.

Rules: weights per-channel asymmetric int8 (FBGEMM's kernels take per-channel zero points),
activations per-tensor asymmetric uint8, bias float (FBGEMM adds it in float), Q/DQ on every
input of every quantizable op including both inputs of Add (MQBench Fig. 4(c)).

Option ``reduce_range`` (default True, as PyTorch's ``get_default_qconfig("fbgemm")``):
activations use 7 bits, levels 0..127 stored in uint8, so that ``vpmaddubsw`` (u8 x s8 pairs
summed into a saturating int16) cannot overflow on CPUs without VNNI: 127 * 128 * 2 = 32512
<= 32767 (engines.md section 4.4). ``reduce_range=false`` gives full 8-bit activations for
CPUs with VNNI; on others their integer kernels saturate (the digits CNN drops from 33 to
17 dB in onnxruntime's kernels).

Files: ``model.qdq.onnx`` (the QDQ graph).
"""

from __future__ import annotations

import dataclasses

from qtool.backends.base import GRAPH_3, Backend, qdq_model_file

from qtool.scheme import QuantScheme

ACTIVATIONS = QuantScheme(bits=8, signed=False, symmetric=False)
REDUCED_RANGE_ACTIVATIONS = QuantScheme(bits=7, signed=False, symmetric=False)


def configure(backend: Backend) -> Backend:
    """Apply ``reduce_range``: 7-bit unsigned activations."""
    scheme = REDUCED_RANGE_ACTIVATIONS if backend.options["reduce_range"] else ACTIVATIONS
    return dataclasses.replace(backend, activation_scheme=scheme)


BACKEND = Backend(
    name="fbgemm",
    summary="per-channel asymmetric int8 weights, asymmetric uint8 activations, 7-bit "
    "(reduce_range) by default (graph 3)",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=False),
    per_channel_weights=True,
    activation_scheme=REDUCED_RANGE_ACTIVATIONS,
    bias_mode="float",
    placement=GRAPH_3,
    emitter=qdq_model_file,
    options={"reduce_range": True},
    configure=configure,
)
