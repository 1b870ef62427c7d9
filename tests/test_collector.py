"""The collector: ranges equal to a numpy reference over onnxruntime outputs, streaming."""

from __future__ import annotations

import logging
import tracemalloc

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from qtool.calibration import calibrate, collector
from qtool.calibration.data import ArrayData
from qtool.calibration.observers import OBSERVERS, MinMaxObserver

from qtool.errors import CalibrationError, DataError
from qtool.scheme import QuantScheme

SYM = QuantScheme()
DIGITS = "examples/digits_cnn.onnx"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def node_outputs(model: onnx.ModelProto) -> list[str]:
    return [name for node in model.graph.node for name in node.output if name]


def reference_ranges(model: onnx.ModelProto, feeds_list, names):
    """Min/max of every tensor over all samples, from one session exposing every output."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    existing = {o.name for o in full.graph.output}
    full.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(full.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for feeds in feeds_list:
        for name, value in zip(names, session.run(names, feeds), strict=True):
            lo[name] = min(lo[name], float(value.min()))
            hi[name] = max(hi[name], float(value.max()))
    return {n: (lo[n], hi[n]) for n in names}


def samples_of(array: np.ndarray, name="input"):
    return [{name: array[i : i + 1]} for i in range(len(array))]


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "attention"])
def test_minmax_equals_reference_on_torch_model(name):
    model = models.torch_model(name)
    shape = models.input_shape(name)
    data = np.random.default_rng(1).standard_normal((37,) + shape[1:]).astype(np.float32)
    names = node_outputs(model)
    ranges = calibrate(model, {n: SYM for n in names}, samples_of(data), batch_size=8,
                       optimization="disable")
    # the reference runs all 37 samples at once: batching must not change any range
    reference = reference_ranges(model, [{"input": data}], names)
    assert ranges == reference
    # onnxruntime's default optimizations (fusions, layouts) move ranges by float rounding only
    fast = calibrate(model, {n: SYM for n in names}, samples_of(data), batch_size=8)
    for n in names:
        np.testing.assert_allclose(fast[n], reference[n], rtol=1e-5, atol=1e-6)


def test_subset_of_tensors_equals_reference():
    model = models.torch_model("resnet")
    data = np.random.default_rng(2).standard_normal((20, 3, 16, 16)).astype(np.float32)
    names = node_outputs(model)
    relus = [n for n in names if "Relu" in n]
    ranges = calibrate(model, {n: SYM for n in relus}, samples_of(data), batch_size=6,
                       optimization="disable")
    assert set(ranges) == set(relus)
    assert ranges == {k: v for k, v in reference_ranges(model, [{"input": data}], names).items()
                      if k in relus}


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_every_method_through_calibrate(method):
    model = onnx.load(DIGITS)
    names = node_outputs(model)
    data = ArrayData("examples/digits_calib.npz", num_samples=64)
    ranges = calibrate(model, {n: SYM for n in names}, data, method=method)
    minmax = calibrate(model, {n: SYM for n in names}, data)
    for n in names:
        lo, hi = ranges[n]
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi
        if method != "norm":  # the others clip inside the observed extremes
            assert minmax[n][0] <= lo and hi <= minmax[n][1]


def two_input_model(batch=None) -> onnx.ModelProto:
    """out = Relu(x + y) @ w, with symbolic batch and length (or a fixed batch)."""
    b = batch if batch is not None else "n"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, 3, "length"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, 3, "length"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], np.arange(9, dtype=np.float32) - 4)
    nodes = [
        helper.make_node("Add", ["x", "y"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["relu"]),
        helper.make_node("Transpose", ["relu"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "w"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "two_inputs", [x, y], [out], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def numpy_two_input(x, y):
    s = x + y
    r = np.maximum(s, 0)
    w = (np.arange(9.0) - 4).reshape(3, 3)
    return {"x": x, "sum": s, "relu": r, "out": r.transpose(0, 2, 1) @ w}


def test_multi_input_dynamic_shapes():
    rng = np.random.default_rng(3)
    samples, lo, hi = [], {}, {}
    for i in range(23):
        length = 5 if i < 10 else (7 if i < 17 else 2)  # shape changes start new batches
        x = rng.standard_normal((1, 3, length)).astype(np.float32)
        y = rng.standard_normal((1, 3, length)).astype(np.float32)
        samples.append({"x": x, "y": y})
        for k, v in numpy_two_input(x, y).items():  # float32, as onnxruntime
            lo[k] = min(lo.get(k, np.inf), v.min())
            hi[k] = max(hi.get(k, -np.inf), v.max())
    names = ["x", "sum", "relu", "out", "w"]
    ranges = calibrate(two_input_model(), {n: SYM for n in names}, samples, batch_size=4)
    for k in ("x", "sum", "relu"):  # elementwise: float32 exact
        assert ranges[k] == (lo[k], hi[k])
    np.testing.assert_allclose(ranges["out"], (lo["out"], hi["out"]), rtol=1e-6)
    assert ranges["w"] == (-4.0, 4.0)  # an initializer, observed once


def test_fixed_batch_dim_runs_full_batches_only(caplog, monkeypatch):
    seen = []
    original = collector.Collector.run

    def spy(self, batch):
        seen.append(batch.rows)
        return original(self, batch)

    monkeypatch.setattr(collector.Collector, "run", spy)
    rng = np.random.default_rng(4)
    samples = [{"x": rng.standard_normal((1, 3, 5)).astype(np.float32),
                "y": rng.standard_normal((1, 3, 5)).astype(np.float32)} for _ in range(10)]
    with caplog.at_level(logging.WARNING):
        ranges = calibrate(two_input_model(batch=4), {"sum": SYM}, samples, batch_size=16)
    assert seen == [4, 4]
    assert "last 2 sample(s) were not used" in caplog.text
    used = np.concatenate([s["x"] + s["y"] for s in samples[:8]])
    assert ranges["sum"] == (float(used.min()), float(used.max()))


def test_num_samples_and_multi_row_samples():
    data = np.random.default_rng(5).standard_normal((40, 1, 8, 8)).astype(np.float32)
    model = onnx.load(DIGITS)
    names = node_outputs(model)
    chunks = [{"input": data[i : i + 7]} for i in range(0, 40, 7)]  # several rows per sample
    ranges = calibrate(model, {n: SYM for n in names}, chunks, num_samples=30, batch_size=16,
                       optimization="disable")
    assert ranges == reference_ranges(model, [{"input": data[:30]}], names)


def nan_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Log", ["x"], ["log_x"]),
             helper.make_node("Relu", ["log_x"], ["out"])]
    graph = helper.make_graph(nodes, "nan", [x], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("workers", [1, 2])
def test_nan_activation_names_tensor_and_sample(workers):
    data = np.abs(np.random.default_rng(6).standard_normal((40, 4))).astype(np.float32) + 0.1
    data[37, 2] = -1.0  # log(-1) = NaN in sample 37
    with pytest.raises(CalibrationError, match=r"log_x contains NaN at sample 37"):
        calibrate(nan_model(), {"log_x": SYM}, samples_of(data, "x"), batch_size=8,
                  workers=workers)


def test_inf_activation_is_reported():
    data = np.ones((5, 4), dtype=np.float32)
    data[3, 0] = 0.0  # log(0) = -inf
    with pytest.raises(CalibrationError, match=r"log_x contains Inf at sample 3"):
        calibrate(nan_model(), {"log_x": SYM}, samples_of(data, "x"), batch_size=2)


def mask_model(fill: float) -> onnx.ModelProto:
    """``scores + Where(keep == 0, fill, 0)`` then ``Log(x)``: a padding mask and an overflow."""
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 4])
    keep = helper.make_tensor_value_info("keep", TensorProto.INT64, ["n", 4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("p", "log_x")]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("fill", TensorProto.FLOAT, [], [fill]),
             helper.make_tensor("nothing", TensorProto.FLOAT, [], [0.0])]
    nodes = [helper.make_node("Equal", ["keep", "zero"], ["pad"]),
             helper.make_node("Where", ["pad", "fill", "nothing"], ["mask"]),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"]),
             helper.make_node("Log", ["x"], ["log_x"])]
    graph = helper.make_graph(nodes, "mask", [scores, keep, x], outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("fill", [-np.inf, float(np.finfo(np.float32).min)])
@pytest.mark.parametrize("workers", [1, 2])
def test_mask_values_are_left_out_and_inf_elsewhere_still_fails(fill, workers, caplog):
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(12, 4)).astype(np.float32)
    keep = np.ones((12, 4), np.int64)
    keep[::3, 2:] = 0
    x = np.abs(scores) + 0.5
    samples = [{"scores": scores[i:i + 1], "keep": keep[i:i + 1], "x": x[i:i + 1]}
               for i in range(12)]
    with caplog.at_level(logging.INFO, logger="qtool"):
        ranges = calibrate(mask_model(fill), {"mask": SYM, "masked": SYM, "log_x": SYM},
                           samples, batch_size=4, workers=workers)
    # the data alone decides: the mask's zeros, the scores that are not masked
    assert ranges["mask"] == (0.0, 0.0)
    kept = scores[keep == 1]
    assert ranges["masked"] == pytest.approx((kept.min(), kept.max()))
    if workers == 1:
        assert "left 16 mask value(s)" in caplog.text  # 8 in mask, 8 in masked
    x[5, 1] = 0.0  # log(0) = -inf in a tensor no mask constant reaches: an overflow
    samples[5] = {**samples[5], "x": x[5:6]}
    with pytest.raises(CalibrationError, match=r"log_x contains Inf at sample 5"):
        calibrate(mask_model(fill), {"masked": SYM, "log_x": SYM}, samples, batch_size=4,
                  workers=workers)


def test_nan_in_input_data_is_a_data_error():
    data = np.ones((5, 4), dtype=np.float32)
    data[2, 1] = np.nan
    with pytest.raises(DataError, match="input x of sample 2 contains NaN"):
        calibrate(nan_model(), {"log_x": SYM}, samples_of(data, "x"))


def test_data_mismatch_fails_before_any_session(monkeypatch):
    def no_session(*args, **kwargs):
        raise AssertionError("a session was built before the data was checked")

    monkeypatch.setattr(collector, "make_session", no_session)
    model = onnx.load(DIGITS)
    bad = [{"image": np.zeros((1, 1, 8, 8), np.float32)}]
    with pytest.raises(DataError, match="missing input.*input.*unknown name.*image"):
        calibrate(model, {"logits": SYM}, bad)
    with pytest.raises(DataError, match="is float64"):
        calibrate(model, {"logits": SYM}, [{"input": np.zeros((1, 1, 8, 8))}])
    with pytest.raises(DataError, match="empty"):
        calibrate(model, {"logits": SYM}, [])


def test_unknown_tensor_and_method():
    model = onnx.load(DIGITS)
    sample = [{"input": np.zeros((1, 1, 8, 8), np.float32)}]
    with pytest.raises(CalibrationError, match="no_such_tensor"):
        calibrate(model, {"no_such_tensor": SYM}, sample)
    with pytest.raises(CalibrationError, match="instance"):
        calibrate(model, {"logits": SYM}, sample, method=MinMaxObserver(SYM))


def test_intra_op_threads_reach_the_session(monkeypatch):
    threads = []
    original = collector.make_session

    def spy(model_bytes, **kwargs):
        threads.append(kwargs.get("intra_op_threads"))
        return original(model_bytes, **kwargs)

    monkeypatch.setattr(collector, "make_session", spy)
    sample = [{"input": np.zeros((1, 1, 8, 8), np.float32)}]
    calibrate(DIGITS, {"logits": SYM}, sample, intra_op_threads=1)
    assert threads == [1]


def random_stream(count, seed=7):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {"input": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)}


def test_memory_does_not_grow_with_samples():
    model = onnx.load(DIGITS)
    schemes = {n: SYM for n in node_outputs(model)}
    calibrate(model, schemes, random_stream(16), method="kld")  # warm imports and caches

    def peak(count):
        tracemalloc.start()
        calibrate(model, schemes, random_stream(count), method="kld", batch_size=16)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(64), peak(512)
    # 448 more samples of all 24 activations would be > 10 MB if any batch were kept
    activations_per_sample = 24 * 24 * 8 * 8 * 4
    assert large < small * 1.1 + 64 * 1024
    assert large - small < activations_per_sample * 16


@pytest.mark.parametrize("method", ["minmax", "kld", "meanstd"])
def test_two_workers_equal_one(method):
    model = onnx.load(DIGITS)
    schemes = {n: SYM for n in node_outputs(model)}
    data = ArrayData("examples/digits_calib.npz", num_samples=96)
    one = calibrate(model, schemes, data, method=method, batch_size=8)
    two = calibrate(model, schemes, data, method=method, batch_size=8, workers=2)
    if method == "meanstd":
        for n in schemes:
            np.testing.assert_allclose(two[n], one[n], rtol=1e-12)
    else:  # MinMax and the power-of-two histograms merge exactly
        assert two == one


def test_progress_bar(capsys):
    data = ArrayData("examples/digits_calib.npz", num_samples=32)
    calibrate(DIGITS, {"logits": SYM}, data, progress=False)
    assert capsys.readouterr().err == ""
    calibrate(DIGITS, {"logits": SYM}, data)  # not a terminal under pytest: silent
    assert capsys.readouterr().err == ""
    calibrate(DIGITS, {"logits": SYM}, data, progress=True, batch_size=8)
    assert "/32 [" in capsys.readouterr().err  # tqdm on stderr, total 32 samples



def test_per_channel_activation_scheme():
    model = onnx.load(DIGITS)
    data = np.random.default_rng(8).standard_normal((12, 1, 8, 8)).astype(np.float32)
    name = "/stem/stem.1/Relu_output_0"
    ranges = calibrate(model, {name: QuantScheme(per_channel_axis=1)}, samples_of(data),
                       optimization="disable")
    lo, hi = ranges[name]
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.append(onnx.ValueInfoProto(name=name))
    value = models.run(full, {"input": data})[-1]
    np.testing.assert_array_equal(hi, value.max(axis=(0, 2, 3)))
    np.testing.assert_array_equal(lo, value.min(axis=(0, 2, 3)))
