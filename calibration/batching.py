"""Batching: join samples into the batches a model accepts, for every phase that runs it.

Calibration, ``--method auto``, the analysis, ``evaluate``, ``compare`` and the float
fallback all feed the model through :func:`batches`, so they all honour the same rules:

* each input has a batch axis (:attr:`InputSpec.batch_axis`, axis 1 for ``state [2, batch,
  128]``); samples are concatenated along it into batches of ``batch_size`` rows;
* an input without a batch axis (a scalar ``sr``, a constant) is not concatenated: its value
  goes with every sample of the batch, and a sample with another value starts a new batch;
* a model that fixes the batch dim to ``B`` runs batches of exactly ``B`` rows (a request for
  another size is ignored); a remainder of fewer than ``B`` rows is dropped with a warning;
* a sample whose other dims differ from the pending ones (dynamic shapes) starts a new batch;
* extra keys (``labels``: one entry per row along axis 0) ride along row for row.

Every loop here is bounded by the data: ``batch_size`` is at least 1 (a dim read from the
model as ``-1`` or ``0`` is dynamic, never a size).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from qtool.calibration.data import InputSpec, check_inputs

from qtool.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Batch:
    """Rows ``first .. first + rows - 1`` of the data stream, as session feeds.

    Attributes:
        first: Index of the batch's first sample in the stream.
        rows: Number of samples in the batch.
        feeds: Input name -> array, as the session takes it.
        extra: Other keys of the samples (``labels``), rows along axis 0.
    """

    first: int
    rows: int
    feeds: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def resolve_batch_size(specs: Sequence[InputSpec], batch_size: int | None) -> tuple[int, bool]:
    """The batch size to run and whether the model fixes it.

    Returns:
        ``(batch_size, fixed)``: the model's fixed batch dim if it has one (a different
        request is logged and ignored), else ``batch_size`` or :data:`DEFAULT_BATCH_SIZE`.

    Raises:
        DataError: ``batch_size`` below 1.
    """
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be a positive number")
    fixed = {s.shape[s.batch_axis] for s in specs
             if s.batch_axis is not None and s.shape[s.batch_axis] is not None}
    if fixed:
        size = min(fixed)
        if batch_size is not None and batch_size != size:
            log.info("the model fixes the batch dim to %d; batch_size=%d ignored",
                     size, batch_size)
        return size, True
    return batch_size or DEFAULT_BATCH_SIZE, False


def batches(data: Iterable[Mapping[str, np.ndarray]], specs: Sequence[InputSpec],
            batch_size: int, *, fixed: bool = False, num_samples: int | None = None,
            extra: Sequence[str] = ()) -> Iterator[Batch]:
    """Join samples into batches (see the module docstring).

    Every sample is checked against the model (:func:`check_inputs`) and for NaN/Inf.

    Args:
        data: Samples (or batches) keyed by input name.
        specs: The model's inputs with their batch axes.
        batch_size: Rows per batch (from :func:`resolve_batch_size`).
        fixed: The model fixes the batch dim to ``batch_size``.
        num_samples: Use at most this many rows.
        extra: Keys besides the inputs to carry along (rows along axis 0).

    Raises:
        DataError: A sample that does not fit the model, or holds NaN/Inf.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be a positive number")
    joiner = _Joiner(specs, tuple(extra))
    if not joiner.batched:
        batch_size, fixed = 1, False  # no input has a batch axis: one run per sample
    seen = 0
    for sample in data:
        inputs = {n: sample[n] for n in sample if n not in joiner.extra}
        check_inputs(list(specs), inputs)
        rows = joiner.rows(sample, seen)
        if num_samples is not None:
            rows = min(rows, num_samples - seen)
            if rows <= 0:
                break
        sample = joiner.take(sample, 0, rows)
        _check_finite_inputs(sample, specs, seen)
        if joiner.pending and not joiner.fits(sample):
            if fixed and joiner.pending_rows % batch_size:
                log.warning("sample %d: inputs change in a model with a fixed batch of %d; "
                            "the %d sample(s) before it were not used", seen, batch_size,
                            joiner.pending_rows)
                joiner.clear()
            else:
                yield joiner.emit(joiner.pending_rows)
        joiner.add(sample, rows)
        seen += rows
        while joiner.pending_rows >= batch_size:
            yield joiner.emit(batch_size)
    if joiner.pending_rows:
        if fixed and joiner.pending_rows < batch_size:
            log.warning(
                "the model's batch dim is fixed to %d: the last %d sample(s) were not used "
                "(give a multiple of %d samples)", batch_size, joiner.pending_rows, batch_size,
            )
        else:
            yield joiner.emit(joiner.pending_rows)


def batch_rows(feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """How many samples a batch of feeds holds: the size of the first batch axis (1 if none)."""
    for spec in specs:
        if spec.batch_axis is not None and spec.name in feeds:
            shape = np.shape(feeds[spec.name])
            if len(shape) > spec.batch_axis:
                return int(shape[spec.batch_axis])
    return 1


class _Joiner:
    """The pending samples of :func:`batches` and how to join and split them."""

    def __init__(self, specs: Sequence[InputSpec], extra: tuple[str, ...]):
        self.axes = {s.name: s.batch_axis for s in specs}
        self.batched = [n for n, a in self.axes.items() if a is not None]
        self.extra = extra
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.first = 0

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    def rows(self, sample: Mapping[str, np.ndarray], index: int) -> int:
        counts = {int(np.shape(sample[n])[self.axes[n]]) for n in self.batched}
        if len(counts) > 1:
            raise DataError(
                f"sample {index}: inputs disagree on the number of rows along their batch "
                f"axes ({', '.join(f'{n}: axis {self.axes[n]}' for n in self.batched)})",
                "declare each input's batch axis (--input-axis NAME=AXIS) if one is wrong",
            )
        return counts.pop() if counts else 1

    def take(self, sample: Mapping[str, np.ndarray], start: int, stop: int | None) -> dict:
        out = {}
        for name, value in sample.items():
            if name not in self.axes and name not in self.extra:
                continue
            array = np.asarray(value)
            axis = self.axis(name)
            if axis is None:
                out[name] = array
                continue
            index = [slice(None)] * array.ndim
            index[axis] = slice(start, stop)
            out[name] = array[tuple(index)]
        return out

    def fits(self, sample: Mapping[str, np.ndarray]) -> bool:
        """Whether ``sample`` can join the pending ones (same shapes and shared values)."""
        head = self.pending[0]
        for name, axis in self.axes.items():
            a, b = sample[name], head[name]
            if axis is None:
                if a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif a.shape[:axis] + a.shape[axis + 1:] != b.shape[:axis] + b.shape[axis + 1:]:
                return False
        return set(sample) == set(head)

    def add(self, sample: dict[str, np.ndarray], rows: int) -> None:
        self.pending.append(sample)
        self.pending_rows += rows

    def clear(self) -> None:
        self.first += self.pending_rows
        self.pending, self.pending_rows = [], 0

    def emit(self, rows: int) -> Batch:
        head = self.pending[0]
        joined = {}
        for name in head:
            axis = self.axis(name)
            if axis is None or len(self.pending) == 1:
                joined[name] = head[name]
            else:
                joined[name] = np.concatenate([p[name] for p in self.pending], axis=axis)
        batch = {n: np.asarray(a, order="C") for n, a in self.take(joined, 0, rows).items()}
        feeds = {n: batch[n] for n in self.axes}
        extra = {n: batch[n] for n in batch if n not in self.axes}
        result = Batch(self.first, rows, feeds, extra)
        self.pending_rows -= rows
        self.pending = [self.take(joined, rows, None)] if self.pending_rows else []
        self.first += rows
        return result


def _check_finite_inputs(sample: Mapping[str, np.ndarray], specs: Sequence[InputSpec],
                         index: int) -> None:
    for spec in specs:
        array = sample[spec.name]
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(
                f"input {spec.name} of sample {index} contains NaN or Inf",
                "clean the calibration data",
            )


def row_windows(total: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous ``(start, stop)`` windows of ``total`` rows.

    Windows start on multiples of ``batch_size``, so each runs exactly the batches one pass
    over all rows would (per-batch statistics and sums then merge to the same values).
    """
    batches_total = -(-total // batch_size)
    per = -(-batches_total // parts) * batch_size
    return [(start, min(total, start + per)) for start in range(0, total, per)]
