"""One exception root for every mistake a user can make, each kind with its own exit code.

The library raises these; only ``cli.py`` catches them, prints ``message`` and ``hint`` on one
line each and exits with ``exit_code``. Anything else escaping is a bug in qtool.
"""

from __future__ import annotations


class QtoolError(Exception):
    """Base of every error qtool reports to a user.

    Attributes:
        message: What is wrong, naming the thing (file, tensor, node, option).
        hint: What to do about it.
        exit_code: Process exit code the CLI uses for this kind of error.
    """

    exit_code = 2
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self):
        # Errors cross process boundaries (local workers, Ray tasks): keep the hint.
        return _rebuild, (type(self), self.message, self.hint)


def _rebuild(cls: type[QtoolError], message: str, hint: str | None) -> QtoolError:
    error = cls.__new__(cls)
    QtoolError.__init__(error, message, hint)
    return error


class ModelLoadError(QtoolError):
    """The model file is missing, unreadable, not ONNX, truncated or unsafe."""

    exit_code = 3
    default_hint = "check the path and that the file is an ONNX model (onnx.load must read it)"


class InvalidModelError(QtoolError):
    """The model is ONNX but invalid: checker or shape inference fails, dangling edges, cycles."""

    exit_code = 3
    default_hint = "run onnx.checker.check_model on it, or re-export it from the framework"


class UnsupportedModelError(QtoolError):
    """The model uses something qtool does not handle: opset out of range, unknown domain."""

    exit_code = 4
    default_hint = "qtool accepts the default ONNX domain at opsets 11 to 21"


class QuantizedInputError(UnsupportedModelError):
    """The input model is already quantized (Q/DQ or QOperator nodes)."""

    default_hint = "give qtool the float model the quantized one was made from"


class PassError(QtoolError):
    """A graph pass failed or broke an invariant; the message names the pass."""

    exit_code = 5
    default_hint = "rerun with --debug and report the model if this looks like a qtool bug"


class RecipeError(QtoolError):
    """A pipeline recipe (YAML/JSON) names an unknown pass or an unknown option."""

    exit_code = 2
    default_hint = "`qtool run --list-passes` shows the passes and their options"


class PlanError(QtoolError):
    """A quantization plan is malformed, or an edit names a tensor or node that does not exist."""

    exit_code = 2
    default_hint = "save the plan with `qtool calibrate --save-plan` and edit that file"


class BackendError(QtoolError):
    """An unknown backend, or an option that backend does not accept."""

    exit_code = 2
    default_hint = "see `qtool calibrate --help` for the backends"


class DataError(QtoolError):
    """Calibration or evaluation data missing, empty, or not matching the model's inputs."""

    exit_code = 6
    default_hint = (
        "give .npz/.npy arrays keyed by input name, or an image folder that fits the input"
    )


class CalibrationError(QtoolError):
    """Calibration could not produce a range: NaN/Inf activations, an empty observer."""

    exit_code = 7
    default_hint = "check the model and the data for NaN/Inf; use more or different samples"


class OutputError(QtoolError):
    """The output location cannot be written, or exists and would be overwritten."""

    exit_code = 8
    default_hint = "choose another output folder, or pass --force to replace it"


class ProviderError(QtoolError):
    """An onnxruntime execution provider that is unknown or not available here."""

    exit_code = 2
    default_hint = "pass --provider cpu, or install the onnxruntime build with that provider"


class ExecutorError(QtoolError):
    """Parallel work could not run: the Ray cluster is unreachable, or a worker died."""

    exit_code = 9
    default_hint = "retry with --workers 1 (and without --executor ray) to see the error"


class TaskError(QtoolError):
    """An unknown task (``--task``), task option or a decoder recipe that does not load."""

    exit_code = 2


class WeightOnlyError(QtoolError):
    """Weight-only quantization asked of a backend, width or format that cannot take it."""

    exit_code = 2
    default_hint = ("--weight-only writes onnxruntime (MatMulNBits or DequantizeLinear), "
                    "tensorrt (INT4 DequantizeLinear) and qnn (LPBQ encodings)")


class PrecisionError(QtoolError):
    """``--precision`` names a number format the backend does not run."""

    exit_code = 2
    default_hint = "--precision fp8 is for -b tensorrt (and -b onnxruntime as a simulation)"
