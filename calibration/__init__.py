"""Calibration: stream data through the float graph in onnxruntime and observe ranges.

Installed as ``qtool.calibration``.
"""
