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

With an executor of several workers (``--workers``, ``--executor``; :mod:`qtool.executor`)
both passes run as tasks over row windows of the data (a loader that can be split: a file,
an image folder, the held-out split; the window travels as its path and rows, never as
arrays), each window on batch boundaries: the histograms merge exactly (counts add, their
grid is a power of two), and every error sum is a list of exact partial sums (Shewchuk's, as
``math.fsum`` keeps them) of the same per-batch terms one process adds, merged in window
order, so the choice and the ranges are the same bits as in one process. The judging windows
split their batches as the one-process pass does (the row size measured on the first
calibration row). Data that cannot be split runs here.
"""

from __future__ import annotations

import logging
import math
import os
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

    def merge(self, other: _Candidates) -> None:
        """Add another window's observations (histograms: exactly)."""
        self.zeros += other.zeros
        for mine, theirs in zip(self.fed, other.fed, strict=True):
            mine.merge(theirs)

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
        # exact partial sums (Shewchuk) per method: the total does not depend on how the
        # batches were grouped into windows
        self.parts: dict[str, list[float]] = {m: [] for m in ranges}
        self.count = 0

    @property
    def sums(self) -> dict[str, float]:
        """``{method: summed squared error}``, correctly rounded."""
        return {m: math.fsum(self.parts[self.same[m]]) for m in self.parts}

    def merge(self, other: _RangeErrors) -> None:
        """Add another window's sums (exactly)."""
        for method, parts in other.parts.items():
            for value in parts:
                _add_exact(self.parts[method], value)
        self.count += other.count

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
                _add_exact(self.parts[method], dot(diff.ravel(), diff.ravel()))
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
                    _add_exact(self.parts[method], dot(ws, ws))


def _add_exact(partials: list[float], value: float) -> None:
    """Add ``value`` to non-overlapping partials whose sum is exact.

    Shewchuk's algorithm, the one ``math.fsum`` runs: ``math.fsum(partials)`` is then the
    correctly rounded sum of every value added, in whatever order and grouping they came.
    """
    kept = 0
    for other in partials:
        if abs(value) < abs(other):
            value, other = other, value
        high = value + other
        low = other - (high - value)
        if low:
            partials[kept] = low
            kept += 1
        value = high
    partials[kept:] = [value]


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
    executor=None,
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
        executor: A :class:`qtool.executor.Executor`: with several workers, both passes run
            as its tasks over row windows of the data (see the module docstring); None:
            here. The result does not depend on it.

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
    session = _Session(model, data, schemes, batch_size, num_samples, memory_budget, executor)
    try:
        return _select(session, plan, schemes, methods, data, judge_data)
    finally:
        session.close()


def _select(session: _Session, plan, schemes, methods, data, judge_data) -> MethodChoice:
    candidates = session.feed(data, _Observers("candidates", schemes, methods))
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
        judged = session.feed(judge_data, _Observers(
            "errors", schemes, {name: union[group_of[name]] for name in schemes}))
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
    """The collector runs of both passes: here, or as executor tasks over row windows.

    Here (one onnxruntime session, fed one ``{tensor: observer}`` set per data), the
    calibration data and then the judging data run through the same session (graph
    optimizations on, as calibration runs): the second phase costs onnxruntime over the
    judging data only.
    """

    def __init__(self, model, data, tensors: Iterable[str], batch_size, num_samples,
                 memory_budget, executor=None):
        from qtool.calibration.collector import plan_observation, resolve_batch_size, run_budget
        from qtool.calibration.data import specs_of

        self.specs = specs_of(data, model)
        self.size, self.fixed = resolve_batch_size(self.specs, batch_size)
        self.num_samples = num_samples
        self.budget = run_budget(self.specs, self.fixed, memory_budget)
        self.routes = {name: _Route() for name in tensors}
        self.plan = plan_observation(model, self.routes)
        self.executor = executor
        self.collector = None
        self.row_bytes: float | None = None  # what the first run measured (RowBudget)

    def feed(self, data, observers: _Observers) -> dict[str, Any]:
        """Stream ``data`` into the observers ``observers`` makes; return them (merged)."""
        windows = self._windows(data)
        if windows is None:
            return self._feed_here(data, observers())
        from qtool import providers
        from qtool.calibration.collector import checked_samples

        checked_samples(data, self.specs)  # a misfit fails here, before any worker starts
        job = _WindowJob(self.plan, observers, self.specs, self.size, self.fixed, self.budget,
                         self.row_bytes, providers.current(),
                         max(1, (os.cpu_count() or 1) // self.executor.workers))
        results = self.executor.map_shared(_observe_window, job, windows,
                                           desc=f"auto-method {observers.kind}")
        merged = observers()  # fresh: Ray hands back read-only arrays
        for shard, _ in results:  # window order: the same merge whatever finished first
            for name, observer in shard.items():
                merged[name].merge(observer)
        if self.row_bytes is None:
            self.row_bytes = results[0][1]
        return merged

    def close(self) -> None:
        """Remove a temporary model with external data (over 2 GB)."""
        from qtool.io import release

        self.collector = None
        release(self.plan.model_bytes)

    def _windows(self, data) -> list[tuple[int, Any]] | None:
        """``(index, rows)`` windows of ``data`` for the executor, or None: run here."""
        from qtool.calibration.batching import row_windows

        workers = getattr(self.executor, "workers", 1)
        if workers <= 1 and getattr(self.executor, "name", "") != "ray":
            return None
        try:
            total = len(data)
        except TypeError:
            total = None
        if not hasattr(data, "shard") or not total:
            log.info("auto method: the data cannot be split by rows; it runs in this process")
            return None
        total = min(total, self.num_samples) if self.num_samples is not None else total
        return [(i, data.shard(start, stop))
                for i, (start, stop) in enumerate(row_windows(total, self.size, workers))]

    def _feed_here(self, data, observers: dict[str, Any]) -> dict[str, Any]:
        from qtool.calibration.collector import Collector, batches, checked_samples

        if self.collector is None:
            self.collector = Collector(self.plan, self.routes, memory_budget=self.budget)
            self.collector.budget.row_bytes = self.row_bytes
        for name, route in self.routes.items():
            route.target = observers.get(name)
        stream = batches(checked_samples(data, self.specs), self.specs, self.size,
                         fixed=self.fixed, num_samples=self.num_samples)
        self.collector.observe_constants()
        for batch in progress.bar(stream, desc="auto-method", unit="batch"):
            self.collector.run(batch)
        self.row_bytes = self.collector.budget.row_bytes
        return observers


@dataclass(frozen=True)
class _Observers:
    """Makes one pass's observers; picklable, so workers make their own.

    ``candidates`` (``arg``: the methods) or ``errors`` (``arg``: ``{tensor: {method:
    range}}``).
    """

    kind: str
    schemes: Mapping[str, QuantScheme]
    arg: Any

    def __call__(self) -> dict[str, Any]:
        if self.kind == "candidates":
            return {name: _Candidates(scheme, name, self.arg)
                    for name, scheme in self.schemes.items()}
        return {name: _RangeErrors(scheme, self.arg[name])
                for name, scheme in self.schemes.items()}


@dataclass(frozen=True)
class _WindowJob:
    """What every window task reads (sent once per worker; Ray: once to the object store)."""

    plan: Any
    observers: _Observers
    specs: list
    size: int
    fixed: bool
    budget: int | None
    row_bytes: float | None
    providers: tuple[str, ...]
    threads: int


def _observe_window(job: _WindowJob, window: tuple[int, Any]) -> tuple[dict, float | None]:
    """An executor task: one window's observers and the row size its first run measured.

    The first window alone feeds the constants (once, as one pass does). The judging pass
    starts from the row size the calibration pass measured, so its batches split into the
    same runs as in one process.
    """
    from qtool import providers
    from qtool.calibration.collector import Collector, batches

    index, data = window
    observers = job.observers()
    with providers.use(job.providers):
        collector = Collector(job.plan, observers, intra_op_threads=job.threads,
                              memory_budget=job.budget)
        collector.budget.row_bytes = job.row_bytes
        if index == 0:
            collector.observe_constants()
        for batch in batches(iter(data), job.specs, job.size, fixed=job.fixed):
            collector.run(batch)
    return observers, collector.budget.row_bytes


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
