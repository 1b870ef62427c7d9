"""Qualcomm QNN (HTP backend): the float model plus AIMET encodings, per-channel weights.

Rules (QNN HTP, AIMET's per-channel HTP configuration):

* weights of Conv/ConvTranspose/Gemm/MatMul per channel (per-axis encodings,
  ``enc_type: PER_CHANNEL``), symmetric signed int8: ``scale = amax / 127``, offset ``-128``,
  with no minimum range: AIMET writes a channel's encoding as narrow as its weights (a
  BatchNormalization with a huge running variance folds into weights of 1e-4) and the
  converter takes the overrides as given; SNPE's 0.01 floor would leave such a channel a
  few levels;
* activations per tensor asymmetric uint8, or uint16 with ``--act-bits 16`` (A16W8, QNN's
  usual accuracy fallback; encodings with ``bw`` 16); other widths are refused; minimum
  range 0.01;
* bias left to the converter (32-bit), and the converter placement and encodings file of
  :mod:`qtool.backends.snpe` (version 1.0.0, ``encoding_version=0.6.1`` as an option).

Files: ``model.onnx`` and ``model.encodings``; the QDQ graph is the onnxruntime reference.
"""

from __future__ import annotations

from qtool.backends.base import Backend
from qtool.backends.snpe import CONVERTER, ENCODING_VERSIONS, MIN_RANGE, configure, emit

from qtool.scheme import QuantScheme

BACKEND = Backend(
    name="qnn",
    summary="float ONNX + AIMET encodings (1.0.0), per-channel int8 weights, uint8/uint16 "
    "activations (HTP)",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=True),
    per_channel_weights=True,
    activation_scheme=QuantScheme(bits=8, signed=False, symmetric=False, min_range=MIN_RANGE),
    bias_mode="float",
    placement=CONVERTER,
    emitter=emit,
    options={"encoding_version": ENCODING_VERSIONS[0]},
    configure=configure,
    activation_bits_supported=frozenset({8, 16}),
)
