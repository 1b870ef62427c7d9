"""Outputs judged per slice, the task recognised by default, floors on the task.

References are computed here with numpy and onnxruntime: the SQNR formula on the slice, the
argmax agreement of float and quantized log-probabilities, IoU and NMS by hand.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from detect_head import head_bytes, images, nms_by_box
from qtool.cli import main

from qtool.analysis.slices import SliceSums, worst_slice_sqnr
from qtool.analysis.tasks import Task, YoloDecoder, recognize, resolve_task
from qtool.report.floors import TASK_FLOORS, apply_floors, task_floor


def _db(x, q):
    x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
    return 10 * math.log10(np.sum(x * x) / np.sum((x - q) ** 2))


def _head_like(layout: str, rng):
    boxes = rng.uniform(0, 320, (6, 4, 40))
    scores = 1 / (1 + np.exp(-rng.normal(0, 3, (6, 3, 40))))
    x = np.concatenate([boxes, scores], axis=1)
    q = x.copy()
    q[:, :4] += rng.normal(0, 0.2, q[:, :4].shape)
    q[:, 4:] = np.round(q[:, 4:] / 1.255) * 1.255  # one shared 8-bit scale: {0, 1.255}
    if layout == "nac":
        x, q = x.transpose(0, 2, 1), q.transpose(0, 2, 1)
    return x, q


@pytest.mark.parametrize("layout", ["nca", "nac"])
def test_worst_slice_is_the_score_slice(layout):
    x, q = _head_like(layout, np.random.default_rng(0))
    result = worst_slice_sqnr(x, q)
    axis = 1 if layout == "nca" else 2
    scores = (slice(None),) * axis + (slice(4, 7),)
    boxes = (slice(None),) * axis + (slice(0, 4),)
    assert [(s.axis, s.start, s.stop) for s in result.slices] == [(axis, 0, 4), (axis, 4, 7)]
    assert result.worst.sqnr_db == pytest.approx(_db(x[scores], q[scores]))
    assert result.slices[0].sqnr_db == pytest.approx(_db(x[boxes], q[boxes]))
    assert result.whole_sqnr_db == pytest.approx(_db(x, q))
    assert result.whole_sqnr_db > 35 and result.worst_sqnr_db < 10  # whole hides the slice
    assert result.worst.label("out") == ("out[:, 4:7]" if axis == 1 else "out[:, :, 4:7]")


def test_even_ranges_are_judged_whole_and_streaming_matches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 10))
    assert worst_slice_sqnr(x, x + rng.normal(0, 0.1, x.shape)).slices == ()
    x, q = _head_like("nca", rng)
    one, parts = SliceSums(), [SliceSums(), SliceSums()]
    one.update(x[:3], q[:3])
    one.update(x[3:], q[3:])
    parts[0].update(x[:3], q[:3])
    parts[1].update(x[3:], q[3:])
    parts[0].merge(parts[1])
    assert one.result().slices == parts[0].result().slices == worst_slice_sqnr(x, q).slices


def test_recognize_known_heads():
    rng = np.random.default_rng(2)
    x, _ = _head_like("nca", rng)
    assert recognize({"out": x}) == Task("detect", (("output", "out"),))
    assert recognize({"out": x.transpose(0, 2, 1)}) == Task("detect", (("output", "out"),))
    # a head exported without its decoding (YOLOX): grid offsets around 0, log sizes, sigmoid
    # objectness and class: not boxes, so no detect metric judges it
    raw = np.concatenate([rng.uniform(-0.05, 1.2, (2, 3549, 2)),
                          rng.uniform(0.0, 2.8, (2, 3549, 2)), rng.uniform(0, 1, (2, 3549, 2))],
                         axis=2)  # 2 % negative, as ddddocr's YOLOX head: the extent tells
    assert recognize({"output": raw}) is None
    raw[..., :2] = rng.normal(0.3, 0.6, (2, 3549, 2))  # offsets often negative
    raw[0, 0, 2] = 40.0
    assert recognize({"output": raw}) is None
    decoded = raw.copy()
    decoded[..., :4] = rng.uniform(0, 416, (2, 3549, 4))
    assert recognize({"output": decoded}) == Task("detect", (("output", "output"),))
    logits = rng.normal(size=(2, 9, 5))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert recognize({"feat": rng.normal(size=(2, 9, 5)), "lp": log_probs}) == Task(
        "ctc", (("output", "lp"),))
    assert recognize({"logits": rng.normal(size=(4, 10))}) == Task(
        "classify", (("output", "logits"),))
    assert recognize({"feat": rng.normal(size=(2, 9, 5))}) is None
    embedding = rng.normal(size=(4, 384))  # a sentence embedding: unit rows, no classes
    assert recognize({"emb": embedding / np.linalg.norm(embedding, axis=1, keepdims=True)}) is None
    assert resolve_task("none") is None
    assert resolve_task("auto") == Task("auto")


def test_yolo_decoder_thresholds_converts_and_suppresses():
    # anchors (cx, cy, w, h): two overlapping class-1 boxes, a class-0 box, one under 0.25
    # (and four more under 0.25: anchors outnumber the 4 + C rows, as in every YOLO head)
    boxes = np.array([[50, 50, 40, 40], [54, 50, 40, 40], [200, 100, 20, 10]] + [[10, 10, 5, 5]]
                     * 5, np.float64)
    scores = np.array([[0.1, 0.1, 0.9] + [0.2] * 5, [0.8, 0.7, 0.05] + [0.1] * 5])
    output = np.concatenate([boxes.T, scores], axis=0)[None]  # [1, 4 + 2, 8]
    iou = (36 * 40) / (2 * 40 * 40 - 36 * 40)  # xyxy (30,30,70,70) and (34,30,74,70)
    assert 0.7 < iou < 0.9
    (kept_boxes, kept_scores, kept_classes), = YoloDecoder("out")({"out": output})
    assert kept_scores.tolist() == [0.9, 0.8]  # the overlapping 0.7 is suppressed at 0.7
    assert kept_classes.tolist() == [0, 1]
    assert kept_boxes.tolist() == [[190, 95, 210, 105], [30, 30, 70, 70]]
    (_, loose, _), = YoloDecoder("out", nms_iou=0.9)({"out": output})
    assert loose.tolist() == [0.9, 0.8, 0.7]
    (_, transposed, _), = YoloDecoder("out", nms_iou=0.9)({"out": output.transpose(0, 2, 1)})
    assert transposed.tolist() == [0.9, 0.8, 0.7]


def test_yolo_decoder_objectness_multiplies_the_class_scores():
    """YOLOv5/YOLOX ``4 + 1 + C``: score = objectness x class score, by hand."""
    boxes = np.array([[50, 50, 40, 40], [200, 100, 20, 10], [120, 120, 30, 30]]
                     + [[10, 10, 5, 5]] * 5, np.float64)
    objectness = np.array([0.9, 0.3, 0.95] + [0.05] * 5)
    classes = np.array([[0.8, 0.9, 0.1] + [0.5] * 5, [0.2, 0.1, 0.6] + [0.5] * 5])
    output = np.concatenate([boxes, objectness[:, None], classes.T], axis=1)[None]  # [1, A, 7]
    (kept, scores, labels), = YoloDecoder("out", objectness=True)({"out": output})
    # 0.9 * 0.8 = 0.72 (class 0), 0.95 * 0.6 = 0.57 (class 1); 0.3 * 0.9 = 0.27; the rest < 0.25
    assert scores.tolist() == pytest.approx([0.72, 0.57, 0.27])
    assert labels.tolist() == [0, 1, 0]
    assert kept[0].tolist() == [30, 30, 70, 70]
    # read as 4 + C, the objectness is a class of its own: class 0 wins on the third anchor
    (_, plain_scores, plain_labels), = YoloDecoder("out")({"out": output})
    assert (0.95, 0) in zip(plain_scores.tolist(), plain_labels.tolist(), strict=True)
    assert dict(resolve_task("detect", ["output=out", "objectness=true"]).options)[
        "objectness"] is True


def test_task_floors_breach_and_name_the_collapse():
    check = task_floor({"task": "ctc", "output": "lp", "drop": 5.0,
                        "metrics": {"cer": 0.05, "step_agreement": 0.55}})
    assert [(b["metric"], b["value"]) for b in check["below"]] == [
        ("step_agreement", 0.55), ("cer_rise_pts", 5.0)]
    assert task_floor({"task": "detect", "output": "o", "drop": 10.0,
                       "metrics": {"map50": 0.9}})["below"] == []
    # the YOLOv8 whose box decoding was quantized on tensorrt (issue 24): 82.8 % is a breach
    assert [(b["metric"], b["value"]) for b in task_floor(
        {"task": "detect", "output": "o", "drop": 17.2, "metrics": {"map50": 0.828}})[
        "below"]] == [("map50", 0.828)]
    report = {"evaluation": {"outputs": [{"name": "lp", "sqnr_db": 13.4, "slices": []}],
                             "task": {"task": "classify", "output": "lp", "drop": 45.0,
                                      "metrics": {"top1_agreement": 0.55}}},
              "ort_kernels": {"kernels_sqnr_db": 9.86, "simulated_sqnr_db": 13.4},
              "warnings": []}
    calls = []
    apply_floors(report, 12.0, lambda out, floor: calls.append((out, floor)) or {
        "tensor": "gru_out", "sqnr_db": 4.0, "below_floor": True})
    assert calls == [("lp", 12.0)]  # located once per output
    assert report["task_floor"]["floors"] == TASK_FLOORS
    assert [w.split(":")[0] for w in report["warnings"]] == ["output lp", "task classify (lp)"]
    assert "kernels" in report["warnings"][0] and "9.86 dB" in report["warnings"][0]
    assert "55.00% is under the 90% floor" in report["warnings"][1]
    assert all("first collapses at gru_out (4.00 dB)" in w for w in report["warnings"])


def _gru_decoder() -> bytes:
    """A GRU decoder emitting log-probabilities [N, T, 24] over 24 close classes."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gru = torch.nn.GRU(8, 16, batch_first=True)
            self.out = torch.nn.Linear(16, 24)

        def forward(self, x):
            hidden, _ = self.gru(x)
            return torch.log_softmax(self.out(hidden), dim=-1)

    buffer = io.BytesIO()
    torch.onnx.export(Decoder().eval(), (torch.zeros(1, 12, 8),), buffer, opset_version=13,
                      input_names=["features"], output_names=["log_probs"], dynamo=False,
                      dynamic_axes={"features": {0: "batch"}, "log_probs": {0: "batch"}})
    return buffer.getvalue()


def test_recurrent_decoder_low_agreement_warns_and_fails_on_floor(tmp_path):
    model = tmp_path / "decoder.onnx"
    model.write_bytes(_gru_decoder())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", features=rng.normal(size=(48, 12, 8)).astype(np.float32))
    val = rng.normal(size=(16, 12, 8)).astype(np.float32)
    np.savez(tmp_path / "val.npz", features=val)
    args = ["calibrate", str(model), "-b", "snpe", "--data", str(tmp_path / "calib.npz"),
            "--eval-data", str(tmp_path / "val.npz"), "--act-bits", "3"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    task = report["evaluation"]["task"]
    assert task["task"] == "ctc" and task["recognized"] and task["output"] == "log_probs"
    reference = ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(str(tmp_path / "a" / "model.qdq.onnx"),
                                 providers=["CPUExecutionProvider"])
    x = reference.run(None, {"features": val})[0]
    q = quant.run(None, {"features": val})[0]
    agreement = float(np.mean(np.argmax(x, -1) == np.argmax(q, -1)))
    assert task["metrics"]["step_agreement"] == pytest.approx(agreement, abs=1e-6)
    assert agreement < 0.9  # 3-bit activations: the floor must speak
    assert "task ctc (log_probs): per-step top-1 agreement with float" in result.output
    assert "under the 90% floor" in result.output and "collapses at" in result.output
    failed = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"), "--fail-on-floor"])
    assert failed.exit_code == 1
    assert "below the floors (--fail-on-floor)" in failed.output
    off = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "c"), "--task", "none"])
    assert off.exit_code == 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["evaluation"]["task"] is None


def test_summary_names_a_collapsed_slice_where_the_whole_output_looks_fine(tmp_path,
                                                                             monkeypatch):
    import qtool.scale_groups

    # the plan as it was before groups were split: one scale for boxes and scores
    monkeypatch.setattr(qtool.scale_groups, "split_wide_groups", lambda g, p, r, b: (p, []))
    model = tmp_path / "head.onnx"
    model.write_bytes(head_bytes())
    np.savez(tmp_path / "calib.npz", images=images(48, 1))
    np.savez(tmp_path / "val.npz", images=images(24, 2))
    result = CliRunner().invoke(main, [
        "calibrate", str(model), "-b", "tvm", "--data", str(tmp_path / "calib.npz"),
        "--eval-data", str(tmp_path / "val.npz"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    whole = report["evaluation"]["outputs"][0]
    assert whole["sqnr_db"] > 30
    (entry,) = report["sqnr_floor"]["below"]
    assert entry["slice"] == "output0[:, 4:7]" and entry["sqnr_db"] < 10
    assert entry["collapse"]["tensor"] == "/Sigmoid_output_0"
    assert "WARNING: output slice output0[:, 4:7]" in result.output
    assert "task detect (output0) (recognised" in result.output


def test_nms_suppresses_as_the_box_by_box_definition_does():
    """The vectorised NMS keeps exactly what comparing each box with the kept ones keeps."""
    from qtool.analysis.tasks import nms

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 150):
        corner = rng.uniform(0, 100, (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 40, (n, 2))], axis=1)
        scores, classes = rng.uniform(0, 1, n).round(2), rng.integers(0, 3, n)  # ties too
        for iou in (0.3, 0.7):
            kept = nms(boxes, scores, classes, iou).tolist()
            assert kept == nms_by_box(boxes, scores, classes, iou)
