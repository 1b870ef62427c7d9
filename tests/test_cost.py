"""The main job's cost: analysis levels, held-out judging, bounded searches, memory budget.

Every number is checked against a separate path: onnxruntime runs of the written models over
the whole data at once and the metrics in numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from outlier_model import CALIB, DIGITS, VAL, outlier_graph
from qtool.calibration import calibrate, collector, load_data
from qtool.calibration.observers import get_observer

from qtool.analysis import float_fallback, holdout, tensor_errors
from qtool.analysis.autoselect import METHODS, _Candidates, histogram_errors, select_ranges
from qtool.analysis.reference import FloatReference
from qtool.errors import PlanError
from qtool.io import load, serialize
from qtool.planner import build_plan
from qtool.qdq import quantize
from qtool.scheme import QuantScheme
from qtool.workflow import (
    CalibrateOptions,
    calibrate_to_folder,
    labelled_batches,
    prepare,
    quantize_model,
)


def _run(model, inputs: np.ndarray, names=("logits",)) -> list[np.ndarray]:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(list(names), {"input": inputs})


def _sqnr(x, q) -> float:
    x, q = x.astype(np.float64), q.astype(np.float64)
    return 10.0 * math.log10(np.sum(x * x) / np.sum((x - q) ** 2))


@pytest.fixture(scope="module")
def digits():
    graph, _ = prepare(load(DIGITS))
    plan = build_plan(graph, "tensorrt")
    samples = load_data(CALIB, graph, num_samples=96)
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    return {"graph": graph, "plan": plan, "samples": samples, "ranges": ranges,
            "result": quantize(graph, "tensorrt", ranges, plan=plan)}


@pytest.mark.parametrize("level", ["none", "summary", "full"])
def test_analysis_levels_and_the_held_out_split(tmp_path, level):
    options = CalibrateOptions(data=CALIB, num_samples=80, batch_size=16, analysis=level)
    run = calibrate_to_folder(DIGITS, "tensorrt", tmp_path / "o", options)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["analysis"]["level"] == level
    assert "held-out split: 10 of 80" in report["analysis"]["judged_on"]
    assert report["calibration"]["samples"] == 70
    evaluation = report["evaluation"]
    if level == "none":
        assert evaluation["samples"] == 0 and evaluation["outputs"] == []
        assert report["analysis"]["tensors"] == []
        return
    # every 8th sample was held out: recompute the summary on exactly those rows
    inputs = np.load(CALIB)["input"][:80][7::8]
    assert evaluation["held_out"] and evaluation["samples"] == len(inputs) == 10
    (x,) = _run(DIGITS, inputs)
    (q,) = _run(str(run.output / "model.qdq.onnx"), inputs)
    assert evaluation["outputs"][0]["sqnr_db"] == pytest.approx(_sqnr(x, q), rel=1e-5)
    assert not any("calibration data" in w for w in report["warnings"])
    if level == "summary":
        assert report["analysis"]["tensors"] == [] and report["analysis"]["histograms"] == []
    else:
        assert len(report["analysis"]["tensors"]) == len(json.loads(
            (tmp_path / "o" / "plan.json").read_text())["tensors"]) - report["plan"]["biases"]
        assert report["analysis"]["samples"] == 70 and report["analysis"]["histograms"]


@pytest.mark.parametrize("flags", [{"layerwise": True}, {"target_sqnr": 20.0},
                                   {"sensitivity": True}, {"analysis": "some"}])
def test_analysis_none_refuses_what_needs_an_analysis(tmp_path, flags):
    options = CalibrateOptions(data=CALIB, num_samples=16, analysis=flags.pop("analysis", "none"),
                               **flags)
    with pytest.raises(PlanError):
        calibrate_to_folder(DIGITS, "tensorrt", tmp_path / "o", options)
    assert not (tmp_path / "o").exists()


def test_held_out_split_spreads_and_carries_labels():
    val = load_data(VAL, load(DIGITS))
    calib, held = holdout.split(val)
    assert held.indices == list(range(7, 500, 8))[: len(held)]
    assert len(held) == 500 // 8  # every 8th sample: fewer than MAX_HELD_OUT
    assert sorted(calib.indices + held.indices) == list(range(500))
    labels = np.load(VAL)["labels"]
    rows = list(labelled_batches(held, VAL, 1000))
    np.testing.assert_array_equal(rows[0]["labels"], labels[held.indices])
    np.testing.assert_array_equal(rows[0]["input"], np.load(VAL)["input"][held.indices])
    many = holdout.split(list(range(2000)))[1]
    assert len(many) == 2000 // 16 and many.indices[:2] == [15, 31]  # at most 128 held out
    assert holdout.split([{"input": 0}]) is None


def test_float_reference_equals_numpy_on_a_bounded_slice(digits):
    batches = lambda: labelled_batches(load_data(VAL, digits["graph"]), VAL, 32)  # noqa: E731
    reference = FloatReference(digits["graph"], batches, max_samples=70)
    assert reference.samples == 96  # whole batches: 3 x 32 rows
    evaluation = reference.evaluate(digits["result"].graph)
    evaluation_again = reference.evaluate(digits["result"].graph)
    data = np.load(VAL)
    inputs, labels = data["input"][:96], data["labels"][:96]
    (x,) = _run(serialize(digits["graph"]), inputs)
    (q,) = _run(serialize(digits["result"].graph), inputs)
    out = evaluation.outputs[0]
    assert out.sqnr_db == pytest.approx(_sqnr(x, q), rel=1e-9)
    assert out.top1_agreement == pytest.approx(np.mean(x.argmax(1) == q.argmax(1)))
    assert out.quant_accuracy == pytest.approx(np.mean(q.argmax(1) == labels))
    assert evaluation_again.outputs[0].sqnr_db == out.sqnr_db
    assert reference.cost() == {"candidates": 2, "samples": 96}


def test_fallback_that_is_met_at_once_skips_the_search(digits):
    def no_sensitivity():
        raise AssertionError("the sensitivity must not run when the target is met")

    fallback = float_fallback(digits["graph"], "tensorrt", digits["plan"], digits["ranges"],
                              no_sensitivity, lambda: labelled_batches(
                                  digits["samples"], None, 32), target_sqnr=10.0)
    assert fallback.met and fallback.float_layers == [] and len(fallback.steps) == 1
    assert fallback.cost == {"candidates": 1, "samples": 96}
    assert fallback.plan is digits["plan"]


def test_fallback_search_reports_its_cost(tmp_path):
    model = tmp_path / "hard.onnx"
    onnx.save(onnx.load_from_string(serialize(outlier_graph())), model)
    options = CalibrateOptions(data=CALIB, eval_data=VAL, target_sqnr=30.0, batch_size=64,
                               backend_options={"int8_conv_rule": False})  # 8-channel convs
    report = calibrate_to_folder(model, "tensorrt", tmp_path / "o", options).report
    fallback, search = report["analysis"]["fallback"], report["analysis"]["search"]
    layers = len(report["analysis"]["layers"])
    assert fallback["met"] and fallback["float_layers"]
    # one candidate per layer (sensitivity) plus one per step of the search, on 128 rows
    assert search == {"candidates": layers + len(fallback["steps"]), "samples": 128}
    assert fallback["cost"] == search
    assert report["analysis"]["judged_on"].endswith("digits_val.npz")


def test_auto_bins_each_tensor_once_and_judges_on_held_out_data(digits):
    graph, plan = digits["graph"], digits["plan"]
    scheme = QuantScheme()
    name = next(iter(plan.activation_schemes()))
    inputs = np.load(CALIB)["input"][:96]
    (values,) = _run(serialize(graph), inputs, [name])
    shared = _Candidates(scheme, name, METHODS)
    # one histogram, KLD's 8 x 2048 bins, feeds all four: MSE and Quantile re-bin it, MinMax
    # reads its extremes; each gives the very range it gives alone
    assert shared.fed == [shared.observers["kld"]]
    assert set(METHODS) == {"minmax", "mse", "kld", "quantile"}
    shared.update(values)
    for method, (lo, hi) in shared.ranges().items():
        alone = get_observer(method)(scheme, name)
        alone.update(values)
        assert (lo, hi) == tuple(float(v) for v in alone.range())

    # judged on the held-out data: the picks are the least exact error of every candidate
    # range over those samples (numpy on onnxruntime's unoptimized outputs)
    schemes = plan.activation_schemes()
    val = load_data(VAL, graph, num_samples=40)
    choice = select_ranges(graph, plan, digits["samples"], judge_data=val)
    candidates = {m: calibrate(graph, schemes, digits["samples"], method=m) for m in METHODS}
    judge = np.load(VAL)["input"][:40]
    tensors = [t for t in schemes if t != "input"]
    outs = dict(zip(tensors, _run(serialize(graph), judge, tensors), strict=True))
    outs["input"] = judge
    assert not plan.groups  # tensorrt's plan of the digits CNN: every tensor on its own
    for tensor, entry_scheme in schemes.items():
        x = outs[tensor].astype(np.float64)
        exact = {}
        for method in METHODS:
            s, z = entry_scheme.qparams(*candidates[method][tensor])
            exact[method] = np.mean((x - entry_scheme.fake_quantize(x, s, z)) ** 2)
            assert choice.errors[tensor][method] == pytest.approx(exact[method], rel=1e-4)
        best = min(METHODS, key=lambda m: (exact[m], METHODS.index(m)))
        assert choice.methods[tensor] == best
        assert choice.ranges[tensor] == candidates[best][tensor]
    assert len(set(choice.methods.values())) >= 2


def test_auto_runs_one_session_over_each_data_once(digits, monkeypatch):
    sessions, reads = [], []
    real = collector.make_session
    monkeypatch.setattr(collector, "make_session",
                        lambda *a, **k: sessions.append(1) or real(*a, **k))

    class Counted:
        def __init__(self, samples, tag):
            self.samples, self.tag = samples, tag

        def __iter__(self):
            reads.append(self.tag)
            return iter(self.samples)

    calib = Counted(list(digits["samples"]), "calib")
    select_ranges(digits["graph"], digits["plan"], calib)
    assert (sessions, reads) == ([1], ["calib"])  # judged on its own histograms
    sessions.clear(), reads.clear()
    val = Counted(list(load_data(VAL, digits["graph"], num_samples=16)), "val")
    select_ranges(digits["graph"], digits["plan"], calib, judge_data=val)
    assert (sessions, reads) == ([1], ["calib", "val"])


@pytest.mark.parametrize("scheme", [QuantScheme(), QuantScheme(signed=False, symmetric=False),
                                    QuantScheme(bits=16)], ids=["int8", "uint8-asym", "int16"])
def test_histogram_errors_match_the_exact_sum_on_real_activations(digits, scheme):
    """Without held-out data auto judges on the calibration histogram: close to exact."""
    graph, plan = digits["graph"], digits["plan"]
    inputs = np.load(CALIB)["input"][:96]
    tensors = [t for t in plan.activation_schemes() if t != "input"]
    for tensor, x in zip(tensors, _run(serialize(graph), inputs, tensors), strict=True):
        candidate = _Candidates(scheme, tensor, METHODS)
        candidate.update(x)
        lo, hi = float(x.min()), float(x.max())
        ranges = {"minmax": (lo, hi), "clipped": (lo / 2, hi / 2), "wide": (2 * lo, 2 * hi),
                  **candidate.ranges()}
        sums, count = histogram_errors(candidate.histogram, scheme, ranges, candidate.zeros)
        assert count == x.size
        x = x.astype(np.float64)
        for key, (a, b) in ranges.items():
            s, z = scheme.qparams(a, b)
            exact = float(np.sum((x - scheme.fake_quantize(x, s, z)) ** 2))
            # 8 bits: a step spans 32 bins or more; 16 bits: finer than a bin
            assert sums[key] == pytest.approx(exact, rel=0.01 if scheme.bits == 8 else 0.12), key


def test_memory_budget_runs_micro_batches_with_the_same_ranges(monkeypatch):
    model = onnx.load(DIGITS)
    names = [n for node in model.graph.node for n in node.output]
    schemes = {n: QuantScheme() for n in names}
    data = load_data(CALIB, model, num_samples=64)
    rows_per_run = []
    real = collector.Collector._outputs

    def spy(self, feeds, *slot):
        rows_per_run.append(next(iter(feeds.values())).shape[0])
        return real(self, feeds, *slot)

    monkeypatch.setattr(collector.Collector, "_outputs", spy)
    for method in ("minmax", "kld"):
        whole = calibrate(model, schemes, data, method=method, batch_size=32,
                          memory_budget=None)
        assert rows_per_run == [32, 32]
        rows_per_run.clear()
        # one row of every observed tensor of the digits CNN: ~50 KB; 5 rows fit in 256 KB
        split = calibrate(model, schemes, data, method=method, batch_size=32,
                          memory_budget=256 * 1024)
        assert max(rows_per_run) < 32 and sum(rows_per_run) == 64 and rows_per_run[0] == 1
        assert split == whole
        rows_per_run.clear()


def test_full_analysis_under_a_memory_budget_gives_the_same_numbers(digits):
    batches = lambda: labelled_batches(digits["samples"], None, 48)  # noqa: E731
    n, whole, whole_hist = tensor_errors(digits["graph"], digits["result"], batches)
    n_split, split, split_hist = tensor_errors(digits["graph"], digits["result"], batches,
                                               memory_budget=64 * 1024)
    assert n == n_split == 96
    for a, b in zip(whole, split, strict=True):
        assert a.tensor == b.tensor and a.max_abs_error == b.max_abs_error
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-9)
    assert [h.counts for h in whole_hist] == [h.counts for h in split_hist]


def test_fallback_tries_16_bit_activations_before_float(tmp_path):
    """qnn runs A16W8: a target between the 8-bit and the all-16-bit SQNR is met with some
    layers at 16-bit activations and none float; tensorrt (8-bit only) keeps layers float."""
    from qtool.analysis.fallback import WIDE_ACTIVATION_BITS

    def run(backend, **extra):
        options = CalibrateOptions(data=CALIB, eval_data=VAL, num_samples=128,
                                   bias_correction=False, **extra)
        return quantize_model(DIGITS, backend, options)

    _, base = run("qnn")
    _, wide = run("qnn", act_bits=16)
    eight = base["evaluation"]["outputs"][0]["sqnr_db"]
    sixteen = wide["evaluation"]["outputs"][0]["sqnr_db"]
    assert sixteen > eight + 1.0
    target = (eight + sixteen) / 2
    files, report = run("qnn", target_sqnr=target)
    fallback = report["analysis"]["fallback"]
    assert fallback["met"] and fallback["float_layers"] == [] and fallback["wide_layers"]
    assert report["evaluation"]["outputs"][0]["sqnr_db"] >= target - 0.5  # judged on a slice
    plan = json.loads(files["plan.json"])
    bits = {name: entry["scheme"]["bits"] for name, entry in plan["tensors"].items()
            if entry["role"] == "activation"}
    assert WIDE_ACTIVATION_BITS in bits.values() and 8 in bits.values()
    encodings = json.loads(files["model.encodings"])["activation_encodings"]
    assert {e["bw"] for e in encodings} == {8, 16}
    _, trt_base = run("tensorrt")
    _, trt = run("tensorrt", target_sqnr=trt_base["evaluation"]["outputs"][0]["sqnr_db"] + 1)
    assert trt["analysis"]["fallback"]["wide_layers"] == []
