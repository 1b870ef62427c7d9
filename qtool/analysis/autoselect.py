r"""``--method auto``: per tensor, the calibration method whose range quantizes it best.

Two streaming passes over the calibration data through the float graph in onnxruntime:

1. Every candidate observer (``minmax``, ``mse``, ``kld``, ``quantile``, ``norm``,
   ``meanstd`` by default) watches every planned activation at once; each gives a range.
   Members of a shared-scale group get one scale from the union of their ranges, so for a
   group the candidate of method ``m`` is the union of its members' ``m`` ranges.
2. For every tensor ``t`` and candidate range ``r`` (scale and zero point by the tensor's
   scheme), the squared error of fake quantization is summed exactly over the data:

       E_t(r) = sum over all elements of (x - s * (clamp(round(x / s) + z, qmin, qmax) - z))^2

   Ungrouped tensors keep the candidate with the least ``E_t``; a group keeps the method with
   the least ``sum over members of E_t``. Ties go to the earlier method in the candidate list.

The error is computed on the data rather than on the observers' histograms because a
histogram only knows how many values fall in a bin, not where: the in-bin rounding error would
be estimated, and the choice could then lose to another candidate on the real data. With the
exact sums, the chosen range is never worse at its tensor (or group) on the calibration data
than any single method tried. Memory is the observers' fixed-size state plus one batch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtool import progress
from qtool.errors import CalibrationError
from qtool.scheme import QuantScheme

log = logging.getLogger(__name__)

METHODS = ("minmax", "mse", "kld", "quantile", "norm", "meanstd")


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
    """One observer per candidate method for one tensor (fed by the collector)."""

    def __init__(self, scheme: QuantScheme, name: str, methods: Sequence[str]):
        from qtool.calibration.observers import get_observer

        self.observers = {m: get_observer(m)(scheme, name) for m in methods}

    def update(self, x: np.ndarray) -> None:
        for observer in self.observers.values():
            observer.update(x)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {m: _scalar_range(o.range()) for m, o in self.observers.items()}


class _RangeErrors:
    """Exact running sum of the fake-quantization error of one tensor under several ranges."""

    def __init__(self, scheme: QuantScheme, ranges: Mapping[str, tuple[float, float]]):
        self.scheme = scheme
        self.qparams = {m: scheme.qparams(lo, hi) for m, (lo, hi) in ranges.items()}
        self.sums = dict.fromkeys(ranges, 0.0)
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.count += x.size
        for method, (scale, zero_point) in self.qparams.items():
            diff = x - self.scheme.fake_quantize(x, scale, zero_point).astype(np.float64)
            self.sums[method] += float(np.dot(diff.ravel(), diff.ravel()))


def select_ranges(
    model,
    plan,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    methods: Sequence[str] = METHODS,
    batch_size: int | None = None,
    num_samples: int | None = None,
) -> MethodChoice:
    """Calibrate with every method and keep, per tensor or group, the least-error range.

    Args:
        model: The prepared float model (path, ModelProto or Graph).
        plan: The :class:`qtool.plan.QuantPlan`; its ``activation_schemes()`` are calibrated
            and its groups chosen together.
        data: Calibration samples; iterated twice.
        methods: Candidate observer names.
        batch_size: Rows per onnxruntime run.
        num_samples: Use at most this many samples.

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
    _stream(model, candidates, data, batch_size, num_samples, optimization=None)
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
    _stream(model, errors, data, batch_size, num_samples, optimization="disable")

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


def _stream(model, observers: Mapping[str, Any], data, batch_size, num_samples, optimization):
    """One pass of the calibration collector feeding ``observers`` (by tensor name)."""
    from qtool.calibration.collector import (
        Collector,
        batches,
        plan_observation,
        resolve_batch_size,
    )
    from qtool.calibration.data import check_inputs, specs_of
    from qtool.errors import DataError

    specs = specs_of(data, model)
    stream = iter(data)
    head = next(stream, None)
    if head is None:
        raise DataError("the calibration data is empty", "give at least one sample")
    check_inputs(specs, head)
    size, fixed = resolve_batch_size(specs, batch_size)
    collector = Collector(plan_observation(model, observers), observers,
                          optimization=optimization)
    collector.observe_constants()
    stream = batches(itertools.chain([head], stream), specs, size, fixed=fixed,
                     num_samples=num_samples)
    for batch in progress.bar(stream, desc="auto-method", unit="batch"):
        collector.run(batch)


def _scalar_range(lo_hi) -> tuple[float, float]:
    lo, hi = lo_hi
    return float(lo), float(hi)


def _union(ranges: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


__all__ = ["METHODS", "MethodChoice", "select_ranges"]
