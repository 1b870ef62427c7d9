r"""Fixed-size histograms that re-bin when the range grows, shared by MSE, KLD and Quantile.

The state of one channel is ``bins`` integer counts on a grid of width ``w = 2^e`` whose
edges are the integer multiples of ``w``: value ``x`` falls in absolute bin ``floor(x / w)``,
and the array holds the bins ``start .. start + bins - 1`` with ``start = floor(min / w)``.
The exponent is a function of the observed range alone,

    e(min, max) = max(e_floor, smallest e with floor(max/w) - floor(min/w) + 1 <= bins)

with ``e_floor = exponent(max|x|) - 24`` (finer bins than float32 resolves are useless).
Because ``w`` is a power of two, ``x / w`` is exact and a bin of width ``2^(e+k)`` is exactly
the union of ``2^k`` bins of width ``2^e``. So re-binning when the range grows only adds
counts (torch's ``HistogramObserver`` re-bins by interpolating, which blurs), and
``merge()`` (the same re-bin applied to two states) gives exactly the histogram of a single
pass over all the data, in any order: sharded calibration equals one process bit for bit.
The price of the power-of-two width: the data fills between half and all of the bins.

Subclasses turn the histogram into a clip range (:meth:`HistogramObserver.range`); they
never see the activations themselves.
"""

from __future__ import annotations

import math

import numpy as np
from qtool.calibration.observers.base import Observer

_FLOAT32_MANTISSA = 24
_CHUNK = 1 << 16  # values binned per step: temporaries of 256-512 KB stay in cache


def grid_exponent(lo: float, hi: float, bins: int) -> int:
    """The bin width exponent ``e`` (width ``2^e``) for the range ``[lo, hi]``.

    Args:
        lo: Observed minimum.
        hi: Observed maximum (``>= lo``).
        bins: Number of bins the range must fit in.

    Returns:
        The smallest admissible exponent (see the module docstring); monotone in the range,
        so the exponent of a merged range is the max of the shards' exponents or larger.
    """
    amax = max(abs(lo), abs(hi))
    e_floor = math.frexp(amax)[1] - _FLOAT32_MANTISSA if amax > 0 else -126
    span = hi - lo
    e = e_floor
    if span > 0:
        # fitting needs w >= span / bins: start at the smallest such power of two
        mantissa, exponent = math.frexp(span / bins)
        e = max(e, exponent - 1 if mantissa == 0.5 else exponent)
    while math.floor(hi * 2.0**-e) - math.floor(lo * 2.0**-e) + 1 > bins:
        e += 1
    return e


class HistogramObserver(Observer):
    """Streaming histogram per tensor (or per channel); subclasses define :meth:`range`.

    Args:
        scheme: The scheme the range is searched for.
        name: Tensor name, for error messages.
        bins: Number of bins kept per channel (fixed; the grid coarsens as the range grows).

    Attributes:
        counts: ``(channels, bins)`` int64 counts.
        exponent: ``(channels,)`` bin width exponents (width ``2^exponent``).
        start: ``(channels,)`` absolute index of the first bin.
        min_val: ``(channels,)`` observed minima.
        max_val: ``(channels,)`` observed maxima.
    """

    def __init__(self, scheme=None, name="<tensor>", *, bins: int = 2048):
        super().__init__(scheme, name)
        if bins < 2:
            raise ValueError(f"bins={bins}: a histogram needs at least 2 bins")
        self.bins = int(bins)
        self.counts = np.zeros((0, self.bins), dtype=np.int64)
        self.exponent = np.zeros(0, dtype=np.int64)
        self.start = np.zeros(0, dtype=np.int64)
        self.min_val = np.zeros(0)
        self.max_val = np.zeros(0)

    @property
    def empty(self) -> bool:
        """True before any value was observed."""
        return self.counts.shape[0] == 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch to the histogram, coarsening the grid first if the range grew."""
        observed = self._observed_rows(x)
        if observed is None:
            return
        rows, lo, hi = observed
        if rows.dtype not in (np.float32, np.float64):
            rows = rows.astype(np.float32)
        if self.empty:
            self._init_state(len(lo))
            self.min_val, self.max_val = lo, hi
        else:
            self._check_channels(len(lo))
            self.min_val = np.minimum(self.min_val, lo)
            self.max_val = np.maximum(self.max_val, hi)
        chunk = min(_CHUNK, rows.shape[1])
        scaled = np.empty(chunk, dtype=rows.dtype)
        index = np.empty(chunk, dtype=np.intp)
        for c in range(len(lo)):
            self._regrid(c)
            factor = rows.dtype.type(2.0 ** -int(self.exponent[c]))
            offset = rows.dtype.type(self.start[c])
            # in cache-sized chunks, as np.histogram does: over a whole activation the four
            # temporaries each make a trip through memory (1.8x slower on MobileNet-V2)
            for first in range(0, rows.shape[1], chunk):
                part = rows[c, first : first + chunk]
                bins_of = scaled[: len(part)]
                np.multiply(part, factor, out=bins_of)  # exact: a power-of-two scaling
                np.floor(bins_of, out=bins_of)
                bins_of -= offset  # integers below 2^25: exact
                positions = index[: len(part)]
                positions[...] = bins_of
                self.counts[c] += np.bincount(positions, minlength=self.bins)

    def merge(self, other: HistogramObserver) -> None:
        """Add another shard's histogram: both are re-binned onto the grid of the union."""
        self._check_mergeable(other)
        self._merge_counts(other)
        if other.bins != self.bins:
            raise TypeError(f"cannot merge a {other.bins}-bin histogram into {self.bins} bins")
        if other.empty:
            return
        if self.empty:
            self._init_state(other.counts.shape[0])
            self.min_val, self.max_val = other.min_val.copy(), other.max_val.copy()
            self.exponent, self.start = other.exponent.copy(), other.start.copy()
            self.counts = other.counts.copy()
            return
        self._check_channels(other.counts.shape[0])
        self.min_val = np.minimum(self.min_val, other.min_val)
        self.max_val = np.maximum(self.max_val, other.max_val)
        for c in range(self.counts.shape[0]):
            self._regrid(c)
            e = int(self.exponent[c])
            moved = _rebin(other.counts[c], int(other.exponent[c]), int(other.start[c]),
                           e, int(self.start[c]), self.bins)
            self.counts[c] += moved

    def load_state(self, other: HistogramObserver) -> None:
        """Take another histogram's state as this one's, on this one's bins (any subclass).

        ``other`` may keep ``2^k`` times more bins: its grid is then re-binned onto the grid
        this observer would have streamed (the width of a bin is a power of two, so a
        coarse bin is exactly the union of ``2^k`` fine ones, and the streamed exponent is
        :func:`grid_exponent` of the final range). The counts equal this observer's own over
        the same data, bit for bit. ``--method auto`` bins each tensor once and reads every
        histogram method's range from that one histogram.

        Raises:
            TypeError: ``other.bins`` is not ``2^k`` times ``bins``, or the per-channel axes
                differ.
        """
        ratio, rest = divmod(other.bins, self.bins)
        if rest or ratio & (ratio - 1):
            raise TypeError(f"cannot take a {other.bins}-bin histogram as {self.bins} bins")
        if other.scheme.per_channel_axis != self.scheme.per_channel_axis:
            raise TypeError(f"{self.name}: histograms of different per-channel axes")
        self.masked, self.infinite = other.masked, other.infinite
        self.min_val, self.max_val = other.min_val.copy(), other.max_val.copy()
        if ratio == 1 or other.empty:
            self.counts, self.exponent = other.counts.copy(), other.exponent.copy()
            self.start = other.start.copy()
            if other.empty:
                self.counts = np.zeros((0, self.bins), dtype=np.int64)
            return
        self._init_state(other.counts.shape[0])
        for c in range(self.counts.shape[0]):
            e = max(int(other.exponent[c]),
                    grid_exponent(float(self.min_val[c]), float(self.max_val[c]), self.bins))
            start = math.floor(float(self.min_val[c]) * 2.0**-e)
            self.counts[c] = _rebin(other.counts[c], int(other.exponent[c]),
                                    int(other.start[c]), e, start, self.bins)
            self.exponent[c], self.start[c] = e, start

    def range(self):
        """The clip range the subclass's criterion picks from each channel's histogram."""
        if self.empty:
            raise self._empty_error()
        lo = np.empty(self.counts.shape[0])
        hi = np.empty(self.counts.shape[0])
        for c in range(self.counts.shape[0]):
            if self.min_val[c] == self.max_val[c]:  # one value: every criterion keeps it
                lo[c], hi[c] = self.min_val[c], self.max_val[c]
            else:
                lo[c], hi[c] = self._channel_range(c)
        return self._per_tensor(lo, hi)

    def _channel_range(self, channel: int) -> tuple[float, float]:
        raise NotImplementedError

    # -- histogram views used by the subclasses -------------------------------------------

    def width(self, channel: int) -> float:
        """Bin width of one channel."""
        return 2.0 ** int(self.exponent[channel])

    def edges_left(self, channel: int) -> np.ndarray:
        """Left edge of every bin of one channel."""
        return (self.start[channel] + np.arange(self.bins)) * self.width(channel)

    def abs_histogram(self, channel: int) -> tuple[np.ndarray, float]:
        """Counts of ``|x|`` on bins ``[i*w', (i+1)*w')`` from 0, at most ``bins`` of them.

        The grid's edges are multiples of ``w``, so folding the negative side onto the
        positive one is exact (absolute bin ``-i-1`` holds ``|x|`` in ``[i*w, (i+1)*w)``);
        the result is coarsened by powers of two until it fits in ``bins``.

        Returns:
            ``(counts, width)``, trailing empty bins trimmed.
        """
        counts = self.counts[channel]
        nonzero = np.flatnonzero(counts)
        absolute = nonzero + self.start[channel]
        folded = np.where(absolute >= 0, absolute, -absolute - 1)
        shift = 0
        while (int(folded.max()) >> shift) + 1 > self.bins:
            shift += 1
        out = np.zeros((int(folded.max()) >> shift) + 1, dtype=np.int64)
        np.add.at(out, folded >> shift, counts[nonzero])
        return out, self.width(channel) * 2.0**shift

    # -- state -----------------------------------------------------------------------------

    def _init_state(self, channels: int) -> None:
        self.counts = np.zeros((channels, self.bins), dtype=np.int64)
        self.exponent = np.full(channels, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self.start = np.zeros(channels, dtype=np.int64)

    def _check_channels(self, channels: int) -> None:
        if channels != self.counts.shape[0]:
            raise TypeError(
                f"{self.name}: {channels} channels observed after {self.counts.shape[0]}"
            )

    def _regrid(self, c: int) -> None:
        """Move channel ``c`` onto the grid of its current (possibly grown) range."""
        lo, hi = float(self.min_val[c]), float(self.max_val[c])
        e = max(int(self.exponent[c]), grid_exponent(lo, hi, self.bins))
        start = math.floor(lo * 2.0**-e)
        if e == self.exponent[c] and start == self.start[c]:
            return
        if self.counts[c].any():
            self.counts[c] = _rebin(self.counts[c], int(self.exponent[c]), int(self.start[c]),
                                    e, start, self.bins)
        self.exponent[c], self.start[c] = e, start


def _rebin(counts: np.ndarray, e_old: int, start_old: int, e_new: int, start_new: int,
           bins: int) -> np.ndarray:
    """Counts on the grid ``(e_old, start_old)`` moved to the coarser grid ``(e_new, start_new)``.

    Absolute bin ``i`` of width ``2^e_old`` lies inside bin ``i >> (e_new - e_old)`` of width
    ``2^e_new`` (an arithmetic shift is a floor division, negative indices included).
    """
    nonzero = np.flatnonzero(counts)
    target = ((nonzero + start_old) >> (e_new - e_old)) - start_new
    out = np.zeros(bins, dtype=np.int64)
    np.add.at(out, target, counts[nonzero])
    return out


def quantile_from_counts(counts: np.ndarray, left: float, width: float, q: float) -> float:
    """The ``q`` quantile of histogrammed data, values spread uniformly inside each bin.

    Args:
        counts: Bin counts.
        left: Left edge of bin 0.
        width: Bin width.
        q: Quantile in [0, 1].

    Returns:
        A value in the bin where the cumulative count reaches ``q * total``: within one bin
        width of the exact quantile of the data.
    """
    cumulative = np.cumsum(counts, dtype=np.float64)
    target = q * cumulative[-1]
    j = int(np.searchsorted(cumulative, target, side="left"))
    j = min(j, len(counts) - 1)
    before = cumulative[j - 1] if j > 0 else 0.0
    fraction = (target - before) / counts[j] if counts[j] else 0.0
    return left + (j + min(max(fraction, 0.0), 1.0)) * width
