"""Observers: one small class per calibration method, each streaming and mergeable.

``get_observer(name)`` returns the class for a method name; rules and ``calibrate`` take a
name, a class or ``Cls.with_args(...)`` (a constructor), never an instance, so that every
tensor gets a fresh observer. Adding a method is adding one class and one line to
``OBSERVERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

from qtool.calibration.observers.base import NonFiniteError, Observer
from qtool.calibration.observers.ema_minmax import EMAMinMaxObserver
from qtool.calibration.observers.histogram import HistogramObserver
from qtool.calibration.observers.kld import KLDObserver
from qtool.calibration.observers.meanstd import MeanStdObserver
from qtool.calibration.observers.minmax import MinMaxObserver
from qtool.calibration.observers.mse import MSEObserver
from qtool.calibration.observers.norm import NormObserver
from qtool.calibration.observers.quantile import QuantileObserver

from qtool.errors import CalibrationError

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "mse": MSEObserver,
    "kld": KLDObserver,
    "quantile": QuantileObserver,
    "norm": NormObserver,
    "meanstd": MeanStdObserver,
    "ema_minmax": EMAMinMaxObserver,
}

ObserverSpec = Union[str, type[Observer], Callable[..., Observer]]  # noqa: UP007 (py3.10 alias)


def get_observer(spec: ObserverSpec) -> Callable[..., Observer]:
    """The observer constructor for a method name (or a constructor, returned as is).

    Args:
        spec: A name from :data:`OBSERVERS`, an :class:`Observer` subclass, or a constructor
            such as ``KLDObserver.with_args(bins=1024)``.

    Returns:
        A callable ``ctor(scheme, name) -> Observer``.

    Raises:
        CalibrationError: An unknown name, or an observer instance where a constructor is
            expected.
    """
    if isinstance(spec, Observer):
        cls = type(spec).__name__
        raise CalibrationError(
            f"got an observer instance ({cls}) where an observer constructor is expected",
            f"pass the class {cls} or {cls}.with_args(...), or a name such as "
            f"'{next((n for n, c in OBSERVERS.items() if c is type(spec)), 'minmax')}': "
            "each tensor gets its own fresh observer",
        )
    if isinstance(spec, str):
        try:
            return OBSERVERS[spec.lower()]
        except KeyError:
            raise CalibrationError(
                f"unknown calibration method {spec!r}",
                f"choose one of: {', '.join(OBSERVERS)}",
            ) from None
    if callable(spec):
        return spec
    raise CalibrationError(
        f"calibration method {spec!r} is neither a name nor an observer constructor",
        f"choose one of: {', '.join(OBSERVERS)}",
    )


__all__ = [
    "OBSERVERS",
    "EMAMinMaxObserver",
    "HistogramObserver",
    "KLDObserver",
    "MSEObserver",
    "MeanStdObserver",
    "MinMaxObserver",
    "NonFiniteError",
    "NormObserver",
    "Observer",
    "QuantileObserver",
    "get_observer",
]
