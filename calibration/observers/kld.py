r"""KLD: the clip threshold minimising KL(P || Q) between float and quantized histograms.

The TensorRT entropy method (MQBench appendix C, 2048 bins by default) on the histogram of
``|x|`` (:meth:`HistogramObserver.abs_histogram`). For each candidate threshold of ``i``
bins, ``i`` from the number of levels ``L`` to the last non-empty bin:

    P = counts[:i], with the clipped tail counts[i:] added to its last bin
    Q = counts[:i] merged into L equal groups, each group's sum spread evenly over the
        bins of that group that are non-empty in P
    KL(P || Q) = sum_j p_j log(p_j / q_j)   (P, Q normalised; q_j = 0 smoothed to eps)

and the threshold is ``t = i* x width`` for the best ``i*``. ``L`` is the number of levels
covering ``[0, t]``: ``qmax + 1`` for symmetric schemes, ``qmax - qmin + 1`` for asymmetric
ones on one-signed data and half of that when the data has both signs. The range is
``(max(min, -t), min(max, t))``. At most ``max_candidates`` thresholds are tried, evenly
spaced. Per-channel schemes get one histogram and one search per channel.
"""

from __future__ import annotations

import numpy as np

from qtool.calibration.observers.histogram import HistogramObserver

_EPS = 1e-10


class KLDObserver(HistogramObserver):
    """Entropy (KL divergence) calibration over the streamed histogram.

    Args:
        scheme: The scheme the range is for.
        name: Tensor name.
        bins: Histogram bins (2048 by default).
        max_candidates: Thresholds tried at most.
    """

    def __init__(self, scheme=None, name="<tensor>", *, bins: int = 2048,
                 max_candidates: int = 512):
        super().__init__(scheme, name, bins=bins)
        self.max_candidates = int(max_candidates)

    def _levels(self, lo: float, hi: float) -> int:
        scheme = self.scheme
        if scheme.symmetric:
            return scheme.qmax + 1
        levels = scheme.qmax - scheme.qmin + 1
        return levels // 2 if lo < 0.0 < hi else levels

    def _channel_range(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.min_val[c]), float(self.max_val[c])
        counts, width = self.abs_histogram(c)
        levels = self._levels(lo, hi)
        if len(counts) <= levels:
            return lo, hi
        counts = counts.astype(np.float64)
        candidates = np.arange(levels, len(counts) + 1)
        if len(candidates) > self.max_candidates:
            pick = np.linspace(0, len(candidates) - 1, self.max_candidates).round()
            candidates = candidates[pick.astype(np.int64)]
        divergences = [kl_divergence_at(counts, int(i), levels) for i in candidates]
        t = float(candidates[int(np.argmin(divergences))]) * width
        return max(lo, -t), min(hi, t)


def kl_divergence_at(counts: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for the threshold at ``i`` bins (see the module docstring)."""
    reference = counts[:i].copy()
    reference[-1] += counts[i:].sum()
    sliced = counts[:i]
    group = i // levels
    starts = np.arange(levels) * group
    lengths = np.diff(np.append(starts, i))
    present = reference > 0
    sums = np.add.reduceat(sliced, starts)
    nonempty = np.add.reduceat(present.astype(np.float64), starts)
    per_bin = np.divide(sums, nonempty, out=np.zeros_like(sums), where=nonempty > 0)
    expanded = np.repeat(per_bin, lengths) * present
    p = reference / reference.sum()
    total = expanded.sum()
    q = expanded / total if total > 0 else expanded
    q = np.where(present & (q <= 0), _EPS, q)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
