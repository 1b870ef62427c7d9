"""What every data loader shares: one input's spec, a sample, the row order and shards.

Below the loaders (:mod:`qtool.calibration.data` for arrays and random inputs,
:mod:`qtool.calibration.images` for image folders), so that neither imports the other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from qtool.errors import DataError

#: One sample: an array per input name.
Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, shape (None for a dynamic dim) and batch axis.

    Attributes:
        batch_axis: The axis that indexes samples, or None for an input that is not a
            batch of samples (a scalar, a constant): its one value goes with every sample.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    batch_axis: int | None = 0


class Loader:
    """Shared ``num_samples`` limit and seeded shuffle over an indexable collection."""

    def __init__(self, num_samples: int | None, shuffle: bool, seed: int):
        if num_samples is not None and num_samples < 1:
            raise DataError(f"num_samples={num_samples}: must be a positive number")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed

    #: Rows ``(start, stop)`` of the loader's order this copy yields (:meth:`shard`).
    window: tuple[int, int] | None = None

    def _order(self, total: int) -> np.ndarray:
        order = np.arange(total)
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(total)
        order = order[: self.num_samples] if self.num_samples is not None else order
        return order if self.window is None else order[self.window[0] : self.window[1]]

    def shard(self, start: int, stop: int):
        """A copy yielding only rows ``start .. stop - 1`` of this loader's order.

        Parallel calibration sends such shards to workers (:mod:`qtool.executor`); a
        loader backed by a file travels as its path and window, never as arrays.
        """
        part = copy.copy(self)
        first = self.window[0] if self.window else 0
        part.window = (first + start, first + stop)
        return part

    def __len__(self) -> int:
        return len(self._order(self._total()))

    def _total(self) -> int:
        raise NotImplementedError
