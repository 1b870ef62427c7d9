"""Train the example model: a small CNN on scikit-learn's digits (8x8 grey images, 10 classes).

It has what makes quantization interesting in a few KB: BatchNorm (kept in the export, so
qtool's BN folding has work to do), a residual Add and a Concat. Seeded and deterministic;
run from anywhere:

    python examples/train_digits.py

writes, next to this script:
    digits_cnn.onnx     the float model (opset 13, dynamic batch, input "input" N x 1 x 8 x 8)
    digits_calib.npz    256 training images for calibration (key "input")
    digits_val.npz      500 held-out images (key "input") and their labels (key "labels")

Needs torch and scikit-learn (``pip install "qtool[qat]" scikit-learn``).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0


def build_model():
    """The CNN: stem, residual block, two-branch Concat, pool, classifier."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k=3):
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(cout))

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(1, 8), nn.ReLU())
            self.res = nn.Sequential(conv_bn(8, 8), nn.ReLU(), conv_bn(8, 8))
            self.branch1 = nn.Sequential(conv_bn(8, 8, k=1), nn.ReLU())
            self.branch3 = nn.Sequential(conv_bn(8, 8), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.mix = nn.Sequential(conv_bn(16, 16), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.res(x))
            x = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
            return self.head(self.mix(self.pool(x)))

    return DigitsCNN()


def load_digits_split():
    """Digits as float32 N x 1 x 8 x 8 in [0, 1]; a fixed shuffled split 1297 / 500."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, val = order[:1297], order[1297:]
    return images[train], labels[train], images[val], labels[val]


def train(model, images, labels, epochs=40):
    """Adam with a cosine schedule, batch 64; deterministic on CPU."""
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model) -> bytes:
    """ONNX bytes with BN kept (TrainingMode.PRESERVE, no constant folding), dynamic batch."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), buffer, dynamo=False, opset_version=13,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def main() -> None:
    """Train, report float accuracy, write the model and the two data files."""
    import torch

    torch.manual_seed(SEED)
    x_train, y_train, x_val, y_val = load_digits_split()
    model = train(build_model(), x_train, y_train)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_val)).argmax(1).numpy() == y_val).mean()
    (HERE / "digits_cnn.onnx").write_bytes(export(model))
    np.savez_compressed(HERE / "digits_calib.npz", input=x_train[:256])
    np.savez_compressed(HERE / "digits_val.npz", input=x_val, labels=y_val)
    print(f"float validation accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
