"""Empirical bias correction (qtool.bias_correction) and the SQNR floor (--fail-under-sqnr)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from qdq_helpers import run
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
