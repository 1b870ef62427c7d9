"""MinMax: the clip range is the smallest and largest value seen.

    lo = min over all batches of min(x),   hi = max over all batches of max(x)

(per tensor, or per channel along the scheme's axis). Merging shards is exact: the min of
the shards' minima is the minimum of the whole data.
"""

from __future__ import annotations

import numpy as np
from qtool.calibration.observers.base import Observer


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, or per channel along the scheme's axis)."""

    def __init__(self, scheme=None, name="<tensor>"):
        super().__init__(scheme, name)
        self.min_val = np.full(0, np.inf)
        self.max_val = np.full(0, -np.inf)

    def update(self, x: np.ndarray) -> None:
        """Fold one batch into the running min and max."""
        observed = self._observed_rows(x)
        if observed is None:
            return
        rows, lo, hi = observed
        if self.min_val.size == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = np.minimum(self.min_val, lo)
            self.max_val = np.maximum(self.max_val, hi)

    def merge(self, other: MinMaxObserver) -> None:
        """Min of mins, max of maxes."""
        self._check_mergeable(other)
        self._merge_counts(other)
        if other.min_val.size == 0:
            return
        if self.min_val.size == 0:
            self.min_val, self.max_val = other.min_val.copy(), other.max_val.copy()
            return
        self.min_val = np.minimum(self.min_val, other.min_val)
        self.max_val = np.maximum(self.max_val, other.max_val)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The observed extremes; scalars for per-tensor schemes."""
        if self.min_val.size == 0:
            raise self._empty_error()
        return self._per_tensor(self.min_val, self.max_val)
