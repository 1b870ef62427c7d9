"""The ``fuse_affine`` pass: fuse a Conv's following Mul/Add/Sub by constants into its weights.

For a Conv (or ConvTranspose) ``y = conv(x; w, b)`` whose only consumer is an elementwise op
with a constant ``c`` that varies at most along the output-channel axis (a scalar, or a
tensor whose dims are all 1 except the channel axis, of rank at most the Conv output's)::

    y * c  ==  conv(x; w * c, b * c)
    y + c  ==  conv(x; w, b + c)
    y - c  ==  conv(x; w, b - c)

computed in float64 and cast back to the weight's dtype (refused if not finite there). The
fusion repeats while the Conv's output feeds one more such op. Anything else is declined and
logged with the reason: a constant that broadcasts over batch or spatial axes (the result
would no longer be a per-channel affine map), ``c - y`` or ``y / c`` (not exact), a Conv
output used elsewhere, or a non-constant weight or bias.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from qtool.passes.fold_bn import CHANNEL_HOOKS, NameSource, checked_cast, output_channels
from qtool.pipeline import note, register_pass

log = logging.getLogger(__name__)

FUSABLE_LAYERS = ("Conv", "ConvTranspose")
FUSABLE_OPS = ("Mul", "Add", "Sub")


@register_pass("fuse_affine")
def fuse_affine(graph: gs.Graph) -> gs.Graph:
    """Fuse Conv followed by Mul/Add/Sub of per-channel constants into the Conv."""
    names = NameSource(graph)
    fused: dict[str, int] = {}
    declined = 0
    for layer in list(graph.nodes):
        if layer.op not in FUSABLE_LAYERS or not _constant_params(layer):
            continue
        while True:
            follower = _fusable_follower(graph, layer)
            if follower is None:
                break
            op, c = follower
            if c is None:
                declined += 1
                break
            _fuse(layer, op, c, names)
            fused[op.op] = fused.get(op.op, 0) + 1
    said = [f"{n} {op} fused into Conv" for op, n in sorted(fused.items())]
    if declined:
        said.append(f"{declined} declined (not a per-channel constant)")
    if said:
        note(", ".join(said))
    return graph.cleanup().toposort()


def _constant_params(layer: gs.Node) -> bool:
    if len(layer.inputs) < 2 or not isinstance(layer.inputs[1], gs.Constant):
        return False
    return len(layer.inputs) < 3 or not layer.inputs[2].name or isinstance(
        layer.inputs[2], gs.Constant
    )


def _fusable_follower(graph: gs.Graph, layer: gs.Node) -> tuple[gs.Node, np.ndarray | None] | None:
    """The next op and its per-channel constant (None if declined), or None if no candidate."""
    y = layer.outputs[0]
    if y in graph.outputs or len(y.outputs) != 1 or y.outputs[0].op not in FUSABLE_OPS:
        return None
    op = y.outputs[0]
    if len(op.inputs) != 2 or op.inputs[0] is op.inputs[1]:
        return None
    other = op.inputs[1] if op.inputs[0] is y else op.inputs[0]
    if not isinstance(other, gs.Constant):
        return None
    if op.op == "Sub" and op.inputs[0] is not y:
        log.debug("%s: c - y is not an affine map of the weights; declined", op.name)
        return op, None
    w = layer.inputs[1].values
    c = _per_channel(other.values, rank=w.ndim, channels=output_channels(layer, w))
    if c is None:
        log.debug("%s: constant of shape %s is not per-channel; declined", op.name, other.shape)
        return op, None
    if np.dtype(other.values.dtype) != w.dtype:
        return op, None
    return op, c


def _per_channel(values: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``values`` as a (channels,) float64 vector if it only varies along axis 1, else None."""
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(values.astype(np.float64).reshape(-1), (channels,)).copy()


def _fuse(layer: gs.Node, op: gs.Node, c: np.ndarray, names: NameSource) -> None:
    weight = layer.inputs[1]
    dtype = weight.values.dtype
    w = weight.values.astype(np.float64)
    has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
    b = layer.inputs[2].values.astype(np.float64) if has_bias else np.zeros(c.shape)
    if op.op == "Mul":
        w, b = CHANNEL_HOOKS[layer.op](layer, w, c), b * c
    elif op.op == "Add":
        b = b + c
    else:
        b = b - c
    where = f"{op.op} {op.name!r} fused into {layer.op} {layer.name!r}"
    if op.op == "Mul":
        new_w = checked_cast(w, dtype, where, "weights", "fuse_affine")
        layer.inputs[1] = gs.Constant(names.tensor(f"{weight.name}_fused"), new_w)
    bias = gs.Constant(
        names.tensor(f"{layer.name or weight.name}_bias_fused"),
        checked_cast(b, dtype, where, "bias", "fuse_affine"),
    )
    if len(layer.inputs) > 2:
        layer.inputs[2] = bias
    else:
        layer.inputs.append(bias)
    out = op.outputs[0]
    op.inputs.clear()
    op.outputs.clear()
    layer.outputs[0] = out
