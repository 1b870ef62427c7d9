r"""KLD: the clip threshold minimising KL(P || Q) between float and quantized histograms.

The TensorRT entropy method (MQBench appendix C, 2048 bins by default) on the histogram of
``|x|`` over exactly ``bins`` linear bins of ``[0, amax]`` (``amax = max |x|``). The streamed
histogram keeps ``FINE`` times more bins on its power-of-two grid
(:class:`HistogramObserver`), folded to ``|x|`` (:meth:`HistogramObserver.abs_histogram`) and
re-binned onto the linear grid, values spread uniformly inside each fine bin
(:func:`linear_rebin`). So the search sees the same ``bins`` bins whatever the data's scale,
and scaling the data by ``k`` scales the threshold by ``k`` (the power-of-two grid alone
leaves between a quarter and all of the bins, and the threshold moved by 20 % over data
scaled by 1 to 2). For each candidate threshold of ``i`` bins, ``i`` from the number of
levels ``L`` (and past the second non-empty bin) to the last non-empty bin:

    P = counts[:i], with the clipped tail counts[i:] added to its last bin
    Q = counts[:i] merged into L equal groups, each group's sum spread evenly over the
        bins of that group that are non-empty in P
    KL(P || Q) = sum_j p_j log(p_j / q_j)   (P, Q normalised; q_j = 0 smoothed to eps)

and the threshold is ``t = i* x width`` for the best ``i*``. As in NVIDIA's
pytorch-quantization, the spike at the low end is flattened before the search: the count
of the lowest non-empty bin becomes that of the next non-empty bin (pytorch-quantization
copies bin 1 into bin 0, which does nothing when bin 1 is empty, as it is on a fine grid
over pooled ReLU features; the spike can also sit away from zero, a ReLU shifted by a
constant). The exact zeros of a ReLU output would otherwise dominate P and pull the
threshold far below the bulk of the values. Candidates keep at least two non-empty bins:
with one, P and Q are the same spike and KL is 0 for a threshold that clips everything
onto one level. ``L`` is the number of levels covering ``[0, t]``: ``qmax + 1`` for
symmetric schemes, ``qmax - qmin + 1`` for asymmetric ones on one-signed data and half of
that when the data has both signs. The range is
``(max(min, -t), min(max, t))``. Every threshold is tried (or ``max_candidates`` evenly
spaced ones): the divergences of all candidates come from cumulative sums in one vectorised
step (:func:`kl_divergences`). Per-channel schemes get one histogram and search per channel.
"""

from __future__ import annotations

import numpy as np
from qtool.calibration.observers.histogram import HistogramObserver

_EPS = 1e-10


#: Fine bins streamed per linear bin of the KL search.
FINE = 8


def linear_rebin(counts: np.ndarray, width: float, amax: float, bins: int) -> np.ndarray:
    """Counts of ``bins`` equal bins over ``[0, amax]`` from counts on bins of ``width`` from 0.

    The counts of a fine bin are spread uniformly over it (the cumulative count is linear
    inside it); mass past ``amax`` (the last fine bin overhangs it) goes to the last bin.
    """
    cumulative = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    edges = np.arange(len(counts) + 1, dtype=np.float64) * width
    targets = np.linspace(0.0, amax, bins + 1)
    at = np.interp(targets, edges, cumulative)
    at[-1] = cumulative[-1]
    return np.maximum(np.diff(at), 0.0)


class KLDObserver(HistogramObserver):
    """Entropy (KL divergence) calibration over the streamed histogram.

    Args:
        scheme: The scheme the range is for.
        name: Tensor name.
        bins: Linear bins of the KL search over ``[0, amax]`` (2048 by default); the streamed
            histogram keeps ``FINE * bins``.
        max_candidates: Thresholds tried at most (None: all).
    """

    def __init__(self, scheme=None, name="<tensor>", *, bins: int = 2048,
                 max_candidates: int | None = None):
        super().__init__(scheme, name, bins=bins * FINE)
        self.kl_bins = int(bins)
        self.max_candidates = max_candidates

    def _levels(self, lo: float, hi: float) -> int:
        scheme = self.scheme
        if scheme.symmetric:
            return scheme.qmax + 1
        levels = scheme.qmax - scheme.qmin + 1
        return levels // 2 if lo < 0.0 < hi else levels

    def _channel_range(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.min_val[c]), float(self.max_val[c])
        fine, fine_width = self.abs_histogram(c)
        amax = max(abs(lo), abs(hi))
        counts = linear_rebin(fine, fine_width, amax, self.kl_bins)
        width = amax / self.kl_bins
        levels = self._levels(lo, hi)
        nonempty = np.flatnonzero(counts)
        if len(counts) <= levels or len(nonempty) < 2:
            return lo, hi
        # A threshold that keeps a single non-empty bin clips every value onto one level: P
        # and Q are then the same spike and KL is 0, a false minimum (data far from zero,
        # e.g. a Sigmoid's output, was clipped just above its minimum). Keep two at least.
        first = int(nonempty[1]) + 1
        candidates = np.arange(max(levels, first), len(counts) + 1)
        if self.max_candidates and len(candidates) > self.max_candidates:
            pick = np.linspace(0, len(candidates) - 1, self.max_candidates).round()
            candidates = candidates[pick.astype(np.int64)]
        # the spike at the low end (ReLU's zeros, or a ReLU shifted by a constant) must not
        # dominate the divergence: it gets the count of the next non-empty bin
        counts[int(nonempty[0])] = counts[int(nonempty[1])]
        divergences = kl_divergences(counts, candidates, levels)
        t = float(candidates[int(np.argmin(divergences))]) * width
        return max(lo, -t), min(hi, t)


def kl_divergences(counts: np.ndarray, candidates: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for every candidate threshold at once, from cumulative sums.

    With ``N`` the total count, ``tail = sum(counts[i:])``, group sums ``S_g`` and numbers
    of non-empty bins ``k_g``, ``q`` is constant on a group, ``q_g = S_g / (k_g (N - tail))``,
    so ``KL = (1/N) sum_j P_j log P_j - log N - (1/N) sum_g (sum_{j in g} P_j) log q_g``:
    a few gathers from cumulative arrays per candidate instead of a loop over bins.
    """
    total = counts.sum()
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    nonempty = np.concatenate([[0], np.cumsum(counts > 0)])
    plogp = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    cumulative_plogp = np.concatenate([[0.0], np.cumsum(plogp)])

    i = candidates[:, None]
    group = candidates[:, None] // levels
    starts = np.arange(levels)[None, :] * group
    ends = np.concatenate([starts[:, 1:], i], axis=1)
    sums = cumulative[ends] - cumulative[starts]
    present = (nonempty[ends] - nonempty[starts]).astype(np.float64)

    tail = total - cumulative[candidates]
    last = counts[candidates - 1]
    last_p = last + tail  # P's last bin takes the clipped tail
    present[:, -1] += (last == 0) & (tail > 0)
    mass = sums.copy()
    mass[:, -1] += tail  # sum of P over each group

    p_log_p = cumulative_plogp[candidates - 1] + np.where(
        last_p > 0, last_p * np.log(np.where(last_p > 0, last_p, 1.0)), 0.0)
    kept = (total - tail)[:, None]
    q = np.divide(sums, present * kept, out=np.zeros_like(sums), where=present > 0)
    q = np.where((mass > 0) & (q <= 0), _EPS, q)
    log_q = np.log(np.where(mass > 0, q, 1.0))
    return p_log_p / total - np.log(total) - (mass * log_q).sum(axis=1) / total
