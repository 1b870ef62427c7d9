r"""Round to nearest on a blockwise grid, and the grid itself.

The grid of a block comes from its range, shrunk by the ratio ``r`` (from :data:`SHRINK`)
that minimises the block's rounding error weighted by how much each input channel matters::

    err(r) = sum_k h_k * sum_n (W[k, n] - Q_r(W)[k, n])^2

``h_k`` is 1 without data (plain MSE), else the mean of ``x_k^2`` over the calibration data
(the diagonal of ``H = X^T X / rows``), so channels that carry large activations are kept
finer. With ``shrink=False`` the grid is the block's min/max (``r = 1``): the plain RTN of
onnxruntime's ``MatMulNBitsQuantizer``.

* symmetric: ``s = max|W| * r / qmax`` (``qmax = 7`` for 4 bits; level ``-8`` is still
  reachable by rounding), ``z = 0``;
* asymmetric: ``lo = min(W, 0) * r``, ``hi = max(W, 0) * r``, ``s = (hi - lo) / (2^bits - 1)``,
  ``z = clip(round(-lo / s), 0, 2^bits - 1)`` (0 stays exactly representable).
"""

from __future__ import annotations

import numpy as np

from qtool.weight_only.formats import BlockFormat, BlockQuantized, expand, round_to_grid

#: Range shrink ratios searched per block.
SHRINK = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))
_TINY = 1e-12


def block_view(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` as ``[n_blocks, block_size, N]`` (zero rows pad a short last block)."""
    rows, cols = weight.shape
    padded = -(-rows // block_size) * block_size
    if padded != rows:
        weight = np.concatenate([weight, np.zeros((padded - rows, cols), weight.dtype)])
    return weight.reshape(padded // block_size, block_size, cols)


def grid_for_range(lo: np.ndarray, hi: np.ndarray, fmt: BlockFormat):
    """``(scale, zero_point)`` of ranges ``[lo, hi]`` (arrays ``[n_blocks, N]``)."""
    if fmt.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = np.maximum(amax / fmt.qmax, _TINY)
        return scale.astype(np.float32), np.zeros(scale.shape, np.int16)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / (fmt.qmax - fmt.qmin), _TINY).astype(np.float32)
    zero = np.clip(np.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax).astype(np.int16)
    return scale, zero


def search_grid(weight: np.ndarray, fmt: BlockFormat, importance: np.ndarray | None = None,
                *, shrink: bool = True):
    """The grid ``(scale [n_blocks, N], zero_point [n_blocks, N])`` of a ``[K, N]`` weight.

    Args:
        weight: float ``[K, N]``.
        fmt: The block format.
        importance: ``h_k`` per input channel ``[K]`` (None: all 1).
        shrink: Search the shrink ratio (else min/max).
    """
    blocks = block_view(weight.astype(np.float32), fmt.block_size)  # [nb, B, N]
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    if not shrink:
        return grid_for_range(lo, hi, fmt)
    h = np.ones(weight.shape[0], np.float32) if importance is None else importance
    h = block_view(np.asarray(h, np.float32)[:, None], fmt.block_size)  # [nb, B, 1]
    best_err = best_scale = best_zero = None
    for ratio in SHRINK:
        scale, zero = grid_for_range(lo * ratio, hi * ratio, fmt)
        q = np.clip(np.round(blocks / scale[:, None]) + zero[:, None], fmt.qmin, fmt.qmax)
        err = (h * (blocks - scale[:, None] * (q - zero[:, None])) ** 2).sum(axis=1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(np.int16)


def rtn(weight: np.ndarray, fmt: BlockFormat, grid) -> BlockQuantized:
    """Round every weight to its nearest level on ``grid``."""
    scale, zero = grid
    return BlockQuantized(round_to_grid(weight, scale, zero, fmt), scale, zero, fmt)


def weighted_error(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW^T H dW)``: the output error ``||X dW||^2 / rows`` the rounding adds."""
    delta = (weight - dequantized).astype(np.float64)
    return float(np.sum((hessian @ delta) * delta))


__all__ = ["SHRINK", "block_view", "expand", "grid_for_range", "rtn", "search_grid",
           "weighted_error"]
