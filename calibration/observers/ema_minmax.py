r"""EMA MinMax: the mean of the per-batch minima and maxima.

MQBench's EMAMinMax at its fixed point, NNCF's ``mean_min_max`` range estimator:

    lo = (1 / B) * sum_b min(x_b),   hi = (1 / B) * sum_b max(x_b)

over the ``B`` batches seen (per tensor, or per channel along the scheme's axis). A rare
outlier moves one batch's extreme only, so its weight in the range is ``1 / B``: cheaper
than a histogram and it clips what MinMax keeps. The range depends on how the data is cut
into batches (as MQBench's does): calibrate with the same batch size to compare runs.

State: the sums of the per-batch extremes and the batch count, so shards merge exactly (up to
float64 rounding): merging the observers of two shards gives the range of one observer that
saw both shards' batches. MQBench's exponential average ``m <- a m + (1 - a) x_b`` weighs the
batches by their order and cannot be merged; the plain mean is its order-free counterpart.
"""

from __future__ import annotations

import numpy as np
from qtool.calibration.observers.base import Observer


class EMAMinMaxObserver(Observer):
    """Mean over batches of each batch's min and max (per tensor, or per channel)."""

    def __init__(self, scheme=None, name="<tensor>"):
        super().__init__(scheme, name)
        self.batches = 0
        self.min_sum = np.zeros(0)
        self.max_sum = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        """Add one batch's extremes to the sums."""
        observed = self._observed_rows(x)
        if observed is None:
            return
        rows, lo, hi = observed
        self._combine(1, lo, hi)

    def merge(self, other: EMAMinMaxObserver) -> None:
        """Add the other shard's sums and batch count."""
        self._check_mergeable(other)
        self._merge_counts(other)
        if other.batches:
            self._combine(other.batches, other.min_sum, other.max_sum)

    def _combine(self, batches: int, min_sum: np.ndarray, max_sum: np.ndarray) -> None:
        if self.batches == 0:
            self.min_sum, self.max_sum = min_sum.copy(), max_sum.copy()
        else:
            self.min_sum = self.min_sum + min_sum
            self.max_sum = self.max_sum + max_sum
        self.batches += int(batches)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean per-batch extremes; scalars for per-tensor schemes."""
        if self.batches == 0:
            raise self._empty_error()
        return self._per_tensor(self.min_sum / self.batches, self.max_sum / self.batches)
