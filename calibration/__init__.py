"""Calibration: stream data through the float graph in onnxruntime and observe ranges.

Installed as ``qtool.calibration``. ``calibrate(model, schemes, data, method=...)`` returns
``{tensor: (lo, hi)}``; ``load_data(path, model)`` picks a data loader for a path; the
observers live in ``qtool.calibration.observers``.
"""

from qtool.calibration.collector import calibrate
from qtool.calibration.data import check_inputs, load_data
from qtool.calibration.observers import OBSERVERS, get_observer

__all__ = ["OBSERVERS", "calibrate", "check_inputs", "get_observer", "load_data"]
