"""The observer interface: ``update(batch)``, ``merge(other)``, ``range()``.

An observer sees a tensor batch by batch and never keeps the batches. Its state is plain
numpy arrays and numbers (picklable, so shards can be observed in other processes and
merged). ``range()`` returns the clip range ``(lo, hi)`` the scheme turns into a scale:
scalars for per-tensor schemes, one value per channel when ``scheme.per_channel_axis`` is set.

Observers are handed around as constructors (a class, or ``Cls.with_args(...)``), never as
instances: each tensor gets its own fresh observer, as torch.ao's ``QConfig`` does.

Masks are not data. An attention mask added before a Softmax holds ``-inf`` (the TorchScript
exporter's ``Where(mask, 0, -inf)``) or ``torch.finfo(float32).min`` (HF's
``masked_fill``, the dynamo exporter): a range stretched to them rounds every real value to
zero. So every observer leaves out ``+-inf`` and values of magnitude
:data:`qtool.masks.MASK_MAGNITUDE` (``1e30``) or more and counts them (``masked``, of which
``infinite`` are ``+-inf``); no real activation of a float32 model comes near. Whether an
``Inf`` is a mask or an overflow is the collector's call (it knows which tensors a mask
constant reaches, :mod:`qtool.masks`). NaN is never a mask: it raises :class:`NonFiniteError`.
"""

from __future__ import annotations

import functools

import numpy as np

from qtool.errors import CalibrationError
from qtool.masks import MASK_MAGNITUDE
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
        self.masked = 0  # values left out as mask values (+-inf or |x| >= MASK_MAGNITUDE)
        self.infinite = 0  # of those, +-inf

    @classmethod
    def with_args(cls, **options) -> functools.partial:
        """A constructor with options bound, e.g. ``KLDObserver.with_args(bins=1024)``.

        The result is called like the class (``ctor(scheme, name)``) for every tensor.
        """
        return functools.partial(cls, **options)

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
        if other.scheme.per_channel_axis != self.scheme.per_channel_axis:
            raise TypeError(
                f"cannot merge observers of {self.name} with different per-channel axes "
                f"({other.scheme.per_channel_axis} into {self.scheme.per_channel_axis})"
            )

    def _empty_error(self) -> CalibrationError:
        return CalibrationError(
            f"observer for {self.name} saw no data",
            "the tensor was never computed: check the data, or that the tensor is reachable",
        )

    def _channels_first(self, x: np.ndarray) -> np.ndarray:
        """``x`` as rows: one row per channel (per-channel) or a single row."""
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        axis = self.scheme.per_channel_axis
        if axis is None:
            return x.reshape(1, -1)
        if not -x.ndim <= axis < x.ndim:
            raise CalibrationError(
                f"tensor {self.name} has rank {x.ndim}, no per-channel axis {axis}",
                "check the scheme's per_channel_axis",
            )
        return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)

    def _observed_rows(self, x: np.ndarray):
        """``(rows, lo, hi)`` of one batch without its mask values, or None when it is empty.

        ``rows`` as :meth:`_channels_first`; ``lo``/``hi`` the per-row extremes (float64) of
        the values that are not masks. The common batch holds no mask value and costs one
        min and one max; otherwise the mask values are counted and left out (per-channel
        rows, which must stay rectangular, get them clipped to the row's extremes instead;
        a row of masks only reads as zeros).

        Raises:
            NonFiniteError: The batch holds NaN.
        """
        rows = self._channels_first(x)
        if rows.size == 0:
            return None
        lo, hi = self._row_extremes(rows)
        if lo.min() > -MASK_MAGNITUDE and hi.max() < MASK_MAGNITUDE:
            return rows, lo, hi
        masks = np.abs(rows) >= MASK_MAGNITUDE  # +-inf included
        self.masked += int(masks.sum())
        self.infinite += int(np.isinf(rows).sum())
        if rows.shape[0] == 1:
            rows = rows[~masks].reshape(1, -1)
            if rows.size == 0:
                return None
            return rows, *self._row_extremes(rows)
        lo = np.where(masks, np.inf, rows).min(axis=1).astype(np.float64)
        hi = np.where(masks, -np.inf, rows).max(axis=1).astype(np.float64)
        empty = lo > hi
        lo[empty], hi[empty] = 0.0, 0.0
        rows = np.clip(rows, lo[:, None].astype(rows.dtype), hi[:, None].astype(rows.dtype))
        return rows, lo, hi

    def _merge_counts(self, other: Observer) -> None:
        self.masked += other.masked
        self.infinite += other.infinite

    def _row_extremes(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row min and max (float64), refusing NaN.

        NaN propagates through ``min``/``max``, so checking the two extremes finds every NaN
        without another pass over the batch.

        Raises:
            NonFiniteError: The batch holds NaN.
        """
        lo = rows.min(axis=1).astype(np.float64)
        hi = rows.max(axis=1).astype(np.float64)
        if np.isnan(lo).any() or np.isnan(hi).any():
            raise NonFiniteError(self.name, "NaN")
        return lo, hi

    def _per_tensor(self, lo: np.ndarray, hi: np.ndarray):
        """Scalars for per-tensor schemes, arrays for per-channel ones."""
        if self.scheme.per_channel_axis is None:
            return np.float64(lo[0]), np.float64(hi[0])
        return lo, hi


class NonFiniteError(CalibrationError):
    """NaN or Inf reached an observer; the collector adds which sample produced it."""

    def __init__(self, tensor: str, kind: str, where: str = ""):
        self.tensor = tensor
        self.kind = kind
        suffix = f" {where}" if where else ""
        super().__init__(
            f"tensor {tensor} contains {kind}{suffix}",
            "check the model and the input data for values that overflow",
        )
