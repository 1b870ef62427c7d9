r"""``--method auto``: per tensor, the calibration method whose range quantizes it best.

One onnxruntime session, fed the calibration data and then the judging data (``judge_data``:
held-out data, bounded; none: the calibration data judges itself, with no second pass):

1. Every candidate method (``minmax``, ``mse``, ``kld``, ``quantile`` by default,
   :data:`METHODS`) reads its range from one histogram per tensor, binned once: the finest
   any candidate keeps (KLD's ``8 x 2048`` bins; at least :data:`JUDGE_BINS`). Its bin
   widths are powers of two, so MSE's and Quantile's 2048 bins are that histogram re-binned,
   bit for bit what they would have streamed (:meth:`HistogramObserver.load_state`), and
   MinMax is its extremes. Members of a shared-scale group get one scale from the union of
   their ranges, so for a group the candidate of method ``m`` is the union of its members'
   ``m`` ranges.
2. For every tensor ``t`` and candidate range ``r`` (scale ``s``, zero point ``z`` by the
   tensor's scheme) the squared error of fake quantization

       E_t(r) = sum over all elements of (x - s * (clamp(round(x / s) + z, qmin, qmax) - z))^2

   is summed exactly over the judging data as it streams (the ranges are known once the
   calibration data has run). Without judging data, ``E_t`` is computed on the calibration
   data from its histogram (:func:`histogram_errors`: the values spread uniformly inside
   each bin, exact zeros counted apart; within 0.5 % of the exact sum on the digits CNN's
   8-bit activations, a few % at 16 bits, whose step is finer than a bin).
   Ungrouped tensors keep the candidate with the least ``E_t``; a group keeps the method
   with the least ``sum over members of E_t``. Ties go to the earlier method in the
   candidate list. Candidates with equal scale and zero point are summed once.

So auto costs one histogram method plus onnxruntime and the error sums over the judging data.
Judged on held-out data, the choice does not overfit the calibration data. Memory is one
fixed-size histogram per tensor plus one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtool import progress
from qtool.analysis.evaluate import dot
from qtool.errors import CalibrationError
from qtool.scheme import QuantScheme

log = logging.getLogger(__name__)

#: Candidates of ``--method auto``: MinMax and the three histogram methods, which all read
#: one histogram per tensor, so auto costs about one histogram method plus onnxruntime over
#: the judging data. ``norm`` (LSQ's scale initialisation for QAT) and ``meanstd`` each cost
#: a pass of their own over every value; on MobileNet-V2 they won 0 and 1 of 54 tensors.
#: Pass ``methods=`` to try them.
METHODS = ("minmax", "mse", "kld", "quantile")
#: Bins of the histogram every candidate reads, at least (KLD's streamed histogram).
JUDGE_BINS = 2048 * 8
_CHUNK = 1 << 15


@dataclass
class MethodChoice:
    """The outcome of :func:`select_ranges`.

    Attributes:
        ranges: ``{tensor: (lo, hi)}`` for every tensor of ``plan.activation_schemes()``.
        methods: ``{tensor: chosen method}``.
        errors: ``{tensor: {method: mean squared error at that tensor}}``.
        candidates: The methods tried, in order.
    """

    ranges: dict[str, tuple[float, float]]
    methods: dict[str, str]
    errors: dict[str, dict[str, float]]
    candidates: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the report: candidates and, per tensor, the choice and the errors."""
        return {
            "candidates": list(self.candidates),
            "tensors": {
                name: {"method": self.methods[name], "mse": self.errors[name]}
                for name in self.methods
            },
        }


class _Candidates:
    """One observer per candidate method for one tensor (fed by the collector).

    Only :attr:`histogram` is fed (the finest histogram any candidate keeps, at least
    :data:`JUDGE_BINS` bins) with the candidates that cannot be read from it: histogram
    methods that bin as the base class does, on ``2^-k`` times its bins, take its state
    re-binned when asked for a range, and MinMax takes its extremes.
    """

    def __init__(self, scheme: QuantScheme, name: str, methods: Sequence[str]):
        from qtool.calibration.observers import HistogramObserver, MinMaxObserver, get_observer

        self.observers = {m: get_observer(m)(scheme, name) for m in methods}
        binning = [o for o in self.observers.values() if isinstance(o, HistogramObserver)
                   and type(o).update is HistogramObserver.update]
        bins = max([JUDGE_BINS, *(o.bins for o in binning)])
        self.histogram = next((o for o in binning if o.bins == bins), None)
        if self.histogram is None:
            self.histogram = HistogramObserver(scheme, name, bins=bins)
        self.fed: list = [self.histogram]
        self.zeros = 0  # exact zeros (a ReLU's), which every candidate keeps exactly
        self.derived: dict[str, Any] = {}
        for method, observer in self.observers.items():
            if observer is self.histogram:
                continue
            if observer in binning and _power_of_two(bins, observer.bins):
                self.derived[method] = observer
            elif type(observer) is MinMaxObserver:
                self.derived[method] = observer
            else:
                self.fed.append(observer)

    def update(self, x: np.ndarray) -> None:
        self.zeros += x.size - np.count_nonzero(x)
        for observer in self.fed:
            observer.update(x)

    def ranges(self) -> dict[str, tuple[float, float]]:
        if self.histogram.empty:
            raise self.histogram._empty_error()
        for observer in self.derived.values():
            if hasattr(observer, "load_state"):
                observer.load_state(self.histogram)
            else:  # MinMax: the histogram's extremes are the same min and max
                observer.min_val = self.histogram.min_val.copy()
                observer.max_val = self.histogram.max_val.copy()
        return {m: _scalar_range(o.range()) for m, o in self.observers.items()}


def _power_of_two(bins: int, coarser: int) -> bool:
    ratio, rest = divmod(bins, coarser)
    return not rest and not ratio & (ratio - 1)


class _RangeErrors:
    """Exact running sum of the fake-quantization error of one tensor under several ranges."""

    def __init__(self, scheme: QuantScheme, ranges: Mapping[str, tuple[float, float]]):
        self.scheme = scheme
        self.qparams = {m: scheme.qparams(lo, hi) for m, (lo, hi) in ranges.items()}
        # methods whose scale and zero point coincide share one sum
        self.same: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for method, (scale, zero_point) in self.qparams.items():
            key = (float(np.asarray(scale)), float(np.asarray(zero_point)))
            self.same[method] = seen.setdefault(key, method)
        self.sums = dict.fromkeys(ranges, 0.0)
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch, in cache-sized float64 chunks (the arithmetic of fake_quantize)."""
        flat = np.ascontiguousarray(x).reshape(-1)
        self.count += flat.size
        firsts = [m for m in self.qparams if self.same[m] == m]
        if any(np.ndim(self.qparams[m][0]) for m in firsts):  # per-channel: whole tensor
            whole = np.asarray(x, dtype=np.float64)
            for method in firsts:
                scale, zero_point = self.qparams[method]
                diff = whole - self.scheme.fake_quantize(whole, scale, zero_point).astype(
                    np.float64)
                self.sums[method] += dot(diff.ravel(), diff.ravel())
        else:
            chunk = min(_CHUNK, max(flat.size, 1))
            values, work = np.empty(chunk), np.empty(chunk)
            params = [(m, float(self.qparams[m][0]), float(self.qparams[m][1])) for m in firsts]
            qmin, qmax = float(self.scheme.qmin), float(self.scheme.qmax)
            for first in range(0, flat.size, chunk):
                n = min(chunk, flat.size - first)
                xs, ws = values[:n], work[:n]
                np.copyto(xs, flat[first : first + n], casting="unsafe")
                for method, scale, zero_point in params:
                    # QuantizeLinear then DequantizeLinear, as QuantScheme.fake_quantize does
                    np.divide(xs, scale, out=ws)
                    np.round(ws, out=ws)
                    ws += zero_point
                    np.clip(ws, qmin, qmax, out=ws)
                    ws -= zero_point
                    ws *= scale
                    ws[...] = ws.astype(np.float32)
                    np.subtract(xs, ws, out=ws)
                    self.sums[method] += dot(ws, ws)
        for method, first in self.same.items():
            if first != method:
                self.sums[method] = self.sums[first]


def histogram_errors(histogram, scheme: QuantScheme, ranges: Mapping[str, tuple[float, float]],
                     zeros: int = 0) -> tuple[dict[str, float], int]:
    r"""Squared fake-quantization error of each range over a histogram's values.

    The ``n_i`` values of bin ``i`` are taken as spread uniformly over ``[a_i, b_i]`` (the
    bin, cut to the observed extremes), so a bin adds ``n_i / (b_i - a_i)`` times the
    integral of ``(x - fq(x))^2`` over it, ``fq`` the QuantizeLinear/DequantizeLinear round
    trip of the range's scale ``s`` and zero point ``z``. With the clip levels
    ``L = s (qmin - z)`` and ``H = s (qmax - z)`` the integrand is ``(x - L)^2`` below
    ``L``, ``(x - H)^2`` above ``H`` and the sawtooth ``(x - s round(x / s))^2`` between,
    whose antiderivative is ``k s^3 / 12 + (r^3 + s^3 / 8) / 3`` at ``x = k s + r``,
    ``|r| <= s / 2``: exact for any number of bins per quantization step (16-bit schemes
    included). Exact zeros, ``zeros`` of the values, are taken out of their bin: every
    scheme represents 0 exactly, so they add nothing (the zeros of a ReLU are no uniform
    spread; at 16 bits they doubled the estimate). All ranges in one vectorised step.

    Args:
        histogram: A per-tensor :class:`~qtool.calibration.observers.HistogramObserver`.
        scheme: The tensor's scheme (per tensor).
        ranges: ``{key: (lo, hi)}``.
        zeros: How many of the histogram's values are exactly 0.

    Returns:
        ``({key: summed squared error}, number of values)``; zeros if it saw nothing.
    """
    if histogram.empty:
        return dict.fromkeys(ranges, 0.0), 0
    counts = histogram.counts[0]
    if zeros and 0 <= -histogram.start[0] < len(counts):  # bin [0, w) holds the zeros
        counts = counts.copy()
        counts[-histogram.start[0]] -= zeros
    nonzero = np.flatnonzero(counts)
    weights = counts[nonzero].astype(np.float64)
    width = histogram.width(0)
    lo, hi = float(histogram.min_val[0]), float(histogram.max_val[0])
    left = np.clip((histogram.start[0] + nonzero) * width, lo, hi)
    right = np.clip((histogram.start[0] + nonzero + 1) * width, lo, hi)
    keys = list(ranges)
    lows = np.array([ranges[k][0] for k in keys], dtype=np.float64)
    highs = np.array([ranges[k][1] for k in keys], dtype=np.float64)
    scale, zero_point = scheme.qparams(lows, highs)
    pairs = np.stack([scale.astype(np.float64), zero_point.astype(np.float64)], axis=1)
    distinct, index = np.unique(pairs, axis=0, return_inverse=True)
    scale, zero_point = distinct[:, :1], distinct[:, 1:]
    floor, ceiling = scale * (scheme.qmin - zero_point), scale * (scheme.qmax - zero_point)

    def sawtooth(x):  # antiderivative of (x - s round(x / s))^2
        k = np.floor(x / scale + 0.5)
        r = x - k * scale
        return k * scale**3 / 12.0 + (r**3 + scale**3 / 8.0) / 3.0

    below = np.where(left < floor, ((np.minimum(right, floor) - floor) ** 3
                                    - (left - floor) ** 3) / 3.0, 0.0)
    above = np.where(right > ceiling, ((right - ceiling) ** 3
                                       - (np.maximum(left, ceiling) - ceiling) ** 3) / 3.0, 0.0)
    inner_lo, inner_hi = np.maximum(left, floor), np.minimum(right, ceiling)
    inner = np.where(inner_hi > inner_lo, sawtooth(inner_hi) - sawtooth(inner_lo), 0.0)
    span = right - left
    # a bin cut to a single point (all values equal): the error at that point
    point = np.clip(np.round(left / scale) + zero_point, scheme.qmin, scheme.qmax)
    point = ((point - zero_point) * scale - left) ** 2
    mean = np.divide(below + above + inner, span, out=point, where=span > 0)
    sums = mean @ weights
    return ({k: float(sums[i]) for k, i in zip(keys, np.ravel(index), strict=True)},
            int(weights.sum()) + zeros)


def select_ranges(
    model,
    plan,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    methods: Sequence[str] = METHODS,
    batch_size: int | None = None,
    num_samples: int | None = None,
    judge_data: Iterable[Mapping[str, np.ndarray]] | None = None,
    memory_budget: int | None = None,
) -> MethodChoice:
    """Calibrate with every method and keep, per tensor or group, the least-error range.

    Args:
        model: The prepared float model (path, ModelProto or Graph).
        plan: The :class:`qtool.plan.QuantPlan`; its ``activation_schemes()`` are calibrated
            and its groups chosen together.
        data: Calibration samples (iterated once).
        methods: Candidate observer names.
        batch_size: Rows per onnxruntime run.
        num_samples: Use at most this many samples (of each data).
        judge_data: Samples the candidates are judged on (held-out data); None: ``data``.
        memory_budget: Bytes of observed tensors per onnxruntime run (see
            :func:`qtool.calibration.calibrate`); None: whole batches.

    Returns:
        The :class:`MethodChoice`.

    Raises:
        DataError: The data is empty or does not fit the model.
        CalibrationError: NaN/Inf in an activation, an unknown method.
    """
    schemes = plan.activation_schemes()
    methods = tuple(dict.fromkeys(methods))
    if not schemes:
        return MethodChoice({}, {}, {}, methods)
    candidates = {name: _Candidates(scheme, name, methods) for name, scheme in schemes.items()}
    session = _Session(model, data, schemes, batch_size, num_samples, memory_budget)
    session.feed(data, candidates)
    own = {}
    for name, candidate in candidates.items():
        try:
            own[name] = candidate.ranges()
        except CalibrationError:  # inside an If branch no sample took: no range, stays float
            log.info("tensor %s was never computed on the calibration data", name)
    schemes = {name: scheme for name, scheme in schemes.items() if name in own}

    group_of = {name: plan.tensors[name].group or name for name in schemes}
    members: dict[str, list[str]] = {}
    for name in schemes:
        members.setdefault(group_of[name], []).append(name)
    union = {
        key: {m: _union([own[t][m] for t in names]) for m in methods}
        for key, names in members.items()
    }
    if judge_data is None:  # the calibration data judges: its histograms, no second pass
        errors = {name: histogram_errors(candidates[name].histogram, scheme,
                                         union[group_of[name]], candidates[name].zeros)
                  for name, scheme in schemes.items()}
    else:  # the held-out data, through the same session: exact sums
        judged = {name: _RangeErrors(scheme, union[group_of[name]])
                  for name, scheme in schemes.items()}
        session.feed(judge_data, judged)
        errors = {name: (judge.sums, judge.count) for name, judge in judged.items()}

    ranges, chosen, mse = {}, {}, {}
    for key, names in members.items():
        totals = {m: sum(errors[t][0][m] for t in names) for m in methods}
        best = min(methods, key=lambda m: (totals[m], methods.index(m)))
        for name in names:
            ranges[name] = union[key][best]
            chosen[name] = best
            sums, count = errors[name]
            mse[name] = {m: sums[m] / max(count, 1) for m in methods}
        log.info("auto method for %s: %s", key, best)
    return MethodChoice(ranges, chosen, mse, methods)


class _Session:
    """One collector session over the model, fed one ``{tensor: observer}`` set per data.

    The calibration data and then the judging data run through the same onnxruntime
    session (graph optimizations on, as calibration runs): the second phase costs
    onnxruntime over the judging data only.
    """

    def __init__(self, model, data, tensors: Iterable[str], batch_size, num_samples,
                 memory_budget):
        from qtool.calibration.collector import (
            Collector,
            plan_observation,
            resolve_batch_size,
            run_budget,
        )
        from qtool.calibration.data import specs_of

        self.specs = specs_of(data, model)
        self.size, self.fixed = resolve_batch_size(self.specs, batch_size)
        self.num_samples = num_samples
        self.routes = {name: _Route() for name in tensors}
        self.collector = Collector(plan_observation(model, self.routes), self.routes,
                                   memory_budget=run_budget(self.specs, self.fixed,
                                                            memory_budget))

    def feed(self, data, observers: Mapping[str, Any]) -> None:
        """Stream ``data``, each observed tensor to ``observers[name]`` (if it has one)."""
        from qtool.calibration.collector import batches, checked_samples

        for name, route in self.routes.items():
            route.target = observers.get(name)
        stream = batches(checked_samples(data, self.specs), self.specs, self.size,
                         fixed=self.fixed, num_samples=self.num_samples)
        self.collector.observe_constants()
        for batch in progress.bar(stream, desc="auto-method", unit="batch"):
            self.collector.run(batch)


class _Route:
    """Feeds a tensor's values to the observer of the current phase (or drops them)."""

    __slots__ = ("target",)

    def update(self, x: np.ndarray) -> None:
        if self.target is not None:
            self.target.update(x)

    @property
    def infinite(self) -> int:
        """The current observer's count of +-inf (the collector refuses Inf outside masks)."""
        return self.target.infinite if self.target is not None else 0


def _scalar_range(lo_hi) -> tuple[float, float]:
    lo, hi = lo_hi
    return float(lo), float(hi)


def _union(ranges: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


__all__ = ["JUDGE_BINS", "METHODS", "MethodChoice", "histogram_errors", "select_ranges"]
