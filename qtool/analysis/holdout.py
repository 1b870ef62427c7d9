r"""A held-out split of the calibration data, for when no ``--eval-data`` is given.

Choosing on the data the ranges were fitted to overfits it (a fallback that raises the
calibration SQNR can lower the held-out one), so every choice and the summary comparison
are judged on data the calibration did not see. Without ``--eval-data`` that data is carved
out of the calibration samples: sample ``i`` (in the loader's order) is held out when

    i mod stride == stride - 1,    stride = max(STRIDE, ceil(n / MAX_HELD_OUT))

that is every 8th sample, at most :data:`MAX_HELD_OUT` of them, spread over the whole data
(a folder sorted by class gives every class to both sides). The rest calibrate. Fewer than
two samples are not split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

STRIDE = 8
MAX_HELD_OUT = 128


class Subset:
    """The samples of ``source`` at ``indices`` (re-iterable, with a length).

    Attributes:
        indices: Positions in the source's order, ascending; labels follow them.
        specs: The source's model inputs with their batch axes (None if it has none).
    """

    def __init__(self, source: Iterable[Mapping[str, np.ndarray]], indices: list[int]):
        self.source = source
        self.indices = indices
        self.specs = getattr(source, "specs", None)
        self._wanted = frozenset(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def shard(self, start: int, stop: int) -> Subset:
        """The samples at positions ``start .. stop - 1`` of this subset."""
        return Subset(self.source, self.indices[start:stop])

    def to_dict(self) -> dict | None:
        """The source's description (an image folder's preprocessing), if it has one."""
        describe = getattr(self.source, "to_dict", None)
        return describe() if describe is not None else None

    def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]:
        last = self.indices[-1] if self.indices else -1
        for index, sample in enumerate(self.source):
            if index > last:
                return
            if index in self._wanted:
                yield sample


def split(samples) -> tuple[Subset, Subset] | None:
    """``(calibration, held_out)`` subsets of ``samples`` (see the module docstring).

    Args:
        samples: A loader with a length (one row per sample, as qtool's loaders give).

    Returns:
        The two subsets, or None when there are fewer than two samples.
    """
    total = len(samples)
    if total < 2:
        return None
    stride = max(STRIDE, math.ceil(total / MAX_HELD_OUT))
    if total < stride:
        stride = total
    held = [i for i in range(total) if i % stride == stride - 1]
    kept = [i for i in range(total) if i % stride != stride - 1]
    return Subset(samples, kept), Subset(samples, held)


def describe(held_out: Subset, total: int, source: str) -> str:
    """How the report names the held-out split."""
    return f"{source} (held-out split: {len(held_out)} of {total} samples, not calibrated on)"
