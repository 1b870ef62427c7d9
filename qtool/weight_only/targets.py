"""What each backend takes as weight-only quantization: forms, widths, symmetry, files.

* ``onnxruntime``: ``MatMulNBits`` (default; 4 or 8 bits, asymmetric by default) or, with
  ``--backend-option format=dq``, opset-21 ``DequantizeLinear`` with ``block_size`` on
  INT4/UINT4 (INT8/UINT8) levels, for engines and NPU compilers without contrib ops;
  ``--backend-option symmetric=true`` drops the zero points.
* ``tensorrt``: INT4 symmetric ``DequantizeLinear(axis=0, block_size)`` into MatMul, no zero
  point (ModelOpt's INT4 export; TensorRT's blocked quantization is INT4 weight-only only).
* ``qnn``: LPBQ (:mod:`.lpbq`): ``model.onnx`` with the dequantized float weights,
  ``model.encodings`` (AIMET 1.0.0), and ``model.qdq.onnx`` (INT4 DequantizeLinear on the
  LPBQ scales) as the onnxruntime reference.

Other backends have no weight-only kernels: :class:`~qtool.errors.WeightOnlyError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtool.errors import WeightOnlyError

FORMATS = ("matmulnbits", "dq")


@dataclass(frozen=True)
class Target:
    """One backend's weight-only rules."""

    backend: str
    bits: tuple[int, ...]
    symmetric: bool  # the default
    symmetric_fixed: bool
    form: str  # matmulnbits | dq | lpbq
    options: tuple[str, ...] = ()


TARGETS = {
    "onnxruntime": Target("onnxruntime", (4, 8), False, False, "matmulnbits",
                          ("format", "symmetric")),
    "tensorrt": Target("tensorrt", (4,), True, True, "dq"),
    "qnn": Target("qnn", (4,), True, True, "lpbq"),
}


def target_for(backend: str, bits: int, options: dict[str, Any]) -> tuple[Target, str, bool]:
    """``(target, form, symmetric)`` for a backend, weight width and backend options.

    Raises:
        WeightOnlyError: A backend without weight-only kernels, a width it lacks, or an
            option it does not take.
    """
    target = TARGETS.get(backend)
    if target is None:
        raise WeightOnlyError(f"backend {backend} has no weight-only (blockwise integer "
                              "weight, float activation) kernels")
    if bits not in target.bits:
        raise WeightOnlyError(
            f"backend {backend}: weight-only takes {', '.join(map(str, target.bits))}-bit "
            f"weights, not {bits}", f"use --weight-bits {target.bits[0]}")
    unknown = sorted(set(options) - set(target.options))
    if unknown:
        known = ", ".join(target.options) or "none"
        raise WeightOnlyError(f"backend {backend}: --weight-only takes no option "
                              f"{unknown[0]!r}", f"its options: {known}")
    form = str(options.get("format", target.form)).lower()
    if target.backend == "onnxruntime" and form not in FORMATS:
        raise WeightOnlyError(f"backend onnxruntime: format={form!r} is not one of "
                              f"{', '.join(FORMATS)}", "e.g. --backend-option format=dq")
    symmetric = _flag(options.get("symmetric", target.symmetric))
    return target, form, symmetric


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise WeightOnlyError(f"symmetric={value!r} is not true or false",
                          "e.g. --backend-option symmetric=true")
