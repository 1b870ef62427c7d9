"""Task metrics (``--task ctc|detect``) on small graphs whose answers are known.

The references are computed here by separate code: greedy CTC decoding and an edit distance
written in this file over onnxruntime runs of the two models, and the mAP of hand-placed
boxes worked out by hand (the precision/recall steps are in the comments).
"""

from __future__ import annotations

import json
import pickle
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from outlier_model import HARD_LAYER, VAL, outlier_graph
from qtool.cli import main

from qtool.analysis.evaluate import tally
from qtool.analysis.tasks import Task, resolve_task
from qtool.errors import TaskError
from qtool.io import save

T, C = 10, 6  # CTC steps; classes: blank 0, characters 1..4, an outlier channel 5
SAMPLES = 24


# ------------------------------------------------------------------------------ CTC model


def ctc_model(layout: str = "tnc", swap: bool = False) -> onnx.ModelProto:
    """x [1, T, C] -> mm1 (drops channel 5) -> mm2 (identity) -> logits, as exported.

    Channel 5 of x is 100: one per-tensor 8-bit scale for x (mm1's input) rounds 2.2 and 2.0
    to the same level, and argmax then takes the lower index. mm1's output no longer has the
    outlier, so quantizing mm2's input keeps every decision. ``swap``: mm2 swaps classes 1
    and 2 (another model with the same inputs and outputs).
    """
    w1 = np.eye(C, dtype=np.float32)
    w1[C - 1, C - 1] = 0.0
    w2 = np.eye(C, dtype=np.float32)[:, [0, 2, 1, 3, 4, 5] if swap else slice(None)]
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1")),
        helper.make_node("Constant", [], ["w2"],
                         value=numpy_helper.from_array(np.ascontiguousarray(w2), "w2")),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y" if layout == "tnc" else "logits"],
                         name="mm2"),
    ]
    shape = [1, T, C]
    if layout == "tnc":
        nodes.append(helper.make_node("Transpose", ["y"], ["logits"], perm=[1, 0, 2],
                                      name="to_tnc"))
        shape = [T, 1, C]
    graph = helper.make_graph(
        nodes, "ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, C])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def ctc_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Inputs, labels padded with -1, and the lines the float model decodes."""
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.random((SAMPLES, T, C))).astype(np.float32)
    x[:, :, C - 1] = 100.0
    lines = []
    for n in range(SAMPLES):
        steps = rng.integers(0, C - 1, size=T)
        for t, c in enumerate(steps):
            x[n, t, c] = 2.2
            if rng.random() < 0.5:  # a close runner-up of a lower index
                x[n, t, (c - 1) % (C - 1)] = 2.0
        line, previous = [], -1
        for c in steps:
            if c != previous and c != 0:
                line.append(int(c))
            previous = c
        lines.append(line)
    labels = np.full((SAMPLES, T), -1, np.int64)
    for n, line in enumerate(lines):
        labels[n, : len(line)] = line
    return x, labels, lines


def run(model, x: np.ndarray) -> np.ndarray:
    """The model's logits for every sample, [N, T, C] (onnxruntime, optimizations off)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    outputs = [session.run(None, {"x": x[n : n + 1]})[0] for n in range(len(x))]
    return np.stack([o.reshape(T, C) for o in outputs])


def decode(logits: np.ndarray) -> list[int]:
    """Greedy CTC of one [T, C] line, written for this test."""
    best = [int(np.argmax(step)) for step in logits]
    return [c for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])]


def levenshtein(a: list[int], b: list[int]) -> int:
    """Edit distance by memoized recursion (not the DP table qtool uses)."""

    @cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@pytest.fixture(scope="module")
def ctc_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctc")
    x, labels, lines = ctc_data()
    np.savez(folder / "labelled.npz", x=x, labels=labels)
    np.savez(folder / "plain.npz", x=x)
    for layout in ("tnc", "ntc"):
        onnx.save(ctc_model(layout), folder / f"ctc_{layout}.onnx")
    return folder, x, labels, lines


def _calibrate(folder, name: str, data: str, *extra: str):
    out = folder / f"out-{name}-{len(extra)}-{abs(hash(extra))}"
    result = CliRunner().invoke(main, [
        "calibrate", str(folder / f"{name}.onnx"), "--backend", "tensorrt", "--data",
        str(folder / data), "--eval-data", str(folder / data), "--no-bias-correction",
        "-o", str(out), "--quiet", *extra,
    ])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("layout", ["tnc", "ntc"])
def test_ctc_cer_matches_an_independent_edit_distance(ctc_files, layout):
    folder, x, labels, lines = ctc_files
    out, report = _calibrate(folder, f"ctc_{layout}", "labelled.npz", "--task", "ctc")
    float_logits = run(ctc_model(layout), x)
    quant_logits = run(out / "model.qdq.onnx", x)
    float_lines = [decode(f) for f in float_logits]
    quant_lines = [decode(q) for q in quant_logits]
    assert float_lines == lines  # the decode the data was built for
    vs_float = sum(levenshtein(q, f) for q, f in zip(quant_lines, float_lines, strict=True))
    chars = sum(len(f) for f in float_lines)
    assert vs_float > 0  # the outlier costs characters

    result = CliRunner().invoke(main, [
        "evaluate", str(folder / f"ctc_{layout}.onnx"), str(out / "model.qdq.onnx"),
        "--data", str(folder / "labelled.npz"), "--task", "ctc", "--format", "json",
        "--batch-size", "5",
    ])
    assert result.exit_code == 0, result.output
    task = json.loads(result.output)["task"]
    exact = sum(q == f for q, f in zip(quant_lines, float_lines, strict=True))
    assert task["metrics"]["cer"] == pytest.approx(vs_float / chars, rel=1e-5)
    assert task["metrics"]["line_accuracy"] == pytest.approx(exact / SAMPLES, rel=1e-5)
    truth = [[int(v) for v in row if v >= 0] for row in labels]
    quant_vs_truth = sum(levenshtein(q, t) for q, t in zip(quant_lines, truth, strict=True))
    assert task["metrics"]["float_cer"] == 0.0
    assert task["metrics"]["quant_cer"] == pytest.approx(
        quant_vs_truth / sum(len(t) for t in truth), rel=1e-5)
    assert task["drop"] == pytest.approx(100.0 * task["metrics"]["quant_cer"], rel=1e-5)
    assert task["judged_by"] == "CER rise against the labels"
    assert report["evaluation"]["task"] == task  # calibrate reports what evaluate measures
    assert "task ctc (logits): CER vs float" in (out / "report.md").read_text()
    assert "CER vs float" in (out / "report.html").read_text()


def test_max_accuracy_drop_with_ctc_keeps_the_hard_layer_float(ctc_files):
    folder, x, _, lines = ctc_files
    out, report = _calibrate(folder, "ctc_tnc", "plain.npz", "--task", "ctc",
                             "--max-accuracy-drop", "0")
    fallback = report["analysis"]["fallback"]
    assert fallback["judged_by"] == "CER against the float model's decode"
    assert fallback["steps"][0]["accuracy_drop"] > 0
    assert fallback["met"] and fallback["float_layers"] == ["mm1"]
    assert "mm1" in report["plan"]["float_nodes"]
    assert [decode(q) for q in run(out / "model.qdq.onnx", x)] == lines
    assert report["evaluation"]["task"]["metrics"]["cer"] == 0.0
    assert "CER against the float model's decode" in (out / "report.md").read_text()
    layers = report["analysis"]["layers"]  # ranked by the task's drop
    assert [s["node"] for s in layers] == ["mm1", "mm2"]
    assert layers[0]["task_drop"] == fallback["steps"][0]["accuracy_drop"]
    assert layers[1]["task_drop"] == 0.0
    assert "task drop (pts)" in (out / "report.html").read_text()


# ------------------------------------------------------------------------ detection model

# Four boxes, xyxy, 20.24 px wide; the "quantized" model moves box 1 by 15 px: IoU
# 5.24/35.24 < 0.5 with its own float box and 0 with the others.
BOXES = (np.array([[0, 0, 20, 20], [40, 0, 60, 20], [80, 0, 100, 20], [0, 40, 20, 60]])
         + np.array([0.37, 0.21, 0.61, 0.43])).astype(np.float32)
SCORES = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
SHIFT = 15.0

DECODER = '''
import numpy as np

def decode(outputs):
    """Boxes [N, K, 4] and scores [N, K]; the last box is class 1, the others class 0."""
    images = []
    for boxes, scores in zip(outputs["boxes"], outputs["scores"]):
        classes = np.zeros(len(scores), int)
        classes[-1] = 1
        images.append((boxes, scores, classes))
    return images
'''


def detector(shift: float) -> onnx.ModelProto:
    """boxes = boxes_in + offset (box 1 moved right by ``shift``), scores = scores_in * 1."""
    offset = np.zeros((4, 4), np.float32)
    offset[1, [0, 2]] = shift
    nodes = [
        helper.make_node("Constant", [], ["offset"], value=numpy_helper.from_array(offset)),
        helper.make_node("Constant", [], ["one"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Add", ["boxes_in", "offset"], ["boxes"], name="place"),
        helper.make_node("Mul", ["scores_in", "one"], ["scores"], name="score"),
    ]
    graph = helper.make_graph(
        nodes, "detector",
        [helper.make_tensor_value_info("boxes_in", TensorProto.FLOAT, [1, 4, 4]),
         helper.make_tensor_value_info("scores_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.fixture(scope="module")
def detect_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detect")
    onnx.save(detector(0.0), folder / "float.onnx")
    onnx.save(detector(SHIFT), folder / "moved.onnx")
    np.savez(folder / "data.npz", boxes_in=BOXES[None], scores_in=SCORES[None])
    (folder / "decoder.py").write_text(DECODER)
    (folder / "nodecode.py").write_text("def other(outputs):\n    return []\n")
    return folder


def _evaluate(folder, quant: str, *task: str):
    result = CliRunner().invoke(main, [
        "evaluate", str(folder / "float.onnx"), str(folder / quant), "--data",
        str(folder / "data.npz"), "--format", "json", *task,
    ])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["task"]


def test_map50_with_a_decoder_recipe(detect_files):
    # Class 0: detections 0.9 (hit), 0.8 (moved: miss), 0.7 (hit) against 3 float boxes:
    # precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3; interpolated AP = 1/3 * 1 + 1/3 * 2/3
    # = 5/9. Class 1: one box, found: AP 1. mAP = (5/9 + 1) / 2 = 7/9.
    task = _evaluate(detect_files, "moved.onnx", "--task", "detect", "--task-decoder",
                     str(detect_files / "decoder.py"))
    assert task["metrics"]["map50"] == pytest.approx(7 / 9, rel=1e-5)
    assert task["drop"] == pytest.approx(100 * (1 - 7 / 9), rel=1e-5)
    assert task["metrics"]["float_detections"] == 4
    assert task["output"] == "decoder.py"
    same = _evaluate(detect_files, "float.onnx", "--task", "detect", "--task-decoder",
                     f"{detect_files / 'decoder.py'}:decode")
    assert same["metrics"]["map50"] == 1.0 and same["drop"] == 0.0


def test_map50_with_the_builtin_box_decoder(detect_files):
    # One class: 0.9 hit, 0.8 miss, 0.7 hit, 0.6 hit against 4 boxes: precision 1, 1/2,
    # 2/3, 3/4 at recall 1/4, 1/4, 1/2, 3/4; AP = 1/4 * 1 + 1/4 * 3/4 + 1/4 * 3/4 = 5/8.
    task = _evaluate(detect_files, "moved.onnx", "--task", "detect",
                     "--task-option", "boxes=boxes", "--task-option", "scores=scores")
    assert task["metrics"]["map50"] == pytest.approx(5 / 8, rel=1e-5)
    # min_score drops the 0.6 box from both models: 0.9 hit, 0.8 miss, 0.7 hit of 3:
    # AP = 1/3 + 1/3 * 2/3 = 5/9.
    task = _evaluate(detect_files, "moved.onnx", "--task", "detect", "--task-option",
                     "boxes=boxes", "--task-option", "scores=scores", "--task-option",
                     "min_score=0.65")
    assert task["metrics"]["map50"] == pytest.approx(5 / 9, rel=1e-5)


def test_calibrate_reports_map_of_the_quantized_detector(detect_files, tmp_path):
    result = CliRunner().invoke(main, [
        "calibrate", str(detect_files / "float.onnx"), "-b", "tvm", "--data",
        str(detect_files / "data.npz"), "--task", "detect", "--task-decoder",
        str(detect_files / "decoder.py"), "-o", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    assert "task detect (decoder.py): mAP@0.5 vs float 100.00%" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["evaluation"]["task"]["metrics"]["map50"] == 1.0
    # independently: every quantized box overlaps its float box by IoU > 0.5
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "out" / "model.qdq.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    boxes = session.run(["boxes"], {"boxes_in": BOXES[None], "scores_in": SCORES[None]})[0][0]
    assert not np.array_equal(boxes, BOXES)  # quantized: the boxes moved a little
    for a, b in zip(boxes, BOXES, strict=True):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        inter = max(w, 0) * max(h, 0)
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        assert inter / union > 0.5


def test_task_metrics_merge_shards_like_one_pass():
    """Shards tallied apart (and pickled, as worker processes return them) merge exactly."""
    x, labels, _ = ctc_data()
    cases = [
        (ctc_model(), ctc_model(swap=True), Task("ctc"),
         [{"x": x[i : i + 1], "labels": labels[i : i + 1]} for i in range(SAMPLES)]),
        (detector(0.0), detector(SHIFT), resolve_task("detect", ["boxes=boxes", "scores=scores"]),
         [{"boxes_in": BOXES[None] + i, "scores_in": SCORES[None]} for i in range(6)]),
    ]
    for float_model, quant_model, task, batches in cases:
        whole = tally(float_model, quant_model, batches, task=task).evaluation().task
        first = tally(float_model, quant_model, batches[:5], task=task)
        second = pickle.loads(pickle.dumps(tally(float_model, quant_model, batches[5:],
                                                 task=task)))
        first.merge(second)
        assert first.evaluation().task == whole
        assert whole.drop > 0


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "segment"], "Invalid value for '--task'"),
    (["--task", "ctc", "--task-option", "blnk=1"], "error: task ctc has no option blnk"),
    (["--task", "ctc", "--task-option", "blank=x"], "error: task option blank='x' is not a int"),
    (["--task", "ctc", "--task-option", "blank"], "is not KEY=VALUE"),
    (["--task", "ctc", "--task-option", "layout=nct"], "layout=nct is not one of"),
    (["--task-option", "blank=1"], "error: --task-option and --task-decoder need --task"),
    (["--task", "detect"], "error: --task detect needs the model's decoding"),
    (["--task", "detect", "--task-decoder", "missing.py"], "decoder file missing.py not found"),
    (["--task", "ctc", "--task-decoder", "decoder.py"], "--task-decoder is for --task detect"),
    (["--task", "detect", "--task-option", "boxes=nope", "--task-option", "scores=scores"],
     "error: --task detect: the model has no output 'nope'"),
])
def test_bad_task_arguments_are_one_clear_error(detect_files, monkeypatch, args, message):
    monkeypatch.chdir(detect_files)
    result = CliRunner().invoke(main, [
        "evaluate", "float.onnx", "moved.onnx", "--data", "data.npz", *args])
    assert result.exit_code == 2
    assert message in result.output
    if message.startswith("error:"):
        assert "hint:" in result.output


def test_a_decoder_file_without_the_function_is_an_error(detect_files, tmp_path):
    result = CliRunner().invoke(main, [
        "calibrate", str(detect_files / "float.onnx"), "-b", "tvm", "--data",
        str(detect_files / "data.npz"), "--task", "detect", "--task-decoder",
        str(detect_files / "nodecode.py"), "-o", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2
    assert "has no function decode()" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(TaskError, match="has no function other2"):
        resolve_task("detect", decoder=f"{detect_files / 'nodecode.py'}:other2")
    assert resolve_task("detect", decoder=f"{detect_files / 'nodecode.py'}:other") == Task(
        "detect", (("decoder", f"{detect_files / 'nodecode.py'}:other"),))


def test_ctc_without_a_rank3_output_is_an_error(detect_files):
    result = CliRunner().invoke(main, [
        "evaluate", str(detect_files / "float.onnx"), str(detect_files / "moved.onnx"),
        "--data", str(detect_files / "data.npz"), "--task", "ctc", "--task-option",
        "output=scores"])
    assert result.exit_code == 2
    assert "output 'scores' has shape [1, 4], not [T, N, C] or [N, T, C]" in result.output


# ------------------------------------------------------------------------------- classify


def test_classify_without_labels_judges_the_fallback_by_agreement(tmp_path):
    save(outlier_graph(), tmp_path / "hard.onnx")
    inputs = np.load(VAL)["input"][:128]
    np.savez(tmp_path / "val.npz", input=inputs)  # no labels
    result = CliRunner().invoke(main, [
        "calibrate", str(tmp_path / "hard.onnx"), "-b", "tensorrt", "--backend-option",
        "int8_conv_rule=false", "--data",  # every conv quantized (8-channel convs)
        str(tmp_path / "val.npz"), "--eval-data", str(tmp_path / "val.npz"), "--task",
        "classify", "--max-accuracy-drop", "0", "--no-bias-correction", "-o",
        str(tmp_path / "out"), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fallback = report["analysis"]["fallback"]
    assert fallback["judged_by"] == "top-1 disagreement with the float model"
    assert fallback["steps"][0]["accuracy_drop"] > 0 and fallback["met"]

    def classes(path):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"input": inputs[i : i + 1]})[0].argmax(1)
                               for i in range(len(inputs))])

    agree = np.mean(classes(tmp_path / "hard.onnx") == classes(tmp_path / "out" /
                                                               "model.qdq.onnx"))
    assert agree == 1.0 == report["evaluation"]["task"]["metrics"]["top1_agreement"]
    assert fallback["steps"][-1]["accuracy_drop"] == 0.0
    assert fallback["float_layers"] == [HARD_LAYER]
