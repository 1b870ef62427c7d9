"""qtool.workflow: the main job's files and numbers, atomic output, plans, recipes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qtool.errors import DataError, OutputError, PlanError, RecipeError
from qtool.plan import QuantPlan
from qtool.workflow import CalibrateOptions, calibrate_to_folder, run_recipe

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
VAL = ROOT / "examples" / "digits_val.npz"
OPTIONS = CalibrateOptions(data=CALIB, eval_data=VAL)


def _run(path, inputs):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0]


@pytest.fixture(scope="module")
def snpe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wf") / "snpe"
    return calibrate_to_folder(DIGITS, "snpe", out, OPTIONS)


def test_folder_holds_model_encodings_plan_and_report(snpe_run):
    names = sorted(p.name for p in snpe_run.output.iterdir())
    assert names == [".qtool-manifest.json", "model.encodings", "model.onnx", "model.qdq.onnx",
                     "plan.json", "report.html", "report.json", "report.md"]
    for name, data in snpe_run.files.items():
        assert (snpe_run.output / name).read_bytes() == data
    report = json.loads((snpe_run.output / "report.json").read_text())
    assert report == snpe_run.report
    # The report's digests are those of the files on disk.
    for name, digest in report["files"].items():
        assert hashlib.sha256((snpe_run.output / name).read_bytes()).hexdigest() == digest
    encodings = json.loads((snpe_run.output / "model.encodings").read_text())
    assert {e["name"] for e in encodings["activation_encodings"]} <= set(
        QuantPlan.from_json((snpe_run.output / "plan.json").read_text()).tensors
    )
    onnx.checker.check_model(onnx.load(snpe_run.output / "model.qdq.onnx"))
    # No temporary sibling folder is left behind.
    assert [p.name for p in snpe_run.output.parent.iterdir()] == ["snpe"]


def test_reported_accuracy_and_sqnr_match_the_written_files(snpe_run):
    data = np.load(VAL)
    x, labels = data["input"], data["labels"]
    float_logits = _run(DIGITS, x)
    quant_logits = _run(snpe_run.output / "model.qdq.onnx", x)
    (out,) = snpe_run.report["evaluation"]["outputs"]
    assert out["float_accuracy"] == pytest.approx(np.mean(float_logits.argmax(1) == labels))
    assert out["float_accuracy"] == pytest.approx(0.994)  # examples/train_digits.py's number
    assert out["quant_accuracy"] == pytest.approx(np.mean(quant_logits.argmax(1) == labels))
    assert out["quant_accuracy"] >= 0.98
    f, q = float_logits.astype(np.float64), quant_logits.astype(np.float64)
    sqnr = 10 * math.log10(np.sum(f**2) / np.sum((f - q) ** 2))
    assert out["sqnr_db"] == pytest.approx(sqnr, rel=1e-5)
    assert out["top1_agreement"] == pytest.approx(np.mean(f.argmax(1) == q.argmax(1)))
    evaluation = snpe_run.report["evaluation"]
    assert evaluation["held_out"] and evaluation["samples"] == len(labels)
    assert snpe_run.report["calibration"]["samples"] == 256
    assert snpe_run.report["warnings"] == []


def test_two_runs_give_identical_bytes(tmp_path, snpe_run):
    again = calibrate_to_folder(DIGITS, "snpe", tmp_path / "again", OPTIONS)
    first = {p.name: p.read_bytes() for p in snpe_run.output.iterdir()}
    second = {p.name: p.read_bytes() for p in again.output.iterdir()}
    assert first == second


def test_existing_folder_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    options = CalibrateOptions(data=CALIB, num_samples=32)
    with pytest.raises(OutputError, match="not empty"):
        calibrate_to_folder(DIGITS, "tensorrt", out, options)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(OutputError, match="did not write"):  # a user's file: never replaced
        calibrate_to_folder(DIGITS, "tensorrt", out, options, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    calibrate_to_folder(DIGITS, "tensorrt", out, options)
    calibrate_to_folder(DIGITS, "tvm", out, options, force=True)  # qtool's own: replaced
    names = {p.name for p in out.iterdir()}
    assert "calibration.cache" not in names and {"shifts.json", "model.qdq.onnx"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # An existing empty folder is simply filled.
    empty = tmp_path / "empty"
    empty.mkdir()
    calibrate_to_folder(DIGITS, "tensorrt", empty, options)
    assert (empty / "report.json").is_file()


def test_failure_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 1, 9, 9), np.float32))
    with pytest.raises(DataError, match="does not fit"):
        calibrate_to_folder(DIGITS, "snpe", tmp_path / "out", CalibrateOptions(data=bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        calibrate_to_folder(DIGITS, "snpe", blocker / "out", OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_random_inputs_are_flagged(tmp_path):
    run = calibrate_to_folder(DIGITS, "fbgemm", tmp_path / "o",
                              CalibrateOptions(num_samples=8, seed=3))
    assert run.report["calibration"]["random_inputs"] is True
    assert run.report["calibration"]["samples"] == 8
    assert any("random inputs" in w for w in run.report["warnings"])
    assert "Warning:** calibrated on random inputs" in (tmp_path / "o" / "report.md").read_text()


def test_saved_and_edited_plan_is_used(tmp_path):
    plan_file = tmp_path / "plan.json"
    run = calibrate_to_folder(DIGITS, "tvm", None, OPTIONS, save_plan=plan_file)
    assert run.report is None and run.output == plan_file
    plan = QuantPlan.from_json(plan_file.read_text())
    edited = plan.skip("Gemm")
    plan_file.write_text(edited.to_json())
    result = calibrate_to_folder(DIGITS, "tvm", tmp_path / "out",
                                 CalibrateOptions(data=CALIB, plan=plan_file))
    assert result.report["plan"]["quantized_tensors"] == len(edited.tensors) < len(plan.tensors)
    gemm = [name for name, op in plan.nodes.items() if op == "Gemm"]
    assert set(gemm) <= set(result.report["plan"]["float_nodes"])
    assert (tmp_path / "out" / "plan.json").read_text() == edited.to_json()
    with pytest.raises(PlanError, match="--skip"):
        calibrate_to_folder(DIGITS, "tvm", tmp_path / "x",
                            CalibrateOptions(data=CALIB, plan=plan_file, skip=("Conv",)))


def test_skip_and_bits_reach_the_plan(tmp_path):
    run = calibrate_to_folder(
        DIGITS, "academic", tmp_path / "o",
        CalibrateOptions(data=CALIB, num_samples=64, skip=("Gemm",), weight_bits=4),
    )
    plan = QuantPlan.from_json((tmp_path / "o" / "plan.json").read_text())
    assert all(e.scheme.bits == 4 for e in plan.entries("weight"))
    assert any("Gemm" in node for node in run.report["plan"]["float_nodes"])


def test_layerwise_report(tmp_path):
    run = calibrate_to_folder(DIGITS, "snpe", tmp_path / "o",
                              CalibrateOptions(data=CALIB, num_samples=64, layerwise=True))
    layers = run.report["evaluation"]["layers"]
    assert layers and [layer["sqnr_db"] for layer in layers] == sorted(
        layer["sqnr_db"] for layer in layers
    )
    assert "Layers, worst first" in (tmp_path / "o" / "report.md").read_text()


def test_recipe(tmp_path):
    recipe = tmp_path / "prepare.yaml"
    recipe.write_text(f"model: {DIGITS}\noutput: folded.onnx\npasses: [cleanup, fold_bn]\n")
    result = run_recipe(recipe)
    assert result.output == tmp_path / "folded.onnx"
    model = onnx.load(result.output)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    x = np.load(VAL)["input"][:50]
    np.testing.assert_allclose(_run(result.output, x), _run(DIGITS, x), rtol=1e-4, atol=1e-4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m.onnx\npasses: [cleanup]\nsteps: []\n")
    with pytest.raises(RecipeError, match="unknown recipe key.*steps"):
        run_recipe(bad)
    unknown_pass = tmp_path / "unknown.yaml"
    unknown_pass.write_text("passes: [nope]\n")
    with pytest.raises(RecipeError, match="unknown pass 'nope'"):
        run_recipe(unknown_pass, model=DIGITS)


def test_every_backends_output_passes_its_own_lint(tmp_path):
    from qtool.backends import backend_names

    from qtool.lint import lint_model

    options = CalibrateOptions(data=CALIB, num_samples=32)
    outputs = {}
    for backend in backend_names():
        run = calibrate_to_folder(DIGITS, backend, tmp_path / backend, options)
        outputs[backend] = run.output / "model.qdq.onnx"
        findings = lint_model(str(outputs[backend]), backend=backend).findings
        assert {f.rule_id for f in findings} == {"QT005"}, (backend, findings)
    # Cross-checks: another backend's rules do flag what differs.
    tvm_rules_on_trt = {f.rule_id for f in lint_model(str(outputs["tensorrt"]), backend="tvm")
                        .findings}
    assert "QT108" in tvm_rules_on_trt  # TensorRT's scales are not powers of two
    trt_rules_on_snpe = {f.rule_id for f in lint_model(str(outputs["snpe"]), backend="tensorrt")
                         .findings}
    assert {"QT106", "QT107"} <= trt_rules_on_snpe  # SNPE's uint8 asymmetric activations
