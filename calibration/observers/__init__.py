"""Observers: one small class per calibration method, each streaming and mergeable."""

from qtool.calibration.observers.base import Observer
from qtool.calibration.observers.minmax import MinMaxObserver

__all__ = ["Observer", "MinMaxObserver"]
