"""Quantization-aware training from the ONNX QDQ graph (torch and onnx2torch: ``qtool[qat]``).

The flow, each step one function::

    result = qtool.qdq.quantize(graph, backend, ranges, plan=plan) # PTQ: the QDQ graph
    model = qtool.qat.to_torch(result, algorithm="lsq")            # onnx2torch + fake-quant
    qtool.qat.recalibrate_bn(model, batches)                       # optional (BN kept)
    qtool.qat.fit(model, loader, loss_fn, epochs=5, lr=1e-3)       # or your own loop
    qat_result = qtool.qat.export(model)                           # learned scales -> QDQ
    qat_result.save("out/")                                        # the backend's emitter

Learned rounding without training (AdaRound, :mod:`qtool.qat.adaround`)::

    rounded, layers = qtool.qat.adaround(result, calibration_samples)

Every Quantize/Dequantize pair becomes one learnable fake-quant module that keeps the
backend's scheme (bits, signedness, symmetry, per-channel axis, narrow range, power of two;
members of a shared-scale group share one module), initialised from the pair's scale and zero
point. Algorithms: LSQ, LSQ+, PACT, DoReFa, DSQ (:mod:`qtool.qat.fake_quant`). BatchNorm can
be kept and trained with MQBench's folding strategies 0-4 (:mod:`qtool.qat.bn`).

Below 8 bits, quantize the graph at opset 21: INT4 storage makes onnxruntime clip to the
4-bit range as the torch model does (``qtool.qat.workflow`` raises the opset itself).

Nothing else in qtool imports torch: importing this package without torch or onnx2torch
raises :class:`qtool.errors.QtoolError` saying what to install.
"""

from __future__ import annotations

from qtool.errors import QtoolError

try:
    import onnx2torch  # noqa: F401
    import torch  # noqa: F401
except ImportError as exc:  # also raised when sys.modules holds None for them
    raise QtoolError(
        f"QAT needs torch and onnx2torch ({exc})", 'pip install "qtool[qat]"'
    ) from None

from qtool.qat.adaround import AdaRoundOptions, adaround  # noqa: E402
from qtool.qat.bn import BN_STRATEGIES, QuantConv, QuantLinear, recalibrate_bn  # noqa: E402
from qtool.qat.export import export  # noqa: E402
from qtool.qat.fake_quant import ALGORITHMS, FakeQuantize, algorithm_names  # noqa: E402
from qtool.qat.importer import QatModel, to_torch  # noqa: E402
from qtool.qat.train import fit, warmup_cosine  # noqa: E402
from qtool.qat.workflow import QatOptions, qat_to_folder  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "AdaRoundOptions",
    "BN_STRATEGIES",
    "FakeQuantize",
    "QatModel",
    "QatOptions",
    "QuantConv",
    "QuantLinear",
    "adaround",
    "algorithm_names",
    "export",
    "fit",
    "qat_to_folder",
    "recalibrate_bn",
    "to_torch",
    "warmup_cosine",
]
