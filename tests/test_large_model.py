"""Models over 2 GB: loaded, calibrated and written with external data at every step.

``qtool.io.LARGE_MODEL_BYTES`` (2 GB less headroom) is lowered here so that a model of a few
hundred KB takes the large-model path: tensors read from the data file into arrays, sessions
built from a temporary file pair, no whole-model protobuf, outputs with external data. The
references are onnxruntime runs of the float model from its own path, onnx's reader of
external data, and the SQNR formula computed here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtool.io
from qtool.errors import OutputError
from qtool.io import load, save, serialize, session_source
from qtool.workflow import CalibrateOptions, calibrate_to_folder

WIDTH = 96
LAYERS = 4
THRESHOLD = 64 * 1024  # the model holds 4 x 36 KB of weights


@pytest.fixture
def large(monkeypatch):
    monkeypatch.setattr(qtool.io, "LARGE_MODEL_BYTES", THRESHOLD)


def _model(folder):
    """MatMul/Add/ReLU chain with its weights in ``mlp.onnx.data`` (as exporters write it)."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        b = (rng.standard_normal(WIDTH) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        prev = f"a{i}"
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "mlp.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp.onnx.data", size_threshold=1024)
    x = rng.standard_normal((48, WIDTH)).astype(np.float32)
    np.savez(folder / "calib.npz", x=x[:32])
    np.savez(folder / "val.npz", x=x[32:])
    return path, x[32:]


def _run_path(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_load_reads_the_data_file_into_arrays(tmp_path, large):
    path, _ = _model(tmp_path)
    graph = load(path)
    reference = onnx.load(path)  # onnx's own reader of the external data
    expected = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    for name, values in expected.items():
        np.testing.assert_array_equal(np.asarray(constants[name].values), values)
    assert graph.external_data
    with pytest.raises(OutputError, match="external data"):
        serialize(graph)  # never one protobuf for a large model


def test_save_and_session_source_write_external_data(tmp_path, large):
    path, x = _model(tmp_path)
    graph = load(path)
    out = tmp_path / "out"
    out.mkdir()
    save(graph, out / "copy.onnx")
    first = ((out / "copy.onnx").read_bytes(), (out / "copy.onnx.data").read_bytes())
    save(graph, out / "copy.onnx")
    assert first == ((out / "copy.onnx").read_bytes(), (out / "copy.onnx.data").read_bytes())
    assert len(first[0]) < THRESHOLD // 4  # the graph only; the weights are in the data file
    offsets = [int(e.value) for t in onnx.load(out / "copy.onnx", load_external_data=False)
               .graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % qtool.io.EXTERNAL_ALIGNMENT == 0 for o in offsets)
    np.testing.assert_array_equal(_run_path(out / "copy.onnx", x), _run_path(path, x))
    source = session_source(graph)
    assert isinstance(source, str)
    np.testing.assert_array_equal(_run_path(source, x), _run_path(path, x))
    qtool.io.release(source)


@pytest.mark.parametrize("file_output", [False, True])
def test_calibrate_keeps_external_data_and_runs(tmp_path, large, file_output):
    path, x = _model(tmp_path)
    options = CalibrateOptions(data=str(tmp_path / "calib.npz"),
                               eval_data=str(tmp_path / "val.npz"))
    target = tmp_path / ("q.onnx" if file_output else "out")
    run = calibrate_to_folder(path, "onnxruntime", target, options)
    model_path = target if file_output else target / "model.qdq.onnx"
    data_path = model_path.with_name(model_path.name + ".data")
    skeleton = onnx.load(model_path, load_external_data=False)
    locations = {e.value for t in skeleton.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {data_path.name} and data_path.stat().st_size > 0
    assert {t.data_type for t in skeleton.graph.initializer
            if t.data_location == TensorProto.EXTERNAL} == {TensorProto.INT8}
    reference, quantized = _run_path(path, x), _run_path(model_path, x)
    sqnr = 10 * np.log10(np.sum(reference.astype(np.float64) ** 2)
                         / np.sum((reference - quantized.astype(np.float64)) ** 2))
    assert sqnr > 25  # W8A8 of four random layers: about 29.5 dB
    report = json.loads((model_path.with_name("q.report.json") if file_output
                         else target / "report.json").read_text())
    assert report["evaluation"]["outputs"][0]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    assert any("bias correction skipped" in w for w in report["warnings"])
    if not file_output:  # the same inputs, the same bytes
        again = calibrate_to_folder(path, "onnxruntime", tmp_path / "again", options)
        assert again.files == run.files
