"""Observers against hand-computed references and numpy on synthetic distributions."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qtool.calibration.observers import (
    OBSERVERS,
    EMAMinMaxObserver,
    HistogramObserver,
    KLDObserver,
    MeanStdObserver,
    MinMaxObserver,
    MSEObserver,
    NormObserver,
    QuantileObserver,
    get_observer,
)
from qtool.calibration.observers.histogram import grid_exponent

from qtool.errors import CalibrationError
from qtool.scheme import QuantScheme

SYM = QuantScheme()
ASYM = QuantScheme(signed=False, symmetric=False)
UNSIGNED = QuantScheme(signed=False, symmetric=True)
SCHEMES = [
    SYM,
    ASYM,
    UNSIGNED,
    QuantScheme(narrow_range=True),
    QuantScheme(power_of_two=True),
    QuantScheme(bits=4),
    QuantScheme(signed=True, symmetric=False),
]


def rng(seed=0):
    return np.random.default_rng(seed)


def gaussian(n=200_000, seed=0):
    return rng(seed).standard_normal(n).astype(np.float32)


def laplace(n=200_000, seed=1):
    return rng(seed).laplace(size=n).astype(np.float32)


def half_normal(n=200_000, seed=2):
    return np.maximum(gaussian(n, seed), 0.0)


def with_outliers(x, value=60.0, count=20):
    x = x.copy()
    x[:count] = np.linspace(value / 2, value, count)
    return x


def observe(cls, scheme, x, shards=1, **kwargs):
    obs = cls(scheme, "t", **kwargs)
    for part in np.array_split(x, shards):
        obs.update(part)
    return obs


# -- hand-computed references ------------------------------------------------------------


def test_minmax_hand_computed():
    obs = MinMaxObserver(SYM, "t")
    obs.update(np.array([[1.0, -2.0], [3.0, 0.5]], dtype=np.float32))
    obs.update(np.array([-0.5, 2.5], dtype=np.float32))
    assert obs.range() == (-2.0, 3.0)
    scale, zp = obs.qparams()
    assert scale == np.float32(3.0 / 127) and zp == 0


def test_ema_minmax_hand_computed():
    obs = EMAMinMaxObserver(SYM, "t")
    obs.update(np.array([[1.0, -2.0], [3.0, 0.5]], dtype=np.float32))  # min -2, max 3
    obs.update(np.array([0.5, 10.0, -1.0], dtype=np.float32))  # min -1, max 10
    obs.update(np.zeros((0, 4), dtype=np.float32))  # an empty batch counts for nothing
    assert obs.range() == (-1.5, 6.5)
    per_channel = EMAMinMaxObserver(QuantScheme(per_channel_axis=1), "t")
    per_channel.update(np.array([[1.0, -2.0], [3.0, 0.5]], dtype=np.float32))
    per_channel.update(np.array([[2.0, 4.0]], dtype=np.float32))
    lo, hi = per_channel.range()
    assert lo.tolist() == [1.5, 1.0] and hi.tolist() == [2.5, 2.25]
    merged = EMAMinMaxObserver(SYM, "t")
    merged.merge(obs)
    merged.merge(observe(EMAMinMaxObserver, SYM, np.array([4.0, -4.5], dtype=np.float32)))
    assert merged.range() == ((-2.0 - 1.0 - 4.5) / 3, (3.0 + 10.0 + 4.0) / 3)


def test_meanstd_hand_computed():
    obs = MeanStdObserver(SYM, "t", k=1.0)
    obs.update(np.array([1.0, 3.0], dtype=np.float32))
    obs.update(np.array([5.0, 7.0], dtype=np.float32))
    # mean 4, population variance (9 + 1 + 1 + 9) / 4 = 5
    lo, hi = obs.range()
    assert lo == pytest.approx(4 - np.sqrt(5)) and hi == pytest.approx(4 + np.sqrt(5))
    obs3 = observe(MeanStdObserver, SYM, np.array([1.0, 3.0, 5.0, 7.0], dtype=np.float32))
    assert obs3.range() == (1.0, 7.0)  # mean ± 3 std clipped to the observed extremes


def test_norm_hand_computed_l2_and_l1():
    x = np.array([3.0, -4.0], dtype=np.float32)  # mean of squares 12.5
    obs = observe(NormObserver, SYM, x)
    s = 2 * np.sqrt(12.5) / np.sqrt(127)
    assert obs.scale()[0] == pytest.approx(s)
    lo, hi = obs.range()
    assert (lo, hi) == (pytest.approx(-s * 127), pytest.approx(s * 127))
    assert obs.qparams()[0] == np.float32(s)
    obs1 = observe(NormObserver, SYM, x, p=1.0)  # LSQ: 2 * mean|x| / sqrt(Qp)
    assert obs1.scale()[0] == pytest.approx(2 * 3.5 / np.sqrt(127))


def test_norm_asymmetric_keeps_minmax_zero_point():
    x = np.array([-1.0, 0.0, 3.0], dtype=np.float32)
    obs = observe(NormObserver, ASYM, x)
    s = 2 * np.sqrt(10 / 3) / np.sqrt(255)
    scale, zp = obs.qparams()
    assert scale == pytest.approx(s, rel=1e-6)
    assert zp == MinMaxObserver(ASYM).__class__(ASYM).scheme.qparams(-1.0, 3.0)[1]


def test_quantile_hand_computed():
    # 10 values on integer points: the 0.85 quantile of |x| counts 8.5 of 10 values.
    x = np.arange(10, dtype=np.float32)
    obs = observe(QuantileObserver, SYM, x, q=0.85, bins=16)
    lo, hi = obs.range()
    assert lo == 0.0
    assert abs(hi - np.quantile(x, 0.85)) <= obs.width(0)


def test_histogram_grid_is_power_of_two_and_exact():
    obs = observe(QuantileObserver, SYM, np.array([0.0, 1.0, 1.5, 3.99], dtype=np.float32), bins=8)
    assert obs.exponent[0] == -1  # 8 bins of width 0.5 cover [0, 4)
    assert obs.counts[0].tolist() == [1, 0, 1, 1, 0, 0, 0, 1]
    obs.update(np.array([-4.0], dtype=np.float32))  # range grows: width 1 from -4
    assert obs.exponent[0] == 0 and obs.start[0] == -4
    assert obs.counts[0].tolist() == [1, 0, 0, 0, 1, 2, 0, 1]


# -- synthetic distributions ---------------------------------------------------------------


HEAVY_TAILS = {
    "laplace": laplace,
    "gaussian+outliers": lambda: with_outliers(gaussian()),
    "relu+outliers": lambda: with_outliers(half_normal()),
}


@pytest.mark.parametrize(
    "cls, bits, tail",
    [(KLDObserver, 8, tail) for tail in HEAVY_TAILS]
    + [(MSEObserver, 8, "laplace")]
    + [(MSEObserver, 4, tail) for tail in HEAVY_TAILS],
)
def test_kld_and_mse_clip_below_minmax_on_heavy_tails(cls, bits, tail):
    # At 8 bits a few far outliers cost MSE more clipped than rounded (the brute-force
    # check below agrees), so MSE is held to clipping at 4 bits there.
    x = HEAVY_TAILS[tail]()
    scheme = (UNSIGNED if x.min() >= 0 else SYM).with_(bits=bits)
    minmax_amax = float(np.abs(x).max())
    lo, hi = observe(cls, scheme, x, shards=4).range()
    amax = max(abs(lo), abs(hi))
    assert amax < 0.8 * minmax_amax
    assert amax > 2.0  # does not collapse onto the bulk of a unit-scale distribution


@pytest.mark.parametrize("tail", sorted(HEAVY_TAILS))
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_matches_brute_force_on_the_data(tail, bits):
    x = HEAVY_TAILS[tail]()
    scheme = (UNSIGNED if x.min() >= 0 else SYM).with_(bits=bits)
    lo, hi = observe(MSEObserver, scheme, x).range()

    def error(amax):
        scale, zp = scheme.qparams(-amax if scheme.signed else 0.0, amax)
        return float(np.mean((scheme.fake_quantize(x, scale, zp) - x) ** 2))

    amax = float(np.abs(x).max())
    brute = min(error(t) for t in np.linspace(amax / 300, amax, 300))
    found = error(max(abs(lo), abs(hi)))
    assert found <= 1.01 * brute
    assert found <= error(amax)


def test_mse_on_a_gaussian_matches_the_known_optimum():
    # The MSE-optimal 8-bit symmetric clip of a unit gaussian lies near 4 sigma (Banner et
    # al. 2019 report 3.92 for 8 bits at 4-bit..8-bit resolution); with 200k samples it must
    # fall between 3 and 5.
    lo, hi = observe(MSEObserver, SYM, gaussian()).range()
    assert 3.0 < max(-lo, hi) < 5.0


def assert_quantile_close(estimate, x, q, width):
    """Within a bin of numpy's quantile, widened in sparse tails to the neighbouring samples.

    numpy interpolates between the order statistics around ``q (n - 1)``; where the data is
    sparser than a bin (far tails) those two samples can be further apart than a bin.
    """
    ordered = np.sort(x.astype(np.float64))
    position = q * (len(x) - 1)
    below = ordered[max(int(np.floor(position)) - 1, 0)]
    above = ordered[min(int(np.ceil(position)) + 1, len(x) - 1)]
    reference = np.quantile(x.astype(np.float64), q)
    assert min(reference, below) - width - 1e-9 <= estimate <= max(reference, above) + width + 1e-9
    if above - below <= width:  # dense region: plainly within one bin of numpy
        assert abs(estimate - reference) <= width + 1e-9


@pytest.mark.parametrize("make", [gaussian, laplace, half_normal,
                                  lambda: with_outliers(laplace(), 1e4, 3)])
@pytest.mark.parametrize("q", [0.9999, 0.99, 0.9])
def test_quantile_matches_numpy_within_a_bin(make, q):
    x = make()
    asym = observe(QuantileObserver, ASYM, x, shards=3, q=q)
    lo, hi = asym.range()
    assert_quantile_close(hi, x, q, asym.width(0))
    assert_quantile_close(lo, x, 1 - q, asym.width(0))
    sym = observe(QuantileObserver, SYM, x, q=q)
    _, abs_width = sym.abs_histogram(0)
    assert_quantile_close(max(-sym.range()[0], sym.range()[1]), np.abs(x), q, abs_width)


def test_meanstd_matches_numpy():
    x = laplace()
    lo, hi = observe(MeanStdObserver, SYM, x, shards=7).range()
    assert lo == pytest.approx(x.mean(dtype=np.float64) - 3 * x.std(dtype=np.float64), rel=1e-9)
    assert hi == pytest.approx(x.mean(dtype=np.float64) + 3 * x.std(dtype=np.float64), rel=1e-9)


def _tensorrt_entropy_amax(x, bins=2048, levels=128):
    """TensorRT's entropy calibration as MXNet's and onnxruntime's reproductions write it,
    restated here with loops: a histogram of |x| on ``bins`` linear bins over [0, amax], bin 0
    set to bin 1 (pytorch-quantization's zero-bin treatment), every threshold ``i`` from
    ``levels``: P = bins[:i] with the clipped tail added to its last bin; Q = bins[:i] merged
    into ``levels`` groups of ``i // levels`` bins (the last one takes the remainder), each
    group's sum spread over its non-empty bins; the threshold with the least KL(P || Q)."""
    from scipy.stats import entropy

    hist, edges = np.histogram(np.abs(x), bins=bins, range=(0.0, float(np.abs(x).max())))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    divergences = []
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        starts = np.arange(levels) * (i // levels)  # last group: up to i
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        sums = np.add.reduceat(hist[:i], starts)
        counts = np.add.reduceat((hist[:i] > 0).astype(np.float64), starts)
        q = np.where(hist[:i] > 0, sums[group] / np.maximum(counts[group], 1), 0.0)
        q[(p > 0) & (q == 0)] = 1e-10  # smoothing, as the reproductions do
        divergences.append(entropy(p / p.sum(), q / q.sum()))
    return edges[int(np.argmin(divergences)) + levels]


@pytest.mark.parametrize("data", ["laplace", "gaussian"])
def test_kld_matches_tensorrt_entropy_reference(data):
    """The threshold of qtool's KLD is that of an independent TensorRT entropy calibration
    computed on exactly 2048 linear bins of the data itself (within 2 %)."""
    x = laplace() if data == "laplace" else gaussian()
    reference = _tensorrt_entropy_amax(x)
    lo, hi = observe(KLDObserver, SYM, x).range()
    assert max(-lo, hi) == pytest.approx(reference, rel=0.02)
    assert reference < np.abs(x).max()  # the tail is clipped: the comparison means something


def test_kld_threshold_scales_with_the_data():
    """2048 linear bins over [0, amax] whatever the scale: data times k, threshold times k."""
    x = laplace(100_000)
    _, base = observe(KLDObserver, SYM, x).range()
    for k in (1.1, 1.3, 1.5, 1.7, 1.9, 3.0):
        _, hi = observe(KLDObserver, SYM, x * k).range()
        assert hi / base == pytest.approx(k, rel=0.02), k


@pytest.mark.parametrize("scheme", [SYM, UNSIGNED])
def test_kld_keeps_the_bulk_of_a_relu_output(scheme):
    # half the values are exact zeros; the threshold must still cover the positive bulk
    x = half_normal()
    lo, hi = observe(KLDObserver, scheme, x).range()
    assert lo == 0.0 and 3.0 < hi <= x.max()


# -- merging ------------------------------------------------------------------------------

arrays = st.integers(0, 2**31 - 1).flatmap(
    lambda seed: st.tuples(
        st.just(seed),
        st.sampled_from(["gaussian", "laplace", "relu", "outliers", "shifted"]),
        st.integers(1, 6),
    )
)


def synthetic(seed, kind, n=4000):
    r = np.random.default_rng(seed)
    if kind == "gaussian":
        x = r.standard_normal(n) * r.uniform(0.01, 100)
    elif kind == "laplace":
        x = r.laplace(size=n)
    elif kind == "relu":
        x = np.maximum(r.standard_normal(n), 0)
    elif kind == "shifted":
        x = r.standard_normal(n) + 1000.0
    else:
        x = r.standard_normal(n)
        x[r.integers(0, n, 3)] = r.uniform(-1e4, 1e4, 3)
    return x.astype(np.float32)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(arrays, st.sampled_from(sorted(OBSERVERS)), st.sampled_from(SCHEMES))
def test_merged_shards_equal_one_pass(case, method, scheme):
    seed, kind, shards = case
    x = synthetic(seed, kind)
    cls = OBSERVERS[method]
    whole = observe(cls, scheme, x)
    parts = np.array_split(np.random.default_rng(seed).permutation(x), shards)
    if method == "ema_minmax":  # a mean over batches: one pass must see the same batches
        whole = cls(scheme, "t")
        for part in parts:
            whole.update(part)
    merged = cls(scheme, "t")
    for part in parts:
        shard = cls(scheme, "t")
        shard.update(part)
        merged.merge(pickle.loads(pickle.dumps(shard)))  # state ships as plain arrays
    if isinstance(whole, HistogramObserver):
        # the histogram is order-independent: merged counts equal one pass, bin for bin
        assert np.array_equal(whole.counts, merged.counts)
        assert np.array_equal(whole.exponent, merged.exponent)
    if method in ("minmax",) or isinstance(whole, HistogramObserver):
        assert merged.range() == whole.range()
    else:
        np.testing.assert_allclose(merged.range(), whole.range(), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(arrays, st.sampled_from([1, 2, 8]), st.sampled_from([None, 1]))
def test_histogram_loaded_from_a_finer_one_equals_its_own_pass(case, ratio, axis):
    """``--method auto`` reads MSE's 2048 bins from KLD's 8 x 2048: bit for bit as streamed."""
    seed, kind, shards = case
    x = synthetic(seed, kind).reshape(-1, 2) if axis else synthetic(seed, kind)
    scheme = QuantScheme(per_channel_axis=axis)
    parts = np.array_split(x, shards)
    fine, coarse = HistogramObserver(scheme, "t", bins=256 * ratio), MSEObserver(scheme, "t",
                                                                                 bins=256)
    for part in parts:
        fine.update(part)
        coarse.update(part)
    loaded = MSEObserver(scheme, "t", bins=256)
    loaded.load_state(fine)
    for field in ("counts", "exponent", "start", "min_val", "max_val"):
        assert np.array_equal(getattr(loaded, field), getattr(coarse, field)), field
    assert np.array_equal(loaded.range(), coarse.range())
    with pytest.raises(TypeError):
        HistogramObserver(scheme, "t", bins=3 * 256).load_state(fine)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.floats(-1e6, 1e6), st.floats(0, 1e6), st.integers(2, 4096))
def test_grid_exponent_fits_and_is_monotone(lo, span, bins):
    hi = lo + span
    e = grid_exponent(lo, hi, bins)
    w = 2.0**e
    assert np.floor(hi / w) - np.floor(lo / w) + 1 <= bins
    assert grid_exponent(lo - span - 1, hi + 1, bins) >= e


# -- edge cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_empty_observer_raises(method):
    obs = OBSERVERS[method](SYM, "conv1_out")
    obs.update(np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(CalibrationError, match="conv1_out"):
        obs.range()
    with pytest.raises(CalibrationError):
        obs.qparams()


@pytest.mark.parametrize("method", sorted(OBSERVERS))
@pytest.mark.parametrize("value", [0.0, 2.5, -7.0])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_constant_tensor_gives_valid_positive_scale(method, value, scheme):
    obs = observe(OBSERVERS[method], scheme, np.full(100, value, dtype=np.float32))
    lo, hi = obs.range()
    assert np.isfinite(lo) and np.isfinite(hi)
    scale, zp = obs.qparams()
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    assert scheme.qmin <= int(zp) <= scheme.qmax
    if method in ("minmax", "meanstd", "mse", "kld", "quantile"):
        assert (lo, hi) == (value, value)


@pytest.mark.parametrize("method", sorted(OBSERVERS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_signed_tensors(method, sign):
    x = sign * (np.abs(gaussian(50_000)) + 0.5)
    for scheme in (SYM, ASYM):
        lo, hi = observe(OBSERVERS[method], scheme, x).range()
        scale, zp = scheme.qparams(lo, hi)
        assert scale > 0
        if method != "norm":  # norm's range is the scale's, not clipped to the data
            assert x.min() <= lo <= hi <= x.max()
        if scheme is ASYM:
            fq = scheme.fake_quantize(x, scale, zp)
            assert np.all(np.sign(fq[fq != 0]) == sign)
            assert zp == (0 if sign > 0 else 255)


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_huge_outliers_stay_finite(method):
    x = gaussian(20_000)
    x[7] = 3e38
    x[8] = -1e30
    obs = observe(OBSERVERS[method], SYM, x, shards=2)
    lo, hi = obs.range()
    scale, _ = obs.qparams()
    assert np.isfinite(lo) and np.isfinite(hi) and 0 < scale < np.inf


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_nan_raises_naming_the_tensor(method):
    x = gaussian(1000)
    x[10] = np.nan
    obs = OBSERVERS[method](SYM, "relu_7")
    with pytest.raises(CalibrationError, match="relu_7.*NaN"):
        obs.update(x)


MASK_VALUES = (-np.inf, np.inf, np.finfo(np.float32).min, -1e30, 3e38)


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_mask_values_are_counted_and_left_out(method):
    """+-inf and |x| >= 1e30 (attention masks) leave the range as the data alone gives it."""
    data = gaussian(20_000).astype(np.float32)
    masked = data.copy()
    where = rng(5).choice(data.size, 500, replace=False)
    masked[where] = np.resize(np.array(MASK_VALUES, dtype=np.float32), where.size)
    reference = observe(OBSERVERS[method], SYM, np.delete(data, where))
    obs = observe(OBSERVERS[method], SYM, masked)
    assert obs.masked == where.size
    assert obs.infinite == 200  # two of the five mask values are +-inf
    np.testing.assert_allclose(obs.range(), reference.range(), rtol=1e-9, atol=1e-12)
    shards = [OBSERVERS[method](SYM) for _ in range(2)]
    shards[0].update(masked[:7000])
    shards[1].update(masked[7000:])
    shards[0].merge(pickle.loads(pickle.dumps(shards[1])))
    assert (shards[0].masked, shards[0].infinite) == (obs.masked, obs.infinite)


def test_mask_values_per_channel_are_clipped_to_each_channel():
    x = rng(6).normal(size=(4, 300)).astype(np.float32)
    masked = x.copy()
    masked[1, :50] = -np.inf
    masked[3, :] = np.finfo(np.float32).min  # a channel of masks only reads as zeros
    obs = MinMaxObserver(QuantScheme(per_channel_axis=0))
    obs.update(masked)
    lo, hi = obs.range()
    np.testing.assert_array_equal(lo[:3], [x[0].min(), x[1, 50:].min(), x[2].min()])
    np.testing.assert_array_equal(hi[:3], [x[0].max(), x[1, 50:].max(), x[2].max()])
    assert (lo[3], hi[3]) == (0.0, 0.0) and obs.masked == 350


# -- per-channel weights ------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(OBSERVERS))
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_equals_per_tensor_on_each_channel(method, axis):
    w = rng(3).laplace(size=(8, 6, 3, 3)).astype(np.float32) * rng(4).uniform(0.1, 5, (8, 1, 1, 1))
    w = w.astype(np.float32)
    scheme = QuantScheme(per_channel_axis=axis)
    lo, hi = observe(OBSERVERS[method], scheme, w).range()
    assert lo.shape == hi.shape == (w.shape[axis],)
    for c in range(w.shape[axis]):
        single = observe(OBSERVERS[method], SYM, np.take(w, c, axis=axis)).range()
        assert (lo[c], hi[c]) == pytest.approx(single, rel=1e-12)
    scale, zp = scheme.qparams(lo, hi)
    assert scale.shape == (w.shape[axis],) and np.all(scale > 0)


def test_per_channel_minmax_hand_computed():
    w = np.array([[1.0, -3.0], [0.5, 2.0], [-0.25, 0.0]], dtype=np.float32)
    obs = observe(MinMaxObserver, QuantScheme(per_channel_axis=0), w)
    lo, hi = obs.range()
    assert lo.tolist() == [-3.0, 0.5, -0.25] and hi.tolist() == [1.0, 2.0, 0.0]


# -- registry -----------------------------------------------------------------------------


def test_registry_names_and_constructors():
    assert sorted(OBSERVERS) == [
        "ema_minmax", "kld", "meanstd", "minmax", "mse", "norm", "quantile"
    ]
    assert get_observer("KLD") is KLDObserver
    ctor = get_observer(KLDObserver.with_args(bins=256))
    assert ctor(SYM, "t").kl_bins == 256
    assert get_observer(MSEObserver) is MSEObserver


def test_registry_refuses_instances_and_unknown_names():
    with pytest.raises(CalibrationError, match="instance.*pass the class KLDObserver"):
        get_observer(KLDObserver(SYM))
    with pytest.raises(CalibrationError, match="choose one of: minmax"):
        get_observer("entropy")


def test_default_options_follow_mqbench():
    assert KLDObserver().kl_bins == 2048
    assert QuantileObserver().q == 0.9999
    assert NormObserver().p == 2.0
    assert MeanStdObserver().k == 3.0


def test_merge_refuses_other_kinds():
    a, b = MinMaxObserver(SYM), MeanStdObserver(SYM)
    b.update(gaussian(10))
    with pytest.raises(TypeError):
        a.merge(b)
