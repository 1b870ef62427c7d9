"""Which calibration rows the correction reads: a cap, spread over the data."""

from __future__ import annotations

import numpy as np

#: Rows of calibration data the correction reads by default: the channel means have
#: converged there (benchmarks/bench_bias_correction.py measures where).
DEFAULT_MAX_SAMPLES = 64


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


