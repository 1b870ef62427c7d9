r"""MeanStd: ``mean ± k * std`` (MQBench appendix C; k = 3 as LSQ+, DSQ uses 2.6).

    range = (max(min, mu - k * sigma), min(max, mu + k * sigma))

with ``sigma`` the population standard deviation, clipped to the observed extremes (a
constant tensor gives ``(c, c)``). State per channel: count, mean and the sum of squared
deviations ``M2``; batches and shards combine with Chan et al.'s pairwise update

    n = n_a + n_b,  d = mu_b - mu_a,  mu = mu_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n

so a merged state equals a single pass up to float64 rounding.
"""

from __future__ import annotations

import numpy as np
from qtool.calibration.observers.base import Observer


class MeanStdObserver(Observer):
    """Clip range of ``k`` standard deviations around the mean.

    Args:
        scheme: The scheme the range is for.
        name: Tensor name.
        k: Number of standard deviations (3 by default).
    """

    def __init__(self, scheme=None, name="<tensor>", *, k: float = 3.0):
        super().__init__(scheme, name)
        if k <= 0:
            raise ValueError(f"k={k}: the number of standard deviations must be positive")
        self.k = float(k)
        self.count = np.zeros(0)
        self.mean = np.zeros(0)
        self.m2 = np.zeros(0)
        self.min_val = np.zeros(0)
        self.max_val = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        """Combine one batch's count, mean and M2 into the running ones."""
        observed = self._observed_rows(x)
        if observed is None:
            return
        rows, lo, hi = observed
        rows = rows.astype(np.float64)
        mean = rows.mean(axis=1)
        deviation = rows - mean[:, None]
        m2 = np.einsum("ij,ij->i", deviation, deviation)
        self._combine(np.full(len(lo), float(rows.shape[1])), mean, m2, lo, hi)

    def merge(self, other: MeanStdObserver) -> None:
        """Chan's pairwise combination of the two shards' statistics."""
        self._check_mergeable(other)
        self._merge_counts(other)
        if other.count.size:
            self._combine(other.count, other.mean, other.m2, other.min_val, other.max_val)

    def _combine(self, count, mean, m2, lo, hi) -> None:
        if self.count.size == 0:
            self.count, self.mean, self.m2 = count.copy(), mean.copy(), m2.copy()
            self.min_val, self.max_val = lo.copy(), hi.copy()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta * delta * self.count * count / total
        self.count = total
        self.min_val = np.minimum(self.min_val, lo)
        self.max_val = np.maximum(self.max_val, hi)

    def range(self):
        """``mean ± k std`` clipped to the observed extremes."""
        if self.count.size == 0:
            raise self._empty_error()
        std = np.sqrt(self.m2 / self.count)
        lo = np.maximum(self.min_val, self.mean - self.k * std)
        hi = np.minimum(self.max_val, self.mean + self.k * std)
        return self._per_tensor(lo, hi)
