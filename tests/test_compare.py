"""qtool compare: table cells equal a direct quantize-and-run; sizes and BOPs counted by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from outlier_model import CALIB, DIGITS, VAL
from qtool.calibration import calibrate, load_data
from qtool.cli import main

from qtool.analysis import layers_of
from qtool.analysis.compare import compare, layer_macs, model_cost
from qtool.io import load, serialize
from qtool.planner import build_plan
from qtool.prepare import prepare
from qtool.qdq import quantize

# Spatial size of each weighted layer's output in the digits CNN (8x8 input, one MaxPool
# before mix, GlobalAveragePool before the Gemm), from examples/train_digits.py.
OUTPUT_PIXELS = {
    "/stem/stem.0/stem.0.0/Conv": 64,
    "/res/res.0/res.0.0/Conv": 64,
    "/res/res.2/res.2.0/Conv": 64,
    "/branch1/branch1.0/branch1.0.0/Conv": 64,
    "/branch3/branch3.0/branch3.0.0/Conv": 64,
    "/mix/mix.0/mix.0.0/Conv": 16,
    "/head/head.2/Gemm": 1,
}


@pytest.fixture(scope="module")
def result():
    # the sweep on academic (graph 1): every weighted layer quantized, as the counts below
    # assume (tensorrt keeps the digits CNN's 8-channel convs float: its int8_conv_rule)
    return compare(DIGITS, CALIB, eval_data=VAL, backends=["tensorrt", "snpe"],
                   methods=["minmax", "mse"], precisions=("W8A8", "W4A4", "mixed"),
                   sweep_backend="academic")


def _run(graph, inputs):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(serialize(graph), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": inputs})[0]


def test_cells_equal_a_direct_quantize_and_run(result):
    graph, _ = prepare(load(DIGITS))
    data = np.load(VAL)
    x = _run(graph, data["input"]).astype(np.float64)
    assert result.float_accuracy == pytest.approx(np.mean(x.argmax(1) == data["labels"]))
    samples = load_data(CALIB, graph)
    for backend in ("tensorrt", "snpe"):
        for method in ("minmax", "mse"):
            plan = build_plan(graph, backend)
            ranges = calibrate(graph, plan.activation_schemes(), samples, method=method)
            q = _run(quantize(graph, backend, ranges, plan=plan).graph, data["input"])
            cell = result.cell(backend, method)
            assert cell.error is None
            sqnr = 10 * math.log10(np.sum(x * x) / np.sum((x - q) ** 2))
            assert cell.sqnr_db == pytest.approx(sqnr, rel=1e-6)
            assert cell.accuracy == pytest.approx(np.mean(q.argmax(1) == data["labels"]))
    assert result.samples == len(data["labels"])


def test_sizes_and_bit_operations_are_counted_by_hand(result):
    graph, _ = prepare(load(DIGITS))
    weights = {n.name: n.inputs[1] for n in graph.nodes if n.name in OUTPUT_PIXELS}
    biases = {n.name: n.inputs[2] for n in graph.nodes if n.name in OUTPUT_PIXELS}
    # MACs = output pixels x output channels x (inputs per output: C_in * kh * kw).
    macs = {}
    for name, w in weights.items():
        shape = w.shape
        if len(shape) == 4:
            macs[name] = OUTPUT_PIXELS[name] * shape[0] * shape[1] * shape[2] * shape[3]
        else:  # Gemm with transB: [out, in]
            macs[name] = shape[0] * shape[1]
    assert layer_macs(graph) == macs
    weight_count = sum(int(np.prod(w.shape)) for w in weights.values())
    bias_count = sum(int(np.prod(b.shape)) for b in biases.values())
    rows = {r.precision: r for r in result.sweep}
    assert list(rows) == ["FP32", "W8A8", "W4A4", "mixed"]
    total = sum(macs.values())
    assert rows["FP32"].size_bytes == 4 * (weight_count + bias_count)
    assert rows["FP32"].bops == total * 32 * 32
    # academic quantizes every weighted layer's input and weight.
    assert rows["W8A8"].size_bytes == weight_count + 4 * bias_count
    assert rows["W8A8"].bops == total * 8 * 8
    assert rows["W4A4"].size_bytes == math.ceil(weight_count / 2) + 4 * bias_count
    assert rows["W4A4"].bops == total * 4 * 4
    mixed = rows["mixed"]
    eight = mixed.eight_bit_layers
    layers = layers_of(build_plan(graph, "academic"))  # every node reading a quantized input
    assert 1 <= len(eight) == math.ceil(len(layers) / 4)
    # A weighted layer's weight is 8-bit if it is raised; its input activation is 8-bit if any
    # raised layer reads that same tensor (one tensor, one scale).
    readers = {n.name: {c.name for c in n.inputs[0].outputs} for n in graph.nodes}
    assert mixed.bops == sum(
        m * (8 if name in eight else 4) * (8 if readers[name] & set(eight) else 4)
        for name, m in macs.items()
    )
    assert rows["W4A4"].bops < mixed.bops < rows["W8A8"].bops
    assert mixed.sqnr_db > rows["W4A4"].sqnr_db
    assert rows["FP32"].accuracy == result.float_accuracy
    # A plan-free cost is the FP32 cost.
    assert model_cost(graph, None, macs) == (rows["FP32"].size_bytes, rows["FP32"].bops)


def test_render_formats(result):
    text = result.render()
    assert "backend" in text and "tensorrt" in text and "BOPs" in text
    markdown = result.render("markdown")
    assert "| backend | minmax | mse |" in markdown
    cell = result.cell("snpe", "mse")
    assert f"| snpe | {result.cell('snpe', 'minmax').sqnr_db:.2f}" in markdown
    assert f"{cell.sqnr_db:.2f} ({100 * cell.accuracy:.2f}%)" in markdown
    assert json.loads(result.render("json"))["backends"] == ["tensorrt", "snpe"]


def test_compare_cli_json(result, tmp_path):
    out = tmp_path / "table.json"
    run = CliRunner().invoke(main, [
        "compare", str(DIGITS), "--data", str(CALIB), "--eval-data", str(VAL),
        "-b", "tensorrt", "-m", "minmax", "--no-sweep", "--format", "json", "-o", str(out),
    ])
    assert run.exit_code == 0, run.output
    table = json.loads(out.read_text())
    assert table["sweep"] == [] and len(table["cells"]) == 1
    assert table["cells"][0]["sqnr_db"] == pytest.approx(
        result.cell("tensorrt", "minmax").sqnr_db, rel=1e-5)
