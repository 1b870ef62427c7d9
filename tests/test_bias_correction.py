"""Empirical bias correction (qtool.bias_correction) and the SQNR floor (--fail-under-sqnr)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from qdq_helpers import TENSORRT_ALL_CONVS, run
from qtool.calibration import calibrate
from qtool.cli import main

import qtool
from qtool.bias_correction import correct_biases
from qtool.io import serialize, to_model
from qtool.planner import build_plan
from qtool.qdq import quantize
from qtool.workflow import CalibrateOptions, prepare, quantize_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = str(EXAMPLES / "digits_cnn.onnx")
CALIB = str(EXAMPLES / "digits_calib.npz")
VAL = str(EXAMPLES / "digits_val.npz")


def _samples(count: int) -> list[dict[str, np.ndarray]]:
    images = np.load(CALIB)["input"][:count]
    return [{"input": images[i:i + 16]} for i in range(0, count, 16)]


def _means(graph, names: list[str], samples, axis: int = 1) -> dict[str, np.ndarray]:
    """Per-channel means of the named tensors, computed here with numpy (the reference)."""
    model = to_model(graph)
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    data = model.SerializeToString()
    values = {name: [] for name in names}
    first = len(model.graph.output) - len(names)
    for sample in samples:
        outputs = run(data, sample)[first:]
        for name, value in zip(names, outputs, strict=True):
            values[name].append(np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1))
    return {name: np.concatenate(v, axis=1).astype(np.float64).mean(axis=1)
            for name, v in values.items()}


@pytest.mark.parametrize("backend", ["tensorrt", "snpe"])
def test_bias_correction_zeroes_the_mean_output_error(backend):
    if backend == "tensorrt":  # every conv of the digits CNN corrected (8-channel convs too)
        backend = TENSORRT_ALL_CONVS
    graph, _ = prepare(qtool.load(MODEL))
    samples = _samples(64)
    plan = build_plan(graph, backend)
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    plain = quantize(graph, backend, ranges, plan=plan)
    corrected, report = correct_biases(graph, backend, ranges, plan, lambda: iter(samples))
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    assert sorted(report.layers) == sorted(n.name for n in layers)
    # digits CNN: stem | res conv 1 | res conv 2 | branch1 + branch3 | mix | fc
    assert report.stages == 6 < len(layers) == 7
    names = [n.outputs[0].name for n in layers]
    float_means = _means(graph, names, samples)
    before = _means(plain.graph, names, samples)
    after = _means(corrected.graph, names, samples)
    for name in names:
        scale = np.abs(float_means[name]).max()
        error_before = np.abs(float_means[name] - before[name]).max()
        error_after = np.abs(float_means[name] - after[name]).max()
        qp = corrected.qparams.get(name)
        if qp is not None and qp.role == "activation":
            # snpe/qnn quantize the graph output itself (as the converter does): the mean
            # then moves in output steps, and correction gets within half a step
            assert error_after <= 0.5 * float(qp.scale), name
            continue
        assert error_after < 1e-4 * scale, name  # float32 sums; int32 bias steps are finer
        assert error_after < error_before / 20, name
    # the input graph is left alone; the corrected float graph carries the new biases
    assert serialize(graph) == serialize(prepare(qtool.load(MODEL))[0])
    assert serialize(corrected.float_graph) != serialize(plain.float_graph)


def test_bias_correction_never_hurts_held_out_sqnr_on_the_digits_cnn():
    def sqnr(backend: str, correct: bool) -> float:
        options = CalibrateOptions(data=CALIB, eval_data=VAL, bias_correction=correct,
                                   num_samples=128)
        _, report = quantize_model(MODEL, backend, options)
        return report["evaluation"]["outputs"][0]["sqnr_db"]

    # measured on the 500 held-out images, all 256 calibration images (dB, off -> on):
    # tvm 28.51 -> 30.36, snpe 31.07 -> 36.55, academic 32.54 -> 34.05, tensorrt 33.35 ->
    # 34.55, acl 36.53 -> 38.98, fbgemm 33.31 -> 37.10
    for backend in ("snpe", "tensorrt"):
        assert sqnr(backend, True) > sqnr(backend, False) + 0.5, backend


def test_report_lists_corrected_layers(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["calibrate", MODEL, "-b", "acl", "--data", CALIB,
                                       "--num-samples", "32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["bias_correction"]["layers"]) == 7
    assert report["bias_correction"]["samples"] == 28  # every 8th of 32 is held out to judge
    without, with_ = report["bias_correction"]["sqnr_db"]["logits"]
    assert with_ == report["evaluation"]["outputs"][0]["sqnr_db"] and with_ > without
    assert f"{without:.2f} dB without, {with_:.2f} dB with it" in (out / "report.md").read_text()
    assert not any("bias correction lowered" in w for w in report["warnings"])
    assert f"bias correction    7 layers; SQNR logits {without:.2f} -> {with_:.2f} dB" in (
        result.output)
    result = CliRunner().invoke(main, ["calibrate", MODEL, "-b", "acl", "--data", CALIB,
                                       "--num-samples", "32", "-o", str(out), "--force",
                                       "--no-bias-correction"])
    assert "bias_correction" not in json.loads((out / "report.json").read_text())


def test_fail_under_sqnr_exits_1_and_names_where_it_collapses(tmp_path):
    args = ["calibrate", MODEL, "-b", "tvm", "--data", CALIB, "--eval-data", VAL,
            "--num-samples", "64", "--act-bits", "3", "--no-bias-correction", "--analysis", "full"]
    # without the flag: a warning at the default 10 dB floor, exit 0
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    sqnr = report["evaluation"]["outputs"][0]["sqnr_db"]
    assert sqnr < 10.0
    first = next(t for t in report["analysis"]["tensors"]
                 if t["role"] == "activation" and t["sqnr_db"] < 10.0)
    assert report["sqnr_floor"] == {
        "floor_db": 10.0, "below": [{"output": "logits", "sqnr_db": sqnr}],
        "collapse": {"tensor": first["tensor"], "sqnr_db": first["sqnr_db"]},
    }
    warning = f"WARNING: output logits: SQNR {sqnr:.2f} dB on the evaluation data is below 10 dB"
    assert warning in result.output and f"collapses at {first['tensor']}" in result.output
    assert "is below 10 dB" in (tmp_path / "a" / "report.md").read_text()
    # with the flag: the same run exits 1 after writing everything
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"),
                                       "--fail-under-sqnr", "10"])
    assert result.exit_code == 1
    assert "error: SQNR below --fail-under-sqnr 10 dB: logits" in result.output
    assert (tmp_path / "b" / "model.qdq.onnx").exists()
    # a floor under the measured SQNR passes and does not warn
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "c"),
                                       "--fail-under-sqnr", f"{sqnr - 0.5:.2f}"])
    assert result.exit_code == 0 and "below" not in result.output


def test_a_correction_that_lowers_sqnr_is_flagged():
    from qtool.bias_correction import BiasCorrection

    correction = BiasCorrection(sqnr_db={"a": [30.0, 29.9], "b": [30.0, 30.02],
                                         "c": [None, 80.0], "d": [20.0, None]})
    assert correction.worse() == ["a", "c"]


def test_a_correction_that_lowers_held_out_sqnr_is_reverted(monkeypatch):
    """Means measured on data unlike the evaluation data (shifted here) correct the biases
    the wrong way: the run keeps the uncorrected model and says so."""
    import qtool.bias_correction as bias_correction

    real = bias_correction.correct_biases

    def on_shifted_data(graph, backend, ranges, plan, batches, **kwargs):
        def shifted():
            for batch in batches():
                yield {k: (v + 0.5 if k == "input" else v) for k, v in batch.items()}

        return real(graph, backend, ranges, plan, shifted, **kwargs)

    monkeypatch.setattr(bias_correction, "correct_biases", on_shifted_data)
    options = dict(data=CALIB, eval_data=VAL, num_samples=64)
    files, report = quantize_model(MODEL, "acl", CalibrateOptions(**options))
    plain, plain_report = quantize_model(MODEL, "acl",
                                         CalibrateOptions(bias_correction=False, **options))
    correction = report["bias_correction"]
    assert correction["reverted"]
    (without, with_), = correction["sqnr_db"].values()
    assert with_ < without - 0.05
    assert files["model.qdq.onnx"] == plain["model.qdq.onnx"]
    assert report["evaluation"] == plain_report["evaluation"]
    assert any("the uncorrected model was kept" in w for w in report["warnings"])


def test_matmul_add_layers_are_corrected_along_the_last_axis():
    torch = pytest.importorskip("torch")
    import io
    import warnings

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tokens x features: exported as MatMul + Add
        torch.onnx.export(mlp.eval(), torch.zeros(1, 6, 8), buffer, opset_version=11,
                          dynamo=False)
    graph, _ = prepare(qtool.load(buffer.getvalue()))
    assert [n.op for n in graph.nodes].count("MatMul") == 2
    name = graph.inputs[0].name
    rng = np.random.default_rng(0)
    samples = [{name: rng.standard_normal((1, 6, 8)).astype(np.float32)} for _ in range(32)]
    plan = build_plan(graph, "tensorrt")
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    plain = quantize(graph, "tensorrt", ranges, plan=plan)
    corrected, report = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples))
    matmuls = [n for n in graph.nodes if n.op == "MatMul"]
    assert sorted(report.layers) == sorted(n.name for n in matmuls) and report.stages == 2
    adds = [n.outputs[0].outputs[0].outputs[0].name for n in matmuls]
    reference = _means(graph, adds, samples, axis=-1)
    before = _means(plain.graph, adds, samples, axis=-1)
    after = _means(corrected.graph, adds, samples, axis=-1)
    for add in adds:
        error_before = np.abs(reference[add] - before[add]).max()
        assert np.abs(reference[add] - after[add]).max() < min(error_before / 20, 1e-5)


def _conv_net(bias: bool, gemm_bias: str = "none") -> bytes:
    """A trained-free 2-conv + Gemm net built with onnx.helper: Conv ``bias`` or not, the
    Gemm's C ``none``, ``[1]`` (broadcast) or ``full``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (4, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (4, 64)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "flat")]
    conv1 = ["x", "w1"] + (["b1"] if bias else [])
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"))
    gemm = ["f", "wf"]
    if gemm_bias != "none":
        size = 1 if gemm_bias == "[1]" else 4
        inits.append(numpy_helper.from_array(np.full(size, 0.25, np.float32), "c"))
        gemm.append("c")
    nodes = [helper.make_node("Conv", conv1, ["y1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y2"], name="conv2", strides=[2, 2]),
             helper.make_node("Relu", ["y2"], ["r2"], name="relu2"),
             helper.make_node("Reshape", ["r2", "flat"], ["f"], name="flatten"),
             helper.make_node("Gemm", gemm, ["out"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 9, 9])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _net_data(tmp_path, rows: int = 48) -> str:
    rng = np.random.default_rng(1)
    path = tmp_path / "data.npz"
    np.savez(path, x=(rng.random((rows, 3, 9, 9)) + 0.2).astype(np.float32))
    return str(path)


@pytest.mark.parametrize("backend", ["tvm", "acl"])
def test_a_bias_less_conv_gets_an_int32_bias_after_correction(tmp_path, backend):
    """The bias correction adds to a Conv without a bias: planned and quantized as int32
    (DequantizeLinear of int32 levels, scale s_in * s_w), listed in the backend's files."""
    from onnx import numpy_helper

    model = tmp_path / "net.onnx"
    model.write_bytes(_conv_net(bias=False))
    files, report = quantize_model(str(model), backend, CalibrateOptions(
        data=_net_data(tmp_path), analysis="none"))
    assert {"conv1", "conv2"} <= set(report["bias_correction"]["layers"])
    proto = onnx.load_from_string(files["model.qdq.onnx"])
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    scales = {}
    for name in ("conv1", "conv2"):
        conv = next(n for n in proto.graph.node if n.name == name)
        assert len(conv.input) == 3, name
        dq = producers[conv.input[2]]
        assert dq.op_type == "DequantizeLinear", name
        assert inits[dq.input[0]].dtype == np.int32
        x_scale = inits[producers[producers[conv.input[0]].input[0]].input[1]]
        w_scale = inits[producers[conv.input[1]].input[1]]
        np.testing.assert_allclose(inits[dq.input[1]], (x_scale * w_scale).astype(np.float32),
                                   rtol=1e-6)
        scales[name] = float(np.max(inits[dq.input[1]]))
        assert np.abs(inits[dq.input[0]]).max() > 0  # the correction is in the levels
    plan = json.loads(files["plan.json"])
    biases = {t for t, e in plan["tensors"].items() if e["role"] == "bias"}
    assert {"conv1_bias", "conv2_bias"} <= biases
    if backend == "tvm":
        shifts = json.loads(files["shifts.json"])["param_shifts"]
        for name in ("conv1", "conv2"):
            assert 2.0 ** shifts[f"{name}_bias"] == pytest.approx(scales[name])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_gemm_with_a_broadcast_bias_calibrates_at_the_defaults(tmp_path, mode):
    """Gemm's C of shape [1] broadcasts over the 4 outputs: corrected as a full vector."""
    model = tmp_path / "net.onnx"
    model.write_bytes(_conv_net(bias=True, gemm_bias="[1]"))
    for backend in ("tensorrt", "acl"):
        files, report = quantize_model(str(model), backend, CalibrateOptions(
            data=_net_data(tmp_path), bias_correction=mode))
        assert "fc" in report["bias_correction"]["layers"], backend
        session_outputs = run(files["model.qdq.onnx"], {"x": np.ones((2, 3, 9, 9), np.float32)})
        assert session_outputs[0].shape == (2, 4)


def test_a_shared_bias_is_skipped_with_a_reason():
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(_conv_net(bias=True))
    # conv2 reads conv1's bias? shapes differ; share a bias between two Gemm-free convs
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.float32), "shared"))
    graph.node[0].input[2] = "shared"
    graph.node.insert(2, helper.make_node("Conv", ["r1", "w1b", "shared"], ["z"], name="twin",
                                          pads=[1, 1, 1, 1]))
    graph.node[3].input[0] = "z"
    graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(2).normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w1b"))
    graph_, _ = prepare(qtool.load(model.SerializeToString()))
    rng = np.random.default_rng(1)
    samples = [{"x": (rng.random((8, 3, 9, 9)) + 0.2).astype(np.float32)} for _ in range(4)]
    # per-channel float biases: nothing splits them (8-channel convs: int8_conv_rule off)
    plan = build_plan(graph_, TENSORRT_ALL_CONVS)
    ranges = calibrate(graph_, plan.activation_schemes(), samples)
    _, report = correct_biases(graph_, TENSORRT_ALL_CONVS, ranges, plan, lambda: iter(samples))
    assert "shared" in report.skipped["conv1"] and "shared" in report.skipped["twin"]
    assert "conv1" not in report.layers and "conv2" in report.layers


def test_exact_in_one_pass_gives_the_stage_by_stage_corrections():
    """Layer after layer on stored activations: the corrections the staged passes make."""
    graph, _ = prepare(qtool.load(MODEL))
    samples = _samples(64)
    for backend in (TENSORRT_ALL_CONVS, "snpe"):
        plan = build_plan(graph, backend)
        ranges = calibrate(graph, plan.activation_schemes(), samples)
        staged, staged_report = correct_biases(graph, backend, ranges, plan,
                                               lambda: iter(samples), mode="staged")
        exact, report = correct_biases(graph, backend, ranges, plan, lambda: iter(samples))
        assert report.stages == staged_report.stages == 6
        for name, change in staged_report.layers.items():
            if name == "/head/head.2/Gemm":
                # last in line: the one pass adds the float64 shifts to float32 outputs,
                # the passes requantize from float32 biases; a few roundings upstream flip,
                # and both zero the head's mean error (test above), by shifts 25 % apart
                continue
            assert report.layers[name] == pytest.approx(change, rel=1e-3, abs=1e-6), name
        staged_biases = {t.name: t.values for t in staged.float_graph.tensors().values()
                         if t.name.endswith(".bias")}
        for tensor in exact.float_graph.tensors().values():
            if tensor.name in staged_biases and "head" not in tensor.name:
                np.testing.assert_allclose(tensor.values, staged_biases[tensor.name],
                                           rtol=1e-4, atol=1e-6)


def test_the_sample_cap_reads_only_the_first_rows():
    graph, _ = prepare(qtool.load(MODEL))
    samples = _samples(128)
    plan = build_plan(graph, "tensorrt")
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    _, capped = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples),
                               max_samples=40)
    _, first = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples[:3]))
    assert capped.samples == first.samples == 48  # whole batches of 16
    assert capped.layers == first.layers


def test_fast_correction_is_the_layers_own_weight_error_on_its_mean_input():
    """One Gemm: the shift is (W - W_q) @ mean(x), W_q written here in numpy from the
    quantized model's own per-channel int8 weight scales. The mean does not go through the
    input quantizer (rounding a mean is not the mean of the rounded values)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.5, (6, 10)).astype(np.float32)
    graph_proto = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(np.zeros(6, np.float32), "b")])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)])
    graph, _ = prepare(qtool.load(model.SerializeToString()))
    samples = [{"x": rng.normal(0.7, 1.0, (16, 10)).astype(np.float32)} for _ in range(4)]
    plan = build_plan(graph, "tensorrt")
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    plain = quantize(graph, "tensorrt", ranges, plan=plan)
    corrected, report = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples),
                                       mode="fast")
    mean = np.concatenate([s["x"] for s in samples]).astype(np.float64).mean(axis=0)
    info = np.iinfo(np.int8)
    w_scale = np.asarray(plain.qparams["w"].scale, np.float64).reshape(-1, 1)
    w_q = np.clip(np.round(weight / w_scale), info.min, info.max) * w_scale
    expected = (weight.astype(np.float64) - w_q) @ mean
    bias = next(t for t in corrected.float_graph.tensors().values() if t.name == "b")
    np.testing.assert_allclose(bias.values, expected, rtol=1e-4, atol=1e-6)
    assert report.mode == "fast" and report.stages == 1


def test_activations_past_the_memory_budget_go_to_files_with_the_same_corrections(
        monkeypatch):
    from qtool.bias_correction import store as store_module

    graph, _ = prepare(qtool.load(MODEL))
    samples = _samples(64)
    plan = build_plan(graph, "acl")
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    _, in_memory = correct_biases(graph, "acl", ranges, plan, lambda: iter(samples))
    stores = []
    real_init = store_module.Store.__init__

    def recording_init(self, budget):
        real_init(self, budget)
        stores.append(self)

    monkeypatch.setattr(store_module.Store, "__init__", recording_init)
    _, on_disk = correct_biases(graph, "acl", ranges, plan, lambda: iter(samples),
                                memory_budget=200_000)
    (store,) = stores
    spilled = [item for items in store.items.values() for item in items
               if isinstance(item, store_module.Spilled)]
    assert store.spilled_files > 0  # used, then removed with the folder
    assert store.folder is not None and not Path(store.folder.name).exists()
    assert not spilled or all(not item.path.exists() for item in spilled)
    assert on_disk.layers == in_memory.layers


def test_a_spilled_tensor_is_one_file_read_back_shifted_and_dropped():
    from qtool.bias_correction.store import Spilled, Store

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 4, 4)).astype(np.float32) for _ in range(5)]
    with Store(budget=2 * batches[0].nbytes) as store:
        for value in batches:
            store.append("a", value)
            store.append("b", value.astype(np.float64))
        kinds = [type(item) for item in store.items["a"]]
        assert kinds[:2] == [np.ndarray, np.ndarray] and set(kinds[2:]) == {Spilled}
        assert len({item.path for item in store.items["b"]}) == 1  # one file per tensor
        for index, value in enumerate(batches):
            np.testing.assert_array_equal(store.get("a", index), value)
            assert store.get("b", index).dtype == np.float64
        store.shift("a", lambda v: v + np.float32(1.5))
        for got, value in zip(store.values("a"), batches, strict=True):
            np.testing.assert_array_equal(got, value + np.float32(1.5))
        path = store.items["b"][0].path
        store.drop("b")
        assert not path.exists() and "b" not in store.items
        store.append("c", batches[0])  # a new file, not the dropped one's name again
        assert store.items["c"][0].path != store.items["a"][-1].path
        np.testing.assert_array_equal(store.get("c", 0), batches[0])
        folder = Path(store.folder.name)
    assert not folder.exists()


def test_the_rows_read_are_spread_over_the_calibration_data():
    from qtool.bias_correction import DEFAULT_MAX_SAMPLES, MORE_SAMPLES, spread

    rows = [{"input": np.full((1, 2), i, np.float32)} for i in range(256)]
    picked = [int(r["input"][0, 0]) for r in spread(rows, 64)]
    assert picked[0] == 0 and picked[-1] == 255 and len(picked) == 64
    assert max(np.diff(picked)) <= 5  # about every 4th, none bunched at the start
    assert spread(rows[:10], 64) is not None and len(spread(rows[:10], 64)) == 10
    _, report = quantize_model(MODEL, "tensorrt", CalibrateOptions(data=CALIB,
                                                                   eval_data=VAL))
    # 64 spread rows, then more up to 256: a digit's 8x8 rows are small
    assert report["bias_correction"]["samples"] == MORE_SAMPLES == 4 * DEFAULT_MAX_SAMPLES


def test_the_mode_flag_and_config_key(tmp_path):
    from qtool import cli as cli_module
    from qtool.bias_correction import DEFAULT_MODE
    from qtool.errors import RecipeError
    from qtool.workflow import calibrate_options_from_recipe

    assert cli_module.BIAS_CORRECTION_DEFAULT == DEFAULT_MODE  # the CLI does not import it
    base = ["calibrate", MODEL, "-b", "acl", "--data", CALIB, "--num-samples", "32"]
    for flags, mode in ((["--bias-correction", "fast"], "fast"), (["--bias-correction"], "exact"),
                        ([], "exact")):
        out = tmp_path / f"out_{mode}_{len(flags)}"
        result = CliRunner().invoke(main, [*base, *flags, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "report.json").read_text())["bias_correction"]["mode"] == mode
    for flags in (["--no-bias-correction"], ["--bias-correction", "off"]):
        out = tmp_path / f"off_{len(flags)}"
        result = CliRunner().invoke(main, [*base, *flags, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "bias_correction" not in json.loads((out / "report.json").read_text())
    assert calibrate_options_from_recipe({"bias_correction": "fast"}).bias_correction == "fast"
    assert calibrate_options_from_recipe({"bias_correction": False}).bias_correction is False
    with pytest.raises(RecipeError, match="bias_correction"):
        calibrate_options_from_recipe({"bias_correction": "sometimes"})


def test_the_mean_error_and_its_standard_error_per_row():
    """Paired rows: the mean of the differences weighted by each row's elements, and the
    standard error of that mean from the rows' own means (Kish's effective rows)."""
    from qtool.bias_correction.means import UnitSums, mean_error

    rng = np.random.default_rng(0)
    widths = [5, 9, 7, 12, 5, 6]  # a recognizer's images: one width per batch of one
    ref, got = UnitSums(), UnitSums()
    f = [rng.normal(1.0, 1.0, (1, 3, 4, w)) for w in widths]
    q = [x + rng.normal([0.2, -0.1, 0.0], 0.3, (1, 4, x.shape[3], 3)).transpose(0, 3, 1, 2)
         for x in f]
    for a, b in zip(f, q, strict=True):
        ref.add(a, 1, 1)
        got.add(b, 1, 1)
    delta, error = mean_error(ref, got)
    diffs = np.concatenate([(a - b).transpose(1, 0, 2, 3).reshape(3, -1)
                            for a, b in zip(f, q, strict=True)], axis=1)
    np.testing.assert_allclose(delta, diffs.mean(axis=1), rtol=1e-12)
    n = np.array([4.0 * w for w in widths])
    share = n / n.sum()
    rows = np.stack([(a - b).mean(axis=(0, 2, 3)) for a, b in zip(f, q, strict=True)])
    variance = (share[:, None] * (rows - delta) ** 2).sum(axis=0)
    np.testing.assert_allclose(error, np.sqrt(variance / (1 / (share ** 2).sum() - 1)),
                               rtol=1e-12)
    # 16 rows in one batch: per row; a tensor whose first axis is not the rows: per batch
    sums = UnitSums()
    sums.add(np.ones((16, 3, 2, 2)), 1, 16)
    sums.add(np.ones((4, 3)), 1, 16)
    assert [s.shape for s in sums.sums] == [(16, 3), (1, 3)]


def test_more_rows_are_the_spread_rows_not_read_first():
    from qtool.bias_correction import MORE_SAMPLES, more_rows, spread

    rows = list(range(1000))
    first = spread(rows, 64)
    more = more_rows(rows, first, MORE_SAMPLES)
    assert not set(more.indices) & set(first.indices)
    assert len(set(more.indices) | set(first.indices)) >= MORE_SAMPLES - 2
    assert more_rows(rows[:50], spread(rows[:50], 64), MORE_SAMPLES) is None  # all read
    from qtool.analysis.holdout import Subset

    calibration = Subset(rows, [i for i in range(72) if i % 8])  # 63 rows: 9 held out
    assert more_rows(calibration, spread(calibration, 64), MORE_SAMPLES) is None
    assert more_rows(calibration, spread(calibration, 32), MORE_SAMPLES).source is calibration


def test_small_rows_bring_in_more_rows_large_ones_do_not(monkeypatch):
    """Digits' 8x8 rows are far below the input elements the correction reads: the rows
    offered beyond the first are read, and the corrections are those of one pass over all of
    them. Rows of 64 such images' size already read nothing more. Each layer's noise (the
    standard error of its mean error over its shift) is reported."""
    import qtool.bias_correction.rows as rows

    graph, _ = prepare(qtool.load(MODEL))
    samples = _samples(64)
    plan = build_plan(graph, "tensorrt")
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    _, every_row = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples))
    _, first_rows = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples[:1]))
    _, grown = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples[:1]),
                              more_batches=lambda: iter(samples[1:]))
    assert grown.samples == every_row.samples == 64 and first_rows.samples == 16
    assert grown.layers == every_row.layers
    assert any(first_rows.layers[n] != pytest.approx(c, rel=1e-2) for n, c in
               every_row.layers.items())
    row_size = samples[0]["input"][0].size
    monkeypatch.setattr(rows, "MORE_ELEMENTS", rows.DEFAULT_MAX_SAMPLES * row_size)
    _, large = correct_biases(graph, "tensorrt", ranges, plan, lambda: iter(samples[:1]),
                              more_batches=lambda: iter(samples[1:]))
    assert large.layers == first_rows.layers and large.samples == 16
    assert set(large.noise) == set(large.layers) and all(v >= 0 for v in large.noise.values())
