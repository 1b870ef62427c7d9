"""Accumulated error of every quantized tensor, and histograms of the worst activations.

Two streaming passes, each holding one batch: the float and the quantized graphs run side
by side with every planned activation fetched and only running error sums are kept; then
the float graph alone runs again with just the :data:`HISTOGRAMS` worst activations fetched,
and only those are binned (binning every activation costs more than the inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qtool import progress
from qtool.analysis.common import (
    Batches,
    feeds_of,
    fetchable,
    initializer,
    iterate_batches,
    run,
    session,
    sort_db,
)
from qtool.analysis.evaluate import _ErrorSums
from qtool.calibration.collector import RowBudget
from qtool.errors import DataError
from qtool.io import load_model, serialize

#: Worst activations whose histograms go into the report.
HISTOGRAMS = 3


#: Bins of the streamed histograms, and at most this many bins shown.
HISTOGRAM_BINS = 1024


DISPLAY_BINS = 64


@dataclass
class TensorError:
    """Accumulated error of one quantized tensor (see the module docstring).

    Attributes:
        tensor: Tensor name in the float graph.
        role: ``activation`` or ``weight``.
        consumers: Nodes that read the quantized value.
        sqnr_db: SQNR in dB; None when the values are equal.
        cosine: Cosine similarity.
        max_abs_error: Largest absolute difference.
    """

    tensor: str
    role: str
    consumers: list[str]
    sqnr_db: float | None
    cosine: float
    max_abs_error: float


@dataclass
class Histogram:
    """The float values of one activation over the data, and the clip range it got.

    Attributes:
        tensor: Tensor name.
        left: Left edge of the first bin.
        width: Bin width.
        counts: Counts per bin (at most :data:`DISPLAY_BINS`).
        min: Smallest value seen.
        max: Largest value seen.
        clip: ``[lo, hi]``: the range its scale and zero point represent.
        sqnr_db: Its accumulated SQNR.
    """

    tensor: str
    left: float
    width: float
    counts: list[int]
    min: float
    max: float
    clip: list[float]
    sqnr_db: float | None


def tensor_errors(
    float_graph, result, batches: Batches, *, histograms: int = HISTOGRAMS,
    memory_budget: int | None = None,
) -> tuple[int, list[TensorError], list[Histogram]]:
    """Accumulated error of every quantized activation and weight (see the module docstring).

    Args:
        float_graph: The prepared float graph.
        result: The :class:`qtool.qdq.QuantizedModel` to judge.
        batches: Data batches.
        histograms: How many of the worst activations get a histogram.
        memory_budget: Bytes of fetched tensors per run (float and quantized together);
            bigger batches run as micro-batches (None: whole batches).

    Returns:
        ``(samples, errors, histograms)``: errors in plan order, histograms worst first.
    """
    plan = result.plan
    activations = [e for e in plan.entries("activation")]
    float_proto = load_model(float_graph)
    quant_proto = load_model(serialize(result.graph))
    inputs = [i.name for i in float_proto.graph.input
              if i.name not in {t.name for t in float_proto.graph.initializer}]
    float_bytes, float_names = fetchable(
        float_proto, [e.tensor for e in activations if e.tensor not in inputs])
    quant_bytes, quant_names = fetchable(
        quant_proto, [f"{e.tensor}_dequantized" for e in activations])
    # a planned activation nothing reads (an LSTM's unused hidden state) got no Q/DQ pair
    activations = [e for e in activations if f"{e.tensor}_dequantized" in quant_names]
    judged = {e.tensor for e in activations}
    float_names = {t: f for t, f in float_names.items() if t in judged}
    float_fetch = list(float_names.values())
    quant_fetch = [quant_names[f"{e.tensor}_dequantized"] for e in activations]
    float_session = session(float_bytes)
    quant_session = session(quant_bytes)
    from_fetch = {fetch: tensor for tensor, fetch in float_names.items()}
    sums = {e.tensor: _ErrorSums() for e in activations}
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    specs = model_inputs(float_proto)
    # micro-batches slice axis 0: only when every input has its samples there
    budget = RowBudget(memory_budget if all(s.batch_axis == 0 for s in specs) else None)
    computed: set[str] = set()  # an activation inside an If branch may never run
    samples = 0
    stream = progress.bar(iterate_batches(batches), desc="tensor errors", unit="batch")
    for index, batch in enumerate(stream):
        whole = feeds_of(batch, inputs, index)
        rows = batch_rows(whole, specs)
        samples += rows
        for start, stop in budget.spans(rows):
            feeds = whole if stop - start == rows else {n: a[start:stop] for n, a in whole.items()}
            where = f"on analysis batch {index}"
            float_values = {from_fetch[name]: value for name, value in zip(
                float_fetch, run(float_session, float_fetch, feeds, where), strict=True)}
            float_values.update({n: feeds[n] for n in inputs})
            quant_values = run(quant_session, quant_fetch, feeds, where + " (quantized model)")
            budget.measure([*float_values.values(), *quant_values], stop - start)
            for entry, q in zip(activations, quant_values, strict=True):
                x = float_values[entry.tensor]
                if x.size == 0 or q.size == 0:
                    continue  # inside an If branch that did not run
                sums[entry.tensor].update(x, q)
                computed.add(entry.tensor)
            del float_values, quant_values
    if samples == 0:
        raise DataError("the analysis data is empty", "give at least one sample")
    del float_session, quant_session, quant_proto

    errors = []
    for entry in plan.tensors.values():
        if entry.role == "bias":
            continue
        if entry.role == "weight":
            s = _ErrorSums()
            qp = result.qparams[entry.tensor]
            values = np.asarray(initializer(float_proto, entry.tensor), dtype=np.float32)
            s.update(values, entry.scheme.fake_quantize(values, qp.scale, qp.zero_point))
        else:
            s = sums.get(entry.tensor, _ErrorSums())  # no Q/DQ pair: nothing to judge
        errors.append(TensorError(entry.tensor, entry.role, list(entry.consumers), s.sqnr_db,
                                  s.cosine, s.max_abs))
    worst = sorted(
        (e for e in errors if e.role == "activation" and e.tensor in computed),
        key=lambda e: (sort_db(e.sqnr_db), e.tensor),
    )[:histograms]
    observed = _observe(float_proto, inputs, [e.tensor for e in worst], batches)
    shown = [_histogram(observed[e.tensor], result.qparams[e.tensor], e.sqnr_db) for e in worst]
    return samples, errors, shown


def _observe(float_proto, inputs, names, batches) -> dict:
    """Histograms of ``names`` over the data: one float pass fetching only those tensors."""
    from qtool.calibration.observers import HistogramObserver

    observed = {name: HistogramObserver(None, name, bins=HISTOGRAM_BINS) for name in names}
    wanted = [n for n in names if n not in inputs]
    model_bytes, fetch_names = fetchable(float_proto, wanted)  # body tensors via their node
    fetch = [fetch_names[n] for n in wanted]
    float_session = session(model_bytes) if fetch else None
    for index, batch in enumerate(iterate_batches(batches)):
        feeds = feeds_of(batch, inputs, index)
        fetched = run(float_session, fetch, feeds, f"on analysis batch {index}") if fetch else []
        values = dict(zip(wanted, fetched, strict=True))
        values.update({n: feeds[n] for n in inputs})
        for name in names:
            if np.size(values[name]):
                observed[name].update(values[name])
    return observed


def clip_range(qp) -> tuple[float, float]:
    """The range a per-tensor scale and zero point represent: ``s(qmin - z) .. s(qmax - z)``."""
    scale, zero_point = float(qp.scale), int(qp.zero_point)
    return scale * (qp.scheme.qmin - zero_point), scale * (qp.scheme.qmax - zero_point)


def _histogram(observer, qp, sqnr_db) -> Histogram:
    """The observer's histogram merged into at most :data:`DISPLAY_BINS` bins."""
    counts = observer.counts[0]
    nonzero = np.flatnonzero(counts)
    first, last = int(nonzero[0]), int(nonzero[-1])
    factor = max(1, math.ceil((last - first + 1) / DISPLAY_BINS))
    used = counts[first : last + 1]
    padded = np.zeros(math.ceil(len(used) / factor) * factor, dtype=np.int64)
    padded[: len(used)] = used
    merged = padded.reshape(-1, factor).sum(axis=1)
    width = observer.width(0)
    left = float(observer.edges_left(0)[first])
    lo, hi = clip_range(qp)
    return Histogram(qp.tensor, left, width * factor, [int(c) for c in merged],
                     float(observer.min_val[0]), float(observer.max_val[0]), [lo, hi], sqnr_db)
