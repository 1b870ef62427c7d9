"""Models as users export them (issue 12): fixed batch 1, -1 dims, one-node graphs, state and
scalar inputs, subgraph bodies, odd but valid graphs, errors in later phases.

Each model is built the way its exporter builds it: ``torch.onnx.export`` with defaults
(``dynamo=False``, fixed batch 1), an opset-11 export whose dynamic dim is written as ``-1``
(paddle2onnx's way), a one-node ``onnx.helper`` graph, an LSTM exported with its state inputs
(batch on axis 1) and a scalar input, a scripted module whose compute sits in ``If`` branches.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from qtool.cli import main

from qtool.errors import DataError, InvalidModelError
from qtool.workflow import CalibrateOptions, evaluate_files, quantize_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
VAL = ROOT / "examples" / "digits_val.npz"


def _session(model):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(str(data) if isinstance(data, Path) else data, options,
                                providers=["CPUExecutionProvider"])


def _export(module, args, path, **kwargs):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(module.eval(), args, buffer, dynamo=False, **kwargs)
    path.write_bytes(buffer.getvalue())
    return path


def _small_cnn():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- fixed batch 1 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_digits(tmp_path_factory):
    """The trained digits CNN as a default export writes it: batch fixed to 1."""
    model = onnx.load(DIGITS)
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    path = tmp_path_factory.mktemp("fixed") / "digits_b1.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory):
    with np.load(VAL) as archive:
        inputs, labels = archive["input"][:40], archive["labels"][:40]
    path = tmp_path_factory.mktemp("val") / "val40.npz"
    np.savez(path, input=inputs, labels=labels)
    return path, inputs, labels


def test_fixed_batch_torch_export_calibrates(tmp_path):
    import torch

    model = _export(_small_cnn(), (torch.randn(1, 3, 16, 16),), tmp_path / "fixed.onnx")
    assert onnx.load(model).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    data = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **{onnx.load(model).graph.input[0].name: data})
    _, report = quantize_model(model, "tensorrt", CalibrateOptions(
        data=tmp_path / "d.npz", eval_data=tmp_path / "d.npz", batch_size=4, target_sqnr=30.0,
        analysis="full"))
    # every phase ran in batches of 1: all 5 samples counted, the analysis and fallback ran
    assert report["calibration"]["samples"] == 5
    assert report["evaluation"]["samples"] == 5
    assert report["analysis"]["samples"] == 5
    assert report["analysis"]["fallback"] is not None


def test_fixed_batch_evaluate_and_accuracy(fixed_digits, val_subset, tmp_path):
    path, inputs, labels = val_subset
    out = tmp_path / "out"
    result = _invoke("calibrate", fixed_digits, "-b", "tensorrt", "--data", path,
                     "--batch-size", "16", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    evaluation = evaluate_files(fixed_digits, out / "model.qdq.onnx", path, batch_size=16)
    assert evaluation.samples == 40
    # the float accuracy, computed here sample by sample on the original dynamic model
    session = _session(DIGITS)
    logits = np.concatenate([session.run(None, {"input": inputs[i:i + 1]})[0]
                             for i in range(40)])
    expected = float((logits.argmax(axis=1) == labels).mean())
    float_acc, quant_acc = evaluation.accuracy
    assert float_acc == pytest.approx(expected)
    assert quant_acc >= expected - 0.1
    cli = _invoke("evaluate", fixed_digits, out / "model.qdq.onnx", "--data", path)
    assert cli.exit_code == 0, cli.output


def test_compare_on_fixed_batch_and_failed_cell_exit(fixed_digits, val_subset, monkeypatch):
    path = val_subset[0]
    ok = _invoke("compare", fixed_digits, "--data", path, "-b", "tensorrt", "-m", "minmax",
                 "--no-sweep", "--num-samples", "8")
    assert ok.exit_code == 0, ok.output
    assert "error" not in ok.output

    from qtool.analysis import compare as compare_module
    from qtool.errors import CalibrationError

    def fail(*args, **kwargs):
        raise CalibrationError("tensor x has NaN")

    monkeypatch.setattr(compare_module, "_quantize_and_evaluate", fail)
    failed = _invoke("compare", fixed_digits, "--data", path, "-b", "tensorrt", "-m", "minmax",
                     "--no-sweep", "--num-samples", "8")
    assert failed.exit_code == 1
    assert "tensorrt x minmax: tensor x has NaN" in failed.output


# -- dims written as -1 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minus_one_model(tmp_path_factory):
    """An opset-11 classifier whose dynamic batch is written as dim_value -1."""
    import torch

    path = tmp_path_factory.mktemp("neg") / "neg.onnx"
    _export(_small_cnn(), (torch.randn(1, 3, 16, 16),), path, opset_version=11,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}})
    model = onnx.load(path)
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1
    onnx.save(model, path)
    return path


def test_minus_one_dims_are_dynamic(minus_one_model, tmp_path):
    from qtool.calibration.batching import resolve_batch_size
    from qtool.calibration.data import model_inputs

    specs = model_inputs(minus_one_model)
    assert specs[0].shape == (None, 3, 16, 16) and specs[0].batch_axis == 0
    assert resolve_batch_size(specs, None) == (16, False)
    data = np.random.default_rng(1).standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=data)
    files, report = quantize_model(minus_one_model, "tvm",
                                   CalibrateOptions(data=tmp_path / "d.npz", batch_size=4))
    assert any("upgrade_opset: opset 11 -> 13" in p for p in report["passes"])
    assert sum("treated as dynamic" in w for w in report["warnings"]) == 1
    out = onnx.load_from_string(files["model.qdq.onnx"])
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "dynamic"
    # the quantized model runs a batch of 6 and matches the float one closely
    float_out = _session(minus_one_model).run(None, {"input": data})[0]
    quant_out = _session(out).run(None, {"input": data})[0]
    noise = np.sum((float_out - quant_out) ** 2)
    assert 10 * np.log10(np.sum(float_out**2) / noise) > 15


def test_minus_one_model_at_opset_13_calibrates_without_hanging(minus_one_model):
    from qtool.calibration import calibrate

    from qtool.scheme import QuantScheme

    model = onnx.version_converter.convert_version(onnx.load(minus_one_model), 13)
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = -1
    data = np.random.default_rng(2).standard_normal((5, 3, 16, 16)).astype(np.float32)
    samples = [{"input": data[i:i + 1]} for i in range(5)]
    out = model.graph.output[0].name
    ranges = calibrate(model, {out: QuantScheme(bits=8, signed=True, symmetric=True)},
                       samples, batch_size=2)
    reference = _session(model).run(None, {"input": data})[0]
    assert ranges[out] == pytest.approx((reference.min(), reference.max()), rel=1e-5)


# -- a graph output that is also an observed tensor ---------------------------------------


def _one_conv(batch="N"):
    weight = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_one_node_model_analysis(tmp_path):
    path = tmp_path / "one.onnx"
    onnx.save(_one_conv(), path)
    data = np.random.default_rng(4).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=data)
    _, report = quantize_model(path, "tensorrt", CalibrateOptions(  # a 3-channel conv
        data=tmp_path / "d.npz", eval_data=tmp_path / "d.npz", analysis="full",
        backend_options={"int8_conv_rule": False}))
    errors = {t["tensor"]: t for t in report["analysis"]["tensors"]}
    assert set(errors) == {"x", "w"}
    # x's accumulated SQNR, from the formula: symmetric int8, scale = amax / 127
    scale = np.float32(np.abs(data).max() / 127)
    fq = np.clip(np.round(data / scale), -127, 127) * scale
    expected = 10 * np.log10(np.sum(data.astype(np.float64) ** 2) / np.sum((data - fq) ** 2))
    assert errors["x"]["sqnr_db"] == pytest.approx(expected, abs=0.01)


# -- state inputs (batch on axis 1) and a scalar input ------------------------------------


@pytest.fixture(scope="module")
def lstm_model(tmp_path_factory):
    import torch

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 16)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x, h, c, scale):
            y, (h2, c2) = self.lstm(x, (h, c))
            return self.head(y[-1]) * scale, h2, c2

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("lstm") / "lstm.onnx"
    return _export(
        Recurrent(), (torch.randn(4, 1, 8), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16),
                      torch.tensor(2.0)), path,
        input_names=["x", "h", "c", "scale"], output_names=["y", "h_out", "c_out"],
        dynamic_axes={"x": {1: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                      "y": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}})


def _lstm_data(path, rows=6):
    rng = np.random.default_rng(6)
    arrays = {"x": rng.standard_normal((4, rows, 8)).astype(np.float32),
              "h": rng.standard_normal((1, rows, 16)).astype(np.float32),
              "c": rng.standard_normal((1, rows, 16)).astype(np.float32),
              "scale": np.array(2.0, np.float32)}
    np.savez(path, **arrays)
    return arrays


def test_lstm_state_and_scalar_inputs(lstm_model, tmp_path):
    from qtool.calibration import calibrate
    from qtool.calibration.data import load_data

    from qtool.scheme import QuantScheme

    data = load_data(_write_lstm(tmp_path), lstm_model)
    assert {s.name: s.batch_axis for s in data.specs} == {"x": 1, "h": 1, "c": 1,
                                                           "scale": None}
    arrays = dict(np.load(tmp_path / "lstm.npz"))
    sym = QuantScheme(bits=8, signed=True, symmetric=True)
    ranges = calibrate(lstm_model, {"y": sym, "h_out": sym}, data, batch_size=4)
    # reference: the whole data set in one run, as the model takes it
    y, h_out, _ = _session(lstm_model).run(None, arrays)
    assert ranges["y"] == pytest.approx((y.min(), y.max()), rel=1e-5)
    assert ranges["h_out"] == pytest.approx((h_out.min(), h_out.max()), rel=1e-5)


def _write_lstm(tmp_path):
    _lstm_data(tmp_path / "lstm.npz")
    return tmp_path / "lstm.npz"


def test_lstm_calibrates_end_to_end_with_declared_axes(lstm_model, tmp_path):
    data = _write_lstm(tmp_path)
    out = tmp_path / "out"
    result = _invoke("calibrate", lstm_model, "-b", "snpe", "--data", data, "--eval-data", data,
                     "--analysis", "full", "--input-axis", "h=1", "--input-axis", "scale=none",
                     "-o", out)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "almost nothing was quantized" in report  # the LSTM's weights stay float
    import json

    summary = json.loads((out / "report.json").read_text())
    assert summary["evaluation"]["samples"] == 6  # rows along axis 1, not the 4 time steps
    assert summary["analysis"]["samples"] == 6
    bad = _invoke("calibrate", lstm_model, "-b", "snpe", "--input-axis", "h", "-o", out)
    assert bad.exit_code == 2 and "NAME=AXIS" in bad.output


def test_random_inputs_for_a_scalar_input(lstm_model):
    from qtool.calibration.data import RandomData

    samples = list(RandomData(lstm_model, num_samples=3))
    assert samples[0]["scale"].shape == () and samples[0]["x"].shape == (4, 1, 8)
    assert samples[0]["scale"] == samples[2]["scale"]  # one value for every sample


# -- compute in subgraph bodies -----------------------------------------------------------


@pytest.fixture(scope="module")
def if_model(tmp_path_factory):
    import torch

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.a2 = torch.nn.Linear(8, 4)
            self.b = torch.nn.Linear(8, 8)
            self.b2 = torch.nn.Linear(8, 4)

        def forward(self, x, sr):
            if sr > 8000:
                return self.a2(torch.relu(self.a(x)))
            return self.b2(torch.relu(self.b(x)))

    torch.manual_seed(7)
    scripted = torch.jit.script(Branches().eval())
    path = tmp_path_factory.mktemp("if") / "if.onnx"
    return _export(scripted, (torch.randn(1, 8), torch.tensor(16000)), path,
                   input_names=["x", "sr"], dynamic_axes={"x": {0: "batch"}})


def test_if_wrapped_model_is_quantized_inside_its_branches(if_model, tmp_path):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, sr=np.array(16000, np.int64))
    files, report = quantize_model(if_model, "tensorrt",
                                   CalibrateOptions(data=tmp_path / "d.npz"))
    quant = onnx.load_from_string(files["model.qdq.onnx"])
    branch = next(n for n in quant.graph.node if n.op_type == "If").attribute
    taken = next(a.g for a in branch if a.name == "then_branch")  # sr > 8000
    ops = [n.op_type for n in taken.node]
    # two weights and the hidden activation (Q and DQ), all inside the body
    assert ops.count("DequantizeLinear") == 3 and ops.count("QuantizeLinear") == 1
    # the hidden activation's range, computed here: relu(a.weight @ x + a.bias) over the data
    float_graph = onnx.load(if_model)
    values = {i.name: numpy_helper.to_array(i) for i in float_graph.graph.initializer}
    then = next(a.g for n in float_graph.graph.node if n.op_type == "If"
                for a in n.attribute if a.name == "then_branch")
    values.update({i.name: numpy_helper.to_array(i) for i in then.initializer})
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                   for n in then.node if n.op_type == "Constant"})
    gemm = next(n for n in then.node if n.op_type == "Gemm")
    relu = next(n for n in then.node if n.op_type == "Relu")
    y = np.maximum(x @ values[gemm.input[1]].T + values[gemm.input[2]], 0)
    scale = next(numpy_helper.to_array(i) for i in taken.initializer
                 if i.name == f"{relu.output[0]}_scale")
    assert float(scale) == pytest.approx(float(np.abs(y).max()) / 127, rel=1e-6)  # amax/127
    # the else branch (sr <= 8000) never ran: its second Gemm stays float, the report says why
    unreached = [n for n, why in report["plan"]["float_nodes"].items() if "never computed" in why]
    assert unreached == ["/b2/Gemm"]
    assert report["evaluation"]["outputs"][0]["sqnr_db"] > 25


def test_if_model_that_quantizes_nothing_warns_loudly(if_model, tmp_path):
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 8)).astype(np.float32),
             sr=np.array(16000, np.int64))
    out = tmp_path / "out"
    result = _invoke("calibrate", if_model, "-b", "tensorrt", "--data", tmp_path / "d.npz",
                     "--skip", "Gemm", "-o", out)
    assert result.exit_code == 0, result.output
    assert "nothing was quantized" in result.output
    assert "inside If/Loop/Scan bodies" in (out / "report.md").read_text()


# -- lint and inspect on odd but valid models ---------------------------------------------


def _max_floor_model(floor):
    weight = np.ones((4, 4), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Max", ["m", "floor"], ["y"], name="floor_max")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(np.array(floor, np.float32), "floor")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_lint_ignores_a_float_only_inf_constant():
    from qtool.lint import lint_model

    found = [f for f in lint_model(_max_floor_model(-np.inf)).findings if f.rule_id == "QT006"]
    assert found == []
    model = _max_floor_model(0.0)
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))
    found = [f.tensor for f in lint_model(model).findings if f.rule_id == "QT006"]
    assert found == ["w"]


def test_inspect_marks_a_com_microsoft_node(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("Gelu", ["a"], ["y"], name="gelu", domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "ms.onnx")
    result = _invoke("inspect", tmp_path / "ms.onnx")
    assert result.exit_code == 0, result.output
    assert "input  x: float[1, 4]" in result.output
    assert "node gelu (com.microsoft.Gelu) is outside the default ONNX domain" in result.output


# -- errors in later phases ---------------------------------------------------------------


def test_oversized_constant_is_refused_at_load(tmp_path):
    shape = helper.make_node("Constant", [], ["s"],
                             value=numpy_helper.from_array(np.array([10000, 1000000], np.int64)))
    graph = helper.make_graph(
        [shape,
         helper.make_node("ConstantOfShape", ["s"], ["big"], name="fill",
                          value=numpy_helper.from_array(np.array([1.0], np.float32))),
         helper.make_node("ReduceSum", ["big"], ["r"], keepdims=0),
         helper.make_node("Add", ["x", "r"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx").stat().st_size < 300
    result = _invoke("calibrate", tmp_path / "big.onnx", "-b", "tvm", "-o", tmp_path / "o")
    assert result.exit_code == InvalidModelError.exit_code
    assert "node fill (ConstantOfShape) would take 37.3 GiB" in result.output
    assert not (tmp_path / "o").exists()


def test_analysis_maps_onnxruntime_failures(tmp_path):
    from qtool.backends import get_backend

    from qtool.analysis.tensors import tensor_errors
    from qtool.io import load
    from qtool.qdq import quantize

    graph = load(_one_conv(batch=1))
    result = quantize(graph, get_backend("tensorrt", int8_conv_rule=False), {"x": (-3.0, 3.0)})
    wrong = [{"x": np.zeros((1, 3, 9, 9), np.float32)}]
    with pytest.raises(DataError, match="on analysis batch 0"):
        tensor_errors(graph, result, wrong)


def test_if_model_through_auto_fallback_and_compare(if_model, tmp_path):
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 8)).astype(np.float32),
             sr=np.array(16000, np.int64))
    _, report = quantize_model(if_model, "tvm", CalibrateOptions(
        data=tmp_path / "d.npz", method="auto", target_sqnr=60.0))
    floats = report["plan"]["float_nodes"]
    assert "never computed" in floats["/b2/Gemm"]
    assert report["analysis"]["fallback"]["met"]
    result = _invoke("compare", if_model, "--data", tmp_path / "d.npz", "-b", "tvm",
                     "-m", "minmax", "--no-sweep")
    assert result.exit_code == 0, result.output


def test_an_lstm_state_nothing_reads_does_not_break_the_tensor_analysis(tmp_path):
    """silero-vad's wrapper: the LSTM's hidden and cell outputs feed nothing."""
    import json

    import torch

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
            self.head = torch.nn.Linear(16, 2)

        def forward(self, x):
            y, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
            return torch.sigmoid(self.head(y))

    torch.manual_seed(7)
    model = _export(Recurrent(), (torch.randn(1, 4, 10),), tmp_path / "rnn.onnx",
                    input_names=["x"], output_names=["p"])
    lstm = next(n for n in onnx.load(model).graph.node if n.op_type == "LSTM")
    assert len(lstm.output) == 3  # the state outputs are there, read by nothing
    np.savez(tmp_path / "d.npz",
             x=np.random.default_rng(0).standard_normal((6, 4, 10)).astype(np.float32))
    out = tmp_path / "out"
    result = _invoke("calibrate", model, "-b", "snpe", "--data", tmp_path / "d.npz",
                     "--batch-size", "1", "--analysis", "full", "-o", out)
    assert result.exit_code == 0, result.output
    tensors = {t["tensor"]: t for t in json.loads((out / "report.json").read_text())
               ["analysis"]["tensors"]}
    assert tensors[lstm.output[1]]["sqnr_db"] is None  # planned, no Q/DQ pair: not judged
    assert all(t["sqnr_db"] is not None for name, t in tensors.items()
               if name not in lstm.output[1:])
