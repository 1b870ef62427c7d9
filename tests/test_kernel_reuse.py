"""The kernel check reuses the held-out runs of the evaluation; sessions open one at a time.

The main job ran the float model and the Q/DQ simulation over the held-out rows (in the bias
correction's check, or the ``evaluate`` phase), and the kernel check ran both again on the
first 64 of them. Now it runs only onnxruntime's integer kernels there: every number of its
report entry must equal :func:`check_kernels` run from scratch on the written model (the
check as it was, every session its own), and no session with optimizations off may open.
"""

from __future__ import annotations

import sys
import weakref

import numpy as np
import onnx
import pytest
from qdq_helpers import EXAMPLES
from qtool.backends import get_backend
from qtool.calibration import collector

import qtool.analysis.kernels as kernels
from qtool.analysis.evaluate import evaluate
from qtool.analysis.recorded import RecordedRuns
from qtool.cpu import resolve_target
from qtool.io import load, serialize
from qtool.workflow import CalibrateOptions, quantize_model

DIGITS = EXAMPLES / "digits_cnn.onnx"
VAL = EXAMPLES / "digits_val.npz"


def _held_out(rows: int, batch: int):
    values = np.load(VAL)["input"][:rows]
    return [{"input": values[i:i + batch]} for i in range(0, rows, batch)]


@pytest.fixture
def kernel_sessions(monkeypatch):
    """The optimization flag of every session the kernel check opens."""
    opened: list[bool] = []
    real = kernels._session

    def counted(model, optimize, *threads):
        opened.append(optimize)
        return real(model, optimize, *threads)

    monkeypatch.setattr(kernels, "_session", counted)
    return opened


@pytest.mark.parametrize("flags", [{}, {"bias_correction": "off"}, {"batch_size": 1}])
def test_kernel_check_reuses_the_held_out_runs(flags, kernel_sessions):
    """Default job (the correction's check ran the rows) and without the correction (the
    evaluate phase ran them): only the integer kernels' session opens, same numbers. At
    batches of one row the check's sessions ran side by side with fewer threads each: the
    runs are kept under that thread count, and reused."""
    flags = {"batch_size": 16, **flags}
    options = CalibrateOptions(data=str(EXAMPLES / "digits_calib.npz"), num_samples=64,
                               eval_data=str(VAL), **flags)
    files, report = quantize_model(DIGITS, "tensorrt", options)
    assert kernel_sessions == [True]  # the float model and the simulation were reused
    rules = get_backend("tensorrt")
    scratch = kernels.check_kernels(
        files["model.qdq.onnx"], str(DIGITS), _held_out(64, 16), rules,
        target=resolve_target(rules.options.get("target_cpu", "auto")), openvino=False)
    assert kernel_sessions == [True, False, False, True]  # from scratch: all three
    assert report["ort_kernels"] == scratch.to_dict()
    assert report["ort_kernels"]["samples"] == 64
    # the float model against the simulation: what the evaluation measured too
    assert scratch.simulated_sqnr_db == pytest.approx(
        report["evaluation"]["outputs"][0]["sqnr_db"], abs=1e-3)


def _digits_qdq():
    files, _ = quantize_model(DIGITS, "tensorrt", CalibrateOptions(
        data=str(EXAMPLES / "digits_calib.npz"), num_samples=64, analysis="none",
        bias_correction="off"))
    return files["model.qdq.onnx"]


def test_recorded_runs_give_the_same_check_and_respect_the_budget(kernel_sessions):
    """A record that kept every row, half of them (budget), or none: the same numbers."""
    model = _digits_qdq()
    float_graph = load(DIGITS)
    rules = get_backend("tensorrt")
    target = resolve_target("auto")
    scratch = kernels.check_kernels(model, float_graph, _held_out(48, 8), rules,
                                    target=target, openvino=False).to_dict()
    row_bytes = 8 * 10 * 4  # a batch of 8 rows of 10 float32 logits
    for budget, expected in ((None, [True]), (3 * row_bytes, [True, False, False]),
                             (0, [True, False, False])):
        record = RecordedRuns(budget, kernels.MAX_SAMPLES)
        with record.active():
            evaluate(float_graph, model, _held_out(48, 8))
        assert record.bytes <= (budget if budget is not None else record.bytes)
        kernel_sessions.clear()
        check = kernels.check_kernels(model, float_graph, _held_out(48, 8), rules,
                                      target=target, openvino=False, recorded=record)
        assert kernel_sessions == expected, budget
        assert check.to_dict() == scratch


def test_recorded_rows_stop_at_the_kernel_checks_count():
    model = _digits_qdq()
    record = RecordedRuns(None, 16)
    with record.active():
        evaluate(load(DIGITS), model, _held_out(48, 8))
    assert record.bytes == 2 * 16 * 10 * 4  # 16 rows of float and of simulated logits
    off = RecordedRuns(None, 16)
    evaluate(load(DIGITS), model, _held_out(16, 8))  # not active: nothing kept
    assert off.bytes == 0


def test_evaluate_opens_the_quantized_session_after_the_float_one_closed(monkeypatch):
    """When the held rows cost less than the quantized weights, the two sessions of
    ``evaluate`` are never alive together (counted by weak references)."""
    ev = sys.modules["qtool.analysis.evaluate"]  # the package's name is the function

    alive: set[int] = set()
    most = [0]
    real = collector.open_session

    def tracked(model_bytes, options, purpose):
        session = real(model_bytes, options, purpose)
        alive.add(id(session))
        most[0] = max(most[0], len(alive))
        weakref.finalize(session, alive.discard, id(session))
        return session

    monkeypatch.setattr(collector, "open_session", tracked)
    model = _digits_qdq()
    quant_weights = ev._weight_bytes(onnx.load_from_string(model), onnx.load_from_string(model))
    held = _held_out(8, 2)
    held_bytes = sum(b["input"].nbytes + 2 * 10 * 4 for b in held)
    assert held_bytes < quant_weights  # the digits CNN's weights outweigh 8 rows
    sequential = evaluate(load(DIGITS), model, held)
    assert most[0] == 1
    most[0] = 0
    monkeypatch.setattr(ev, "HOLD_BYTES", 0)  # nothing held: both open, as before
    interleaved = evaluate(load(DIGITS), model, _held_out(8, 2))
    assert most[0] == 2
    assert sequential.to_dict() == interleaved.to_dict()
    assert serialize(load(DIGITS))  # the float model was not changed


def test_over_2_gb_the_kernel_check_reuses_and_sessions_open_one_at_a_time(
        tmp_path, monkeypatch, kernel_sessions):
    """The large-model path (issue 25; the threshold lowered as in test_large_model.py): the
    float model goes to onnxruntime as its path and the Q/DQ graph as a temporary file, yet
    the kernel check finds their runs, and no two analysis sessions are alive together."""
    from test_large_model import THRESHOLD, _model

    import qtool.io

    monkeypatch.setattr(qtool.io, "LARGE_MODEL_BYTES", THRESHOLD)
    alive: set[int] = set()
    most = {"evaluate": 0}
    real = collector.open_session

    def tracked(model_bytes, options, purpose):
        session = real(model_bytes, options, purpose)
        alive.add(id(session))
        if purpose == "analyse it":
            most["evaluate"] = max(most["evaluate"], len(alive))
        weakref.finalize(session, alive.discard, id(session))
        return session

    monkeypatch.setattr(collector, "open_session", tracked)
    path, _ = _model(tmp_path)
    options = CalibrateOptions(data=str(tmp_path / "calib.npz"),
                               eval_data=str(tmp_path / "val.npz"))
    files, report = quantize_model(path, "onnxruntime", options)
    assert kernel_sessions == [True] and most["evaluate"] == 1
    (tmp_path / "out").mkdir()
    for name, data in files.items():  # model.qdq.onnx + its data file, as written
        target = tmp_path / "out" / name
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            with open(target, "wb") as handle:
                data(handle)
    rules = get_backend("onnxruntime")
    val = np.load(tmp_path / "val.npz")["x"]
    scratch = kernels.check_kernels(
        str(tmp_path / "out" / "model.qdq.onnx"), str(path),
        [{"x": val[i:i + options.batch_size]} for i in range(0, len(val), options.batch_size)],
        rules,
        target=resolve_target(rules.options.get("target_cpu", "auto")), openvino=False)
    assert report["ort_kernels"] == scratch.to_dict()
