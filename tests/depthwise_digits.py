"""A MobileNet-style (depthwise separable) CNN trained on scikit-learn's digits in seconds.

Used by the CLE and bias-correction tests: a trained model with depthwise convs, whose
folded BatchNorm leaves per-channel weight ranges far apart (what per-tensor backends
struggle with). Exported as users export (classic exporter, opset 11, fixed batch 1,
BatchNorm kept for qtool to fold). Seeded and deterministic.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np

SEED = 0


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 N x 1 x 8 x 8 in [0, 1]; a fixed shuffled split 1297 / 500."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, val = order[:1297], order[1297:]
    return images[train], labels[train], images[val], labels[val]


def _build(activation: str = "relu"):
    import torch
    from torch import nn

    class SpelledHardswish(nn.Module):
        """hard_swish as paddle2onnx writes it: Add, Clip, Mul, Div in the ONNX graph."""

        def forward(self, x):
            return x * torch.clamp(x + 3, 0, 6) / 6

    act = {"relu": nn.ReLU, "spelled_hardswish": SpelledHardswish}[activation]

    def conv_bn(cin, cout, k, stride=1, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), act()]

    torch.manual_seed(SEED)
    return nn.Sequential(
        *conv_bn(1, 16, 3),
        *conv_bn(16, 16, 3, groups=16), *conv_bn(16, 32, 1),
        *conv_bn(32, 32, 3, stride=2, groups=32), *conv_bn(32, 32, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@functools.cache
def depthwise_digits_onnx(epochs: int = 12, activation: str = "relu") -> bytes:
    """The trained model as ONNX bytes (input ``input`` 1 x 1 x 8 x 8, output ``logits``).

    ``activation``: ``relu``, or ``spelled_hardswish`` (``x * clip(x + 3, 0, 6) / 6`` written
    out elementwise, as paddle2onnx exports hard_swish).
    """
    import torch

    x_train, y_train, _, _ = digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: threads only contend (90 s on 2 busy cores, 5 s on 1)
    try:
        return _train_and_export(torch, x_train, y_train, epochs, activation)
    finally:
        torch.set_num_threads(threads)


def _train_and_export(torch, x_train, y_train, epochs: int, activation: str) -> bytes:
    torch.manual_seed(SEED)
    model = _build(activation)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), buffer, dynamo=False,
                          opset_version=11, input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return buffer.getvalue()


def write_data(folder) -> tuple[str, str]:
    """``calib.npz`` (256 training images) and ``val.npz`` (500 held-out, with labels)."""
    x_train, _, x_val, y_val = digits_split()
    calib, val = f"{folder}/calib.npz", f"{folder}/val.npz"
    np.savez(calib, input=x_train[:256])
    np.savez(val, input=x_val, labels=y_val)
    return calib, val
