r"""Quantization schemes and the scale math, written once.

A scheme says how real values map to integers:

    q = clamp(round(x / scale) + zero_point, qmin, qmax)
    x' = (q - zero_point) * scale

* symmetric, signed:   scale = amax / qmax, zero_point = 0, amax = max(|lo|, |hi|);
  with ``narrow_range`` qmin = -qmax (TensorRT's [-127, 127] weights).
* symmetric, unsigned: scale = max(hi, 0) / qmax, zero_point = 0 (non-negative tensors).
* asymmetric:          the range is widened to include 0 (so 0 is exact, as padding needs),
  scale = (hi - lo) / (qmax - qmin), zero_point = qmin - round(lo / scale), clamped.
* power of two:        scale = 2^k. Rounding the ideal scale up never clips but wastes up to
  half the levels; rounding down halves the step but clips the top of the range. qtool picks
  the k in {floor, ceil} of log2(scale) with the lower expected squared error for values
  spread uniformly over the observed range:
  E = s^2/12 * (c/a) + (a - c)^3 / (3a), with a the observed amax and c = s * qmax the clip.

A zero range (a constant tensor) gets ``MIN_SCALE`` (2^-100), never 0 or NaN. A scheme with
``min_range`` (SNPE/QNN's 0.01) widens narrower ranges first: ``hi = lo + min_range``
(asymmetric, after including 0), ``amax = min_range / 2`` (signed symmetric) or ``min_range``
(unsigned symmetric).

Storage (:func:`onnx_dtype`): 8-bit and narrower levels in int8/uint8 (int4/uint4 from opset
21 for 4 bits and less); 9 to 16 bits in int16/uint16, which QuantizeLinear/DequantizeLinear
take from opset 21 (:data:`INT16_OPSET`; onnxruntime runs them, optimizations off and on).
Per-channel schemes take arrays of lo/hi, one entry per channel along ``per_channel_axis``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtool.errors import PlanError

# The smallest scale handed out. torch.ao clamps at float32 eps (1.2e-7), which wipes out
# tensors whose amax is below ~1.5e-5 (deep layers of randomly initialised nets live there).
# 2^-100 keeps such tensors, is a normal float32 and a power of two, and x / scale stays
# finite in float32 for any |x| < 1e8, so a constant (zero-range) tensor still quantizes.
MIN_SCALE = 2.0**-100

#: First default-domain opset whose QuantizeLinear/DequantizeLinear take int16/uint16.
INT16_OPSET = 21


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized.

    Attributes:
        bits: Number of integer levels is 2**bits (bits=7 with signed=False is FBGEMM's
            reduce_range: values 0..127 stored in uint8).
        signed: Signed integers (int8) or unsigned (uint8).
        symmetric: Zero point fixed at 0.
        per_channel_axis: Axis of per-channel scales, None for one scale per tensor.
        narrow_range: Symmetric signed range [-(2^(b-1)-1), 2^(b-1)-1] instead of [-2^(b-1), ...].
        power_of_two: Scales restricted to powers of two (TVM's shift-based requantization).
        min_range: Smallest range ``hi - lo`` (SNPE/QNN: 0.01); narrower ranges are widened.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel_axis: int | None = None
    narrow_range: bool = False
    power_of_two: bool = False
    min_range: float = 0.0

    def __post_init__(self):
        if not 2 <= self.bits <= 32:
            raise PlanError(f"bits={self.bits} is out of range", "use 2 to 16 (32 for bias)")
        if self.narrow_range and not self.signed:
            raise PlanError("narrow_range applies to signed schemes only")
        if not (math.isfinite(self.min_range) and self.min_range >= 0.0):
            raise PlanError(f"min_range={self.min_range} must be a finite number >= 0")

    @property
    def qmin(self) -> int:
        """Smallest integer level."""
        if not self.signed:
            return 0
        low = -(2 ** (self.bits - 1))
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self) -> int:
        """Largest integer level."""
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        """True when the scheme has one scale per channel."""
        return self.per_channel_axis is not None

    @property
    def min_opset(self) -> int:
        """Lowest opset whose Q/DQ store these levels: 21 for 9 to 16 bits, else 13."""
        return INT16_OPSET if 8 < self.bits <= 16 else 13

    def storage_bits(self, opset: int) -> int:
        """Bits of the ONNX integer type that stores the levels at this opset.

        4-bit levels use INT4/UINT4 from opset 21; below that (and for 5..7 bits) they are
        kept in 8-bit storage with the narrower range. 9 to 16 bits use INT16/UINT16, valid
        in Q/DQ from opset 21 only. Bias schemes use 32.

        Raises:
            PlanError: 9 to 16-bit levels below opset 21.
        """
        if self.bits <= 4 and opset >= INT16_OPSET:
            return 4
        if self.bits <= 8:
            return 8
        if self.bits <= 16:
            if opset < INT16_OPSET:
                raise PlanError(
                    f"{self.bits}-bit levels need int16 Q/DQ, which ONNX has from opset "
                    f"{INT16_OPSET} (the graph is at {opset})",
                    "quantize with qtool.qdq.quantize, which raises the opset for them",
                )
            return 16
        return 32

    def with_(self, **changes: Any) -> QuantScheme:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for plan JSON files; ``min_range`` only when set (older plans' bytes)."""
        data = dataclasses.asdict(self)
        if not self.min_range:
            del data["min_range"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"unknown scheme field(s) {', '.join(unknown)}",
                f"a scheme has: {', '.join(sorted(known))}",
            )
        for key, value in data.items():  # JSON from a hand-edited plan: check every type
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if key == "bits":
                valid = is_int
            elif key == "per_channel_axis":
                valid = value is None or is_int
            elif key == "min_range":
                valid = is_int or isinstance(value, float)
            else:
                valid = isinstance(value, bool)
            if not valid:
                kind = {"bits": "an integer", "per_channel_axis": "an integer or null",
                        "min_range": "a number"}
                raise PlanError(
                    f"scheme field {key}={value!r} must be {kind.get(key, 'true or false')}"
                )
        return cls(**data)

    def qparams(self, lo: Any, hi: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point for an observed range.

        Args:
            lo: Observed minimum: a scalar, or one value per channel.
            hi: Observed maximum, same shape as ``lo``.

        Returns:
            ``(scale, zero_point)``: float32 and int64 arrays of the shape of ``lo``.
        """
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        if lo.shape != hi.shape:
            raise PlanError(f"range shapes differ: lo {lo.shape}, hi {hi.shape}")
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise PlanError("range is not finite (NaN or Inf)", "check the calibration data")
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        if self.symmetric:
            amax = np.maximum(np.abs(lo), np.abs(hi)) if self.signed else np.maximum(hi, 0.0)
            amax = np.maximum(amax, self.min_range / 2.0 if self.signed else self.min_range)
            scale = amax / self.qmax
            if self.power_of_two:
                scale = np.vectorize(self._power_of_two_scale, otypes=[np.float64])(amax)
            zero_point = np.zeros(lo.shape, dtype=np.int64)
        else:
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
            hi = np.maximum(hi, lo + self.min_range)
            scale = (hi - lo) / (self.qmax - self.qmin)
            if self.power_of_two:
                scale = np.vectorize(self._power_of_two_scale, otypes=[np.float64])(
                    (hi - lo) / 2.0
                )
                scale = np.maximum(scale, MIN_SCALE)
            safe = np.maximum(scale, MIN_SCALE)
            zero_point = np.clip(np.round(self.qmin - lo / safe), self.qmin, self.qmax)
            zero_point = zero_point.astype(np.int64)
        scale = np.maximum(scale, MIN_SCALE).astype(np.float32)
        return scale, zero_point

    def _power_of_two_scale(self, amax: float) -> float:
        if amax <= 0.0:
            return MIN_SCALE
        qmax = self.qmax if self.symmetric else (self.qmax - self.qmin) / 2.0
        ideal = amax / qmax
        low_k, high_k = math.floor(math.log2(ideal)), math.ceil(math.log2(ideal))
        if low_k == high_k:
            return 2.0**low_k

        def expected_error(scale: float) -> float:
            clip = min(scale * qmax, amax)
            return scale**2 / 12.0 * (clip / amax) + (amax - clip) ** 3 / (3.0 * amax)

        low, high = 2.0**low_k, 2.0**high_k
        return low if expected_error(low) < expected_error(high) else high

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Integer levels of ``x`` (int64), as QuantizeLinear computes them (round half even)."""
        scale_b, zp_b = self._broadcast(x, scale, zero_point)
        q = np.round(np.asarray(x, dtype=np.float64) / scale_b) + zp_b
        return np.clip(q, self.qmin, self.qmax).astype(np.int64)

    def fake_quantize(
        self, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray
    ) -> np.ndarray:
        """``x`` quantized and dequantized, float32."""
        scale_b, zp_b = self._broadcast(x, scale, zero_point)
        q = self.quantize(x, scale, zero_point)
        return ((q - zp_b) * scale_b).astype(np.float32)

    def _broadcast(self, x, scale, zero_point):
        scale = np.asarray(scale, dtype=np.float64)
        zero_point = np.asarray(zero_point, dtype=np.float64)
        if scale.ndim == 0 or self.per_channel_axis is None:
            return scale, zero_point
        shape = [1] * np.ndim(x)
        shape[self.per_channel_axis] = -1
        return scale.reshape(shape), zero_point.reshape(shape)


def onnx_dtype(scheme: QuantScheme, opset: int) -> int:
    """The onnx.TensorProto data type that stores ``scheme``'s levels at ``opset``."""
    from onnx import TensorProto

    bits = scheme.storage_bits(opset)
    table = {
        (4, True): TensorProto.INT4,
        (4, False): TensorProto.UINT4,
        (8, True): TensorProto.INT8,
        (8, False): TensorProto.UINT8,
        (16, True): TensorProto.INT16,
        (16, False): TensorProto.UINT16,
        (32, True): TensorProto.INT32,
    }
    try:
        return table[(bits, scheme.signed)]
    except KeyError:
        raise PlanError(f"no ONNX integer type for {bits}-bit unsigned levels") from None
