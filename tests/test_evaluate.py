"""qtool.analysis.evaluate: metrics vs numpy references, streaming equals one pass, layerwise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.analysis.evaluate import evaluate, rebatch
from qtool.errors import DataError
from qtool.scheme import QuantScheme

SCALE, ZERO_POINT = 0.05, 128
SCHEME = QuantScheme(bits=8, signed=False, symmetric=False)


def _model(nodes, inits, classes=10):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _pair(gain=1.5):
    """Float ``y = relu(gain * x)`` and the same with ``gain * x`` quantized to uint8."""
    inits = [numpy_helper.from_array(np.array(gain, np.float32), "gain")]
    float_model = _model(
        [helper.make_node("Mul", ["x", "gain"], ["t"], name="mul"),
         helper.make_node("Relu", ["t"], ["y"], name="relu")],
        inits,
    )
    qinits = inits + [
        numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
        numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "zp"),
    ]
    quant_model = _model(
        [helper.make_node("Mul", ["x", "gain"], ["t"], name="mul"),
         helper.make_node("QuantizeLinear", ["t", "s", "zp"], ["tq"], name="t_Q"),
         helper.make_node("DequantizeLinear", ["tq", "s", "zp"], ["td"], name="t_DQ"),
         helper.make_node("Relu", ["td"], ["y"], name="relu")],
        qinits,
    )
    return float_model, quant_model


def _data(rows=300, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, classes)) * 3).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    return x, labels


def _reference(x, gain=1.5):
    t = (np.float32(gain) * x).astype(np.float32)
    td = SCHEME.fake_quantize(t, np.float32(SCALE), np.int64(ZERO_POINT))
    return t, td, np.maximum(t, 0), np.maximum(td, 0)


def _sqnr(ref, test):
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - test) ** 2))


def test_output_metrics_match_numpy_over_streamed_batches():
    float_model, quant_model = _pair()
    x, labels = _data()
    batches = ({"x": x[i : i + 64], "labels": labels[i : i + 64]} for i in range(0, len(x), 64))
    result = evaluate(float_model, quant_model, batches)

    _, _, y_float, y_quant = _reference(x)
    (out,) = result.outputs
    assert result.samples == len(x) and result.labelled
    assert out.sqnr_db == pytest.approx(_sqnr(y_float, y_quant), rel=1e-9)
    f64, q64 = y_float.astype(np.float64), y_quant.astype(np.float64)
    cosine = np.sum(f64 * q64) / math.sqrt(np.sum(f64**2) * np.sum(q64**2))
    assert out.cosine == pytest.approx(cosine, rel=1e-12)
    assert out.max_abs_error == pytest.approx(float(np.max(np.abs(f64 - q64))), rel=1e-12)
    top_float, top_quant = y_float.argmax(1), y_quant.argmax(1)
    assert out.top1_agreement == pytest.approx(np.mean(top_float == top_quant))
    assert out.float_accuracy == pytest.approx(np.mean(top_float == labels))
    assert out.quant_accuracy == pytest.approx(np.mean(top_quant == labels))
    assert result.accuracy == (out.float_accuracy, out.quant_accuracy)
    # Clipping at 128 * 0.05 = 6.4 makes real errors: the metrics are not trivially perfect.
    assert 0 < out.top1_agreement < 1 and out.max_abs_error > SCALE


def test_streaming_equals_one_batch_and_single_samples():
    float_model, quant_model = _pair()
    x, _ = _data(rows=50)
    whole = evaluate(float_model, quant_model, [{"x": x}])
    singles = evaluate(float_model, quant_model, ({"x": x[i]} for i in range(len(x))))
    for a, b in zip(whole.outputs, singles.outputs, strict=True):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-12)
        assert a.cosine == pytest.approx(b.cosine, rel=1e-12)
        assert a.max_abs_error == b.max_abs_error
        assert a.top1_agreement == b.top1_agreement
    assert not whole.labelled and whole.outputs[0].float_accuracy is None


def test_identical_models_are_exact():
    float_model, _ = _pair()
    x, _ = _data(rows=20)
    (out,) = evaluate(float_model, float_model, [{"x": x}]).outputs
    assert out.sqnr_db is None and out.cosine == 1.0 and out.max_abs_error == 0.0
    assert out.top1_agreement == 1.0


def test_layerwise_compares_the_dequantized_tensor():
    float_model, quant_model = _pair()
    x, _ = _data(rows=100)
    batches = rebatch(({"x": x[i : i + 1]} for i in range(100)), 32)
    result = evaluate(float_model, quant_model, batches, layerwise=True)
    t, td, _, _ = _reference(x)
    (layer,) = result.layers
    assert (layer.tensor, layer.op) == ("t", "Mul")
    assert layer.sqnr_db == pytest.approx(_sqnr(t, td), rel=1e-9)
    assert layer.max_abs_error == pytest.approx(float(np.max(np.abs(t.astype(np.float64) - td))))


def test_layers_sorted_worst_first():
    # Two parallel quantized branches; the coarse scale makes branch "b" the worst, although
    # "a" comes first in the graph.
    def build(quantized):
        inits = [numpy_helper.from_array(np.array(1.5, np.float32), "gain"),
                 numpy_helper.from_array(np.array(0.5, np.float32), "coarse"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "fine"),
                 numpy_helper.from_array(np.array(0, np.int8), "zp")]
        nodes = [helper.make_node("Mul", ["x", "gain"], ["a"], name="ma"),
                 helper.make_node("Neg", ["x"], ["b"], name="nb")]
        if quantized:
            for name, scale in (("a", "fine"), ("b", "coarse")):
                nodes += [helper.make_node("QuantizeLinear", [name, scale, "zp"], [name + "q"]),
                          helper.make_node("DequantizeLinear", [name + "q", scale, "zp"],
                                           [name + "d"])]
            nodes.append(helper.make_node("Add", ["ad", "bd"], ["y"], name="add"))
        else:
            nodes.append(helper.make_node("Add", ["a", "b"], ["y"], name="add"))
        return _model(nodes, inits)

    x, _ = _data(rows=40)
    layers = evaluate(build(False), build(True), [{"x": x / 3}], layerwise=True).layers
    assert [(layer.tensor, layer.op) for layer in layers] == [("b", "Neg"), ("a", "Mul")]
    assert layers[0].sqnr_db < layers[1].sqnr_db


def test_bad_data_is_a_data_error():
    float_model, quant_model = _pair()
    with pytest.raises(DataError, match="expects shape"):
        evaluate(float_model, quant_model, [{"x": np.zeros((4, 7), np.float32)}])
    with pytest.raises(DataError, match="no array for input 'x'"):
        evaluate(float_model, quant_model, [{"image": np.zeros((4, 10), np.float32)}])
    with pytest.raises(DataError, match="empty"):
        evaluate(float_model, quant_model, [])
    with pytest.raises(DataError, match="labels"):
        evaluate(float_model, quant_model,
                 [{"x": np.zeros((4, 10), np.float32), "labels": np.zeros(3, np.int64)}])


def test_rebatch_groups_rows():
    items = [{"x": np.full((1, 2), i, np.float32)} for i in range(7)]
    sizes = [b["x"].shape[0] for b in rebatch(items, 3)]
    assert sizes == [3, 3, 1]
    merged = np.concatenate([b["x"] for b in rebatch(items, 3)])
    assert merged[:, 0].tolist() == list(range(7))
