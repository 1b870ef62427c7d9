r"""Quantile: clip the rarest ``1 - q`` of the values (MQBench appendix C, q = 0.9999).

* symmetric signed schemes: ``t = quantile(|x|, q)``, range ``(max(min, -t), min(max, t))``;
* other schemes: ``(quantile(x, 1 - q), quantile(x, q))``.

Quantiles are read from the streaming histogram (:mod:`.histogram`), values spread uniformly
within a bin, so the result is within one bin width of ``np.quantile`` on all the data.
"""

from __future__ import annotations

from qtool.calibration.observers.histogram import HistogramObserver, quantile_from_counts


class QuantileObserver(HistogramObserver):
    """Clip range at the ``q`` quantile of the observed values.

    Args:
        scheme: The scheme the range is for.
        name: Tensor name.
        q: Quantile kept, in (0.5, 1]; 0.9999 by default.
        bins: Histogram bins.
    """

    def __init__(self, scheme=None, name="<tensor>", *, q: float = 0.9999, bins: int = 2048):
        super().__init__(scheme, name, bins=bins)
        if not 0.5 < q <= 1.0:
            raise ValueError(f"q={q}: the quantile kept must be in (0.5, 1]")
        self.q = float(q)

    def _channel_range(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.min_val[c]), float(self.max_val[c])
        if self.scheme.symmetric and self.scheme.signed:
            counts, width = self.abs_histogram(c)
            t = quantile_from_counts(counts, 0.0, width, self.q)
            t = min(t, max(abs(lo), abs(hi)))
            return max(lo, -t), min(hi, t)
        left, width = float(self.edges_left(c)[0]), self.width(c)
        low = quantile_from_counts(self.counts[c], left, width, 1.0 - self.q)
        high = quantile_from_counts(self.counts[c], left, width, self.q)
        return max(lo, low), min(hi, high)
