r"""Does the Q/DQ reference hold in onnxruntime's integer kernels? Measured, and flagged by rule.

``model.qdq.onnx`` is judged with onnxruntime's graph optimizations off: every
DequantizeLinear runs in float, the pure Q/DQ simulation. With the default optimizations
onnxruntime fuses ``DQ -> op -> Q`` into integer kernels (QLinearConv, QGemm, ...), and on x86
CPUs without VNNI those multiply u8 x s8 with ``vpmaddubsw``, which sums pairs of products
into a *saturating* int16: with ``A`` activation levels (s8 activations are shifted to u8)
and weights up to ``|W|`` levels, a pair reaches ``2 * (A - 1) * |W|``, which overflows 32767
for 8-bit activations and 8-bit weights (255 * 127 * 2 = 64770). Hence two checks:

* **measured**: the output SQNR against the float model, simulated and in the kernels, on the
  first ``max_samples`` evaluation samples (this CPU; a loss over ``MAX_LOSS_DB`` warns);
* **rule**: :func:`saturation_risk` from the backend's schemes (any x86 CPU without VNNI).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: A kernel run losing more than this (dB) against the simulation is reported.
MAX_LOSS_DB = 1.0
_INT16_MAX = 32767


@dataclass
class KernelCheck:
    """Simulation vs onnxruntime's integer kernels for one quantized model.

    Attributes:
        samples: Rows compared (0: the check could not run).
        simulated_sqnr_db: Output SQNR vs float, optimizations off (None: exact).
        kernels_sqnr_db: Output SQNR vs float, default optimizations (None: exact).
        saturation_risk: The schemes overflow ``vpmaddubsw`` on x86 without VNNI.
        vnni: Whether this CPU has VNNI (None: unknown).
        error: Why the measurement could not run, or None.
    """

    samples: int
    simulated_sqnr_db: float | None
    kernels_sqnr_db: float | None
    saturation_risk: bool
    vnni: bool | None
    error: str | None = None

    @property
    def loss_db(self) -> float | None:
        """How much worse the kernels are than the simulation (dB), None if not measured."""
        if self.samples == 0:
            return None
        sim = math.inf if self.simulated_sqnr_db is None else self.simulated_sqnr_db
        ker = math.inf if self.kernels_sqnr_db is None else self.kernels_sqnr_db
        if math.isinf(sim) and math.isinf(ker):
            return 0.0
        return sim - ker

    def warnings(self, backend: str) -> list[str]:
        """Report lines: a measured loss, and the rule's flag."""
        lines = []
        loss = self.loss_db
        if loss is not None and loss > MAX_LOSS_DB:
            lines.append(
                f"onnxruntime's integer kernels (default optimizations) give "
                f"{_db(self.kernels_sqnr_db)} where the Q/DQ simulation gives "
                f"{_db(self.simulated_sqnr_db)}: model.qdq.onnx does not hold in onnxruntime "
                "on this CPU (use --backend onnxruntime, or reduce_range)"
            )
        if self.saturation_risk:
            lines.append(
                f"{backend}'s 8-bit activations x 8-bit weights overflow onnxruntime's u8 x s8 "
                "kernels on x86 CPUs without VNNI: run model.qdq.onnx there with "
                "optimizations off, or quantize with --backend onnxruntime"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return {
            "samples": self.samples,
            "simulated_sqnr_db": _round(self.simulated_sqnr_db),
            "kernels_sqnr_db": _round(self.kernels_sqnr_db),
            "loss_db": _round(self.loss_db),
            "saturation_risk_without_vnni": self.saturation_risk,
            "cpu_vnni": self.vnni,
            "error": self.error,
        }


def saturation_risk(backend) -> bool:
    """Whether ``vpmaddubsw`` (u8 x s8 pairs into int16) can overflow with these schemes.

    Unsigned weights run u8 x u8 kernels (widened, no saturation) and are never at risk.
    """
    weights, acts = backend.weight_scheme, backend.activation_scheme
    if not weights.signed or weights.bits > 8 or acts.bits > 8:
        return False
    weight_max = max(abs(weights.qmin), abs(weights.qmax))
    return 2 * (acts.qmax - acts.qmin) * weight_max > _INT16_MAX


def check_kernels(
    quant_model: Any,
    float_model: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    backend,
    max_samples: int = 64,
) -> KernelCheck:
    """Run the QDQ model with optimizations off and on, and the float model, on a few samples.

    Args:
        quant_model: The QDQ model (anything qtool.io.serialize takes).
        float_model: The float model with the same inputs and outputs.
        batches: Feed dicts (extra keys such as ``labels`` are ignored).
        backend: The :class:`qtool.backends.base.Backend` the model was made for.
        max_samples: Stop after this many rows.

    Returns:
        The :class:`KernelCheck` (``samples == 0`` and ``error`` set if a session failed).
    """
    from qtool.backends.onnxruntime import cpu_has_vnni

    risk, vnni = saturation_risk(backend), cpu_has_vnni()
    try:
        sessions = [_session(float_model, False), _session(quant_model, False),
                    _session(quant_model, True)]
    except Exception as exc:  # onnxruntime raises its own exception types
        return KernelCheck(0, None, None, risk, vnni, _first_line(exc))
    names = {i.name for i in sessions[0].get_inputs()}
    sums = [[0.0, 0.0], [0.0, 0.0]]  # (signal, noise) for simulated, kernels
    rows = 0
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in names}
        try:
            reference, *quantized = (s.run(None, feeds) for s in sessions)
        except Exception as exc:  # onnxruntime raises its own exception types
            return KernelCheck(0, None, None, risk, vnni, _first_line(exc))
        for index, outputs in enumerate(quantized):
            for x, q in zip(reference, outputs, strict=True):
                x = np.asarray(x, dtype=np.float64)
                sums[index][0] += float((x**2).sum())
                sums[index][1] += float(((x - q) ** 2).sum())
        rows += int(next(iter(feeds.values())).shape[0]) if feeds else 1
        if rows >= max_samples:
            break
    sqnr = [None if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
            for signal, noise in sums]
    return KernelCheck(rows, sqnr[0], sqnr[1], risk, vnni)


def _session(model: Any, optimize: bool):
    import onnxruntime as ort

    from qtool.io import serialize

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else serialize(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _db(value: float | None) -> str:
    return "exact outputs" if value is None else f"{value:.1f} dB"


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(value, 3) + 0.0  # no -0.0 in report.json


__all__ = ["MAX_LOSS_DB", "KernelCheck", "check_kernels", "saturation_risk"]
