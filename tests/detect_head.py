"""A YOLOv8-style detection head from torch: pixel boxes concatenated with sigmoid scores.

The output is ``Concat([boxes, scores], axis=1)`` of shape ``[N, 4 + C, A]`` as ultralytics
exports it: ``boxes`` are ``cx, cy, w, h`` in pixels of a 320-pixel image (a grid of anchor
points and the distances to the box sides regressed by a Conv, times the stride, as
ultralytics' ``dist2bbox``), ``scores`` are ``sigmoid`` of a class
Conv whose logits are spread over about -8..6 (most anchors see no object). The weights are
constructed, not trained: a backbone that responds to bright blobs and class channels that
read the blob's colour, so float detections follow the data (the images hold 1-3 coloured
squares on noise).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import onnx

CLASSES = 3
SIZE = 32  # input pixels; the boxes are scaled to IMAGE pixels
IMAGE = 320
STRIDE_FEATURE = 4  # feature map 8x8: 64 anchors


def _module():
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.stem = nn.Conv2d(3, 16, 3, STRIDE_FEATURE, 1)
            self.box = nn.Conv2d(16, 4, 1)
            self.cls = nn.Conv2d(16, CLASSES, 1)
            with torch.no_grad():
                # Channels 0-2 copy the colours (blob detectors), the rest mix them.
                weight = torch.randn(16, 3, 3, 3, generator=gen) * 0.2
                for c in range(3):
                    weight[c] = 0.0
                    weight[c, c] = 1.0 / 9.0
                self.stem.weight.copy_(weight)
                self.stem.bias.copy_(torch.randn(16, generator=gen) * 0.05)
                self.box.weight.copy_(torch.randn(4, 16, 1, 1, generator=gen) * 0.3)
                self.box.bias.fill_(1.0)
                cls = torch.randn(CLASSES, 16, 1, 1, generator=gen) * 0.5
                for c in range(CLASSES):
                    cls[c, :3] = -6.0
                    cls[c, c] = 14.0
                self.cls.weight.copy_(cls)
                self.cls.bias.fill_(-4.0)
            side = SIZE // STRIDE_FEATURE
            ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5,
                                    indexing="ij")
            self.register_buffer("anchors", torch.stack([xs.reshape(-1), ys.reshape(-1)]))
            self.scale = IMAGE / side  # pixels per anchor step

        def forward(self, x):
            feat = torch.relu(self.stem(x))
            n = x.shape[0]
            dist = torch.relu(self.box(feat)).reshape(n, 4, -1)
            lt, rb = dist[:, :2], dist[:, 2:]
            centre = self.anchors + (rb - lt) / 2
            boxes = torch.cat([centre, lt + rb], 1) * self.scale
            scores = torch.sigmoid(self.cls(feat).reshape(n, CLASSES, -1))
            return torch.cat([boxes, scores], 1)

    return Head().eval()


@functools.cache
def head_bytes(opset: int = 13) -> bytes:
    """The exported head (input ``images`` [N, 3, 32, 32], output ``output0`` [N, 4+C, A]).

    The classic exporter (``dynamo=False``) with a dynamic batch, as ultralytics exports.
    """
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(_module(), (torch.zeros(1, 3, SIZE, SIZE),), buffer, opset_version=opset,
                      input_names=["images"], output_names=["output0"], dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue()).SerializeToString()


def images(count: int, seed: int) -> np.ndarray:
    """``count`` images of 1-3 coloured squares on noise, [count, 3, SIZE, SIZE] in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = rng.uniform(0.0, 0.15, (count, 3, SIZE, SIZE)).astype(np.float32)
    for image in out:
        for _ in range(rng.integers(1, 4)):
            side = int(rng.integers(6, 14))
            y, x = rng.integers(0, SIZE - side, 2)
            colour = rng.integers(0, 3)
            image[colour, y:y + side, x:x + side] = rng.uniform(0.7, 1.0)
    return out


def float_outputs(model_bytes: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": batch})[0]


def nms_by_box(boxes, scores, classes, iou) -> list[int]:
    """Greedy per-class NMS by its definition, box by box: the reference the tests hold
    :func:`qtool.analysis.tasks.nms` to (a box is kept unless a kept box of its class, of
    higher score, overlaps it by more than ``iou``)."""
    from qtool.analysis.tasks import box_iou

    kept: list[int] = []
    for k in np.argsort(-scores, kind="stable"):
        same = [j for j in kept if classes[j] == classes[k]]
        if same and np.max(box_iou(boxes[k], boxes[same])) > iou:
            continue
        kept.append(int(k))
    return kept
