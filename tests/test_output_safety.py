"""Outputs that cannot lose a user's file: files written during a run, the run's own inputs,
corrupt manifests, and inputs that are already quantized (issue 23, items 4, 5 and 9).

References are independent of the code under test: file bytes read back, SHA-256 computed
here, DequantizeLinear written out as ``(q - zp) * scale`` in numpy, and onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from qtool.cli import main

from qtool import workflow
from qtool.errors import OutputError, QuantizedInputError
from qtool.io import load
from qtool.passes.strip_qdq import float_input, strip_qdq
from qtool.workflow import CalibrateOptions, calibrate_to_folder

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
OPTIONS = CalibrateOptions(data=CALIB, num_samples=8, kernel_check=False)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _writes_during_run(monkeypatch, path: Path, text: str) -> None:
    """Make the next run write ``path`` while it works (after the output was vetted)."""
    real = workflow.quantize_model

    def quantize_then_write(*args, **kwargs):
        result = real(*args, **kwargs)
        path.write_text(text)
        return result

    monkeypatch.setattr(workflow, "quantize_model", quantize_then_write)


# ------------------------------------------------------------- item 4: --force re-checks

def test_force_keeps_a_file_written_into_the_folder_during_the_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calibrate_to_folder(DIGITS, "snpe", out, OPTIONS)
    before = _tree(out)
    _writes_during_run(monkeypatch, out / "notes.txt", "written while qtool ran")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        calibrate_to_folder(DIGITS, "tensorrt", out, OPTIONS, force=True)
    after = _tree(out)
    assert after.pop("notes.txt") == b"written while qtool ran"
    assert after == before  # the old output untouched, nothing half-replaced
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_folder_created_during_the_run_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _writes_during_run(monkeypatch, out / "mine.txt", "user file")
    out.mkdir()  # empty at the start: accepted without --force
    with pytest.raises(OutputError, match="not empty"):
        calibrate_to_folder(DIGITS, "snpe", out, OPTIONS)
    assert _tree(out) == {"mine.txt": b"user file"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_still_replaces_its_own_output(tmp_path):
    out = tmp_path / "out"
    calibrate_to_folder(DIGITS, "snpe", out, OPTIONS)
    calibrate_to_folder(DIGITS, "tensorrt", out, OPTIONS, force=True)
    assert "calibration.cache" in _tree(out) and "encodings" not in " ".join(_tree(out))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old folder is gone


# ------------------------------------------- item 5: a run's inputs are never stale files

def test_requantizing_the_qdq_file_beside_itself_keeps_it(tmp_path):
    """The issue's commands: snpe to qq/q.onnx, then tensorrt from qq/q.qdq.onnx."""
    target = tmp_path / "qq" / "q.onnx"
    calibrate_to_folder(DIGITS, "snpe", target, OPTIONS)
    qdq = tmp_path / "qq" / "q.qdq.onnx"
    original = qdq.read_bytes()
    requantize = CalibrateOptions(data=CALIB, num_samples=8, kernel_check=False,
                                  requantize=True)
    calibrate_to_folder(qdq, "tensorrt", target, requantize, force=True)
    assert qdq.read_bytes() == original  # the input survives
    names = {p.name for p in target.parent.iterdir()}
    assert "q.encodings" not in names  # snpe's other files were stale and are gone
    manifest = json.loads((tmp_path / "qq" / "q.qtool.json").read_text())
    assert "q.qdq.onnx" in manifest["files"]  # still qtool's: a later --force may replace it
    calibrate_to_folder(DIGITS, "snpe", target, OPTIONS, force=True)  # no refusal
    assert qdq.read_bytes() == original  # the same run as the first: the same bytes


def test_stale_files_never_include_data_or_external_data(tmp_path):
    """A file the previous run wrote and this run reads (here the data) is not removed."""
    from qtool.output import write_beside

    target = tmp_path / "net.onnx"
    write_beside(target, {"model.qdq.onnx": b"m", "calib.npz": b"d"}, force=False)
    data = tmp_path / "net.calib.npz"
    write_beside(target, {"model.qdq.onnx": b"n"}, force=True, inputs=[data])
    assert data.read_bytes() == b"d"
    write_beside(target, {"model.qdq.onnx": b"o"}, force=True)
    assert not data.exists()  # no longer an input: a stale file of qtool's


def test_input_files_lists_external_data(tmp_path):
    from qtool.output import input_files

    model = onnx.load(DIGITS)
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    found = input_files(tmp_path / "ext.onnx", CALIB, None)
    assert found == [tmp_path / "ext.onnx", CALIB, tmp_path / "ext.weights"]


# ------------------------------------------------- item 9: corrupt manifests are refused

#: Corruptions of a real manifest (its listing given): a JSON list, entries that escape
#: the folder, a listing that is not a mapping, a digest that is not one.
CORRUPTIONS = {
    "list": lambda files: [1, 2],
    "parent entry": lambda files: {"tool": "qtool", "files": {**files, "../x": "0" * 64}},
    "absolute entry": lambda files: {"tool": "qtool", "files": {**files, "/etc/x": "0" * 64}},
    "files a list": lambda files: {"tool": "qtool", "files": sorted(files)},
    "digest a number": lambda files: {"tool": "qtool", "files": {**files, "net.onnx": 5}},
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_file_manifest_is_a_clean_refusal(tmp_path, corrupt):
    target = tmp_path / "d" / "net.onnx"
    calibrate_to_folder(DIGITS, "snpe", target, OPTIONS)
    (tmp_path / "x").write_text("outside")
    manifest = tmp_path / "d" / "net.qtool.json"
    manifest.write_text(json.dumps(corrupt(json.loads(manifest.read_text())["files"])))
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="not written by qtool"):
        calibrate_to_folder(DIGITS, "tensorrt", target, OPTIONS, force=True)
    assert _tree(tmp_path) == before  # nothing written, nothing deleted


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_folder_manifest_is_a_clean_refusal(tmp_path, corrupt):
    out = tmp_path / "out"
    calibrate_to_folder(DIGITS, "snpe", out, OPTIONS)
    (tmp_path / "x").write_text("outside")
    manifest = out / ".qtool-manifest.json"
    manifest.write_text(json.dumps(corrupt(json.loads(manifest.read_text())["files"])))
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="did not write"):
        calibrate_to_folder(DIGITS, "tensorrt", out, OPTIONS, force=True)
    assert _tree(tmp_path) == before


def test_corrupt_manifest_cli_exit_code(tmp_path):
    target = tmp_path / "net.onnx"
    calibrate_to_folder(DIGITS, "snpe", target, OPTIONS)
    (tmp_path / "net.qtool.json").write_text("[]")
    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "-b", "tvm", "--data",
                                       str(CALIB), "--num-samples", "8", "-o", str(target),
                                       "--force", "-q"])
    assert result.exit_code == OutputError.exit_code, result.output
    assert "not written by qtool" in result.output and "Traceback" not in result.output


# ------------------------------------------------- item 5: already-quantized inputs

@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qdq") / "digits.onnx"
    calibrate_to_folder(DIGITS, "tensorrt", out, OPTIONS)  # tensorrt: model.qdq.onnx
    return out


def test_qdq_input_is_refused_with_a_hint(qdq_model, tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(qdq_model), "-b", "snpe", "--data",
                                       str(CALIB), "--num-samples", "8",
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code == QuantizedInputError.exit_code, result.output
    assert "already quantized" in result.output and "--requantize" in result.output
    assert not (tmp_path / "o").exists()
    plan = tmp_path / "plan.json"
    with pytest.raises(QuantizedInputError):
        calibrate_to_folder(qdq_model, "snpe", None, OPTIONS, save_plan=plan)
    assert not plan.exists()


def _qoperator_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2])
    w = helper.make_tensor("w", TensorProto.INT8, [4, 2], [1, -1, 2, 0, 3, 1, -2, 4])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
                              "qop", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_qoperator_input_is_refused_even_with_requantize(tmp_path):
    path = tmp_path / "qop.onnx"
    onnx.save(_qoperator_model(), path)
    for requantize in (False, True):
        with pytest.raises(QuantizedInputError, match="QOperator.*MatMulInteger"):
            float_input(load(path), requantize=requantize)


def _dequantized(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    q = inits[node.input[0]].astype(np.float64)
    scale = inits[node.input[1]].astype(np.float64)
    zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return (q - zero) * scale


def test_strip_qdq_gives_the_float_graph_with_dequantized_weights(qdq_model):
    proto = onnx.load(qdq_model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    expected = {n.output[0]: _dequantized(n, inits) for n in proto.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert expected  # the tensorrt file holds int8 weights behind DequantizeLinear
    stripped = strip_qdq(load(qdq_model))
    ops = {n.op for n in stripped.nodes}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    constants = {t.name: t.values for t in stripped.tensors().values()
                 if hasattr(t, "values")}
    for name, value in expected.items():
        np.testing.assert_allclose(constants[name], value, rtol=1e-6, atol=1e-12)
    # the stripped model is the float model up to weight rounding: close to its outputs
    from qtool.io import serialize

    x = np.load(CALIB)["input"][:16]
    floats = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    stripped_run = ort.InferenceSession(serialize(stripped), providers=["CPUExecutionProvider"])
    reference = floats.run(None, {"input": x})[0]
    got = stripped_run.run(None, {"input": x})[0]
    sqnr = 10 * np.log10((reference**2).sum() / ((reference - got) ** 2).sum())
    assert sqnr > 30


def test_requantize_runs_and_warns(qdq_model, tmp_path):
    options = CalibrateOptions(data=CALIB, num_samples=8, kernel_check=False, requantize=True)
    run = calibrate_to_folder(qdq_model, "snpe", tmp_path / "o", options)
    assert any("already quantized" in w for w in run.report["warnings"])
    model = onnx.load_from_string(run.files["model.qdq.onnx"])
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    # one quantizer per activation, not two stacked: a Q never reads a DQ's output
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    assert quantizers and all(produced.get(n.input[0]) != "DequantizeLinear"
                              for n in quantizers)
