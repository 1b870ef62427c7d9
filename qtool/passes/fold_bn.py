"""The ``fold_bn`` pass: fold inference BatchNormalization into the layer before it.

For a BatchNormalization with scale ``gamma``, bias ``beta``, running mean ``mean``, running
variance ``var`` and ``epsilon``, per output channel ``c``::

    s[c]  = gamma[c] / sqrt(var[c] + eps)
    w'    = w * s                      (each output channel's weights times its s[c])
    b'    = (b - mean) * s + beta      (b = 0 when the layer has no bias)

so that ``BN(layer(x; w, b)) == layer(x; w', b')``. The producers differ only in where the
output channel sits in the weight (the :class:`ChannelHook` of each op):

- Conv: ``w`` is (Cout, Cin/group, k...), the channel is axis 0.
- ConvTranspose: ``w`` is (Cin, Cout/group, k...); output channel ``g * Cout/group + j`` is
  column ``j`` of group ``g``'s rows, so ``s`` applies on axis 1, per group.
- Gemm: ``Y = alpha * A @ B' + beta * C`` with ``B' = B.T`` if ``transB``; the channel is
  ``B``'s axis 0 with transB, else axis 1. The new ``C`` is ``(beta * C - mean) * s + beta_bn``
  and the ``beta`` attribute becomes 1.
- MatMul with a constant weight (..., K, N), optionally followed by an Add of a constant
  bias: the channel is the last axis; only folded when the output is 2-D (N, C), the one case
  where BN's channel axis 1 is the MatMul's last axis.

A fold needs the layer's output to feed the BN and nothing else, the weight (and bias) to be
constants and the BN statistics to be constants. Everything is computed in float64 and cast
back to the weight's dtype; if a folded value is not finite in that dtype (real models carry
running variances near 1e8, and near-zero variances with large gammas overflow float16) the
pass raises :class:`~qtool.errors.PassError` instead of writing inf.

A BN with nothing to fold into becomes ``Mul(x, s) + (beta - mean * s)`` with per-channel
constants shaped (C, 1, ..., 1) for the input's rank: the same function, as two ops every
engine quantizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import PassError
from qtool.passes.cleanup import infer_shapes
from qtool.pipeline import note, register_pass

log = logging.getLogger(__name__)


def scale_conv(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Conv: weight (Cout, Cin/group, k...), output channel on axis 0."""
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))


def scale_conv_transpose(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ConvTranspose: weight (Cin, Cout/group, k...), output channel on axis 1 within a group."""
    groups = int(node.attrs.get("group", 1))
    cin, cout_per_group = w.shape[0], w.shape[1]
    grouped = w.reshape((groups, cin // groups, cout_per_group) + w.shape[2:])
    scale = s.reshape((groups, 1, cout_per_group) + (1,) * (w.ndim - 2))
    return (grouped * scale).reshape(w.shape)


def scale_gemm(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Gemm: B is (N, K) with transB, else (K, N)."""
    return w * s[:, None] if node.attrs.get("transB", 0) else w * s[None, :]


def scale_matmul(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """MatMul: B is (..., K, N), output channel on the last axis."""
    return w * s


def output_channels(node: gs.Node, w: np.ndarray) -> int:
    """Number of output channels of a Conv/ConvTranspose/Gemm/MatMul with weight ``w``."""
    if node.op == "Conv":
        return w.shape[0]
    if node.op == "ConvTranspose":
        return w.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
    return w.shape[-1]


ChannelHook = Callable[[gs.Node, np.ndarray, np.ndarray], np.ndarray]

CHANNEL_HOOKS: dict[str, ChannelHook] = {
    "Conv": scale_conv,
    "ConvTranspose": scale_conv_transpose,
    "Gemm": scale_gemm,
    "MatMul": scale_matmul,
}


@register_pass("fold_bn")
def fold_bn(graph: gs.Graph) -> gs.Graph:
    """Fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul weights, else Mul+Add."""
    graph = infer_shapes(graph)
    names = NameSource(graph)
    folded = affine = kept = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization":
            continue
        stats = _bn_statistics(graph, bn)
        if stats is None:
            kept += 1
            continue
        target = _fold_target(graph, bn)
        if target is not None:
            _fold_into(graph, bn, target, stats, names)
            folded += 1
        elif _to_mul_add(graph, bn, stats, names):
            affine += 1
        else:
            kept += 1
    parts = [
        (folded, "BatchNormalization folded"),
        (affine, "turned into Mul+Add"),
        (kept, "left as is (non-constant statistics, training mode or unknown rank)"),
    ]
    said = [f"{n} {what}" for n, what in parts if n]
    if said:
        note(", ".join(said))
    return graph.cleanup().toposort()


def _bn_statistics(graph: gs.Graph, bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (s, shift) in float64 with BN(x) = x * s + shift, or None if not inference."""
    params = bn.inputs[1:5]
    if len(params) != 4 or not all(isinstance(p, gs.Constant) for p in params):
        log.debug("%s: BN statistics are not constants", bn.name)
        return None
    if bn.attrs.get("training_mode", 0) or any(
        out.outputs or out in graph.outputs for out in bn.outputs[1:]
    ):
        log.debug("%s: BN in training mode", bn.name)
        return None
    gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64).reshape(-1) for p in params)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _fold_target(graph: gs.Graph, bn: gs.Node) -> tuple[gs.Node, gs.Node | None] | None:
    """The (layer, optional bias Add) the BN folds into, or None (the reason is logged)."""
    target = _find_target(graph, bn)
    if isinstance(target, str):
        log.debug("BatchNormalization %s not folded: %s", bn.name, target)
        return None
    return target


def _find_target(graph: gs.Graph, bn: gs.Node) -> tuple[gs.Node, gs.Node | None] | str:
    x = bn.inputs[0]
    add = None
    if len(x.inputs) == 1 and x.inputs[0].op == "Add" and _sole_consumer(graph, x, bn):
        add = x.inputs[0]
        matmul_outs = [t for t in add.inputs if len(t.inputs) == 1 and t.inputs[0].op == "MatMul"]
        if len(matmul_outs) != 1 or not _sole_consumer(graph, matmul_outs[0], add):
            return "its input is an Add that is not MatMul + bias"
        bias = next(t for t in add.inputs if t is not matmul_outs[0])
        if not isinstance(bias, gs.Constant):
            return "the Add before it adds a non-constant"
        x = matmul_outs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in CHANNEL_HOOKS:
        return "its input is not made by Conv, ConvTranspose, Gemm or MatMul"
    layer = x.inputs[0]
    if not _sole_consumer(graph, x, add or bn):
        return f"the output of {layer.name} is also used elsewhere"
    if len(layer.inputs) < 2 or not isinstance(layer.inputs[1], gs.Constant):
        return f"the weight of {layer.name} is not a constant"
    has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
    if has_bias and not isinstance(layer.inputs[2], gs.Constant):
        return f"the bias of {layer.name} is not a constant"
    if layer.op == "MatMul":
        rank = len(bn.inputs[0].shape) if bn.inputs[0].shape is not None else None
        if rank != 2 or layer.inputs[1].values.ndim != 2:
            return "the MatMul output is not 2-D (N, C), so BN's axis 1 is not its columns"
    elif add is not None:
        return "an Add sits between the layer and the BN"
    if output_channels(layer, layer.inputs[1].values) != bn.inputs[1].values.size:
        return f"{layer.name} and the BN disagree on the number of channels"
    return layer, add


def _sole_consumer(graph: gs.Graph, tensor: gs.Tensor, consumer: gs.Node) -> bool:
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return False
    return tensor.outputs[0] is consumer


def _fold_into(
    graph: gs.Graph,
    bn: gs.Node,
    target: tuple[gs.Node, gs.Node | None],
    stats: tuple[np.ndarray, np.ndarray],
    names: NameSource,
) -> None:
    layer, add = target
    s, shift = stats
    weight = layer.inputs[1]
    dtype = weight.values.dtype
    w = CHANNEL_HOOKS[layer.op](layer, weight.values.astype(np.float64), s)
    if layer.op == "MatMul":
        bias_index = 0 if add is not None and isinstance(add.inputs[0], gs.Constant) else 1
        b = add.inputs[bias_index].values.astype(np.float64) if add is not None else 0.0
        b = b * s + shift
    elif layer.op == "Gemm":
        c = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
        beta_attr = float(layer.attrs.get("beta", 1.0))
        b = (beta_attr * c.values.astype(np.float64) if c is not None else 0.0) * s + shift
    else:
        has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
        b = (layer.inputs[2].values.astype(np.float64) if has_bias else 0.0) * s + shift
    where = f"BatchNormalization {bn.name!r} folded into {layer.op} {layer.name!r}"
    new_w = checked_cast(w, dtype, where, "weights")
    new_b = checked_cast(np.asarray(b), dtype, where, "bias")
    layer.inputs[1] = gs.Constant(names.tensor(f"{weight.name}_bnfold"), new_w)
    bias_name = names.tensor(f"{layer.name or layer.outputs[0].name}_bias_bnfold")
    bias_tensor = gs.Constant(bias_name, new_b)
    out = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    if layer.op == "MatMul":
        if add is not None:
            add.inputs[bias_index] = bias_tensor
            add.outputs[0] = out
        else:
            graph.nodes.append(
                gs.Node("Add", names.node(f"{bn.name or out.name}_bias"),
                        inputs=[layer.outputs[0], bias_tensor], outputs=[out])
            )
        return
    if layer.op == "Gemm":
        layer.attrs["beta"] = 1.0
    if len(layer.inputs) > 2:
        layer.inputs[2] = bias_tensor
    else:
        layer.inputs.append(bias_tensor)
    layer.outputs[0] = out


def _to_mul_add(
    graph: gs.Graph, bn: gs.Node, stats: tuple[np.ndarray, np.ndarray], names: NameSource
) -> bool:
    x = bn.inputs[0]
    if x.shape is None:
        log.debug("%s: input rank unknown, BN kept", bn.name)
        return False
    rank = len(x.shape)
    dtype = np.dtype(x.dtype) if x.dtype is not None else bn.inputs[1].values.dtype
    s, shift = stats
    shape = (-1,) + (1,) * max(rank - 2, 0)
    where = f"BatchNormalization {bn.name!r} turned into Mul+Add"
    scale = checked_cast(s.reshape(shape), dtype, where, "scale")
    offset = checked_cast(shift.reshape(shape), dtype, where, "offset")
    base = bn.name or bn.outputs[0].name
    out = bn.outputs[0]
    mid = gs.Variable(names.tensor(f"{base}_scaled"), dtype=dtype, shape=x.shape)
    bn.inputs.clear()
    bn.outputs.clear()
    graph.nodes.append(
        gs.Node("Mul", names.node(f"{base}_mul"),
                inputs=[x, gs.Constant(names.tensor(f"{base}_scale"), scale)], outputs=[mid])
    )
    graph.nodes.append(
        gs.Node("Add", names.node(f"{base}_add"),
                inputs=[mid, gs.Constant(names.tensor(f"{base}_offset"), offset)], outputs=[out])
    )
    return True


def checked_cast(
    values: np.ndarray, dtype: np.dtype, where: str, what: str, pass_name: str = "fold_bn"
) -> np.ndarray:
    """Cast float64 ``values`` to ``dtype``.

    Raises:
        PassError: Some cast value is not finite in ``dtype`` (overflow); names ``where``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(values).astype(dtype)
    if not np.all(np.isfinite(cast)):
        bad = int(np.size(cast) - np.count_nonzero(np.isfinite(cast)))
        raise PassError(
            f"{pass_name}: {where}: {bad} folded {what} are not finite in "
            f"{np.dtype(dtype).name}",
            "the folded values overflow (e.g. a near-zero running variance with a large BN "
            f"scale); fix the model's statistics or leave {pass_name} out of the pipeline",
        )
    return cast


class NameSource:
    """Fresh tensor and node names that collide with nothing in the graph (shared by passes)."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}

    def tensor(self, base: str) -> str:
        """A tensor name starting with ``base``, unused so far."""
        return self._fresh(base)

    def node(self, base: str) -> str:
        """A node name starting with ``base``, unused so far."""
        return self._fresh(base)

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name
