r"""``--method auto``: per tensor, the calibration method whose range quantizes it best.

One streaming pass over the calibration data, then a short one over the judging data:

1. Every candidate observer (``minmax``, ``mse``, ``kld``, ``quantile`` by default,
   :data:`METHODS`) watches every planned activation in one calibration pass; the
   histogram methods share one histogram per tensor (one binning pass feeds MSE, KLD and
   Quantile alike). Each gives a range. Members of a shared-scale group get one scale from
   the union of their ranges, so for a group the candidate of method ``m`` is the union of
   its members' ``m`` ranges.
2. For every tensor ``t`` and candidate range ``r`` (scale and zero point by the tensor's
   scheme), the squared error of fake quantization is summed exactly over the judging data
   (``judge_data``: held-out data, bounded; the calibration data itself when none is given):

       E_t(r) = sum over all elements of (x - s * (clamp(round(x / s) + z, qmin, qmax) - z))^2

   Ungrouped tensors keep the candidate with the least ``E_t``; a group keeps the method with
   the least ``sum over members of E_t``. Ties go to the earlier method in the candidate list.
   Candidates with equal scale and zero point are summed once.

The error is computed on data rather than on the observers' histograms because a histogram
only knows how many values fall in a bin, not where. Judged on the calibration data, the
chosen range is never worse at its tensor (or group) than any single method tried; judged on
held-out data, the choice does not overfit the calibration data. Memory is the observers'
fixed-size state plus one batch.
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

#: Candidates of ``--method auto``: MinMax and the three histogram methods, which share one
#: histogram per tensor, so auto costs about one histogram method plus the judging pass.
#: ``norm`` (LSQ's scale initialisation for QAT) and ``meanstd`` each cost a pass of their
#: own over every value; on MobileNet-V2 they won 0 and 1 of 54 tensors. Pass ``methods=``
#: to try them.
METHODS = ("minmax", "mse", "kld", "quantile")
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

    Histogram observers that bin alike (same class ``update``, same number of bins) share
    one histogram: only the first is fed, the others take its state when asked for a range.
    """

    def __init__(self, scheme: QuantScheme, name: str, methods: Sequence[str]):
        from qtool.calibration.observers import HistogramObserver, get_observer

        self.observers = {m: get_observer(m)(scheme, name) for m in methods}
        self.fed: list = []
        self.shares: dict[str, Any] = {}
        leaders: dict[tuple, Any] = {}
        for method, observer in self.observers.items():
            if isinstance(observer, HistogramObserver):
                key = (type(observer).update, observer.bins)
                if key in leaders:
                    self.shares[method] = leaders[key]
                    continue
                leaders[key] = observer
            self.fed.append(observer)

    def update(self, x: np.ndarray) -> None:
        for observer in self.fed:
            observer.update(x)

    def ranges(self) -> dict[str, tuple[float, float]]:
        for method, leader in self.shares.items():
            self.observers[method].load_state(leader)
        return {m: _scalar_range(o.range()) for m, o in self.observers.items()}


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
        data: Calibration samples (iterated once, or twice without ``judge_data``).
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
    _stream(model, candidates, data, batch_size, num_samples, optimization=None,
            memory_budget=memory_budget)
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
    errors = {
        name: _RangeErrors(scheme, union[group_of[name]]) for name, scheme in schemes.items()
    }
    _stream(model, errors, data if judge_data is None else judge_data, batch_size, num_samples,
            optimization="disable", memory_budget=memory_budget)

    ranges, chosen, mse = {}, {}, {}
    for key, names in members.items():
        totals = {m: sum(errors[t].sums[m] for t in names) for m in methods}
        best = min(methods, key=lambda m: (totals[m], methods.index(m)))
        for name in names:
            ranges[name] = union[key][best]
            chosen[name] = best
            count = max(errors[name].count, 1)
            mse[name] = {m: errors[name].sums[m] / count for m in methods}
        log.info("auto method for %s: %s", key, best)
    return MethodChoice(ranges, chosen, mse, methods)


def _stream(model, observers: Mapping[str, Any], data, batch_size, num_samples, optimization,
            memory_budget=None):
    """One pass of the calibration collector feeding ``observers`` (by tensor name)."""
    from qtool.calibration.collector import (
        Collector,
        batches,
        checked_samples,
        plan_observation,
        resolve_batch_size,
        run_budget,
    )
    from qtool.calibration.data import specs_of

    specs = specs_of(data, model)
    stream = checked_samples(data, specs)
    size, fixed = resolve_batch_size(specs, batch_size)
    collector = Collector(plan_observation(model, observers), observers,
                          optimization=optimization,
                          memory_budget=run_budget(specs, fixed, memory_budget))
    collector.observe_constants()
    stream = batches(stream, specs, size, fixed=fixed,
                     num_samples=num_samples)
    for batch in progress.bar(stream, desc="auto-method", unit="batch"):
        collector.run(batch)


def _scalar_range(lo_hi) -> tuple[float, float]:
    lo, hi = lo_hi
    return float(lo), float(hi)


def _union(ranges: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


__all__ = ["METHODS", "MethodChoice", "select_ranges"]
