"""unshare_initializers (qtool.passes.unshare): one bias per layer, the function unchanged;
and the passes that edit biases per layer (CLE, bias correction) no longer skip the layers
whose equal biases cleanup merged."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from qdq_helpers import run

import qtool
from qtool.io import serialize
from qtool.workflow import CalibrateOptions, prepare, quantize_model

torch = pytest.importorskip("torch")
nn = torch.nn


def _zero_bias_mlp(dynamic_batch: bool = False) -> bytes:
    """Tokens x features through three Linear layers (MatMul + Add, as HF exports them) whose
    biases are all zero, as in a freshly initialised transformer."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 16))
    with torch.no_grad():
        for layer in mlp[::2]:
            layer.bias.zero_()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mlp.eval(), torch.zeros(1, 6, 8), buffer, opset_version=13,
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}} if dynamic_batch else None)
    return buffer.getvalue()


def _bias_names(graph) -> list[str]:
    adds = [n.outputs[0].outputs[0] for n in graph.nodes if n.op == "MatMul"]
    return [next(t.name for t in add.inputs if not t.inputs) for add in adds]


def test_unshare_gives_each_layer_its_bias_and_keeps_the_function():
    graph, _ = prepare(qtool.load(_zero_bias_mlp()))
    assert len(set(_bias_names(graph))) == 1  # cleanup merged the three zero biases
    weights = [n.inputs[1].name for n in graph.nodes if n.op == "MatMul"]
    x = {"x": np.random.default_rng(0).standard_normal((1, 6, 8)).astype(np.float32)}
    expected = run(graph, x)[0]
    unshared, reports = qtool.Pipeline(["unshare_initializers"]).run(
        qtool.load(serialize(graph)))
    assert reports[0].changed and "2 shared layer constants copied" in reports[0].summary()
    assert len(set(_bias_names(unshared))) == 3
    assert [n.inputs[1].name for n in unshared.nodes if n.op == "MatMul"] == weights
    np.testing.assert_array_equal(run(unshared, x)[0], expected)
    _, again = qtool.Pipeline(["unshare_initializers"]).run(unshared)
    assert not again[0].changed


def test_bias_correction_corrects_layers_whose_zero_biases_were_merged(tmp_path):
    model = tmp_path / "mlp.onnx"
    model.write_bytes(_zero_bias_mlp(dynamic_batch=True))
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((64, 6, 8)).astype(np.float32))
    _, report = quantize_model(model, "tensorrt", CalibrateOptions(data=str(data)))
    assert len(report["bias_correction"]["layers"]) == 3
