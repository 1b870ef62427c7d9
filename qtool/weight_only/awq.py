r"""AWQ-style activation-aware scaling (Lin et al. 2023), searched on the calibration data.

A MatMul computes ``X W = (X diag(1/s)) (diag(s) W)``. Scaling up the rows of ``W`` that meet
large activations gives them finer levels of their block; the input is divided by ``s``
before the MatMul (folded into the op that produces it, or an explicit float Mul:
:mod:`qtool.weight_only.emit`). Per input channel::

    s_k = m_k^alpha / sqrt(max(m^alpha) * min(m^alpha)),    m_k = mean |x_k|

and ``alpha`` in :data:`ALPHAS` is the one whose quantized weights give the least output
error ``sum_layers tr(dW^T H dW)`` (``dW = W - diag(1/s) Q(diag(s) W)``, ``H = X^T X /
rows``), computed from the streamed Hessian, so no activation is kept. ``alpha = 0`` is
plain rounding: the search is never worse than it on the calibration data. MatMuls that read
the same input share one ``s`` (AWQ's Q/K/V grouping).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qtool.weight_only.formats import BlockFormat, BlockQuantized
from qtool.weight_only.rtn import rtn, search_grid, weighted_error

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
_FLOOR = 1e-4


@dataclass
class ScaleChoice:
    """The scales of one input tensor and the alpha they came from."""

    scales: np.ndarray  # float32 [K]
    alpha: float
    error: float  # the output error at this alpha
    plain_error: float  # at alpha = 0


def scales_for(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s = m^alpha`` normalised to geometric mid-range 1 (alpha 0: all ones)."""
    s = np.maximum(np.asarray(mean_abs, np.float64), _FLOOR) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.maximum(s, _FLOOR).astype(np.float32)


def rtn_rounding(weight: np.ndarray, fmt: BlockFormat, importance: np.ndarray) -> BlockQuantized:
    """RTN on the grid searched with ``importance`` (AWQ's rounding while it searches)."""
    return rtn(weight, fmt, search_grid(weight, fmt, importance))


def search_scales(weights: Sequence[np.ndarray], hessian: np.ndarray, mean_abs: np.ndarray,
                  fmt: BlockFormat,
                  rounding: Callable[..., BlockQuantized] = rtn_rounding) -> ScaleChoice:
    """The alpha of least output error for MatMuls sharing one input (see the module doc)."""
    diag = np.diag(hessian).astype(np.float32)
    errors = {}
    for alpha in ALPHAS:
        s = scales_for(mean_abs, alpha)
        total = 0.0
        for weight in weights:
            scaled = weight * s[:, None]
            quantized = rounding(scaled, fmt, diag / s**2)
            total += weighted_error(weight, quantized.dequantize() / s[:, None], hessian)
        errors[float(alpha)] = total
    best = min(errors, key=lambda a: (errors[a], a))
    return ScaleChoice(scales_for(mean_abs, best), best, errors[best], errors[0.0])
