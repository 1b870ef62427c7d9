r"""Outputs judged per slice: the part of an output whose range is far below the rest.

A whole-output SQNR is dominated by its largest values: a YOLO head's ``[N, 4 + C, A]``
output reads 41-48 dB while its sigmoid scores (0-1, beside boxes in pixels, 0-320) are at
0-2 dB. So every output is also split in two along the axis where the ranges differ most,
and each side gets its own SQNR.

The split: along each axis but the batch axis (axis 0 of outputs of rank >= 2) with 2 to
:data:`MAX_AXIS` entries, ``p_i`` is the largest ``|x|`` of entry ``i`` over the data; every
cut ``k`` gives two sides, and its gap is ``min(p over the big side) / max(p over the small
side)``. The axis and cut with the widest gap win if it is at least :data:`SPLIT_RATIO` (a
range 8x smaller keeps 3 fewer bits under one scale); otherwise the output is one slice. Each side's

    SQNR (dB) = 10 * log10( sum_side(x^2) / sum_side((x - q)^2) )

over every row of the data. The sums stream: per update one array per axis of per-entry
sums (kept in update order, so shards merged in data order add up the same), never the
outputs.

:func:`worst_slice_sqnr` measures one pair of arrays; :class:`SliceSums` streams batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Largest axis considered for the split (longer axes are anchors or time, summed over).
MAX_AXIS = 65536

#: Gap between the two sides' peaks from which an output is judged in two slices.
SPLIT_RATIO = 8.0


@dataclass(frozen=True)
class Slice:
    """One side of the split: entries ``start:stop`` of ``axis``, its SQNR and peak."""

    axis: int
    start: int
    stop: int
    sqnr_db: float | None
    peak: float

    def label(self, output: str = "") -> str:
        """``output[:, 4:7]``-style text naming the slice."""
        index = [":"] * self.axis + [f"{self.start}:{self.stop}"]
        return f"{output}[{', '.join(index)}]"

    def to_dict(self) -> dict:
        """Plain dict for reports."""
        return {"axis": self.axis, "start": self.start, "stop": self.stop,
                "sqnr_db": self.sqnr_db, "peak": self.peak}


@dataclass(frozen=True)
class SliceResult:
    """The slices of one output (empty when its ranges do not differ enough) and the worst.

    Attributes:
        slices: Both sides of the split, in axis order; empty when not split.
        whole_sqnr_db: The SQNR of the whole output (None: exact).
    """

    slices: tuple[Slice, ...]
    whole_sqnr_db: float | None

    @property
    def worst(self) -> Slice | None:
        """The slice with the lowest SQNR (None when not split)."""
        if not self.slices:
            return None
        return min(self.slices, key=lambda s: math.inf if s.sqnr_db is None else s.sqnr_db)

    @property
    def worst_sqnr_db(self) -> float | None:
        """The lowest of the slices' SQNR and the whole output's (None: exact)."""
        values = [s.sqnr_db for s in self.slices] + [self.whole_sqnr_db]
        finite = [v for v in values if v is not None]
        return min(finite) if finite else None


class SliceSums:
    """Per-entry sums of one output's ``x^2``, ``(x - q)^2`` and peak along its axes."""

    def __init__(self) -> None:
        self.axes: tuple[int, ...] | None = None
        self.signal: dict[int, list[np.ndarray]] = {}
        self.noise: dict[int, list[np.ndarray]] = {}
        self.peak: dict[int, np.ndarray] = {}

    def update(self, x: np.ndarray, q: np.ndarray) -> None:
        """Add one batch of float values ``x`` and quantized values ``q`` (same shape)."""
        x = np.asarray(x, np.float64)
        q = np.asarray(q, np.float64)
        if self.axes is None:
            first = 1 if x.ndim >= 2 else 0
            self.axes = tuple(a for a in range(first, x.ndim) if 2 <= x.shape[a] <= MAX_AXIS)
        squared = x * x
        error = (x - q) ** 2
        magnitude = np.abs(x)
        for axis in self.axes:
            if axis >= x.ndim:
                continue
            old = self.peak.get(axis)
            if old is not None and old.shape != (x.shape[axis],):
                self._drop(axis)  # its size changes between batches: a length, no channels
                continue
            others = tuple(a for a in range(x.ndim) if a != axis)
            self.signal.setdefault(axis, []).append(squared.sum(axis=others))
            self.noise.setdefault(axis, []).append(error.sum(axis=others))
            peak = magnitude.max(axis=others) if x.size else np.zeros(x.shape[axis])
            self.peak[axis] = peak if old is None else np.maximum(old, peak)

    def _drop(self, axis: int) -> None:
        self.axes = tuple(a for a in self.axes if a != axis)
        for sums in (self.signal, self.noise, self.peak):
            sums.pop(axis, None)

    def merge(self, other: SliceSums) -> None:
        """Add another shard's sums (merge shards in data order)."""
        if other.axes is None:
            return
        if self.axes is None:
            self.axes = other.axes
        for axis in set(self.axes) - set(other.axes):
            self._drop(axis)  # dropped in the other shard: ragged there
        for axis in list(other.signal):
            if axis not in self.axes:
                continue
            if axis in self.peak and self.peak[axis].shape != other.peak[axis].shape:
                self._drop(axis)
                continue
            self.signal.setdefault(axis, []).extend(other.signal[axis])
            self.noise.setdefault(axis, []).extend(other.noise[axis])
            old = self.peak.get(axis)
            self.peak[axis] = other.peak[axis] if old is None else np.maximum(
                old, other.peak[axis])

    def totals(self, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-entry ``(sum x^2, sum (x - q)^2, peak |x|)`` along ``axis``."""
        return _total(self.signal[axis]), _total(self.noise[axis]), self.peak[axis]

    def widest_axis(self, ratio: float, first: int = 1) -> int | None:
        """The axis from ``first`` on whose entries' peaks differ most, by more than ``ratio``."""
        best, spread = None, ratio
        for axis in sorted(a for a in self.peak if a >= first):
            live = self.peak[axis][self.peak[axis] > 0]
            if live.size < 2:
                continue
            if float(live.max() / live.min()) > spread:
                best, spread = axis, float(live.max() / live.min())
        return best

    def result(self, whole_sqnr_db: float | None = None) -> SliceResult:
        """The split with the largest peak ratio (see the module docstring)."""
        best = None
        for axis, peak in self.peak.items():
            cut, ratio = _best_cut(peak)
            if cut is not None and ratio >= SPLIT_RATIO and (best is None or ratio > best[2]):
                best = (axis, cut, ratio)
        if best is None:
            return SliceResult((), whole_sqnr_db)
        axis, cut, _ = best
        signal = _total(self.signal[axis])
        noise = _total(self.noise[axis])
        peak = self.peak[axis]
        slices = tuple(
            Slice(axis, start, stop, sqnr_db(signal[start:stop].sum(), noise[start:stop].sum()),
                  float(peak[start:stop].max()))
            for start, stop in ((0, cut), (cut, len(peak))))
        return SliceResult(slices, whole_sqnr_db)


def worst_slice_sqnr(float_values: np.ndarray, quant_values: np.ndarray) -> SliceResult:
    """The slices of one output's float and quantized values (all rows at once).

    ``result.worst_sqnr_db`` is the number to judge by: the lowest of both slices' SQNR and
    the whole output's. Example: ``worst_slice_sqnr(x, q).worst.label("output0")``.
    """
    x = np.asarray(float_values, np.float64)
    q = np.asarray(quant_values, np.float64)
    if x.shape != q.shape:
        raise ValueError(f"float shape {x.shape} and quantized shape {q.shape} differ")
    sums = SliceSums()
    sums.update(x, q)
    return sums.result(sqnr_db(float(np.sum(x * x)), float(np.sum((x - q) ** 2))))


def _best_cut(peak: np.ndarray) -> tuple[int | None, float]:
    """The cut ``k`` (1 .. len-1) with the widest gap between the two sides' peaks.

    The gap of a cut is ``min(peaks of the big side) / max(peaks of the small side)``: every
    entry of one side is that many times above every entry of the other (a cut isolating one
    quiet class channel among the scores has no gap to the other scores).
    """
    if len(peak) < 2:
        return None, 0.0
    left_min = np.minimum.accumulate(peak)[:-1]
    left_max = np.maximum.accumulate(peak)[:-1]
    right_min = np.minimum.accumulate(peak[::-1])[::-1][1:]
    right_max = np.maximum.accumulate(peak[::-1])[::-1][1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = np.maximum(np.where(right_max > 0, left_min / right_max, 0.0),
                          np.where(left_max > 0, right_min / left_max, 0.0))
    gaps = np.nan_to_num(gaps, nan=0.0, posinf=0.0)  # an all-zero side: no range to compare
    if not np.any(gaps > 0):
        return None, 0.0
    k = int(np.argmax(gaps))
    return k + 1, float(gaps[k])


def _total(parts: list[np.ndarray]) -> np.ndarray:
    return np.sum(np.stack(parts), axis=0) if len(parts) > 1 else parts[0]


def sqnr_db(signal: float, noise: float) -> float | None:
    """``10 log10(signal / noise)``; None where the noise is 0 (exact), -inf without signal."""
    if noise == 0.0:
        return None
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
