"""SmoothQuant (qtool.passes.smoothquant, qtool.smoothing) and transformer recognition.

References the code did not produce: onnxruntime runs of the float model before and after the
pass (the pass must not change the function), numpy for the channel statistics, and the SQNR
formula ``10 log10(sum y^2 / sum (y - q)^2)`` computed here on held-out data.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from qtool.calibration.collector import channel_absmax

from qtool.io import load, serialize
from qtool.passes.smoothquant import channel_ratio, smooth
from qtool.smoothing import parse_smoothquant
from qtool.transformer_patterns import find_transformer_blocks
from qtool.workflow import CalibrateOptions, prepare, quantize_model

OUTLIERS = [3, 50, 101, 200]


def _run(model, feeds):
    data = model if isinstance(model, bytes) else serialize(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _sqnr(reference: np.ndarray, test: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - test) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def _mlp(path, seed=0):
    """256 -> 512 -> ReLU -> 256, as the issue's MLP block."""
    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.standard_normal((256, 512)) / 16, "b1": rng.standard_normal(512) * 0.1,
              "w2": rng.standard_normal((512, 256)) / np.sqrt(512),
              "b2": rng.standard_normal(256) * 0.1}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _outlier_inputs(rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)
    x[:, OUTLIERS] *= 40  # 4 activation channels 40x larger than the rest
    return x


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    _mlp(folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=_outlier_inputs(256, 1))
    np.savez(folder / "val.npz", x=_outlier_inputs(128, 2))
    return folder


def _heldout_sqnr(folder, files) -> float:
    x = np.load(folder / "val.npz")["x"]
    (reference,) = _run((folder / "mlp.onnx").read_bytes(), {"x": x})
    (quantized,) = _run(files["model.qdq.onnx"], {"x": x})
    return _sqnr(reference, quantized)


def test_smoothquant_gains_6db_over_plain_w8a8_on_the_mlp(mlp_files):
    def run(setting):
        options = CalibrateOptions(data=str(mlp_files / "calib.npz"),
                                   eval_data=str(mlp_files / "val.npz"), smoothquant=setting)
        return quantize_model(str(mlp_files / "mlp.onnx"), "onnxruntime", options)

    plain_files, plain = run("off")
    smooth_files, smoothed = run("search")
    gain = _heldout_sqnr(mlp_files, smooth_files) - _heldout_sqnr(mlp_files, plain_files)
    assert gain >= 6.0, gain
    choice = smoothed["transformer"]["smoothquant"]
    assert choice["mode"] == "search" and choice["alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert set(choice["scores_db"]) == {"0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    assert plain["transformer"]["smoothquant"]["mode"] == "off"
    assert smoothed["transformer"]["bias_correction"] is None  # no transformer: corrected
    assert smoothed["bias_correction"]["layers"]
    # the input cannot fold (a graph input): an explicit Mul reads x in float, and the
    # MatMul reads its quantized output
    model = onnx.load_from_string(smooth_files["model.qdq.onnx"])
    (mul,) = [n for n in model.graph.node if n.op_type == "Mul"]
    assert list(mul.input)[0] == "x"
    readers = [n for n in model.graph.node if mul.output[0] in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"]
    assert mul.name in smoothed["plan"]["float_nodes"]
    # only the outlier input is smoothed: ReLU's output has none and cannot fold
    assert [s["tensor"] for s in choice["smoothed"]] == ["x"]


def test_a_given_alpha_is_applied_as_is(mlp_files):
    options = CalibrateOptions(data=str(mlp_files / "calib.npz"),
                               eval_data=str(mlp_files / "val.npz"), smoothquant=0.5,
                               bias_correction=False, kernel_check=False)
    _, report = quantize_model(str(mlp_files / "mlp.onnx"), "onnxruntime", options)
    choice = report["transformer"]["smoothquant"]
    assert (choice["mode"], choice["alpha"], choice["scores_db"]) == ("alpha", 0.5, {})
    (smoothed,) = choice["smoothed"]
    x = np.concatenate([np.load(mlp_files / "calib.npz")["x"]])
    x_max = np.abs(x).max(axis=0)
    w1 = onnx.numpy_helper.to_array(
        next(t for t in onnx.load(mlp_files / "mlp.onnx").graph.initializer if t.name == "w1"))
    s = np.sqrt(x_max) / np.sqrt(np.abs(w1).max(axis=1))  # the formula at alpha 0.5
    assert smoothed["channel_ratio_before"] == pytest.approx(channel_ratio(x_max), rel=1e-3)
    assert smoothed["channel_ratio_after"] == pytest.approx(channel_ratio(x_max / s), rel=1e-3)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc"])
def test_bad_alpha_is_a_plan_error(value):
    from qtool.errors import PlanError

    with pytest.raises(PlanError, match="alpha"):
        parse_smoothquant(value)


def test_channel_absmax_matches_numpy(mlp_files):
    x = _outlier_inputs(40, 7)
    graph, _ = prepare(load(mlp_files / "mlp.onnx"))
    stats = channel_absmax(graph, ["x", "r"], [{"x": row[None]} for row in x], batch_size=16)
    np.testing.assert_allclose(stats["x"], np.abs(x).max(axis=0), rtol=1e-6)
    (hidden,) = _run(_with_output(mlp_files / "mlp.onnx", "r"), {"x": x})[1:]
    np.testing.assert_allclose(stats["r"], np.abs(hidden).max(axis=0), rtol=1e-5)


def _with_output(path, name):
    model = onnx.load(path)
    model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model.SerializeToString()


# --- exactness of the folds, on a transformer block as torch exports it ----------------------

torch = pytest.importorskip("torch")


class _Block(torch.nn.Module):
    """A BERT-style encoder block: LayerNorm, attention, residuals, GELU MLP."""

    def __init__(self, d=64, heads=4, ffn=128):
        super().__init__()
        nn = torch.nn
        self.heads, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.f1, self.f2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, self.dh).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.f2(torch.nn.functional.gelu(self.f1(self.ln2(x))))


def _block_model(opset: int) -> bytes:
    torch.manual_seed(0)
    block = _Block().eval()
    with torch.no_grad():  # trained transformers' outlier features come from LayerNorm's gamma
        block.ln1.weight[[5, 17, 40, 60]] *= 30
        block.ln2.weight[[2, 33]] *= 30
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, torch.randn(1, 16, 64), buffer, opset_version=opset,
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}})
    return buffer.getvalue()


def _block_inputs(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16, 64)).astype(np.float32)


@pytest.mark.parametrize("opset", [13, 17])  # LayerNorm decomposed at 13, one op at 17
def test_folds_into_layernorm_exactly(opset):
    data = _block_model(opset)
    graph, _ = prepare(load(data))
    x = _block_inputs(8, 0)
    readers = {n.inputs[0].name for n in graph.nodes if n.op == "MatMul"
               and isinstance(n.inputs[1], gs.Constant)}
    stats = channel_absmax(graph, readers, [{"x": row[None]} for row in x], batch_size=4)
    smoothed, done = smooth(graph, stats, 0.5, explicit=set())
    # ln1 -> q, k, v (one s for all three); ln2 -> f1; GELU's last op (as torch writes it
    # with Erf) is a Mul by 0.5, which takes 1/s too -> f2
    readers = sorted(sorted(s.readers) for s in done)
    assert readers == [["/f1/MatMul"], ["/f2/MatMul"], ["/k/MatMul", "/q/MatMul", "/v/MatMul"]]
    assert all(s.mul is None and s.folded_into for s in done)
    assert not any(n.op == "Mul" and n.name.endswith("_smoothquant") for n in smoothed.nodes)
    for s in done:  # the LayerNorms' outlier channels are evened out
        if s.ratio_before > 10:
            assert s.ratio_after < s.ratio_before / 3
    (before,) = _run(data, {"x": x})
    (after,) = _run(smoothed, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_explicit_mul_where_a_residual_also_reads_the_tensor():
    data = _block_model(17)
    graph, _ = prepare(load(data))
    # the attention's out-projection reads a Reshape: no exact fold, an explicit Mul
    target = next(n for n in graph.nodes if n.op == "MatMul" and n.inputs[0].inputs
                  and n.inputs[0].inputs[0].op == "Reshape")
    x = _block_inputs(8, 1)
    stats = channel_absmax(graph, [target.inputs[0].name], [{"x": row[None]} for row in x],
                           batch_size=4)
    smoothed, (done,) = smooth(graph, stats, 0.5)
    assert done.mul is not None and not done.folded_into
    (before,) = _run(data, {"x": x})
    (after,) = _run(smoothed, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("opset", [13, 17])
def test_transformer_blocks_are_recognised(opset):
    graph, _ = prepare(load(_block_model(opset)))
    blocks = find_transformer_blocks(graph)
    assert (len(blocks.attention), len(blocks.layernorm), len(blocks.gelu)) == (1, 2, 1)
    assert len(blocks.residual_adds) == 1  # x + attention feeds ln2; the last Add is the output
    assert blocks.is_transformer
    mlp = gs.Graph()
    assert not find_transformer_blocks(mlp).is_transformer


def test_transformer_default_smooths_outlier_layernorms(tmp_path):
    (tmp_path / "block.onnx").write_bytes(_block_model(17))
    np.savez(tmp_path / "calib.npz", x=_block_inputs(48, 2))
    np.savez(tmp_path / "val.npz", x=_block_inputs(24, 3))
    options = CalibrateOptions(data=str(tmp_path / "calib.npz"),
                               eval_data=str(tmp_path / "val.npz"), kernel_check=False)
    files, report = quantize_model(str(tmp_path / "block.onnx"), "onnxruntime", options)
    section = report["transformer"]
    assert section["blocks"]["attention"] == 1
    choice = section["smoothquant"]
    assert choice["mode"] == "default"
    assert "off" in choice["scores_db"] and choice["alpha"] is not None
    assert choice["scores_db"][f"{choice['alpha']:g}"] >= choice["scores_db"]["off"] + 0.1
    # every linear layer's input is smoothed (as NNCF's transformer mode does), 1/s folded
    # into the LayerNorms and GELU's Mul; the out-projection reads the attention's Reshape,
    # which cannot fold: an explicit Mul, kept float, though that input has no outliers
    smoothed = {r: s for s in choice["smoothed"] for r in s["readers"]}
    assert sorted(smoothed) == ["/f1/MatMul", "/f2/MatMul", "/k/MatMul", "/o/MatMul",
                                "/q/MatMul", "/v/MatMul"]
    assert smoothed["/o/MatMul"]["mul"] and not smoothed["/o/MatMul"]["folded_into"]
    assert smoothed["/o/MatMul"]["tensor"] not in choice["outlier_tensors"]
    assert report["plan"]["float_nodes"][smoothed["/o/MatMul"]["mul"]].startswith("SmoothQuant")
    for reader in ("/q/MatMul", "/f1/MatMul", "/f2/MatMul"):
        assert smoothed[reader]["folded_into"] and smoothed[reader]["mul"] is None
    # the default's bias correction is not run on a transformer, and the report says why
    assert section["bias_correction"].startswith("transformer:")
    assert not report.get("bias_correction")
    add_reason = {n: why for n, why in report["plan"]["float_nodes"].items()
                  if why.startswith("transformer:")}
    assert any("Add" in n for n in add_reason)  # the residual stream stays float
    x = _block_inputs(24, 3)
    (reference,) = _run(_block_model(17), {"x": x})
    (quantized,) = _run(files["model.qdq.onnx"], {"x": x})
    off_files, _ = quantize_model(str(tmp_path / "block.onnx"), "onnxruntime",
                                  CalibrateOptions(data=options.data, eval_data=options.eval_data,
                                                   kernel_check=False, smoothquant="off"))
    (plain,) = _run(off_files["model.qdq.onnx"], {"x": x})
    assert _sqnr(reference, quantized) > _sqnr(reference, plain)


class _MaskedBlock(_Block):
    """The block with padding: ``-inf`` added to the scores of padded keys, as transformers
    (5.x, SDPA masks) exports it."""

    def forward(self, x, mask):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, self.dh).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        bias = torch.where(mask[:, None, None, :] > 0, 0.0, float("-inf"))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5 + bias, dim=-1) @ v
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


def test_attention_mask_with_inf_is_kept_float(tmp_path):
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_MaskedBlock().eval(), (torch.randn(1, 16, 64), torch.ones(1, 16)),
                          buffer, opset_version=17, dynamo=False, input_names=["x", "mask"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "mask": {0: "b"}})
    (tmp_path / "masked.onnx").write_bytes(buffer.getvalue())
    rng = np.random.default_rng(4)
    mask = (np.arange(16)[None, :] < rng.integers(6, 17, size=(40, 1))).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=_block_inputs(40, 4), mask=mask)
    files, report = quantize_model(str(tmp_path / "masked.onnx"), "onnxruntime",
                                   CalibrateOptions(data=str(tmp_path / "data.npz"),
                                                    kernel_check=False))
    assert report["transformer"]["blocks"]["mask_adds"] == 1
    (mask_add,) = [n for n, why in report["plan"]["float_nodes"].items()
                   if why.startswith("attention mask Add")]
    model = onnx.load_from_string(files["model.qdq.onnx"])
    node = next(n for n in model.graph.node if n.name == mask_add)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert "DequantizeLinear" not in {producers.get(i) for i in node.input}
    assert report["evaluation"]["outputs"][0]["sqnr_db"] > 20


def test_bias_correction_named_on_the_command_line_runs_on_a_transformer(tmp_path):
    """The default skips the correction on a transformer; ``--bias-correction exact`` does not."""
    import json

    from click.testing import CliRunner
    from qtool.cli import main

    (tmp_path / "block.onnx").write_bytes(_block_model(17))
    np.savez(tmp_path / "calib.npz", x=_block_inputs(48, 2))
    reports = {}
    for name, flags in (("default", []), ("named", ["--bias-correction", "exact"])):
        out = tmp_path / name
        result = CliRunner().invoke(main, [
            "calibrate", str(tmp_path / "block.onnx"), "-b", "onnxruntime", "--data",
            str(tmp_path / "calib.npz"), "--smoothquant", "off", "--analysis", "none",
            "-o", str(out), *flags])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((out / "report.json").read_text())
    assert reports["default"]["transformer"]["bias_correction"].startswith("transformer:")
    assert not reports["default"].get("bias_correction")
    assert reports["named"]["transformer"]["bias_correction"] is None
    assert reports["named"]["bias_correction"]["layers"]
