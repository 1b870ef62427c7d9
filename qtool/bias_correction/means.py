"""Per-channel means of tensors over the calibration data, streamed in float64."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from qtool.io import load, load_model, serialize

#: Batches of one row the float pass runs at once (as :data:`.one_pass.SIDE_BY_SIDE`).
SIDE_BY_SIDE = 2


def channel_means(graph, names: list[str], batches, axes: Mapping[str, int] | None = None,
                  optimized: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Per-channel mean of each tensor over the data, streamed in float64.

    The channel axis is ``axes[name]`` (default 1: NCHW and (rows, features)).
    ``optimized``: run with onnxruntime's graph optimizations (a float model: as the
    calibration runs it; a Q/DQ model needs them off to stay a simulation).

    Only the nodes the tensors depend on run: an early stage costs a fraction of a pass.
    """
    from qtool.analysis.common import exposed, feeds_of, iterate_batches, session
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    proto = load_model(pruned(graph, names))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    specs = model_inputs(proto)
    run = float_session(exposed(proto, names)) if optimized else session(exposed(proto, names))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    rows = 0
    # the batches already fit the model (its fixed batch size, each input's batch axis)
    for index, batch in enumerate(iterate_batches(batches)):
        feeds = feeds_of(batch, [i.name for i in inputs], index)
        rows += batch_rows(feeds, specs)
        for name, value in zip(names, run.run(names, feeds), strict=True):
            total, count = channel_sums(value, (axes or {}).get(name, 1))
            sums[name] = sums.get(name, 0.0) + total
            counts[name] += count
    return {name: sums[name] / counts[name] for name in names}, rows


def float_session(model_bytes: bytes, threads: int | None = None):
    """A session for the float model, optimized as the calibration's (no memory arena).

    ``threads``: its intra-op threads (None: onnxruntime's default).
    """
    from qtool.analysis.common import session_options
    from qtool.calibration.collector import open_session

    return open_session(model_bytes, session_options(True, threads), "correct the biases")


def pruned(graph, names: list[str]) -> gs.Graph:
    """A copy of ``graph`` with ``names`` as its outputs and only the nodes they need."""
    copy = load(serialize(graph), check=False)
    tensors = copy.tensors()
    inputs = list(copy.inputs)
    copy.outputs = [tensors[name] for name in names]
    copy.cleanup(remove_unused_graph_inputs=False)
    copy.inputs = inputs
    return copy


def input_means(graph, names: list[str], batches) -> tuple[dict[str, np.ndarray], int]:
    """Each tensor's mean over its first axis (the rows), shape ``(1, ...)``, in float64.

    A tensor whose shape changes between batches (a variable width) gets its per-channel
    mean (axis 1) spread over the first batch's shape instead.
    """
    from qtool.analysis.common import exposed, feeds_of, iterate_batches
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    proto = load_model(pruned(graph, names))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    specs = model_inputs(proto)
    run = float_session(exposed(proto, names))
    sums: dict[str, np.ndarray] = {}
    channel_sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    channel_counts: dict[str, int] = dict.fromkeys(names, 0)
    ragged: set[str] = set()
    rows = 0
    for index, batch in enumerate(iterate_batches(batches)):
        feeds = feeds_of(batch, inputs, index)
        rows += batch_rows(feeds, specs)
        for name, value in zip(names, run.run(names, feeds), strict=True):
            value = np.asarray(value, dtype=np.float64)
            total = value.sum(axis=0, keepdims=True)
            if name not in sums:
                sums[name] = total
            elif sums[name].shape == total.shape and name not in ragged:
                sums[name] += total
            else:
                ragged.add(name)
            counts[name] += value.shape[0]
            axis = 1 if value.ndim > 1 else 0
            per_channel = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
            channel_sums[name] = channel_sums.get(name, 0.0) + per_channel.sum(axis=1)
            channel_counts[name] += per_channel.shape[1]
    means = {}
    for name in names:
        if name in ragged:
            channel = channel_sums[name] / channel_counts[name]
            shape = [1] * sums[name].ndim
            shape[1 if len(shape) > 1 else 0] = channel.size
            means[name] = np.broadcast_to(channel.reshape(shape), sums[name].shape).copy()
        else:
            means[name] = sums[name] / counts[name]
    return means, rows


def channel_sums(value: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Per-channel sums along ``axis`` (float64 accumulation, no float64 copy) and count."""
    value = np.asarray(value)
    axis %= value.ndim
    others = tuple(a for a in range(value.ndim) if a != axis)
    return value.sum(axis=others, dtype=np.float64), value.size // value.shape[axis]


def mean_along(values, axis: int) -> np.ndarray:
    """Per-channel mean along ``axis`` over an iterable of batches."""
    sums, count = 0.0, 0
    for value in values:
        total, n = channel_sums(value, axis)
        sums, count = sums + total, count + n
    return sums / count




def unit_sums(value: np.ndarray, axis: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums of one batch's tensor per row, ``(rows, channels)``, and counts.

    Per row where the tensor's first axis is the batch's rows (and not its channel axis);
    otherwise the batch is one unit (a reshaped sequence, a batch of one).
    """
    value = np.asarray(value)
    axis %= value.ndim
    if value.ndim >= 2 and axis != 0 and rows > 1 and value.shape[0] == rows:
        moved = np.moveaxis(value, axis, -1).reshape(rows, -1, value.shape[axis])
        sums = moved.sum(axis=1, dtype=np.float64)
        return sums, np.full(rows, moved.shape[1], np.float64)
    total, count = channel_sums(value, axis)
    return total[None], np.array([count], np.float64)


@dataclass
class UnitSums:
    """Per-channel sums of a tensor per unit (row, or batch), in data order."""

    sums: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)

    def add(self, value: np.ndarray, axis: int, rows: int) -> None:
        """Add one batch's tensor (``rows`` rows)."""
        sums, counts = unit_sums(value, axis, rows)
        self.sums.append(sums)
        self.counts.append(counts)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(units, channels)`` sums and ``(units,)`` counts."""
        return np.concatenate(self.sums), np.concatenate(self.counts)


def mean_error(reference: UnitSums, measured: UnitSums) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean of ``reference - measured`` and its standard error.

    The units are paired (the same rows in both): the error of each unit is its own
    difference, so what the rows share (the content) cancels and only how the error varies
    from row to row is left. The mean weighs each unit by its element count (a wider image
    counts more, as in the pooled mean); the standard error uses the effective number of
    units (Kish), infinite with a single unit.
    """
    ref_sums, counts = reference.arrays()
    got_sums, got_counts = measured.arrays()
    if ref_sums.shape != got_sums.shape or not np.array_equal(counts, got_counts):
        # units not paired (a tensor read per batch on one side): pooled means only
        delta = ref_sums.sum(0) / counts.sum() - got_sums.sum(0) / got_counts.sum()
        return delta, np.full(delta.shape, np.inf)
    total = counts.sum()
    delta = (ref_sums - got_sums).sum(axis=0) / total
    if len(counts) < 2:
        return delta, np.full(delta.shape, np.inf)
    per_unit = (ref_sums - got_sums) / counts[:, None]
    weights = counts / total
    variance = (weights[:, None] * (per_unit - delta) ** 2).sum(axis=0)
    effective = 1.0 / float((weights ** 2).sum())
    return delta, np.sqrt(variance / max(effective - 1.0, 1.0))


def unit_channel_sums(graph, names: list[str], batches, axes: Mapping[str, int]
                      ) -> tuple[dict[str, UnitSums], list[int]]:
    """Each tensor's :class:`UnitSums` over the data, and the rows of every batch.

    The float model runs optimized, as the calibration runs it.
    """
    from qtool.analysis.common import exposed, feeds_of, iterate_batches
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs
    from qtool.cpu import in_order, runs_at_once

    proto = load_model(pruned(graph, names))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    specs = model_inputs(proto)
    model = exposed(proto, names)
    del proto
    sums = {name: UnitSums() for name in names}
    rows_of: list[int] = []
    remaining = iter(iterate_batches(batches))
    first = next(remaining, None)
    if first is None:
        return sums, rows_of
    feeds = feeds_of(first, inputs, 0)
    # batches of one row: side by side (as the segments), each run with its share of cores
    side, threads = runs_at_once(batch_rows(feeds, specs), SIDE_BY_SIDE)
    run = float_session(model, threads)

    def calls():
        for index, batch in enumerate(itertools.chain([first], remaining)):
            current = feeds if index == 0 else feeds_of(batch, inputs, index)
            rows_of.append(batch_rows(current, specs))
            yield rows_of[-1], partial(run.run, names, current)

    with ThreadPoolExecutor(side) as pool:
        for rows, values in in_order(pool, calls(), side):
            for name, value in zip(names, values, strict=True):
                sums[name].add(value, axes[name], rows)  # in batch order
    return sums, rows_of
