"""Weight-only int4/int8 (qtool.weight_only) and FP8 Q/DQ (qtool.fp8), checked on a fitted
MLP block against formats decoded here from their specs and against onnxruntime's own
``MatMulNBitsQuantizer``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from mlp_block import inputs, mlp_onnx
from qtool.cli import main

from qtool.weight_only.formats import BlockFormat, pack_nibbles
from qtool.weight_only.gptq import gptq
from qtool.weight_only.rtn import rtn, search_grid, weighted_error


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    model = folder / "mlp.onnx"
    model.write_bytes(mlp_onnx())
    np.savez(folder / "calib.npz", x=inputs(1024, seed=10))
    np.savez(folder / "val.npz", x=inputs(256, seed=11))
    return folder


def run(model, x, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def sqnr(ref, out):
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


def calibrate(mlp, out, *flags):
    result = CliRunner().invoke(main, [
        "calibrate", str(mlp / "mlp.onnx"), "--data", str(mlp / "calib.npz"),
        "--eval-data", str(mlp / "val.npz"), "-o", str(out), *flags])
    return result


def decode_matmul_nbits(node, values):
    """W [K, N] of a 4-bit MatMulNBits, from onnxruntime's contrib-op spec."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    packed = values[node.input[1]]  # [N, blocks, block * bits / 8]
    four = attrs["bits"] == 4
    levels = (np.stack([packed & 0x0F, packed >> 4], axis=-1) if four else packed).reshape(
        n, -1, block)
    scales = values[node.input[2]].reshape(n, -1)
    if len(node.input) > 3 and node.input[3]:
        zp = values[node.input[3]]
        zero = (np.stack([zp & 0x0F, zp >> 4], axis=-1) if four else zp).reshape(n, -1)
        zero = zero[:, :levels.shape[1]]
    else:
        zero = np.full(scales.shape, 8 if four else 128)
    w = (levels.astype(np.float32) - zero[:, :, None]) * scales[:, :, None]
    return w.reshape(n, k).T


def test_mlp_int4_beats_onnxruntime_matmul_nbits_quantizer(mlp, tmp_path):
    pytest.importorskip("onnx_ir")  # onnxruntime's quantizer imports it
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    result = calibrate(mlp, tmp_path / "out", "-b", "onnxruntime", "--weight-only",
                       "--weight-bits", "4", "--block-size", "32")
    assert result.exit_code == 0, result.output
    written = tmp_path / "out" / "model.onnx"
    float_size = (mlp / "mlp.onnx").stat().st_size
    assert written.stat().st_size <= 0.25 * float_size
    model = onnx.load(written)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(n.domain == "com.microsoft" for n in nbits)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not any(v.dtype == np.float32 and v.size >= 256 * 32 for v in values.values())

    x = inputs(256, seed=11)
    ref = run(mlp / "mlp.onnx", x)
    ours = run(written, x)
    np.testing.assert_allclose(run(written, x, optimize=False), ours, rtol=1e-4, atol=1e-4)
    # the packed bytes decode (per the contrib-op spec) to weights that give the same output
    first = nbits[0]
    decoded = decode_matmul_nbits(first, values)
    session_out = run(written, x)  # noqa: F841  (kept: the graph ran with these bytes)
    product = ort.InferenceSession(_matmul_model(decoded).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    hidden = run(_prefix_model(model, first), x)
    np.testing.assert_allclose(hidden, product.run(None, {"a": _input_of(model, first, x)})[0],
                               rtol=1e-3, atol=1e-3)

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(mlp / "mlp.onnx"), block_size=32,
                                     is_symmetric=True, algo_config=config)
    quantizer.process()
    theirs = run(quantizer.model.model.SerializeToString(), x)
    assert sqnr(ref, ours) >= sqnr(ref, theirs) + 1.0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["weights"] == {"algorithm": "awq", "bits": 4, "block_size": 32,
                                 "form": "matmulnbits", "symmetric": False}


def _input_of(model, node, x):
    """The value of ``node``'s first input on ``x`` (the graph run up to it)."""
    if node.input[0] == "x":
        return x
    return run(_prefix_model(model, None, node.input[0]), x)


def _prefix_model(model, node, tensor=None):
    """``model`` with ``tensor`` (default: ``node``'s output) as its only output."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.append(onnx.ValueInfoProto(name=tensor or node.output[0]))
    return copy.SerializeToString()


def _matmul_model(weight):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["a", "w"], ["y"])], "mm",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight.astype(np.float32), "w")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("backend, flags, dtype", [
    ("onnxruntime", ["--backend-option", "format=dq"], onnx.TensorProto.UINT4),
    ("tensorrt", [], onnx.TensorProto.INT4),
])
def test_blockwise_dequantize_linear(mlp, tmp_path, backend, flags, dtype):
    result = calibrate(mlp, tmp_path / "out", "-b", backend, "--weight-only",
                       "--block-size", "64", "--weight-algorithm", "rtn", *flags)
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "model.qdq.onnx"
    model = onnx.load(path)
    assert model.opset_import[0].version == 21
    inits = {t.name: t for t in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2
    decoded = {}
    for dq in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 64}
        weight = inits[dq.input[0]]
        assert weight.data_type == dtype
        assert len(weight.raw_data) == np.prod(weight.dims) // 2  # two per byte on disk
        levels = _unpack_int4(weight)
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        assert scale.shape == (weight.dims[0] // 64, weight.dims[1])
        assert (len(dq.input) == 3) == (dtype == onnx.TensorProto.UINT4)
        zero = _unpack_int4(inits[dq.input[2]]) if len(dq.input) == 3 else 0
        decoded[dq.output[0]] = np.repeat(scale, 64, axis=0) * (
            levels - np.repeat(zero, 64, axis=0) if len(dq.input) == 3 else levels)
        assert any(n.op_type == "MatMul" and n.input[1] == dq.output[0]
                   for n in model.graph.node)
    assert path.stat().st_size <= 0.25 * (mlp / "mlp.onnx").stat().st_size
    # the file's levels, decoded here (INT4/UINT4: low nibble first), are what onnxruntime runs
    for name, weight in decoded.items():
        np.testing.assert_allclose(run(_prefix_model(model, None, name), inputs(1, 0)), weight,
                                   rtol=1e-6, atol=1e-6)
    x = inputs(256, seed=11)
    assert sqnr(run(mlp / "mlp.onnx", x), run(path, x, optimize=False)) > 3


def _unpack_int4(tensor):
    """Levels of an INT4/UINT4 initializer, from the ONNX spec (two per byte, low first)."""
    raw = np.frombuffer(tensor.raw_data, np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:int(np.prod(tensor.dims))]
    values = nibbles.astype(np.int16)
    if tensor.data_type == onnx.TensorProto.INT4:
        values = np.where(values > 7, values - 16, values)
    return values.reshape(tuple(tensor.dims)).astype(np.float32)


def test_qnn_lpbq_encodings(mlp, tmp_path):
    result = calibrate(mlp, tmp_path / "out", "-b", "qnn", "--weight-only", "--block-size",
                       "32", "--weight-algorithm", "rtn")
    assert result.exit_code == 0, result.output
    encodings = json.loads((tmp_path / "out" / "model.encodings").read_text())
    assert encodings["version"] == "1.0.0"
    model = onnx.load(tmp_path / "out" / "model.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(encodings["param_encodings"]) == 2
    for enc in encodings["param_encodings"]:
        assert (enc["enc_type"], enc["dtype"], enc["bw"], enc["compressed_bw"],
                enc["is_sym"], enc["block_size"]) == ("LPBQ", "INT", 8, 4, True, 32)
        weight = inits[enc["name"]]  # the float weight beside the encodings, [K, N]
        k, n = weight.shape
        assert len(enc["scale"]) == n and enc["offset"] == [-128] * n
        ints = np.array(enc["per_block_int_scale"]).reshape(k // 32, n)
        assert ints.min() >= 1 and ints.max() <= 16 and (ints.max(axis=0) == 16).all()
        block_scale = np.repeat(ints * np.array(enc["scale"], np.float32), 32, axis=0)
        levels = weight / block_scale
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert levels.min() >= -8 - 1e-3 and levels.max() <= 7 + 1e-3
    x = inputs(256, seed=11)
    ref = run(mlp / "mlp.onnx", x)
    # optimizations off: with them on, onnxruntime fuses DequantizeLinear -> MatMul into
    # MatMulNBits at accuracy level 4 (int8 activations; session.qdq_matmulnbits_accuracy_level)
    np.testing.assert_allclose(run(tmp_path / "out" / "model.qdq.onnx", x, optimize=False),
                               run(tmp_path / "out" / "model.onnx", x), rtol=1e-4, atol=1e-4)
    assert sqnr(ref, run(tmp_path / "out" / "model.onnx", x)) > 3


def test_int8_matmul_nbits(mlp, tmp_path):
    result = calibrate(mlp, tmp_path / "out", "-b", "onnxruntime", "--weight-only",
                       "--weight-bits", "8", "--block-size", "32", "--weight-algorithm", "rtn")
    assert result.exit_code == 0, result.output
    model = onnx.load(tmp_path / "out" / "model.onnx")
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    w1 = decode_matmul_nbits(first, values)  # levels 0..255 about the zero points
    x = inputs(64, seed=11)
    reference = _matmul_model(w1).SerializeToString()
    product = ort.InferenceSession(reference, providers=["CPUExecutionProvider"]).run(
        None, {"a": x})[0]
    np.testing.assert_allclose(run(_prefix_model(model, first), x), product,
                               rtol=1e-3, atol=1e-3)
    assert sqnr(run(mlp / "mlp.onnx", x), run(tmp_path / "out" / "model.onnx", x)) > 15


def test_gemm_weights_and_hqq_without_data(tmp_path):
    model = tmp_path / "gemm.onnx"
    model.write_bytes(mlp_onnx(gemm=True))
    result = CliRunner().invoke(main, ["calibrate", str(model), "-b", "onnxruntime",
                                       "--weight-only", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = onnx.load(tmp_path / "out" / "model.onnx")
    assert [n.op_type for n in written.graph.node].count("MatMulNBits") == 2
    assert "Gemm" not in [n.op_type for n in written.graph.node]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["weights"]["algorithm"] == "hqq"
    x = inputs(64, seed=3)
    assert sqnr(run(model, x), run(tmp_path / "out" / "model.onnx", x)) > 3


@pytest.mark.parametrize("args, message", [
    (["-b", "snpe", "--weight-only"], "no weight-only"),
    (["-b", "tensorrt", "--weight-only", "--weight-bits", "8"], "4-bit"),
    (["-b", "onnxruntime", "--weight-only", "--weight-algorithm", "gptq"], "needs calibration"),
    (["-b", "onnxruntime", "--weight-only", "--backend-option", "format=qoperator"], "format"),
    (["-b", "acl", "--precision", "fp8"], "FP8"),
    (["-b", "onnxruntime", "--weight-only", "--adaround"], "--adaround does not apply"),
    (["-b", "tensorrt", "--precision", "fp8", "--weight-bits", "4"], "does not apply"),
])
def test_refusals(tmp_path, args, message):
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx())
    result = CliRunner().invoke(main, ["calibrate", str(model), *args, "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code in (2, 6), result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_fp8_tensorrt_qdq(mlp, tmp_path):
    result = calibrate(mlp, tmp_path / "out", "-b", "tensorrt", "--precision", "fp8")
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "model.qdq.onnx"
    model = onnx.load(path)
    assert model.opset_import[0].version >= 19
    inits = {t.name: t for t in model.graph.initializer}
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert {"x", "g"} <= {n.input[0] for n in qs}  # both MatMuls' inputs (tensorrt placement)
    assert len(dqs) == len(qs) + 2  # one per activation, and the two weights
    for node in qs + dqs:
        assert inits[node.input[2]].data_type == fp8
        scale = onnx.numpy_helper.to_array(inits[node.input[1]])
        assert scale.dtype == np.float32
    weights = [inits[n.input[0]] for n in dqs if n.input[0] in inits]
    assert len(weights) == 2 and all(w.data_type == fp8 for w in weights)
    x = inputs(256, seed=11)
    ref = run(mlp / "mlp.onnx", x)
    assert sqnr(ref, run(path, x)) >= 25
    assert sqnr(ref, run(path, x, optimize=False)) >= 25


def test_gptq_lowers_the_output_error_of_rtn_on_the_same_grid():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 64)) * np.logspace(-1, 1, 64)
    x[:, 1::2] += 0.5 * x[:, ::2]  # correlated channels: what GPTQ's updates use
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    hessian = x.T @ x / len(x)
    fmt = BlockFormat(4, 32, False)
    grid = search_grid(weight, fmt)
    plain = weighted_error(weight, rtn(weight, fmt, grid).dequantize(), hessian)
    ours = weighted_error(weight, gptq(weight, hessian, fmt, grid).dequantize(), hessian)
    assert ours < 0.9 * plain
    # uncorrelated inputs: nothing to compensate with, GPTQ is RTN (up to the damping)
    identity = gptq(weight, np.eye(64), fmt, grid)
    np.testing.assert_array_equal(identity.levels, rtn(weight, fmt, grid).levels)
    # the error formula is the output error it stands for
    delta = weight - rtn(weight, fmt, grid).dequantize()
    assert np.isclose(plain, np.sum((x @ delta) ** 2) / len(x), rtol=1e-6)


def test_pack_nibbles_low_first():
    assert pack_nibbles(np.array([1, 2, 15, 0], np.uint8)).tolist() == [0x21, 0x0F]


def test_stats_stream_the_hessian_whatever_the_batch(tmp_path):
    from qtool.io import load
    from qtool.weight_only.stats import collect_stats

    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx())
    x = inputs(40, seed=5)
    samples = [{"x": row[None]} for row in x]
    graph = load(model)
    one = collect_stats(graph, {"x": 256}, samples, batch_size=1)["x"]
    many = collect_stats(graph, {"x": 256}, samples, batch_size=16, memory_budget=4096)["x"]
    expected = x.astype(np.float64).T @ x / len(x)
    np.testing.assert_allclose(one.hessian, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(many.hessian, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(many.mean_abs, np.abs(x).mean(axis=0), rtol=1e-6)


def test_awq_scaling_folds_exactly_through_relu_and_bias():
    import onnx_graphsurgeon as gs

    from qtool.weight_only.emit import scale_input
    from qtool.weight_only.layers import find_layers

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    b1 = rng.standard_normal(64).astype(np.float32)
    w2 = rng.standard_normal((64, 16)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             onnx.helper.make_node("Add", ["h0", "b1"], ["h"], name="bias1"),
             onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
             onnx.helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 16])],
        [onnx.numpy_helper.from_array(v, n) for v, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.standard_normal((5, 32)).astype(np.float32)
    before = run(model.SerializeToString(), x)

    g = gs.import_onnx(model)
    layers, _ = find_layers(g, 32)
    first, second = layers
    s = rng.uniform(0.2, 5.0, 64).astype(np.float32)
    second.weight = second.weight * s[:, None]
    how = scale_input(g, second.input, [second], 1 / s, {"h0": first})
    assert how == "folded into MatMul fc1 and Add bias1"
    for layer in layers:
        layer.node.inputs[1] = gs.Constant(f"{layer.name}_w", layer.weight)
    after = run(gs.export_onnx(g.cleanup().toposort()).SerializeToString(), x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert not any(n.op == "Mul" for n in g.nodes)


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exports(tmp_path, dynamo):
    torch = pytest.importorskip("torch")
    if dynamo:
        pytest.importorskip("onnxscript")  # the dynamo exporter writes through it
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 32)).eval()
    path = tmp_path / "net.onnx"
    example = torch.randn(2, 4, 64)
    torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18 if dynamo else 13, dynamo=dynamo)
    x = (np.random.default_rng(1).standard_normal((256, 4, 64))
         * np.logspace(-1, 1, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:224])
    np.savez(tmp_path / "val.npz", x=x[224:])
    result = CliRunner().invoke(main, [
        "calibrate", str(path), "-b", "onnxruntime", "--weight-only", "--block-size", "32",
        "--data", str(tmp_path / "calib.npz"), "--eval-data", str(tmp_path / "val.npz"),
        "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = onnx.load(tmp_path / "out" / "model.onnx")
    assert [n.op_type for n in written.graph.node].count("MatMulNBits") == 2

    def outputs(model):  # the export has a fixed batch of 2
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i:i + 2]})[0]
                               for i in range(224, 256, 2)])
    assert sqnr(outputs(path), outputs(tmp_path / "out" / "model.onnx")) > 15


def test_fp8_onnxruntime_keeps_gemm_biases_float(mlp, tmp_path):
    model = tmp_path / "gemm.onnx"
    model.write_bytes(mlp_onnx(gemm=True))
    result = CliRunner().invoke(main, [
        "calibrate", str(model), "-b", "onnxruntime", "--precision", "fp8", "--data",
        str(mlp / "calib.npz"), "--eval-data", str(mlp / "val.npz"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    written = onnx.load(tmp_path / "o" / "model.qdq.onnx")
    types = {t.name: t.data_type for t in written.graph.initializer}
    assert onnx.TensorProto.INT32 not in types.values()  # the int8 flow's int32 biases
    for node in written.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert types[node.input[2]] == onnx.TensorProto.FLOAT8E4M3FN
    gemms = [n for n in written.graph.node if n.op_type == "Gemm"]
    assert all(types[n.input[2]] == onnx.TensorProto.FLOAT for n in gemms)
    x = inputs(256, seed=11)
    assert sqnr(run(model, x), run(tmp_path / "o" / "model.qdq.onnx", x)) > 20
