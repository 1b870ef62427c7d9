"""Test models, built here: torch exports of common blocks with BatchNorm kept.

Every model is exported with the classic exporter (``dynamo=False``) in eval mode, with
``TrainingMode.PRESERVE`` and constant folding off so that BatchNormalization nodes, Identity
and Constant leftovers stay in the graph as real exporters leave them. BN statistics and
affine parameters are randomised (seeded) so that folding them is a real test.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx

OPSETS = (11, 13, 17, 21)


def _torch():
    import torch

    return torch


def _randomise_bn(module, seed: int, var_scale: float = 1.0) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            n = sub.num_features
            with torch.no_grad():
                sub.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                sub.running_var.copy_((torch.rand(n, generator=gen) + 0.5) * var_scale)
                sub.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
                sub.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def _blocks():
    torch = _torch()
    nn = torch.nn

    def conv_bn(cin, cout, k=3, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
        )

    class ResNetBlock(nn.Module):
        """A ResNet basic block with a downsampling shortcut, then a classifier head."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU())
            self.a = nn.Sequential(conv_bn(16, 32, stride=2), nn.ReLU(), conv_bn(32, 32))
            self.down = conv_bn(16, 32, k=1, stride=2)
            self.b = nn.Sequential(conv_bn(32, 32), nn.ReLU(), conv_bn(32, 32))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(self.a(x) + self.down(x))
            x = torch.relu(self.b(x) + x)
            return self.fc(torch.flatten(self.pool(x), 1))

    class MobileNetV2Block(nn.Module):
        """Two inverted residuals (expand 1x1, depthwise 3x3, ReLU6, project 1x1)."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 16, stride=2), nn.ReLU6())

            def inverted(cin, cout, expand, stride):
                hidden = cin * expand
                return nn.Sequential(
                    conv_bn(cin, hidden, k=1), nn.ReLU6(),
                    conv_bn(hidden, hidden, k=3, stride=stride, groups=hidden), nn.ReLU6(),
                    conv_bn(hidden, cout, k=1),
                )

            self.ir1 = inverted(16, 16, 4, 1)
            self.ir2 = inverted(16, 24, 4, 2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

        def forward(self, x):
            x = self.stem(x)
            x = x + self.ir1(x)
            return self.head(self.ir2(x))

    class ConcatBlock(nn.Module):
        """An Inception-style block (branches joined by Concat) and a DenseNet-style concat."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU())
            self.b1 = nn.Sequential(conv_bn(16, 8, k=1), nn.ReLU())
            self.b3 = nn.Sequential(conv_bn(16, 8, k=1), nn.ReLU(), conv_bn(8, 12), nn.ReLU())
            self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(16, 4, k=1), nn.ReLU())
            self.dense = nn.Sequential(conv_bn(24, 8), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            x = self.stem(x)
            x = torch.cat([self.b1(x), self.b3(x), self.bp(x)], 1)
            x = torch.cat([x, self.dense(x)], 1)
            return self.head(x)

    class AttentionBlock(nn.Module):
        """Token MLP with BatchNorm1d after Linear, and one self-attention head (MatMul)."""

        def __init__(self, dim=16):
            super().__init__()
            self.embed = nn.Linear(12, dim)
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.fc1 = nn.Linear(dim, 32)
            self.bn = nn.BatchNorm1d(32)
            self.fc2 = nn.Linear(32, 4)
            self.scale = dim**-0.5

        def forward(self, x):  # x: (N, 8 tokens, 12)
            h = self.embed(x)
            att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) * self.scale, dim=-1)
            h = h + att @ self.v(h)
            pooled = h.mean(dim=1)
            return self.fc2(torch.relu(self.bn(self.fc1(pooled))))

    class ConvTransposeBlock(nn.Module):
        """Encoder conv then a ConvTranspose upsampler, each followed by BatchNorm."""

        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(conv_bn(3, 16, stride=2), nn.ReLU())
            self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=2)
            self.bn = nn.BatchNorm2d(8)
            self.out = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.out(torch.relu(self.bn(self.up(self.enc(x)))))

    return {
        "resnet": (ResNetBlock, (1, 3, 16, 16)),
        "mobilenet_v2": (MobileNetV2Block, (1, 3, 16, 16)),
        "concat": (ConcatBlock, (1, 3, 16, 16)),
        "attention": (AttentionBlock, (2, 8, 12)),
        "convtranspose": (ConvTransposeBlock, (1, 3, 16, 16)),
    }


MODEL_NAMES = ("resnet", "mobilenet_v2", "concat", "attention", "convtranspose")


@functools.cache
def _export_bytes(name: str, opset: int, dynamic_batch: bool, var_scale: float, seed: int) -> bytes:
    torch = _torch()
    cls, shape = _blocks()[name]
    torch.manual_seed(seed)
    module = cls()
    _randomise_bn(module, seed + 1, var_scale)
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            buffer,
            dynamo=False,
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
        )
    return buffer.getvalue()


def torch_model(
    name: str, opset: int = 13, *, dynamic_batch: bool = True, var_scale: float = 1.0, seed: int = 0
) -> onnx.ModelProto:
    """A torch-exported test model (a fresh copy each call).

    Args:
        name: One of :data:`MODEL_NAMES`.
        opset: Export opset (11 to 21).
        dynamic_batch: Make the batch dimension symbolic.
        var_scale: Multiplies BN running variances (1e8 mimics real models' huge variances).
        seed: Seeds weights and BN statistics.
    """
    return onnx.load_from_string(_export_bytes(name, opset, dynamic_batch, var_scale, seed))


def input_shape(name: str) -> tuple[int, ...]:
    """The example input shape of a model (batch 1 or 2)."""
    return _blocks()[name][1]


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs for every graph input, symbolic dims set to ``batch``."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else batch
            for d in inp.type.tensor_type.shape.dim
        ]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run(model, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Run a model (ModelProto, bytes or Graph) in onnxruntime on CPU.

    Graph optimizations are off by default so that the model is run as written.
    """
    import onnxruntime as ort

    from qtool.io import serialize

    data = model if isinstance(model, bytes) else serialize(model)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 1e-5) -> None:
    """Outputs agree to ``rtol`` relative to each output's scale."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        scale = max(float(np.abs(x).max()), 1e-12)
        err = float(np.abs(x.astype(np.float64) - y).max())
        assert err <= rtol * scale, f"max abs error {err} exceeds {rtol} x {scale}"
