"""The fidelity benchmark's metrics and input builders, against references written here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_fidelity as bench  # noqa: E402
import fidelity_data as data  # noqa: E402


def test_ctc_decode_collapses_repeats_and_drops_blank():
    charset = ["", "a", "b", "c"]
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 3, 3]  # a a _ a b b _ _ c c -> "aabc"
    logits = np.eye(4)[steps][:, None, :]  # (T, 1, C) as ddddocr's beta model
    assert bench.ctc_decode(logits, charset) == "aabc"


def test_edit_distance():
    assert bench.edit_distance("kitten", "sitting") == 3
    assert bench.edit_distance("", "abc") == 3
    assert bench.edit_distance("abc", "abc") == 0


def test_map50_by_hand():
    box = (0.0, 0.0, 10.0, 10.0)
    reference = [[(0, 1.0, *box)], [(0, 1.0, 20.0, 20.0, 30.0, 30.0)]]
    assert bench.map50(reference, reference) == 1.0
    # image 1 found (IoU 0.81), image 2 missed, one false positive ranked first:
    # precision at the true positive 1/2, recall 1/2 -> AP = 0.25
    detections = [[(0, 0.9, 1.0, 1.0, 10.0, 10.0), (0, 0.95, 50.0, 50.0, 60.0, 60.0)], []]
    assert bench.map50(reference, detections) == pytest.approx(0.25)


def test_hard_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float)
    kept = bench.hard_nms(np.array([0.5, 0.9, 0.7]), boxes, 0.5)
    assert [float(s) for s, _ in kept] == [0.9, 0.7]


def test_sqnr_formula():
    ref = np.array([3.0, 4.0])
    assert bench.sqnr_db(ref, ref + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert bench.sqnr_db(ref, ref) == 200.0


def test_magika_features_strip_and_pad():
    feats = data.magika_features(b"  \nabc\n ")
    assert feats.shape == (2048,) and feats.dtype == np.int32
    assert list(feats[:4]) == [97, 98, 99, 10] and feats[5] == 256  # lstrip, pad after
    assert list(feats[-4:]) == [10, 97, 98, 99] and feats[1024] == 256  # rstrip, pad before
    big = bytes(range(256)) * 40  # > 4096 bytes: only the first/last 4096 are read
    feats = data.magika_features(big)
    assert list(feats[:3]) == [0, 1, 2] and list(feats[-3:]) == [253, 254, 255]


def test_silero_windows_carry_64_samples_of_context():
    audio = np.arange(3 * 512, dtype=np.float32)
    windows = data.silero_windows(audio)
    assert windows.shape == (3, 576)
    assert np.all(windows[0, :64] == 0) and np.array_equal(windows[0, 64:], audio[:512])
    assert np.array_equal(windows[1], audio[512 - 64:1024])


def test_silero_wrapper_equals_the_sequence_model(tmp_path):
    """The (1, T, 576) wrapper gives the sequence model's outputs with zero state."""
    t, hidden = 62, 128
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["T", 576])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, hidden])
    y = helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT, ["T"])
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((576, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["m"]),
             helper.make_node("ReduceSum", ["h"], ["hs"], keepdims=0),
             helper.make_node("ReduceSum", ["c"], ["cs"], keepdims=0),
             helper.make_node("Add", ["hs", "cs"], ["state"]),
             helper.make_node("Add", ["m", "state"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"], axis=0),
             helper.make_node("Squeeze", ["f", "zero"], ["speech_probs"])]
    zero = onnx.numpy_helper.from_array(np.array([0], np.int64), "zero")
    graph = helper.make_graph(nodes, "seq", [x, h, c], [y], [w, zero])
    src, dst = tmp_path / "seq.onnx", tmp_path / "wrapped.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)]), src)
    bench.silero_wrapper(src, dst)
    audio = rng.standard_normal((t, 576)).astype(np.float32)
    zeros = np.zeros((1, 1, hidden), np.float32)
    want = ort.InferenceSession(src).run(None, {"input": audio, "h": zeros, "c": zeros})[0]
    got = ort.InferenceSession(dst).run(None, {"audio": audio[None]})[0]
    assert got.shape == (1, t)
    np.testing.assert_array_equal(got[0], want)


def test_ocr_rendering_is_seeded():
    first, held, texts = data.ddddocr(2, 2, seed=3)
    again, _, texts_again = data.ddddocr(2, 2, seed=3)
    assert texts == texts_again and all(4 <= len(s) <= 6 for s in texts)
    assert first[0]["input1"].shape == (1, 1, 64, 200)
    np.testing.assert_array_equal(first[0]["input1"], again[0]["input1"])


def test_db_boxes_unclip_a_rectangle_by_area_times_ratio_over_perimeter():
    prob = np.zeros((1, 1, 60, 100), np.float32)
    prob[0, 0, 20:31, 10:51] = 0.9  # one text line: 41 x 11 pixels above thresh
    (box,) = bench.db_boxes(prob)
    # the 2x2 dilation grows it by one pixel right and down: x 10..51, y 20..31
    w, h = 41, 11
    d = w * h * 1.6 / (2 * (w + h))  # DB's unclip distance: area * ratio / perimeter
    np.testing.assert_allclose(box, [10 - d, 20 - d, 51 + d, 31 + d], atol=1e-6)
    prob[0, 0, 20:31, 10:51] = 0.35  # above the pixel thresh 0.3, below the box score 0.5
    assert len(bench.db_boxes(prob)) == 0


def test_box_fscore_by_hand():
    ref = [np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)]
    found = [np.array([[1, 0, 10, 10], [50, 50, 60, 60], [0, 0, 9, 10]], float)]
    # one match (IoU 0.9); the third box overlaps the already matched reference only
    assert bench.box_fscore(ref, found) == pytest.approx(2 * 1 / (2 + 3))
    assert bench.box_fscore(ref, ref) == 1.0


def test_yolov8_detections_decode_centre_size_and_suppress_across_classes():
    out = np.zeros((1, 6, 3), np.float32)  # 4 box rows + 2 classes, 3 anchors
    out[0, :4, 0] = [50, 50, 20, 10]  # cx, cy, w, h
    out[0, :4, 1] = [51, 50, 20, 10]  # overlaps anchor 0 (IoU > 0.45), other class
    out[0, :4, 2] = [200, 200, 10, 10]
    out[0, 4:, 0] = [0.9, 0.1]
    out[0, 4:, 1] = [0.1, 0.8]
    out[0, 4:, 2] = [0.2, 0.25]  # below conf 0.3
    dets = bench.yolov8_detections(out)
    assert dets == [(0, pytest.approx(0.9), 40.0, 45.0, 60.0, 55.0)]


def test_ppocr_line_input_keeps_ratio_and_pads_with_zeros():
    from PIL import Image

    img = Image.new("RGB", (100, 50), (255, 255, 255))  # ratio 2 -> width 96 at height 48
    x = data.ppocr_line_input(img, 48, 320)
    assert x.shape == (1, 3, 48, 320)
    np.testing.assert_allclose(x[..., :96], 1.0)  # (255 / 255 - 0.5) / 0.5
    assert not x[..., 96:].any()
