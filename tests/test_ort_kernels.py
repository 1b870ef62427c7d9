"""Every backend's ``model.qdq.onnx`` in onnxruntime's integer kernels, not just the simulation.

The other tests run onnxruntime with graph optimizations off: every DequantizeLinear in
float, the pure Q/DQ simulation. Users run the default optimizations, where onnxruntime fuses
``DQ -> op -> Q`` into integer kernels (QLinearConv, QGemm, ...). Here both run on the trained
digits CNN (and its outlier variant) and the output SQNR against the float model must not
drop by more than 1 dB (0.5 dB for the ``onnxruntime`` backend, made for those kernels).

On x86 CPUs without VNNI the u8 x s8 kernels saturate (``vpmaddubsw``); this machine may
have VNNI, so the rule that flags the risk from the schemes is checked by itself too, and
against an emulation of ``vpmaddubsw`` on the digits model's real integer activations.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from outlier_model import outlier_graph
from qdq_helpers import BACKENDS, EXAMPLES, prepared, sqnr_db
from qtool.backends import get_backend

import qtool
from qtool.analysis.kernels import saturation_risk
from qtool.io import serialize
from qtool.planner import build_plan
from qtool.qdq import quantize

ALL_BACKENDS = (*BACKENDS, "onnxruntime")


@functools.cache
def _data():
    calib = np.load(EXAMPLES / "digits_calib.npz")["input"]
    val = np.load(EXAMPLES / "digits_val.npz")["input"][:200]
    return calib, val


def _session(model: bytes, optimize: bool, save: Path | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if save is not None:
        options.optimized_model_filepath = str(save)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _simulated_and_kernels(graph, backend, method="minmax", save=None):
    calib, val = _data()
    rules = get_backend(backend) if isinstance(backend, str) else backend
    plan = build_plan(graph, rules)
    ranges = qtool.calibrate(graph, plan.activation_schemes(), [{"input": calib}], method=method)
    model = serialize(quantize(graph, rules, ranges, plan=plan).graph)
    (reference,) = _session(serialize(graph), False).run(None, {"input": val})
    (simulated,) = _session(model, False).run(None, {"input": val})
    (kernels,) = _session(model, True, save).run(None, {"input": val})
    return sqnr_db(reference, simulated), sqnr_db(reference, kernels)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_digits_loses_under_one_db_in_kernels(backend):
    simulated, kernels = _simulated_and_kernels(prepared("digits"), backend)
    print(f"digits {backend}: simulated {simulated:.2f} dB, kernels {kernels:.2f} dB")
    assert simulated > 20
    assert kernels > simulated - 1.0


@pytest.mark.parametrize("model", ["digits", "outlier"])
@pytest.mark.parametrize("options", [{}, {"activations": "int8"}, {"reduce_range": False}])
def test_onnxruntime_backend_holds_within_half_a_db(model, options, tmp_path):
    graph = prepared("digits") if model == "digits" else outlier_graph()
    optimized = tmp_path / "optimized.onnx"
    simulated, kernels = _simulated_and_kernels(
        graph, get_backend("onnxruntime", **options), save=optimized)
    print(f"{model} onnxruntime{options}: simulated {simulated:.2f}, kernels {kernels:.2f} dB")
    assert abs(kernels - simulated) <= 0.5
    # and it really runs in integer kernels: every Conv became a QLinearConv, the Gemm a
    # QGemm, the Add and Concat their QLinear ops; no float Conv is left. (int8 activations
    # are for ARM: on x86 onnxruntime shifts them to uint8 and fuses only part of the graph.)
    if options.get("activations") == "int8":
        return
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    convs = sum(n.op == "Conv" for n in graph.nodes)
    assert ops.count("QLinearConv") == convs and "Conv" not in ops
    assert {"QGemm", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool"} <= set(ops)


def test_saturation_rule_follows_the_pair_sum():
    """``vpmaddubsw`` sums two u8 x s8 products into a saturating int16: the schemes are at
    risk when (activation levels - 1) x max |weight level| x 2 > 32767 (engines.md 4.4)."""
    def pair_max(rules):
        acts, weights = rules.activation_scheme, rules.weight_scheme
        products = np.int64(acts.qmax - acts.qmin) * max(-weights.qmin, weights.qmax)
        return 2 * products

    expected = {
        ("academic", ()): True, ("tensorrt", ()): True, ("acl", ()): True, ("tvm", ()): True,
        ("snpe", ()): False,  # uint8 weights: u8 x u8 kernels, widened without saturation
        ("fbgemm", ()): False, ("fbgemm", (("reduce_range", False),)): True,
        ("onnxruntime", (("target_cpu", "avx2"),)): False,
        ("onnxruntime", (("target_cpu", "vnni"),)): True,
        ("onnxruntime", (("target_cpu", "avx2"), ("reduce_range", False))): True,
    }
    for (name, options), risky in expected.items():
        rules = get_backend(name, **dict(options))
        assert saturation_risk(rules) is risky, name
        if rules.weight_scheme.signed:
            assert bool(pair_max(rules) > 32767) is risky, name
    assert pair_max(get_backend("fbgemm")) == 2 * 127 * 128  # 32512: fits


def test_report_measures_the_kernels(tmp_path, monkeypatch):
    """The run's report compares simulation and kernels and flags the risky schemes (on a
    CPU without VNNI, injected: the test machine's own flags do not matter)."""
    from qtool.workflow import CalibrateOptions, quantize_model

    monkeypatch.setenv("QTOOL_CPU_FLAGS", "sse4_2 avx2 fma")
    options = CalibrateOptions(data=str(EXAMPLES / "digits_calib.npz"), num_samples=64,
                               eval_data=str(EXAMPLES / "digits_val.npz"))
    _, report = quantize_model(EXAMPLES / "digits_cnn.onnx", "tensorrt", options)
    kernels = report["ort_kernels"]
    assert kernels["samples"] == 64 and kernels["saturation_risk_without_vnni"] is True
    assert abs(kernels["loss_db"]) < 1.0
    assert any("without VNNI" in w for w in report["warnings"])
    _, report = quantize_model(EXAMPLES / "digits_cnn.onnx", "onnxruntime", options)
    assert report["ort_kernels"]["saturation_risk_without_vnni"] is False
    assert not any("onnxruntime's" in w for w in report["warnings"])
    assert report["backend_options"] == {"target_cpu": "auto", "reduce_range": True,
                                         "activations": "uint8", "placement": "kernels"}


def _saturated_pairs(result, val) -> int:
    """Pairs of products that overflow int16 in a u8 x s8 ``vpmaddubsw`` emulation.

    Every quantized Conv of the QDQ model, on its real integer inputs (captured from the
    Q nodes, optimizations off) and integer weights: im2col in onnxruntime's NHWC order
    (kh, kw, c_in; padding with the zero point), int8 activations shifted to uint8 as MLAS
    does (+128), products of neighbouring k summed in pairs, as ``vpmaddubsw`` sums them.
    """
    model = qtool.io.to_model(result.graph)
    convs = [n for n in result.graph.nodes if n.op == "Conv" and n.inputs[0].inputs
             and n.inputs[0].inputs[0].op == "DequantizeLinear"
             and isinstance(n.inputs[1].inputs[0].inputs[0], gs.Constant)]
    names = [c.inputs[0].inputs[0].inputs[0].name for c in convs]  # the Q outputs
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    levels = _session(model.SerializeToString(), False).run(names, {"input": val})
    saturated = 0
    for conv, a in zip(convs, levels, strict=True):
        dq_x, dq_w = conv.inputs[0].inputs[0], conv.inputs[1].inputs[0]
        w = dq_w.inputs[0].values.astype(np.int64)  # (c_out, c_in, kh, kw)
        zero = int(np.asarray(dq_x.inputs[2].values))
        signed = dq_x.inputs[2].values.dtype == np.int8
        a = a.astype(np.int64)
        if signed:
            a, zero = a + 128, zero + 128  # s8 activations run as u8 with a shifted zero point
        kh, kw = w.shape[2:]
        pad = conv.attrs.get("pads", [0, 0, 0, 0])
        a = np.pad(a, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])),
                   constant_values=zero)
        height, width = a.shape[2] - kh + 1, a.shape[3] - kw + 1
        patches = np.stack([a[:, :, i:i + height, j:j + width]
                            for i in range(kh) for j in range(kw)], axis=1)
        cols = patches.transpose(0, 3, 4, 1, 2).reshape(a.shape[0], height * width, -1)
        weights = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        if cols.shape[-1] % 2:
            continue  # a single input channel: no pairs to saturate in this order
        products = cols[:, :, None, :] * weights[None, None, :, :]
        pairs = products[..., 0::2] + products[..., 1::2]
        saturated += int(np.count_nonzero(np.abs(pairs) > 32767))
    return saturated


@pytest.mark.parametrize("backend, options", [
    ("tensorrt", {}), ("academic", {}), ("fbgemm", {"reduce_range": False}),
    ("fbgemm", {}), ("onnxruntime", {"target_cpu": "avx2"}),
    ("onnxruntime", {"target_cpu": "vnni"}),
])
def test_saturation_is_real_on_the_digits_model(backend, options):
    """The rule's risk is not hypothetical: on the digits CNN's real integer activations the
    8-bit x 8-bit schemes give int16 pair sums that overflow (their non-VNNI kernels clip),
    and the 7-bit schemes (fbgemm's default, onnxruntime's for x86 without VNNI) never do."""
    calib, val = _data()
    rules = get_backend(backend, **options)
    graph = prepared("digits")
    plan = build_plan(graph, rules)
    ranges = qtool.calibrate(graph, plan.activation_schemes(), [{"input": calib}],
                             method="minmax")
    result = quantize(graph, rules, ranges, plan=plan)
    saturated = _saturated_pairs(result, val[:16])
    print(f"{backend}{options}: {saturated} saturated pairs")
    assert (saturated > 0) == saturation_risk(rules)
