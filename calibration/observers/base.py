"""The observer interface: ``update(batch)``, ``merge(other)``, ``range()``.

An observer sees a tensor batch by batch and never keeps the batches. Its state is plain
numpy arrays and numbers (picklable, so shards can be observed in other processes and
merged). ``range()`` returns the clip range ``(lo, hi)`` the scheme turns into a scale:
scalars for per-tensor schemes, one value per channel when ``scheme.per_channel_axis`` is set.
"""

from __future__ import annotations

import numpy as np

from qtool.errors import CalibrationError
from qtool.scheme import QuantScheme


class Observer:
    """Base class of all observers.

    Args:
        scheme: The scheme the range is for (bits, symmetric, per-channel axis). Methods that
            search a clip range (MSE, KLD, Norm) need it; MinMax only reads the axis.
        name: Tensor name, used in error messages.
    """

    def __init__(self, scheme: QuantScheme | None = None, name: str = "<tensor>"):
        self.scheme = scheme or QuantScheme()
        self.name = name

    def update(self, x: np.ndarray) -> None:
        """Observe one batch."""
        raise NotImplementedError

    def merge(self, other: Observer) -> None:
        """Fold in the state of another observer of the same kind (a shard of the data)."""
        raise NotImplementedError

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The clip range ``(lo, hi)``.

        Raises:
            CalibrationError: Nothing was observed.
        """
        raise NotImplementedError

    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, zero_point)`` of the observed range under the observer's scheme."""
        return self.scheme.qparams(*self.range())

    def _check_mergeable(self, other: Observer) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")

    def _empty_error(self) -> CalibrationError:
        return CalibrationError(
            f"observer for {self.name} saw no data",
            "the tensor was never computed: check the data, or that the tensor is reachable",
        )

    def _channels_first(self, x: np.ndarray) -> np.ndarray:
        """``x`` as float64 rows: one row per channel (per-channel) or a single row."""
        x = np.asarray(x)
        if self.scheme.per_channel_axis is None:
            return x.reshape(1, -1)
        return np.moveaxis(x, self.scheme.per_channel_axis, 0).reshape(x.shape[self.scheme.per_channel_axis], -1)

    def _check_finite(self, x: np.ndarray, sample: str | None = None) -> None:
        if not np.all(np.isfinite(x)):
            bad = "NaN" if np.isnan(x).any() else "Inf"
            where = f" in {sample}" if sample else ""
            raise CalibrationError(
                f"tensor {self.name} contains {bad}{where}",
                "check the model and the input data for values that overflow",
            )
