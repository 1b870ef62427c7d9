"""The detect task's decoding, made cheaper, keeps the results of the box-by-box definitions.

NMS and the matching of detections to the float model's boxes were a Python step per box;
they are now vectorised, and the float outputs of a batch are decoded once for all the
candidates judged against them. Each is checked here against the plain definition.
"""

from __future__ import annotations

import numpy as np
from detect_head import nms_by_box

from qtool.analysis.tasks import DetectMetric, YoloDecoder, box_iou, nms, pairwise_iou


def _boxes(rng, n):
    corner = rng.uniform(0, 100, (n, 2))
    return np.concatenate([corner, corner + rng.uniform(0, 40, (n, 2))], axis=1)


def test_pairwise_iou_rows_are_box_iou_bit_for_bit():
    rng = np.random.default_rng(1)
    rows, boxes = _boxes(rng, 37), _boxes(rng, 53)
    rows[3] = rows[3, [0, 1, 0, 1]]  # a box of no area
    matrix = pairwise_iou(rows, boxes)
    for r in range(len(rows)):
        assert np.array_equal(matrix[r], box_iou(rows[r], boxes))


def test_nms_keeps_what_the_box_by_box_definition_keeps_on_a_crowded_head():
    """Thousands of overlapping candidates of two classes, ties in the scores."""

    rng = np.random.default_rng(2)
    boxes = _boxes(rng, 1500)
    scores, classes = rng.uniform(0, 1, 1500).round(3), rng.integers(0, 2, 1500)
    for iou in (0.45, 0.7):
        assert nms(boxes, scores, classes, iou).tolist() == nms_by_box(boxes, scores, classes, iou)


def _head(rng, anchors=800, jitter=0.0):
    """A YOLO-style [1, 4 + 2, A] output: cx, cy, w, h, two class scores."""
    centre = rng.uniform(20, 300, (2, anchors)) + jitter
    size = rng.uniform(5, 60, (2, anchors))
    scores = rng.uniform(0, 1, (2, anchors))
    return np.concatenate([centre, size, scores])[None].astype(np.float32)


def test_matching_gives_the_box_by_box_hits():
    """mAP's hits: each detection, best score first, takes the best unused float box."""
    rng = np.random.default_rng(3)
    reference, quantized = _head(rng), _head(rng)
    quantized[:, :, :400] = reference[:, :, :400] + rng.normal(0, 2, (1, 6, 400))
    metric = DetectMetric(YoloDecoder("out"))
    metric.update({"out": reference}, {"out": quantized}, None, 1)
    ((ref_boxes, _, ref_classes),) = YoloDecoder("out")({"out": reference})
    ((boxes, scores, classes),) = YoloDecoder("out")({"out": quantized})
    for cls in (0, 1):
        truth = ref_boxes[ref_classes == cls]
        mine, theirs = boxes[classes == cls], scores[classes == cls]
        used, hits = np.zeros(len(truth), bool), []
        for k in np.argsort(-theirs, kind="stable"):
            overlap = box_iou(mine[k], truth)
            best = int(np.argmax(overlap))
            hit = bool(overlap[best] >= 0.5 and not used[best])
            used[best] = used[best] or hit
            hits.append(hit)
        assert metric.classes[cls].hits == hits
        assert metric.classes[cls].positives == len(truth)
    assert 0 < sum(metric.classes[0].hits) < len(metric.classes[0].hits)


def test_decodings_are_remembered_only_for_equal_values():
    rng = np.random.default_rng(4)
    head = _head(rng)
    decode = YoloDecoder("out")
    first = decode({"out": head})
    changed = head.copy()
    changed[0, 0, :] += 50.0  # the same array object changed in place must not hit
    head[...] = changed
    again = decode({"out": head})
    fresh = YoloDecoder("out")._decode(changed)
    for (a, b, c), (x, y, z) in zip(again, fresh, strict=True):
        assert np.array_equal(a, x) and np.array_equal(b, y) and np.array_equal(c, z)
    assert not np.array_equal(first[0][0], again[0][0])
    again[0][0][:] = -1.0  # a caller writing into a result does not change the next one
    assert np.array_equal(decode({"out": head})[0][0], fresh[0][0])
    looser = YoloDecoder("out", nms_iou=0.95)({"out": head})  # other options: decoded anew
    assert len(looser[0][0]) >= len(fresh[0][0])


def test_matching_without_detections_or_without_float_boxes():
    rng = np.random.default_rng(5)
    head, empty = _head(rng), _head(rng)
    empty[:, 4:] = 0.0  # no score over the threshold: nothing detected
    metric = DetectMetric(YoloDecoder("out"))
    metric.update({"out": head}, {"out": empty}, None, 1)
    assert sum(a.positives for a in metric.classes.values()) > 0
    assert all(not a.hits for a in metric.classes.values())
    metric = DetectMetric(YoloDecoder("out"))
    metric.update({"out": empty}, {"out": head}, None, 1)
    assert all(a.positives == 0 and not any(a.hits) and a.hits for a in metric.classes.values())


def test_nms_by_matrix_and_by_compacted_rows_agree(monkeypatch):
    """Up to ``_NMS_MATRIX_BOXES`` boxes a class the IoU matrix decides, above it the rows."""
    import qtool.analysis.tasks as tasks

    rng = np.random.default_rng(5)
    boxes = _boxes(rng, 1200)
    scores, classes = rng.uniform(0, 1, 1200).round(2), rng.integers(0, 3, 1200)
    for iou in (0.3, 0.5, 0.8):
        by_matrix = nms(boxes, scores, classes, iou).tolist()
        monkeypatch.setattr(tasks, "_NMS_MATRIX_BOXES", 0)
        by_rows = nms(boxes, scores, classes, iou).tolist()
        monkeypatch.setattr(tasks, "_NMS_MATRIX_BOXES", 1500)
        assert by_matrix == by_rows and 0 < len(by_matrix) < 1200
