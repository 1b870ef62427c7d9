r"""The ``cle`` pass: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

Two layers in a row, the first's output read only by the second through ``Relu`` or nothing,

    y = W2 f(W1 x + b1) + b2,     f(s z) = s f(z) for s > 0 (ReLU, identity),

compute the same function after scaling output channel ``i`` of the first layer by ``1/s_i``
and input channel ``i`` of the second by ``s_i``:

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i,   W2'[:, i] = W2[:, i] * s_i.

With ``r1_i = max |W1[i]|`` and ``r2_i = max |W2[:, i]|``, ``s_i = sqrt(r1_i / r2_i)`` makes
both ``sqrt(r1_i r2_i)``: every channel's weight range equal between the two layers, which is
what a per-tensor weight scale needs (a depthwise conv with one channel 100x wider than the
others rounds the rest to a few levels). Chains (pointwise -> depthwise -> pointwise) are
equalized pair by pair, repeated until the scales settle (the paper's iteration).

Where the channel sits: Conv output channel is weight axis 0 and input channel ``i`` is
column ``i mod (C/group)`` of group ``i div (C/group)`` (depthwise: row ``i``); Gemm's ``B``
has the output channel on axis 0 with ``transB`` (input on axis 1), else the other way round.
``Clip(0, 6)`` (ReLU6) does not commute with a scale (``min(s z, 6) != s min(z, 6)``): pairs
through it are left alone and counted in the pass's note; the option ``relu6="relu"`` turns
them into ``Relu`` first, as AIMET's CLE does (not exact where activations exceed 6).
Layers whose weights or bias are shared with another node, or whose output is a graph
output or read twice, are skipped.

:func:`absorb_high_bias` is the paper's high-bias absorption. With ``c_i >= 0`` a lower
bound of the first layer's output channel ``i``, ``ReLU(y - c) + c = ReLU(y)`` wherever
``y >= c``, so ``b1' = b1 - c`` and the second layer's bias takes ``W2 c`` (a Conv only when
it has no padding, where the shifted zeros of the border would differ). The bound must hold
on data the model has not seen, not only on the calibration samples: the paper's
``c = max(0, beta - 3 gamma)`` from the BatchNorm that produced ``y`` (its output is
``gamma * x_hat + beta`` with ``x_hat`` normalized on the training data), and where no BN
statistics exist (a model exported without BN, or ``fold_bn`` ran without them being
kept) the same bound measured on the calibration data, ``mean - 3 std`` per channel. Each is
also kept at or below the calibration minimum. The exact calibration minimum, used before,
changed the function on fresh data (0.5 % of outputs differed on a net absorbed from 16
samples); ``mean - 3 std`` sits below the minimum of any bounded distribution whose spread
is under 3 standard deviations (a uniform's is 1.7). CLE scales channel ``i`` of ``y`` by
``1/s_i`` and both the bound and the absorbed offset with it, so absorption before
equalization is the same as after it; :func:`equalize` absorbs first, where the bounds are
in the model's own units.

Shared biases (``cleanup`` merges identical initializers: every zero bias of a zero-bias
net becomes one) are copied per layer first (:mod:`qtool.passes.unshare`), so that no pair is
skipped for sharing its bias.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import PassError
from qtool.passes.unshare import unshare_layer_constants
from qtool.pipeline import note, register_pass

log = logging.getLogger(__name__)

LAYERS = frozenset({"Conv", "Gemm"})
SCALE_INVARIANT = frozenset({"Relu"})  # f(s z) = s f(z) for s > 0
MAX_ROUNDS = 50
TOLERANCE = 1e-6
#: Standard deviations below the mean of a ReLU layer's input that high-bias absorption
#: treats as its lower bound (the paper's beta - 3 gamma).
ABSORB_SIGMAS = 3.0


@dataclass
class Pair:
    """Two layers to equalize, and the activation between them (None: a direct edge)."""

    first: gs.Node
    second: gs.Node
    activation: gs.Node | None


RELU6_MODES = ("skip", "relu")


@register_pass("cle")
def cle(graph: gs.Graph, *, relu6: str = "skip") -> gs.Graph:
    """Equalize per-channel weight ranges of consecutive Conv/Gemm layers (exact in float).

    Args:
        graph: The prepared float graph.
        relu6: ``skip`` leaves pairs through ``Clip(0, 6)`` alone (exact); ``relu`` turns
            those clips into ``Relu`` first, as AIMET's CLE does (not exact: activations
            above 6 are no longer clipped; judge it on the evaluation data).
    """
    if relu6 not in RELU6_MODES:
        raise PassError(f"cle: relu6={relu6!r}", f"choose one of: {', '.join(RELU6_MODES)}")
    unshared = unshare_layer_constants(graph)
    if unshared:
        note(f"{unshared} shared biases copied per layer")
    if relu6 == "relu":
        turned = _clips_to_relu(graph)
        if turned:
            note(f"{turned} Clip(0, 6) between layers turned into Relu (not exact above 6)")
    pairs, clipped = find_pairs(graph)
    rounds = 0
    for rounds in range(1, MAX_ROUNDS + 1):  # noqa: B007  (reported below)
        largest = max((equalize_pair(p) for p in pairs), default=0.0)
        if largest < TOLERANCE:
            break
    if pairs:
        note(f"{len(pairs)} layer pairs equalized ({rounds} rounds)")
    if clipped:
        note(f"{clipped} pairs through Clip/ReLU6 left alone (a scale does not commute with "
             "the clip)", changed=False)
    if not pairs and not clipped:
        note("no Conv/Gemm pairs to equalize", changed=False)
    return graph.cleanup().toposort()


def _clips_to_relu(graph: gs.Graph) -> int:
    """Turn each ``Clip(0, max)`` that sits between two layers into ``Relu``; returns how many."""
    turned = 0
    for first in graph.nodes:
        if not _layer(first) or len(first.outputs[0].outputs) != 1:
            continue
        clip = first.outputs[0].outputs[0]
        if clip.op != "Clip" or len(clip.outputs[0].outputs) != 1:
            continue
        if not _layer(clip.outputs[0].outputs[0]) or _clip_min(clip) != 0.0:
            continue
        clip.op, clip.attrs = "Relu", {}
        while len(clip.inputs) > 1:  # gs keeps tensor links in sync one item at a time
            clip.inputs.pop()
        turned += 1
    return turned


def _clip_min(clip: gs.Node) -> float | None:
    if "min" in clip.attrs:
        return float(clip.attrs["min"])
    if len(clip.inputs) > 1 and isinstance(clip.inputs[1], gs.Constant):
        return float(np.asarray(clip.inputs[1].values).reshape(-1)[0])
    return None


def find_pairs(graph: gs.Graph) -> tuple[list[Pair], int]:
    """Pairs that can be equalized, and how many were refused for a Clip in between."""
    outputs = {t.name for t in graph.outputs}
    pairs, clipped = [], 0
    for first in graph.nodes:
        if not _layer(first):
            continue
        tensor = first.outputs[0]
        if tensor.name in outputs or len(tensor.outputs) != 1:
            continue
        activation, second = None, tensor.outputs[0]
        if second.op in SCALE_INVARIANT or second.op == "Clip":
            activation = second
            out = activation.outputs[0]
            if out.name in outputs or len(out.outputs) != 1:
                continue
            second = out.outputs[0]
            if activation.op == "Clip":
                clipped += int(_layer(second))
                continue
        feeding = (activation if activation is not None else first).outputs[0]
        if not _layer(second) or second.inputs[0] is not feeding:
            continue
        if second.op == "Gemm" and second.attrs.get("transA", 0):
            continue
        if _out_channels(first) != _in_channels(second):
            continue
        pairs.append(Pair(first, second, activation))
    return pairs, clipped


def equalize_pair(pair: Pair) -> float:
    """Rescale one pair in place; returns ``max |log s|`` (0 when already equal)."""
    w1 = np.asarray(pair.first.inputs[1].values, dtype=np.float64)
    w2 = np.asarray(pair.second.inputs[1].values, dtype=np.float64)
    r1 = _out_rows(pair.first, w1).max(axis=1)
    r2 = _in_rows(pair.second, w2).max(axis=1)
    s = np.ones_like(r1)
    usable = (r1 > 0) & (r2 > 0)
    s[usable] = np.sqrt(r1[usable] / r2[usable])
    if not np.isfinite(s).all():
        return 0.0
    _set(pair.first.inputs[1], _scale_out(pair.first, w1, 1.0 / s))
    bias = _bias(pair.first)
    if bias is not None:
        _set(bias, np.asarray(bias.values, dtype=np.float64).reshape(-1) / s)
    _set(pair.second.inputs[1], _scale_in(pair.second, w2, s))
    return float(np.abs(np.log(s)).max()) if s.size else 0.0


def absorb_high_bias(pairs: list[Pair], minima: Mapping[str, np.ndarray]) -> int:
    """Move each ReLU pair's certain positive offset into the next layer's bias, in place.

    Args:
        pairs: Pairs from :func:`find_pairs` (those through a Relu are used).
        minima: Per-channel lower bound of each first layer's output tensor that holds on
            any data (:func:`absorption_bounds`); below 0 nothing is absorbed.

    Returns:
        The number of pairs changed.
    """
    changed = 0
    for pair in pairs:
        name = pair.first.outputs[0].name
        if pair.activation is None or name not in minima or not _no_padding(pair.second):
            continue
        c = np.maximum(np.asarray(minima[name], dtype=np.float64).reshape(-1), 0.0)
        bias1 = _bias(pair.first)
        if bias1 is None or not c.any() or c.size != _out_channels(pair.first):
            continue
        bias2 = _bias(pair.second, create=True)
        if bias2 is None:
            continue
        w2 = np.asarray(pair.second.inputs[1].values, dtype=np.float64)
        shift = _in_rows_signed_sum(pair.second, w2, c)
        _set(bias1, np.asarray(bias1.values, dtype=np.float64).reshape(-1) - c)
        _set(bias2, np.asarray(bias2.values, dtype=np.float64).reshape(-1) + shift)
        changed += 1
    return changed


# -- channel hooks: where a channel sits in each layer's weight ---------------------------


def _out_rows(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``|w|`` as one row per output channel."""
    if node.op == "Gemm" and not node.attrs.get("transB", 0):
        w = w.T
    return np.abs(w).reshape(w.shape[0], -1)


def _in_rows(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``|w|`` as one row per input channel."""
    if node.op == "Gemm":
        return np.abs(w.T if node.attrs.get("transB", 0) else w)
    groups = int(node.attrs.get("group", 1))
    cout, cin_g = w.shape[0], w.shape[1]
    grouped = np.abs(w).reshape(groups, cout // groups, cin_g, -1)
    return grouped.transpose(0, 2, 1, 3).reshape(groups * cin_g, -1)


def _scale_out(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if node.op == "Gemm" and not node.attrs.get("transB", 0):
        return w * s[None, :]
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))


def _scale_in(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if node.op == "Gemm":
        return w * s[None, :] if node.attrs.get("transB", 0) else w * s[:, None]
    groups = int(node.attrs.get("group", 1))
    cout, cin_g = w.shape[0], w.shape[1]
    grouped = w.reshape((groups, cout // groups, cin_g) + w.shape[2:])
    factor = s.reshape((groups, 1, cin_g) + (1,) * (w.ndim - 2))
    return (grouped * factor).reshape(w.shape)


def _in_rows_signed_sum(node: gs.Node, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``W c`` per output channel: what a constant input ``c`` adds to the layer's output."""
    if node.op == "Gemm":
        b = w.T if node.attrs.get("transB", 0) else w  # (K, N)
        return float(node.attrs.get("alpha", 1.0)) / float(node.attrs.get("beta", 1.0)) * (c @ b)
    groups = int(node.attrs.get("group", 1))
    cout, cin_g = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, cout // groups, cin_g, -1).sum(axis=3)  # kernel taps summed
    return np.einsum("goi,gi->go", grouped, c.reshape(groups, cin_g)).reshape(cout)


def _out_channels(node: gs.Node) -> int:
    w = node.inputs[1].values
    if node.op == "Gemm":
        return w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
    return w.shape[0]


def _in_channels(node: gs.Node) -> int:
    w = node.inputs[1].values
    if node.op == "Gemm":
        return w.shape[1] if node.attrs.get("transB", 0) else w.shape[0]
    return w.shape[1] * int(node.attrs.get("group", 1))


def _layer(node: gs.Node) -> bool:
    """A Conv/Gemm with a constant weight (and bias) that no other node reads."""
    if node.op not in LAYERS or len(node.inputs) < 2 or len(node.outputs) != 1:
        return False
    constants = node.inputs[1:3]
    if not all(isinstance(t, gs.Constant) and len(t.outputs) == 1 for t in constants):
        return False
    if node.op == "Gemm":
        w = node.inputs[1].values
        if w.ndim != 2 or float(node.attrs.get("beta", 1.0)) == 0.0:
            return False
        if len(node.inputs) > 2 and node.inputs[2].values.size != _out_channels(node):
            return False
    return True


def _no_padding(node: gs.Node) -> bool:
    if node.op == "Gemm":
        return True
    pads = node.attrs.get("pads", [])
    return not any(pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


def _bias(node: gs.Node, create: bool = False) -> gs.Constant | None:
    if len(node.inputs) > 2:
        return node.inputs[2]
    if not create:
        return None
    dtype = node.inputs[1].values.dtype
    bias = gs.Constant(f"{node.name}_bias", np.zeros(_out_channels(node), dtype=dtype))
    node.inputs.append(bias)
    return bias


def _set(constant: gs.Constant, values: np.ndarray) -> None:
    old = np.asarray(constant.values)
    constant.values = values.reshape(old.shape).astype(old.dtype)


def batchnorm_statistics(graph: gs.Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{BN output: (beta, |gamma|)}`` of every inference BatchNormalization with constants.

    Read before ``fold_bn``: the folded layer writes the BN's output tensor, so the names
    still match in the prepared graph.
    """
    stats = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization" or len(node.inputs) < 3:
            continue
        gamma, beta = node.inputs[1], node.inputs[2]
        if isinstance(gamma, gs.Constant) and isinstance(beta, gs.Constant):
            stats[node.outputs[0].name] = (
                np.asarray(beta.values, dtype=np.float64).reshape(-1),
                np.abs(np.asarray(gamma.values, dtype=np.float64)).reshape(-1))
    return stats


def _spread_observer():
    """An observer whose ``lo`` is ``min(observed min, mean - 3 std)`` per channel."""
    from qtool.calibration.observers.meanstd import MeanStdObserver

    class SpreadObserver(MeanStdObserver):
        def range(self):
            if self.count.size == 0:
                raise self._empty_error()
            std = np.sqrt(self.m2 / self.count)
            lo = np.minimum(self.min_val, self.mean - self.k * std)
            return self._per_tensor(lo, self.max_val)

    return SpreadObserver.with_args(k=ABSORB_SIGMAS)


def absorption_bounds(graph: gs.Graph, pairs: list[Pair], samples, *, batch_size: int = 32,
                      bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
                      ) -> dict[str, np.ndarray]:
    """Per-channel lower bounds of the pairs' first-layer outputs (see the module docstring).

    ``min(calibration minimum, mean - 3 std)`` measured on ``samples``, and where
    ``bn_stats`` has the tensor also at most ``beta - 3 |gamma|``.
    """
    from qtool.calibration import calibrate
    from qtool.scheme import QuantScheme

    tensors = {p.first.outputs[0].name: QuantScheme(per_channel_axis=1) for p in pairs}
    if not tensors:
        return {}
    ranges = calibrate(graph, tensors, samples, method=_spread_observer(),
                       batch_size=batch_size)
    bounds = {}
    for name, (lo, _) in ranges.items():
        bound = np.asarray(lo, dtype=np.float64).reshape(-1)
        if bn_stats and name in bn_stats:
            beta, gamma = bn_stats[name]
            if beta.size == bound.size:
                bound = np.minimum(bound, beta - ABSORB_SIGMAS * gamma)
        bounds[name] = bound
    return bounds


def equalize(graph: gs.Graph, samples, *, batch_size: int = 32,
             bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
    """``cle`` and high-bias absorption, as ``qtool calibrate --cle``.

    Args:
        graph: The prepared float graph (modified and returned).
        samples: Calibration samples (``dict[input, ndarray]``).
        batch_size: Rows per onnxruntime run.
        bn_stats: :func:`batchnorm_statistics` of the model before ``fold_bn`` (the paper's
            bound); None: the bound is measured on ``samples``.

    Returns:
        ``(graph, reports)``: one :class:`qtool.pipeline.PassReport` for each step.
    """
    from qtool.pipeline import PassReport, Pipeline

    unshare_layer_constants(graph)  # a shared bias must not stop a pair's absorption
    pairs = [p for p in find_pairs(graph)[0] if p.activation is not None]
    absorbed = 0
    if pairs:  # before equalizing: the bounds are in the model's own units (see above)
        bounds = absorption_bounds(graph, pairs, samples, batch_size=batch_size,
                                   bn_stats=bn_stats)
        absorbed = absorb_high_bias(pairs, bounds)
        graph.cleanup().toposort()
    graph, reports = Pipeline(("cle",)).run(graph)
    message = (f"{absorbed} ReLU layers' positive offset moved into the next layer's bias"
               if absorbed else "no offset to absorb")
    reports.append(PassReport("high_bias_absorption", bool(absorbed), [message]))
    return graph, reports
