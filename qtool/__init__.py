"""qtool: ONNX post-processing for quantization.

Load a float ONNX model, clean it, fold BatchNorm, place QuantizeLinear/DequantizeLinear by the
rules of one inference engine, calibrate ranges through onnxruntime and write the files that
engine consumes.

Example:
    >>> import qtool
    >>> g = qtool.load("model.onnx")
    >>> g, report = qtool.Pipeline(["cleanup", "fold_bn"]).run(g)
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# In the repository, backends/, calibration/ and cli.py sit beside qtool/ (the design card's
# layout); the wheel installs them inside this package. From a checkout (editable install or
# tests run in place) extend the package path to the checkout root so that qtool.backends,
# qtool.calibration and qtool.cli resolve there. The check on pyproject.toml + cli.py keeps an
# installed qtool from ever searching site-packages itself.
_checkout_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout_root, "pyproject.toml")) and os.path.isfile(
    os.path.join(_checkout_root, "cli.py")
):
    __path__.append(_checkout_root)  # type: ignore[name-defined]  # noqa: F821

# Public names resolved on first use, so `import qtool` stays cheap and optional parts
# (onnxruntime sessions, torch for QAT) load only when asked for.
_LAZY = {
    # name: (module, attribute); attribute None means the module itself.
    "load": ("qtool.io", "load"),
    "save": ("qtool.io", "save"),
    "to_model": ("qtool.io", "to_model"),
    "Pipeline": ("qtool.pipeline", "Pipeline"),
    "PassReport": ("qtool.pipeline", "PassReport"),
    "register_pass": ("qtool.pipeline", "register_pass"),
    "QuantScheme": ("qtool.scheme", "QuantScheme"),
    "QtoolError": ("qtool.errors", "QtoolError"),
    "QuantPlan": ("qtool.plan", "QuantPlan"),
    "build_plan": ("qtool.planner", "build_plan"),
    "quantize": ("qtool.qdq", "quantize"),
    "calibrate": ("qtool.calibration", "calibrate"),
    "data": ("qtool.calibration.data", None),
    "backends": ("qtool.backends", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'qtool' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
