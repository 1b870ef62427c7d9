"""Cross-layer equalization (qtool.passes.cle): exact in float, equal ranges, better SQNR."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from qdq_helpers import run

import qtool
from qtool.io import serialize, to_model
from qtool.passes.cle import absorb_high_bias, equalize, find_pairs
from qtool.workflow import CalibrateOptions, prepare, quantize_model

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from depthwise_digits import depthwise_digits_onnx, digits_split, write_data  # noqa: E402


@pytest.fixture(scope="module")
def depthwise():
    graph, _ = prepare(qtool.load(depthwise_digits_onnx()))
    return serialize(graph)


def _outputs(graph, images: np.ndarray) -> np.ndarray:
    return np.concatenate([run(graph, {"input": images[i:i + 1]})[0] for i in range(len(images))])


def _channel_ranges(weight: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)


def test_cle_is_exact_and_equalizes_the_depthwise_model(depthwise):
    graph = qtool.load(depthwise)
    before = {n.name: np.array(n.inputs[1].values) for n in graph.nodes if n.op == "Conv"}
    pairs, clipped = find_pairs(graph)
    # stem -> dw1, dw1 -> pw1, pw1 -> dw2, dw2 -> pw2, each through a Relu
    assert [(p.first.name, p.second.name) for p in pairs] == [
        (a, b) for a, b in zip(list(before)[:-1], list(before)[1:], strict=True)
    ]
    assert clipped == 0
    equalized, reports = qtool.Pipeline(["cle"]).run(qtool.load(depthwise))
    assert reports[0].changed and "4 layer pairs equalized" in reports[0].summary()
    onnx.checker.check_model(to_model(equalized))
    _, _, images, _ = digits_split()
    reference = _outputs(qtool.load(depthwise), images[:64])
    np.testing.assert_allclose(_outputs(equalized, images[:64]), reference,
                               atol=1e-5 * np.abs(reference).max(), rtol=0)
    after = {n.name: np.array(n.inputs[1].values) for n in equalized.nodes if n.op == "Conv"}
    for first, second in zip(list(after)[:-1], list(after)[1:], strict=True):
        # the output channel ranges of one layer now equal the input channel ranges of the
        # next (the depthwise conv's input channel i is its row i, a 1x1 conv's column i)
        r1 = _channel_ranges(after[first], 0)
        r2 = _channel_ranges(after[second], 0 if after[second].shape[1] == 1 else 1)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)
    # the largest ratio between two output channels' weight ranges within a layer (what one
    # per-tensor scale must cover): measured 3.9 (a depthwise conv) before, 1.6 after
    spread = lambda w: _channel_ranges(w, 0).max() / _channel_ranges(w, 0).min()  # noqa: E731
    assert max(map(spread, after.values())) < max(map(spread, before.values())) / 2


def test_cle_makes_per_tensor_backends_better_on_the_trained_depthwise_model(tmp_path):
    (tmp_path / "dw.onnx").write_bytes(depthwise_digits_onnx())
    calib, val = write_data(tmp_path)

    def held_out_sqnr(backend: str, cle: bool, bias_correction: bool = False) -> float:
        options = CalibrateOptions(data=calib, eval_data=val, batch_size=1, cle=cle,
                                   bias_correction=bias_correction, num_samples=128)
        _, report = quantize_model(tmp_path / "dw.onnx", backend, options)
        return report["evaluation"]["outputs"][0]["sqnr_db"]

    # measured (128 calibration and 128 held-out images, ORT optimizations off), in dB:
    #            none   CLE    bias correction   CLE + bias correction
    # tvm        26.75  29.73  28.81             31.19
    # snpe       35.10  35.20  36.85             38.46
    # academic   31.49  30.36  33.39             34.15
    # tensorrt   30.90  32.33  33.55             34.39   (per-channel weights)
    assert held_out_sqnr("tvm", True) > held_out_sqnr("tvm", False) + 2.0
    assert held_out_sqnr("snpe", True, True) > held_out_sqnr("snpe", False) + 2.5
    assert held_out_sqnr("academic", True, True) > held_out_sqnr("academic", False) + 2.0


def _export(module, shape, dynamic_batch: bool = False) -> bytes:
    buffer = io.BytesIO()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.zeros(shape), buffer, opset_version=11,
                          dynamo=False, input_names=["x"] if axes else None,
                          output_names=["y"] if axes else None, dynamic_axes=axes)
    return buffer.getvalue()


def test_gemm_pair_is_exact_and_relu6_pair_is_left_alone():
    nn = torch.nn
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        mlp[0].weight.mul_(torch.logspace(-2, 1, 12)[:, None])  # ranges 1000x apart
    graph, _ = prepare(qtool.load(_export(mlp, (1, 6))))
    equalized, _ = qtool.Pipeline(["cle"]).run(qtool.load(serialize(graph)))
    x = np.random.default_rng(0).standard_normal((1, 6)).astype(np.float32)
    np.testing.assert_allclose(run(equalized, {graph.inputs[0].name: x})[0],
                               run(graph, {graph.inputs[0].name: x})[0], rtol=1e-5, atol=1e-6)
    w1, w2 = (n.inputs[1].values for n in equalized.nodes if n.op == "Gemm")
    ranges = np.abs(w1).max(axis=1)  # torch's Linear: Gemm with transB, (out, in)
    np.testing.assert_allclose(ranges, np.abs(w2).max(axis=0), rtol=1e-3)
    assert ranges.max() / ranges.min() < 100  # sqrt of the 1000x spread, times w2's own

    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    graph, _ = prepare(qtool.load(_export(convs, (1, 3, 8, 8))))
    weights = [np.array(n.inputs[1].values) for n in graph.nodes if n.op == "Conv"]
    equalized, reports = qtool.Pipeline(["cle"]).run(graph)
    assert "1 pairs through Clip/ReLU6 left alone" in reports[0].summary()
    after = [n.inputs[1].values for n in equalized.nodes if n.op == "Conv"]
    assert all(np.array_equal(a, b) for a, b in zip(weights, after, strict=True))


def test_relu6_option_turns_the_clip_into_relu_and_equalizes():
    nn = torch.nn
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        convs[0].weight.mul_(torch.logspace(-1, 1, 8)[:, None, None, None])
    graph, _ = prepare(qtool.load(_export(convs, (1, 3, 8, 8))))
    relu = nn.Sequential(convs[0], nn.ReLU(), convs[2])  # what relu6="relu" computes
    reference, _ = prepare(qtool.load(_export(relu, (1, 3, 8, 8))))
    equalized, reports = qtool.Pipeline([("cle", {"relu6": "relu"})]).run(graph)
    assert "1 Clip(0, 6) between layers turned into Relu" in reports[0].summary()
    assert [n.op for n in equalized.nodes] == ["Conv", "Relu", "Conv"]
    x = {graph.inputs[0].name: np.random.default_rng(0).uniform(0, 4, (1, 3, 8, 8))
         .astype(np.float32)}
    expected = run(reference, x)[0]
    np.testing.assert_allclose(run(equalized, x)[0], expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    with pytest.raises(qtool.errors.PassError, match="relu6"):
        qtool.Pipeline([("cle", {"relu6": "hardtanh"})]).run(qtool.load(serialize(graph)))


def _biased_mlp(inputs: int, dynamic_batch: bool = False):
    nn = torch.nn
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(inputs, 12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        mlp[0].bias.copy_(torch.linspace(-1, 8, 12))  # channels that never go below 0
    graph, _ = prepare(qtool.load(_export(mlp, (1, inputs), dynamic_batch)))
    return graph


def _expected_bounds(hidden: np.ndarray) -> np.ndarray:
    """The absorbed offset per channel, written from the paper: max(0, mean - 3 std), and
    never above the calibration minimum."""
    return np.maximum(0.0, np.minimum(hidden.min(axis=0),
                                      hidden.mean(axis=0) - 3 * hidden.std(axis=0)))


def test_high_bias_absorption_is_exact_on_the_calibration_data():
    graph = _biased_mlp(6)
    name = graph.inputs[0].name
    rng = np.random.default_rng(0)
    samples = [{name: rng.uniform(-0.5, 0.5, (1, 6)).astype(np.float32)} for _ in range(64)]
    reference = [run(graph, s)[0] for s in samples]
    gemm = next(n for n in graph.nodes if n.op == "Gemm").outputs[0].name
    relu = next(n for n in graph.nodes if n.op == "Relu").outputs[0].name
    pre = np.concatenate([run(_exposing(graph, gemm), s)[1] for s in samples]).astype(np.float64)
    hidden_before = np.concatenate([run(_exposing(graph, relu), s)[1] for s in samples])
    absorbed, reports = equalize(qtool.load(serialize(graph)), samples, batch_size=1)
    assert "1 ReLU layers' positive offset moved" in reports[-1].summary()
    for sample, ref in zip(samples, reference, strict=True):
        np.testing.assert_allclose(run(absorbed, sample)[0], ref, rtol=1e-5, atol=1e-5)
    hidden_after = np.concatenate([run(_exposing(absorbed, relu), s)[1] for s in samples])
    # the ReLU output lost its certain offset: the bound, scaled per channel by CLE's 1/s
    live = hidden_before.max(axis=0) > 0  # channel 0 never fires
    top = hidden_before.max(axis=0)[live] - _expected_bounds(pre)[live]
    scale = hidden_after.max(axis=0)[live] / top
    np.testing.assert_allclose(hidden_after.min(axis=0)[live],
                               (hidden_before.min(axis=0) - _expected_bounds(pre))[live] * scale,
                               rtol=1e-4, atol=1e-5)
    assert _expected_bounds(pre).max() > 1.0


def test_high_bias_absorption_keeps_the_function_on_fresh_data():
    """Absorbed from 64 samples, checked on 4096 others: the exact calibration minimum was
    no bound there (fresh rows fall below it), mean - 3 std is (two uniform inputs: every
    pre-activation lies within 2.45 standard deviations of its mean)."""
    graph = _biased_mlp(2, dynamic_batch=True)
    name = graph.inputs[0].name
    rng = np.random.default_rng(1)
    calibration = [{name: rng.uniform(-1, 1, (1, 2)).astype(np.float32)} for _ in range(64)]
    fresh = {name: rng.uniform(-1, 1, (4096, 2)).astype(np.float32)}
    absorbed, reports = equalize(qtool.load(serialize(graph)), calibration, batch_size=8)
    assert "1 ReLU layers' positive offset moved" in reports[-1].summary()
    expected = run(graph, fresh)[0]
    np.testing.assert_allclose(run(absorbed, fresh)[0], expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())


def test_absorption_bounds_take_the_batchnorm_statistics():
    from qtool.passes.cle import absorption_bounds

    graph = _biased_mlp(6)
    name = graph.inputs[0].name
    rng = np.random.default_rng(2)
    samples = [{name: rng.uniform(-0.5, 0.5, (1, 6)).astype(np.float32)} for _ in range(32)]
    gemm = next(n for n in graph.nodes if n.op == "Gemm").outputs[0].name
    pre = np.concatenate([run(_exposing(graph, gemm), s)[1] for s in samples]).astype(np.float64)
    pairs = [p for p in find_pairs(graph)[0] if p.activation is not None]
    data_bound = np.minimum(pre.min(axis=0), pre.mean(axis=0) - 3 * pre.std(axis=0))
    np.testing.assert_allclose(absorption_bounds(graph, pairs, samples)[gemm], data_bound,
                               rtol=1e-5, atol=1e-5)
    beta, gamma = np.linspace(-1, 8, 12), np.full(12, 0.5)  # BN's output ~ N(beta, gamma^2)
    with_bn = absorption_bounds(graph, pairs, samples, bn_stats={gemm: (beta, gamma)})[gemm]
    np.testing.assert_allclose(with_bn, np.minimum(data_bound, beta - 1.5), rtol=1e-5,
                               atol=1e-5)


def test_batchnorm_statistics_name_the_folded_layer_output():
    from qtool.passes.cle import batchnorm_statistics

    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(-2, 2, 8))
        net[1].bias.copy_(torch.linspace(0, 7, 8))
    buffer = io.BytesIO()  # torch folds the BN itself unless constant folding is off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), torch.zeros(1, 3, 8, 8), buffer, opset_version=11,
                          dynamo=False, do_constant_folding=False)
    exported = buffer.getvalue()
    stats = batchnorm_statistics(qtool.load(exported))
    graph, _ = prepare(qtool.load(exported))
    pairs = [p for p in find_pairs(graph)[0] if p.activation is not None]
    beta, gamma = stats[pairs[0].first.outputs[0].name]
    np.testing.assert_allclose(beta, np.linspace(0, 7, 8), rtol=1e-6)
    np.testing.assert_allclose(gamma, np.abs(np.linspace(-2, 2, 8)), rtol=1e-6)


def test_cle_equalizes_layers_whose_equal_biases_cleanup_merged():
    nn = torch.nn
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for layer in (convs[0], convs[2], convs[4]):
            layer.bias.zero_()
        convs[0].weight.mul_(torch.logspace(-2, 1, 8)[:, None, None, None])
    graph, _ = prepare(qtool.load(_export(convs, (1, 3, 4, 4))))
    biases = {n.inputs[2].name for n in graph.nodes if n.op == "Conv"}
    assert len(biases) < 3  # cleanup merged the equal zero biases
    x = {graph.inputs[0].name: np.random.default_rng(0).standard_normal((1, 3, 4, 4))
         .astype(np.float32)}
    expected = run(graph, x)[0]
    equalized, reports = qtool.Pipeline(["cle"]).run(qtool.load(serialize(graph)))
    assert "2 layer pairs equalized" in reports[0].summary()
    np.testing.assert_allclose(run(equalized, x)[0], expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    w1 = next(n for n in equalized.nodes if n.op == "Conv").inputs[1].values
    ranges = np.abs(w1).reshape(8, -1).max(axis=1)
    assert ranges.max() / ranges.min() < 100  # the 1000x spread was evened


def test_absorb_high_bias_skips_padded_convs():
    nn = torch.nn
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    graph, _ = prepare(qtool.load(_export(convs, (1, 3, 8, 8))))
    pairs, _ = find_pairs(graph)
    assert absorb_high_bias(pairs, {pairs[0].first.outputs[0].name: np.ones(8)}) == 0


def _exposing(graph, name: str):
    model = to_model(graph)
    model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model.SerializeToString()


def test_cle_on_the_command_line_is_reported(tmp_path):
    from click.testing import CliRunner
    from qtool.cli import main

    (tmp_path / "dw.onnx").write_bytes(depthwise_digits_onnx())
    calib, _ = write_data(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "dw.onnx"), "-b", "tvm",
                                       "--data", calib, "--num-samples", "16", "--batch-size",
                                       "1", "--cle", "--no-bias-correction", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "cle: 4 layer pairs equalized" in report
    assert "high_bias_absorption" in report and "## Bias correction" not in report


def test_cle_runs_from_a_recipe(tmp_path):
    from qtool.workflow import run_recipe

    (tmp_path / "dw.onnx").write_bytes(depthwise_digits_onnx())
    (tmp_path / "r.yaml").write_text("model: dw.onnx\noutput: dw.cle.onnx\n"
                                     "passes: [cleanup, fold_bn, upgrade_opset, cle]\n")
    ran = run_recipe(tmp_path / "r.yaml")
    assert [r.name for r in ran.reports][-1] == "cle" and ran.reports[-1].changed
    _, _, images, _ = digits_split()
    reference = _outputs(qtool.load(depthwise_digits_onnx()), images[:8])
    np.testing.assert_allclose(_outputs(qtool.load(ran.output), images[:8]), reference,
                               atol=1e-5 * np.abs(reference).max(), rtol=0)


def test_cle_is_on_by_default_where_weights_are_per_tensor(tmp_path):
    (tmp_path / "dw.onnx").write_bytes(depthwise_digits_onnx())
    calib, _ = write_data(tmp_path)

    def passes(backend: str, cle=None) -> list[str]:
        options = CalibrateOptions(data=calib, batch_size=1, num_samples=16, cle=cle,
                                   bias_correction=False, analysis="none")
        return quantize_model(tmp_path / "dw.onnx", backend, options)[1]["passes"]

    equalized = "cle: 4 layer pairs equalized"
    assert any(p.startswith(equalized) for p in passes("tvm"))  # per-tensor weights
    assert any(p.startswith(equalized) for p in passes("academic"))
    assert not any(p.startswith("cle:") for p in passes("tensorrt"))  # per-channel weights
    assert not any(p.startswith("cle:") for p in passes("tvm", cle=False))
    assert any(p.startswith(equalized) for p in passes("tensorrt", cle=True))
