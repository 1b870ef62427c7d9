r"""SmoothQuant: move activation outliers into the weights of the layers that read them.

A linear layer ``Y = X W`` (MatMul, or Gemm with ``transA = 0``; ``W`` constant, input
channel ``j`` = row ``j`` of ``W``) computes the same with any positive per-channel ``s``::

    X W  ==  (X diag(1/s)) (diag(s) W)

SmoothQuant (Xiao et al., 2023) picks, from the largest magnitude of each input channel over
the calibration data, ``max|X_j|``, and of each weight row, ``max|W_j|``::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so a channel ``40x`` larger than the rest is divided by about ``sqrt(40)`` in the activation
and multiplied by as much in the weight (``alpha = 0.5``): one 8-bit activation scale no
longer flattens every other channel, and the per-channel weight scales absorb the rest.
Every layer reading ``X`` takes the same ``s`` (``max|W_j|`` over all their rows ``j``).

``X / s`` is then folded where it is exact:

* into the producer of ``X`` when every reader of ``X`` is smoothed and ``X`` is no graph
  output: ``LayerNormalization`` over the last axis (its scale and bias divided by ``s``),
  MatMul / Gemm with a constant weight (its output columns divided by ``s``), a ``Mul`` by a
  per-channel constant (a decomposed LayerNorm's gamma) and an ``Add`` of one (a bias or
  beta), the latter only when the ``Add``'s other input folds too;
* else into an explicit ``Mul(X, 1/s)`` in front of the smoothed readers, which the plan
  keeps float (quantizing its input would bring the outliers back).

A constant that another node also reads is copied before it is rescaled. The readers'
weights are rescaled once each, even when two readers share one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

#: The range ``s`` is clipped to: a channel that is zero over all the data, or a weight row
#: of zeros, would otherwise give 0 or inf.
MIN_SCALE, MAX_SCALE = 1e-5, 1e5
#: Suffix of the explicit ``Mul`` nodes and their outputs.
MUL_SUFFIX = "_smoothquant"


@dataclass(frozen=True)
class Smoothing:
    """One activation smoothed.

    Attributes:
        tensor: The activation ``X``.
        readers: The linear layers whose weights took ``s``.
        folded_into: The nodes ``1/s`` was folded into (empty: an explicit Mul).
        mul: The explicit ``Mul`` node (None when folded).
        ratio_before: ``max_j max|X_j| / median_j max|X_j|`` on the calibration data.
        ratio_after: The same ratio of ``X / s``.
    """

    tensor: str
    readers: tuple[str, ...]
    folded_into: tuple[str, ...]
    mul: str | None
    ratio_before: float
    ratio_after: float

    def to_dict(self) -> dict:
        """Plain dict for the report."""
        return {"tensor": self.tensor, "readers": list(self.readers),
                "folded_into": list(self.folded_into), "mul": self.mul,
                "channel_ratio_before": round(self.ratio_before, 3),
                "channel_ratio_after": round(self.ratio_after, 3)}


def channel_ratio(channel_max: np.ndarray) -> float:
    """``max / median`` of the channels' largest magnitudes: how far outliers stand out."""
    values = np.asarray(channel_max, dtype=np.float64)
    median = float(np.median(values))
    return float(values.max() / median) if median > 0 else float("inf")


def smoothing_targets(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    """``{activation: linear readers}``: the tensors SmoothQuant can smooth, and who reads them.

    A reader is a MatMul reading the activation as input 0 with a constant 2-D weight, or a
    Gemm with ``transA = 0`` and a constant weight.
    """
    targets: dict[str, list[gs.Node]] = {}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) or not tensor.name:
            continue
        readers = [n for n in tensor.outputs if _input_channels(n, tensor) is not None]
        if readers:
            targets[tensor.name] = readers
    return targets


def smooth(graph: gs.Graph, channel_max: Mapping[str, np.ndarray], alpha: float,
           *, tensors=None, explicit=None) -> tuple[gs.Graph, list[Smoothing]]:
    """Apply SmoothQuant to the activations read by MatMul/Gemm layers.

    Args:
        graph: The float graph (changed in place and returned).
        channel_max: ``{activation: max|X_j| per channel of the last axis}`` over the
            calibration data (:func:`qtool.calibration.collector.channel_absmax`).
        alpha: Migration strength in ``[0, 1]``: 0 leaves the activations' ranges, 1 moves
            them all into the weights.
        tensors: Only these activations (None: every target with statistics).
        explicit: The activations that may take an explicit ``Mul`` when ``1/s`` does not
            fold (None: all); the others are smoothed only where it folds, so no float op
            is added for an activation without outliers.

    Returns:
        ``(graph, smoothings)``, one record per activation smoothed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    done: list[Smoothing] = []
    scaled_weights: set[int] = set()
    for name, readers in smoothing_targets(graph).items():
        if name not in channel_max or (tensors is not None and name not in tensors):
            continue
        x_max = np.asarray(channel_max[name], dtype=np.float64).reshape(-1)
        x = readers[0].inputs[0]
        widths = {_input_channels(n, x) for n in readers}
        if widths != {x_max.size}:
            log.info("smoothquant: %s declined (channels %s vs statistics %d)", name,
                     sorted(widths), x_max.size)
            continue
        if explicit is not None and name not in explicit and _fold_plan(graph, x, readers) is None:
            continue
        w_max = np.max([_weight_row_max(n) for n in readers], axis=0)
        s = _scales(x_max, w_max, alpha)
        done.append(_apply(graph, x, readers, s, x_max, scaled_weights))
    graph.cleanup().toposort()
    return graph, done


def _scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
    s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, MIN_SCALE, MAX_SCALE)


def _apply(graph, x: gs.Variable, readers, s, x_max, scaled_weights) -> Smoothing:
    for reader in readers:
        weight = reader.inputs[1]
        if id(weight) in scaled_weights:
            continue
        rows = _weight_matrix_rows(reader)  # W with input channels as rows
        own = _own_constant(graph, reader, 1, readers)
        scaled = rows * s[:, None]
        own.values = _cast(scaled.T if _is_transposed(reader) else scaled, weight.values)
        scaled_weights.add(id(own))
    folded = _fold_into_producer(graph, x, readers, 1.0 / s)
    mul = None
    if folded is None:
        mul = _insert_mul(graph, x, readers, 1.0 / s)
    return Smoothing(x.name, tuple(n.name for n in readers), tuple(folded or ()), mul,
                     channel_ratio(x_max), channel_ratio(x_max / s))


def _fold_plan(graph, x: gs.Variable, readers):
    """The edits that fold ``1/s`` into the producer of ``x`` (see :func:`_fold_edits`)."""
    if x in graph.outputs or set(map(id, x.outputs)) != set(map(id, readers)):
        return None
    channels = {_input_channels(n, x) for n in readers}.pop()
    return _fold_edits(x, x.inputs[0] if len(x.inputs) == 1 else None, channels)


def _fold_into_producer(graph, x: gs.Variable, readers, inv_s) -> list[str] | None:
    """Divide ``x`` by ``s`` inside its producer, when exact; the nodes changed, or None."""
    edits = _fold_plan(graph, x, readers)
    if edits is None:
        return None
    for node, index, transposed_axis in edits:
        own = _own_constant(graph, node, index, [node])
        values = np.asarray(own.values, dtype=np.float64)
        if transposed_axis is not None:  # a weight: scale its output channels
            shape = [1] * values.ndim
            shape[transposed_axis] = inv_s.size
            values = values * inv_s.reshape(shape)
        else:  # a per-channel (or scalar) constant over the last axis
            values = np.broadcast_to(values, (*values.shape[:-1], inv_s.size)) * inv_s \
                if values.ndim else np.full(inv_s.size, float(values)) * inv_s
        own.values = _cast(values, own.values)
    return [node.name for node, _, _ in edits]


def _fold_edits(x, producer: gs.Node | None, channels: int):
    """``[(node, input index, weight axis or None)]`` that divide ``x`` by ``s``, or None."""
    if producer is None:
        return None
    op = producer.op
    if op == "LayerNormalization":
        axis = producer.attrs.get("axis", -1)
        rank = len(x.shape) if x.shape else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        params = [i for i in (1, 2) if len(producer.inputs) > i and producer.inputs[i].name]
        if not all(_per_channel(producer.inputs[i], channels) for i in params):
            return None
        return [(producer, i, None) for i in params]
    if op == "MatMul" and _constant_2d(producer, 1) and producer.inputs[1].shape[1] == channels:
        return [(producer, 1, 1)]
    if op == "Gemm" and _constant_2d(producer, 1):
        trans_b = producer.attrs.get("transB", 0)
        if producer.inputs[1].shape[0 if trans_b else 1] != channels:
            return None
        edits = [(producer, 1, 0 if trans_b else 1)]
        if len(producer.inputs) > 2 and producer.inputs[2].name:
            if not _per_channel(producer.inputs[2], channels):
                return None
            edits.append((producer, 2, None))
        return edits
    if op in ("Mul", "Add") and len(producer.inputs) == 2:
        const = [i for i, t in enumerate(producer.inputs) if isinstance(t, gs.Constant)]
        if len(const) != 1 or not _per_channel(producer.inputs[const[0]], channels):
            return None
        edits = [(producer, const[0], None)]
        if op == "Mul":  # (u * g) / s == u * (g / s): exact whatever u is
            return edits
        other = producer.inputs[1 - const[0]]  # (u + b) / s == u / s + b / s: u must fold
        if len(other.outputs) != 1 or len(other.inputs) != 1:
            return None
        inner = _fold_edits(other, other.inputs[0], channels)
        return None if inner is None else edits + inner
    return None


def _insert_mul(graph, x: gs.Variable, readers, inv_s) -> str:
    name = f"{x.name}{MUL_SUFFIX}"
    scale = gs.Constant(f"{name}_inv_scale", inv_s.astype(np.float32))
    smoothed = gs.Variable(name, dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", name=name, inputs=[x, scale], outputs=[smoothed]))
    for reader in readers:
        reader.inputs[0] = smoothed
    return name


def _input_channels(node: gs.Node, tensor) -> int | None:
    """Input channels of ``node`` if it is a smoothable linear layer reading ``tensor``."""
    if not node.inputs or node.inputs[0] is not tensor or not _constant_2d(node, 1):
        return None
    if node.op == "MatMul":
        return int(node.inputs[1].shape[0])
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return int(node.inputs[1].shape[1 if node.attrs.get("transB", 0) else 0])
    return None


def _constant_2d(node: gs.Node, index: int) -> bool:
    return (len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant)
            and len(node.inputs[index].shape) == 2
            and np.issubdtype(node.inputs[index].dtype, np.floating))


def _per_channel(tensor, channels: int) -> bool:
    """A float constant varying at most along the last axis, with ``channels`` entries."""
    if not isinstance(tensor, gs.Constant) or not np.issubdtype(tensor.dtype, np.floating):
        return False
    shape = tuple(tensor.shape)
    return not shape or (shape[-1] in (1, channels) and all(d == 1 for d in shape[:-1]))


def _is_transposed(node: gs.Node) -> bool:
    return node.op == "Gemm" and bool(node.attrs.get("transB", 0))


def _weight_matrix_rows(node: gs.Node) -> np.ndarray:
    w = np.asarray(node.inputs[1].values, dtype=np.float64)
    return w.T if _is_transposed(node) else w


def _weight_row_max(node: gs.Node) -> np.ndarray:
    return np.abs(_weight_matrix_rows(node)).max(axis=1)


def _own_constant(graph, node: gs.Node, index: int, allowed) -> gs.Constant:
    """``node``'s constant input, copied first when a node outside ``allowed`` reads it too."""
    const = node.inputs[index]
    allowed_ids = set(map(id, allowed))
    if all(id(reader) in allowed_ids for reader in const.outputs):
        return const
    copy = gs.Constant(_fresh_name(graph, f"{const.name}_smoothed"), np.array(const.values))
    for reader in list(allowed):
        for i, tensor in enumerate(reader.inputs):
            if tensor is const:
                reader.inputs[i] = copy
    return copy


def _fresh_name(graph: gs.Graph, base: str) -> str:
    taken = graph.tensors().keys()
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _cast(values: np.ndarray, like) -> np.ndarray:
    return np.ascontiguousarray(values).astype(np.asarray(like).dtype)
