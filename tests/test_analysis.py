"""qtool.analysis on a trained model with one layer made hard to quantize.

Every number the analysis reports is recomputed here by a separate path: onnxruntime runs of
the float and QDQ graphs over the whole data at once and the SQNR / squared error in numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from outlier_model import CALIB, DIGITS, HARD_LAYER, OUTLIER_TENSOR, VAL, outlier_graph
from qdq_helpers import ALL_CONVS_OPTION, TENSORRT_ALL_CONVS
from qtool.calibration import calibrate, load_data
from qtool.cli import main

from qtool.analysis import (
    clip_range,
    float_fallback,
    keep_float,
    layer_sensitivity,
    layers_of,
    tensor_errors,
)
from qtool.analysis.autoselect import METHODS, select_ranges
from qtool.io import load, save, serialize, to_model
from qtool.planner import build_plan
from qtool.prepare import prepare
from qtool.qdq import quantize
from qtool.samples import labelled_batches

#: per-channel weights: the outlier hurts only through res.2's inputs. Every Conv quantized:
#: the model's convs have fewer than 16 channels, which TensorRT's int8_conv_rule keeps float.
BACKEND = TENSORRT_ALL_CONVS
TARGET_SQNR = 30.0


def _run(model_bytes: bytes, inputs: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    proto = onnx.load_from_string(model_bytes)
    known = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in known:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(outputs, {"input": inputs})


def _sqnr(x: np.ndarray, q: np.ndarray) -> float:
    x, q = x.astype(np.float64), q.astype(np.float64)
    return 10.0 * math.log10(np.sum(x * x) / np.sum((x - q) ** 2))


@pytest.fixture(scope="module")
def hard():
    graph = outlier_graph()
    samples = load_data(CALIB, graph)
    plan = build_plan(graph, BACKEND)
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    result = quantize(graph, BACKEND, ranges, plan=plan)
    return {
        "graph": graph,
        "plan": plan,
        "ranges": ranges,
        "result": result,
        "samples": samples,
        "batches": lambda: labelled_batches(samples, None, 64),
        "inputs": np.load(CALIB)["input"],
    }


@pytest.fixture(scope="module")
def sensitivity(hard):
    return layer_sensitivity(hard["graph"], hard["result"], hard["batches"])


def test_outlier_model_computes_the_same_function():
    original, _ = prepare(load(DIGITS))
    inputs = np.load(CALIB)["input"]
    (expected,) = _run(serialize(original), inputs, ["logits"])
    (got,) = _run(serialize(outlier_graph()), inputs, ["logits"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_sensitivity_ranks_the_outlier_layer_first_and_measures_it_alone(hard, sensitivity):
    assert [s.node for s in sensitivity][0] == HARD_LAYER
    assert sorted(s.node for s in sensitivity) == sorted(layers_of(hard["plan"]))
    worst, runner_up = sensitivity[0], sensitivity[1]
    assert worst.sqnr_db < runner_up.sqnr_db - 10.0
    # Recompute the worst entry: only res.2's inputs are quantized, the rest is float.
    union = {n: (float(q.lo), float(q.hi)) for n, q in hard["result"].qparams.items()
             if q.role == "activation"}
    others = [n for n in layers_of(hard["plan"]) if n != HARD_LAYER]
    alone = quantize(hard["graph"], BACKEND, union, plan=keep_float(hard["plan"], others))
    dequantized_readers = {
        consumer.name
        for node in alone.graph.nodes if node.op == "DequantizeLinear"
        for consumer in node.outputs[0].outputs
    }
    assert dequantized_readers == {HARD_LAYER}
    (x,) = _run(serialize(hard["graph"]), hard["inputs"], ["logits"])
    (q,) = _run(serialize(alone.graph), hard["inputs"], ["logits"])
    assert worst.sqnr_db == pytest.approx(_sqnr(x, q), rel=1e-6)


def test_fallback_keeps_exactly_the_outlier_layer_float(hard, sensitivity):
    fallback = float_fallback(hard["graph"], BACKEND, hard["plan"], hard["ranges"], sensitivity,
                              hard["batches"], target_sqnr=TARGET_SQNR)
    assert fallback.steps[0].sqnr_db < TARGET_SQNR and not fallback.steps[0].met
    assert fallback.met and fallback.float_layers == [HARD_LAYER]
    assert "kept float to meet output SQNR >= 30 dB" in fallback.plan.float_nodes[HARD_LAYER]
    assert not any(HARD_LAYER in e.consumers for e in fallback.plan.tensors.values())
    final = quantize(hard["graph"], BACKEND, hard["ranges"], plan=fallback.plan)
    (x,) = _run(serialize(hard["graph"]), hard["inputs"], ["logits"])
    (q,) = _run(serialize(final.graph), hard["inputs"], ["logits"])
    assert _sqnr(x, q) >= TARGET_SQNR
    assert fallback.steps[-1].sqnr_db == pytest.approx(_sqnr(x, q), rel=1e-6)


def test_fallback_prunes_layers_that_are_not_needed(hard, sensitivity):
    # Feed a wrong ranking (a harmless layer first): the greedy prefix keeps both float,
    # the pruning pass quantizes the harmless one again.
    misranked = [sensitivity[1], sensitivity[0], *sensitivity[2:]]
    fallback = float_fallback(hard["graph"], BACKEND, hard["plan"], hard["ranges"], misranked,
                              hard["batches"], target_sqnr=TARGET_SQNR)
    assert [s.float_layers for s in fallback.steps] == [
        [], [misranked[0].node], [misranked[0].node, HARD_LAYER], [HARD_LAYER]]
    assert fallback.met and fallback.float_layers == [HARD_LAYER]
    assert list(fallback.plan.float_nodes) == [HARD_LAYER]


def test_fallback_to_an_accuracy_target_uses_the_labels(hard, sensitivity):
    val = load_data(VAL, hard["graph"])
    fallback = float_fallback(hard["graph"], BACKEND, hard["plan"], hard["ranges"], sensitivity,
                              lambda: labelled_batches(val, VAL, 100), max_accuracy_drop=1.0)
    assert fallback.steps[0].accuracy_drop > 1.0
    assert fallback.met and fallback.float_layers == [HARD_LAYER]
    final = quantize(hard["graph"], BACKEND, hard["ranges"], plan=fallback.plan)
    data = np.load(VAL)
    (x,) = _run(serialize(hard["graph"]), data["input"], ["logits"])
    (q,) = _run(serialize(final.graph), data["input"], ["logits"])
    drop = 100.0 * (np.mean(x.argmax(1) == data["labels"]) - np.mean(q.argmax(1) == data["labels"]))
    assert drop == pytest.approx(fallback.steps[-1].accuracy_drop) and drop <= 1.0


def test_tensor_errors_and_histograms_match_a_direct_computation(hard):
    result = hard["result"]
    samples, errors, histograms = tensor_errors(hard["graph"], result, hard["batches"])
    assert samples == len(hard["inputs"])
    by_name = {e.tensor: e for e in errors}
    assert set(by_name) == {n for n, e in result.plan.tensors.items() if e.role != "bias"}
    activations = [e.tensor for e in result.plan.entries("activation") if e.tensor != "input"]
    floats = _run(serialize(hard["graph"]), hard["inputs"], activations)
    quants = _run(serialize(result.graph), hard["inputs"],
                  [f"{a}_dequantized" for a in activations])
    for name, x, q in zip(activations, floats, quants, strict=True):
        assert by_name[name].sqnr_db == pytest.approx(_sqnr(x, q), rel=1e-6)
        assert by_name[name].max_abs_error == pytest.approx(float(np.abs(x - q).max()), rel=1e-6)
    weight = result.plan.entries("weight")[0]
    values = to_model(hard["graph"])
    w = next(onnx.numpy_helper.to_array(t) for t in values.graph.initializer
             if t.name == weight.tensor)
    qp = result.qparams[weight.tensor]
    w_q = weight.scheme.fake_quantize(w, qp.scale, qp.zero_point)
    assert by_name[weight.tensor].sqnr_db == pytest.approx(_sqnr(w, w_q), rel=1e-6)
    # Histograms: the worst activations, every value counted once, the clip range marked.
    worst = sorted((e for e in errors if e.role == "activation"), key=lambda e: e.sqnr_db)
    assert [h.tensor for h in histograms] == [e.tensor for e in worst[:3]]
    for h in histograms:
        x = dict(zip(activations, floats, strict=True))[h.tensor]
        assert sum(h.counts) == x.size
        assert (h.min, h.max) == (float(x.min()), float(x.max()))
        assert h.left <= h.min and h.left + h.width * len(h.counts) > h.max
        q = result.qparams[h.tensor]
        lo, hi = clip_range(q)
        assert h.clip == [lo, hi]
        assert lo == pytest.approx(float(q.scale) * (q.scheme.qmin - int(q.zero_point)))


def _exact_errors(graph, plan, ranges, inputs):
    """Squared fake-quantization error per tensor, with the group union applied (numpy)."""
    schemes = plan.activation_schemes()
    names = [n for n in schemes if n != "input"]
    values = dict(zip(names, _run(serialize(graph), inputs, names), strict=True))
    values["input"] = inputs
    union = {}
    for name in schemes:
        key = plan.tensors[name].group or name
        lo, hi = union.get(key, (math.inf, -math.inf))
        union[key] = (min(lo, ranges[name][0]), max(hi, ranges[name][1]))
    errors = {}
    for name, scheme in schemes.items():
        scale, zero_point = scheme.qparams(*union[plan.tensors[name].group or name])
        x = values[name].astype(np.float64)
        errors[name] = float(np.sum((x - scheme.fake_quantize(x, scale, zero_point)) ** 2))
    return errors


@pytest.mark.parametrize("backend", ["snpe", "tensorrt"])
def test_auto_method_is_never_worse_than_any_single_method(backend):
    graph, _ = prepare(load(DIGITS))
    samples = load_data(CALIB, graph)
    inputs = np.load(CALIB)["input"]
    plan = build_plan(graph, backend)
    choice = select_ranges(graph, plan, samples)
    auto = _exact_errors(graph, plan, choice.ranges, inputs)
    singles = {m: _exact_errors(graph, plan, calibrate(graph, plan.activation_schemes(), samples,
                                                       method=m), inputs)
               for m in METHODS}
    groups = {}
    for name in plan.activation_schemes():
        groups.setdefault(plan.tensors[name].group or name, []).append(name)
    for members in groups.values():
        best_single = min(sum(singles[m][t] for t in members) for m in METHODS)
        assert sum(auto[t] for t in members) <= best_single * (1 + 1e-9) + 1e-12
        # One scale per group: every member carries the same range and the same method.
        assert len({choice.ranges[t] for t in members}) == 1
        assert len({choice.methods[t] for t in members}) == 1
    # The choice is real: more than one method wins somewhere on this model.
    assert len(set(choice.methods.values())) >= 2
    if backend == "snpe":
        assert plan.groups, "snpe's plan of the digits CNN has a shared-scale group"


def test_calibrate_cli_with_auto_method_and_target_writes_the_fallback_plan(tmp_path):
    model = tmp_path / "hard.onnx"
    save(outlier_graph(), model)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "calibrate", str(model), "--backend", "tensorrt", *ALL_CONVS_OPTION, "--data", str(CALIB),
        "--eval-data", str(VAL), "--method", "auto", "--target-sqnr", str(TARGET_SQNR),
        "-o", str(out), "-q",
    ])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert list(plan["float_nodes"]) == [HARD_LAYER]
    report = json.loads((out / "report.json").read_text())
    analysis = report["analysis"]
    assert analysis["fallback"]["float_layers"] == [HARD_LAYER] and analysis["fallback"]["met"]
    assert analysis["layers"][0]["node"] == HARD_LAYER
    assert set(analysis["method_choice"]["tensors"]) == {
        n for n, e in plan["tensors"].items() if e["role"] == "activation"
    } | {OUTLIER_TENSOR}
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "## Float fallback" in (out / "report.md").read_text()


def test_max_accuracy_drop_without_labels_is_a_data_error(tmp_path):
    model = tmp_path / "hard.onnx"
    save(outlier_graph(), model)
    result = CliRunner().invoke(main, [
        "calibrate", str(model), "--backend", "tensorrt", *ALL_CONVS_OPTION, "--data", str(CALIB),
        "--max-accuracy-drop", "1", "-o", str(tmp_path / "out"),
    ])
    assert result.exit_code == 6
    assert "needs labels" in result.output
    assert not (tmp_path / "out").exists()


def test_tensor_errors_do_not_depend_on_the_batching(hard):
    """Running sums and re-binned histograms: 7-row batches give the numbers of 64-row ones."""
    _, big, big_hist = tensor_errors(hard["graph"], hard["result"], hard["batches"])
    _, small, small_hist = tensor_errors(hard["graph"], hard["result"],
                                         lambda: labelled_batches(hard["samples"], None, 7))
    for a, b in zip(big, small, strict=True):
        assert a.tensor == b.tensor
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-9)
        assert a.max_abs_error == b.max_abs_error
    assert [h.counts for h in big_hist] == [h.counts for h in small_hist]


def test_sensitivity_and_fallback_through_local_workers_equal_one_process(hard, sensitivity):
    """The executor judges the candidates: same ranking, same numbers, same fallback steps."""
    from qtool.executor import ProcessExecutor

    workers = ProcessExecutor(2)
    parallel = layer_sensitivity(hard["graph"], hard["result"], hard["batches"],
                                 executor=workers)
    assert parallel == sensitivity  # dataclass equality: every float bit for bit
    serial = float_fallback(hard["graph"], BACKEND, hard["plan"], hard["ranges"], sensitivity,
                            hard["batches"], target_sqnr=TARGET_SQNR)
    spread = float_fallback(hard["graph"], BACKEND, hard["plan"], hard["ranges"], sensitivity,
                            hard["batches"], target_sqnr=TARGET_SQNR, executor=workers)
    assert spread.float_layers == serial.float_layers == [HARD_LAYER]
    assert spread.steps == serial.steps
    assert spread.cost == serial.cost  # candidates past the first met one are not counted
    assert spread.plan.to_json() == serial.plan.to_json()


def test_first_met_judges_in_rounds_but_reports_what_one_process_saw():
    from qtool.analysis.candidates import CandidateJob, first_met

    class Reference:  # counts candidates; evaluation = the plan's own number
        candidates = 0
        task = None

        def evaluate(self, graph):
            self.candidates += 1
            return graph

    class Rounds:  # 3 workers, each with its own copy of the job, as processes have
        workers = 3
        rounds: list = []

        def map_shared(self, fn, shared, chunks, desc=""):
            import copy

            self.rounds.append([p for chunk in chunks for p in chunk])
            return [[copy.deepcopy(shared).reference.evaluate(p) for p in chunk]
                    for chunk in chunks]

    reference = Reference()
    job = CandidateJob(b"", "tensorrt", {}, "minmax", reference)
    executor = Rounds()
    index, seen = first_met(job, list(range(10)), lambda value: value >= 4, executor)
    assert index == 4 and seen == [0, 1, 2, 3, 4]
    assert executor.rounds == [[0, 1, 2], [3, 4, 5]]  # 5 was judged, then dropped
    assert reference.candidates == 5
    index, seen = first_met(job, list(range(6)), lambda value: value > 9, executor)
    assert index is None and seen == [0, 1, 2, 3, 4, 5]
    assert reference.candidates == 11
