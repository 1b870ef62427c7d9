"""MinMax: the clip range is the smallest and largest value seen."""

from __future__ import annotations

import numpy as np

from qtool.calibration.observers.base import Observer


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, or per channel along the scheme's axis)."""

    def __init__(self, scheme=None, name="<tensor>"):
        super().__init__(scheme, name)
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Fold one batch into the running min and max."""
        rows = self._channels_first(x)
        if rows.size == 0:
            return
        self._check_finite(rows)
        lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = np.minimum(self.min_val, lo)
            self.max_val = np.maximum(self.max_val, hi)

    def merge(self, other: MinMaxObserver) -> None:
        """Min of mins, max of maxes."""
        self._check_mergeable(other)
        if other.min_val is None:
            return
        if self.min_val is None:
            self.min_val, self.max_val = other.min_val.copy(), other.max_val.copy()
            return
        self.min_val = np.minimum(self.min_val, other.min_val)
        self.max_val = np.maximum(self.max_val, other.max_val)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The observed extremes; scalars for per-tensor schemes."""
        if self.min_val is None:
            raise self._empty_error()
        if self.scheme.per_channel_axis is None:
            return self.min_val[0], self.max_val[0]
        return self.min_val, self.max_val
