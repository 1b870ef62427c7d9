"""Numerically sensitive patterns stay float on every backend (qtool.sensitive_patterns).

Each pattern is exported by torch (``dynamo=False``, opset 11, fixed batch 1) as users export
it: LayerNorm is decomposed at opset 11, ``torch.rsqrt`` becomes ``Sqrt`` and ``Div``, the
tanh GELU multiplies ``x * x * x``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from qdq_helpers import BACKENDS, run, sqnr_db
from qtool.calibration import calibrate

import qtool
import qtool.planner
from qtool.planner import build_plan
from qtool.qdq import quantize

torch = pytest.importorskip("torch")
nn = torch.nn


class _LayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.ln(self.fc(x)))


class _MomentVariance(nn.Module):
    """Normalization by ``E[h^2] - E[h]^2`` (magika's exported LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc.bias.fill_(6.0)  # a large mean: E[h^2] and E[h]^2 nearly cancel

    def forward(self, x):
        h = self.fc(x)
        mean = h.mean(-1, keepdim=True)
        var = (h * h).mean(-1, keepdim=True) - mean * mean
        return self.out((h - mean) * torch.rsqrt(torch.clamp(var, min=0) + 1e-5))


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 4)
        self.gelu = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.out(self.gelu(self.fc(x)))


class _PowerSpectrum(nn.Module):
    def __init__(self):
        super().__init__()
        self.re, self.im, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.sqrt(self.re(x) ** 2 + self.im(x) ** 2))


class _Softmax(nn.Module):
    """A Softmax written out: exp(h - max h) / sum."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc(x)
        e = torch.exp(h - h.max(-1, keepdim=True).values)
        return self.out(e / e.sum(-1, keepdim=True))


def _prepared(module: nn.Module):
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.randn(1, 8), buffer, opset_version=11,
                          dynamo=False)
    graph, _ = qtool.Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(
        qtool.load(buffer.getvalue())
    )
    return graph


def _build(cls):
    torch.manual_seed(0)
    return _prepared(cls())


def _float_ops(plan, graph) -> dict[str, int]:
    """Op histogram of the nodes the plan keeps float as numerically sensitive."""
    ops = {n.name: n.op for n in graph.nodes}
    counts: dict[str, int] = {}
    for name, why in plan.float_nodes.items():
        if why.startswith("numerically sensitive"):
            counts[ops[name]] = counts.get(ops[name], 0) + 1
    return dict(sorted(counts.items()))


# what each pattern keeps float (op -> count), found by reading the exported graphs
EXPECTED = {
    # x - mean(x); Pow(d, 2) -> ReduceMean -> Add eps -> Sqrt -> Div
    _LayerNorm: {"Add": 1, "Div": 1, "Pow": 1, "ReduceMean": 1, "Sqrt": 1, "Sub": 1},
    # Mul(h, h), Mul(m, m) -> ReduceMean -> Sub -> Clip -> Add eps -> Sqrt -> Div(1, .);
    # h - mean(h)
    _MomentVariance: {"Add": 1, "Clip": 1, "Div": 1, "Mul": 2, "ReduceMean": 1, "Sqrt": 1,
                      "Sub": 2},
    # Mul(Mul(x, x), x) -> Mul 0.044715 -> Add x
    _Gelu: {"Add": 1, "Mul": 2},
    # Pow(re, 2) + Pow(im, 2) -> Sqrt
    _PowerSpectrum: {"Add": 1, "Pow": 2, "Sqrt": 1},
    # Exp -> ReduceSum -> Div
    _Softmax: {"Div": 1, "Exp": 1, "ReduceSum": 1},
}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__.strip("_"))
def test_pattern_is_float_on_every_backend(cls):
    graph = _build(cls)
    for backend in BACKENDS:
        plan = build_plan(graph, backend)
        assert _float_ops(plan, graph) == EXPECTED[cls], backend
        sensitive = {n for n, why in plan.float_nodes.items() if "sensitive" in why}
        for entry in plan.tensors.values():  # no quantized input reaches a kept node
            assert not sensitive & set(entry.consumers), (backend, entry.tensor)
        # the Gemm layers around the pattern are still quantized wherever the backend does
        assert plan.entries("weight"), backend


def test_gelu_cubic_detected_as_a_pow():
    class PowGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = self.fc(x)
            inner = 0.7978845608 * (h + 0.044715 * torch.pow(h, 3))
            return self.out(0.5 * h * (1 + torch.tanh(inner)))

    graph = _build(PowGelu)
    assert _float_ops(build_plan(graph, "tvm"), graph) == {"Add": 1, "Mul": 1, "Pow": 1}


def test_division_by_a_constant_is_not_sensitive():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)

        def forward(self, x):
            return self.fc(x) / 3.0

    graph = _build(Scale)
    assert _float_ops(build_plan(graph, "tvm"), graph) == {}


def test_moment_variance_collapses_when_quantized_and_not_by_default(monkeypatch):
    graph = _build(_MomentVariance)
    rng = np.random.default_rng(0)
    samples = [{graph.inputs[0].name: rng.standard_normal((1, 8)).astype(np.float32)}
               for _ in range(64)]
    feeds = {graph.inputs[0].name: np.concatenate([s[graph.inputs[0].name] for s in samples])}

    def output_sqnr(plan) -> float:
        ranges = calibrate(graph, plan.activation_schemes(), samples, method="minmax")
        result = quantize(graph, "tvm", ranges, plan=plan)
        qdq = [run(result.graph, {k: v[i:i + 1] for k, v in feeds.items()})[0]
               for i in range(len(samples))]
        ref = [run(graph, {k: v[i:i + 1] for k, v in feeds.items()})[0]
               for i in range(len(samples))]
        return sqnr_db(np.concatenate(ref), np.concatenate(qdq))

    kept = output_sqnr(build_plan(graph, "tvm"))
    monkeypatch.setattr(qtool.planner, "sensitive_nodes", lambda g: {})
    quantized = output_sqnr(build_plan(graph, "tvm"))
    # measured: 33.6 dB with the pattern float, 2.3 dB with it quantized
    assert kept > 25.0
    assert quantized < kept - 10.0


def test_residual_trunk_before_an_l1_norm_stays_quantized():
    """``f / (mean|f| + eps)`` after identity-skip blocks: the walk from the denominator
    passes six residual Add/Relu pairs on its way to a Conv and reaches no square there, so
    only the division and its norm (``Abs``, the mean, ``+ eps``) stay float."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))

        def forward(self, x):
            f = self.stem(x)
            for conv in self.blocks:
                f = torch.relu(conv(f) + f)
            return f / (f.abs().mean(dim=(2, 3), keepdim=True) + 1e-3)

    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Residual().eval(), torch.randn(1, 2, 6, 6), buffer, opset_version=13,
                          dynamo=False)
    graph, _ = qtool.Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(
        qtool.load(buffer.getvalue()))
    plan = build_plan(graph, "tensorrt")
    assert _float_ops(plan, graph) == {"Abs": 1, "Add": 1, "Div": 1, "ReduceMean": 1}
    # the denominator's Add is the one reading a constant eps, none of the residual Adds
    ops = {n.name: n for n in graph.nodes}
    adds = [ops[name] for name, why in plan.float_nodes.items()
            if why.startswith("numerically sensitive") and ops[name].op == "Add"]
    assert any(isinstance(t, gs.Constant) for t in adds[0].inputs)
