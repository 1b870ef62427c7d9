r"""HQQ (half-quadratic quantization, Badri & Shaji 2023): a data-free grid refit.

Starting from the min/max grid, HQQ alternates between a sparse error ``e`` (a shrinkage of
the rounding error under an ``l_p`` norm, ``p < 1``, so outliers may stay unmatched) and the
zero point that best fits the weights minus that error::

    q   = clip(round(W / s + z))
    e   = shrink_p(W - s (q - z), beta)
    z   = mean_block(q - (W - e) / s)        beta *= kappa

as onnxruntime's ``HQQWeightOnlyQuantizer.optimize_weights`` does (``p = 0.7, beta = 10,
kappa = 1.01``, 20 steps, stopping when the mean error grows). The zero point is a float in
HQQ; the ONNX formats here take integers, so it is rounded at the end. A symmetric format
has no zero point to move: its scale is refit instead by least squares,
``s = <q, W - e> / <q, q>`` per block.
"""

from __future__ import annotations

import numpy as np

from qtool.weight_only.formats import BlockFormat, BlockQuantized
from qtool.weight_only.rtn import block_view, search_grid

LP_NORM, BETA, KAPPA, ITERATIONS = 0.7, 10.0, 1.01, 20


def _shrink(x: np.ndarray, beta: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - (1.0 / beta) * (np.abs(x) + 1e-8) ** (LP_NORM - 1),
                                   0.0)


def hqq(weight: np.ndarray, fmt: BlockFormat) -> BlockQuantized:
    """The HQQ grid of a ``[K, N]`` weight and its levels."""
    rows = weight.shape[0]
    blocks = block_view(weight.astype(np.float64), fmt.block_size)  # [nb, B, N]
    scale, zero = search_grid(weight, fmt, shrink=False)
    scale, zero = scale.astype(np.float64)[:, None], zero.astype(np.float64)[:, None]
    beta, best = BETA, np.inf
    best_scale, best_zero = scale, zero
    for _ in range(ITERATIONS):
        q = np.clip(np.round(blocks / scale + zero), fmt.qmin, fmt.qmax)
        error = blocks - scale * (q - zero)
        mean_error = float(np.abs(error).mean())
        if mean_error >= best:
            break
        best, best_scale, best_zero = mean_error, scale, zero
        target = blocks - _shrink(error, beta)
        if fmt.symmetric:
            centred = q - zero
            denom = np.maximum((centred**2).sum(axis=1, keepdims=True), 1e-12)
            scale = np.maximum((centred * target).sum(axis=1, keepdims=True) / denom, 1e-12)
        else:
            zero = np.mean(q - target / scale, axis=1, keepdims=True)
        beta *= KAPPA
    scale = best_scale[:, 0].astype(np.float32)
    zero = np.clip(np.round(best_zero[:, 0]), fmt.qmin, fmt.qmax).astype(np.int16)
    q = np.clip(np.round(blocks / scale[:, None]) + zero[:, None], fmt.qmin, fmt.qmax)
    levels = q.reshape(-1, weight.shape[1])[:rows].astype(np.int16)
    return BlockQuantized(levels, scale, zero, fmt)
