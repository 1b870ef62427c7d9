"""Runs side by side (issue #22): the same numbers as one run after the other.

At batch 1 a second onnxruntime intra-op thread gains a conv net little, while two
single-thread runs side by side take about 0.67x the time. The calibration, the bias
correction's segments and float pass, and its held-out check now run so; each test here
runs the same work one run at a time and compares every number, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qdq_helpers import TENSORRT_ALL_CONVS
from qtool.calibration import calibrate, collector

import qtool
import qtool.bias_correction.means as means
import qtool.bias_correction.one_pass as one_pass
from qtool.analysis.evaluate import evaluate
from qtool.bias_correction import correct_biases
from qtool.bias_judge import judge
from qtool.cpu import runs_at_once, side_by_side_threads
from qtool.io import serialize
from qtool.planner import build_plan
from qtool.qdq import quantize
from qtool.workflow import prepare

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = str(EXAMPLES / "digits_cnn.onnx")
CALIB = str(EXAMPLES / "digits_calib.npz")
VAL = str(EXAMPLES / "digits_val.npz")


def _batches(path: str, rows: int, size: int) -> list[dict[str, np.ndarray]]:
    images = np.load(path)["input"][:rows]
    return [{"input": images[i:i + size]} for i in range(0, rows, size)]


@pytest.fixture(scope="module")
def digits():
    graph, _ = prepare(qtool.load(MODEL))
    plan = build_plan(graph, TENSORRT_ALL_CONVS)  # every conv int8, so every one corrected
    return graph, plan


def test_side_by_side_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [side_by_side_threads(n) for n in (1, 2, 3, 20)] == [16, 8, 5, 1]
    # one row a run: side by side; more rows: one at a time, onnxruntime's default threads
    assert runs_at_once(1, 3) == (3, 5) and runs_at_once(8, 3) == (1, None)
    assert runs_at_once(1, 1) == (1, None)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert side_by_side_threads(3) == 1


@pytest.mark.parametrize("method", ["minmax", "kld"])
def test_calibration_side_by_side_gives_the_ranges_of_one_run_at_a_time(
        digits, method, monkeypatch):
    graph, plan = digits
    schemes = plan.activation_schemes()
    samples = _batches(CALIB, 96, 1)  # one row a sample; batches of 8 made by calibrate
    slots: list[int] = []
    real = collector.Collector._outputs

    def spy(self, feeds, slot=0):
        slots.append(slot)
        return real(self, feeds, slot)

    monkeypatch.setattr(collector.Collector, "_outputs", spy)
    one_at_a_time = calibrate(graph, schemes, samples, method=method, batch_size=1,
                              intra_op_threads=1)
    assert set(slots) == {0}
    slots.clear()
    side_by_side = calibrate(graph, schemes, samples, method=method, batch_size=1)
    assert set(slots) == {0, 1}  # both slots' buffers were used
    assert one_at_a_time.keys() == side_by_side.keys()
    for name, (lo, hi) in one_at_a_time.items():
        assert np.array_equal(lo, side_by_side[name][0]), name
        assert np.array_equal(hi, side_by_side[name][1]), name
    slots.clear()
    # batches of 8 rows: one run at a time (micro-batches under a small budget), same ranges
    batched = calibrate(graph, schemes, samples, method=method, batch_size=8,
                        memory_budget=256 * 1024)
    assert set(slots) == {0}
    for name, (lo, hi) in batched.items():
        assert np.array_equal(lo, side_by_side[name][0]), name
        assert np.array_equal(hi, side_by_side[name][1]), name


def test_an_overflow_beside_another_run_names_its_sample(digits):
    graph, plan = digits
    samples = _batches(CALIB, 40, 1)
    samples[30] = {"input": np.full_like(samples[30]["input"], 3e38)}  # Inf in the convs
    with pytest.raises(qtool.errors.CalibrationError, match="at sample 30"):
        calibrate(graph, plan.activation_schemes(), samples, batch_size=1)


def test_the_correction_side_by_side_writes_the_same_model(digits, monkeypatch):
    graph, plan = digits
    samples = _batches(CALIB, 64, 1)  # rows of one: the runs go side by side
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    results = []
    for side in (1, 2):
        monkeypatch.setattr(one_pass, "SIDE_BY_SIDE", side)
        monkeypatch.setattr(means, "SIDE_BY_SIDE", side)
        result, report = correct_biases(graph, TENSORRT_ALL_CONVS, ranges, plan,
                                        lambda: iter(samples), memory_budget=64 * 1024)
        results.append((serialize(result.graph), report.layers, report.noise))
    assert results[0] == results[1]
    assert len(results[0][1]) == 7  # every layer corrected


def test_the_check_side_by_side_equals_each_candidate_evaluated_alone(digits):
    graph, plan = digits
    samples = _batches(CALIB, 64, 16)
    ranges = calibrate(graph, plan.activation_schemes(), samples)
    plain = quantize(graph, TENSORRT_ALL_CONVS, ranges, plan=plan)
    corrected, _ = correct_biases(graph, TENSORRT_ALL_CONVS, ranges, plan, lambda: iter(samples))
    held_out = _batches(VAL, 40, 1)  # rows of one: the three sessions side by side
    verdicts = judge(graph, [plain.graph, corrected.graph], iter(held_out))
    for verdict, candidate in zip(verdicts, (plain, corrected), strict=True):
        alone = evaluate(graph, candidate.graph, iter(held_out))
        assert verdict.evaluation.to_dict() == alone.to_dict()
