r"""What the data-aware roundings need from the calibration data, streamed.

For every input tensor ``X`` of a weight-only MatMul (rows = every position of every sample,
``K`` channels), over all calibration batches::

    H   = sum X^T X / rows          (float64, K x K: GPTQ's Hessian, AWQ's error metric)
    m_k = sum |X[:, k]| / rows      (AWQ's activation scale)

The tensors are fetched batch by batch through the calibration collector
(:mod:`qtool.calibration.collector`: one onnxruntime session, micro-batches by memory
budget); each batch is added to the sums and dropped, so memory is ``K^2`` floats per input
tensor whatever the number of samples. MatMuls that read one tensor share its statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from qtool.calibration.collector import (
    Collector,
    batches,
    checked_samples,
    plan_observation,
    resolve_batch_size,
    run_budget,
)
from qtool.calibration.data import specs_of
from qtool.calibration.observers.base import Observer
from qtool.errors import CalibrationError


class InputStats(Observer):
    """``H`` and mean ``|x|`` of one MatMul input (last axis = channels)."""

    def __init__(self, channels: int, name: str = "<tensor>"):
        super().__init__(None, name)
        self.gram = np.zeros((channels, channels), np.float64)
        self.abs_sum = np.zeros(channels, np.float64)
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch (any leading shape, channels last)."""
        rows = np.asarray(x, np.float64).reshape(-1, self.gram.shape[0])
        if not np.isfinite(rows).all():
            raise CalibrationError(f"NaN or Inf in {self.name}",
                                   "check the model and the data for NaN/Inf")
        self.gram += rows.T @ rows
        self.abs_sum += np.abs(rows).sum(axis=0)
        self.rows += rows.shape[0]

    def merge(self, other: InputStats) -> None:
        """Add the sums of another shard."""
        self.gram += other.gram
        self.abs_sum += other.abs_sum
        self.rows += other.rows

    @property
    def hessian(self) -> np.ndarray:
        """``H = X^T X / rows``."""
        self._check()
        return self.gram / self.rows

    @property
    def mean_abs(self) -> np.ndarray:
        """Mean ``|x|`` per channel."""
        self._check()
        return self.abs_sum / self.rows

    def _check(self) -> None:
        if not self.rows:
            raise self._empty_error()


def collect_stats(graph, channels: Mapping[str, int], data: Iterable[Mapping[str, np.ndarray]],
                  *, batch_size: int | None = None,
                  memory_budget: int | None = None) -> dict[str, InputStats]:
    """Stream ``data`` through the float ``graph`` and return the stats of each tensor.

    Args:
        graph: The float graph (or model/path).
        channels: Input tensor name -> its channel count ``K``.
        data: Samples ``dict[input, ndarray]``.
        batch_size: Rows per onnxruntime run.
        memory_budget: Bytes of fetched tensors per run (micro-batches above it).
    """
    stats = {name: InputStats(k, name) for name, k in channels.items()}
    if not stats:
        return stats
    specs = specs_of(data, graph)
    plan = plan_observation(graph, stats)
    size, fixed = resolve_batch_size(specs, batch_size)
    collector = Collector(plan, stats, memory_budget=run_budget(specs, fixed, memory_budget))
    del plan
    collector.observe_constants()
    for batch in batches(checked_samples(data, specs), specs, size, fixed=fixed):
        collector.run(batch)
    return stats
