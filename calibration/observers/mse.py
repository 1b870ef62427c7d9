r"""MSE: the clip range minimising the mean squared quantization error (MQBench appendix C).

For a candidate range ``(l, h)`` the scheme gives ``(s, z)``, and the error over the
histogram (each bin's values taken at its centre ``c_i``, with count ``n_i``) is

    E(l, h) = sum_i n_i * (s * (clamp(round(c_i / s) + z, qmin, qmax) - z) - c_i)^2

* symmetric schemes search ``amax = f * max|x|`` for ``f`` on a grid of ``steps`` fractions
  in (0, 1] (``(0, f * max)`` when unsigned);
* asymmetric schemes search ``h = f * max`` with ``l`` fixed, then ``l = f * min`` with ``h``
  fixed, twice (coordinate descent; the range is widened to contain 0 as the scheme does).

The scale math (power of two, narrow range) is the scheme's own ``qparams``.
"""

from __future__ import annotations

import numpy as np
from qtool.calibration.observers.histogram import HistogramObserver


class MSEObserver(HistogramObserver):
    """Clip range of least squared quantization error over the streamed histogram.

    Args:
        scheme: The scheme the range is searched for.
        name: Tensor name.
        steps: Candidate fractions of the observed extreme tried per search.
        bins: Histogram bins.
    """

    def __init__(self, scheme=None, name="<tensor>", *, steps: int = 256, bins: int = 2048):
        super().__init__(scheme, name, bins=bins)
        if steps < 1:
            raise ValueError(f"steps={steps}: need at least one candidate")
        self.steps = int(steps)

    def _channel_range(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.min_val[c]), float(self.max_val[c])
        nonzero = np.flatnonzero(self.counts[c])
        weights = self.counts[c][nonzero].astype(np.float64)
        centres = np.clip(self.edges_left(c)[nonzero] + 0.5 * self.width(c), lo, hi)
        fractions = np.arange(1, self.steps + 1) / self.steps
        scheme = self.scheme.with_(per_channel_axis=None)
        if scheme.symmetric:
            amax = max(abs(lo), abs(hi)) if scheme.signed else max(hi, 0.0)
            if amax == 0.0:
                return lo, hi
            candidates = fractions * amax
            lows = -candidates if scheme.signed else np.zeros_like(candidates)
            best = candidates[np.argmin(self._errors(scheme, lows, candidates, centres, weights))]
            return (max(lo, -best) if scheme.signed else lo), min(hi, best)
        low, high = min(lo, 0.0), max(hi, 0.0)
        for _ in range(2):
            if hi > 0.0:
                highs = fractions * hi
                errors = self._errors(scheme, np.full_like(highs, low), highs, centres, weights)
                high = float(highs[np.argmin(errors)])
            if lo < 0.0:
                lows = fractions * lo
                errors = self._errors(scheme, lows, np.full_like(lows, high), centres, weights)
                low = float(lows[np.argmin(errors)])
        return max(lo, low), min(hi, high)

    @staticmethod
    def _errors(scheme, lows, highs, centres, weights) -> np.ndarray:
        """Squared error of every candidate range, one per row of ``lows``/``highs``."""
        scale, zero_point = scheme.qparams(lows, highs)
        scale = scale.astype(np.float64)[:, None]
        zero_point = zero_point.astype(np.float64)[:, None]
        levels = np.clip(np.round(centres / scale) + zero_point, scheme.qmin, scheme.qmax)
        error = (levels - zero_point) * scale - centres
        return (error * error) @ weights
