"""The scale math of qtool.scheme against hand-computed values and properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.errors import PlanError
from qtool.scheme import MIN_SCALE, QuantScheme, onnx_dtype

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


def test_hand_computed_symmetric_and_asymmetric():
    scale, zp = QuantScheme(bits=8, signed=True, symmetric=True).qparams(-2.0, 1.0)
    assert scale == np.float32(2.0 / 127) and zp == 0
    scale, zp = QuantScheme(bits=8, signed=False, symmetric=False).qparams(-1.0, 3.0)
    assert scale == np.float32(4.0 / 255) and zp == round(1.0 / (4.0 / 255))  # 64
    # Narrow range: TensorRT weights use [-127, 127].
    narrow = QuantScheme(narrow_range=True)
    assert (narrow.qmin, narrow.qmax) == (-127, 127)
    assert (QuantScheme().qmin, QuantScheme().qmax) == (-128, 127)
    # FBGEMM reduce_range: 7-bit unsigned levels.
    assert (QuantScheme(bits=7, signed=False, symmetric=False).qmax) == 127


def test_zero_range_gives_a_positive_scale_and_exact_zero():
    for scheme in (QuantScheme(), QuantScheme(signed=False, symmetric=False)):
        scale, zp = scheme.qparams(0.0, 0.0)
        assert scale == np.float32(MIN_SCALE) and scale > 0
        assert scheme.fake_quantize(np.zeros(4), scale, zp).tolist() == [0.0] * 4


def test_constant_positive_tensor_is_exact_under_asymmetric():
    scheme = QuantScheme(signed=False, symmetric=False)
    scale, zp = scheme.qparams(3.0, 3.0)  # widened to [0, 3]
    assert abs(scheme.fake_quantize(np.array([3.0]), scale, zp)[0] - 3.0) < 1e-6


@settings(max_examples=200, deadline=None, derandomize=True)
@given(finite, finite, st.sampled_from([4, 7, 8]), st.booleans(), st.booleans())
def test_values_inside_the_range_are_within_half_a_step(a, b, bits, signed, symmetric):
    lo, hi = min(a, b), max(a, b)
    if not signed and symmetric:
        lo = max(lo, 0.0)
        hi = max(hi, lo)
    scheme = QuantScheme(bits=bits, signed=signed, symmetric=symmetric)
    scale, zp = scheme.qparams(lo, hi)
    x = np.linspace(lo, hi, 101)
    error = np.abs(scheme.fake_quantize(x, scale, zp) - x)
    assert error.max() <= float(scale) / 2 * (1 + 1e-5) + 1e-6 * max(abs(lo), abs(hi))
    if not symmetric:  # zero is exactly representable (padding must stay exact)
        assert scheme.fake_quantize(np.array([0.0]), scale, zp)[0] == 0.0


def _expected_error(scale, amax, qmax):
    clip = min(scale * qmax, amax)
    return scale**2 / 12 * clip / amax + (amax - clip) ** 3 / (3 * amax)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(1e-6, 1e6))
def test_power_of_two_scale_is_the_better_neighbour(amax):
    scheme = QuantScheme(power_of_two=True)
    scale, _ = scheme.qparams(-amax, amax)
    k = math.log2(float(scale))
    assert k == int(k)
    ideal = amax / 127
    candidates = {2.0 ** math.floor(math.log2(ideal)), 2.0 ** math.ceil(math.log2(ideal))}
    best = min(candidates, key=lambda s: _expected_error(s, amax, 127))
    assert float(scale) == best


def test_power_of_two_rounds_down_when_clipping_costs_little():
    # amax just above a power of two times 127: the ceiling would waste half the levels.
    scheme = QuantScheme(power_of_two=True)
    scale, _ = scheme.qparams(-(127 * 0.25 * 1.01), 127 * 0.25 * 1.01)
    assert float(scale) == 0.25


def test_per_channel_qparams_and_broadcast():
    scheme = QuantScheme(per_channel_axis=0, narrow_range=True)
    lo, hi = np.array([-1.0, -0.5]), np.array([2.0, 0.25])
    scale, zp = scheme.qparams(lo, hi)
    np.testing.assert_allclose(scale, np.float32([2.0 / 127, 0.5 / 127]))
    w = np.array([[2.0, -1.0], [0.5, 0.25]])
    q = scheme.quantize(w, scale, zp)
    assert q.tolist() == [[127, -64], [127, 64]]


def test_bad_schemes_and_ranges_are_plan_errors():
    with pytest.raises(PlanError):
        QuantScheme(bits=1)
    with pytest.raises(PlanError):
        QuantScheme(signed=False, narrow_range=True)
    with pytest.raises(PlanError):
        QuantScheme().qparams(float("nan"), 1.0)
    with pytest.raises(PlanError, match="unknown scheme field"):
        QuantScheme.from_dict({"bits": 8, "sign": True})


def test_storage_types_by_opset():
    from onnx import TensorProto

    assert onnx_dtype(QuantScheme(bits=4), 21) == TensorProto.INT4
    assert onnx_dtype(QuantScheme(bits=4), 13) == TensorProto.INT8
    assert onnx_dtype(QuantScheme(bits=4, signed=False, symmetric=False), 21) == TensorProto.UINT4
    assert onnx_dtype(QuantScheme(bits=7, signed=False, symmetric=False), 13) == TensorProto.UINT8
    assert onnx_dtype(QuantScheme(bits=32), 13) == TensorProto.INT32
