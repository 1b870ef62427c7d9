r"""GPTQ (Frantar et al. 2022): rounding that compensates each error in the rows still to come.

Round input channel by input channel, pushing each rounding error onto the channels not yet
rounded, weighted by the inverse Hessian of the layer.

For a MatMul ``Y = X W`` (``W`` is ``[K, N]``) the output error of a weight change ``dW`` is
``tr(dW^T H dW)`` with ``H = X^T X / rows`` over the calibration inputs (streamed,
:mod:`qtool.weight_only.stats`). With ``U`` the upper Cholesky factor of ``H^-1`` (``H``
damped by ``DAMP * mean(diag H)``), rounding row ``k`` of ``W`` to ``q_k`` and updating::

    e_k       = (W[k] - q_k) / U[k, k]
    W[k+1:]  -= U[k, k+1:]^T e_k

is the optimal compensation of that rounding by the rows after it (the OBS update), done in
lazy batches of :data:`BATCH` rows. Rows go in the order of decreasing ``H[k, k]``
(``act_order``: the channels with the largest activations are rounded first, while the most
rows are left to absorb their error). The grid of every block is fixed before the loop
(``static groups``, from the original weights), so each row's grid is known whatever the
order and the levels fit every format (DequantizeLinear, MatMulNBits, LPBQ) without a
``g_idx``.
"""

from __future__ import annotations

import numpy as np

from qtool.weight_only.formats import BlockFormat, BlockQuantized

DAMP = 0.01
BATCH = 128


def inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``H^-1`` (damped more if ``H`` is not positive definite)."""
    size = hessian.shape[0]
    damp = DAMP * max(float(np.mean(np.diag(hessian))), 1e-12)
    for _ in range(8):
        try:
            damped = hessian + damp * np.eye(size)
            lower = np.linalg.cholesky(damped)
            inverse = np.linalg.inv(lower)
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            damp *= 10
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")


def gptq(weight: np.ndarray, hessian: np.ndarray, fmt: BlockFormat, grid,
         *, act_order: bool = True) -> BlockQuantized:
    """GPTQ levels of a ``[K, N]`` weight on a fixed blockwise ``grid`` (scale, zero point)."""
    scale, zero = grid
    rows = weight.shape[0]
    work = weight.astype(np.float64).copy()
    hessian = np.array(hessian, dtype=np.float64)
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    work[dead] = 0.0
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    work = work[order]
    upper = inverse_cholesky(hessian[np.ix_(order, order)])
    blocks = order // fmt.block_size  # the grid row of each permuted row
    row_scale = scale.astype(np.float64)[blocks]  # [K, N]
    row_zero = zero.astype(np.float64)[blocks]
    levels = np.zeros(work.shape, np.int16)
    for start in range(0, rows, BATCH):
        stop = min(start + BATCH, rows)
        errors = np.zeros((stop - start, work.shape[1]))
        for k in range(start, stop):
            q = np.clip(np.round(work[k] / row_scale[k]) + row_zero[k], fmt.qmin, fmt.qmax)
            levels[k] = q
            error = (work[k] - row_scale[k] * (q - row_zero[k])) / upper[k, k]
            work[k + 1:stop] -= np.outer(upper[k, k + 1:stop], error)
            errors[k - start] = error
        work[stop:] -= upper[start:stop, stop:].T @ errors
    restored = np.empty_like(levels)
    restored[order] = levels
    return BlockQuantized(restored, scale, zero, fmt)
