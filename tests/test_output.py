"""Outputs never lose a user's file: -o NAME.onnx for every backend, manifests, refusals.

The reference for a file output is the folder output of the same run: the same bytes under
the documented names (``model.onnx``/``model.qdq.onnx`` -> ``NAME.onnx``, ``model.X`` ->
``NAME.X``, others ``NAME.<file>``); the manifest is checked with hashlib here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from qtool.backends import backend_names
from qtool.cli import main

from qtool.errors import OutputError
from qtool.workflow import CalibrateOptions, calibrate_to_folder, run_recipe

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
OPTIONS = CalibrateOptions(data=CALIB, num_samples=8)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("backend", backend_names())
def test_model_file_output_for_every_backend(tmp_path, backend):
    folder_run = calibrate_to_folder(DIGITS, backend, tmp_path / "folder", OPTIONS)
    folder = _files(tmp_path / "folder")
    manifest = json.loads(folder.pop(".qtool-manifest.json"))
    assert manifest["files"] == {n: hashlib.sha256(b).hexdigest() for n, b in folder.items()}

    target = tmp_path / "deploy" / "net.onnx"
    run = calibrate_to_folder(DIGITS, backend, target, OPTIONS)
    written = _files(target.parent)
    deployable = "model.onnx" if "model.onnx" in folder else "model.qdq.onnx"
    expected = {"net.onnx": folder[deployable]}
    for name, data in folder.items():
        if name != deployable:
            expected["net." + name.removeprefix("model.")] = data
    file_manifest = json.loads(written.pop("net.qtool.json"))
    assert written == expected  # same bytes as the folder run, nothing else (no temp files)
    assert file_manifest["files"] == {
        n: hashlib.sha256(b).hexdigest() for n, b in expected.items()
    }
    assert set(run.paths) == set(folder_run.files)
    # NAME.onnx is a model onnxruntime runs: the QDQ graph, or SNPE/QNN's float graph
    model = onnx.load_from_string(expected["net.onnx"])
    has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert has_qdq == (deployable == "model.qdq.onnx")
    session = ort.InferenceSession(expected["net.onnx"], providers=["CPUExecutionProvider"])
    x = np.load(CALIB)["input"][:1]
    assert np.isfinite(session.run(None, {"input": x})[0]).all()
    if backend in ("snpe", "qnn"):
        assert "activation_encodings" in json.loads(expected["net.encodings"])
    if backend == "tensorrt":
        assert expected["net.calibration.cache"].startswith(b"TRT-")


def test_model_file_output_refusals_and_force(tmp_path):
    target = tmp_path / "net.onnx"
    target.write_bytes(b"the user's model")
    for force in (False, True):  # a file qtool did not write: refused whatever the flags
        with pytest.raises(OutputError):
            calibrate_to_folder(DIGITS, "snpe", target, OPTIONS, force=force)
        assert target.read_bytes() == b"the user's model"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]
    target.unlink()
    calibrate_to_folder(DIGITS, "snpe", target, OPTIONS)
    with pytest.raises(OutputError, match="exist"):  # qtool's own files: only with --force
        calibrate_to_folder(DIGITS, "snpe", target, OPTIONS)
    (tmp_path / "net.report.md").write_text("edited by hand")
    with pytest.raises(OutputError, match=r"net\.report\.md not written by qtool"):
        calibrate_to_folder(DIGITS, "tensorrt", target, OPTIONS, force=True)
    assert (tmp_path / "net.report.md").read_text() == "edited by hand"
    (tmp_path / "net.report.md").unlink()
    (tmp_path / "notes.txt").write_text("mine")
    calibrate_to_folder(DIGITS, "tensorrt", target, OPTIONS, force=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    # snpe's encodings, float model and QDQ model were qtool's and are gone; notes.txt stays
    assert "net.encodings" not in names and "net.qdq.onnx" not in names
    assert {"net.onnx", "net.calibration.cache", "net.qtool.json", "notes.txt"} <= set(names)
    assert not [n for n in names if n.startswith(".")]
    # the input model itself is never an output
    copy = tmp_path / "in.onnx"
    copy.write_bytes(DIGITS.read_bytes())
    with pytest.raises(OutputError, match="input model"):
        calibrate_to_folder(copy, "tvm", copy, OPTIONS, force=True)
    assert copy.read_bytes() == DIGITS.read_bytes()


def test_cli_model_file_output_prints_its_files(tmp_path):
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "-b", "snpe", "--data",
                                       str(CALIB), "--num-samples", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("  files: "))
    assert str(tmp_path / "q.encodings") in line and str(out) in line
    assert (tmp_path / "q.encodings").is_file()


def test_empty_folder_is_replaced_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    calibrate_to_folder(DIGITS, "tvm", tmp_path / "out", OPTIONS)
    assert (tmp_path / "out" / "model.qdq.onnx").is_file()


def test_run_and_save_plan_refuse_to_overwrite(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(DIGITS.read_bytes())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m.onnx\noutput: p.onnx\npasses: [cleanup]\n")
    (tmp_path / "p.onnx").write_bytes(b"keep")
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(recipe)])
    assert result.exit_code == 8 and "exists already" in result.stderr
    assert (tmp_path / "p.onnx").read_bytes() == b"keep"
    result = runner.invoke(main, ["run", str(recipe), "--force"])
    assert result.exit_code == 0, result.output
    assert onnx.load(tmp_path / "p.onnx").graph.node
    for force in (False, True):  # the model itself is never the output
        with pytest.raises(OutputError, match="input model"):
            run_recipe(recipe, output=model, force=force)
    assert model.read_bytes() == DIGITS.read_bytes()

    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    result = runner.invoke(main, ["calibrate", str(model), "-b", "tvm", "--save-plan", str(plan)])
    assert result.exit_code == 8 and plan.read_text() == "{}"
    result = runner.invoke(main, ["calibrate", str(model), "-b", "tvm", "--save-plan", str(plan),
                                  "--force"])
    assert result.exit_code == 0 and json.loads(plan.read_text())["tensors"]


def test_report_command_reads_a_model_file_run(tmp_path):
    target = tmp_path / "net.onnx"
    calibrate_to_folder(DIGITS, "tvm", target, OPTIONS)
    page = tmp_path / "net.report.html"
    original = page.read_bytes()
    page.unlink()
    result = CliRunner().invoke(main, ["report", str(target)])
    assert result.exit_code == 0, result.output
    assert page.read_bytes() == original  # the same bytes calibrate wrote
