r"""Norm: LSQ's scale initialisation with a p-norm (MQBench appendix C; l2 by default).

    s = 2 * mean(|x|^p)^(1/p) / sqrt(Q)

with ``Q = qmax`` for symmetric schemes and ``Q = qmax - qmin`` for asymmetric ones (p = 1
is LSQ's ``2 <|x|> / sqrt(Q_P)``). The returned range is the clip range that gives exactly
this scale under the scheme:

* symmetric signed:   ``(-s * qmax, s * qmax)``;
* symmetric unsigned: ``(0, s * qmax)``;
* asymmetric: width ``W = s * (qmax - qmin)`` split around 0 in the proportion of the
  observed range widened to contain 0, ``lo = W * min / (max - min)``, ``hi = lo + W``
  (so the zero point is MinMax's and the scale is ``s``).

The range is not clipped to the observed extremes: at 8 bits it is often wider than them.
State: running ``sum |x|^p``, count, min and max (per channel); merging adds them.
"""

from __future__ import annotations

import numpy as np
from qtool.calibration.observers.base import Observer


class NormObserver(Observer):
    """LSQ-style scale from the p-norm of the values.

    Args:
        scheme: The scheme the range is for.
        name: Tensor name.
        p: Norm order (2 by default; 1 is LSQ's mean absolute value).
    """

    def __init__(self, scheme=None, name="<tensor>", *, p: float = 2.0):
        super().__init__(scheme, name)
        if p <= 0:
            raise ValueError(f"p={p}: the norm order must be positive")
        self.p = float(p)
        self.count = np.zeros(0)
        self.power_sum = np.zeros(0)
        self.min_val = np.zeros(0)
        self.max_val = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        """Add ``sum |x|^p`` and the count of one batch."""
        observed = self._observed_rows(x)
        if observed is None:
            return
        rows, lo, hi = observed
        magnitude = np.abs(rows.astype(np.float64))
        powered = magnitude * magnitude if self.p == 2.0 else magnitude**self.p
        sums = powered.sum(axis=1)
        self._combine(np.full(len(lo), float(rows.shape[1])), sums, lo, hi)

    def merge(self, other: NormObserver) -> None:
        """Add the other shard's sums and counts."""
        self._check_mergeable(other)
        self._merge_counts(other)
        if other.count.size:
            self._combine(other.count, other.power_sum, other.min_val, other.max_val)

    def _combine(self, count, power_sum, lo, hi) -> None:
        if self.count.size == 0:
            self.count, self.power_sum = count.copy(), power_sum.copy()
            self.min_val, self.max_val = lo.copy(), hi.copy()
            return
        self.count = self.count + count
        self.power_sum = self.power_sum + power_sum
        self.min_val = np.minimum(self.min_val, lo)
        self.max_val = np.maximum(self.max_val, hi)

    def scale(self) -> np.ndarray:
        """LSQ's scale ``2 * mean(|x|^p)^(1/p) / sqrt(Q)``, one per channel."""
        if self.count.size == 0:
            raise self._empty_error()
        scheme = self.scheme
        levels = scheme.qmax if scheme.symmetric else scheme.qmax - scheme.qmin
        return 2.0 * (self.power_sum / self.count) ** (1.0 / self.p) / np.sqrt(levels)

    def range(self):
        """The clip range whose scale under the scheme is :meth:`scale`."""
        s = self.scale()
        scheme = self.scheme
        if scheme.symmetric:
            amax = s * scheme.qmax
            lo = -amax if scheme.signed else np.zeros_like(amax)
            return self._per_tensor(lo, amax)
        width = s * (scheme.qmax - scheme.qmin)
        low, high = np.minimum(self.min_val, 0.0), np.maximum(self.max_val, 0.0)
        extent = high - low
        share = np.divide(low, extent, out=np.zeros_like(low), where=extent > 0)
        lo = width * share
        return self._per_tensor(lo, lo + width)
