"""The model zoo of the robustness tests: real architectures, exported as real exporters do.

Every torch model is built with random seeded weights (nothing is downloaded), its BN
statistics randomised, and exported with the classic exporter (``dynamo=False``) with BN
kept, constant folding off and (for the old-exporter quirks) initializers listed as graph
inputs. Exports are cached per (model, opset) in the process, so a test matrix that visits a
model at one opset several times exports it once.

Besides torchvision's classifiers the zoo has graphs the classifiers lack:

* ``detector``: an FPN-style detection head on a dynamic (batch, height, width) input:
  nearest and bilinear Resize computed from the runtime shape, Sigmoid, Split, Slice, a
  Concat of many branches.
* ``ocr``: a CRNN-style recogniser on a dynamic width: conv features, Squeeze/Permute to a
  sequence, an LSTM (no integer kernel in any backend: stays float), a classifier per step.
* ``multi``: two inputs (image, int64 token ids), three outputs: an embedding Gather, a
  ConvTranspose + BN, a Linear + BatchNorm1d, a batched MatMul with a 3-d constant weight.
* ``legacy``: an opset 11 graph as old exporters wrote it (hand-built with onnx.helper):
  BatchNormalization not fused, Identity chains, Constant nodes for weights, initializers
  listed as graph inputs, one weight shared by two Convs, an If whose branches read an
  outer-scope tensor, and a Loop.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Torchvision classifiers: name -> (constructor kwargs, input side).
TORCHVISION = {
    "resnet18": ({}, 32),
    "mobilenet_v2": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "squeezenet1_0": ({}, 64),
    "densenet121": ({}, 32),
    "shufflenet_v2_x0_5": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 32),
}

#: Every model of the zoo.
MODEL_NAMES = (*TORCHVISION, "vit", "transformer", "detector", "ocr", "multi", "legacy")


def _torch():
    import torch

    return torch


def _randomise_bn(module, seed: int) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            n = sub.num_features
            with torch.no_grad():
                sub.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                sub.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                sub.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                sub.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _custom_modules():
    torch = _torch()
    nn = torch.nn
    functional = torch.nn.functional

    class Detector(nn.Module):
        """Backbone at strides 2/4/8, FPN top-down with Resize, heads split into box/score."""

        def __init__(self):
            super().__init__()

            def block(cin, cout, stride):
                return nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
                )

            self.c1 = block(3, 16, 2)
            self.c2 = block(16, 24, 2)
            self.c3 = block(24, 32, 2)
            self.lat1 = nn.Conv2d(16, 16, 1)
            self.lat2 = nn.Conv2d(24, 16, 1)
            self.lat3 = nn.Conv2d(32, 16, 1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.head = nn.Conv2d(16, 6, 3, 1, 1)

        def forward(self, x):
            f1 = self.c1(x)
            f2 = self.c2(f1)
            f3 = self.c3(f2)
            p3 = self.lat3(f3)
            p2 = self.lat2(f2) + self.up(p3)
            p1 = self.lat1(f1) + functional.interpolate(
                p2, size=f1.shape[-2:], mode="bilinear", align_corners=False
            )
            outs = []
            for level in (p1, p2, p3):
                y = self.head(level)
                box, score = torch.split(y, [4, 2], dim=1)
                score = torch.sigmoid(score)
                n = y.shape[0]
                outs.append(box.reshape(n, -1))
                outs.append(score.reshape(n, -1))
                outs.append(y[:, 1:3].reshape(n, -1))
            return torch.cat(outs, dim=1)

    class Ocr(nn.Module):
        """CRNN-style: conv features of a 16-pixel-high line, an LSTM over the width."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((4, 1)),
                nn.Conv2d(32, 32, (2, 1)),
            )
            self.rnn = nn.LSTM(32, 24, batch_first=False)
            self.classifier = nn.Linear(24, 12)

        def forward(self, x):
            f = self.features(x)  # N, 32, 1, W/2
            seq = f.squeeze(2).permute(2, 0, 1)  # T, N, 32
            out, _ = self.rnn(seq)
            return self.classifier(out)  # T, N, 12 (pre-softmax)

    class Transformer(nn.Module):
        """A token embedding, two encoder layers (MHA, LayerNorm, GELU), a linear head."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(12, 32)
            layer = nn.TransformerEncoderLayer(
                32, 4, 64, dropout=0.0, activation="gelu", batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(dim=1))

    class Multi(nn.Module):
        """Two inputs (an image, int64 token ids) and three outputs: an embedding lookup,
        ConvTranspose + BN, Linear + BatchNorm1d, a batched MatMul with a 3-d weight."""

        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(20, 16)
            self.up = nn.ConvTranspose2d(3, 8, 2, stride=2, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(16, 8)
            self.bn1d = nn.BatchNorm1d(8)
            self.weight3d = nn.Parameter(torch.randn(2, 16, 4) * 0.3)

        def forward(self, x, ids):
            features = self.bn(self.up(x)).relu()
            tokens = self.embedding(ids)
            gate = torch.sigmoid(self.bn1d(self.fc(tokens.mean(1))))
            heads = torch.matmul(tokens[:, :2].transpose(0, 1), self.weight3d)
            return features.mean((2, 3)) * gate, heads, features.amax((2, 3))

    return {"detector": Detector, "ocr": Ocr, "transformer": Transformer, "multi": Multi}


def _build(name: str):
    """(module, example input, dynamic axes of the input or None)."""
    torch = _torch()
    if name in TORCHVISION:
        import torchvision

        kwargs, side = TORCHVISION[name]
        module = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
        return module, torch.randn(1, 3, side, side), {0: "batch"}
    if name == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        module = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
            num_classes=10,
        )
        torch.nn.init.normal_(module.heads.head.weight, std=0.2)  # torchvision zero-inits it
        return module, torch.randn(1, 3, 32, 32), {0: "batch"}
    module = _custom_modules()[name]()
    if name == "detector":
        return module, torch.randn(1, 3, 32, 48), {0: "batch", 2: "height", 3: "width"}
    if name == "ocr":
        return module, torch.randn(1, 1, 16, 40), {0: "batch", 3: "width"}
    if name == "multi":
        return module, (torch.randn(2, 3, 8, 8), torch.randint(0, 20, (2, 5))), None
    return module, torch.randn(1, 6, 12), {0: "batch"}


@functools.cache
def _export_bytes(name: str, opset: int, seed: int) -> bytes:
    if name == "legacy":
        return legacy_model(opset, seed).SerializeToString()
    torch = _torch()
    torch.manual_seed(seed)
    module, example, dynamic = _build(name)
    _randomise_bn(module, seed + 1)
    module.eval()
    buffer = io.BytesIO()
    output_axes = {0: "batch"} if name != "ocr" else {0: "steps", 1: "batch"}
    inputs, outputs = ["input"], ["output"]
    axes = {"input": dynamic, "output": output_axes}
    if name == "multi":
        inputs, outputs = ["input", "ids"], ["gated", "heads", "peaks"]
        axes = {"input": {0: "batch"}, "ids": {0: "batch", 1: "tokens"}}
        example = tuple(example)
    else:
        example = (example,)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernels have no ONNX export
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            keep_initializers_as_inputs=opset < 13,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
        )
    torch.backends.mha.set_fastpath_enabled(fastpath)
    return buffer.getvalue()


def zoo_model(name: str, opset: int, seed: int = 0) -> onnx.ModelProto:
    """A fresh copy of a zoo model exported at ``opset`` (cached per process)."""
    return onnx.load_from_string(_export_bytes(name, opset, seed))


def zoo_bytes(name: str, opset: int, seed: int = 0) -> bytes:
    """The serialized zoo model (cached per process)."""
    return _export_bytes(name, opset, seed)


def sample_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    """A concrete input shape for the model (dynamic dims filled in)."""
    if name in TORCHVISION:
        side = TORCHVISION[name][1]
        return (batch, 3, side, side)
    return {
        "vit": (batch, 3, 32, 32),
        "transformer": (batch, 6, 12),
        "detector": (batch, 3, 32, 48),
        "ocr": (batch, 1, 16, 40),
        "multi": (batch, 3, 8, 8),
        "legacy": (batch, 3, 8, 8),
    }[name]


def samples(name: str, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` calibration samples (batch 1 each): standard-normal data, token ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        row = {"input": rng.standard_normal(sample_shape(name)).astype(np.float32)}
        if name == "multi":
            row["ids"] = rng.integers(0, 20, (1, 5), dtype=np.int64)
        rows.append(row)
    return rows


def legacy_model(opset: int = 11, seed: int = 0) -> onnx.ModelProto:
    """An old-exporter graph (see the module docstring), input ``input`` 1x3x8x8.

    Nodes: Identity chain -> Conv(W via a Constant node) -> BatchNormalization -> Relu
    -> Conv(shared weight S) -> Relu -> Conv(S again) -> If(cond: branches Relu/Sigmoid of an
    outer tensor) -> Loop (3 iterations adding a constant) -> GlobalAveragePool -> Flatten ->
    Gemm -> ``output``. Initializers are also listed as graph inputs.
    """
    rng = np.random.default_rng(seed)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    shared = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.15
    initializers = [
        init("bn_scale", rng.uniform(0.75, 1.25, 8)),
        init("bn_bias", rng.standard_normal(8) * 0.1),
        init("bn_mean", rng.standard_normal(8) * 0.1),
        init("bn_var", rng.uniform(0.75, 1.25, 8)),
        init("shared_w", shared),
        init("shared_b", rng.standard_normal(8) * 0.1),
        init("fc_w", rng.standard_normal((10, 8)) * 0.3),
        init("fc_b", rng.standard_normal(10) * 0.1),
        init("loop_step", np.full((1, 8, 1, 1), 0.25)),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trip_count"),
    ]
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["c2_out"], ["then_out"], name="then_relu")],
        "then_body", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sigmoid", ["c2_out"], ["else_out"], name="else_sigmoid")],
        "else_body", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["loop_cond_in"], ["loop_cond_out"], name="loop_cond"),
            helper.make_node("Add", ["loop_acc_in", "loop_step"], ["loop_acc_out"],
                             name="loop_add"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("loop_iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("loop_cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("loop_acc_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("loop_cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("loop_acc_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [
        helper.make_node("Identity", ["input"], ["id1"], name="identity_1"),
        helper.make_node("Identity", ["id1"], ["id2"], name="identity_2"),
        helper.make_node("Constant", [], ["w0"], name="const_w0",
                         value=numpy_helper.from_array(w0)),
        helper.make_node("Conv", ["id2", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c0", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn0"],
            name="bn0", epsilon=1e-5,
        ),
        helper.make_node("Relu", ["bn0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "shared_w", "shared_b"], ["c1"], name="conv1",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["r1_id"], name="identity_3"),
        helper.make_node("Conv", ["r1_id", "shared_w", "shared_b"], ["c2_out"], name="conv2",
                         pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["if_out"], name="branch", then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("Loop", ["trip_count", "", "if_out"], ["loop_out"], name="loop",
                         body=loop_body),
        helper.make_node("GlobalAveragePool", ["loop_out"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], name="fc", transB=1),
    ]
    graph_inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])]
    graph_inputs += [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers
    ]
    graph = helper.make_graph(
        nodes, "legacy", graph_inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="pytorch", producer_version="1.4")
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model
