"""Which calibration rows the correction reads: a cap, spread over the data."""

from __future__ import annotations

import numpy as np

#: Rows of calibration data the correction reads at least (where there are so many).
DEFAULT_MAX_SAMPLES = 64
#: The most rows it reads: where each row is small (see :data:`MORE_ELEMENTS`).
MORE_SAMPLES = 256
#: Input elements the correction reads beyond its first 64 rows (rows times each row's
#: input elements): as many as 64 RGB images of 224x224. The pass costs about the rows
#: times the activations, so a text recognizer's 64x160 lines read up to
#: :data:`MORE_SAMPLES` rows, a ResNet's 224x224 images and a 416x416 detector their first
#: 64. The channel means of ddddocr's recognizer had not converged at 64 rows (the standard
#: error of half its layers' mean errors as large as the shifts: ``report.noise``), and
#: all 96 rows kept 92 % of the staged correction's gain against 69 % at 64
#: (benchmarks/README.md, "Bias correction: findings").
MORE_ELEMENTS = 64 * 3 * 224 * 224

def spread(samples, count: int):
    """At most ``count`` of ``samples``, evenly spread over them.

    The first, then about every k-th: data sorted by class or by source still gives each
    to the means.

    ``samples`` without a length are returned as they are (the cap then takes the first
    rows).
    """
    try:
        total = len(samples)
    except TypeError:
        return samples
    if total <= count:
        return samples
    from qtool.analysis.holdout import Subset

    indices = sorted({int(i) for i in np.linspace(0, total - 1, count)})
    return Subset(samples, indices)


def more_rows(samples, first, count: int):
    """Up to ``count`` rows of ``samples`` spread over them, less those of ``first``.

    ``first`` is what :func:`spread` gave; None where there is nothing more to read (every
    row is in ``first``, or ``samples`` has no length).
    """
    try:
        total = len(samples)
    except TypeError:
        return None
    from qtool.analysis.holdout import Subset

    if first is samples:
        return None  # spread() kept every row
    taken = set(first.indices) if isinstance(first, Subset) else set(range(len(first)))
    wanted = sorted({int(i) for i in np.linspace(0, total - 1, min(count, total))})
    rest = [i for i in wanted if i not in taken]
    return Subset(samples, rest) if rest else None


def with_more(batches, more, graph):
    """``batches``, then the rows of ``more`` up to :data:`MORE_ELEMENTS` input elements.

    ``batches`` counts as :data:`DEFAULT_MAX_SAMPLES` rows (what :func:`spread` gave the
    workflow); the row size comes from its first batch. None ``more``: ``batches``.
    """
    if more is None:
        return batches
    from qtool.analysis.common import iterate_batches
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    specs = model_inputs(graph)
    first = next(iter(iterate_batches(batches)), None)
    if first is None:
        return batches
    per_row = sum(np.asarray(v).size for k, v in first.items() if k != "labels") / max(
        batch_rows(first, specs), 1)
    room = int(MORE_ELEMENTS // per_row) if per_row else 0
    extra = capped(more, room - DEFAULT_MAX_SAMPLES, graph)

    def chained():
        yield from iterate_batches(batches)
        if room > DEFAULT_MAX_SAMPLES:
            yield from iterate_batches(extra)

    return chained


def capped(batches, max_samples: int | None, graph):
    """``batches`` stopped once ``max_samples`` rows were given (whole batches)."""
    if max_samples is None:
        return batches
    from qtool.analysis.common import iterate_batches
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    specs = model_inputs(graph)

    def capped():
        rows = 0
        for batch in iterate_batches(batches):
            if rows >= max_samples:
                return
            rows += batch_rows(batch, specs)
            yield batch

    return capped


